"""Memory map: distance of each patch of the frozen encoder's features to the nearest normal patch (model.memory_score).

Why: on real colonoscopy the students learn to reproduce polyps' deep features too — the
distillation map alone reaches image AUROC 0.74 on the Kvasir-SEG windows — while the distance of
the same stride-32 features to their nearest neighbour among normal patches reaches 0.87
(docs/RESULTS.md). That is PatchCore's scoring (Roth et al., CVPR 2022) on the scale the branch
reads; it needs no training, only a memory of normal patches.

What: the encoder's features at one scale, averaged over each 3×3 neighbourhood (a patch sees its
surroundings, as in PatchCore), and for every position the L2 distance to the nearest row of a
bank of such patches taken from the normal training images. The map, times a weight that puts
its normal spread on the distillation map's scale, is upsampled and smoothed like the
distillation map and added to it before the image score is taken. The nearest distance is one
matrix product and a min (‖q‖² − 2 q·b + ‖b‖²), so every backend compiles it with the branch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def neighbourhood(feat: torch.Tensor) -> torch.Tensor:
    """N×C×h×w features averaged over each 3×3 neighbourhood (zero padding, as PatchCore's aggregation)."""
    return F.avg_pool2d(feat, 3, 1, 1)


class MemoryMap(nn.Module):
    """N×C×h×w encoder features → N×1×h×w distance to the nearest bank patch, times ``weight``."""

    def __init__(self, bank: torch.Tensor, weight: float = 1.0) -> None:
        super().__init__()
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty M×C matrix, got shape {tuple(bank.shape)}")
        bank = bank.float()
        self.register_buffer("bank_t", bank.T.contiguous())  # C×M: the product below reads it as is
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.register_buffer("weight", torch.as_tensor(float(weight), dtype=torch.float32))

    @property
    def channels(self) -> int:
        return int(self.bank_t.shape[0])

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feat.shape
        q = neighbourhood(feat.float()).permute(0, 2, 3, 1).reshape(n * h * w, c)
        d2 = (q * q).sum(1, keepdim=True) - 2 * (q @ self.bank_t) + self.bank_sq
        # the expansion can dip below 0 by rounding where a patch is in the bank
        d = d2.amin(dim=1).clamp(min=0).sqrt()
        return d.view(n, h, w).unsqueeze(1) * self.weight


@torch.no_grad()
def collect_patches(features: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch: int = 16
                    ) -> torch.Tensor:
    """All 3×3-averaged patches (P×C) of ``features`` (N×3×S×S in [0, 1] → N×C×h×w) over N×S×S×3 uint8 images."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div_(255)
        f = neighbourhood(features(x).float())
        out.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    if not out:
        raise ValueError("no images to fill the memory bank from")
    return torch.cat(out)


def subsample(patches: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """A random ``size`` of the patches (all of them when there are fewer), in a fixed order for ``seed``."""
    if len(patches) <= size:
        return patches
    g = torch.Generator().manual_seed(seed)
    return patches[torch.randperm(len(patches), generator=g)[:size]]
