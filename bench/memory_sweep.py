"""How the memory map's gain and the image score were chosen: a sweep on a validation split held out by image.

    python -m bench.memory_sweep --data ../shared/real/kvasir-dev --json runs/memory_sweep.json
                                 [--out runs/memory-sweep] [--val-images 100] [--banks 4096,16384] [--scale 2]
                                 [--no-teacher-training]

DATA is a dataset in the project's layout with one modality and whole training images with masks
(DATA/full/train), such as the real Kvasir-SEG development set (Jha et al., MMM 2020; research
and education use only — never commit it or anything trained on it).

The last ``--val-images`` whole training images by name are held out entirely: their normal
windows and a window on each of their polyps form the validation split; a bundle is trained
with the defaults, memory map off, on the normal windows of the other images only (OUT/fit,
reused when present; its fit windows are linked into OUT/fit-data), so neither the student nor
the memory bank has seen a validation image.
For each bank size the memory map is fitted as `cemd train --stage memory` fits it; the
distillation map is computed once per image and the memory map once per image and bank; the sweep then scores
distillation + gain × memory for each gain (and the memory map alone) under each image-score
reduction: image AUROC on the validation split (choose here), on the test windows and pixel
AUROC on both and on the whole test images (report here). Provenance included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.provenance import provenance, provenance_markdown
from bench.real_eval import _load_whole, branch_scorer, validation_windows
from engine.data import dataset as ds
from engine.deploy.bundle import Bundle, load_bundle
from engine.errors import DatasetError
from engine.eval import metrics
from engine.model.anomaly_map import FieldOfViewMask, reduce_score
from engine.model.config import ModelConfig, TrainConfig
from engine.train.trainer import Trainer, fit_bundle_memory

GAINS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, None)  # None = the memory map alone
REDUCTIONS = (("mean", 0.0), ("topk", 0.1), ("topk", 0.01))


def image_of(window: Path) -> str:
    """The whole image a window was cut from (``<image stem>_g<k>``)."""
    return window.stem.rsplit("_g", 1)[0]


def fit_dataset(data: Path, modality: str, out: Path, held_out: set[str]) -> Path:
    """DATA's training windows of every image not in ``held_out``, linked into a dataset of their own."""
    good = out / modality / "train" / "good"
    shutil.rmtree(out, ignore_errors=True)
    good.mkdir(parents=True)
    for p in ds.scan_dataset(data, require_train=True).modalities[modality].train:
        if image_of(p) not in held_out:
            (good / p.name).symlink_to(p.resolve())
    return out


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], Any], images: np.ndarray) -> list[Any]:
    return [fn(torch.from_numpy(images[i:i + 16]).permute(0, 3, 1, 2).float().div_(255))
            for i in range(0, len(images), 16)]


