"""What the colour outlier map or the memory map costs: the same bundle's branches with and without it, timed interleaved.

    python -m bench.colour_cost --bundle models/demo [--strides 1] [--backends eager,aoti] [--rounds 5]
                                [--runs 60] [--threads N] [--json OUT]
    python -m bench.colour_cost --map memory --bundle B [--banks 4096] ...

The bundle must have the map (``colour_score`` / ``memory_score``). A copy of it with the map
switched off (``engine.deploy.bundle.copy_without``: ``--plain``, default runs/colour-cost-plain; same weights, so only
the map differs) is made, and for each of ``--strides`` other than the bundle's own a timing copy
with the colour map computed at that stride (``stride_copy``: the same statistics relabelled, so
its scores mean nothing, only its cost) — or, for the memory map, for each of ``--banks`` smaller
than the bundle's a copy keeping that many of its patches (``bank_copy``: a smaller random draw,
a valid map). All are loaded per backend, and timing alternates between them for
``--rounds`` rounds of ``--runs`` calls each, batch 1, each round starting with the next variant,
so that drift on a shared machine hits all alike; the table gives medians over all calls and the
ratio to the plain branch. ``--threads 1`` times them as each ``cemd calibrate`` worker runs them.
Provenance included.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.provenance import provenance, provenance_markdown
from bench.timing import time_calls
from engine.deploy.backends import BackendUnavailable, load_scorer
from engine.deploy.bundle import COLOUR_FILE, MEMORY_FILE, copy_without, load_bundle
from engine.model.backbone import file_sha256


def stride_copy(src: Path, dst: Path, stride: int) -> Path:
    """For timing only: ``src`` with its colour map computed at ``stride``, the statistics fitted
    at the bundle's own stride relabelled (scores from it are not meaningful; refit for that)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("compiled", "calibration*"))
    colour = json.loads((dst / COLOUR_FILE).read_text())
    for stats in colour["modalities"].values():
        stats["stride"] = stride
    (dst / COLOUR_FILE).write_text(json.dumps(colour, indent=2))
    meta = json.loads((dst / "bundle.json").read_text())
    meta["model"]["colour_stride"] = stride
    meta["files"][COLOUR_FILE] = file_sha256(dst / COLOUR_FILE)
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


def bank_copy(src: Path, dst: Path, bank: int) -> Path:
    """``src`` with the first ``bank`` patches of each memory bank (the bank is a seeded random draw,
    so its first rows are a smaller one); the weights fitted for the whole bank kept."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("compiled", "calibration*"))
    data = torch.load(dst / MEMORY_FILE, map_location="cpu", weights_only=True)
    for entry in data["modalities"].values():
        entry["bank"] = entry["bank"][:bank].clone()
    torch.save(data, dst / MEMORY_FILE)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["model"]["memory_bank"] = bank
    meta["files"][MEMORY_FILE] = file_sha256(dst / MEMORY_FILE)
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/demo"))
    ap.add_argument("--plain", type=Path, default=Path("runs/colour-cost-plain"))
    ap.add_argument("--map", choices=("colour", "memory"), default="colour", help="which map to time")
    ap.add_argument("--strides", default="1", help="colour map strides to time besides the bundle's own "
                    "(comma list; '' for none)")
    ap.add_argument("--banks", default="4096", help="memory bank sizes to time besides the bundle's own "
                    "(comma list, smaller than it; '' for none)")
    ap.add_argument("--backends", default="eager,aoti")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = default; 1 = as each `cemd calibrate` worker scores)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with_colour = load_bundle(a.bundle)
    if not getattr(with_colour.model, f"{a.map}_score"):
        raise SystemExit(f"{a.bundle} has no {a.map} map (model.{a.map}_score is false)")
    if a.map == "colour":
        own = with_colour.model.colour_stride
        variants = {f"stride {own}": with_colour}
        for k in sorted({int(v) for v in a.strides.split(",") if v.strip()} - {own}):
            variants[f"stride {k}"] = load_bundle(stride_copy(a.bundle, a.plain.with_name(f"{a.plain.name}-stride{k}"), k))
    else:
        own = min(len(e["bank"]) for e in with_colour.memory.values())
        variants = {f"bank {own}": with_colour}
        for k in sorted({int(v) for v in a.banks.split(",") if v.strip() and int(v) < own}, reverse=True):
            variants[f"bank {k}"] = load_bundle(bank_copy(a.bundle, a.plain.with_name(f"{a.plain.name}-bank{k}"), k))
    variants["without"] = load_bundle(copy_without(a.bundle, a.plain, a.map))
    rows: list[dict[str, Any]] = []
    for backend in (b.strip() for b in a.backends.split(",")):
        for m in with_colour.modalities:
            try:
                scorers = {name: load_scorer(b, m, backend, "cpu", log=print) for name, b in variants.items()}
            except BackendUnavailable as exc:
                print(f"{m.upper()} {backend}: unavailable: {exc}")
                continue
            x = torch.rand(1, 3, with_colour.model.input_size, with_colour.model.input_size)
            samples: dict[str, list[float]] = {k: [] for k in scorers}
            names = list(scorers)
            for i in range(a.rounds):  # each round starts with the next variant: no one is always first
                for name in names[i % len(names):] + names[:i % len(names)]:
                    sc = scorers[name]
                    r = time_calls(lambda sc=sc: sc(x), a.runs, warmup=10)
                    samples[name].append(r["p50_ms"])
            med = {k: float(np.median(v)) for k, v in samples.items()}
            rows.append({"backend": backend, "modality": m, "without_p50_ms": round(med["without"], 2),
                         "p50_ms": {k: round(v, 2) for k, v in med.items() if k != "without"},
                         "ratio": {k: round(v / med["without"], 3) for k, v in med.items() if k != "without"},
                         "rounds": a.rounds, "runs": a.runs, "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
    out = {"provenance": provenance(), "bundle": str(a.bundle), "map": a.map, "results": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
    print(provenance_markdown(out["provenance"]))
    names = [k for k in variants if k != "without"]
    print("| branch | backend | p50 ms without | " + " | ".join(f"p50 ms {k} (ratio)" for k in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r['p50_ms'][k]:.2f} ({r['ratio'][k]:.3f})" for k in names)
        print(f"| {r['modality'].upper()} | {r['backend']} | {r['without_p50_ms']:.2f} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
