"""`cemd calibrate` and `cemd evaluate-video`.

Both score video with the live monitor's own units; ``register`` receives that scorer's
factory from ``realtime.cli.main`` (calibration never imports realtime).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from calibration.thresholds import CalibrationOptions
from engine.errors import CemdError

ReplayerFactory = Callable[..., Any]


class FrameProgress:
    """A rich bar over frames, one task per source; nothing with --no-progress."""

    def __init__(self, enabled: bool, console: Console, verb: str = "scoring") -> None:
        self.enabled, self.console, self.verb = enabled, console, verb
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "FrameProgress":
        if self.enabled:
            from engine.progress import progress_bar

            self._bar = progress_bar(self.console, field="fps", suffix="fps", elapsed=True)
            self._bar.__enter__()
        return self

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if self._bar is None:
            return
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = self._bar.add_task(f"{self.verb} {name}", total=total, fps="–")
            self._t0 = time.perf_counter()
        if done % 10 == 0 or done == total:
            rate = done / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.update(task, completed=done, fps=f"{rate:.1f}")

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _add_calibrate(sub: argparse._SubParsersAction, factory: ReplayerFactory) -> None:
    d = CalibrationOptions()
    p = sub.add_parser(
        "calibrate", help="choose alert thresholds (and debouncing) from normal video; writes them into the bundle",
        description="Score normal (lesion-free) video with the monitor's own pipeline and choose, per modality, the "
                    "lowest threshold at which the live alert logic would have raised no more than the target "
                    "false-alert rate, raised by a safety margin (docs/CALIBRATION.md). Writes BUNDLE/calibration.json "
                    "and a report (JSON + PNG plots).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--normal", type=Path, nargs="+", required=True, metavar="PATH",
                   help="normal video files, folders of frames, or folders of videos")
    p.add_argument("--modality", choices=("wli", "nbi", "auto"), default="auto",
                   help="auto: route each frame to its branch and calibrate both (default); wli/nbi: only that "
                        "branch (the other keeps its current calibration)")
    p.add_argument("--target-false-alerts-per-hour", type=float, default=d.target_false_alerts_per_hour,
                   help=f"false alerts per hour of normal video the thresholds must keep to (default "
                        f"{d.target_false_alerts_per_hour:g} = one per 10 minutes)")
    p.add_argument("--margin", type=float, default=d.margin_sigma,
                   help=f"safety margin in robust standard deviations of the normal scores (default {d.margin_sigma:g})")
    p.add_argument("--max-debounce-ms", type=float, default=d.max_debounce_ms,
                   help=f"longest delay debouncing may add to an alert (default {d.max_debounce_ms:g} ms)")
    p.add_argument("--report", type=Path, default=None, help="report folder (default runs/calibrate-TIMESTAMP)")
    p.add_argument("--backend", default="auto",
                   help="branch backend: auto (default), aoti, onnxruntime, openvino, eager, tensorrt")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--image-fps", type=float, default=30.0, help="frame rate assumed for folders of frames")
    p.add_argument("--workers", type=int, default=None,
                   help="processes scoring chunks of a video in parallel, one torch thread each (default: one per "
                        "CPU core, at most 8; 1 = a single process)")
    p.add_argument("--score-cache", type=Path, default=Path("runs/score-cache"), metavar="DIR",
                   help="keep each video's scores here, so calibrating again with other options does not score it "
                        "again (default runs/score-cache)")
    p.add_argument("--no-score-cache", action="store_true", help="score every video now; keep nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda args: _run_calibrate(args, factory))


def _run_calibrate(args: argparse.Namespace, factory: ReplayerFactory) -> int:
    from calibration.run import calibrate, precheck, summary_rows
    from engine.deploy.bundle import load_bundle

    console = Console()
    opts = CalibrationOptions(target_false_alerts_per_hour=args.target_false_alerts_per_hour,
                              margin_sigma=args.margin, max_debounce_ms=args.max_debounce_ms)
    import os

    workers = args.workers if args.workers is not None else max(1, min(8, os.cpu_count() or 1))
    if workers < 1:
        raise CemdError("--workers must be ≥ 1")
    bundle = load_bundle(args.bundle)
    precheck(args.normal, list(bundle.modalities) if args.modality == "auto" else [args.modality], opts,
             args.image_fps)  # bad paths, options or far too little video fail before the model loads
    report_dir = args.report or Path("runs") / time.strftime("calibrate-%Y%m%d-%H%M%S")
    console.print(f"loading the {args.modality.upper()} branch(es) of {args.bundle} …", highlight=False)
    replayer = factory(bundle, args.modality, args.backend, args.device,
                       log=lambda s: console.print(f"  {s}", highlight=False))
    with FrameProgress(not args.no_progress, console) as progress:
        report = calibrate(bundle, replayer, args.normal, opts, report_dir, progress,
                           log=lambda s: console.print(f"[yellow]{s}[/]", highlight=False), image_fps=args.image_fps,
                           workers=workers, score_cache=None if args.no_score_cache else args.score_cache)
    table = Table(title=f"calibration v{report['version']} → {args.bundle / 'calibration.json'}"
                        + (" (SYNTHETIC data)" if report.get("synthetic") else ""))
    for col in ("branch", "threshold", "debounce", "rate thr.", "p99 floor", "margin", "normal min",
                "false alerts/h on data"):
        table.add_column(col, justify="left" if col == "branch" else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    frames = sum(d["frames"] for d in report["data"])
    cached = len(report.get("scores_from_cache", []))
    console.print(f"{frames} frames scored in {report['score_seconds']:.0f} s "
                  + (f"({cached} of {len(report['data'])} sources from the score cache); " if cached else
                     f"({frames / max(report['score_seconds'], 1e-9):.1f} frames/s); ")
                  + "target "
                  f"{opts.target_false_alerts_per_hour:g} false alerts/h; report: {report_dir}", highlight=False)
    return 0


def _add_evaluate_video(sub: argparse._SubParsersAction, factory: ReplayerFactory) -> None:
    p = sub.add_parser(
        "evaluate-video", help="event-level metrics of the monitor on an annotated video",
        description="Replay a video through the monitor's scorer and alert logic (every frame, as --fast) and report "
                    "event sensitivity, false alerts per hour, time to first alert and frame AUROC against an events "
                    "file (the format cemd synth-video --events-out writes; docs/CALIBRATION.md).")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--video", type=Path, required=True)
    p.add_argument("--events", type=Path, required=True, help="ground-truth events JSON")
    p.add_argument("--json", type=Path, required=True, help="where to write the metrics")
    p.add_argument("--plot", type=Path, default=None, help="PNG timeline of score, threshold, alerts and lesions")
    p.add_argument("--modality", choices=("wli", "nbi", "auto"), default="auto")
    p.add_argument("--sensitivity", type=float, default=1.0, help="threshold divisor, as in the monitor")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda args: _run_evaluate_video(args, factory))


def _run_evaluate_video(args: argparse.Namespace, factory: ReplayerFactory) -> int:
    from calibration.events import check_fits, event_metrics, load_events
    from calibration.run import probe_video
    from engine.deploy.bundle import load_bundle

    console = Console()
    events = load_events(args.events)
    frames, fps, width, height = probe_video(args.video)
    if frames:
        check_fits(events, frames, fps, width, height)  # before minutes of scoring
    bundle = load_bundle(args.bundle)
    replayer = factory(bundle, args.modality, args.backend, args.device,
                       log=lambda s: console.print(f"  {s}", highlight=False))
    logic = replayer.alert_logic(args.sensitivity)
    if logic.thresholds.warning:
        console.print(f"[yellow]warning:[/] {logic.thresholds.warning}", highlight=False)
    with FrameProgress(not args.no_progress, console) as progress:
        track = replayer.replay(args.video, alerts=logic, progress=lambda d, t: progress(args.video.name, d, t))
    check_fits(events, track.frames, track.fps, track.width, track.height)
    problem = replayer.check_modality(track)
    if problem:
        raise CemdError(problem)
    metrics = event_metrics(track.t_ms, track.modality, track.score, track.alerts, events, track.fps)
    thresholds = {m: float(logic.threshold(m)) for m in replayer.backends}
    out = {
        "schema": "cemd.evaluate-video/1", "video": track.to_json(), "events": str(args.events),
        "synthetic": bool(events.get("synthetic")), "bundle": str(args.bundle),
        "thresholds": thresholds, "threshold_source": logic.thresholds.source, "n_of_m": list(logic.n_of_m),
        "sensitivity": args.sensitivity, "backends": replayer.backends, "modality_mode": args.modality,
        "replay_seconds": round(track.seconds, 1), **metrics,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        from calibration.plots import plot_timeline

        plot_timeline(args.plot, track.t_ms / 1000, track.score, track.modality, thresholds,
                      [(e["start_frame"], e["end_frame"]) for e in metrics["alert_events"]],
                      [(e["start_frame"], e["end_frame"], e["detected"]) for e in metrics["lesion_events"]],
                      title=f"{args.video.name}" + (" (SYNTHETIC)" if out["synthetic"] else ""))
    _print_metrics(console, out)
    return 0


def _fmt(v: Any, unit: str = "") -> str:
    return "–" if v is None else f"{v:.1%}" if unit == "%" else f"{v:g}{unit}"


def _print_metrics(console: Console, out: dict[str, Any]) -> None:
    table = Table(title=f"{out['video']['source']}: {out['video']['frames']} frames"
                        + (" (SYNTHETIC)" if out["synthetic"] else ""))
    for col in ("", "lesion events", "sensitivity", "false alerts/h", "median TTA", "p90 TTA", "frame AUROC"):
        table.add_column(col, justify="left" if not col else "right")
    for name, b in [("overall", out["overall"])] + [(m.upper(), v) for m, v in out["per_modality"].items()]:
        table.add_row(name, f"{b['detected']}/{b['lesion_events']}", _fmt(b["event_sensitivity"], "%"),
                      _fmt(b["false_alerts_per_hour"]), _fmt(b["median_time_to_first_alert_ms"], " ms"),
                      _fmt(b["p90_time_to_first_alert_ms"], " ms"), _fmt(b["frame_auroc"]))
    console.print(table)


def register(sub: argparse._SubParsersAction, factory: ReplayerFactory) -> None:
    _add_calibrate(sub, factory)
    _add_evaluate_video(sub, factory)
