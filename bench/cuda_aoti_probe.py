"""Probe AOTInductor on CUDA in isolated subprocesses (a crash in one variant cannot hide the others).

    python -m bench.cuda_aoti_probe --bundle models/demo [--freezing 0,1]

For each setting: build a batch-1 WLI package, load it, check it against eager FP32 and time it.
Used to find which inductor settings load and run on a given GPU / torch build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from engine.bundle import load_bundle
from engine.backends import eager_module, probe_frames, check_parity
freezing = bool(int(sys.argv[1])); bundle = sys.argv[2]; out = sys.argv[3]
b = load_bundle(bundle)
m = eager_module(b, "wli", "cuda", "fp32")
x = torch.rand(1, 3, 256, 256, device="cuda")
with torch.no_grad():
    ep = torch.export.export(m, (x,), strict=False)
import os
build = None
if not os.environ.get("PROBE_LOAD_ONLY"):
    t0 = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=out, inductor_configs={"freezing": freezing})
    build = time.perf_counter() - t0
    print("built", build, flush=True)
    if os.environ.get("PROBE_BUILD_ONLY"):
        sys.exit(0)
path = out
fn = torch._inductor.aoti_load_package(path)
print("loaded", flush=True)
par = check_parity(m, fn, probe_frames(256, 8), 1, "cuda", "fp32")
ts = []
with torch.no_grad():
    for _ in range(20): fn(x)
    torch.cuda.synchronize()
    for _ in range(200):
        t0 = time.perf_counter(); fn(x); torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1000)
ts.sort()
print("RESULT", json.dumps({"freezing": freezing, "build_s": round(build, 1), "p50_ms": ts[100], "p99_ms": ts[197],
                            "parity": par}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="models/demo")
    ap.add_argument("--freezing", default="0,1")
    args = ap.parse_args()
    import os

    for f in args.freezing.split(","):
        # build in one process, load in a fresh one (as the monitor would)
        env = {**os.environ, "PROBE_BUILD_ONLY": "1"}
        subprocess.run([sys.executable, "-c", CHILD, f, args.bundle, f"/tmp/probe_f{f}.pt2"], capture_output=True,
                       text=True, env=env)
        env = {**os.environ, "PROBE_LOAD_ONLY": "1"}
        proc = subprocess.run([sys.executable, "-c", CHILD, f, args.bundle, f"/tmp/probe_f{f}.pt2"], capture_output=True,
                              text=True, env=env)
        res = [line for line in proc.stdout.splitlines() if line.startswith(("RESULT", "built", "loaded"))]
        print(f"freezing={f}: exit {proc.returncode}; " + " | ".join(res) if res else f"freezing={f}: exit {proc.returncode}")
        if proc.returncode:
            print("  " + "\n  ".join(proc.stderr.strip().splitlines()[-3:]))


if __name__ == "__main__":
    main()
