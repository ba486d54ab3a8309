"""Bundles on disk and the compiled backends that run a branch."""
