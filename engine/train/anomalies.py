"""Generic synthetic anomalies for training denoising students (off by default).

A student that reproduces every input it is shown also reproduces a lesion: reverse
distillation's known blind spot for anomalies with little texture of their own (a flat
coloured patch encodes much like normal mucosa). DeSTSeg (Zhang et al., CVPR 2023) and RD++
(Tien et al., CVPR 2023) train the student on images with *synthetic* anomalies pasted in
while its target stays the teacher's features of the *clean* image, so it learns to map an
anomaly back to normal tissue and leaves a discrepancy where one is.

The anomalies here are generic, in the style of DRAEM / CutPaste, and know nothing about the
simulator's lesion kinds: a smooth random blob (1–10 % of the field of view) inside the lit
field of view, filled with one or two of

* ``colour``  — the image itself, hue rotated, saturation and brightness scaled;
* ``smooth``  — the image itself, blurred (fine texture removed);
* ``paste``   — a patch from another training image of the same modality (CutPaste);
* ``noise``   — a random dark/bright network (thresholded band-pass noise) over the region.

``TrainConfig.synthetic_anomalies`` (``cemd train --synthetic-anomalies P``) is the share of
stage-2 training samples replaced by such a copy. Everything is seeded: the same image
index, copy and seed give the same anomaly.
"""

from __future__ import annotations

import cv2
import numpy as np

FILLS = ("colour", "smooth", "paste", "noise")


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field with structures about ``scale`` pixels across."""
    small = max(2, int(round(size / max(scale, 1.0))))
    f = rng.standard_normal((small, small)).astype(np.float32)
    f = cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC)
    f -= f.mean()
    return f / (f.std() + 1e-6)


def blob_mask(rng: np.random.Generator, size: int, lit: np.ndarray, area: float) -> np.ndarray:
    """Soft mask (float32 in [0, 1]) of one irregular blob of about ``area`` × the lit area, inside ``lit``."""
    ys, xs = np.nonzero(lit)
    if len(ys) == 0:
        return np.zeros((size, size), np.float32)
    k = int(rng.integers(len(ys)))
    cy, cx = float(ys[k]), float(xs[k])
    r = np.sqrt(area * lit.sum() / np.pi)
    ratio = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (r / np.sqrt(ratio))
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (r * np.sqrt(ratio))
    # An ellipse whose edge is pushed in and out by smooth noise: irregular, but one piece.
    d = np.sqrt(u * u + v * v) + 0.35 * _smooth_field(rng, size, r * 0.8)
    edge = max(1.0, 0.15 * r)
    soft = np.clip((1.0 - d) * r / edge, 0.0, 1.0)
    return (soft * lit).astype(np.float32)


def _colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-25, 25)) % 180  # OpenCV hue is 0–180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.8), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.6, 1.3), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _smooth(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(2.0, 6.0))


def _paste(img: np.ndarray, rng: np.random.Generator, donors: np.ndarray, lit: np.ndarray,
           lit_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    donor = donors[int(rng.integers(len(donors)))]
    size = img.shape[0]
    # Shift (and maybe flip) the donor so a random part of its lit field lands under the blob.
    shift = rng.integers(-size // 4, size // 4 + 1, 2)
    moved = np.roll(donor, (int(shift[0]), int(shift[1])), axis=(0, 1))
    if rng.random() < 0.5:
        moved = moved[:, ::-1]
    if rng.random() < 0.5:
        moved = moved[::-1]
    moved = np.ascontiguousarray(moved)
    # Match brightness, so the patch is foreign texture rather than a lighting jump.
    m_src = img[lit].mean() if lit.any() else 1.0
    m_dst = moved[lit].mean() if lit.any() else 1.0
    out = np.clip(moved.astype(np.float32) * (m_src / max(m_dst, 1.0)), 0, 255).astype(np.uint8)
    # Only the donor's lit tissue: never its black border or on-screen text.
    valid = cv2.erode((moved.mean(axis=2) / 255.0 > lit_threshold).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    return out, valid


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    band = _smooth_field(rng, size, rng.uniform(3, 8)) - 0.6 * _smooth_field(rng, size, 20)
    lines = np.clip(1.0 - np.abs(band) / rng.uniform(0.2, 0.5), 0, 1)[..., None]
    tint = rng.uniform(0.25, 0.7, 3).astype(np.float32) if rng.random() < 0.7 else rng.uniform(1.2, 1.6, 3)
    out = img.astype(np.float32) * (1 - lines + lines * tint)
    return np.clip(out, 0, 255).astype(np.uint8)


def add_synthetic_anomaly(img: np.ndarray, rng: np.random.Generator, donors: np.ndarray | None = None,
                          lit_threshold: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """One generic anomaly blended into ``img`` (S×S×3 uint8 RGB); returns (image, soft mask S×S)."""
    size = img.shape[0]
    gray = img.mean(axis=2) / 255.0
    lit = cv2.erode((gray > lit_threshold).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    area = float(np.exp(rng.uniform(np.log(0.01), np.log(0.10))))
    mask = blob_mask(rng, size, lit, area)
    fills = list(FILLS) if donors is not None and len(donors) else [f for f in FILLS if f != "paste"]
    picks = rng.choice(fills, size=int(rng.integers(1, 3)), replace=False)
    filled = img
    for name in picks:
        if name == "colour":
            filled = _colour(filled, rng)
        elif name == "smooth":
            filled = _smooth(filled, rng)
        elif name == "paste":
            filled, valid = _paste(filled, rng, donors, lit, lit_threshold)
            mask = mask * valid
        else:
            filled = _noise(filled, rng)
    a = mask[..., None] * np.float32(rng.uniform(0.7, 1.0))
    out = img.astype(np.float32) * (1 - a) + filled.astype(np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask
