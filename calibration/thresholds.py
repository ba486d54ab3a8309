"""Alert thresholds from normal video: the false-alert rate the live logic would have had.

For each modality and each candidate debouncing (N of M frames), the normal frames that
branch scored are replayed through the live alert state machine (``calibration.debounce``)
at candidate thresholds. Every alert on normal video is a false alert, so this gives the
false-alert rate as a function of the threshold, exactly as the monitor would have raised
them. The threshold is then:

1. **rate threshold** — coming down from the highest normal score, the lowest threshold
   before the rate on the calibration video first exceeds the target (further down, frames
   above it merge into a few endless events and the count falls again: never go there);
2. **bulk floor** — never below the 99th percentile of that branch's normal frame scores, so
   a debouncing that filters out almost everything can never put the threshold inside the
   bulk of normal scores (anomalib #2433 / #3357: normal-only calibration that flags all);
3. **safety margin** — plus ``margin`` robust standard deviations of the normal frame scores
   (σ = 1.4826 × median absolute deviation). The calibration video is one sample of normal
   examinations; another examination's scores sit somewhat higher or lower, and the margin
   is what keeps its rate under the target. It is reported, so a site can see what it costs.

Among the debouncing candidates whose delay ((N − 1) frames) fits ``max_debounce_ms``, the one
with the lowest thresholds (in σ above the median, summed over modalities) wins, ties going
to the shorter delay: debouncing is what lets a threshold sit lower, so it buys sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration.debounce import count_events

DEBOUNCE_CANDIDATES: tuple[tuple[int, int], ...] = ((1, 1), (2, 3), (3, 5), (4, 6))
BULK_QUANTILE = 99.0


@dataclass
class CalibrationOptions:
    target_false_alerts_per_hour: float = 6.0  # one per 10 minutes
    margin_sigma: float = 1.0
    hold_ms: float = 500.0
    max_debounce_ms: float = 120.0
    debounce: tuple[tuple[int, int], ...] = DEBOUNCE_CANDIDATES
    min_minutes_factor: float = 0.5  # per modality: at least this many "alert allowances" of video


@dataclass
class NormalScores:
    """The normal frames one modality's branch scored, possibly from several videos."""

    t_ms: np.ndarray  # source time, per video
    score: np.ndarray
    segment: np.ndarray  # changes at each new video or modality run: the machine restarts there
    fps: float

    @property
    def minutes(self) -> float:
        return len(self.score) / self.fps / 60 if self.fps else 0.0


@dataclass
class ModalityCalibration:
    modality: str
    threshold: float
    n_of_m: tuple[int, int]
    rate_threshold: float
    bulk_floor: float
    margin: float
    sigma: float
    median: float
    frames: int
    minutes: float
    false_alerts_at_threshold: int
    false_alerts_per_hour_at_threshold: float
    curve: dict[str, list[float]] = field(default_factory=dict)  # threshold → false alerts per hour

    def to_json(self) -> dict[str, Any]:
        # threshold = max(rate_threshold, bulk_floor) + margin is kept at full precision: rounding
        # each of the four on its own could put the stored threshold below the stored floor + margin
        r = lambda v: round(float(v), 6)  # noqa: E731
        return {"threshold": float(self.threshold), "n_of_m": list(self.n_of_m),
                "rate_threshold": float(self.rate_threshold), "bulk_floor": float(self.bulk_floor),
                "bulk_quantile": BULK_QUANTILE, "margin": float(self.margin), "sigma": r(self.sigma),
                "median": r(self.median), "normal_frames": self.frames, "normal_minutes": round(self.minutes, 3),
                "false_alerts_on_data": self.false_alerts_at_threshold,
                "false_alerts_per_hour_on_data": round(self.false_alerts_per_hour_at_threshold, 3)}


def robust_sigma(x: np.ndarray) -> float:
    med = float(np.median(x))
    return float(1.4826 * np.median(np.abs(x - med))) or float(np.std(x)) or 1e-6


def min_minutes(opts: CalibrationOptions) -> float:
    """Normal video needed per modality: the time in which the target allows ``min_minutes_factor`` alerts."""
    return 60.0 * opts.min_minutes_factor / opts.target_false_alerts_per_hour


def _rate(data: NormalScores, thr: float, n: int, m: int, hold_ms: float) -> int:
    above = data.score > thr
    if not above.any():
        return 0
    modality = np.zeros(len(above), "<U1")  # one branch: only the segment restarts matter
    return len(count_events(data.t_ms, modality, above, n, m, hold_ms, data.segment))


