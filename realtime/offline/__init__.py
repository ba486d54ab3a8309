"""Offline replay of files through the monitor's scoring path."""
