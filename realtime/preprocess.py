"""Frame preprocessing: find the circular field of view, crop it square, mask, resize.

Endoscope video shows a lit disc (sometimes clipped at the top and bottom) on a black
border that carries burnt-in text (patient, clock, mode). The branches were trained on
square images whose disc radius is about 0.48 of the side, so every frame is cropped to a
square of side ``2R / 0.96`` around the detected disc, everything outside the disc (text,
border) is set to black, and the square is resized to the branch's input size.

The disc is found on a small grey copy: threshold the lit pixels, open away the text,
keep the largest blob, and fit a circle to its outline points that do not touch the frame
edge (so a clipped disc still gives its true radius). Detection runs every
``redetect_every`` frames and whenever the frame size changes; between detections the
last good circle is reused, and a frame that yields no plausible disc (scope against the
wall, a black frame) keeps it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# The simulator draws the training disc at radius 0.44–0.52 of the image side (engine/synth.py).
DISC_FILL = 0.48
_WORK_WIDTH = 160  # detection works on a copy this wide


@dataclass(frozen=True)
class FieldOfView:
    """The lit disc in source-frame pixels."""

    cx: float
    cy: float
    radius: float

    def crop_box(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the square crop, in source pixels (may extend past the frame)."""
        side = max(8, int(round(2 * self.radius / (2 * DISC_FILL))))
        return int(round(self.cx - side / 2)), int(round(self.cy - side / 2)), side


def _fit_circle(pts: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares (Kasa) circle through points (x, y)."""
    if len(pts) < 8:
        return None
    x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
    a = np.stack([x, y, np.ones_like(x)], 1)
    b = x * x + y * y
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    r2 = sol[2] + cx * cx + cy * cy
    if r2 <= 0:
        return None
    return float(cx), float(cy), float(math.sqrt(r2))


def detect_field_of_view(rgb: np.ndarray, lit_level: int = 20) -> FieldOfView | None:
    """The lit disc of an RGB uint8 frame, or None when there is no plausible one."""
    h, w = rgb.shape[:2]
    step = max(1, w // (2 * _WORK_WIDTH))  # plain subsampling first: area-averaging 1080p directly costs 2 ms
    view = rgb[::step, ::step]
    scale = min(1.0, _WORK_WIDTH / view.shape[1]) / step
    small = cv2.resize(view, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    lum = small.max(axis=2) if small.ndim == 3 else small
    lit = (lum > lit_level).astype(np.uint8)
    k = max(3, int(round(min(small.shape[:2]) * 0.04)) | 1)  # wider than text strokes, far smaller than the disc
    lit = cv2.morphologyEx(lit, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    if n < 2:
        return None
    blob = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    sh, sw = lit.shape
    if stats[blob, cv2.CC_STAT_AREA] < 0.05 * sh * sw:
        return None
    mask = (labels == blob).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2)
    inner = outline[(outline[:, 0] > 1) & (outline[:, 0] < sw - 2) & (outline[:, 1] > 1) & (outline[:, 1] < sh - 2)]
    fit = _fit_circle(inner + 0.5)
    if fit is None:
        return None
    cx, cy, r = (v / scale for v in fit)
    area_r = math.sqrt(stats[blob, cv2.CC_STAT_AREA] / math.pi) / scale
    # A real disc: its fitted radius is at least the equal-area radius (clipping only removes
    # area) and not absurdly larger; its centre lies inside the frame.
    if not (0.9 * area_r <= r <= 2.5 * area_r) or not (0 <= cx < w and 0 <= cy < h):
        return None
    return FieldOfView(cx, cy, r)


def _shrink(region: np.ndarray, w: int, h: int) -> np.ndarray:
    """Area-average resize; a large factor goes integer-area first (OpenCV's fast path) then linear."""
    f = min(region.shape[1] // w, region.shape[0] // h)
    if f >= 2:
        rh, rw = region.shape[0] // f * f, region.shape[1] // f * f
        region = cv2.resize(region[:rh, :rw], (rw // f, rh // f), interpolation=cv2.INTER_AREA)
    if region.shape[1] > w:
        return cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(region, (w, h), interpolation=cv2.INTER_LINEAR)


def default_field_of_view(h: int, w: int) -> FieldOfView:
    """A centred disc touching the shorter side: the fallback before any detection succeeds."""
    return FieldOfView(w / 2, h / 2, min(h, w) * DISC_FILL)


class FramePreprocessor:
    """RGB uint8 frame (any size) → the branch's input tensor, plus the crop that maps it back."""

    def __init__(self, input_size: int, redetect_every: int = 15, mask_outside: bool = True) -> None:
        self.input_size = input_size
        self.redetect_every = max(1, redetect_every)
        self.mask_outside = mask_outside
        self.fov: FieldOfView | None = None
        self.detections = self.failed_detections = 0
        self._shape: tuple[int, int] | None = None
        self._count = 0
        self._disc = self._disc_mask(input_size)

    @staticmethod
    def _disc_mask(size: int) -> np.ndarray:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        r = DISC_FILL * size
        d = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2)
        soft = np.clip(r + 1.5 - d, 0, 1)  # one pixel of margin, anti-aliased edge
        return soft[..., None].astype(np.float32)

    def _update_fov(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if self._shape != (h, w) or self.fov is None or self._count % self.redetect_every == 0:
            if self._shape != (h, w):
                self.fov, self._shape = None, (h, w)
            found = detect_field_of_view(rgb)
            self.detections += 1
            if found is None:
                self.failed_detections += 1
            else:
                self.fov = found
        self._count += 1

    def crop(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Square RGB crop resized to the input size (uint8), and its (x0, y0, side) in the source."""
        self._update_fov(rgb)
        h, w = rgb.shape[:2]
        fov = self.fov or default_field_of_view(h, w)
        x0, y0, side = fov.crop_box()
        n = self.input_size
        scale = n / side
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
        # Resize only the part inside the frame, straight into its place on a black canvas.
        dx0, dy0 = int(round((sx0 - x0) * scale)), int(round((sy0 - y0) * scale))
        dx1, dy1 = int(round((sx1 - x0) * scale)), int(round((sy1 - y0) * scale))
        out = np.zeros((n, n, 3), np.uint8)
        if dx1 > dx0 and dy1 > dy0:
            out[dy0:dy1, dx0:dx1] = _shrink(rgb[sy0:sy1, sx0:sx1], dx1 - dx0, dy1 - dy0)
        if self.mask_outside:
            out = (out * self._disc).astype(np.uint8)
        return out, (x0, y0, side)

    def __call__(self, rgb: np.ndarray) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int]]:
        """(1×3×n×n float tensor in [0, 1], the uint8 crop, crop box)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
        crop, box = self.crop(rgb)
        tensor = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return tensor, crop, box


def map_to_source(points: np.ndarray, box: tuple[int, int, int], input_size: int) -> np.ndarray:
    """Points (x, y) in input-size pixels → source-frame pixels."""
    x0, y0, side = box
    return points * (side / input_size) + np.array([x0, y0], np.float64)
