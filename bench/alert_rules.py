"""What alert rule could do with a bundle's scores: calibrated, best possible, and relative to a baseline.

    python -m bench.alert_rules --bundle B --normal N1.mp4 … --videos V1.mp4 … [--json OUT] [--cache DIR]

Every frame of the normal (calibration) and evaluation videos is scored once with the
monitor's own replay (``realtime.offline.replay.Replayer``, kept in the score cache ``cemd calibrate``
uses, ``--cache``, default runs/score-cache);
the rules below then run on those scores through the live alert state machine
(``calibration.debounce.Debouncer``) and are scored with ``calibration.events.event_metrics``,
as ``cemd evaluate-video`` does. Videos without a ``NAME.events.json`` beside them count as
lesion-free. Rows:

* **calibrated** — the bundle's calibration as installed (what the monitor does);
* **best absolute threshold (chosen on the evaluation videos)** — the most lesion events any
  single per-branch threshold pair and debouncing catches for each number of false alerts,
  the thresholds picked *with* the ground truth: an upper bound for every threshold rule on
  these scores, not a result a site could reproduce;
* **relative to the running baseline** — a frame is also *above* when its score exceeds the
  branch's recent level (a low quantile of that branch's previous frames, ``--baseline-frames``
  long, the last ``--baseline-gap`` left out) by a lift calibrated on the normal videos exactly
  as ``cemd calibrate`` calibrates thresholds (false-alert rate search, bulk floor, 1 σ margin);
* **score smoothing** — the best-absolute-threshold bound again, on the mean of the branch's
  last ``k`` scores.

Numbers from synthetic videos are labelled SYNTHETIC by the caller (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.calibrated_eval import pool
from bench.provenance import provenance
from calibration.debounce import Debouncer
from calibration.events import event_metrics
from calibration.run import gather
from calibration.thresholds import DEBOUNCE_CANDIDATES, CalibrationOptions, NormalScores, calibrate_modality

MODS = ("wli", "nbi")


class Track:
    def __init__(self, name: str, t_ms: np.ndarray, modality: np.ndarray, score: np.ndarray, fps: float,
                 events: dict[str, Any] | None) -> None:
        self.name, self.t_ms, self.modality, self.score, self.fps = name, t_ms, modality, score, fps
        self.events = events or {"lesions": [], "modality": []}


def score_videos(bundle_path: Path, videos: list[Path], cache: Path, workers: int) -> list[Track]:
    """Every frame scored by the monitor's replay, kept in the same score cache as `cemd calibrate`."""
    from engine.deploy.bundle import load_bundle
    from realtime.offline.replay import Replayer

    rep = Replayer(load_bundle(bundle_path), "auto", "auto", "cpu")
    out = []
    for i, v in enumerate(videos, 1):
        print(f"[{i}/{len(videos)}] {v} …", file=sys.stderr, flush=True)
        tr = rep.replay(v, workers=workers, cache=cache)
        ev_file = v.with_name(v.stem + ".events.json")
        events = json.loads(ev_file.read_text()) if ev_file.exists() else None
        out.append(Track(v.stem, tr.t_ms, tr.modality, tr.score.astype(np.float64), tr.fps, events))
    return out


def baseline(track: Track, frames: int, gap: int, q: float) -> np.ndarray:
    """Causal per-branch baseline: the q-th percentile of that branch's previous ``frames`` scores
    (the last ``gap`` left out); NaN until half a window has been seen."""
    hist: dict[str, list[float]] = {m: [] for m in MODS}
    out = np.full(len(track.score), np.nan)
    for i, (m, s) in enumerate(zip(track.modality, track.score)):
        h = hist[str(m)]
        if len(h) >= gap + frames // 2:
            out[i] = np.percentile(h[max(0, len(h) - gap - frames): len(h) - gap], q)
        h.append(float(s))
    return out


def smoothed(track: Track, k: int) -> np.ndarray:
    """Mean of the branch's last ``k`` scores (restarting at each switch)."""
    out = track.score.copy()
    run_start = 0
    for i in range(len(out)):
        if i and track.modality[i] != track.modality[i - 1]:
            run_start = i
        out[i] = track.score[max(run_start, i - k + 1): i + 1].mean()
    return out


def alert_messages(track: Track, above: np.ndarray, n: int, m: int, hold_ms: float) -> list[dict[str, Any]]:
    """The start/end messages the live state machine raises for these above-threshold flags."""
    deb = Debouncer(n, m, hold_ms)
    msgs: list[dict[str, Any]] = []
    open_id, last, eid = None, 0, 0
    for i in range(len(above)):
        step = deb.step(int(track.t_ms[i] * 1e6), str(track.modality[i]), bool(above[i]))
        if step.ended and open_id is not None:
            msgs.append({"event": "end", "event_id": open_id, "frame_id": i, "end_frame_id": last, "peak_score": 0.0})
            open_id = None
        if step.opened:
            eid += 1
            open_id = eid
            msgs.append({"event": "start", "event_id": eid, "frame_id": i, "modality": str(track.modality[i]),
                         "peak_score": 0.0})
        if step.counts:
            last = i
    if open_id is not None:
        msgs.append({"event": "end", "event_id": open_id, "frame_id": len(above) - 1, "end_frame_id": last,
                     "peak_score": 0.0})
    return msgs


def pooled(tracks: list[Track], above: list[np.ndarray], n: int, m: int, hold_ms: float,
           scores: list[np.ndarray] | None = None) -> dict[str, Any]:
    """``evaluate-video``'s metrics per track for these above-threshold flags, pooled over the tracks."""
    return pool([event_metrics(tr.t_ms, tr.modality, tr.score if scores is None else scores[k],
                               alert_messages(tr, ab, n, m, hold_ms), tr.events, tr.fps)
                 for k, (tr, ab) in enumerate(zip(tracks, above))])


def above_abs(tr: Track, thr: dict[str, float], score: np.ndarray | None = None) -> np.ndarray:
    s = tr.score if score is None else score
    return s > np.array([thr[str(m)] for m in tr.modality])


def best_absolute(tracks: list[Track], n_of_m: list[tuple[int, int]], hold_ms: float, max_false: int,
                  scores: list[np.ndarray] | None = None, steps: int = 14) -> list[dict[str, Any]]:
    """For each false-alert count up to ``max_false``: the most lesion events caught (ties: faster)."""
    allv = np.concatenate([t.score if scores is None else scores[k] for k, t in enumerate(tracks)])
    grid = np.linspace(*np.percentile(allv, [90, 99.9]), steps)
    best: dict[int, dict[str, Any]] = {}
    for n, m in n_of_m:
        for tw in grid:
            for tn in grid:
                thr = {"wli": float(tw), "nbi": float(tn)}
                r = pooled(tracks, [above_abs(t, thr, None if scores is None else scores[k])
                                    for k, t in enumerate(tracks)], n, m, hold_ms, scores)
                fa = r["false_alerts"]
                if fa > max_false:
                    continue
                key = (r["detected"], -(r["median_time_to_first_alert_ms"] or 1e9))
                cur = best.get(fa)
                if cur is None or key > (cur["detected"], -(cur["median_time_to_first_alert_ms"] or 1e9)):
                    best[fa] = {**r, "n_of_m": [n, m], "thresholds": {k: round(v, 4) for k, v in thr.items()}}
    # a rule allowed f false alerts may also use any rule with fewer
    rows, running = [], None
    for fa in range(max_false + 1):
        if fa in best and (running is None or best[fa]["detected"] > running["detected"]):
            running = best[fa]
        if running is not None:
            rows.append({"false_alerts_allowed": fa, **running})
    return rows


def relative_rule(normal: list[Track], tracks: list[Track], calibrated: dict[str, float], n: int, m: int,
                  frames: int, gap: int, q: float, hold_ms: float) -> dict[str, Any]:
    opts = CalibrationOptions(hold_ms=hold_ms)

    class Rel:  # a ScoreTrack-like view of the lift over the baseline (frames without one dropped)
        def __init__(self, tr: Track) -> None:
            b = baseline(tr, frames, gap, q)
            ok = ~np.isnan(b)
            self.t_ms, self.modality, self.score, self.fps = tr.t_ms[ok], tr.modality[ok], (tr.score - b)[ok], tr.fps

    data: dict[str, NormalScores] = gather([Rel(t) for t in normal], list(MODS))
    lift = {mod: calibrate_modality(mod, d, n, m, opts).threshold for mod, d in data.items()}
    above = []
    for tr in tracks:
        b = baseline(tr, frames, gap, q)
        rel = np.where(np.isnan(b), -np.inf, tr.score - b)
        above.append(above_abs(tr, calibrated) | (rel > np.array([lift[str(x)] for x in tr.modality])))
    return {**pooled(tracks, above, n, m, hold_ms), "n_of_m": [n, m],
            "lift_thresholds": {k: round(v, 4) for k, v in lift.items()},
            "baseline": {"frames": frames, "gap": gap, "quantile": q}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.alert_rules", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("models/demo"))
    p.add_argument("--normal", type=Path, nargs="+", required=True, help="lesion-free calibration videos")
    p.add_argument("--videos", type=Path, nargs="+", required=True, help="evaluation videos (NAME.events.json beside)")
    p.add_argument("--cache", type=Path, default=Path("runs/score-cache"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-false", type=int, default=3, help="best-threshold rows up to this many false alerts")
    p.add_argument("--baseline-frames", type=int, default=90)
    p.add_argument("--baseline-gap", type=int, default=10)
    p.add_argument("--baseline-quantile", type=float, default=25.0)
    p.add_argument("--smooth", type=int, nargs="*", default=[3, 5])
    p.add_argument("--json", type=Path, default=Path("runs/alert_rules.json"))
    a = p.parse_args(argv)
    from engine.deploy.bundle import load_bundle
    from realtime.scoring.alerts import DEFAULT_N_OF_M, Thresholds

    normal = score_videos(a.bundle, a.normal, a.cache, a.workers)
    tracks = score_videos(a.bundle, a.videos, a.cache, a.workers)
    th = Thresholds.for_bundle(load_bundle(a.bundle))
    n, m = th.n_of_m or DEFAULT_N_OF_M
    hold = float((load_bundle(a.bundle).calibration or {}).get("hold_ms", 500.0))
    out: dict[str, Any] = {"provenance": provenance(), "bundle": str(a.bundle), "normal": [str(v) for v in a.normal],
                           "videos": [str(v) for v in a.videos], "hold_ms": hold}
    out["calibrated"] = {**pooled(tracks, [above_abs(t, th.values) for t in tracks], n, m, hold),
                         "n_of_m": [n, m], "thresholds": th.values, "source": th.source}
    print("calibrated:", out["calibrated"], flush=True)
    cands = [c for c in DEBOUNCE_CANDIDATES if (c[0] - 1) * 1000 / 30 <= 120]
    out["best_absolute"] = best_absolute(tracks, cands, hold, a.max_false)
    for row in out["best_absolute"]:
        print("best absolute:", row, flush=True)
    out["relative"] = [relative_rule(normal, tracks, th.values, nn, mm, a.baseline_frames, a.baseline_gap,
                                     a.baseline_quantile, hold) for nn, mm in cands]
    for row in out["relative"]:
        print("relative:", row, flush=True)
    out["smoothed"] = {}
    for k in a.smooth:
        sm = [smoothed(t, k) for t in tracks]
        out["smoothed"][str(k)] = best_absolute(tracks, cands, hold, a.max_false, sm)
        for row in out["smoothed"][str(k)]:
            print(f"smoothed {k}:", row, flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
