"""Latency bookkeeping: percentiles, Holoscan-style tail and flatness, never averages alone."""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import numpy as np

STAGES = ("capture", "preprocess", "inference", "decision", "publish", "end_to_end")


def latency_summary(values: Iterable[float]) -> dict[str, Any]:
    """p50/p95/p99/max, tail = max − p95, flatness = p90 − p10 (ms)."""
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"n": 0}
    p10, p50, p90, p95, p99 = np.percentile(v, [10, 50, 90, 95, 99])
    mx = float(v.max())
    return {"n": int(v.size), "p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(mx, 3), "tail": round(mx - float(p95), 3), "flatness": round(float(p90 - p10), 3)}


class StageLatencies:
    """Every value for the summary, plus a recent window for the live dashboard."""

    def __init__(self, window: int = 300) -> None:
        self.all: dict[str, list[float]] = {s: [] for s in STAGES}
        self.recent: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}

    def add(self, stage: str, ms: float) -> None:
        self.all[stage].append(ms)
        self.recent[stage].append(ms)

    def recent_p(self, stage: str, q: float) -> float | None:
        r = self.recent[stage]
        return float(np.percentile(np.fromiter(r, np.float64), q)) if r else None

    def summary(self) -> dict[str, Any]:
        return {s: latency_summary(v) for s, v in self.all.items()}


class RateMeter:
    """Events per second over a sliding window of monotonic timestamps."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_ns = int(window_s * 1e9)
        self._t: deque[int] = deque()

    def tick(self, t_ns: int) -> None:
        self._t.append(t_ns)
        while self._t and t_ns - self._t[0] > self.window_ns:
            self._t.popleft()

    def rate(self, now_ns: int) -> float:
        while self._t and now_ns - self._t[0] > self.window_ns:
            self._t.popleft()
        if len(self._t) < 2:
            return 0.0
        return (len(self._t) - 1) / max((self._t[-1] - self._t[0]) / 1e9, 1e-9)