def rate_threshold(data: NormalScores, n: int, m: int, opts: CalibrationOptions) -> tuple[float, int]:
    """Lowest threshold whose false-alert count fits the target, and fits at every higher one.

    Searched from the top: far down in the bulk, above-threshold frames merge into a few
    endless events and the count falls again, so "fits the target" alone would pick a
    threshold that flags everything. Galloping down from the highest score finds the first
    candidate that breaks the target; a binary search between it and the last good one then
    finds the boundary.
    """
    allowed = opts.target_false_alerts_per_hour * data.minutes / 60
    cand = np.unique(data.score)[::-1]  # descending; the above-sets change only at these values
    fits = lambda i: _rate(data, float(cand[i]), n, m, opts.hold_ms) <= allowed  # noqa: E731
    good, step = 0, 1  # cand[0] = the highest score: nothing is above it
    bad = None
    while good + step < len(cand):
        if fits(good + step):
            good += step
            step *= 2
        else:
            bad = good + step
            break
    if bad is None:  # never broke the target: even the lowest score fits (tiny or constant data)
        good = len(cand) - 1
    else:
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
    return float(cand[good]), _rate(data, float(cand[good]), n, m, opts.hold_ms)


def rate_curve(data: NormalScores, n: int, m: int, opts: CalibrationOptions, lo: float, hi: float,
               points: int = 60) -> dict[str, list[float]]:
    grid = np.linspace(lo, hi, points)
    hours = max(data.minutes / 60, 1e-9)
    return {"threshold": [round(float(t), 6) for t in grid],
            "false_alerts_per_hour": [round(_rate(data, float(t), n, m, opts.hold_ms) / hours, 3) for t in grid]}


def calibrate_modality(modality: str, data: NormalScores, n: int, m: int,
                       opts: CalibrationOptions) -> ModalityCalibration:
    med, sigma = float(np.median(data.score)), robust_sigma(data.score)
    rate_thr, _ = rate_threshold(data, n, m, opts)
    floor = float(np.percentile(data.score, BULK_QUANTILE))
    margin = opts.margin_sigma * sigma
    thr = max(rate_thr, floor) + margin
    count = _rate(data, thr, n, m, opts.hold_ms)
    return ModalityCalibration(modality, thr, (n, m), rate_thr, floor, margin, sigma, med, len(data.score),
                               data.minutes, count, count / max(data.minutes / 60, 1e-9))


def choose(per_modality: dict[str, NormalScores], opts: CalibrationOptions,
           fps: float) -> tuple[dict[str, ModalityCalibration], list[dict[str, Any]]]:
    """The debouncing and thresholds for every modality; also the table of all candidates."""
    table = []
    best: tuple[float, int, dict[str, ModalityCalibration]] | None = None
    for n, m in opts.debounce:
        delay_ms = (n - 1) * 1000 / fps
        if delay_ms > opts.max_debounce_ms:
            table.append({"n_of_m": [n, m], "delay_ms": round(delay_ms, 1), "skipped": "delay above max_debounce_ms"})
            continue
        cals = {mod: calibrate_modality(mod, d, n, m, opts) for mod, d in per_modality.items()}
        cost = sum((c.threshold - c.median) / c.sigma for c in cals.values())
        table.append({"n_of_m": [n, m], "delay_ms": round(delay_ms, 1), "cost_sigma": round(cost, 3),
                      "thresholds": {mod: round(c.threshold, 6) for mod, c in cals.items()}})
        if best is None or cost < best[0] - 1e-9:
            best = (cost, n, cals)
    if best is None:
        raise ValueError("no debouncing candidate fits max_debounce_ms")
    chosen = best[2]
    for mod, c in chosen.items():
        d = per_modality[mod]
        lo = float(np.percentile(d.score, 50))
        hi = max(float(d.score.max()), c.threshold) * 1.02
        c.curve = rate_curve(d, *c.n_of_m, opts, lo, hi)
    return chosen, table


def suspect_stretches(t_ms: np.ndarray, score: np.ndarray, median: float, sigma: float, fps: float,
                      z: float = 6.0, min_ms: float = 300.0) -> list[tuple[int, int, float]]:
    """Runs of frames far above the normal bulk (≥ ``z`` σ for ≥ ``min_ms``): possible lesions.

    Returns (first index, last index, peak score) per run.
    """
    hot = score > median + z * sigma
    out = []
    padded = np.concatenate([[False], hot, [False]])
    d = np.diff(padded.astype(np.int8))
    for a, b in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1):
        if (b - a + 1) * 1000 / fps >= min_ms:
            out.append((int(a), int(b), float(score[a: b + 1].max())))
    return out
