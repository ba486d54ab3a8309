"""Image- and pixel-level evaluation of a bundle on a dataset in the documented layout.

Pixel AUROC is computed inside the lit field of view only (the branch's own FOV mask), so
the trivially normal black border does not inflate it. Every report also carries the
trivial mean-colour baseline, so a reader can see how much the model adds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from engine.data import dataset as ds
from engine.deploy.bundle import Bundle, atomic_write_json, load_bundle
from engine.errors import DatasetError
from engine.eval import metrics


@torch.no_grad()
def score_images(bundle: Bundle, modality: str, images: np.ndarray, batch: int = 16
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly maps (N×S×S float32), image scores (N) and FOV masks (N×S×S bool)."""
    branch = bundle.branch(modality)
    maps, scores, fovs = [], [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div_(255)
        amap, score = branch(x)
        maps.append(amap[:, 0].numpy())
        scores.append(score.numpy())
        fov = branch.fov(x)[:, 0].numpy() > 0.5 if branch.fov is not None else np.ones(amap[:, 0].shape, bool)
        fovs.append(fov)
    return np.concatenate(maps), np.concatenate(scores), np.concatenate(fovs)


def mean_colour_baseline(train_images: np.ndarray, test_images: np.ndarray) -> np.ndarray:
    """Trivial baseline: distance of an image's mean lit colour from the normal mean colour."""
    def mean_colour(imgs: np.ndarray) -> np.ndarray:
        lit = imgs.max(axis=3, keepdims=True) > 20
        return (imgs * lit).sum(axis=(1, 2)) / np.maximum(lit.sum(axis=(1, 2)), 1)

    mu = mean_colour(train_images).mean(axis=0)
    return np.linalg.norm(mean_colour(test_images) - mu, axis=1)


def subset_aurocs(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, fovs: np.ndarray,
                   sel: np.ndarray) -> dict[str, Any]:
    """Image AUROC of the selected images, and pixel AUROC when any of them has a mask."""
    rep: dict[str, Any] = {"image_auroc": metrics.auroc(labels[sel], scores[sel])}
    if masks[sel].any():
        rep["pixel_auroc"] = metrics.pixel_auroc(maps[sel], masks[sel], valid=fovs[sel])
    return rep


def _kind_report(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, fovs: np.ndarray,
                 kinds: np.ndarray, kind: str) -> dict[str, Any]:
    rep: dict[str, Any] = {"n": int((kinds == kind).sum()),
                           **subset_aurocs(labels, scores, maps, masks, fovs, (kinds == "good") | (kinds == kind))}
    lesion_area = masks[kinds == kind].sum(axis=(1, 2)) / np.maximum(fovs[kinds == kind].sum(axis=(1, 2)), 1)
    rep["lesion_area_fraction_median"] = float(np.median(lesion_area)) if len(lesion_area) else None
    return rep


def _visible_report(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray, fovs: np.ndarray,
                    kinds: np.ndarray, visible: list[str]) -> dict[str, Any]:
    sel = (kinds == "good") | np.isin(kinds, visible)
    return {"kinds": visible, **subset_aurocs(labels, scores, maps, masks, fovs, sel)}


def evaluate_modality(bundle: Bundle, split: ds.ModalitySplit, size: int, progress: bool,
                      max_train_for_baseline: int = 200, kinds_meta: dict[str, Any] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    items = split.test
    label = f"loading {split.modality.upper()} test" if progress else None
    images = ds.load_images([it.path for it in items], size, progress=label)
    masks = ds.load_masks(items, size)
    labels = np.array([it.label for it in items])
    kinds = np.array([it.kind for it in items])
    if labels.min() == labels.max():
        raise DatasetError(
            f"{split.modality}/test needs both good and anomalous images to measure AUROC; found only "
            f"{'good' if labels.max() == 0 else 'anomalous'} ones"
        )
    t0 = time.perf_counter()
    maps, scores, fovs = score_images(bundle, split.modality, images)
    elapsed = time.perf_counter() - t0
    report: dict[str, Any] = metrics.image_level_report(labels, scores)
    report["pixel_auroc"] = metrics.pixel_auroc(maps, masks, valid=fovs) if masks.any() else None
    report["per_kind"] = {k: _kind_report(labels, scores, maps, masks, fovs, kinds, k)
                          for k in sorted(set(kinds) - {"good"})}
    visible = [k for k in report["per_kind"] if split.modality in (kinds_meta or {}).get(k, {}).get("visible_in", [])]
    if visible and len(visible) < len(report["per_kind"]):
        # Kinds the dataset marks as visible in this modality (dataset.json `visible_in`).
        report["visible_kinds"] = _visible_report(labels, scores, maps, masks, fovs, kinds, visible)
    train = ds.load_images(split.train[:max_train_for_baseline], size) if split.train else None
    if train is not None and len(train):
        base = mean_colour_baseline(train, images)
        report["baseline_mean_colour"] = {"image_auroc": metrics.auroc(labels, base),
                                          "per_kind": {k: metrics.auroc(labels[(kinds == "good") | (kinds == k)],
                                                                        base[(kinds == "good") | (kinds == k)])
                                                       for k in report["per_kind"]}}
    report["n_test"] = int(len(items))
    report["scoring_ms_per_image"] = round(1000 * elapsed / len(items), 2)
    arrays = {"images": images, "maps": maps, "scores": scores, "labels": labels, "kinds": kinds, "masks": masks,
              "fovs": fovs}
    return report, arrays


def evaluate_bundle(bundle_path: Path, data: Path, json_out: Path | None = None, plots: Path | None = None,
                    progress: bool = True, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    bundle = load_bundle(bundle_path)
    index = ds.scan_dataset(data, require_test=True)
    for w in index.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    common = [m for m in bundle.modalities if m in index.modalities]
    if not common:
        raise DatasetError(
            f"{data} has no test data for the bundle's modalities ({', '.join(bundle.modalities)}); "
            f"it has: {', '.join(index.modalities) or 'none'}"
        )
    results: dict[str, Any] = {}
    arrays: dict[str, dict[str, Any]] = {}
    for m in common:
        results[m], arrays[m] = evaluate_modality(bundle, index.modalities[m], bundle.model.input_size, progress,
                                                  kinds_meta=index.kinds_meta)
        r = results[m]
        pix = f"{r['pixel_auroc']:.3f}" if r["pixel_auroc"] is not None else "n/a"
        console.print(f"{m.upper()}: image AUROC {r['image_auroc']:.3f}, pixel AUROC {pix}, AP {r['ap']:.3f}, "
                      f"F1max {r['f1_max']:.3f} ({r['n_test']} test images)", highlight=False)
    results["_meta"] = {"bundle": str(bundle_path), "data": str(data), "synthetic": index.synthetic,
                        "pixel_auroc_region": "field of view"}
    if json_out is not None:
        atomic_write_json(Path(json_out), results)
    if plots is not None:
        from engine.eval.report_plots import write_evaluation_plots

        write_evaluation_plots(Path(plots), results, arrays)
    return results
