"""Probe AOTInductor on CUDA in isolated subprocesses (a crash in one variant cannot hide the others).

    python -m bench.cuda_aoti_probe --bundle models/demo [--freezing 0,1]

For each setting: build a batch-1 WLI package in one process, then load it in a fresh one (as
the monitor would), check it against eager FP32 and time it.
Used to find which inductor settings load and run on a given GPU / torch build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, torch
from bench.timing import time_calls
from engine.deploy.bundle import load_bundle
from engine.deploy.backends import eager_module, probe_frames, check_parity
freezing = bool(int(sys.argv[1])); bundle = sys.argv[2]; out = sys.argv[3]
m = eager_module(load_bundle(bundle), "wli", "cuda", "fp32")
x = torch.rand(1, 3, 256, 256, device="cuda")
if os.environ.get("PROBE_BUILD_ONLY"):
    with torch.no_grad():
        ep = torch.export.export(m, (x,), strict=False)
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=out, inductor_configs={"freezing": freezing})
    print("built", round(time.perf_counter() - t0, 1), flush=True)
    sys.exit(0)
fn = torch._inductor.aoti_load_package(out)
print("loaded", flush=True)
par = check_parity(m, fn, probe_frames(256, 8), 1, "cuda", "fp32")
with torch.no_grad():
    t = time_calls(lambda: fn(x), runs=200, warmup=20, sync=torch.cuda.synchronize)
print("RESULT", json.dumps({"freezing": freezing, "p50_ms": t["p50_ms"], "p99_ms": t["p99_ms"], "parity": par}),
      flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="models/demo")
    ap.add_argument("--freezing", default="0,1")
    args = ap.parse_args()
    for f in args.freezing.split(","):
        # build in one process, load in a fresh one (as the monitor would)
        argv = [sys.executable, "-c", CHILD, f, args.bundle, f"/tmp/probe_f{f}.pt2"]
        build = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PROBE_BUILD_ONLY": "1"})
        proc = subprocess.run(argv, capture_output=True, text=True)
        res = [line for line in (build.stdout + proc.stdout).splitlines() if line.startswith(("RESULT", "built", "loaded"))]
        print(f"freezing={f}: exit {proc.returncode}; " + " | ".join(res) if res else f"freezing={f}: exit {proc.returncode}")
        if proc.returncode:
            print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-3:]))


if __name__ == "__main__":
    main()
