"""Calibration figures: read the PNGs back and check where the marks landed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.plots import (
    LESION_COLOR,
    MISSED_COLOR,
    MODALITY_COLORS,
    RED,
    TARGET_COLOR,
    plot_false_alert_curves,
    plot_score_histograms,
    plot_timeline,
)
from engine.eval.plots import AXIS

BLUE, PURPLE = MODALITY_COLORS["wli"], MODALITY_COLORS["nbi"]


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable image"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def near(img: np.ndarray, color: tuple[int, int, int], tol: int = 30) -> np.ndarray:
    return (np.abs(img.astype(int) - np.array(color)) <= tol).all(axis=-1)


def axis_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 of the plot frame: the long runs of axis-coloured pixels."""
    axis = near(img, AXIS, 0)
    h, w = axis.shape
    rows = np.flatnonzero(axis.sum(axis=1) > 0.5 * w)
    cols = np.flatnonzero(axis.sum(axis=0) > 0.5 * h)
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def fullest_column(mask: np.ndarray) -> tuple[int, int]:
    """Column with the most marked pixels, and that count (a vertical line stands out)."""
    counts = mask.sum(axis=0)
    return int(counts.argmax()), int(counts.max())


# --------------------------------------------------------------------------- histograms


def hist_entry(scores: np.ndarray, threshold: float) -> dict:
    return {"scores": scores, "threshold": threshold, "rate_threshold": threshold - 0.1,
            "bulk_floor": threshold - 0.15}


