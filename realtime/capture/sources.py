"""Video sources: what the user typed (``SourceSpec``) and one reader per kind.

Readers run inside the capture process (``realtime.capture.process``); they never deal with
pacing, reconnecting or shared memory. Their contract:

* ``read()`` returns the next decoded frame as RGB uint8 (H, W, 3), or None at EOF;
* a corrupt packet is counted in ``decode_errors`` and skipped;
* ``SourceLost`` means "this connection is dead, reopen me" (read timeout, device gone,
  ``max_errors`` consecutive decode errors);
* problems the user must fix (missing file, not a video, unreachable URL) raise
  ``CemdError`` at open with one clear message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.errors import CemdError

__all__ = [
    "NETWORK_SCHEMES", "SourceSpec", "parse_source", "DecodedFrame", "FrameReader", "SourceLost",
    "open_reader", "synthetic_events",
]

NETWORK_SCHEMES = ("rtsp", "rtsps", "udp", "rtp", "srt", "http", "https", "tcp")
_SYNTH_DEFAULTS: dict[str, Any] = {"seed": 7, "seconds": 40.0, "size": (640, 480), "fps": 30.0}
_TEXT_CODECS = {"ansi", "bintext", "xbin", "idf"}  # FFmpeg renders text files as "video"
_FORMS = ("a file path, a URL (rtsp://, udp://, rtp://, srt://, http(s)://, tcp://), "
          "a device (device:0 or /dev/video0), or synthetic")


class SourceLost(Exception):
    """The source stopped delivering; the capture loop should reopen it (network, device)."""


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source``. ``kind`` is file | network | device | synthetic."""

    kind: str
    location: str  # path, URL, device index/path, or "synthetic"
    scheme: str | None = None  # network only
    device_index: int | None = None  # device only
    seed: int = 7  # synthetic only (the rest too)
    seconds: float = 40.0
    size: tuple[int, int] = (640, 480)  # (width, height)
    fps: float = 30.0

    @property
    def is_live(self) -> bool:
        """Network and device sources cannot be paused or replayed: always latest-wins."""
        return self.kind in ("network", "device")

    def __str__(self) -> str:
        if self.kind == "synthetic":
            w, h = self.size
            return f"synthetic:seed={self.seed},seconds={self.seconds:g},size={w}x{h},fps={self.fps:g}"
        return self.location


def parse_source(text: str) -> SourceSpec:
    """Turn the ``--source`` text into a ``SourceSpec``, or raise one clear ``CemdError``."""
    raw = (text or "").strip()
    if not raw:
        raise CemdError(f"the video source is empty; give {_FORMS}")
    if raw == "synthetic" or raw.startswith("synthetic:"):
        return _parse_synthetic(raw)
    m = re.fullmatch(r"device:(\d+)|/dev/video(\d+)", raw)
    if m:
        index = int(m.group(1) or m.group(2))
        return SourceSpec("device", raw, device_index=index)
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", raw)
    if m:
        scheme = m.group(1).lower()
        if scheme not in NETWORK_SCHEMES:
            raise CemdError(f"unknown URL scheme '{scheme}'; use rtsp, udp, rtp, srt, http(s) or tcp, "
                            "a file path, a device (device:0 or /dev/video0), or synthetic")
        return SourceSpec("network", raw, scheme=scheme)
    path = Path(raw).expanduser()
    if not path.exists():
        raise CemdError(f"video file {raw!r} does not exist; give {_FORMS}")
    if not path.is_file():
        raise CemdError(f"{raw!r} is a folder, not a video file; give {_FORMS}")
    if not os.access(path, os.R_OK):
        raise CemdError(f"video file {raw!r} is not readable (permission denied); fix its permissions")
    return SourceSpec("file", str(path))


