"""The `cemd` command: assembles the subcommands of every part of the product.

It lives in `realtime` because that is the one package allowed to import all others.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from calibration import cli as calibration_cli
from engine import cli as engine_cli
from engine.errors import CemdError
from realtime.clients import display, subscribe
from realtime.publish import keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cemd",
        description="Endoscopic anomaly monitor (CEMD): synthetic data, training, evaluation, streaming.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    engine_cli.register(sub)
    _add_run(sub)
    _add_fit_modality(sub)
    _add_video_frames(sub)
    keys.register(sub)
    subscribe.register(sub)
    display.register(sub)
    calibration_cli.register(sub, _replayer)
    return parser


def _replayer(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 — the scorer calibration replays video with
    from realtime.offline.replay import Replayer

    return Replayer(*args, **kwargs)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from realtime.cli import run as run_stream

    # Listed for --help only: main() hands everything after "run" to run_stream's own parser.
    p = sub.add_parser("run", help="the real-time monitor (same as python run_stream.py; cemd run --help)")
    p.set_defaults(func=lambda _args: run_stream.main([], prog="cemd run"))


def _add_fit_modality(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser("fit-modality", help="fit the WLI/NBI colour classifier used by --modality auto",
                       description="Fit the per-frame WLI/NBI classifier of --modality auto on a dataset's normal "
                                   "training images (layout: docs/DATA.md) and store it in the bundle.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset root with wli/train/good and nbi/train/good")
    p.set_defaults(func=_fit_modality)


def _fit_modality(args: argparse.Namespace) -> int:
    import json

    from realtime.scoring.routing import CLASSIFIER_FILE, fit_from_dataset

    if not args.bundle.is_dir():
        raise CemdError(f"bundle folder {args.bundle} does not exist")
    classifier = fit_from_dataset(args.data)
    out = args.bundle / CLASSIFIER_FILE
    out.write_text(json.dumps(classifier.to_json(), indent=2) + "\n")
    Console().print(f"wrote {out} (fitted on {args.data})")
    return 0


def _add_video_frames(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser("video-frames", help="normal training frames from video, cropped and routed as the monitor does",
                       description="Write every Nth frame of lesion-free videos as the monitor hands it to a branch "
                                   "(field-of-view crop, mask, input size) into wli/ and nbi/ training folders "
                                   "(docs/DATA.md), sorted by the monitor's router; then train the students on them "
                                   "with cemd train --stage students (docs/MODEL.md#students-on-video).")
    p.add_argument("--videos", type=Path, nargs="+", required=True, help="lesion-free video files or folders of them")
    p.add_argument("--out", type=Path, required=True,
                   help="new or empty folder, or an existing dataset to add the frames to")
    p.add_argument("--bundle", type=Path, default=None,
                   help="take the colour classifier and input size from this bundle (default: built-in, 256)")
    p.add_argument("--every", type=int, default=10, help="keep every Nth frame (default 10: 3 per second at 30 fps)")
    p.add_argument("--modality", choices=("auto", "wli", "nbi"), default="auto",
                   help="auto: sort by the monitor's router; wli/nbi: every frame is that modality")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default: the bundle's input size)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_video_frames)


def _video_frames(args: argparse.Namespace) -> int:
    from realtime.offline.video_frames import extract_frames, find_videos
    from realtime.scoring.routing import DEFAULT_CLASSIFIER, ModalityClassifier

    console = Console()
    videos = find_videos(args.videos)
    size = args.size
    if args.bundle is not None:
        from engine.deploy.bundle import load_bundle

        bundle = load_bundle(args.bundle, require_students=False)
        classifier, warning = ModalityClassifier.for_bundle(args.bundle)
        if warning and args.modality == "auto":
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        size = size or bundle.model.input_size
    else:
        classifier = ModalityClassifier.from_json(DEFAULT_CLASSIFIER)
    size = size or 256
    if size < 32:
        raise CemdError(f"--size must be at least 32, got {size}")
    with calibration_cli.FrameProgress(not args.no_progress, console, "frames of") as progress:
        report = extract_frames(videos, args.out, classifier, size, args.every, args.modality, progress=progress)
    total = sum(report.written.values())
    if not total:
        raise CemdError(f"no frame was written from {len(videos)} video(s): every kept frame was inside a lesion "
                        f"interval or a modality switch")
    console.print(f"wrote {total} frames to {args.out} (WLI {report.written['wli']}, NBI {report.written['nbi']}) "
                  f"from {len(videos)} video(s); left out: {report.skipped_lesion} inside lesion intervals, "
                  f"{report.skipped_switch} at modality switches", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    from engine.malloc import tune_malloc

    tune_malloc()  # calibration and evaluation score frame after frame too (engine/malloc.py)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from realtime.cli import run as run_stream

        return run_stream.main(argv[1:], prog="cemd run")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CemdError as exc:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
