"""``cemd calibrate``: normal video in, per-modality thresholds and debouncing out.

The scoring itself is handed in (``replayer``: the monitor's own units, ``realtime.offline.replay``),
so this package stays below ``realtime`` (docs/DESIGN: calibration may import engine only).

Output:

* ``BUNDLE/calibration.json`` — what the monitor reads: per modality ``threshold`` and the
  chosen ``n_of_m``, plus how they were found, the target, the data (paths, SHA-256, frames)
  and the model files' hashes it was made for. Each run bumps ``version``; the previous file
  is kept as ``BUNDLE/calibration-history/calibration.vN.json``.
* a report folder: ``report.json`` (everything above plus the candidate table, warnings and
  the false-alert curves), ``histograms.png`` and ``false_alerts.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from calibration.thresholds import (
    CalibrationOptions,
    NormalScores,
    choose,
    min_minutes,
    suspect_stretches,
)
from engine import __version__
from engine.constants import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from engine.deploy.bundle import atomic_write_json
from engine.errors import CemdError

CALIBRATION_FORMAT = "cemd-calibration/1"
Log = Callable[[str], None]


class Replayer(Protocol):
    modality: str

    @property
    def backends(self) -> dict[str, str]: ...

    def replay(self, path: Path, alerts: Any = None, image_fps: float = 30.0,
               progress: Callable[[int, int | None], None] | None = None, workers: int = 1,
               cache: Path | None = None) -> Any: ...

    def check_modality(self, track: Any) -> str | None: ...


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Videos and frame folders; a folder holding videos (and no images) stands for its videos."""

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CemdError(f"normal data {p} does not exist; give video files or folders of frames")
        if p.is_dir():
            images = [f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
            videos = sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
            if images:
                out.append(p)
            elif videos:
                out.extend(videos)
            else:
                raise CemdError(f"folder {p} holds neither images nor videos ({', '.join(VIDEO_SUFFIXES)})")
        else:
            out.append(p)
    if len(set(out)) != len(out):
        raise CemdError("the same normal data was given twice; it would count its false alerts twice")
    return out


def probe_video(path: Path) -> tuple[int, float, int, int]:
    """(frame count or 0 when the container does not say, fps, width, height), without decoding."""
    import av

    if not path.is_file():
        raise CemdError(f"video {path} does not exist")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise CemdError(f"{path} has no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate
            return int(s.frames or 0), float(rate or 0), s.codec_context.width, s.codec_context.height
    except av.error.FFmpegError as exc:
        raise CemdError(f"{path} is not a readable video file ({exc})") from None


def probe_minutes(inputs: list[Path], image_fps: float) -> float | None:
    """Total length of the inputs from their headers (None when a container does not say)."""

    total = 0.0
    for p in inputs:
        if p.is_dir():
            total += sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) / image_fps / 60
            continue
        frames, fps, _, _ = probe_video(p)
        if not frames or not fps:
            return None
        total += frames / fps / 60
    return total


def _sibling_synthetic(path: Path) -> bool:
    """True when the events file beside a video (cemd synth-video writes one) says it is synthetic."""
    sib = path.with_name(path.stem + ".events.json")
    try:
        return bool(json.loads(sib.read_text()).get("synthetic"))
    except (OSError, ValueError, AttributeError):
        return False


def _clock(ms: float) -> str:
    s = ms / 1000
    return f"{int(s // 60):02d}:{s % 60:04.1f}"


def gather(tracks: list[Any], modalities: list[str]) -> dict[str, NormalScores]:
    """Per modality, the normal frames its branch scored, with a restart at each video and switch."""
    out = {}
    fps = float(np.median([t.fps for t in tracks]))
    for m in modalities:
        t_ms, score, seg = [], [], []
        next_seg = 0
        for tr in tracks:
            sel = tr.modality == m
            if not sel.any():
                continue
            # a new segment wherever this branch's run is interrupted (switch away and back)
            starts = np.diff(np.concatenate([[0], sel.astype(np.int8)])) == 1
            run_id = np.cumsum(starts)[sel] + next_seg
            next_seg = int(run_id.max()) + 1
            t_ms.append(tr.t_ms[sel])
            score.append(tr.score[sel])
            seg.append(run_id)
        if score:
            out[m] = NormalScores(np.concatenate(t_ms), np.concatenate(score).astype(np.float64),
                                  np.concatenate(seg), fps)
    return out


def _check_amount(data: dict[str, NormalScores], modalities: list[str], opts: CalibrationOptions,
                  total: float | None = None, kept_in: Path | None = None) -> None:
    """Enough normal video per branch to check the target; ``total``: before scoring, from headers;
    ``kept_in``: the score cache that holds the scores already computed."""
    need = min_minutes(opts)
    if total is not None:
        short = [("all branches together", total)]
        lines = [f"the normal data is {total:.1f} min long"]
    else:
        short = [(m, data[m].minutes if m in data else 0.0) for m in modalities]
        short = [(m, have) for m, have in short if have < need]
        lines = [f"{m.upper()} has {have:.1f} min" for m, have in short]
    if not short:
        return
    worst = min(have for _, have in short) / (len(modalities) if total is not None else 1)
    fix = (f"raise --target-false-alerts-per-hour to at least {60 * opts.min_minutes_factor / worst:.1f}"
           if worst > 0 else "calibrate the other branch alone with --modality")
    raise CemdError(
        f"too little normal video to check a target of {opts.target_false_alerts_per_hour:g} false alerts per hour: "
        f"{'; '.join(lines)}, and each branch needs at least {need:.1f} min of its own normal video (at the target "
        f"rate, that much video would hold {opts.min_minutes_factor:g} false alerts: less cannot show the target is "
        f"met). Add more normal video{'' if total is not None else ' of that modality'}, or {fix}."
        + (f" The scores are kept in {kept_in}: calibrating again does not score these videos again."
           if kept_in is not None else ""))


def precheck(normal: list[Path], modalities: list[str], opts: CalibrationOptions, image_fps: float) -> list[Path]:
    """Fail fast, before any model loads or frame is scored: bad paths, options, far too little video."""
    if not opts.target_false_alerts_per_hour > 0:
        raise CemdError("--target-false-alerts-per-hour must be > 0")
    if opts.margin_sigma < 0:
        raise CemdError("--margin must be ≥ 0 (robust standard deviations of the normal scores)")
    if not image_fps > 0:
        raise CemdError("--image-fps must be > 0")
    inputs = expand_inputs(normal)
    total = probe_minutes(inputs, image_fps)
    if total is not None and total < min_minutes(opts) * len(modalities):
        _check_amount({}, modalities, opts, total)
    return inputs


def calibrate(bundle: Any, replayer: Replayer, normal: list[Path], opts: CalibrationOptions, report_dir: Path,
              progress: Callable[[str, int, int | None], None] | None = None, log: Log = print,
              image_fps: float = 30.0, synthetic: bool | None = None, workers: int = 1,
              score_cache: Path | None = None) -> dict[str, Any]:
    """Score the normal data, choose thresholds, write the report and the bundle's calibration.

    ``score_cache``: a folder keeping each source's scores, so that calibrating again (another
    target, margin, or more data next to the same videos) does not score them again."""
    modalities = list(replayer.backends) if replayer.modality == "auto" else [replayer.modality]
    inputs = precheck(normal, modalities, opts, image_fps)
    t0 = time.perf_counter()
    tracks, from_cache = _score_inputs(replayer, inputs, image_fps, workers, score_cache, progress, log)
    score_seconds = time.perf_counter() - t0
    data = gather(tracks, modalities)
    _check_amount(data, modalities, opts, kept_in=score_cache)
    fps = float(np.median([t.fps for t in tracks]))
    chosen, table = choose(data, opts, fps)

    warnings = _suspect_warnings(chosen, tracks)
    for w in warnings:
        log(f"warning: {w}")

    previous = bundle.calibration or {}
    version = int(previous.get("version", 0)) + 1
    report_dir = Path(report_dir)
    if synthetic is None:
        synthetic = all(_sibling_synthetic(p) for p in inputs)
    record = _record(bundle, replayer, opts, chosen, tracks, modalities, version, synthetic, report_dir)
    _keep_other_branches(record, previous, chosen, warnings)
    report = {**record, "options": asdict(opts), "candidates": table, "warnings": warnings,
              "score_seconds": round(score_seconds, 1),
              "scores_from_cache": from_cache,
              "curves": {m: c.curve for m, c in chosen.items()}}
    report_dir.mkdir(parents=True, exist_ok=True)
    _plots(report_dir, data, chosen, opts, synthetic)
    atomic_write_json(report_dir / "report.json", report)
    _install(bundle.path, record, previous)
    return report


def _score_inputs(replayer: Replayer, inputs: list[Path], image_fps: float, workers: int, score_cache: Path | None,
                  progress: Callable[[str, int, int | None], None] | None, log: Log) -> tuple[list[Any], list[Any]]:
    """Replay each normal input through the monitor's units: its score tracks, and the sources read from the cache."""
    tracks = []
    from_cache = []
    for path in inputs:
        track = replayer.replay(path, image_fps=image_fps, workers=workers, cache=score_cache,
                                progress=(lambda done, total, p=path: progress(p.name, done, total)) if progress else None)
        if getattr(track, "cached", False):
            from_cache.append(track.source)
            log(f"{path}: scores read from the score cache {score_cache} (same content, model and settings)")
        problem = replayer.check_modality(track)
        if problem:
            raise CemdError(problem)
        tracks.append(track)
    return tracks, from_cache


def _suspect_warnings(chosen: dict[str, Any], tracks: list[Any]) -> list[str]:
    """Warnings for stretches of the normal video scoring far above the rest (a lesion left in?)."""
    warnings: list[str] = []
    for m, cal in chosen.items():
        for tr in tracks:
            sel = np.nonzero(tr.modality == m)[0]
            if not len(sel):
                continue
            for a, b, peak in suspect_stretches(tr.t_ms[sel], tr.score[sel], cal.median, cal.sigma, tr.fps):
                fa, fb = int(tr.frame_id[sel[a]]), int(tr.frame_id[sel[b]])
                warnings.append(
                    f"{tr.source} {_clock(tr.t_ms[sel[a]])}–{_clock(tr.t_ms[sel[b]])} (frames {fa}–{fb}, {m.upper()}): "
                    f"scores far above the rest of the normal video (peak {peak:.3f}, normal median {cal.median:.3f}); "
                    f"is there a lesion? If so, cut it out of the normal data: it raises the threshold")
    return warnings


def _record(bundle: Any, replayer: Replayer, opts: CalibrationOptions, chosen: dict[str, Any], tracks: list[Any],
            modalities: list[str], version: int, synthetic: bool, report_dir: Path) -> dict[str, Any]:
    """The bundle's new ``calibration.json`` for the branches just calibrated."""
    return {
        "format": CALIBRATION_FORMAT, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cemd_version": __version__, "model_files": bundle.meta.get("files", {}),
        "model_config": bundle.meta.get("model", {}),  # the score's definition (reduction, scales, smoothing…)
        "target_false_alerts_per_hour": opts.target_false_alerts_per_hour,
        "hold_ms": opts.hold_ms, "n_of_m": list(next(iter(chosen.values())).n_of_m),
        "modalities": {m: c.to_json() for m, c in chosen.items()},
        "data": [{**t.to_json(), "frames_per_modality": {m: int((t.modality == m).sum()) for m in modalities}}
                 for t in tracks],
        "synthetic": synthetic,
        "backends": replayer.backends, "report": str(report_dir),
        "method": "docs/CALIBRATION.md#how-the-threshold-is-chosen",
    }


def _keep_other_branches(record: dict[str, Any], previous: dict[str, Any], chosen: dict[str, Any],
                         warnings: list[str]) -> None:
    """A single-branch calibration keeps the other branch's threshold (warned about if debounced differently)."""
    kept = {m: v for m, v in (previous.get("modalities") or {}).items() if m not in chosen}
    if kept:
        record["modalities"].update(kept)
        record["kept_from_version"] = {m: previous.get("version") for m in kept}
        if {tuple(v.get("n_of_m", record["n_of_m"])) for v in record["modalities"].values()} != {tuple(record["n_of_m"])}:
            warnings.append(f"{', '.join(m.upper() for m in kept)} keeps its threshold from calibration version "
                            f"{previous.get('version')}, chosen with different debouncing; recalibrate both with "
                            f"--modality auto for one consistent setting")


def _plots(folder: Path, data: dict[str, NormalScores], chosen: dict[str, Any], opts: CalibrationOptions,
           synthetic: bool | None) -> None:
    from calibration.plots import plot_false_alert_curves, plot_score_histograms

    label = "SYNTHETIC data" if synthetic else ""
    plot_score_histograms(folder / "histograms.png", {
        m: {"scores": data[m].score, "threshold": c.threshold, "rate_threshold": c.rate_threshold,
            "bulk_floor": c.bulk_floor} for m, c in chosen.items()}, label=label)
    plot_false_alert_curves(folder / "false_alerts.png", {
        m: {**c.curve, "chosen": c.threshold} for m, c in chosen.items()}, opts.target_false_alerts_per_hour,
        label=label)


def _install(bundle_path: Path, record: dict[str, Any], previous: dict[str, Any]) -> None:
    if previous:
        hist = bundle_path / "calibration-history"
        hist.mkdir(exist_ok=True)
        atomic_write_json(hist / f"calibration.v{previous.get('version', 0)}.json", previous)
    atomic_write_json(bundle_path / "calibration.json", record)


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m, c in report["modalities"].items():
        rows.append([m.upper(), f"{c['threshold']:.4f}", f"{c['n_of_m'][0]} of {c['n_of_m'][1]}",
                     f"{c['rate_threshold']:.4f}", f"{c['bulk_floor']:.4f}", f"+{c['margin']:.4f}",
                     f"{c['normal_minutes']:.1f}", f"{c['false_alerts_per_hour_on_data']:.2f}"])
    return rows
