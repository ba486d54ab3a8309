"""Detection metrics for anomaly scores (numpy only).

Conventions: label 1 = anomalous (positive), 0 = normal; a higher score means more
anomalous; an item is predicted anomalous when ``score >= threshold``.

Image-level metrics are exact and tie-aware. ``pixel_auroc`` is exact by default
(sorting the normal-pixel scores and counting, for every anomalous pixel, the normal
pixels below and equal to it; ~0.4 s for 26 M pixels); a histogram approximation is
available through ``bins=``. ``pixel_roc_curve`` (for plots) is histogram-based.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "roc_curve",
    "auroc",
    "pr_curve",
    "average_precision",
    "f1_max",
    "pixel_auroc",
    "pixel_roc_curve",
    "image_level_report",
]


# --------------------------------------------------------------------------- helpers


def _check(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten (labels, scores); return (bool labels, float64 scores)."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} labels, {s.size} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous); found {bad.tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} NaN or infinite values")
    y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"metric undefined: all {y.size} items are {only}; "
            "a ranking metric needs both normal (0) and anomalous (1) items"
        )
    return y, s


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, highest threshold first.

    ``tp[i]``/``fp[i]`` count items with ``score >= thresholds[i]``.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # Last index of each run of equal scores: predictions change only between runs.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    return tp.astype(np.int64), fp.astype(np.int64), s_sorted[last]


# --------------------------------------------------------------------- image level


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score, starting at (0, 0) with threshold +inf."""
    y, s = _check(labels, scores)
    tp, fp, thr = _cumulative_counts(y, s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(labels: Any, scores: Any) -> float:
    """Exact area under the ROC curve = Mann-Whitney U / (n_pos * n_neg).

    Ties between a positive and a negative count 1/2, via average ranks.
    """
    y, s = _check(labels, scores)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Average (1-based) rank of each run of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], s_sorted.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    n_pos = float(y.sum())
    n_neg = float(y.size) - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pr_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score, highest threshold first.

    Unlike scikit-learn no artificial (recall 0, precision 1) point is appended:
    ``precision[i]``, ``recall[i]`` are exactly those of ``score >= thresholds[i]``.
    """
    y, s = _check(labels, scores)
    tp, fp, thr = _cumulative_counts(y, s)
    precision = tp / (tp + fp)
    recall = tp / int(y.sum())
    return precision, recall, thr


def average_precision(labels: Any, scores: Any) -> float:
    """AP = sum over thresholds of (R_n - R_{n-1}) * P_n (step-wise, no interpolation).

    Same definition as scikit-learn's ``average_precision_score``.
    """
    precision, recall, _ = pr_curve(labels, scores)
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds, and the (lowest score) threshold reaching it."""
    precision, recall, thr = pr_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


def image_level_report(labels: Any, scores: Any) -> dict[str, float | int]:
    """The image-level numbers printed after an evaluation."""
    y, s = _check(labels, scores)
    f1, thr = f1_max(y, s)
    return {
        "image_auroc": auroc(y, s),
        "ap": average_precision(y, s),
        "f1_max": f1,
        "f1_threshold": thr,
        "n_images": int(y.size),
        "n_anomalous": int(y.sum()),
        "n_normal": int((~y).sum()),
    }


# --------------------------------------------------------------------- pixel level


