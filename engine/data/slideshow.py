"""A folder of images → a short H.264 test video, plus a sidecar naming the slide on screen at each frame.

Each image is held for ``seconds_each`` seconds; images of another size than the video are
letterboxed into it (aspect kept, black padding). Slide ``i`` covers frames
``⌊i·n + ½⌋`` … ``⌊(i+1)·n + ½⌋ − 1`` with ``n = fps · seconds_each``, so the total length stays
exact when ``n`` is not a whole number. The sidecar (``NAME.slides.json``) lists each slide's
image, first and last frame and start/end time in ms (``end_ms`` is when the next slide starts).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.data.dataset import IMAGE_SUFFIXES, _decode, _is_junk
from engine.errors import CemdError
from engine.progress import progress_steps

__all__ = ["letterbox", "slides_path", "write_slideshow"]

_MAX_W, _MAX_H = 7680, 4320  # as cemd synth-video
_MIN_SIDE = 16


def slides_path(out: Path) -> Path:
    """``V.mp4`` → ``V.slides.json`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".slides.json")


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def _list_images(folder: Path) -> tuple[list[Path], list[str]]:
    if not folder.exists():
        raise CemdError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise CemdError(f"{folder} is not a folder; give the folder that holds the images")
    images, other = [], []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if _is_junk(p) or p.is_dir():
            continue
        (images if p.suffix.lower() in IMAGE_SUFFIXES else other).append(p)
    if not images:
        raise CemdError(f"{folder} holds no images; accepted suffixes: {_suffixes()}")
    warnings = []
    if other:
        names = ", ".join(p.name for p in other[:5]) + (f", and {len(other) - 5} more" if len(other) > 5 else "")
        warnings.append(f"{folder}: ignored {len(other)} file(s) that are not images ({names}); "
                        f"accepted suffixes: {_suffixes()}")
    return images, warnings


def _read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (grey, alpha and 16-bit become 8-bit RGB); CemdError naming the file if unreadable."""
    return cv2.cvtColor(_decode(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _even_up(v: int) -> int:
    return v + (v % 2)


def _check_video_size(w: int, h: int, what: str, origin: str = "") -> None:
    if w % 2 or h % 2:
        raise CemdError(f"{what} {w}x{h}{origin} must have an even width and height (H.264 yuv420p)")
    if not (_MIN_SIDE <= w <= _MAX_W and _MIN_SIDE <= h <= _MAX_H):
        raise CemdError(f"{what} {w}x{h}{origin} is out of range; use {_MIN_SIDE}x{_MIN_SIDE} up to "
                        f"{_MAX_W}x{_MAX_H} (--size WxH)")


def letterbox_geometry(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where `letterbox` puts a ``src`` (W, H) image in a ``dst`` (W, H) frame: its size there and
    offset, (nw, nh, x0, y0); an image pixel edge x lands at ``x0 + x · nw / W``."""
    iw, ih = src
    w, h = dst
    if 0 <= w - iw <= 1 and 0 <= h - ih <= 1:  # the same size, or an odd size rounded up to even: pad, do not rescale
        nw, nh = iw, ih
    else:
        s = min(w / iw, h / ih)
        nw, nh = min(w, max(1, round(iw * s))), min(h, max(1, round(ih * s)))
    return nw, nh, (w - nw) // 2, (h - nh) // 2


def letterbox(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``img`` scaled to fit ``size`` (W, H) with its aspect kept, centred on black."""
    w, h = size
    ih, iw = img.shape[:2]
    if (iw, ih) == (w, h):
        return np.ascontiguousarray(img)
    nw, nh, x0, y0 = letterbox_geometry((iw, ih), (w, h))
    if 0 <= w - iw <= 1 and 0 <= h - ih <= 1:  # padded, as letterbox_geometry says
        fitted = img
    else:
        fitted = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if min(w / iw, h / ih) < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[y0:y0 + nh, x0:x0 + nw] = fitted
    return canvas


def _check_timing(fps: float, seconds_each: float, out: Path) -> float:
    """Validate ``fps``, ``seconds_each`` and ``out``; return the frames per slide (``fps · seconds_each``)."""
    if not (math.isfinite(fps) and 0 < fps <= 240):
        raise CemdError(f"--fps must be in (0, 240], got {fps}")
    if not (math.isfinite(seconds_each) and seconds_each > 0):
        raise CemdError(f"--seconds-each must be > 0, got {seconds_each}")
    per_slide = fps * seconds_each
    if per_slide < 1 - 1e-9:
        raise CemdError(f"--fps × --seconds-each = {per_slide:g} frames per image; each image needs at least 1 frame")
    if out.is_dir():
        raise CemdError(f"--out {out} is a folder; give a file path such as {out / 'slideshow.mp4'}")
    return per_slide


def _readable_images(
    images_dir: Path, paths: list[Path], warnings: list[str]
) -> tuple[list[Path], list[dict[str, str]], tuple[int, int]]:
    """First pass: decode each image once to find the unreadable ones (pixels are not kept).

    Returns the readable paths, the skipped ones (reported in ``warnings`` too) and the first readable
    image's (W, H); CemdError if none is readable.
    """
    readable: list[Path] = []
    skipped: list[dict[str, str]] = []
    first_shape: tuple[int, int] | None = None
    for p in paths:
        try:
            img = _read_rgb(p)
        except CemdError as exc:
            skipped.append({"image": str(p.resolve()), "reason": str(exc)})
            warnings.append(f"skipped {p.name}: {exc}")
            continue
        if first_shape is None:
            first_shape = img.shape[1], img.shape[0]
        readable.append(p)
    if not readable:
        raise CemdError(f"none of the {len(paths)} image(s) in {images_dir} is readable "
                        f"(first: {skipped[0]['reason']})")
    assert first_shape is not None
    return readable, skipped, first_shape


def _video_size(size: tuple[int, int] | None, first_shape: tuple[int, int], first: Path) -> tuple[int, int]:
    """The video's (W, H): ``size``, or the first image's size rounded up to even; checked for H.264."""
    if size is None:
        w, h = _even_up(first_shape[0]), _even_up(first_shape[1])
        _check_video_size(w, h, "video size", f" (from the first image, {first.name})")
    else:
        w, h = int(size[0]), int(size[1])
        _check_video_size(w, h, "--size")
    return w, h


def _slide_table(readable: list[Path], per_slide: float, fps: float) -> tuple[list[dict[str, Any]], int]:
    """Each slide's image, first/last frame and start/end time in ms, and the total number of frames."""
    n = len(readable)
    bounds = [math.floor(i * per_slide + 0.5) for i in range(n + 1)]  # half up: never an empty slide
    slides = [
        {
            "index": i,
            "image": str(p.resolve()),
            "first_frame": bounds[i],
            "last_frame": bounds[i + 1] - 1,
            "start_ms": round(bounds[i] * 1000 / fps, 3),
            "end_ms": round(bounds[i + 1] * 1000 / fps, 3),
        }
        for i, p in enumerate(readable)
    ]
    return slides, bounds[-1]


def _encode_slides(
    container: Any,
    rate: Fraction,
    size: tuple[int, int],
    slides: list[dict[str, Any]],
    readable: list[Path],
    n_frames: int,
    progress: bool,
    name: str,
) -> None:
    """Encode every slide's frames (letterboxed to ``size``) into ``container`` as H.264 yuv420p, then flush."""
    import av

    w, h = size
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "18", "preset": "veryfast"}
    with progress_steps(progress, n_frames, f"slideshow → {name}") as advance:
        for slide, p in zip(slides, readable):
            try:
                rgb = letterbox(_read_rgb(p), (w, h))
            except CemdError as exc:  # changed since the first pass
                raise CemdError(f"{exc} (it was readable a moment ago)") from None
            for i in range(slide["first_frame"], slide["last_frame"] + 1):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                frame.time_base = 1 / rate
                for packet in stream.encode(frame):
                    container.mux(packet)
                advance()
    for packet in stream.encode():
        container.mux(packet)


def write_slideshow(
    images_dir: Path,
    out: Path,
    fps: float = 30.0,
    seconds_each: float = 1.0,
    size: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (H.264 yuv420p, as ``engine.synth.video``) and ``out``'s ``.slides.json``; return the latter.

    Unreadable images are skipped and reported in ``warnings`` (and ``skipped``); if none is
    readable, CemdError. ``size`` is (W, H); default the first readable image's size rounded up
    to even numbers.
    """
    import av

    images_dir, out = Path(images_dir), Path(out)
    per_slide = _check_timing(fps, seconds_each, out)
    paths, warnings = _list_images(images_dir)
    readable, skipped, first_shape = _readable_images(images_dir, paths, warnings)
    w, h = _video_size(size, first_shape, readable[0])
    slides, n_frames = _slide_table(readable, per_slide, fps)

    out.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    try:
        container = av.open(str(out), "w")
    except (OSError, av.error.FFmpegError) as exc:
        raise CemdError(f"cannot write {out}: {exc}") from None
    try:
        _encode_slides(container, rate, (w, h), slides, readable, n_frames, progress, out.name)
    finally:
        container.close()

    meta: dict[str, Any] = {
        "video": str(out.resolve()),
        "fps": fps,
        "seconds_each": seconds_each,
        "size": [w, h],
        "frames": n_frames,
        "duration_s": round(n_frames / fps, 3),
        "slides": slides,
        "skipped": skipped,
        "warnings": warnings,
    }
    slides_path(out).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta
