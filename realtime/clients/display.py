"""The overlay display (`cemd display`, or `run_stream.py --overlay window|file`).

Its own process. It shows **every** frame, from the monitor's capture ring (same machine,
``--ring NAME``; frame ids match the monitor's exactly) or from the source itself
(``--source``), and draws on it the **latest** result received over ZeroMQ. The video never
waits for the model: a frame is drawn as soon as it is available, with whatever result is
newest; when results stop (no message for 3 s, or no score for ``max_result_age_s``) it shows
AI NOT ACTIVE and recovers by itself when they come back.

Outputs: ``window`` (OpenCV; keys h heat map, +/- opacity, q quit), ``file`` (H.264 via
PyAV with the input's frame count and timestamps), ``none`` (for measuring). The latency it
adds (frame available → shown/written) is measured per frame and reported in the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import zmq

from engine.errors import CemdError
from realtime.clients.layout import Layout
from realtime.clients.overlay import OverlayOptions, ResultState, View, draw_overlay, scale_view
from realtime.publish.schema import DEFAULT_ENDPOINT, TOPICS, SchemaError, decode
from realtime.stats import latency_summary

MAX_MESSAGE_BYTES = 1 << 20


@dataclass
class FeedFrame:
    image: np.ndarray  # RGB, owned by the caller
    frame_id: int
    pts: int | None
    time_base: tuple[int, int] | None
    t_available_ns: int  # monotonic: when the frame could first be shown


# ---------------------------------------------------------------------------- frame feeds


class RingFeed:
    """Every frame the monitor's capture process writes into its shared-memory ring, in order.

    A passive reader: it polls the slots' sequence stamps, never holds a slot, and counts the
    frames it was too slow to copy before the writer reused their slot (``missed``).
    """

    def __init__(self, name: str, poll_s: float = 0.002, idle_end_s: float = 5.0) -> None:
        """``poll_s``: the shortest sleep between looks at the ring. Between frames it sleeps up to
        the next frame's expected arrival (a quarter period early), not a fixed 2 ms: each wake-up
        on a 2-core machine can stall the scorer's OpenMP team for a while."""
        from realtime.capture.ring import FrameRing

        try:
            self.ring = FrameRing.attach(name)
        except (FileNotFoundError, CemdError, ValueError) as exc:
            raise CemdError(f"cannot attach to capture ring {name!r}: {exc}") from None
        self.poll_s, self.idle_end_s = poll_s, idle_end_s
        self.last_seq = 0
        self.missed = 0
        self.ended = False
        self.fps: float | None = None
        self.time_base: tuple[int, int] | None = None
        self._last_new = time.monotonic()
        self._period: float | None = None  # seconds between frames, smoothed
        self.finishing = False  # set on stop: take what is left, then end
        self.ring.tap_attach()  # a lossless (--fast) capture now keeps each frame until we have it

    def next(self, timeout: float) -> FeedFrame | None:
        deadline = time.monotonic() + timeout
        while True:
            newer = sorted((seq, slot) for slot in range(self.ring.slots)
                           if (seq := self.ring.seq(slot)) > self.last_seq)
            for seq, slot in newer:
                got = self.ring.read(slot, expect_seq=seq, copy=True)
                if got is None:  # overwritten while we copied: that frame is lost to us
                    continue
                image, meta = got
                self.missed += max(0, seq - self.last_seq - 1)
                now = time.monotonic()
                if self.last_seq and seq == self.last_seq + 1 and len(newer) == 1:
                    gap = now - self._last_new
                    self._period = gap if self._period is None else 0.9 * self._period + 0.1 * gap
                self.last_seq = seq
                self._last_new = now
                self.time_base = self.time_base or meta.time_base
                self.ring.tap_done(seq)
                return FeedFrame(image, meta.frame_id, meta.pts, meta.time_base, meta.t_capture_mono_ns)
            now = time.monotonic()
            if self.finishing or now - self._last_new > self.idle_end_s:
                self.ended = True
                return None
            if now >= deadline:
                return None
            nap = self.poll_s
            if self._period is not None:  # asleep until a quarter period before the next frame is due
                nap = max(nap, min(0.05, self._last_new + 0.75 * self._period - now))
            time.sleep(min(nap, max(0.0, deadline - now) + 0.001))

    def close(self) -> None:
        self.ring.tap_detach()
        self.ring.close()


