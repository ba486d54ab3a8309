"""Colour outlier map: a second, colour-only anomaly map added to the distillation map (model.colour_score).

Why: ImageNet encoders are trained to ignore colour shifts (colour-jitter augmentation), so a
lesion that differs from normal mucosa mainly in colour — a flat red patch — encodes almost
like normal tissue, and neither the teacher/student discrepancy nor a nearest-neighbour search
on the same features sees it (docs/RESULTS.md). Redness is exactly what endoscopists look for.

What: each pixel's colour as blurred log-chromaticity (log R/G, log B/G: independent of
brightness), relative to its background — the frame's own median inside the lit field of view,
or (``background`` > 0) a wide Gaussian average of the lit pixels around it, so that one
examination's colour cast, another light source, or a broad flush of the mucosa does not count
while a focal spot does — then its Mahalanobis
distance to the same quantity on the modality's normal training images — or, for a *brownish*
modality (NBI by default), only the part of the deviation that is browner than normal: the
NBI sign of neoplasia is a brownish area, while the cyan vessels of normal mucosa deviate the
other way and would otherwise count as much as a lesion (and, where they are dense, would pull
the local background toward cyan: they can be left out of it). Pixels much darker
than the frame (shadow, where chromaticity is noise) are left out. The map, times a weight that
puts its normal spread on the distillation map's scale, is added to the distillation map before
the image score is taken. Fitted from normal images only; plain tensor ops, so every backend
compiles it with the branch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.model.anomaly_map import FieldOfViewMask, GaussianBlur, masked_median

# Pixels darker than this share of the frame's median brightness are not scored (shadow).
DARK_FRACTION = 0.35
OFFSET = 4.0 / 255.0  # keeps log() finite on black pixels


class ColourOutlier(nn.Module):
    """N×3×S×S RGB in [0, 1] (+ lit field of view N×1×S×S) → colour outlier map N×1×S×S.

    ``stride`` > 1 computes the map on the frame average-pooled by that factor (the blur's σ
    scaled with it) and upsamples it bilinearly: the map is smooth at σ = 4 pixels anyway, and a
    quarter of the resolution costs a sixteenth of the pixels (docs/BENCHMARKS.md).

    ``background`` (σ in input pixels; 0 = off) compares each pixel with a Gaussian-weighted
    average of the lit, not-dark pixels around it (a normalised convolution) instead of with the
    frame's median: a lesion is a focal change of colour, while normal mucosa also reddens in
    broad, patchy areas (gastritis-like hyperaemia) that a frame-wide median reads as anomalous
    (docs/RESULTS.md#local-colour-background-synthetic).

    ``brownish``: score only deviations toward brown — redder and less blue than the background,
    the direction u = (1, −1)/√2 in (log R/G, log B/G), i.e. log R/B — as max(0, d·u) in units of
    that direction's normal standard deviation √(uᵀΣu), instead of the Mahalanobis distance in any
    direction (docs/RESULTS.md#brownish-nbi-colour-map-synthetic).

    ``vessel_cut`` (brownish with a local background only; 0 = off): the background is taken
    twice, the second time without the pixels that the first shows more than ``vessel_cut``
    normal standard deviations *less* brown than their background — the cyan vessels. Where
    vessels are dense they pull a plain background toward cyan, and the mucosa between them then
    reads brown over whole stretches of an examination
    (docs/RESULTS.md#vessels-left-out-of-the-nbi-background-synthetic).
    """

    def __init__(self, sigma: float, mean: Any = (0.0, 0.0), inv_cov: Any = ((1.0, 0.0), (0.0, 1.0)),
                 weight: float = 1.0, stride: int = 1, background: float = 0.0, brownish: bool = False,
                 vessel_cut: float = 0.0) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"colour map stride must be >= 1, got {stride}")
        if background < 0:
            raise ValueError(f"colour background sigma must be >= 0, got {background}")
        self.stride = int(stride)
        self.background = float(background)
        self.blur = GaussianBlur(sigma / self.stride, channels=3)
        # local background: the same Gaussian over chroma × valid and over valid (their ratio)
        self.bg_blur = GaussianBlur(self.background / self.stride, channels=3) if self.background > 0 else None
        self.median_step = max(1, 4 // self.stride)  # medians over at most every 4th full-size pixel
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 2, 1, 1))
        self.register_buffer("inv_cov", torch.as_tensor(inv_cov, dtype=torch.float32).view(2, 2))
        self.register_buffer("weight", torch.as_tensor(float(weight), dtype=torch.float32))
        self.brownish = bool(brownish)
        if self.brownish:
            # unit direction "browner" and its normal standard deviation under the fitted covariance
            u = np.array([1.0, -1.0]) / math.sqrt(2.0)
            var = float(u @ np.linalg.inv(np.asarray(inv_cov, dtype=np.float64)) @ u)
            if not var > 0:
                raise ValueError(f"colour covariance gives no spread along the brownish direction (variance {var:g})")
            self.register_buffer("brown_u", torch.as_tensor(u / math.sqrt(var), dtype=torch.float32).view(1, 2, 1, 1))
        if vessel_cut < 0:
            raise ValueError(f"colour vessel cut must be >= 0, got {vessel_cut}")
        # only meaningful for a brownish map against a local background
        self.vessel_cut = float(vessel_cut) if self.brownish and self.bg_blur is not None else 0.0

    def relative_chroma(self, frames: torch.Tensor, fov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-chromaticity minus its background — the frame's median or the local one, without the
        vessels when ``vessel_cut`` is on —, N×2×s×s; pixels that count, N×1×s×s), s = S / stride."""
        n = frames.shape[0]
        frames = frames.float()
        if self.stride > 1:
            frames = F.avg_pool2d(frames, self.stride)
            fov = (F.avg_pool2d(fov, self.stride) >= 0.5).to(fov.dtype)
        x = self.blur(frames) + OFFSET
        lg = torch.log(x)
        chroma = torch.cat([lg[:, 0:1] - lg[:, 1:2], lg[:, 2:3] - lg[:, 1:2]], dim=1)
        lum = x.mean(dim=1, keepdim=True)
        step = self.median_step
        sub = (slice(None), slice(None), slice(None, None, step), slice(None, None, step))
        lit_sub = fov[sub].flatten(1)
        med_lum = masked_median(lum[sub].flatten(1), lit_sub)
        valid = fov * (lum > DARK_FRACTION * med_lum.view(n, 1, 1, 1)).to(fov.dtype)
        if self.bg_blur is not None:
            if self.bg_blur.pad >= min(chroma.shape[-2:]):
                raise ValueError(f"colour background sigma {self.background:g} px is too wide for a "
                                 f"{chroma.shape[-1]}² colour map (stride {self.stride})")
            # one grouped blur of (chroma × valid, valid): the weighted mean of the valid neighbours
            sums = self.bg_blur(torch.cat([chroma * valid, valid], dim=1))
            bg = sums[:, :2] / (sums[:, 2:3] + 1e-6)
            if self.vessel_cut > 0:
                # again without the vessels: pixels far less brown than the first background
                keep = valid * (self._brownness(chroma - bg - self.mean) > -self.vessel_cut).to(valid.dtype)
                sums2 = self.bg_blur(torch.cat([chroma * keep, keep], dim=1))
                # where nothing but vessels is near, keep the first background
                bg = torch.where(sums2[:, 2:3] > 1e-3, sums2[:, :2] / (sums2[:, 2:3] + 1e-6), bg)
            return chroma - bg, valid
        valid_sub = valid[sub].flatten(1)
        med = torch.stack([masked_median(chroma[:, k:k + 1][sub].flatten(1), valid_sub) for k in range(2)], dim=1)
        return chroma - med.view(n, 2, 1, 1), valid

    def _brownness(self, d: torch.Tensor) -> torch.Tensor:
        """Component of a deviation N×2×s×s along the brownish direction, in normal standard deviations."""
        return d[:, 0:1] * self.brown_u[:, 0:1] + d[:, 1:2] * self.brown_u[:, 1:2]

    def forward(self, frames: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
        rel, valid = self.relative_chroma(frames, fov)
        d = rel - self.mean
        if self.brownish:
            dist = self._brownness(d).clamp(min=0)
        else:
            a, b, c = self.inv_cov[0, 0], self.inv_cov[0, 1] + self.inv_cov[1, 0], self.inv_cov[1, 1]
            m2 = a * d[:, 0:1] ** 2 + b * d[:, 0:1] * d[:, 1:2] + c * d[:, 1:2] ** 2
            dist = torch.sqrt(m2.clamp(min=0) + 1e-12)
        out = dist * valid * self.weight
        if self.stride > 1:
            out = F.interpolate(out, size=frames.shape[-2:], mode="bilinear", align_corners=False)
        return out


@torch.no_grad()
def fit_colour(images: np.ndarray, sigma: float, fov_threshold: float, fov_window: int,
               per_image: int = 4000, seed: int = 0, stride: int = 1, background: float = 0.0,
               brownish: bool = False, vessel_cut: float = 0.0) -> dict[str, Any]:
    """Mean and inverse covariance of relative chromaticity over normal images (N×S×S×3 uint8), with
    the settings they are for (``brownish`` and its ``vessel_cut`` only recorded: the statistics are
    those against the plain background)."""
    model = ColourOutlier(sigma, stride=stride, background=background)
    lit = FieldOfViewMask(fov_threshold, fov_window)
    rng = np.random.default_rng(seed)
    pts = []
    for i in range(0, len(images), 16):
        x = torch.from_numpy(images[i:i + 16]).permute(0, 3, 1, 2).float().div_(255)
        rel, valid = model.relative_chroma(x, lit(x))
        for r, v in zip(rel, valid):
            p = r.flatten(1)[:, v.flatten() > 0].T.numpy()
            if len(p):
                pts.append(p[rng.choice(len(p), min(per_image, len(p)), replace=False)])
    if not pts:
        raise ValueError("no lit pixels in the normal images: cannot fit the colour model")
    allp = np.concatenate(pts).astype(np.float64)
    cov = np.cov(allp.T) + 1e-6 * np.eye(2)
    return {"mean": allp.mean(axis=0).tolist(), "inv_cov": np.linalg.inv(cov).tolist(),
            "pixels": int(len(allp)), "images": int(len(images)), "sigma": sigma,
            "stride": int(stride), "background": float(background), "brownish": bool(brownish),
            **({"vessel_cut": float(vessel_cut)} if brownish else {})}
