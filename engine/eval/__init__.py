"""Offline evaluation: metrics, reports, plots, the demo bundle."""
