"""Frame preprocessing: find the lit field of view, crop it square, mask, resize.

Endoscope video shows a lit field of view on a black border that carries burnt-in text
(patient, clock, mode), sometimes a coloured banner or a position box. The field of view is
a disc (sometimes clipped at the top and bottom), an octagon or a rounded rectangle. The
branches were trained on square images whose disc radius is about 0.48 of the side, so every
frame is cropped to a square of side ``2R / 0.96`` around a detected disc, or of side
``longer bounding-box side / 0.96`` around any other shape; everything outside the field of
view (text, border, overlays) is set to black, and the square is resized to the branch's
input size.

Detection works on a small copy (``_WORK_WIDTH`` wide): threshold the lit pixels, open away
the text strokes, keep the largest blob. Overlays are cut out of it first: axis-aligned
rectangles of colour outliers (``_overlays``: pixels whose chromaticity lies far from the
frame's own median, relative to the frame's own spread, so no colour is an overlay colour and
narrow-band mucosa counts as mucosa) with straight edges, such as a banner or a position box
drawn over the rim. A circle is fitted to the blob's outline points that do not touch the
frame edge (so a clipped disc still gives its true radius); when the blob lies inside that
circle, the field of view is that disc, as it always was. Otherwise (an octagon, a rounded
rectangle, a disc with a box over its rim) it is the blob's convex hull. Either way the
overlays' rectangles, re-measured at full resolution, are left out of it. Detection runs every
``redetect_every`` frames and whenever the frame size changes; between detections the last
good one is reused, and a frame that yields no plausible field of view (scope against the
wall, a black frame) keeps it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# The simulator draws the training disc at radius 0.44–0.52 of the image side (engine/synth/stills.py).
DISC_FILL = 0.48
_WORK_WIDTH = 160  # detection works on a copy this wide
# Overlays (``_overlays``): colour outliers lie more than _CHROMA_K × the frame's own median
# chromaticity distance (at least _CHROMA_MIN) from its median chromaticity; an overlay is a
# blob of them of at least _OVERLAY_MIN of the work copy and at most _OVERLAY_MAX of the lit
# area (a white-out is not one) that is a rectangle (_RECT_FILL, _RECT_SIDE).
_CHROMA_K = 5.0
_CHROMA_MIN = 0.08
_OVERLAY_MIN = 0.01
_OVERLAY_MAX = 0.25
_RECT_FILL = 0.9
_RECT_SIDE = 0.85
_CUT_MARGIN = 2  # work pixels cut from the lit blob around an overlay (its mixed edge pixels)
# The disc is kept when at most this share of the blob lies over one work pixel outside the circle.
_OUTSIDE_DISC = 0.005
# The hull's outline runs through boundary pixel centres; it is pushed out by this many work pixels.
_HULL_MARGIN = 0.5

Rect = tuple[float, float, float, float]


@dataclass(frozen=True)
class FieldOfView:
    """The lit field of view in source-frame pixels.

    A disc (``outline`` None): centre and radius. Any other shape: ``outline`` is its convex
    polygon (x, y) and (cx, cy, radius) its bounding box's centre and half its longer side,
    so that ``crop_box`` is the same rule for both. ``exclude``: overlay rectangles (x, y, w, h)
    left out of it.
    """

    cx: float
    cy: float
    radius: float
    outline: tuple[tuple[float, float], ...] | None = None
    exclude: tuple[Rect, ...] = ()

    @property
    def shape(self) -> str:
        return "disc" if self.outline is None else "polygon"

    def crop_box(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the square crop, in source pixels (may extend past the frame)."""
        side = max(8, int(round(2 * self.radius / (2 * DISC_FILL))))
        return int(round(self.cx - side / 2)), int(round(self.cy - side / 2)), side

    def crop_mask(self, size: int) -> np.ndarray:
        """size×size×1 float32 in [0, 1]: the field of view in the crop, soft at its edge."""
        x0, y0, side = self.crop_box()
        k = size / side
        if self.outline is None:
            mask = _disc_mask(size)
        else:
            # cv2 pixel (i, j) has its centre at (j, i): continuous coordinate u ↦ u − 0.5.
            pts = (np.asarray(self.outline, np.float64) - (x0, y0)) * k - 0.5
            inside = np.zeros((size, size), np.uint8)
            cv2.fillPoly(inside, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
            gap = cv2.distanceTransform(1 - inside, cv2.DIST_L2, 3)
            # the same one pixel of anti-aliased margin as the disc
            mask = np.clip(1.5 - gap, 0, 1)[..., None].astype(np.float32)
        if self.exclude:
            mask = mask.copy()
            for x, y, w, h in self.exclude:
                u0, v0 = int(math.floor((x - x0) * k)), int(math.floor((y - y0) * k))
                u1, v1 = int(math.ceil((x + w - x0) * k)), int(math.ceil((y + h - y0) * k))
                mask[max(0, v0):max(0, v1), max(0, u0):max(0, u1)] = 0
        return mask

    def source_mask(self, h: int, w: int, size: int = 256) -> np.ndarray:
        """h×w bool: the source pixels that the size×size crop keeps (its mask ≥ 0.5 there)."""
        x0, y0, side = self.crop_box()
        k = size / side
        u = ((np.arange(w, dtype=np.float32) + 0.5 - x0) * k - 0.5)[None, :].repeat(h, 0)
        v = ((np.arange(h, dtype=np.float32) + 0.5 - y0) * k - 0.5)[:, None].repeat(w, 1)
        m = cv2.remap(self.crop_mask(size)[..., 0], u, v, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                      borderValue=0)
        return m >= 0.5


def _disc_mask(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = DISC_FILL * size
    d = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2)
    soft = np.clip(r + 1.5 - d, 0, 1)  # one pixel of margin, anti-aliased edge
    return soft[..., None].astype(np.float32)


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


def _channel_max(a: np.ndarray) -> np.ndarray:
    """The largest of the last axis's three channels (numpy's max over a length-3 axis is 10× slower)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


class _ColourOutliers:
    """Pixels whose chromaticity lies far from the frame's own mucosa.

    Chromaticity: (R, G, B) / (R + G + B). The reference is the frame's median over its lit
    field of view, and "far" is relative to that frame's own spread (the median distance from
    it): so a blue banner or a green box stands out on white-light mucosa (red) and on
    narrow-band mucosa (cyan-green) alike, and no colour is an overlay colour by itself. Dark
    pixels (brightest channel ≤ 2 × the lit level) have no reliable chromaticity and never count.
    """

    def __init__(self, small: np.ndarray, body: np.ndarray, lit_level: int) -> None:
        self.dark = 2 * lit_level
        chroma, bright = self._chroma(small)
        inside = (body > 0) & bright
        if not inside.any():
            self.median, self.cut = np.zeros(3, np.float32), math.inf
            return
        pick = [c[inside][::2] for c in chroma]  # every other pixel: plenty for a median
        self.median = np.array([np.median(c) for c in pick], np.float32)
        spread = np.sqrt(sum((c - m) ** 2 for c, m in zip(pick, self.median)))
        self.cut = max(_CHROMA_MIN, _CHROMA_K * float(np.median(spread)))

    def _chroma(self, rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        f = [rgb[..., i].astype(np.float32) for i in range(3)]
        total = np.maximum(f[0] + f[1] + f[2], 1)
        return [c / total for c in f], np.maximum(np.maximum(f[0], f[1]), f[2]) > self.dark

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        chroma, bright = self._chroma(rgb)
        d2 = sum((c - m) ** 2 for c, m in zip(chroma, self.median))
        return (d2 > self.cut * self.cut) & bright


def _bands(cover: np.ndarray, low: float = 0.2) -> list[tuple[int, int]]:
    """Runs [a, b) of consecutive lines whose coverage is above ``low``."""
    on = np.concatenate([[0], (cover > low).astype(np.int8), [0]])
    d = np.flatnonzero(np.diff(on))
    return list(zip(d[::2], d[1::2]))


def _rectangle(filled: np.ndarray, own: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the rectangle a filled blob is, or None (``own``: the blob before filling).

    The rectangle spans the rows and columns at least 70 % full (what merely touches it, such
    as a glint, is left out); it must fill ≥ _RECT_FILL of itself, ≥ _RECT_SIDE of each edge and
    more than a fifth of every line across it before filling, and hold ≥ 80 % of the blob.
    """
    y0, y1, x0, x1 = 0, filled.shape[0], 0, filled.shape[1]
    for _ in range(2):  # the rows full across the columns found, and the columns full along those rows
        rows = np.flatnonzero(filled[:, x0:x1].mean(axis=1) >= 0.7)
        if len(rows) < 3:
            return None
        y0, y1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(filled[y0:y1].mean(axis=0) >= 0.7)
        if len(cols) < 3:
            return None
        x0, x1 = int(cols[0]), int(cols[-1]) + 1
    box = filled[y0:y1, x0:x1]
    if box.mean() < _RECT_FILL or min(box[0].mean(), box[-1].mean(), box[:, 0].mean(), box[:, -1].mean()) < _RECT_SIDE:
        return None
    raw = own[y0:y1, x0:x1]
    if min(raw.mean(axis=1).min(), raw.mean(axis=0).min()) <= 0.2:
        return None  # a nearly empty line across it: two blobs side by side, not one rectangle
    if raw.sum() < 0.8 * own.sum():
        return None  # most of the blob lies outside: a rectangle inside something else
    return x0, y0, x1, y1


