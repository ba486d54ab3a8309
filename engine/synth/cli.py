"""`cemd synth`, `cemd synth-video` and `cemd slideshow`: synthetic datasets and test videos from the command line."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import CemdError

__all__ = ["register", "run_slideshow", "run_synth", "run_synth_video"]

_VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``synth``, ``synth-video``, ``slideshow`` and ``synth-frames`` subcommands to the top-level parser."""
    _add_synth(sub)
    _add_synth_video(sub)
    _add_slideshow(sub)
    _add_synth_frames(sub)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand (a paired still-image dataset)."""
    p = sub.add_parser(
        "synth",
        help="write a synthetic paired WLI/NBI dataset with lesion masks (layout: docs/DATA.md)",
        description="Render a synthetic paired WLI/NBI gastric dataset: normal training images, normal and "
        "lesion test images of each kind, and pixel masks (MVTec-style folders, docs/DATA.md).",
    )
    p.add_argument("--out", type=Path, required=True, help="dataset folder (new, empty, or a previous synth dataset)")
    p.add_argument("--seed", type=int, required=True, help="seed; the same seed writes identical files")
    p.add_argument("--train", type=int, default=200, help="normal training images per modality (default 200)")
    p.add_argument("--test", type=int, default=100,
                   help="test normals, and test images per lesion kind (default 100)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--generator", choices=("1.1", "2.0"), default="1.1",
                   help="simulator version (default 1.1, what the demo bundle was made on); 2.0 adds nuisances "
                   "that defeat colour rules (bile, blood, mucus, dye, exposure, colour pipeline, JPEG) and "
                   "lesions carried by texture and relief (docs/DATA.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)


def _add_synth_video(sub: argparse._SubParsersAction) -> None:
    """Add the ``synth-video`` subcommand (a synthetic examination video and its events JSON)."""
    v = sub.add_parser(
        "synth-video",
        help="write a synthetic endoscopy video (H.264 MP4) and its lesion/modality events JSON",
        description="Render a synthetic examination video with camera motion, blur, WLI↔NBI switches and "
        "lesions entering and leaving the view; writes the events JSON beside it (format: docs/DATA.md).",
    )
    v.add_argument("--out", type=Path, required=True, help="video file to write (.mp4)")
    v.add_argument("--seed", type=int, required=True, help="seed; the same seed gives the same video")
    v.add_argument("--seconds", type=float, required=True, help="duration in seconds")
    v.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    v.add_argument("--size", default="640x480", help="WIDTHxHEIGHT, even numbers (default 640x480)")
    v.add_argument("--events-out", type=Path, default=None,
                   help="events JSON path (default: beside the video, NAME.events.json)")
    v.add_argument("--boxes-out", type=Path, default=None, metavar="FILE",
                   help="also write ground-truth lesion boxes, one JSON line per frame (format: docs/DATA.md)")
    v.add_argument("--codec", default="libx264", help="PyAV encoder (default libx264)")
    v.add_argument("--no-lesions", action="store_true",
                   help="the same examination without lesions: normal video, e.g. for cemd calibrate")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=run_synth_video)


def _add_slideshow(sub: argparse._SubParsersAction) -> None:
    """Add the ``slideshow`` subcommand (a folder of images as a test video)."""
    s = sub.add_parser(
        "slideshow",
        help="turn a folder of images into a test video (H.264 MP4) and its slides JSON",
        description="Show each image of a folder (sorted by name) for a few seconds in an H.264 video, letterboxed "
        "to one size, to watch the monitor's overlay on your own frames; writes NAME.slides.json beside it "
        "(which image is on screen at which frame and time).",
    )
    s.add_argument("images", type=Path, metavar="DIR", help="folder of images (.png, .jpg, .webp, …)")
    s.add_argument("--out", type=Path, required=True, help="video file to write (.mp4)")
    s.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    s.add_argument("--seconds-each", type=float, default=1.0, help="seconds each image is shown (default 1)")
    s.add_argument("--size", default=None,
                   help="WIDTHxHEIGHT, even numbers (default: the first image's size, rounded up to even)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_slideshow)


def _add_synth_frames(sub: argparse._SubParsersAction) -> None:
    """Add the ``synth-frames`` subcommand (normal training frames from lesion-free videos)."""
    f = sub.add_parser(
        "synth-frames",
        help="write paired normal WLI/NBI training frames taken from lesion-free synthetic examination videos",
        description="Training data that looks like the video the monitor sees (motion, defocus, glints, zoom): "
        "each seed is one lesion-free examination; frames spread over it are rendered in both lights and cropped "
        "around the field of view as the monitor crops (layout: docs/DATA.md, train/good only).",
    )
    f.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    f.add_argument("--seeds", required=True, help="examination seeds: a range A-B (inclusive) or a comma list")
    f.add_argument("--per-seed", type=int, default=15, help="frames per examination (default 15)")
    f.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=run_synth_frames)


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise CemdError(f"--seed must be ≥ 0, got {seed}")


def run_synth(args: argparse.Namespace) -> int:
    from engine.synth.stills import LESION_KINDS, write_dataset

    _check_seed(args.seed)
    if args.train < 0 or args.test < 0:
        raise CemdError("--train and --test must be ≥ 0")
    if args.train + args.test == 0:
        raise CemdError("nothing to write: --train and --test are both 0")
    if not 64 <= args.size <= 2048:
        raise CemdError(f"--size must be between 64 and 2048 pixels, got {args.size}")
    start = time.perf_counter()
    meta = write_dataset(args.out, args.seed, args.train, args.test, args.size, progress=not args.no_progress,
                         generator=args.generator)
    seconds = time.perf_counter() - start

    table = Table(title=f"SYNTHETIC dataset (generator {args.generator}) → {args.out}", show_header=True)
    table.add_column("split / kind")
    table.add_column("pairs", justify="right")
    table.add_column("visible in")
    table.add_row("train / good", str(args.train), "—")
    table.add_row("test / good", str(args.test), "—")
    for kind, info in LESION_KINDS.items():
        table.add_row(f"test / {kind}", str(args.test), ", ".join(m.upper() for m in info["visible_in"]))
    console = Console()
    console.print(table)
    n_pairs = args.train + args.test * (1 + len(LESION_KINDS))
    area = meta.get("lesion_area_fraction")
    area_text = (f"; lesion area {area['min']:.1%}–{area['max']:.1%} of the FOV (median {area['median']:.1%})"
                 if area else "")
    console.print(f"{n_pairs} WLI/NBI pairs of {args.size}² in {seconds:.1f} s (seed {args.seed}){area_text}")
    return 0


def _default_events_path(out: Path) -> Path:
    return out.with_name(out.stem + ".events.json")


def run_synth_video(args: argparse.Namespace) -> int:
    from engine.synth.video import parse_size, render_video

    _check_seed(args.seed)
    if not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise CemdError(f"--seconds must be > 0, got {args.seconds}")
    if not (0 < args.fps <= 240):
        raise CemdError(f"--fps must be in (0, 240], got {args.fps}")
    size = parse_size(args.size)
    out: Path = args.out
    if out.suffix.lower() not in _VIDEO_SUFFIXES:
        raise CemdError(f"--out {out}: use a video file name ending in .mp4 (or .mkv/.mov)")
    if out.is_dir():
        raise CemdError(f"--out {out} is a folder; give a file path such as {out / 'synth.mp4'}")
    events_out = args.events_out or _default_events_path(out)
    start = time.perf_counter()
    boxes_out: Path | None = args.boxes_out
    events = render_video(out, args.seed, args.seconds, args.fps, size, events_out,
                          progress=not args.no_progress, codec=args.codec, lesions=not args.no_lesions,
                          boxes_out=boxes_out)
    seconds = time.perf_counter() - start

    n = events["frames"]
    lesion_frames = set()
    for e in events["lesions"]:
        lesion_frames.update(range(e["start_frame"], e["end_frame"] + 1))
    console = Console()
    table = Table(title=f"SYNTHETIC video → {out}", show_header=True)
    table.add_column("frames")
    table.add_column("modality / lesion")
    for seg in events["modality"]:
        table.add_row(f"{seg['start_frame']}–{seg['end_frame']}", seg["modality"].upper())
    for e in events["lesions"]:
        table.add_row(f"{e['start_frame']}–{e['end_frame']}",
                      f"lesion {e.get('id', '?')}: {e['kind']} (visible in {', '.join(m.upper() for m in e['visible_in'])})")
    console.print(table)
    console.print(
        f"{n} frames {size[0]}x{size[1]} @ {events['fps']:g} fps in {seconds:.1f} s "
        f"({n / max(seconds, 1e-9):.0f} frames/s); lesion present in {len(lesion_frames) / n:.0%} of frames; "
        f"events → {events_out}" + (f"; boxes → {boxes_out}" if boxes_out is not None else "")
    )
    return 0


def run_slideshow(args: argparse.Namespace) -> int:
    from engine.data.slideshow import slides_path, write_slideshow
    from engine.synth.video import parse_size

    if not (math.isfinite(args.fps) and 0 < args.fps <= 240):
        raise CemdError(f"--fps must be in (0, 240], got {args.fps}")
    if not (math.isfinite(args.seconds_each) and args.seconds_each > 0):
        raise CemdError(f"--seconds-each must be > 0, got {args.seconds_each}")
    size = parse_size(args.size) if args.size else None
    out: Path = args.out
    if out.suffix.lower() not in _VIDEO_SUFFIXES:
        raise CemdError(f"--out {out}: use a video file name ending in .mp4 (or .mkv/.mov)")
    meta = write_slideshow(args.images, out, args.fps, args.seconds_each, size, progress=not args.no_progress)
    console = Console()
    for w in meta["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    w, h = meta["size"]
    console.print(f"{meta['frames']} frames ({len(meta['slides'])} images × {args.seconds_each:g} s) "
                  f"{meta['duration_s']:g} s {w}x{h} @ {args.fps:g} fps → {out} (slides: {slides_path(out)})",
                  highlight=False, markup=False)
    return 0


def parse_seeds(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text:
            a, b = (int(v) for v in text.split("-", 1))
            seeds = list(range(a, b + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CemdError(f"--seeds takes a range like 1000-1019 or a list like 1,2,5; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise CemdError(f"--seeds must name at least one non-negative seed; got {text!r}")
    return seeds


def run_synth_frames(args: argparse.Namespace) -> int:
    from engine.synth.video import write_frame_dataset

    seeds = parse_seeds(args.seeds)
    if not 1 <= args.per_seed <= 1000:
        raise CemdError(f"--per-seed must be between 1 and 1000, got {args.per_seed}")
    if not 64 <= args.size <= 2048:
        raise CemdError(f"--size must be between 64 and 2048 pixels, got {args.size}")
    start = time.perf_counter()
    meta = write_frame_dataset(args.out, seeds, args.per_seed, size=args.size, progress=not args.no_progress)
    Console().print(f"{meta['counts']['train']['good']} SYNTHETIC WLI/NBI frame pairs from {len(seeds)} lesion-free "
                    f"examinations → {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