def _parse_synthetic(raw: str) -> SourceSpec:
    from engine.synth.video import parse_size

    values = dict(_SYNTH_DEFAULTS)
    body = raw.partition(":")[2]
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, val = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in values:
            raise CemdError(f"bad synthetic option {item!r}; use synthetic:seed=7,seconds=40,size=640x480,fps=30")
        try:
            if key == "seed":
                values[key] = int(val)
            elif key == "size":
                values[key] = parse_size(val)
            else:
                values[key] = float(val)
        except ValueError:
            raise CemdError(f"synthetic option {key} must be a number, got {val!r}") from None
    if values["seed"] < 0 or not values["seconds"] > 0 or not 0 < values["fps"] <= 240:
        raise CemdError("synthetic options out of range: seed >= 0, seconds > 0, 0 < fps <= 240")
    return SourceSpec("synthetic", "synthetic", seed=values["seed"], seconds=values["seconds"],
                      size=values["size"], fps=values["fps"])


# ---------------------------------------------------------------------------- readers


@dataclass
class DecodedFrame:
    """One decoded frame, already RGB."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    pts: int | None
    time_base: tuple[int, int] | None


class FrameReader(Protocol):
    """What the capture loop needs from a source."""

    fps: float | None  # nominal rate (container/device/scene), None if unknown
    decode_errors: int

    def read(self) -> DecodedFrame | None: ...

    def close(self) -> None: ...


@dataclass
class PyAVReader:
    """Files and network streams through PyAV (FFmpeg), tuned for low latency on live input."""

    location: str
    network: bool
    open_timeout: float = 5.0
    read_timeout: float = 2.0
    max_errors: int = 32
    scheme: str | None = None
    fps: float | None = None
    decode_errors: int = 0
    _container: Any = field(default=None, repr=False)
    _packets: Any = field(default=None, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _consecutive: int = 0
    _eof: bool = False
    _time_base: Any = None

    def __post_init__(self) -> None:
        import av

        kwargs: dict[str, Any] = {"timeout": (self.open_timeout, self.read_timeout)}
        if self.network:
            opts = {"fflags": "nobuffer", "probesize": "32768", "analyzeduration": "500000"}
            if self.scheme in ("rtsp", "rtsps"):
                opts["rtsp_transport"] = "tcp"
            kwargs["options"] = opts
        try:
            self._container = av.open(self.location, **kwargs)
        except av.error.ExitError:
            raise CemdError(self._no_data_message()) from None
        except ConnectionRefusedError:
            raise CemdError(f"connection refused by {self.location}; check that the server is running "
                            "and the host and port are right") from None
        except (av.error.FFmpegError, OSError) as exc:
            raise CemdError(self._open_failed_message(exc)) from None
        try:
            self._check_video()
        except CemdError:
            self._container.close()
            raise
        stream = self._container.streams.video[0]
        stream.thread_type = "SLICE"  # FRAME threading adds ~2 frames of latency (notes §2.2)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        self._time_base = stream.time_base
        self._packets = self._container.demux(stream)

    @property
    def frame_count(self) -> int | None:
        """Frames in the video as its container states them (None when it does not say)."""
        return int(self._container.streams.video[0].frames) or None

    def _check_video(self) -> None:
        c = self._container
        what = "stream" if self.network else "file"
        if c.format.name == "tty" or any(s.codec_context.name in _TEXT_CODECS for s in c.streams.video):
            raise CemdError(f"{self.location!r} is a text file, not a video; give a video file "
                            "(mp4, mkv, avi, ts, ...)")
        if not c.streams.video:
            kinds = ", ".join(sorted({s.type for s in c.streams})) or "no streams"
            raise CemdError(f"{what} {self.location!r} has no video stream (it holds: {kinds}); "
                            f"give a {what} with video")

    def _no_data_message(self) -> str:
        if not self.network:
            return f"reading {self.location!r} timed out after {self.open_timeout:g} s; is it on a stalled disk?"
        return (f"no video from {self.location} within the open timeout ({self.open_timeout:g} s, up to "
                f"{2 * self.open_timeout:g} s for probing); check that the sender is running and the address "
                "and port are right, or raise the open timeout")

    def _open_failed_message(self, exc: BaseException) -> str:
        reason = getattr(exc, "strerror", None) or str(exc)
        if self.network:
            return f"could not open {self.location}: {reason}; check the URL and that the server is reachable"
        return (f"{self.location!r} is not a readable video file (FFmpeg: {reason}); "
                "give a video file such as mp4, mkv, avi or ts")

    def read(self) -> DecodedFrame | None:
        import av

        while not self._pending:
            if self._eof:
                return None
            try:
                packet = next(self._packets)
            except StopIteration:
                self._eof = True
                continue
            except av.error.ExitError:
                raise SourceLost(f"no data for {self.read_timeout:g} s (read timeout)") from None
            except EOFError:
                self._eof = True
                continue
            except av.error.FFmpegError as exc:
                self._count_error(exc)
                continue
            try:
                self._pending.extend(packet.decode())
            except av.error.FFmpegError as exc:
                self._count_error(exc)
                continue
        frame = self._pending.pop(0)
        self._consecutive = 0
        if frame.is_corrupt:  # decoded with concealed damage: still shown and scored, but counted
            self.decode_errors += 1
        tb = frame.time_base or self._time_base
        try:
            image = frame.to_ndarray(format="rgb24")
        except (ValueError, av.error.FFmpegError) as exc:
            raise CemdError(f"{self.location!r}: pixel format {frame.format.name} cannot be converted to RGB "
                            f"({exc}); re-encode it, e.g. to yuv420p") from None
        return DecodedFrame(image, frame.pts,
                            (tb.numerator, tb.denominator) if tb else None)

    def _count_error(self, exc: BaseException) -> None:
        self.decode_errors += 1
        self._consecutive += 1
        if self._consecutive >= self.max_errors:
            self._consecutive = 0
            raise SourceLost(f"{self.max_errors} consecutive decode errors (last: {exc})")

    def close(self) -> None:
        if self._container is not None:
            self._packets = None
            self._container.close()
            self._container = None


@dataclass
class DeviceReader:
    """A capture device through OpenCV (V4L2), with a one-frame driver buffer for low latency."""

    index: int
    location: str
    fps: float | None = None
    decode_errors: int = 0
    _cap: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import sys

        import cv2

        backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = cv2.VideoCapture(self.index, backend)
        if not cap.isOpened():
            cap.release()
            raise CemdError(f"could not open camera {self.location} (/dev/video{self.index}); check that it "
                            "is connected, that you may use it, and that no other program holds it")
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else None
        self._cap = cap

    def read(self) -> DecodedFrame | None:
        import cv2

        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise SourceLost(f"camera {self.location} returned no frame")
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return DecodedFrame(rgb, None, None)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class SyntheticReader:
    """The synthetic endoscopy demo, rendered live (~2 ms a 640x480 frame after ~2 s of setup)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.scene = _scene(spec)
        self.fps: float | None = spec.fps
        self.decode_errors = 0
        tb = Fraction(1) / Fraction(spec.fps).limit_denominator(1001)
        self._time_base = (tb.numerator, tb.denominator)
        self._i = 0

    def read(self) -> DecodedFrame | None:
        if self._i >= self.scene.n_frames:
            return None
        image = self.scene.frame(self._i)
        frame = DecodedFrame(np.ascontiguousarray(image), self._i, self._time_base)
        self._i += 1
        return frame

    def rewind(self) -> None:
        """Loop without rebuilding the scene (setup is the slow part)."""
        self._i = 0

    def close(self) -> None:
        pass


def _scene(spec: SourceSpec) -> Any:
    from engine.synth.video import VideoScene

    return VideoScene(spec.seed, spec.seconds, spec.fps, spec.size)


def synthetic_events(spec: SourceSpec) -> dict[str, Any]:
    """Ground-truth lesion and modality intervals of a synthetic source (frame indices)."""
    if spec.kind != "synthetic":
        raise CemdError(f"{spec} is not a synthetic source; ground-truth events exist only for synthetic")
    return _scene(spec).events()


def open_reader(spec: SourceSpec, open_timeout: float = 5.0, read_timeout: float = 2.0,
                max_errors: int = 32) -> FrameReader:
    """Open the reader for ``spec``; raises ``CemdError`` when the user must fix something."""
    if spec.kind == "synthetic":
        return SyntheticReader(spec)
    if spec.kind == "device":
        assert spec.device_index is not None
        return DeviceReader(spec.device_index, spec.location)
    if spec.kind == "file" and not Path(spec.location).is_file():
        raise CemdError(f"video file {spec.location!r} does not exist (any more); give {_FORMS}")
    return PyAVReader(spec.location, spec.kind == "network", open_timeout, read_timeout, max_errors,
                      scheme=spec.scheme)