def distillation_maps(bundle: Bundle, modality: str, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation map alone (as bench.real_eval scores it) and the field of view; the same for every bank."""
    plain = branch_scorer(bundle, modality, "distillation")
    fov_mask = FieldOfViewMask(bundle.model.fov_threshold, bundle.model.fov_window)
    d, f = zip(*_batched(lambda x: (plain(x)[0], fov_mask(x)), images))
    return torch.cat(d), torch.cat(f)


def memory_maps(bundle: Bundle, modality: str, images: np.ndarray) -> torch.Tensor:
    """The memory map at weight 1, upsampled and smoothed as the branch does."""
    full = bundle.branch(modality)
    return torch.cat(_batched(lambda x: full.smooth(full.memory(full.encoder(x)[full.memory_scale])), images)
                     ) / full.memory.weight


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/memory-sweep"))
    ap.add_argument("--val-images", type=int, default=100, help="whole training images held out (the last by name)")
    ap.add_argument("--banks", default="4096,16384")
    ap.add_argument("--scale", type=int, default=ModelConfig.memory_scale, choices=(0, 1, 2),
                    help="encoder scale the memory map reads (0/1/2 = stride 8/16/32)")
    ap.add_argument("--no-teacher-training", action="store_true",
                    help="the fit bundle without stage 1 (teacher = frozen encoder), as plain reverse distillation")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    index = ds.scan_dataset(a.data, require_train=True, require_test=True)
    if len(index.modalities) != 1:
        raise DatasetError(f"{a.data}: bench.memory_sweep takes one modality, found {', '.join(index.modalities)}")
    (modality, split), = index.modalities.items()
    cfg = ModelConfig()
    size = cfg.input_size
    stems = sorted({image_of(p) for p in split.train})
    held = set(stems[-a.val_images:])
    fit_dir = a.out / ("fit-plain" if a.no_teacher_training else "fit")
    fit_data = fit_dataset(a.data, modality, a.out / "fit-data", held)
    if not (fit_dir / "bundle.json").is_file():
        Trainer(fit_data, fit_dir, replace(cfg, memory_score=False, teacher_training=not a.no_teacher_training),
                TrainConfig(), progress=False, log=print).run()
    val = validation_windows(a.data, modality, size, images=held,
                             normal=[p for p in split.train if image_of(p) in held])
    if val is None:
        raise DatasetError(f"{a.data}: no whole training images with polyp masks in full/train to validate on")
    items = split.test
    sets = {"validation": val,
            "test": {"images": ds.load_images([it.path for it in items], size), "masks": ds.load_masks(items, size),
                     "labels": np.array([it.label for it in items])}}
    whole_dir = a.data / "full" / "test"
    if (whole_dir / "images").is_dir():
        wi, wm = _load_whole(whole_dir, size)
        sets["whole"] = {"images": wi, "masks": wm, "labels": None}
    rows: list[dict[str, Any]] = []
    distilled = {k: distillation_maps(load_bundle(fit_dir), modality, v["images"]) for k, v in sets.items()}
    for bank in (int(v) for v in a.banks.split(",") if v.strip()):
        copy = a.out / (f"{fit_dir.name}+memory{bank}" + ("" if a.scale == cfg.memory_scale else f"-scale{a.scale}"))
        if not (copy / "memory.pt").is_file():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(fit_dir, copy)
            fit_bundle_memory(copy, fit_data, print, a.scale, bank, 1.0)
        bundle = load_bundle(copy)
        weight = float(bundle.memory[modality]["weight"])
        memory = {k: memory_maps(bundle, modality, v["images"]) for k, v in sets.items()}
        for gain in GAINS:
            for red, frac in REDUCTIONS:
                row: dict[str, Any] = {"teacher_training": not a.no_teacher_training, "scale": a.scale, "bank": bank,
                                       "gain": "memory only" if gain is None else gain,
                                       "reduction": f"{red} {frac:g}" if red == "topk" else red}
                for k, v in sets.items():
                    (d, fov), m = distilled[k], memory[k]
                    amap = (m * weight if gain is None else d + gain * weight * m) * fov
                    if v["labels"] is not None:
                        row[f"{k}_image_auroc"] = metrics.auroc(v["labels"], reduce_score(amap, red, frac, fov).numpy())
                    if red == "mean":  # the pixel figure does not depend on the image score
                        row[f"{k}_pixel_auroc"] = metrics.pixel_auroc(amap[:, 0].numpy(), v["masks"],
                                                                      valid=fov[:, 0].numpy() > 0.5)
                rows.append(row)
                print(row, flush=True)
    out = {"provenance": provenance(), "data": str(a.data), "held_out_images": len(held),
           "validation": {"normal": int((val["labels"] == 0).sum()), "anomalous": int(val["labels"].sum())},
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2, default=str))
    print(provenance_markdown(out["provenance"]))
    print("| bank | gain | image score | val image | test image | val pixel | test pixel | whole pixel |")
    print("|---|---|---|---|---|---|---|---|")
    pix = {(r["bank"], r["gain"]): r for r in rows if r["reduction"] == "mean"}
    for r in rows:
        p = pix[(r["bank"], r["gain"])]
        cell = lambda k: f"{p[k]:.3f}" if k in p else "–"  # noqa: E731
        print(f"| {r['bank']} | {r['gain']} | {r['reduction']} | {r['validation_image_auroc']:.3f} | "
              f"{r['test_image_auroc']:.3f} | {cell('validation_pixel_auroc')} | {cell('test_pixel_auroc')} | "
              f"{cell('whole_pixel_auroc')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
