"""Anomaly map and image score from teacher/student feature pairs.

Written with plain tensor ops (no SciPy, no data-dependent control flow) so that the same
function runs in eager PyTorch, in an AOTInductor package and in a TensorRT engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, truncate: float = 2.0) -> torch.Tensor:
    radius = max(int(math.ceil(truncate * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing with reflect padding (σ = 4 as in RD4AD/TRD)."""

    def __init__(self, sigma: float, channels: int = 1) -> None:
        super().__init__()
        self.enabled = sigma > 0
        self.channels = channels  # each channel blurred on its own (a grouped convolution)
        k = gaussian_kernel1d(sigma) if self.enabled else torch.ones(1)
        self.pad = k.numel() // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        p, c = self.pad, self.channels
        x = F.conv2d(F.pad(x, (p, p, 0, 0), mode="reflect"), self.kx, groups=c)
        return F.conv2d(F.pad(x, (0, 0, p, p), mode="reflect"), self.ky, groups=c)


def upsample_blur_matrix(n: int, size: int, sigma: float) -> torch.Tensor:
    """size × n matrix A of "bilinear upsampling n → size, then the σ blur" along one axis.

    Both steps are linear and act on each axis separately, so for an n×n map d the blurred
    upsampled map is A·d·Aᵀ. Built by pushing the unit vectors through the same two operations
    (F.interpolate, reflect-padded Gaussian), so it is those operations, not a re-derivation.
    """
    up = F.interpolate(torch.eye(n).view(n, 1, n), size=size, mode="linear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma)
        p = k.numel() // 2
        up = F.conv1d(F.pad(up, (p, p), mode="reflect"), k.view(1, 1, -1))
    return up[:, 0, :].T.contiguous()


class SmoothUpsample(nn.Module):
    """N×1×h×w → N×1×size×size: bilinear upsampling followed by ``GaussianBlur(sigma)``.

    For the map sides given up front (the encoder's feature sizes) it is two small matrix
    products, A·d·Aᵀ (``upsample_blur_matrix``): equal to the two steps within float rounding
    (~1e-7) and ~40× cheaper in a compiled branch on a CPU than blurring the 256² map with
    1-channel convolutions (docs/BENCHMARKS.md). Any other side takes the two steps.
    """

    def __init__(self, size: int, sigma: float, sides: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.size = size
        self.blur = GaussianBlur(sigma)
        self.sides = tuple(sorted(set(sides)))
        for n in self.sides:
            self.register_buffer(f"a{n}", upsample_blur_matrix(n, size, sigma), persistent=False)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        h, w = d.shape[-2:]
        if h in self.sides and w in self.sides:
            return getattr(self, f"a{h}") @ d @ getattr(self, f"a{w}").T
        return self.blur(F.interpolate(d, size=(self.size, self.size), mode="bilinear", align_corners=False))


def cosine_distance_maps(teacher: list[torch.Tensor], student: list[torch.Tensor], size: int,
                         scales: tuple[int, ...] | None = None,
                         upsample: nn.Module | None = None) -> torch.Tensor:
    """Σ over `scales` (default all) of the upsampled per-pixel map 1 − cos(T, S); N×1×size×size.

    ``upsample`` (N×1×h×w → N×1×size×size) replaces plain bilinear upsampling, e.g. a
    ``SmoothUpsample`` that also blurs: the blur is linear, so blurring each scale's map and
    summing equals blurring the sum.
    """
    total = None
    for k, (t, s) in enumerate(zip(teacher, student)):
        if scales is not None and k not in scales:
            continue
        d = 1 - F.cosine_similarity(t, s, dim=1, eps=1e-6).unsqueeze(1)
        if upsample is not None:
            d = upsample(d)
        else:
            d = F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None
    return total


class FieldOfViewMask(nn.Module):
    """Lit field of view: a morphological opening of the smoothed "lit" mask.

    Zeroing the map outside it keeps the black border and the on-screen text from ever
    raising an alert: text strokes are thinner than the opening window and vanish, while
    the lit disc survives it. Pooling and convolutions only, so every backend compiles it.
    """

    def __init__(self, threshold: float, window: int) -> None:
        super().__init__()
        self.threshold = threshold
        self.window = window | 1

    @staticmethod
    def _box_sum(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        # Sum over a kh×kw window (odd sizes; zero padding: outside the image counts as 0), one axis
        # at a time, as the difference of two running sums: c[i + k] − c[i] over the padded axis.
        # On a 1-channel map that is ~3× faster than a convolution with a ones kernel (oneDNN is
        # slow on 1 channel) and AOTInductor compiles it without unrolling the window, which took
        # it ~20 s per branch as avg_pool2d (docs/BENCHMARKS.md). Inputs are 8-bit levels or 0/1,
        # so every running sum is an exact integer in fp32 (< 2^24 while a side is under ~13,000 px:
        # 5-px window sums of levels ≤ 255), and the result does not depend on the summation order.
        if kw > 1:
            c = F.pad(x, (kw // 2 + 1, kw // 2)).cumsum(-1)
            x = c[..., kw:] - c[..., :-kw]
        if kh > 1:
            c = F.pad(x, (0, 0, kh // 2 + 1, kh // 2)).cumsum(-2)
            x = c[..., kh:, :] - c[..., :-kh, :]
        return x

    def _any(self, x: torch.Tensor) -> torch.Tensor:
        # Binary k×k dilation as a separable box sum > 0 (any lit pixel in the window): same
        # result as a k×k max filter, faster than max_pool2d on a 1-channel map on a CPU.
        k = self.window
        return (self._box_sum(self._box_sum(x, 1, k), k, 1) > 0.5).to(x.dtype)

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        # Work on 8-bit levels: the brightest channel rounded to 0..255 makes every 5×5 window
        # sum an exact integer, and the threshold sits half a level between two possible
        # sums, so no backend's rounding (fused, reordered, reciprocal-multiplied) can flip a
        # pixel. Same decision as mean > threshold for interior pixels; windows at the image
        # edge count the outside as black.
        lum = torch.round(rgb01.float().amax(dim=1, keepdim=True) * 255)
        lit = (self._box_sum(lum, 5, 5) > math.floor(self.threshold * 255 * 25) + 0.5).float()
        eroded = 1 - self._any(1 - lit)
        return self._any(eroded).to(rgb01.dtype)


def masked_median(flat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Lower median of each row of ``flat`` (N×P) over the positions where ``mask`` (N×P) > 0.

    Static shapes only (sort, count, gather), so every backend compiles it: masked-out values
    are pushed below everything, then the median sits at (outside count + (inside − 1) // 2).
    A row with nothing inside gives 0.
    """
    if mask is None:
        return flat.median(dim=1).values
    inside = mask > 0
    ordered = torch.where(inside, flat, torch.full_like(flat, float("-inf"))).sort(dim=1).values
    n_in = inside.sum(dim=1)
    idx = (flat.shape[1] - n_in) + (n_in - 1).clamp(min=0) // 2
    med = ordered.gather(1, idx.clamp(max=flat.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(n_in > 0, med, torch.zeros_like(med))


def reduce_score(amap: torch.Tensor, reduction: str, topk_fraction: float,
                 fov: torch.Tensor | None = None) -> torch.Tensor:
    """Image score of an N×1×H×W map: ``max``, ``mean`` (inside ``fov`` when given), ``topk`` (mean of the top ``topk_fraction``)
    or ``topk_minus_median`` (that mean minus the map's median inside the field of view ``fov``,
    N×1×H×W, or the whole map without one): a lesion is a local rise over the frame's own level,
    and the level itself moves with lighting and tissue from one examination to the next."""
    flat = amap.flatten(1)
    if reduction == "max":
        return flat.amax(dim=1)
    if reduction == "mean":
        # over the field of view only: the black border (map 0) would otherwise weigh in by its size
        if fov is None:
            return flat.mean(dim=1)
        inside = fov.flatten(1)
        return (flat * inside).sum(dim=1) / inside.sum(dim=1).clamp(min=1)
    k = max(int(flat.shape[1] * topk_fraction), 1)
    top = flat.topk(k, dim=1).values.mean(dim=1)
    if reduction == "topk_minus_median":
        # on every 4th pixel each way: the map is smooth (upsampled stride-16 features, σ-4 blur),
        # and sorting 65 536 values would cost half as much as the branch itself on a CPU
        sub = amap[..., ::4, ::4].flatten(1)
        return top - masked_median(sub, None if fov is None else fov[..., ::4, ::4].flatten(1))
    return top
