"""Calibration figures, drawn with OpenCV in the style of ``engine.eval.plots``.

* score histograms of normal video per modality, with the chosen threshold, the rate threshold
  and the bulk floor marked;
* false alerts per hour on normal video against the threshold, with the target and the choice;
* a score timeline of one video: the score per modality against its threshold, lesions as
  bands (missed ones highlighted) and alert events as a strip along the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.eval.plots import (
    AXIS,
    GRID,
    PALETTE,
    _Axes,
    _canvas,
    _dashed_line,
    _fmt,
    _legend,
    _limits,
    _put,
    _put_vertical,
    _ticks_inside,
    _write_png,
)

__all__ = ["plot_score_histograms", "plot_false_alert_curves", "plot_timeline", "MODALITY_COLORS"]

Color = tuple[int, int, int]

MODALITY_COLORS: dict[str, Color] = {"wli": PALETTE[0], "nbi": PALETTE[4]}  # blue, purple
RED: Color = PALETTE[3]  # threshold and alerts
RATE_COLOR: Color = PALETTE[1]  # orange
FLOOR_COLOR: Color = PALETTE[7]  # grey
TARGET_COLOR: Color = (90, 90, 90)
LESION_COLOR: Color = (200, 235, 200)  # light green
MISSED_COLOR: Color = (253, 212, 168)  # light orange
MISSED_TEXT: Color = (150, 70, 0)

PANEL_SIZE = (560, 400)
HIST_BINS = 60
LOG_FLOOR = np.log10(0.5)  # y axis bottom: a single frame still gets a visible bar
LEGEND_HEADROOM = 0.75  # tallest bar reaches this fraction of the height; the legend sits above

PX_PER_SECOND = 40
TIMELINE_WIDTH = (900, 2400)
TIMELINE_HEIGHT = 420


def _color(modality: str) -> Color:
    return MODALITY_COLORS.get(modality, PALETTE[0])


def _x_px(ax: _Axes, x: float) -> int:
    return int(ax.px([x], [ax.ylim[0]])[0, 0, 0])


def _y_px(ax: _Axes, y: float) -> int:
    return int(ax.px([ax.xlim[0]], [y])[0, 0, 1])


def _figure_title(title: str, label: str) -> str:
    return f"{title} - {label}" if label else title


# --------------------------------------------------------------------------- histograms


def _histogram_panel(modality: str, data: dict[str, Any]) -> np.ndarray:
    scores = np.asarray(data["scores"], float).ravel()
    lines = {
        "floor": float(data["bulk_floor"]),
        "rate": float(data["rate_threshold"]),
        "threshold": float(data["threshold"]),
    }
    width, height = PANEL_SIZE
    img = _canvas(width, height, f"{modality.upper()}: {scores.size:,} normal frames")
    xlim = _limits([scores, np.array(list(lines.values()))], pad=0.03)
    counts, edges = np.histogram(scores, bins=HIST_BINS, range=xlim)
    top = max(1.0, float(np.log10(max(int(counts.max()), 1))))
    ylim = (LOG_FLOOR, LOG_FLOOR + (top - LOG_FLOOR) / LEGEND_HEADROOM)
    ax = _Axes(img, (70, 44, width - 20, height - 62), xlim, ylim)

    for decade in range(int(np.floor(ylim[1])) + 1):  # log axis: ticks at 1, 10, 100, ...
        y = _y_px(ax, decade)
        cv2.line(img, (ax.x0, y), (ax.x1, y), GRID, 1)
        cv2.line(img, (ax.x0 - 5, y), (ax.x0, y), AXIS, 1)
        _put(img, _fmt(10.0 ** decade), (ax.x0 - 9, y), 0.42, anchor="rm")
    ax.frame(_ticks_inside(xlim), np.array([]))

    color = _color(modality)
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        if count:
            x_left, x_right = _x_px(ax, left), _x_px(ax, right)
            cv2.rectangle(img, (x_left, _y_px(ax, np.log10(count))), (max(x_left, x_right - 1), ax.y1),
                          color, -1)
    cv2.rectangle(img, (ax.x0, ax.y0), (ax.x1, ax.y1), AXIS, 1)  # bars may cover the bottom edge

    x = _x_px(ax, lines["floor"])
    _dashed_line(img, (x, ax.y0), (x, ax.y1), FLOOR_COLOR, 2, dash=3)
    x = _x_px(ax, lines["rate"])
    _dashed_line(img, (x, ax.y0), (x, ax.y1), RATE_COLOR, 2)
    x = _x_px(ax, lines["threshold"])
    cv2.line(img, (x, ax.y0), (x, ax.y1), RED, 2)

    _put(img, "anomaly score", ((ax.x0 + ax.x1) // 2, height - 20), 0.5, anchor="cb")
    _put_vertical(img, "frames (log scale)", (16, (ax.y0 + ax.y1) // 2))
    _legend(img, [
        (f"threshold {lines['threshold']:.4g}", RED, False),
        (f"rate threshold {lines['rate']:.4g}", RATE_COLOR, True),
        (f"bulk floor (p99) {lines['floor']:.4g}", FLOOR_COLOR, True),
    ], (ax.x1 - 8, ax.y0 + 8), align="tr")
    return img


def plot_score_histograms(path: str | Path, per_modality: dict[str, dict], label: str = "") -> Path:
    """Histogram (log count) of normal-frame scores per modality, with the calibration lines."""
    body = np.hstack([_histogram_panel(m, d) for m, d in per_modality.items()])
    header = _canvas(body.shape[1], 34, _figure_title("Anomaly scores of normal video", label))
    return _write_png(path, np.vstack([header, body]))


# --------------------------------------------------------------------------- false alerts


def plot_false_alert_curves(path: str | Path, per_modality: dict[str, dict], target: float,
                            label: str = "") -> Path:
    """False alerts per hour on normal video against the threshold, one line per modality."""
    width, height = 800, 440
    img = _canvas(width, height, _figure_title("False alerts per hour on normal video", label))
    curves = {m: (np.asarray(d["threshold"], float), np.asarray(d["false_alerts_per_hour"], float),
                  float(d["chosen"])) for m, d in per_modality.items()}
    xlim = _limits([np.concatenate([thr, [chosen]]) for thr, _, chosen in curves.values()], pad=0.02)
    y_max = max([target] + [float(rate.max(initial=0.0)) for _, rate, _ in curves.values()])
    ylim = (0.0, y_max * 1.08 or 1.0)
    ax = _Axes(img, (78, 44, width - 24, height - 62), xlim, ylim)
    ax.frame(_ticks_inside(xlim), _ticks_inside(ylim))

    ax.polyline(np.array(xlim), np.array([target, target]), TARGET_COLOR, 2, dashed=True)
    _put(img, f"target {target:g} / h", (ax.x0 + 8, _y_px(ax, target) - 5), 0.42, TARGET_COLOR, anchor="lb")
    entries = []
    for m, (thr, rate, chosen) in curves.items():
        color = _color(m)
        ax.polyline(thr, rate, color, 2)
        x = _x_px(ax, chosen)
        cv2.line(img, (x, ax.y0), (x, ax.y1), color, 1)
        cv2.circle(img, (x, _y_px(ax, float(np.interp(chosen, thr, rate)))), 5, color, -1, cv2.LINE_AA)
        entries.append((f"{m.upper()} (chosen {chosen:.4g})", color, False))
    entries.append(("target", TARGET_COLOR, True))

    _put(img, "threshold", ((ax.x0 + ax.x1) // 2, height - 22), 0.5, anchor="cb")
    _put_vertical(img, "false alerts / hour", (16, (ax.y0 + ax.y1) // 2))
    _legend(img, entries, (ax.x1 - 8, ax.y0 + 8), align="tr")
    return _write_png(path, img)


# --------------------------------------------------------------------------- timeline


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of runs of equal consecutive values."""
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    ends = np.concatenate([starts[1:], [values.size]])
    return starts, ends