def _pixel_scores(
    maps: Any, masks: Any, valid: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check shapes; return maps (float, unchanged if already float), masks, valid."""
    m = np.asarray(maps)
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    gt = np.asarray(masks).astype(bool, copy=False)
    if m.shape != gt.shape:
        raise ValueError(f"anomaly maps {m.shape} and masks {gt.shape} differ in shape")
    v = None
    if valid is not None:
        v = np.asarray(valid).astype(bool, copy=False)
        try:  # one field-of-view mask (H x W) may serve every map
            v = np.broadcast_to(v, m.shape)
        except ValueError:
            raise ValueError(f"valid {v.shape} does not fit anomaly maps {m.shape}") from None
    return m, gt, v


def _split_pos_neg(
    m: np.ndarray, gt: np.ndarray, v: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of anomalous and normal (valid) pixels, as 1-D copies."""
    pos_sel = gt if v is None else gt & v
    neg_sel = ~gt if v is None else ~gt & v
    pos, neg = m[pos_sel], m[neg_sel]
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("anomaly maps hold NaN or infinite values inside the evaluated pixels")
    if pos.size == 0 or neg.size == 0:
        what = "anomalous" if pos.size == 0 else "normal"
        raise ValueError(f"pixel AUROC undefined: no {what} pixels among the evaluated pixels")
    return pos, neg


def _exact_pixel_auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Count, for every positive, the negatives strictly below and equal (ties = 1/2).

    Negatives are sorted once; each distinct positive value is located by binary search
    and weighted by how often it occurs (fast when maps are quantised, e.g. fp16).
    """
    neg.sort()  # in place: both are private copies made by _split_pos_neg
    pos.sort()
    first = np.r_[True, pos[1:] != pos[:-1]]
    values = pos[first]
    weight = np.diff(np.r_[np.flatnonzero(first), pos.size]).astype(np.float64)
    below = np.searchsorted(neg, values, side="left")
    upto = np.searchsorted(neg, values, side="right")
    u = weight @ below.astype(np.float64) + 0.5 * (weight @ (upto - below).astype(np.float64))
    return float(u / (float(pos.size) * float(neg.size)))


def _histograms(
    pos: np.ndarray, neg: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of positives/negatives in ``bins`` equal-width bins between the global min/max."""
    lo = float(min(pos.min(), neg.min()))
    hi = float(max(pos.max(), neg.max()))
    width = (hi - lo) / bins if hi > lo else 1.0
    edges = lo + width * np.arange(bins + 1)

    def count(x: np.ndarray) -> np.ndarray:
        idx = ((x.astype(np.float64) - lo) / width).astype(np.int64)
        np.clip(idx, 0, bins - 1, out=idx)
        return np.bincount(idx, minlength=bins)

    return count(pos), count(neg), edges


def _hist_pixel_auroc(pos: np.ndarray, neg: np.ndarray, bins: int) -> float:
    """AUROC from histograms; pairs sharing a bin count 1/2 (error <= that pair share)."""
    hp, hn, _ = _histograms(pos, neg, bins)
    neg_below = np.cumsum(hn) - hn
    u = np.sum(hp * (neg_below + 0.5 * hn), dtype=np.float64)
    return float(u / (float(pos.size) * float(neg.size)))


def pixel_auroc(
    maps: Any,
    masks: Any,
    valid: Any | None = None,
    bins: int | None = None,
) -> float:
    """Pixel-level AUROC over all maps (N x H x W), counting only ``valid`` pixels.

    ``valid`` may be N x H x W or one H x W field-of-view mask shared by every map.

    ``bins=None`` (default) is exact and tie-aware: normal-pixel scores are sorted and
    each distinct anomalous-pixel score is located by binary search. Measured on 2 CPU
    cores, 400 x 256 x 256 float32 maps (26 M pixels, circular FOV, ~2 % anomalous):
    ~0.4 s and ~5 bytes per pixel of extra memory (136 MB). Its cost grows with the
    number of anomalous pixels: ~2.5-3 s when half of the 26 M pixels are anomalous.

    ``bins=k`` uses k equal-width bins between the global min and max instead (no sort);
    pairs sharing a bin count 1/2, so the error is at most half the share of (anomalous,
    normal) pairs in a common bin: < 1e-5 with 16-65k bins on ordinary maps, but it grows
    if one extreme outlier stretches the range. Values are compared at the maps' own
    float precision (integer maps are converted to float64).
    """
    m, gt, v = _pixel_scores(maps, masks, valid)
    pos, neg = _split_pos_neg(m, gt, v)
    if bins is None:
        return _exact_pixel_auroc(pos, neg)
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2 (or None for the exact computation), got {bins}")
    return _hist_pixel_auroc(pos, neg, int(bins))


def pixel_roc_curve(
    maps: Any,
    masks: Any,
    valid: Any | None = None,
    bins: int = 4096,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ROC curve sampled at ``bins`` equal-width thresholds (for plots).

    Returns (fpr, tpr, thresholds), highest threshold first, from (0, 0) to (1, 1).
    """
    if int(bins) < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    m, gt, v = _pixel_scores(maps, masks, valid)
    pos, neg = _split_pos_neg(m, gt, v)
    hp, hn, edges = _histograms(pos, neg, int(bins))
    # Predicted anomalous = score in this bin or above: reverse cumulative sums.
    tp = np.cumsum(hp[::-1])
    fp = np.cumsum(hn[::-1])
    fpr = np.r_[0.0, fp / neg.size]
    tpr = np.r_[0.0, tp / pos.size]
    return fpr, tpr, np.r_[np.inf, edges[:-1][::-1]]
