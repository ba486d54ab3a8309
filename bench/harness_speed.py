"""Speed of the test harness's own pieces, kept out of the tests (a timed test fails on a busy machine).

    python -m bench.harness_speed [--json OUT]

* the simulator: one 256² WLI/NBI pair (``render_pair``), median of 20 (target 25 ms);
* the calibration timeline plot of a 20,000-frame examination with 200 modality runs and 19
  alerts (``plot_timeline``; target under 3 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.provenance import provenance, provenance_markdown


def pair_ms(n: int = 20) -> float:
    from engine.synth.stills import LESION_KINDS, render_pair

    render_pair(0)
    times = []
    for s in range(n):
        t0 = time.perf_counter()
        render_pair(s, 256, None if s % 4 == 0 else list(LESION_KINDS)[s % len(LESION_KINDS)])
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def long_timeline_s() -> float:
    from calibration.plots import plot_timeline

    rng = np.random.default_rng(1)
    t = np.arange(20000) / 30.0
    score = 0.3 + 0.03 * rng.standard_normal(t.size)
    modality = np.where((np.arange(t.size) // 100) % 2 == 0, "wli", "nbi")
    alerts = [(i, i + 20) for i in range(500, 19000, 1000)]
    lesions = [(i - 10, i + 40, i % 2000 == 500) for i in range(500, 19000, 1000)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        plot_timeline(Path(tmp) / "long.png", t, score, modality, {"wli": 0.4, "nbi": 0.35}, alerts, lesions)
        return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {"provenance": provenance(), "render_pair_256_ms": pair_ms(), "timeline_20000_frames_s": long_timeline_s()}
    print(f"render_pair 256²: {out['render_pair_256_ms']} ms (target 25) · timeline of 20,000 frames: "
          f"{out['timeline_20000_frames_s']} s (target < 3)\n{provenance_markdown(out['provenance'])}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
