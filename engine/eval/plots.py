"""Report figures drawn with OpenCV + numpy (no matplotlib on the target machines).

Every public function takes and returns RGB images; files are written as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = ["plot_roc_curves", "plot_line_chart", "heatmap_overlay", "image_grid", "PALETTE"]

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
GRID = (225, 225, 225)
AXIS = (60, 60, 60)
TEXT = (20, 20, 20)
# Tableau-10 (RGB): distinct, colour-blind-friendlier than pure primaries.
PALETTE: list[tuple[int, int, int]] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


# --------------------------------------------------------------------------- basics


def _write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode PNG for {path}")
    path.write_bytes(buf.tobytes())  # also works for non-ASCII paths, unlike cv2.imwrite
    return path


def _text_size(text: str, scale: float, thick: int = 1) -> tuple[int, int]:
    (w, h), base = cv2.getTextSize(text, FONT, scale, thick)
    return w, h + base


def _put(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
         color: tuple[int, int, int] = TEXT, thick: int = 1, anchor: str = "lb") -> None:
    """Draw text; ``anchor`` = horizontal (l/c/r) + vertical (t/m/b) reference of ``org``."""
    (w, h), base = cv2.getTextSize(text, FONT, scale, thick)
    x, y = org
    x -= {"l": 0, "c": w // 2, "r": w}[anchor[0]]
    y += {"t": h, "m": h // 2, "b": 0}[anchor[1]]
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, color, thick, cv2.LINE_AA)


def _put_vertical(img: np.ndarray, text: str, center: tuple[int, int], scale: float = 0.5) -> None:
    """Draw text rotated 90 degrees counter-clockwise (y-axis labels)."""
    w, h = _text_size(text, scale)
    tile = np.full((h + 4, w + 4, 3), 255, np.uint8)
    _put(tile, text, (2, 2), scale, anchor="lt")
    tile = np.ascontiguousarray(np.rot90(tile))
    th, tw = tile.shape[:2]
    y0 = max(0, center[1] - th // 2)
    x0 = max(0, center[0] - tw // 2)
    region = img[y0:y0 + th, x0:x0 + tw]
    np.minimum(region, tile[: region.shape[0], : region.shape[1]], out=region)


def _fmt(v: float) -> str:
    """Short tick label: 0.2, 15, 2500, 1.5e+07."""
    if v == 0:
        return "0"
    return f"{v:.6g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.1e}"


def _nice_ticks(lo: float, hi: float, target: int = 6) -> np.ndarray:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        return np.array([lo])
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = np.arange(first, hi + step * 1e-6, step)
    return np.round(ticks / step) * step  # remove -0.0 and float noise


class _Axes:
    """A rectangular plot area mapping data coordinates to pixels."""

    def __init__(self, img: np.ndarray, box: tuple[int, int, int, int],
                 xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        self.img, (self.x0, self.y0, self.x1, self.y1) = img, box
        self.xlim, self.ylim = xlim, ylim

    def px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Data -> integer pixel coordinates, shape (n, 1, 2) for cv2.polylines."""
        fx = (np.asarray(x, float) - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (np.asarray(y, float) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        pxs = self.x0 + fx * (self.x1 - self.x0)
        pys = self.y1 - fy * (self.y1 - self.y0)
        return np.round(np.stack([pxs, pys], -1)).astype(np.int32).reshape(-1, 1, 2)

    def frame(self, xticks: np.ndarray, yticks: np.ndarray) -> None:
        """Grid, tick labels and the axis box."""
        img = self.img
        for t in xticks:
            x = int(self.px([t], [self.ylim[0]])[0, 0, 0])
            cv2.line(img, (x, self.y0), (x, self.y1), GRID, 1)
            cv2.line(img, (x, self.y1), (x, self.y1 + 5), AXIS, 1)
            _put(img, _fmt(t), (x, self.y1 + 9), 0.42, anchor="ct")
        for t in yticks:
            y = int(self.px([self.xlim[0]], [t])[0, 0, 1])
            cv2.line(img, (self.x0, y), (self.x1, y), GRID, 1)
            cv2.line(img, (self.x0 - 5, y), (self.x0, y), AXIS, 1)
            _put(img, _fmt(t), (self.x0 - 9, y), 0.42, anchor="rm")
        cv2.rectangle(img, (self.x0, self.y0), (self.x1, self.y1), AXIS, 1)

    def polyline(self, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int],
                 thick: int = 2, dashed: bool = False) -> None:
        pts = self.px(x, y)
        # Keep lines inside the plot area even when data leave the limits.
        pts[..., 0] = np.clip(pts[..., 0], self.x0, self.x1)
        pts[..., 1] = np.clip(pts[..., 1], self.y0, self.y1)
        if not dashed:
            cv2.polylines(self.img, [pts], False, color, thick, cv2.LINE_AA)
            return
        p = pts.reshape(-1, 2)
        for a, b in zip(p[:-1], p[1:]):
            _dashed_line(self.img, tuple(a), tuple(b), color, thick)


def _dashed_line(img: np.ndarray, a: tuple[int, int], b: tuple[int, int],
                 color: tuple[int, int, int], thick: int = 1, dash: int = 8) -> None:
    length = float(np.hypot(b[0] - a[0], b[1] - a[1]))
    n = max(1, int(length // dash))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(1.0, (i + 1) / n)
        p0 = (int(a[0] + (b[0] - a[0]) * t0), int(a[1] + (b[1] - a[1]) * t0))
        p1 = (int(a[0] + (b[0] - a[0]) * t1), int(a[1] + (b[1] - a[1]) * t1))
        cv2.line(img, p0, p1, color, thick, cv2.LINE_AA)


def _legend(img: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int], bool]],
            corner: tuple[int, int], align: str = "br") -> None:
    """Legend box with a line sample per entry; ``align`` puts ``corner`` at its br/tr."""
    if not entries:
        return
    scale, row, pad, sample = 0.45, 20, 8, 26
    width = max(_text_size(t, scale)[0] for t, _, _ in entries) + sample + 3 * pad
    height = row * len(entries) + pad
    x1, y = corner
    x0 = max(0, x1 - width)
    y0 = max(0, y - height if align[0] == "b" else y)  # many entries: clamp, never wrap
    region = img[y0:y0 + height, x0:x1]
    region[:] = (0.15 * region + 0.85 * 255).astype(np.uint8)  # translucent white
    cv2.rectangle(img, (x0, y0), (x1, y0 + height), (170, 170, 170), 1)
    for i, (text, color, dashed) in enumerate(entries):
        cy = y0 + pad + row * i + row // 2 - 2
        a, b = (x0 + pad, cy), (x0 + pad + sample, cy)
        if dashed:
            _dashed_line(img, a, b, color, 2, dash=6)
        else:
            cv2.line(img, a, b, color, 3, cv2.LINE_AA)
        _put(img, text, (x0 + 2 * pad + sample, cy), scale, anchor="lm")


