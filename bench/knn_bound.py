"""How separable are lesions in the frozen encoder's features at all? A nearest-neighbour bound.

    python -m bench.knn_bound --train-data data/synth-seed1 --test-data data/synth-seed2 [--per-kind 40]

PatchCore-style: stride-8 and stride-16 EfficientNet-Lite0 features (3×3 averaged, the
stride-16 ones upsampled) of normal training images form a memory bank (a random subset of
`--bank` patches); a test patch scores its distance to the nearest bank patch, and the map
goes through the same smoothing, field-of-view mask and top-1 % reduction as a branch.
It needs no training, so it tells whether a weak result comes from the data (lesions the
features cannot see) or from the distillation model. Synthetic data: label results so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.provenance import provenance
from engine.data import dataset as ds
from engine.eval.evaluate import subset_aurocs
from engine.model.anomaly_map import FieldOfViewMask, GaussianBlur, reduce_score
from engine.model.backbone import FrozenEncoder, build_lite0


@torch.no_grad()
def patch_features(encoder: FrozenEncoder, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div_(255)
        f = encoder(x)
        f1 = F.avg_pool2d(f[1], 3, 1, 1)
        f2 = F.interpolate(F.avg_pool2d(f[2], 3, 1, 1), size=f1.shape[-2:], mode="bilinear", align_corners=False)
        out.append(torch.cat([f1, f2], 1))
    return torch.cat(out)


@torch.no_grad()
def knn_maps(bank: torch.Tensor, feats: torch.Tensor, size: int) -> torch.Tensor:
    c = feats.shape[1]
    q = feats.permute(0, 2, 3, 1).reshape(-1, c)
    d = torch.cat([torch.cdist(q[i : i + 4096], bank).min(1).values for i in range(0, len(q), 4096)])
    d = d.reshape(feats.shape[0], 1, feats.shape[2], feats.shape[3])
    return F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)


def run(train_data: Path, test_data: Path, per_kind: int, bank_size: int, n_train: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    size = 256
    encoder = FrozenEncoder(build_lite0()).eval()
    blur, fov_mask = GaussianBlur(4.0), FieldOfViewMask(0.08, 15)
    train_index, test_index = ds.scan_dataset(train_data), ds.scan_dataset(test_data, require_test=True)
    result: dict[str, Any] = {"provenance": provenance(), "synthetic": test_index.synthetic,
                              "train_data": str(train_data), "test_data": str(test_data), "bank": bank_size}
    for m, split in test_index.modalities.items():
        if m not in train_index.modalities:
            continue
        train = ds.load_images(train_index.modalities[m].train[:n_train], size)
        by_kind: dict[str, list[ds.TestItem]] = {}
        for it in split.test:
            by_kind.setdefault(it.kind, []).append(it)
        items = [it for group in by_kind.values() for it in group[:per_kind]]
        images, masks = ds.load_images([it.path for it in items], size), ds.load_masks(items, size)
        labels = np.array([it.label for it in items])
        kinds = np.array([it.kind for it in items])
        ftr = patch_features(encoder, train)
        bank = ftr.permute(0, 2, 3, 1).reshape(-1, ftr.shape[1])
        bank = bank[torch.randperm(len(bank))[:bank_size]]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
        fov = fov_mask(x)
        amap = blur(knn_maps(bank, patch_features(encoder, images), size)) * fov
        scores = reduce_score(amap, "topk", 0.01).numpy()
        amap_np, fov_np = amap[:, 0].numpy(), fov[:, 0].numpy() > 0.5
        rep: dict[str, Any] = {}
        for k in sorted(set(kinds) - {"good"}):
            rep[k] = subset_aurocs(labels, scores, amap_np, masks, fov_np, (kinds == "good") | (kinds == k))
            pixel = rep[k].get("pixel_auroc", float("nan"))
            print(f"{m.upper()} {k}: image AUROC {rep[k]['image_auroc']:.3f}, pixel {pixel:.3f}")
        result[m] = rep
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-data", type=Path, required=True)
    ap.add_argument("--test-data", type=Path, required=True)
    ap.add_argument("--per-kind", type=int, default=40, help="test images per kind (and normal) per modality")
    ap.add_argument("--train-images", type=int, default=150)
    ap.add_argument("--bank", type=int, default=30000, help="memory-bank patches (random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = run(a.train_data, a.test_data, a.per_kind, a.bank, a.train_images, a.seed)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
