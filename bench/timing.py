"""The one timing loop every latency benchmark uses."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def time_calls(call: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] | None = None
               ) -> dict[str, float]:
    """Warm up, then time `runs` calls (each followed by `sync`, e.g. torch.cuda.synchronize); milliseconds."""
    for _ in range(warmup):
        call()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "p99_ms": float(np.percentile(t, 99)), "max_ms": float(t.max()), "runs": runs}
