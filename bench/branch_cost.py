"""CPU cost of one student branch in eager PyTorch (batch 1 by default, the bundle's input size).

    python -m bench.branch_cost --bundle models/demo [--runs 100] [--json OUT]

The full backend comparison (AOTInductor, TensorRT, batch 4) belongs to bench.model_latency;
this is the number docs/RESULTS.md quotes for the model itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bench.provenance import provenance
from bench.timing import time_calls
from engine.deploy.bundle import load_bundle


@torch.no_grad()
def time_branch(branch: torch.nn.Module, size: int, batch: int, runs: int, warmup: int = 10) -> dict[str, float]:
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return time_calls(lambda: branch(x), runs, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/demo"))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    out: dict[str, Any] = {"provenance": provenance(), "backend": "eager", "device": "cpu", "batch": args.batch,
                           "input": bundle.model.input_size, "results": {}}
    for m in bundle.modalities:
        branch = bundle.branch(m).to(memory_format=torch.channels_last)
        out["results"][m] = time_branch(branch, bundle.model.input_size, args.batch, args.runs)
        r = out["results"][m]
        print(f"{m.upper()} eager CPU batch {args.batch}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f}, "
              f"p99 {r['p99_ms']:.1f}, max {r['max_ms']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