def _overlays(small: np.ndarray, outliers: _ColourOutliers, fov: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Overlay rectangles (x, y, w, h) on the work copy: a banner or a box drawn over the field of view.

    A blob of colour outliers (``_ColourOutliers``) that touches the lit blob ``fov`` is an
    overlay when it is an axis-aligned rectangle with straight edges. The text a banner carries
    may break it up, so gaps of up to 4 work pixels are closed and holes filled; a blob that is
    two overlays touching (a banner over a box) is split at its nearly empty rows, then columns.
    Lesions, stool, dye and glints are colour outliers too, but blobs: a disc fills π/4 of its
    box, touches each side at a point, and its inner rectangle has more of the disc all round.
    """
    if small.ndim != 3:
        return []
    far = outliers(small).astype(np.uint8)
    # an opening first cuts the one-pixel bridges (glints, anti-aliased text) between neighbours
    body = cv2.morphologyEx(far, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    sh, sw = far.shape
    lit_area = int(fov.sum())
    found = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < _OVERLAY_MIN * sh * sw or min(w, h) < 3:
            continue
        own = labels[y:y + h, x:x + w] == i
        if not (own & (fov[y:y + h, x:x + w] > 0)).any():
            continue  # text or a box on the black border: outside the field of view anyway
        s = 5  # the closing's window
        blob = cv2.copyMakeBorder(own.astype(np.uint8), s, s, s, s, cv2.BORDER_CONSTANT, value=0)
        blob = cv2.morphologyEx(blob, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (s, s)))
        contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(blob)
        cv2.drawContours(filled, contours, -1, 1, cv2.FILLED)
        filled = filled[s:s + h, s:s + w]
        blocks = [(0, 0, w, h)]
        if _rectangle(filled, own) is None:
            blocks = [(c0, r0 + q0, c1, r0 + q1) for r0, r1 in _bands(own.mean(axis=1))
                      for c0, c1 in _bands(own[r0:r1].mean(axis=0))
                      for q0, q1 in _bands(own[r0:r1, c0:c1].mean(axis=1))]
        for bx0, by0, bx1, by1 in blocks:
            rect = _rectangle(filled[by0:by1, bx0:bx1], own[by0:by1, bx0:bx1])
            if rect is None:
                continue
            X0, Y0, X1, Y1 = x + bx0 + rect[0], y + by0 + rect[1], x + bx0 + rect[2], y + by0 + rect[3]
            if (X1 - X0) * (Y1 - Y0) < _OVERLAY_MIN * sh * sw or (X1 - X0) * (Y1 - Y0) > _OVERLAY_MAX * lit_area:
                continue
            # Straight edges: past the (possibly mixed) next line the outliers stop, except where
            # the frame edge (within two lines) is its side.
            past = [far[Y0:Y1, X0 - 2] if X0 > 2 else None, far[Y0:Y1, X1 + 1] if X1 + 2 < sw else None,
                    far[Y0 - 2, X0:X1] if Y0 > 2 else None, far[Y1 + 1, X0:X1] if Y1 + 2 < sh else None]
            if all(line is None or line.mean() <= 0.3 for line in past):
                found.append((X0, Y0, X1 - X0, Y1 - Y0))
    return found


def _source_rect(rgb: np.ndarray, rect: tuple[int, int, int, int], outliers: _ColourOutliers, scale: float) -> Rect:
    """An overlay's rectangle in source pixels, its edges found again at full resolution.

    Each edge of the work-copy rectangle is within a work pixel of the true one: it is moved in,
    then out, one source line at a time, to the last line that is at least half colour outliers;
    plus one line for an anti-aliased or compressed edge.
    """
    h, w = rgb.shape[:2]
    x, y, bw, bh = rect
    x0, y0 = min(w - 1, int(x / scale)), min(h - 1, int(y / scale))
    x1, y1 = max(x0 + 1, min(w, math.ceil((x + bw) / scale))), max(y0 + 1, min(h, math.ceil((y + bh) / scale)))
    reach = int(math.ceil(1 / scale)) + 1

    def holds(line: np.ndarray) -> bool:
        return bool(outliers(line).mean() >= 0.5)

    for _ in range(reach):  # in: the outermost line is not the overlay's
        moved = False
        if x1 - x0 > 2 and not holds(rgb[y0:y1, x0]):
            x0, moved = x0 + 1, True
        if x1 - x0 > 2 and not holds(rgb[y0:y1, x1 - 1]):
            x1, moved = x1 - 1, True
        if y1 - y0 > 2 and not holds(rgb[y0, x0:x1]):
            y0, moved = y0 + 1, True
        if y1 - y0 > 2 and not holds(rgb[y1 - 1, x0:x1]):
            y1, moved = y1 - 1, True
        if not moved:
            break
    for _ in range(reach):  # out: the next line still is
        moved = False
        if x0 > 0 and holds(rgb[y0:y1, x0 - 1]):
            x0, moved = x0 - 1, True
        if x1 < w and holds(rgb[y0:y1, x1]):
            x1, moved = x1 + 1, True
        if y0 > 0 and holds(rgb[y0 - 1, x0:x1]):
            y0, moved = y0 - 1, True
        if y1 < h and holds(rgb[y1, x0:x1]):
            y1, moved = y1 + 1, True
        if not moved:
            break
    return float(x0 - 1), float(y0 - 1), float(x1 - x0 + 2), float(y1 - y0 + 2)


def detect_disc(rgb: np.ndarray, lit_level: int = 20) -> FieldOfView | None:
    """The circle-only detector used until 2026-12 (a disc fitted to the largest lit blob), for comparison."""
    return _detect(rgb, lit_level, circle_only=True)


def detect_field_of_view(rgb: np.ndarray, lit_level: int = 20) -> FieldOfView | None:
    """The lit field of view of an RGB uint8 frame, or None when there is no plausible one."""
    return _detect(rgb, lit_level, circle_only=False)


def _work_copy(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The frame about _WORK_WIDTH wide, and its scale (work pixels per source pixel)."""
    h, w = rgb.shape[:2]
    step = max(1, w // (2 * _WORK_WIDTH))  # plain subsampling first: area-averaging 1080p directly costs 2 ms
    view = rgb[::step, ::step]
    scale = min(1.0, _WORK_WIDTH / view.shape[1]) / step
    return cv2.resize(view, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA), scale


def _detect(rgb: np.ndarray, lit_level: int, circle_only: bool) -> FieldOfView | None:
    """The field of view: a disc fitted to the largest lit blob, else (unless ``circle_only``) its convex hull."""
    h, w = rgb.shape[:2]
    small, scale = _work_copy(rgb)
    lum = _channel_max(small) if small.ndim == 3 else small
    raw = (lum > lit_level).astype(np.uint8)
    k = max(3, int(round(min(small.shape[:2]) * 0.04)) | 1)  # wider than text strokes, far smaller than the disc
    ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    lit = cv2.morphologyEx(raw, cv2.MORPH_OPEN, ellipse)
    sh, sw = lit.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    if n < 2:
        return None
    cut: list[tuple[int, int, int, int]] = []
    outliers: _ColourOutliers | None = None
    if not circle_only and small.ndim == 3:
        outliers, cut, n, labels, stats = _cut_overlays(small, lit, ellipse, lit_level, n, labels, stats)
        if n < 2:
            return None
    blob = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[blob, cv2.CC_STAT_AREA] < 0.05 * sh * sw:
        return None
    mask, outline, inner = _blob_outline(labels, blob, ellipse, cut)
    exclude = tuple(_source_rect(rgb, o, outliers, scale) for o in cut) if outliers is not None else ()
    fit = _fit_circle(inner + 0.5)
    if fit is not None:
        cx, cy, r = (v / scale for v in fit)
        area_r = math.sqrt(stats[blob, cv2.CC_STAT_AREA] / math.pi) / scale
        # A real disc: its fitted radius is at least the equal-area radius (clipping only removes
        # area) and not absurdly larger; its centre lies inside the frame.
        plausible = 0.9 * area_r <= r <= 2.5 * area_r and 0 <= cx < w and 0 <= cy < h
        if circle_only:
            return FieldOfView(cx, cy, r) if plausible else None
        if plausible:
            yy, xx = np.nonzero(mask)
            d = np.hypot(xx + 0.5 - fit[0], yy + 0.5 - fit[1])
            if np.count_nonzero(d > fit[2] + 1) <= _OUTSIDE_DISC * len(d):
                return FieldOfView(cx, cy, r, exclude=exclude)
    elif circle_only:
        return None
    return _hull_field(outline, stats[blob, cv2.CC_STAT_AREA], scale, exclude)


def _cut_overlays(small: np.ndarray, lit: np.ndarray, ellipse: np.ndarray, lit_level: int, n: int, labels: np.ndarray,
                  stats: np.ndarray) -> tuple[_ColourOutliers, list[tuple[int, int, int, int]], int, np.ndarray, np.ndarray]:
    """Find the overlays drawn on the largest lit blob; cut them out of the lit mask and label its blobs again."""
    fov = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    outliers = _ColourOutliers(small, fov, lit_level)
    cut = _overlays(small, outliers, fov)
    if cut:
        keep = np.ones_like(lit)
        for x, y, bw, bh in cut:
            m = _CUT_MARGIN
            keep[max(0, y - m):y + bh + m, max(0, x - m):x + bw + m] = 0
        lit = cv2.morphologyEx(lit & keep, cv2.MORPH_OPEN, ellipse)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(lit, connectivity=8)
    return outliers, cut, n, labels, stats


def _blob_outline(labels: np.ndarray, blob: int, ellipse: np.ndarray,
                  cut: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blob's closed mask, its outline, and the outline points to fit a circle to (off the frame's and overlays' edges)."""
    mask = (labels == blob).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ellipse)
    sh, sw = mask.shape
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2)
    inner = outline[(outline[:, 0] > 1) & (outline[:, 0] < sw - 2) & (outline[:, 1] > 1) & (outline[:, 1] < sh - 2)]
    if cut:  # nor the points along a cut-out overlay's edge
        near = np.zeros(len(inner), bool)
        for x, y, bw, bh in cut:
            m = _CUT_MARGIN + 2
            near |= ((inner[:, 0] >= x - m) & (inner[:, 0] < x + bw + m)
                     & (inner[:, 1] >= y - m) & (inner[:, 1] < y + bh + m))
        inner = inner[~near]
    return mask, outline, inner


def _hull_field(outline: np.ndarray, area: float, scale: float, exclude: tuple[Rect, ...]) -> FieldOfView | None:
    """Not a disc: the convex hull of the blob, through boundary pixel centres pushed out by a margin."""
    hull = cv2.convexHull(outline.astype(np.float32)).reshape(-1, 2).astype(np.float64) + 0.5
    if len(hull) < 3 or cv2.contourArea(hull.astype(np.float32)) <= 0:
        return None
    if area < 0.5 * cv2.contourArea(hull.astype(np.float32)):
        return None  # a ragged blob (scattered glare), not a field of view
    centre = hull.mean(axis=0)
    out = hull - centre
    out += out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6) * _HULL_MARGIN
    pts = (out + centre) / scale
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    return FieldOfView((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2,
                       tuple((float(x), float(y)) for x, y in pts), exclude)


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
        self._disc = _disc_mask(input_size)
        self._mask: tuple[FieldOfView | None, np.ndarray] = (None, self._disc)

    def crop_mask(self, fov: FieldOfView) -> np.ndarray:
        """The field of view in the crop (input_size² × 1 float32), made once per detected field of view."""
        if fov.outline is None and not fov.exclude:
            return self._disc  # a plain disc: the same mask for every disc
        if self._mask[0] != fov:
            self._mask = (fov, fov.crop_mask(self.input_size))
        return self._mask[1]

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
            out = (out * self.crop_mask(fov)).astype(np.uint8)
        return out, (x0, y0, side)

    def __call__(self, rgb: np.ndarray) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int]]:
        """(1×3×n×n float tensor in [0, 1], the uint8 crop, crop box)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an H×W×3 uint8 RGB frame, got {rgb.shape} {rgb.dtype}")
        crop, box = self.crop(rgb)
        # numpy, not torch: a torch op here wakes torch's OpenMP threads, and their spin-wait takes the
        # cores from an ONNX Runtime or OpenVINO branch called next (measured: 11.9 against 7.8 ms)
        x = crop.transpose(2, 0, 1)[None].astype(np.float32, order="C")  # one copy, already N×C×H×W in memory
        x /= np.float32(255)
        return torch.from_numpy(x), crop, box


def map_to_source(points: np.ndarray, box: tuple[int, int, int], input_size: int) -> np.ndarray:
    """Points (x, y) in input-size pixels → source-frame pixels."""
    x0, y0, side = box
    return points * (side / input_size) + np.array([x0, y0], np.float64)