class SourceFeed:
    """The source itself (file, stream, device, synthetic), decoded here; files paced by PTS."""

    def __init__(self, source: str, paced: bool = True) -> None:
        from realtime.capture.pacer import Pacer
        from realtime.capture.sources import open_reader, parse_source

        self.spec = parse_source(source)
        self.reader = open_reader(self.spec)
        self.fps = getattr(self.reader, "fps", None)
        self.pacer = Pacer(self.fps) if paced and not self.spec.is_live else None
        self.frame_id = 0
        self.missed = 0
        self.ended = False
        self.finishing = False
        self.time_base: tuple[int, int] | None = None

    def next(self, timeout: float) -> FeedFrame | None:
        if self.finishing:
            self.ended = True
            return None
        frame = self.reader.read()
        if frame is None:
            self.ended = True
            return None
        if self.pacer is not None:
            wait = self.pacer.delay(frame)
            if wait > 0:
                time.sleep(wait)
        out = FeedFrame(frame.image, self.frame_id, frame.pts, frame.time_base, time.monotonic_ns())
        self.time_base = self.time_base or frame.time_base
        self.frame_id += 1
        return out

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------- outputs


class FileOutput:
    """Annotated H.264 video with the input's timestamps (one output frame per input frame)."""

    def __init__(self, path: Path, fps: float | None, time_base: tuple[int, int] | None) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.av = av
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps or 30).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        # one encoder thread: the display shares the machine with the scorer, whose OpenMP team
        # stalls whenever another busy thread takes one of its cores
        self.stream.options = {"preset": "ultrafast", "crf": "20", "bf": "0", "threads": "1"}
        self.stream.codec_context.thread_count = 1
        self.time_base = Fraction(*time_base) if time_base else None
        self.frames = 0
        self._opened = False
        self._offset, self._last_pts, self._step = 0, None, None  # output pts keep increasing (--loop)

    def write(self, image: np.ndarray, pts: int | None) -> None:
        h, w = image.shape[:2]
        if h % 2 or w % 2:  # 4:2:0 needs even sides: repeat the last row/column
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if not self._opened:
            self.stream.width, self.stream.height = image.shape[1], image.shape[0]
            if self.time_base is not None:
                self.stream.time_base = self.time_base
                self.stream.codec_context.time_base = self.time_base
            self._opened = True
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if self.time_base is not None and pts is not None:
            out = pts + self._offset
            if self._last_pts is not None and out <= self._last_pts:  # a looped source starts over
                step = self._step or 1
                self._offset = self._last_pts + step - pts
                out = pts + self._offset
            if self._last_pts is not None:
                self._step = out - self._last_pts
            self._last_pts = out
            frame.pts, frame.time_base = out, self.time_base
        else:
            frame.pts, frame.time_base = self.frames, self.stream.codec_context.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._opened:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        self.container.close()


