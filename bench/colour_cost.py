"""What the colour outlier map costs: the same bundle's branches with and without it, timed interleaved.

    python -m bench.colour_cost --bundle models/demo [--backends eager,aoti] [--rounds 5] [--runs 60] [--json OUT]

The bundle must have the colour map (``colour_score``). A copy of it with the map switched off
(``plain_copy``: ``--plain``, default runs/colour-cost-plain; same weights, so only the map
differs) is made,
both are loaded per backend, and timing alternates between the two for ``--rounds`` rounds of
``--runs`` calls each, batch 1, so that drift on a shared machine hits both alike; the table
gives medians over all calls and the ratio with / without. Provenance included.
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
from engine.backends import BackendUnavailable, load_scorer
from engine.bundle import COLOUR_FILE, load_bundle


def plain_copy(src: Path, dst: Path) -> Path:
    """``src`` as it was before its colour map: the colour settings and ``colour.json`` gone from
    bundle.json (such a bundle scores with the distillation map alone); weights untouched, no
    calibration or compiled engines copied."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("compiled", "calibration*", COLOUR_FILE))
    meta = json.loads((dst / "bundle.json").read_text())
    for key in ("colour_score", "colour_sigma", "colour_gain"):
        meta["model"].pop(key, None)
    meta["files"].pop(COLOUR_FILE, None)
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/demo"))
    ap.add_argument("--plain", type=Path, default=Path("runs/colour-cost-plain"))
    ap.add_argument("--backends", default="eager,aoti")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    with_colour = load_bundle(a.bundle)
    if not with_colour.model.colour_score:
        raise SystemExit(f"{a.bundle} has no colour map (model.colour_score is false)")
    plain = load_bundle(plain_copy(a.bundle, a.plain))
    rows: list[dict[str, Any]] = []
    for backend in (b.strip() for b in a.backends.split(",")):
        for m in with_colour.modalities:
            try:
                scorers = {"with colour": load_scorer(with_colour, m, backend, "cpu", log=print),
                           "without": load_scorer(plain, m, backend, "cpu", log=print)}
            except BackendUnavailable as exc:
                print(f"{m.upper()} {backend}: unavailable: {exc}")
                continue
            x = torch.rand(1, 3, with_colour.model.input_size, with_colour.model.input_size)
            samples: dict[str, list[float]] = {k: [] for k in scorers}
            for _ in range(a.rounds):
                for name, sc in scorers.items():
                    r = time_calls(lambda sc=sc: sc(x), a.runs, warmup=10)
                    samples[name].append(r["p50_ms"])
            med = {k: float(np.median(v)) for k, v in samples.items()}
            rows.append({"backend": backend, "modality": m, "with_colour_p50_ms": round(med["with colour"], 2),
                         "without_p50_ms": round(med["without"], 2),
                         "ratio": round(med["with colour"] / med["without"], 3), "rounds": a.rounds, "runs": a.runs})
            print(rows[-1], flush=True)
    out = {"provenance": provenance(), "bundle": str(a.bundle), "results": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
    print(provenance_markdown(out["provenance"]))
    print("| branch | backend | p50 ms with colour map | p50 ms without | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['modality'].upper()} | {r['backend']} | {r['with_colour_p50_ms']:.2f} | {r['without_p50_ms']:.2f} "
              f"| {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
