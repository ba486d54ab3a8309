"""PNG figures for `cemd evaluate --plots`: ROC curves and heat maps over example images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.eval import metrics, plots

EXAMPLES_PER_KIND = 3


def _roc_figure(path: Path, modality: str, arr: dict[str, Any]) -> None:
    labels, scores, kinds = arr["labels"], arr["scores"], arr["kinds"]
    curves = {}
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    curves["all lesions"] = (fpr, tpr, metrics.auroc(labels, scores))
    for k in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == k)
        fpr, tpr, _ = metrics.roc_curve(labels[sel], scores[sel])
        curves[k] = (fpr, tpr, metrics.auroc(labels[sel], scores[sel]))
    plots.plot_roc_curves(path, curves, f"{modality.upper()} branch: image-level ROC")


def _heatmap_figure(path: Path, modality: str, arr: dict[str, Any]) -> None:
    """Per kind: the image with its ground-truth contour, then the heat map over it."""
    images, maps, masks, kinds, scores = arr["images"], arr["maps"], arr["masks"], arr["kinds"], arr["scores"]
    good = kinds == "good"
    vmin = float(np.percentile(maps[good], 1)) if good.any() else float(maps.min())
    vmax = float(np.percentile(maps.max(axis=(1, 2)), 95))
    rows, labels = [], []
    for k in ["good"] + sorted(set(kinds) - {"good"}):
        idx = np.flatnonzero(kinds == k)[:EXAMPLES_PER_KIND]
        row = []
        for i in idx:
            row.append(plots.heatmap_overlay(images[i], np.zeros_like(maps[i]), 0, 1, alpha=0.0, mask_contour=masks[i]))
            row.append(plots.heatmap_overlay(images[i], maps[i], vmin, vmax, alpha=0.5, mask_contour=masks[i]))
        rows.append(row)
        labels.append(f"{k} (score {scores[idx].mean():.2f})" if len(idx) else k)
    cols = [c for _ in range(EXAMPLES_PER_KIND) for c in ("image + truth", "anomaly map")]
    plots.image_grid(path, rows, labels, cols, cell=160,
                     title=f"{modality.upper()} branch (synthetic data: green = ground truth)")


def write_evaluation_plots(folder: Path, results: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for m, arr in arrays.items():
        roc = folder / f"roc_{m}.png"
        _roc_figure(roc, m, arr)
        heat = folder / f"heatmaps_{m}.png"
        _heatmap_figure(heat, m, arr)
        written += [roc, heat]
    return written