class WindowOutput:
    """An OpenCV window; returns the key pressed (h, +, -, q) to the loop."""

    def __init__(self, title: str = "cemd overlay") -> None:
        import cv2

        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise CemdError("--output window needs a screen (DISPLAY is not set); use --output file --out FILE.mp4, "
                            "or run under a virtual X server (xvfb-run)")
        self.cv2, self.title = cv2, title
        self.size: tuple[int, int] | None = None
        try:  # resizable, aspect kept, no toolbar or status bar (a clinical screen, not an image viewer)
            cv2.namedWindow(title, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as exc:
            raise CemdError(f"cannot open a window: {exc}") from None

    def show(self, image: np.ndarray) -> str | None:
        if self.size != image.shape[:2]:  # the frame's own size at first, and when the source changes size
            self.size = image.shape[:2]
            self.cv2.resizeWindow(self.title, image.shape[1], image.shape[0])
        self.cv2.imshow(self.title, image[..., ::-1])
        return self.pump()

    def pump(self) -> str | None:
        key = self.cv2.waitKey(1) & 0xFF
        return chr(key) if key != 0xFF else None

    def close(self) -> None:
        try:
            self.cv2.destroyWindow(self.title)
            self.cv2.waitKey(1)
        except self.cv2.error:
            pass


# ---------------------------------------------------------------------------- results


class ResultReceiver:
    """A SUB socket in a thread, feeding ``ResultState``; bad bytes become problems, never crashes."""

    def __init__(self, endpoint: str, state: ResultState, curve: tuple[Path, Path] | None = None) -> None:
        self.endpoint, self.state = endpoint, state
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.maxmsgsize = MAX_MESSAGE_BYTES
        self._sub.linger = 0
        self._sub.rcvhwm = 1000
        self._sub.reconnect_ivl_max = 2000
        if curve is not None:
            from realtime.publish.keys import load_keypair, load_public_key

            public, secret = load_keypair(curve[0], "client secret")
            self._sub.curve_publickey, self._sub.curve_secretkey = public, secret
            self._sub.curve_serverkey = load_public_key(curve[1], "monitor (server) public")
        for topic in TOPICS:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            self._sub.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sub.close(0)
            self._ctx.term()
            raise CemdError(f"bad monitor endpoint {endpoint!r}: {exc}") from None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cemd-display-sub", daemon=True)

    def start(self) -> ResultReceiver:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sub.poll(100):
                    continue
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                self.state.update(decode(frames))
            except SchemaError as exc:
                self.state.problem(f"ignored a message: {exc}")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._sub.close(0)
        self._ctx.term()


# ---------------------------------------------------------------------------- the display


@dataclass
class DisplayConfig:
    endpoint: str = DEFAULT_ENDPOINT
    source: str | None = None
    ring: str | None = None
    output: str = "window"  # window | file | none
    out: Path | None = None
    paced: bool = True
    options: OverlayOptions | None = None
    curve: tuple[Path, Path] | None = None
    cue: str | None = None  # "bell" or a sound file
    summary: Path | None = None
    max_seconds: float | None = None
    max_width: int | None = None  # frames wider than this are shown/written scaled down to it
    draw_log: Path | None = None  # one JSON line per frame shown: what was drawn on it


LAYOUT_EVERY = 30  # frames between two measurements of where labels may go (the scope's text, the lit area)


class OverlayDisplay:
    def __init__(self, cfg: DisplayConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        if (cfg.source is None) == (cfg.ring is None):
            raise CemdError("give exactly one frame feed: --source SOURCE (decode it here) or --ring NAME "
                            "(the monitor's capture ring, same machine)")
        if cfg.output not in ("window", "file", "none"):
            raise CemdError(f"--output must be window, file or none, not {cfg.output!r}")
        if cfg.output == "file" and cfg.out is None:
            raise CemdError("--output file needs --out FILE.mp4")
        self.cfg, self.log = cfg, log
        self.options = cfg.options or OverlayOptions()
        self.state = ResultState(self.options)
        self._stop = threading.Event()
        self.latency: list[float] = []
        self.counts = {"frames": 0, "inactive_frames": 0, "alert_frames": 0, "cues": 0}
        self.inactive_spans: list[list[int]] = []  # [first, last] frame ids shown with AI NOT ACTIVE
        self.alert_spans: list[list[int]] = []
        self.write_error: str | None = None
        self.layout: Layout | None = None
        self._layout_age = 0
        self._draw_log: Any = None

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        receiver = ResultReceiver(cfg.endpoint, self.state, cfg.curve)  # connected before the first frame
        feed = self._open_feed(receiver)
        if feed is None:
            return {}
        output: Any = None
        t0 = time.monotonic()
        was_active: bool | None = None
        try:
            receiver.start()
            if cfg.draw_log:
                cfg.draw_log.parent.mkdir(parents=True, exist_ok=True)
                self._draw_log = open(cfg.draw_log, "w", encoding="utf-8")  # noqa: SIM115 — closed below
            if cfg.output == "window":
                output = WindowOutput()
            while True:
                if self._stop.is_set():
                    feed.finishing = True
                if cfg.max_seconds and time.monotonic() - t0 >= cfg.max_seconds:
                    break
                frame = feed.next(timeout=0.05)
                if frame is None:
                    if feed.ended:
                        break
                    if isinstance(output, WindowOutput) and self._key(output.pump()):
                        break
                    continue
                if cfg.output == "file" and output is None:
                    output = FileOutput(cfg.out, feed.fps, feed.time_base)  # type: ignore[arg-type]
                image, view = self._draw(frame)
                output, key = self._emit(output, image, frame)
                was_active = self._after_frame(frame, view, was_active)
                if self._key(key):
                    break
        finally:
            receiver.close()
            feed.close()
            if output is not None:
                output.close()
            if self._draw_log is not None:
                self._draw_log.close()
        return self._summary(feed, time.monotonic() - t0)

    def _open_feed(self, receiver: ResultReceiver) -> RingFeed | SourceFeed | None:
        """The frame feed (the ring or the source); None, receiver closed, if the monitor ended before its capture."""
        cfg = self.cfg
        try:
            ring = self._ring_name() if cfg.ring else None
            if cfg.ring and not ring:
                self.log("the monitor ended before its capture started: nothing to show")
                receiver.close()
                return None
            feed: RingFeed | SourceFeed = RingFeed(ring) if ring else SourceFeed(cfg.source or "", cfg.paced)
            if cfg.ring == "-":  # tell the monitor we hold the ring: it starts scoring (and recycling slots) now
                print("ready", flush=True)
        except BaseException:
            receiver.close()
            raise
        return feed

    def _draw(self, frame: FeedFrame) -> tuple[np.ndarray, View]:
        """The frame (scaled down to ``max_width`` if wider) with the latest result drawn on it, and that result."""
        cfg = self.cfg
        view = self.state.view()
        if self.latency:
            view.display_latency_ms = self.latency[-1]
        if self._draw_log is not None:  # in source pixels, before any scaling
            box = view.location.get("box") if view.location else None
            self._draw_log.write(json.dumps({"frame_id": frame.frame_id, "result_frame_id": view.result_frame_id,
                                             "box": box, "event_id": view.event_id, "active": view.active}) + "\n")
        image = frame.image
        drawn = view
        if cfg.max_width and image.shape[1] > cfg.max_width:  # draw and show/write smaller
            factor = cfg.max_width / image.shape[1]
            size = (cfg.max_width, max(2, int(round(image.shape[0] * factor))))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            drawn = scale_view(view, factor)
        elif not image.flags.writeable:
            image = image.copy()
        if self.layout is None or self.layout.shape != image.shape[:2] or self._layout_age >= LAYOUT_EVERY:
            self.layout, self._layout_age = Layout.measure(image, self.layout), 0  # before anything is drawn on it
        self._layout_age += 1
        draw_overlay(image, drawn, self.options, self.layout)
        return image, view

    def _emit(self, output: Any, image: np.ndarray, frame: FeedFrame) -> tuple[Any, str | None]:
        """Write or show the drawn frame: the output (None once a write failed) and the key pressed in the window."""
        if isinstance(output, FileOutput):
            try:
                output.write(image, frame.pts)
            except Exception as exc:  # noqa: BLE001 — an encoder error or a full disk: say so, go on
                self.log(f"cannot write {self.cfg.out}: {exc}; the annotated video ends here")
                self.write_error = str(exc)
                try:
                    output.close()
                except Exception:  # noqa: BLE001
                    pass
                output, self.cfg.output = None, "none"
            return output, None
        if isinstance(output, WindowOutput):
            return output, output.show(image)
        return output, None

    def _after_frame(self, frame: FeedFrame, view: View, was_active: bool | None) -> bool | None:
        """Book a shown frame (latency, counts, AI active/NOT ACTIVE and link log lines, cue); returns its activity."""
        self.latency.append((time.monotonic_ns() - frame.t_available_ns) / 1e6)
        self._count(frame.frame_id, view)
        if was_active is not view.active:
            self.log("AI active" if view.active else f"AI NOT ACTIVE: {view.reason}")
            was_active = view.active
        for text in self.state.take_problems():
            self.log(f"monitor link: {text}")
        self._cue()
        return was_active

    def _ring_name(self) -> str:
        """``--ring -``: the monitor that started us writes the name on stdin once its capture runs,
        and closes stdin when the run ends (then we show what is left in the ring and stop)."""
        if self.cfg.ring != "-":
            return self.cfg.ring or ""
        import select

        ready, _, _ = select.select([sys.stdin], [], [], 300)
        if not ready:
            raise CemdError("no capture ring name arrived on stdin (--ring - is for run_stream.py --overlay)")
        line = sys.stdin.readline().strip()
        if not line:  # EOF: the monitor stopped (e.g. a bad bundle) before starting its capture
            return ""

        def watch_stdin() -> None:
            sys.stdin.read()  # returns at EOF: the monitor is done
            self._stop.set()

        threading.Thread(target=watch_stdin, name="cemd-display-stdin", daemon=True).start()
        return line

    def _key(self, key: str | None) -> bool:
        if key == "h":
            self.options.heatmap = not self.options.heatmap
        elif key == "d":
            self.options.debug = not self.options.debug
        elif key in ("+", "="):
            self.options.change_opacity(+0.1)
        elif key in ("-", "_"):
            self.options.change_opacity(-0.1)
        return key in ("q", "\x1b")

    def _count(self, frame_id: int, view: View) -> None:
        self.counts["frames"] += 1
        for flag, spans, key in ((not view.active, self.inactive_spans, "inactive_frames"),
                                 (view.event_id is not None, self.alert_spans, "alert_frames")):
            if flag:
                self.counts[key] += 1
                if spans and spans[-1][1] == frame_id - 1:
                    spans[-1][1] = frame_id
                else:
                    spans.append([frame_id, frame_id])

    def _cue(self) -> None:
        starts = self.state.take_event_starts()
        if not starts or not self.cfg.cue:
            return
        self.counts["cues"] += len(starts)
        if self.cfg.cue == "bell":
            sys.stderr.write("\a")
            sys.stderr.flush()
            return
        player = next((p for p in ("paplay", "aplay", "afplay") if shutil.which(p)), None)
        if player is None:
            self.log("no sound player (paplay/aplay/afplay) found for --cue; use --cue bell")
            self.cfg.cue = "bell"
            return
        subprocess.Popen([player, self.cfg.cue], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _summary(self, feed: RingFeed | SourceFeed, seconds: float) -> dict[str, Any]:
        out = {
            "schema": "cemd.display/1", "seconds": round(seconds, 2), "endpoint": self.cfg.endpoint,
            "feed": "ring" if self.cfg.ring else "source", "output": self.cfg.output,
            "out": str(self.cfg.out) if self.cfg.out else None,
            "frames_shown": self.counts["frames"], "frames_missed": feed.missed,
            "inactive_frames": self.counts["inactive_frames"], "alert_frames": self.counts["alert_frames"],
            "inactive_spans": self.inactive_spans, "alert_spans": self.alert_spans,
            "cues": self.counts["cues"], "write_error": self.write_error,
            "display_latency_ms": latency_summary(self.latency),
            "messages": dict(self.state.counts), "problems": self.state.problems[-20:],
        }
        if self.cfg.summary:
            self.cfg.summary.parent.mkdir(parents=True, exist_ok=True)
            self.cfg.summary.write_text(json.dumps(out, indent=2) + "\n")
        return out


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT, help="the monitor's PUB endpoint")
    feed = p.add_mutually_exclusive_group(required=True)
    feed.add_argument("--source", help="decode this source here (file, URL, device:N, synthetic[:…])")
    feed.add_argument("--ring", help="read frames from the monitor's capture ring (same machine); '-': the "
                                     "name comes on stdin (how run_stream.py --overlay starts us)")
    p.add_argument("--output", choices=["window", "file", "none"], default="window")
    p.add_argument("--out", type=Path, help="annotated video for --output file (H.264)")
    p.add_argument("--fast", action="store_true", help="--source files: as fast as possible instead of paced")
    p.add_argument("--heatmap", action=argparse.BooleanOptionalAction, default=None,
                   help="start with the heat map on (default off; key h toggles)")
    p.add_argument("--debug-overlay", action="store_true",
                   help="show the technical numbers: latencies, backend, score and threshold (key d toggles)")
    p.add_argument("--draw-log", type=Path, metavar="FILE",
                   help="write one JSON line per frame shown: its frame id, the result frame drawn on it, the box "
                        "(source pixels), the event and whether the AI was active")
    p.add_argument("--opacity", type=float, help="heat-map opacity 0.05–1 (keys +/-; default 0.45)")
    p.add_argument("--max-result-age", type=float, metavar="S",
                   help="AI NOT ACTIVE when the newest score is older than this (default 1 s)")
    p.add_argument("--cue", help="at each alert start: 'bell' (terminal bell) or a sound file to play")
    p.add_argument("--curve-secret", type=Path, metavar="FILE", help="this client's CURVE secret key (cemd keys)")
    p.add_argument("--curve-server-key", type=Path, metavar="FILE", help="the monitor's CURVE public key")
    p.add_argument("--max-width", type=int, metavar="PX",
                   help="show/write frames wider than this scaled down to it (less CPU at 1080p; default: full size)")
    p.add_argument("--summary", type=Path, help="write a JSON summary here at the end")
    p.add_argument("--max-seconds", type=float)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a monitor config file: its [display] section sets the look (options given here win)")


def config_from_args(args: argparse.Namespace) -> DisplayConfig:
    from realtime.config import DisplaySection, load_config

    look = load_config(args.config).display if getattr(args, "config", None) else DisplaySection()
    for key, value in (("opacity", look.opacity), ("max_result_age", look.max_result_age_s), ("cue", look.cue)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.heatmap is None:
        args.heatmap = look.heatmap
    args.debug_overlay = args.debug_overlay or look.debug
    if not 0.05 <= args.opacity <= 1:
        raise CemdError(f"--opacity must be between 0.05 and 1, got {args.opacity}")
    if args.max_width is not None and args.max_width < 64:
        raise CemdError(f"--max-width must be at least 64 pixels, got {args.max_width}")
    if args.max_result_age <= 0:
        raise CemdError(f"--max-result-age must be > 0 s, got {args.max_result_age}")
    if bool(args.curve_secret) != bool(args.curve_server_key):
        raise CemdError("CURVE needs both --curve-secret (this client's key) and --curve-server-key (the monitor's)")
    if args.cue and args.cue != "bell" and not Path(args.cue).is_file():
        raise CemdError(f"--cue: no sound file {args.cue!r} (or use --cue bell)")
    return DisplayConfig(
        endpoint=args.endpoint, source=args.source, ring=args.ring, output=args.output, out=args.out,
        paced=not args.fast,
        options=OverlayOptions(heatmap=args.heatmap, debug=args.debug_overlay, opacity=args.opacity,
                               max_result_age_s=args.max_result_age),
        curve=(args.curve_secret, args.curve_server_key) if args.curve_secret else None,
        cue=args.cue, summary=args.summary, max_seconds=args.max_seconds, max_width=args.max_width,
        draw_log=args.draw_log)


def run_cli(args: argparse.Namespace) -> int:
    display = OverlayDisplay(config_from_args(args))
    signal.signal(signal.SIGTERM, display.request_stop)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, display.request_stop)
    summary = display.run()
    if not summary:
        return 0
    lat = summary["display_latency_ms"]
    print(f"display: {summary['frames_shown']} frames shown, {summary['frames_missed']} missed, "
          f"{summary['alert_frames']} with an open alert, {summary['inactive_frames']} with AI NOT ACTIVE; "
          f"frame → shown p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("display", help="the overlay display: video with the monitor's latest result drawn on it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_cli)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cemd display", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except CemdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
