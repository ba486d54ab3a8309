"""Capture: sources, the shared-memory frame ring, the capture process."""
