"""Normal training frames from video, exactly as the monitor hands them to a branch.

A bundle trained on still images meets video through a codec, a moving camera and the
monitor's own crop of the field of view; its students have never seen compression blocks or a
re-quantised capillary net, and those raise the score of normal video frames (on the
synthetic examinations, H.264 lifts the NBI branch's highest normal scores by 0.04–0.07:
docs/RESULTS.md). ``cemd video-frames`` writes every ``--every``-th decoded frame of lesion-free
videos, cropped and masked as the monitor's ``FrameScorer`` crops them, and sorted into ``wli/`` and
``nbi/`` by the monitor's router, as a training set (docs/DATA.md layout) that
``cemd train --stage students`` can learn from, alone or added to the still images.

Frames inside a lesion interval of an ``NAME.events.json`` beside a video are left out (and
counted), so annotated examinations can be used too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2

from calibration.events import check_fits, lesion_mask, load_events
from calibration.run import probe_video
from engine.constants import VIDEO_SUFFIXES
from engine.errors import CemdError
from realtime.capture.sources import PyAVReader
from realtime.scoring.frame_scorer import FrameScorer
from realtime.scoring.routing import MODALITIES, ModalityClassifier

GENERATOR = "cemd video-frames"


@dataclass
class FramesReport:
    written: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODALITIES})
    skipped_lesion: int = 0
    skipped_switch: int = 0
    videos: list[dict[str, Any]] = field(default_factory=list)
    synthetic: bool = True  # every video's events file says "synthetic": true (numbers from it must say so)


def find_videos(paths: list[Path]) -> list[Path]:
    """Video files given directly or found (not recursively) in the given folders."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise CemdError(f"folder {p} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise CemdError(f"{p} does not exist; give lesion-free video files or folders of them")
    return out


def _events_beside(video: Path) -> dict[str, Any] | None:
    """The video's ``NAME.events.json`` (validated), or None when there is none."""
    ev_file = video.with_name(video.stem + ".events.json")
    return load_events(ev_file) if ev_file.is_file() else None


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CemdError(f"--out {out} exists and is not a folder")
    meta = out / "dataset.json"
    if meta.is_file():
        return  # a dataset: frames are added beside its images (names never collide: video stem + frame)
    if any(out.iterdir()):
        raise CemdError(f"--out {out} is a non-empty folder without a dataset.json; give a new folder, an empty "
                        f"one, or a dataset (docs/DATA.md) to add the frames to")


def _update_meta(out: Path, report: FramesReport, every: int, size: int) -> None:
    path = out / "dataset.json"
    meta: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {
        "format": "cemd-dataset/1", "synthetic": report.synthetic, "generator": GENERATOR, "size": size}
    if meta.get("synthetic") is True and not report.synthetic:
        meta["synthetic"] = False  # now mixed with video not known to be synthetic
    meta.setdefault("video_frames", []).append({
        "generator": GENERATOR, "every": every, "size": size, "videos": report.videos,
        "written": report.written, "synthetic": report.synthetic, "skipped_lesion_frames": report.skipped_lesion,
        "skipped_switch_frames": report.skipped_switch})
    counts = meta.setdefault("counts", {}).setdefault("train", {})
    counts["good"] = int(counts.get("good", 0)) + sum(report.written.values())
    path.write_text(json.dumps(meta, indent=2) + "\n")


def extract_frames(videos: list[Path], out: Path, classifier: ModalityClassifier, size: int = 256, every: int = 10,
                   modality: str = "auto", settle: int = 5,
                   progress: Callable[[str, int, int | None], None] | None = None) -> FramesReport:
    """Write every ``every``-th frame of each video as the monitor would crop it, by routed modality.

    ``settle``: frames right after a modality switch (the router's lag, the tower's transition)
    are skipped for this many frames, so that no frame lands in the wrong modality's folder.
    """
    if every < 1:
        raise CemdError(f"--every must be ≥ 1, got {every}")
    if modality not in ("auto", *MODALITIES):
        raise CemdError(f"--modality must be auto, wli or nbi, got {modality!r}")
    out = Path(out)
    _check_out(out)
    report = FramesReport()
    for video in videos:
        frames, events, lesions = _probe_events(video, report)
        total = frames or None
        reader = PyAVReader(str(video), network=False, open_timeout=10.0, read_timeout=10.0)
        scorer = FrameScorer(size, classifier, modality, {})  # the monitor's crop and router, no branch
        try:
            i, written = _write_frames(video, reader, scorer, out, every, settle, lesions, total, progress, report)
        finally:
            reader.close()
        if i < 0:
            raise CemdError(f"{video} has no decodable video frames")
        for m in MODALITIES:
            report.written[m] += written[m]
        report.videos.append({"video": str(video), "frames": i + 1, "written": written,
                              "events": events["path"] if events else None})
    _update_meta(out, report, every, size)
    return report


def _probe_events(video: Path, report: FramesReport) -> tuple[int, dict[str, Any] | None, Any]:
    """The video's frame count, its events file (checked against the video) and lesion mask; notes if synthetic."""
    frames, fps, width, height = probe_video(video)
    events = _events_beside(video)
    lesions = None
    if events is not None:
        if frames:
            check_fits(events, frames, fps, width, height)  # before decoding a frame
        lesions = lesion_mask(events, events["frames"])
    report.synthetic &= events is not None and events.get("synthetic") is True
    return frames, events, lesions


def _write_frames(video: Path, reader: PyAVReader, scorer: FrameScorer, out: Path, every: int, settle: int, lesions: Any,
                  total: int | None, progress: Callable[[str, int, int | None], None] | None,
                  report: FramesReport) -> tuple[int, dict[str, int]]:
    """Decode, crop and route the video; write the kept frames: the last frame index (-1: none) and the counts written."""
    since_switch = settle
    written = {m: 0 for m in MODALITIES}
    i = -1
    while (frame := reader.read()) is not None:
        i += 1
        crop, _box = scorer.preprocess.crop(frame.image)
        mod, switched = scorer.route(crop)
        since_switch = 0 if switched else since_switch + 1
        if progress is not None:
            progress(video.name, i + 1, total)
        if i % every:
            continue
        if lesions is not None and i < len(lesions) and lesions[i]:
            report.skipped_lesion += 1
            continue
        if since_switch < settle or (scorer.router is not None and i < settle):
            report.skipped_switch += 1
            continue
        folder = out / mod / "train" / "good"
        folder.mkdir(parents=True, exist_ok=True)
        name = folder / f"{video.stem}_f{i:06d}.png"
        if not cv2.imwrite(str(name), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
            raise CemdError(f"could not write {name}")
        written[mod] += 1
    return i, written