def test_histogram_threshold_line_sits_at_its_score(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 3000)])  # x axis ~ [0, 1]
    columns = {}
    for thr in (0.3, 0.8):
        out = plot_score_histograms(tmp_path / f"deep/h{thr}.png",
                                    {"wli": hist_entry(scores, thr), "nbi": hist_entry(scores, 1.1 - thr)},
                                    label="SYNTHETIC data")
        img = read_rgb(out)
        h, w = img.shape[:2]
        assert 380 <= h <= 480 and 1000 <= w <= 1240  # two ~560 x 400 panels side by side
        for panel, expected in ((img[:, : w // 2], thr), (img[:, w // 2:], 1.1 - thr)):
            x0, y0, x1, y1 = axis_box(panel)
            col, count = fullest_column(near(panel, RED))
            assert count > 0.6 * (y1 - y0)  # a full-height red line (the legend may cover its top)
            assert abs(col - (x0 + expected * (x1 - x0))) < 0.05 * (x1 - x0)
        columns[thr] = col
    assert columns[0.8] - columns[0.3] < -0.4 * (x1 - x0)  # NBI line moved left by ~0.5 of the axis


def test_histogram_counts_are_log_scaled(tmp_path: Path) -> None:
    scores = np.concatenate([np.full(1000, 0.1), np.full(10, 0.5), [0.9]])
    img = read_rgb(plot_score_histograms(tmp_path / "h.png", {"wli": hist_entry(scores, 0.7)}))
    x0, y0, x1, y1 = axis_box(img)
    heights = near(img, BLUE, 0).sum(axis=0)
    third = (x1 - x0) // 3
    h1000, h10, h1 = (int(heights[x0 + i * third: x0 + (i + 1) * third].max()) for i in range(3))
    assert 0 < h1 < h10 < h1000 < y1 - y0
    assert abs((h1000 - h10) - 2 * (h10 - h1)) <= 4  # 2 decades vs 1 decade
    assert not near(img, PURPLE, 0).any()  # one modality: no NBI panel


def test_histogram_single_modality_and_constant_scores(tmp_path: Path) -> None:
    two = read_rgb(plot_score_histograms(tmp_path / "two.png",
                                         {"wli": hist_entry(np.full(50, 0.5), 0.5),
                                          "nbi": hist_entry(np.full(50, 0.5), 0.5)}))
    one = read_rgb(plot_score_histograms(tmp_path / "one.png", {"nbi": hist_entry(np.full(50, 0.5), 0.5)}))
    assert one.shape[0] == two.shape[0] and one.shape[1] * 2 == two.shape[1]
    x0, y0, x1, y1 = axis_box(one)
    col, count = fullest_column(near(one, RED))
    assert count > 0.6 * (y1 - y0) and x0 < col < x1
    assert near(one, PURPLE, 0).any()


# --------------------------------------------------------------------------- false alerts


def alert_curves(chosen_wli: float, chosen_nbi: float) -> dict:
    grid = np.linspace(0.0, 1.0, 40)
    return {"wli": {"threshold": grid.tolist(), "false_alerts_per_hour": (20 - 10 * grid).tolist(),
                    "chosen": chosen_wli},
            "nbi": {"threshold": grid.tolist(), "false_alerts_per_hour": (18 - 12 * grid).tolist(),
                    "chosen": chosen_nbi}}


def test_false_alert_markers_and_target(tmp_path: Path) -> None:
    rows = {}
    for target in (5.0, 10.0):
        img = read_rgb(plot_false_alert_curves(tmp_path / f"sub/fa{target}.png", alert_curves(0.3, 0.7),
                                               target, label="SYNTHETIC data"))
        assert 400 <= img.shape[0] <= 480 and 700 <= img.shape[1] <= 900
        x0, y0, x1, y1 = axis_box(img)
        for color, chosen in ((BLUE, 0.3), (PURPLE, 0.7)):
            col, count = fullest_column(near(img, color, 10))
            assert count > 0.6 * (y1 - y0)  # the vertical marker, not the gently sloped curve
            assert abs(col - (x0 + chosen * (x1 - x0))) < 0.05 * (x1 - x0)
        target_rows = near(img, TARGET_COLOR, 10).sum(axis=1)
        rows[target] = int(target_rows.argmax())
        assert target_rows.max() > 0.3 * (x1 - x0)  # dashed: about half the width is drawn
    # Linear axis from 0 (the curves fix its top): twice the target is twice as high above the bottom.
    assert abs((y1 - rows[10.0]) - 2 * (y1 - rows[5.0])) <= 3


# --------------------------------------------------------------------------- timeline


def timeline(fps: float, seconds: float, switch_s: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(int(fps * seconds)) / fps
    score = 0.3 + 0.03 * rng.standard_normal(t.size)
    modality = np.where(t < switch_s, "wli", "nbi") if switch_s is not None else np.full(t.size, "wli")
    return t, score, modality


def to_px(t: float, xlim: tuple[float, float], x0: int, x1: int) -> float:
    return x0 + (t - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0)


def test_timeline_alerts_lesions_and_modalities(tmp_path: Path) -> None:
    t, score, modality = timeline(30.0, 30.0, switch_s=15.0)
    score[140:251] += 0.6
    alerts = [(150, 240), (600, 630)]
    lesions = [(140, 250, True), (700, 760, False)]
    img = read_rgb(plot_timeline(tmp_path / "t.png", t, score, modality, {"wli": 0.45, "nbi": 0.38},
                                 alerts, lesions, title="video 1"))
    h, w = img.shape[:2]
    assert 380 <= h <= 460 and abs(w - 40 * 30) <= 40
    x0, y0, x1, y1 = axis_box(img)
    xlim = (t[0], t[-1])

    def spans(events: list) -> list[tuple[float, float]]:
        return [(to_px(t[e[0]], xlim, x0, x1), to_px(t[e[1]], xlim, x0, x1)) for e in events]

    def inside(cols: np.ndarray, intervals: list[tuple[float, float]]) -> np.ndarray:
        return np.array([any(a - 2 <= c <= b + 2 for a, b in intervals) for c in cols], bool)

    strip_red = np.flatnonzero(near(img[:y0], RED).any(axis=0))
    assert strip_red.size and inside(strip_red, spans(alerts)).all()
    for a, b in spans(alerts):
        assert np.isin(np.arange(round(a), round(b)), strip_red).mean() > 0.9

    lower = img[(y0 + y1) // 2: y1]  # below the legend
    for color, events in ((LESION_COLOR, lesions[:1]), (MISSED_COLOR, lesions[1:])):
        cols = np.flatnonzero(near(lower, color, 3).any(axis=0))
        assert cols.size and inside(cols, spans(events)).all()

    switch_px = to_px(15.0, xlim, x0, x1)
    blue = np.flatnonzero(near(lower, BLUE, 10).any(axis=0))
    purple = np.flatnonzero(near(lower, PURPLE, 10).any(axis=0))
    assert blue.max() <= switch_px + 3 and purple.min() >= switch_px - 3

    red_plot = near(img[y0 + 1: y1], RED)
    row_wli = np.flatnonzero(red_plot[:, round(to_px(5.0, xlim, x0, x1))]).mean()
    row_nbi = np.flatnonzero(red_plot[:, round(to_px(18.0, xlim, x0, x1))]).mean()
    assert row_nbi - row_wli > 10  # the threshold steps down with NBI's lower value


def test_timeline_single_modality_without_events(tmp_path: Path) -> None:
    t, score, modality = timeline(25.0, 10.0, switch_s=None)
    score[:] = 0.5  # flat score on the threshold: a padded, still drawable axis
    img = read_rgb(plot_timeline(tmp_path / "t.png", t, score, modality, {"wli": 0.5, "nbi": 0.4}, [], []))
    assert img.shape[1] == 900  # 10 s x 40 px is below the minimum width
    x0, y0, x1, y1 = axis_box(img)
    assert not near(img[:y0], RED).any()  # no alert bars
    assert not near(img, PURPLE, 10).any()  # NBI neither drawn nor in the legend
    assert not near(img, LESION_COLOR, 3).any() and not near(img, MISSED_COLOR, 3).any()
    assert near(img[y0:y1], RED).any()  # threshold line


def test_timeline_long_input_is_clamped(tmp_path: Path) -> None:
    """Its speed (target < 3 s) is measured by `python -m bench.harness_speed`, not here."""
    t, score, modality = timeline(30.0, 20000 / 30.0, switch_s=None)
    modality = np.where((np.arange(t.size) // 100) % 2 == 0, "wli", "nbi")  # 200 modality runs
    alerts = [(i, i + 20) for i in range(500, 19000, 1000)]
    lesions = [(i - 10, i + 40, i % 2000 == 500) for i in range(500, 19000, 1000)]
    out = plot_timeline(tmp_path / "long.png", t, score, modality, {"wli": 0.4, "nbi": 0.35}, alerts, lesions)
    assert read_rgb(out).shape[1] == 2400


def test_timeline_rejects_inconsistent_input(tmp_path: Path) -> None:
    t, score, modality = timeline(30.0, 2.0, switch_s=1.0)
    with pytest.raises(ValueError, match="threshold"):
        plot_timeline(tmp_path / "a.png", t, score, modality, {"wli": 0.4}, [], [])
    with pytest.raises(ValueError, match="equal"):
        plot_timeline(tmp_path / "b.png", t, score[:-1], modality, {"wli": 0.4, "nbi": 0.3}, [], [])
