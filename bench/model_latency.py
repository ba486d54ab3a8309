"""Latency of each student branch per backend, batch 1 and 4, with provenance.

    python -m bench.model_latency --bundle models/demo --backends eager,aoti[,tensorrt] --json OUT [--device cpu|cuda]
    python -m bench.model_latency --bundle B --backends eager,aoti,onnxruntime,openvino,auto   # what auto picks, same run

Each backend is built (or loaded from BUNDLE/compiled/), checked against eager on probe
frames, warmed up, then timed for --runs calls (≥ 200 by default) on a fixed 256² input.
Writes {"provenance": …, "results": [{"backend", "modality", "batch", "p50_ms", "p95_ms", "p99_ms",
"max_ms", "compile_s", "parity"}, …]} and prints a Markdown table with the ratio to eager.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bench.provenance import provenance, provenance_markdown
from bench.timing import time_calls
from engine.deploy.backends import BackendUnavailable, check_parity, eager_module, load_scorer, probe_frames
from engine.deploy.bundle import load_bundle


def time_scorer(scorer: Any, runs: int, warmup: int = 20) -> dict[str, float]:
    x = torch.rand(scorer.batch, 3, scorer.input_size, scorer.input_size, device=scorer.device)
    sync = torch.cuda.synchronize if scorer.device == "cuda" else None
    return time_calls(lambda: scorer(x), runs, warmup, sync)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/demo"))
    ap.add_argument("--backends", default="eager,aoti")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--parity-frames", type=int, default=200,
                    help="synthetic frames for the compiled-vs-eager check of each compiled branch (0 = skip)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    prov = provenance()
    if args.device == "cuda":
        prov["gpu"] = torch.cuda.get_device_name(0)
    results: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for m in bundle.modalities:
            for backend in (b.strip() for b in args.backends.split(",")):
                try:
                    scorer = load_scorer(bundle, m, backend, args.device, batch=batch, log=print)
                except BackendUnavailable as exc:
                    print(f"{m.upper()} {backend} batch {batch}: unavailable: {exc}")
                    results.append({"backend": backend, "modality": m, "batch": batch, "unavailable": str(exc)})
                    continue
                if backend == "auto":  # the default: which backend it picked, timed beside the others in this run
                    backend = f"auto ({scorer.backend})"
                parity = scorer.parity
                if (backend != "eager" or scorer.precision != "fp32") and args.parity_frames:
                    frames = probe_frames(bundle.model.input_size, args.parity_frames, seed=21, modality=m)
                    parity = check_parity(eager_module(bundle, m, args.device, "fp32"), scorer.fn, frames, batch,
                                          args.device, scorer.precision)
                    print(f"{m.upper()} {backend} batch {batch}: parity on {len(frames)} frames: {parity}")
                r = {"backend": backend, "modality": m, "batch": batch, "device": args.device,
                     "precision": scorer.precision, **time_scorer(scorer, args.runs),
                     "compile_s": scorer.compile_seconds, "parity": parity}
                results.append(r)
                print(f"{m.upper()} {backend} {scorer.precision} batch {batch}: p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms", flush=True)
    out = {"provenance": prov, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    rows = [r for r in out["results"] if "p50_ms" in r]
    eager = {(r["modality"], r["batch"]): r["p50_ms"] for r in rows if r["backend"] == "eager"}
    lines = ["| branch | backend | precision | batch | p50 ms | p95 ms | p99 ms | max ms | p50 / eager | compile s | "
             "parity max err | same ranking |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = eager.get((r["modality"], r["batch"]))
        ratio = f"{r['p50_ms'] / base:.2f}" if base else "–"
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") else "–"
        err = f"{r['parity']['max_abs_map_error']:.1e} ({r['parity']['frames']} frames)" if r.get("parity") else "–"
        rank = str(r["parity"]["same_ranking"]) if r.get("parity") else "–"
        lines.append(f"| {r['modality'].upper()} | {r['backend']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {ratio} | {comp} | {err} | {rank} |")
    return "\n".join(lines) + "\n\nProvenance: " + provenance_markdown(out["provenance"]) + "\n"


if __name__ == "__main__":
    main()
