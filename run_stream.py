"""Entry point of the real-time monitor (capture → score → alerts over ZeroMQ).

The streaming monitor itself is being built (see the open issues); until it lands this
prints its help and points to what runs today.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="run_stream.py",
        description=(
            "Real-time endoscopic anomaly monitor. The streaming pipeline (capture process, "
            "student branch per modality, ZeroMQ alerts, overlay) is not built yet. "
            "Today: `cemd demo` evaluates the demo bundle on synthetic data; `cemd --help` lists "
            "synth, synth-video, train and evaluate."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    build_parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
