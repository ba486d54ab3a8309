"""The command line: `cemd` and `run_stream.py`."""
