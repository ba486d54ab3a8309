"""Metrics against brute-force definitions, and the OpenCV report figures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine.eval import metrics as M
from engine.eval import plots as P


def brute_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score_pos > score_neg) + 1/2 P(equal), over every pair."""
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


# --------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = rng.integers(0, 12, 400).astype(float) + 0.7 * y  # many ties, some signal
    assert M.auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(y, s), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thr) < 0) and np.isinf(thr[0])


def test_auroc_perfect_inverted_constant() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert M.auroc(y, s) == 1.0
    assert M.auroc(y, -s) == 0.0
    assert M.auroc(y, np.ones(5)) == 0.5  # every pair tied
    assert M.auroc(y.astype(bool), s) == 1.0


def test_auroc_random_scores_near_half() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    assert abs(M.auroc(y, rng.random(20000)) - 0.5) < 0.02


def test_one_class_and_bad_input_raise() -> None:
    with pytest.raises(ValueError, match="all 3 items are normal"):
        M.auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="anomalous"):
        M.average_precision([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        M.auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        M.auroc([0, 2], [0.1, 0.2])


# --------------------------------------------------------------------------- AP / F1


def test_average_precision_hand_computed() -> None:
    # Ranked: 0.8 (neg), 0.4 (pos), 0.35 (pos), 0.1 (neg)
    # recall steps 0.5 at precision 1/2, 0.5 at precision 2/3 -> 0.25 + 1/3
    y, s = [0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8]
    assert M.average_precision(y, s) == pytest.approx(0.25 + 1 / 3)
    # scikit-learn's documented example
    assert M.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333)
    assert M.average_precision([0, 1], [0.0, 1.0]) == 1.0


def test_average_precision_with_ties() -> None:
    # All tied: a single threshold, precision 2/4 at recall 1.
    assert M.average_precision([0, 1, 1, 0], [1, 1, 1, 1]) == pytest.approx(0.5)


def test_pr_curve_values() -> None:
    precision, recall, thr = M.pr_curve([0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(thr, [0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(precision, [0, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [0, 0.5, 1, 1])


def test_f1_max_hand_computed() -> None:
    # Threshold 0.35 predicts {0.8, 0.4, 0.35}: P = 2/3, R = 1 -> F1 = 0.8.
    f1, thr = M.f1_max([0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8) and thr == 0.35
    f1, thr = M.f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert f1 == 1.0 and thr == 0.7


def test_image_level_report() -> None:
    rep = M.image_level_report([0, 1, 1, 0], [0.1, 0.4, 0.35, 0.8])
    assert rep["image_auroc"] == pytest.approx(0.5)
    assert rep["ap"] == pytest.approx(0.25 + 1 / 3)
    assert rep["f1_max"] == pytest.approx(0.8) and rep["f1_threshold"] == 0.35
    assert (rep["n_images"], rep["n_anomalous"], rep["n_normal"]) == (4, 2, 2)


# --------------------------------------------------------------------------- pixels


def _pixel_case(n: int = 16, size: int = 256, seed: int = 0):
    """~1M pixels: gamma noise, rectangular anomalies raised by 1, a circular FOV."""
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 1.0, (n, size, size)).astype(np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    for i in range(0, n, 2):
        y, x = rng.integers(0, size - 60, 2)
        masks[i, y:y + 50, x:x + 60] = True
    maps[masks] += 1.0
    yy, xx = np.mgrid[:size, :size]
    fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    maps[:, ~fov] = 100.0  # outside the FOV: must be ignored
    return maps, masks, np.broadcast_to(fov, maps.shape)


def test_pixel_auroc_exact_and_histogram() -> None:
    maps, masks, valid = _pixel_case()
    sel = valid.ravel()
    ref = M.auroc(masks.ravel()[sel], maps.ravel()[sel])
    assert M.pixel_auroc(maps, masks, valid) == pytest.approx(ref, abs=1e-12)
    assert abs(M.pixel_auroc(maps, masks, valid, bins=65536) - ref) < 1e-3
    assert abs(M.pixel_auroc(maps, masks, valid, bins=16384) - ref) < 1e-3
    # A single H x W field of view broadcasts over all maps.
    assert M.pixel_auroc(maps, masks, valid[0]) == pytest.approx(ref, abs=1e-12)
    # Without `valid`, the 100.0 border counts as normal pixels and lowers the AUROC.
    assert M.pixel_auroc(maps, masks) < ref - 0.05


def test_pixel_auroc_tiny_brute_force_with_ties() -> None:
    rng = np.random.default_rng(3)
    maps = rng.integers(0, 5, (3, 8, 8)).astype(np.float32)
    masks = rng.random((3, 8, 8)) < 0.3
    assert M.pixel_auroc(maps, masks) == pytest.approx(brute_auroc(masks.ravel(), maps.ravel()))


def test_pixel_roc_curve_area_close_to_exact() -> None:
    maps, masks, valid = _pixel_case(n=4)
    fpr, tpr, _ = M.pixel_roc_curve(maps, masks, valid, bins=4096)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.pixel_auroc(maps, masks, valid), abs=2e-3)
    assert np.all(np.diff(fpr) >= 0) and fpr[-1] == pytest.approx(1.0)


def test_pixel_auroc_errors() -> None:
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="no anomalous pixels"):
        M.pixel_auroc(maps, np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="differ in shape"):
        M.pixel_auroc(maps, np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="does not fit"):
        M.pixel_auroc(maps, np.ones((2, 4, 4), bool), valid=np.ones((3, 3), bool))


# --------------------------------------------------------------------------- plots


def _read_rgb(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable PNG"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _coloured_fraction(img: np.ndarray) -> float:
    """Share of clearly non-grey pixels."""
    spread = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
    return float((spread > 60).mean())


def test_plot_roc_curves(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    curves = {}
    for name, sep in [("teacher", 2.0), ("WLI student", 1.0), ("NBI student", 0.3)]:
        s = rng.normal(size=200) + sep * y
        fpr, tpr, _ = M.roc_curve(y, s)
        curves[name] = (fpr, tpr, M.auroc(y, s))
    out = P.plot_roc_curves(tmp_path / "sub" / "roc.png", curves, "Image ROC")
    img = _read_rgb(out)
    assert img.shape == (560, 640, 3)
    assert img.std() > 10 and _coloured_fraction(img) > 0.005
    # every curve colour appears
    for colour in P.PALETTE[:3]:
        assert (np.abs(img.astype(int) - colour).sum(axis=2) < 30).sum() > 50


def test_plot_line_chart(tmp_path) -> None:
    t = np.linspace(0, 10, 500)
    s = np.sin(t)
    s[100:110] = np.nan  # a gap must not break drawing
    out = P.plot_line_chart(tmp_path / "line.png", {"score": (t, s), "ema": (t, 0.5 * s)},
                            "Timeline", "time (s)", "score", hlines={"threshold": 0.7})
    img = _read_rgb(out)
    assert img.shape == (420, 800, 3)
    assert img.std() > 10 and _coloured_fraction(img) > 0.005
    # flat series and empty hlines are fine too
    P.plot_line_chart(tmp_path / "flat.png", {"c": ([0, 1], [2, 2])}, "flat", "x", "y")
    assert _read_rgb(tmp_path / "flat.png").std() > 5


def test_heatmap_overlay_and_grid(tmp_path) -> None:
    rgb = np.full((100, 120, 3), 128, np.uint8)
    amap = np.zeros((25, 30), np.float32)
    amap[10:15, 10:20] = 1.0
    mask = np.zeros((100, 120), bool)
    mask[30:70, 40:80] = True
    ov = P.heatmap_overlay(rgb, amap, 0.0, 1.0, alpha=0.5, mask_contour=mask)
    assert ov.shape == rgb.shape and ov.dtype == np.uint8
    green = (ov[..., 1] > 200) & (ov[..., 0] < 100) & (ov[..., 2] < 100)
    assert green[30:70, 40:80].sum() > 50 and not green[:20].any()
    assert ov[50, 60, 0] > ov[0, 0, 0]  # hot centre is redder than the cold corner
    out = P.image_grid(tmp_path / "grid.png", [[rgb, ov], [rgb[..., 0], None]],
                       ["row one", "row two"], ["image", "overlay"], cell=96)
    img = _read_rgb(out)
    assert img.shape[0] > 2 * 96 and img.shape[1] > 2 * 96
    assert img.std() > 10 and _coloured_fraction(img) > 0.01