def _canvas(width: int, height: int, title: str) -> np.ndarray:
    img = np.full((height, width, 3), 255, np.uint8)
    _put(img, title, (width // 2, 14), 0.6, thick=1, anchor="ct")
    return img


# --------------------------------------------------------------------------- charts


def plot_roc_curves(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
    title: str = "ROC",
    size: tuple[int, int] = (640, 560),
) -> Path:
    """ROC curves of several detectors on one chart; legend shows each AUC."""
    width, height = size
    img = _canvas(width, height, title)
    ax = _Axes(img, (70, 44, width - 24, height - 62), (0.0, 1.0), (0.0, 1.0))
    ticks = np.linspace(0, 1, 6)
    ax.frame(ticks, ticks)
    ax.polyline(np.array([0, 1]), np.array([0, 1]), (150, 150, 150), 1, dashed=True)
    entries = []
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        ax.polyline(np.asarray(fpr), np.asarray(tpr), color, 2)
        entries.append((f"{name}  (AUC {auc:.3f})", color, False))
    entries.append(("chance", (150, 150, 150), True))
    _put(img, "false positive rate", ((ax.x0 + ax.x1) // 2, height - 22), 0.5, anchor="cb")
    _put_vertical(img, "true positive rate", (16, (ax.y0 + ax.y1) // 2))
    _legend(img, entries, (ax.x1 - 10, ax.y1 - 10), align="br")
    return _write_png(path, img)


def _limits(values: list[np.ndarray], pad: float = 0.05) -> tuple[float, float]:
    """Data range with a small margin; a flat range is widened to stay drawable."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if not finite:
        return 0.0, 1.0
    lo = float(min(v.min() for v in finite))
    hi = float(max(v.max() for v in finite))
    if hi <= lo:
        half = abs(lo) * 0.1 or 1.0
        return lo - half, hi + half
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def plot_line_chart(
    path: str | Path,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: dict[str, float] | None = None,
    size: tuple[int, int] = (800, 420),
) -> Path:
    """Generic line chart (e.g. anomaly score over time) with optional dashed thresholds."""
    hlines = hlines or {}
    width, height = size
    img = _canvas(width, height, title)
    xs = [np.asarray(x, float).ravel() for x, _ in series.values()]
    ys = [np.asarray(y, float).ravel() for _, y in series.values()]
    xlim = _limits(xs, pad=0.0)
    ylim = _limits(ys + [np.asarray(list(hlines.values()), float)])
    ax = _Axes(img, (78, 44, width - 24, height - 62), xlim, ylim)
    ax.frame(_ticks_inside(xlim), _ticks_inside(ylim))
    entries = []
    for i, (name, (x, y)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
        for seg in _finite_runs(x, y):  # NaN = gap in the line
            ax.polyline(x[seg], y[seg], color, 1 if x.size > ax.x1 - ax.x0 else 2)
        entries.append((name, color, False))
    for j, (name, value) in enumerate(hlines.items()):
        color = PALETTE[(len(series) + j) % len(PALETTE)]
        ax.polyline(np.array(xlim), np.array([value, value]), color, 2, dashed=True)
        entries.append((f"{name} = {value:.4g}", color, True))
    _put(img, xlabel, ((ax.x0 + ax.x1) // 2, height - 22), 0.5, anchor="cb")
    _put_vertical(img, ylabel, (16, (ax.y0 + ax.y1) // 2))
    _legend(img, entries, (ax.x1 - 8, ax.y0 + 8), align="tr")
    return _write_png(path, img)


def _ticks_inside(lim: tuple[float, float]) -> np.ndarray:
    t = _nice_ticks(*lim)
    return t[(t >= lim[0]) & (t <= lim[1])]


def _finite_runs(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Index runs where both x and y are finite (a NaN splits the line)."""
    ok = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1) + 1
    return [r for r in np.split(idx, breaks) if r.size]


# --------------------------------------------------------------------------- images


def heatmap_overlay(
    rgb: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    mask_contour: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an RGB image; outline the ground truth in green.

    ``amap`` is resized to the image if needed, so low-resolution maps can be passed as is.
    """
    rgb = _as_rgb(rgb)
    h, w = rgb.shape[:2]
    a = np.nan_to_num(np.asarray(amap, np.float32), nan=vmin, posinf=vmax, neginf=vmin)
    if a.shape != (h, w):
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    span = (vmax - vmin) or 1.0
    norm = np.clip((a - vmin) / span, 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(rgb, 1.0 - alpha, heat, alpha, 0.0)
    if mask_contour is not None:
        m = np.asarray(mask_contour).astype(np.uint8)
        if m.shape != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thick = max(1, round(min(h, w) / 128))  # stays visible on large frames
        cv2.drawContours(out, contours, -1, (0, 255, 0), thick, cv2.LINE_AA)
    return out


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 from grayscale, RGBA or float [0, 1] input."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.dtype.kind == "f" and a.max(initial=0) <= 1.0 else a, 0, 255)
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _fit_cell(img: np.ndarray | None, cell: int) -> np.ndarray:
    """Resize into a cell x cell tile keeping the aspect ratio (white letterbox)."""
    tile = np.full((cell, cell, 3), 255, np.uint8)
    if img is None:
        return tile
    a = _as_rgb(img)
    h, w = a.shape[:2]
    s = cell / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    a = cv2.resize(a, (nw, nh), interpolation=interp)
    y0, x0 = (cell - nh) // 2, (cell - nw) // 2
    tile[y0:y0 + nh, x0:x0 + nw] = a
    return tile


def _fit_text(text: str, max_width: int, scale: float = 0.5) -> tuple[str, float]:
    """Shrink (then shorten with an ellipsis) a label to fit ``max_width`` pixels."""
    while scale > 0.35 and _text_size(text, scale)[0] > max_width:
        scale -= 0.05
    while len(text) > 4 and _text_size(text, scale)[0] > max_width:
        text = text[:-4] + "..."
    return text, scale


def image_grid(
    path: str | Path,
    rows: list[list[np.ndarray | None]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int = 192,
    title: str | None = None,
) -> Path:
    """Write a labelled grid of RGB images (None = empty cell) as PNG."""
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    gap = 4
    label_w = 0
    if row_labels:
        label_w = min(220, max(_text_size(t, 0.5)[0] for t in row_labels) + 16)
    top = (26 if col_labels else 0) + (30 if title else 0) + gap
    width = label_w + n_cols * (cell + gap) + gap
    height = top + n_rows * (cell + gap)
    img = np.full((height, width, 3), 255, np.uint8)
    if title:
        _put(img, title, (width // 2, 8), 0.6, anchor="ct")
    for c, text in enumerate(col_labels or []):
        text, scale = _fit_text(text, cell - 4)
        x = label_w + gap + c * (cell + gap) + cell // 2
        _put(img, text, (x, top - gap - 6), scale, anchor="cb")
    for r, row in enumerate(rows):
        y = top + r * (cell + gap)
        if row_labels and r < len(row_labels):
            text, scale = _fit_text(row_labels[r], label_w - 12)
            _put(img, text, (label_w - 8, y + cell // 2), scale, anchor="rm")
        for c in range(n_cols):
            x = label_w + gap + c * (cell + gap)
            img[y:y + cell, x:x + cell] = _fit_cell(row[c] if c < len(row) else None, cell)
    return _write_png(path, img)
