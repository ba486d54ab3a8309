"""``run_stream.py`` whose scoring branch raises on chosen frames: the scorer fault of issue #7.

    python tests/faults/failing_branch.py FIRST[:COUNT] [run_stream.py options …]

The branch call for the FIRST-th frame (0-based, counting only real frames: the monitor's
warm-up calls on an all-zero input pass) and the COUNT-1 after it raise ``RuntimeError``, as a
GPU error or an out-of-memory would; without COUNT, every call from FIRST on. Everything else
is the real monitor, unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine.deploy.backends as backends  # noqa: E402
from realtime.cli import run as run_stream  # noqa: E402


class FailingScorer:
    def __init__(self, scorer: Any, first: int, count: int | None) -> None:
        self._scorer, self._first, self._count, self._frames = scorer, first, count, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    def __call__(self, frames: Any) -> Any:
        if frames.any():  # a real frame, not the warm-up input
            n, self._frames = self._frames, self._frames + 1
            if n >= self._first and (self._count is None or n < self._first + self._count):
                raise RuntimeError(f"injected fault in branch call {n}")
        return self._scorer(frames)


def main() -> int:
    first, _, count = sys.argv[1].partition(":")
    load = backends.load_scorer
    backends.load_scorer = lambda *a, **k: FailingScorer(load(*a, **k), int(first), int(count) if count else None)
    return run_stream.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
