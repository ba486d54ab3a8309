"""Ablation of CEMD's inferred design choices, all variants trained and evaluated in one run.

    python -m bench.ablation --train-data data/synth-seed1 --test-data data/synth-seed2 --out runs/ablation

Every variant gets the same data, seed and epoch budget, so differences come from the
switch alone. Results (synthetic data) go to OUT/ablation.json and OUT/ablation.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.provenance import provenance, provenance_markdown
from engine.eval.evaluate import evaluate_bundle
from engine.model.config import ModelConfig, TrainConfig
from engine.train.trainer import Trainer

VARIANTS: dict[str, dict[str, Any]] = {
    "cemd": {},
    "plain_rd": {"teacher_training": False},
    "no_fusion": {"fusion": False},
    "pixel_cosine": {"student_loss": "pixel"},
    "independent_masks": {"mask_mode": "independent"},
    "hard_mining": {"hard_mining": True},
    # Scoring-only variants: the cemd weights, scored differently (no retraining).
    "all_scales": {"score_scales": [0, 1, 2]},
    "all_scales_max": {"score_scales": [0, 1, 2], "score_reduction": "max"},
    "stride4_only": {"score_scales": [0]},
    "stride8_only": {"score_scales": [1]},
}
RESCORE = {"all_scales": "cemd", "all_scales_max": "cemd", "stride4_only": "cemd", "stride8_only": "cemd"}
DESCRIPTIONS = {
    "cemd": "CEMD as built: CMA teacher (complementary masks, fusion) + global cosine students",
    "plain_rd": "plain reverse distillation per modality: no teacher training (teacher = frozen encoder)",
    "no_fusion": "teacher trained without cross attention (intra-modal masked reconstruction only)",
    "pixel_cosine": "per-pixel instead of global cosine loss for the students",
    "independent_masks": "independent instead of complementary masks in stage 1",
    "hard_mining": "hard-mining global cosine (ReContrast) for the students",
    "all_scales": "cemd weights; anomaly map summed over all three scales (RD4AD) instead of stride 16 only",
    "all_scales_max": "cemd weights; all three scales and image score = max (RD4AD scoring)",
    "stride4_only": "cemd weights; anomaly map from the stride-4 scale only",
    "stride8_only": "cemd weights; anomaly map from the stride-8 scale only",
}


def rescored_bundle(src: Path, dst: Path, changes: dict[str, Any]) -> Path:
    """A copy of bundle `src` whose scoring settings differ; weights and their hashes are untouched."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["model"].update(changes)
    meta["score_stats"] = {}  # measured with the original scoring; not valid for this one
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


def run(train_data: Path, test_data: Path, out: Path, variants: list[str], teacher_epochs: int, student_epochs: int,
        seed: int, resume: bool = False) -> dict[str, Any]:
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"provenance": provenance(), "synthetic": True, "train_data": str(train_data),
                               "test_data": str(test_data), "teacher_epochs": teacher_epochs,
                               "student_epochs": student_epochs, "seed": seed, "variants": {}}
    done: dict[str, Any] = {}
    if resume and (out / "ablation.json").is_file():
        old = json.loads((out / "ablation.json").read_text())
        same = all(old.get(k) == results[k] for k in ("train_data", "test_data", "teacher_epochs", "student_epochs", "seed"))
        if not same:
            raise SystemExit(f"--resume: {out}/ablation.json was made with other data, budget or seed; use another --out")
        done = old["variants"]
        results["provenance_earlier"] = old["provenance"]
    for name in variants:
        if name in done and (out / name / "bundle.json").is_file():
            console.print(f"{name}: kept from the earlier run in {out}")
            results["variants"][name] = done[name]
            continue
        console.rule(f"{name}: {DESCRIPTIONS[name]}")
        t0 = time.perf_counter()
        if name in RESCORE:
            base = RESCORE[name]
            if base not in results["variants"]:
                raise SystemExit(f"variant {name} rescores {base}'s weights: list {base} before it in --variants")
            bundle = rescored_bundle(out / base, out / name, VARIANTS[name])
            train_s = results["variants"][base]["train_seconds"]
        else:
            # the distillation model's parts only: the colour map (on by default) is measured apart
            model = ModelConfig(**{"colour_score": False, **VARIANTS[name]})
            train = TrainConfig(seed=seed, teacher_epochs=teacher_epochs, student_epochs=student_epochs)
            bundle = Trainer(train_data, out / name, model, train, progress=False).run()
            train_s = time.perf_counter() - t0
        metrics = evaluate_bundle(bundle, test_data, out / f"{name}.json", progress=False, console=console)
        results["variants"][name] = {"train_seconds": round(train_s, 1), "config": VARIANTS[name],
                                     **{m: metrics[m] for m in ("wli", "nbi") if m in metrics}}
        (out / "ablation.json").write_text(json.dumps(results, indent=2))
    (out / "ablation.md").write_text(markdown(results))
    console.print(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    kinds = ("elevated_erythema", "irregular_microvessels", "depressed_neoplasia")
    lines = [
        f"Synthetic data; train {results['train_data']}, test {results['test_data']}; "
        f"{results['teacher_epochs']} teacher / {results['student_epochs']} student epochs, seed {results['seed']}.",
        "",
        "| variant | branch | image AUROC, visible kinds | pixel AUROC, visible kinds | image AUROC, all kinds | "
        "pixel AUROC, all kinds | " + " | ".join(f"img/pix {k}" for k in kinds) + " | train s |",
        "|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for name, r in results["variants"].items():
        for m in ("wli", "nbi"):
            if m not in r:
                continue
            per = r[m]["per_kind"]
            vis = r[m].get("visible_kinds", r[m])
            cells = " | ".join(f"{per[k]['image_auroc']:.3f} / {per[k]['pixel_auroc']:.3f}" if k in per else "–"
                               for k in kinds)
            lines.append(f"| {name} | {m.upper()} | {vis['image_auroc']:.3f} | {vis['pixel_auroc']:.3f} | "
                         f"{r[m]['image_auroc']:.3f} | {r[m]['pixel_auroc']:.3f} | {cells} | {r['train_seconds']:.0f} |")
    lines += ["", "Provenance: " + provenance_markdown(results["provenance"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-data", type=Path, required=True)
    ap.add_argument("--test-data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="cemd,all_scales,all_scales_max,plain_rd,no_fusion,pixel_cosine")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="keep variants already in OUT/ablation.json (same data, budget, seed); run only the others")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    run(args.train_data, args.test_data, args.out, names, args.teacher_epochs, args.student_epochs, args.seed,
        args.resume)


if __name__ == "__main__":
    main()
