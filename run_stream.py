"""The real-time monitor with the embedded default (`python run_stream.py`); the same as `cemd run`."""
import sys

from realtime.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