def _band(ax: _Axes, t0: float, t1: float, y0: int, y1: int, color: Color) -> tuple[int, int]:
    """Fill t0..t1 between rows y0..y1 (at least 2 px wide); return the pixel columns."""
    x0 = _x_px(ax, t0)
    x1 = max(_x_px(ax, t1), x0 + 1)
    ax.img[y0:y1 + 1, x0:x1 + 1] = color
    return x0, x1


def plot_timeline(path: str | Path, t_s: np.ndarray, score: np.ndarray, modality: np.ndarray,
                  thresholds: dict[str, float], alerts: list[tuple[int, int]],
                  lesions: list[tuple[int, int, bool]], title: str = "") -> Path:
    """Score of one video over time against its per-modality threshold, with lesions and alerts."""
    t = np.asarray(t_s, float).ravel()
    score = np.asarray(score, float).ravel()
    modality = np.asarray(modality).astype(str).ravel()
    if not t.size or not (t.size == score.size == modality.size):
        raise ValueError(f"plot_timeline needs equal, non-empty t_s/score/modality "
                         f"(got {t.size}, {score.size}, {modality.size})")
    missing = set(np.unique(modality)) - set(thresholds)
    if missing:
        raise ValueError(f"no threshold for modality {sorted(missing)}")
    present = [m for m in thresholds if (modality == m).any()]
    threshold = np.empty_like(score)
    for m in present:
        threshold[modality == m] = thresholds[m]

    duration = float(t.max() - t.min())
    width = int(np.clip(round(PX_PER_SECOND * duration), *TIMELINE_WIDTH))
    height = TIMELINE_HEIGHT
    img = _canvas(width, height, title or "Anomaly score over time")
    xlim = _limits([t], pad=0.0)
    ylim = _limits([score, threshold])
    ax = _Axes(img, (78, 66, width - 24, height - 62), xlim, ylim)

    for first, last, detected in lesions:  # behind everything
        x0, x1 = _band(ax, t[first], t[last], ax.y0, ax.y1, LESION_COLOR if detected else MISSED_COLOR)
        if not detected:
            _put(img, "missed", ((x0 + x1) // 2, ax.y0 + 4), 0.4, MISSED_TEXT, anchor="ct")
    ax.frame(_ticks_inside(xlim), _ticks_inside(ylim))

    starts, ends = _runs(modality)
    pts = ax.px(t, score)
    thick = 1 if t.size > ax.x1 - ax.x0 else 2
    for m in present:
        # Each run also takes the next frame's point, so the line stays continuous across switches.
        segments = [pts[s:e + 1] for s, e in zip(starts, ends) if modality[s] == m]
        cv2.polylines(img, segments, False, _color(m), thick, cv2.LINE_AA)
    step_x = np.stack([t[starts], t[np.minimum(ends, t.size - 1)]], axis=1).ravel()
    ax.polyline(step_x, np.repeat(threshold[starts], 2), RED, 2)

    strip_top, strip_bottom = 38, 54
    cv2.rectangle(img, (ax.x0, strip_top - 1), (ax.x1, strip_bottom + 1), (200, 200, 200), 1)
    _put(img, "alerts", (ax.x0 - 8, (strip_top + strip_bottom) // 2), 0.42, anchor="rm")
    for first, last in alerts:
        _band(ax, t[first], t[last], strip_top, strip_bottom, RED)

    entries = [(f"{m.upper()} score", _color(m), False) for m in present]
    entries.append(("threshold", RED, False))
    if any(detected for *_, detected in lesions):
        entries.append(("lesion", LESION_COLOR, False))
    if not all(detected for *_, detected in lesions):
        entries.append(("missed lesion", MISSED_COLOR, False))
    if alerts:
        entries.append(("alert (top strip)", RED, False))
    _put(img, "time (s)", ((ax.x0 + ax.x1) // 2, height - 22), 0.5, anchor="cb")
    _put_vertical(img, "anomaly score", (16, (ax.y0 + ax.y1) // 2))
    _legend(img, entries, (ax.x1 - 8, ax.y0 + 8), align="tr")
    return _write_png(path, img)
