"""``CaptureProcess``: decode a source in its own process and hand frames over shared memory.

Why a process: PyAV's ``container.close()`` holds the GIL and can deadlock a pipe reader,
a blocked read cannot be cancelled from another thread, and GC pauses in the decoder
must not stall inference (docs/streaming-notes.md §2.7). The parent can always kill it.

Design:

* **Ring ownership and capacity.** The parent creates, owns and unlinks the ``FrameRing``.
  It does not know the frame size before the source is open, so the child opens the
  source, decodes the first frame and reports its size; the parent then creates the ring
  with slots of ``max(first frame, 1920x1080)`` RGB bytes and sends back its name. A 4K
  source therefore keeps full resolution, and a later switch to a larger size is
  downscaled by the writer (``oversize_frames``) instead of crashing.
* **Channels.** One child→parent ``Pipe`` carries small tuples in order: frame
  notifications ``("f", slot, seq, t_mono_ns)``, state changes and counters. Order matters:
  ``ended`` always follows the last frame's notification. A daemon thread in the parent
  drains it at once (so a slow consumer can never fill the pipe and block the decoder) and
  wakes ``next_frame`` through a condition; it also watches the child's sentinel to report
  a dead child. The parent→child pipe carries only the ring name.
* **Modes.** ``live``: the writer always takes the next slot; ``next_frame`` returns the
  newest unread frame and counts the skipped ones as ``frames_dropped``. ``lossless``: a
  semaphore counts free slots, so the writer waits for the reader and nothing is dropped.
* **States** (published as ``SourceEvent``): opening → running ⇄ stalled → reconnecting →
  running; ended at EOF; error (open failure, fatal decode failure, dead child).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from engine.errors import CemdError
from realtime.capture.pacer import Pacer
from realtime.capture.ring import FrameRing
from realtime.capture.sources import DecodedFrame, FrameReader, SourceLost, SourceSpec, open_reader, parse_source
from realtime.states import SourceState

__all__ = ["CaptureProcess", "Frame", "SourceEvent", "STATES", "MIN_SLOT_BYTES"]

STATES = tuple(SourceState)[1:]  # what a started source reports
MIN_SLOT_BYTES = 1920 * 1080 * 3  # room for resolution changes up to 1080p without downscaling
BACKOFF_START_S, BACKOFF_CAP_S = 0.5, 8.0
_STATS_EVERY_S = 0.25
_FPS_WINDOW_NS = 2_000_000_000
_TAP_PATIENCE_S = 2.0  # lossless: how long the writer waits for an overlay display to copy a frame
_MAX_ARRIVALS = 512  # bounded even when nobody calls stats() (which trims to the window)
_PERIOD_FRAMES = 30  # frame period: from the last 30 arrivals


@dataclass
class Frame:
    """A private copy of one captured frame."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    frame_id: int  # 0-based index in the source; keeps increasing across loops and reconnects
    pts: int | None
    time_base: tuple[int, int] | None
    t_capture_mono_ns: int  # when the decoded frame was written into the ring
    t_capture_wall_ns: int
    seq: int


@dataclass(frozen=True)
class SourceEvent:
    state: str
    message: str
    t_mono_ns: int


@dataclass(frozen=True)
class _ChildConfig:
    spec: SourceSpec
    lossless: bool
    paced: bool
    loop: bool
    slots: int
    open_timeout: float
    read_timeout: float
    stall_after_s: float


class CaptureProcess:
    """Parent-side handle of the capture child: start, take frames, watch state, stop."""

    def __init__(self, spec: SourceSpec | str, realtime: bool = True, loop: bool = False, slots: int = 4,
                 open_timeout: float = 5.0, read_timeout: float = 2.0, stall_after_s: float = 2.0) -> None:
        if slots < 2:
            raise CemdError(f"the frame ring needs at least 2 slots, got {slots}")
        for name, value in (("open_timeout", open_timeout), ("read_timeout", read_timeout),
                            ("stall_after_s", stall_after_s)):
            if not value > 0:
                raise CemdError(f"{name} must be > 0 seconds, got {value!r}")
        if isinstance(spec, str):
            spec = parse_source(spec)
        self.spec = spec
        self.mode = "live" if (spec.is_live or realtime) else "lossless"
        self._cfg = _ChildConfig(spec, self.mode == "lossless", realtime and not spec.is_live, loop and not
                                 spec.is_live, slots, open_timeout, read_timeout, stall_after_s)
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()
        self._events: list[SourceEvent] = []
        self._notes: deque[tuple[int, int, int]] = deque()  # (slot, seq, t_mono_ns); live keeps <= 1
        self._arrivals: deque[int] = deque(maxlen=_MAX_ARRIVALS)  # parent receive times, for fps and period
        self._child_stats: dict[str, Any] = {}
        self._state = SourceState.NEW
        self._message = ""
        self._frames_read = 0
        self._dropped = 0
        self._delivered = 0
        self._last_capture_ns: int | None = None
        self._size: tuple[int, int] = (0, 0)
        self._ring: FrameRing | None = None
        self._proc: Any = None
        self._status: Connection | None = None
        self._free: Any = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._held: tuple[int, int] | None = None  # a slot lent out by next_frame(copy=False)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30) -> None:
        """Spawn the child and wait until the first frame is in the ring.

        Raises ``CemdError`` with the child's message when the source cannot be opened.
        """
        if self._proc is not None:
            raise CemdError("this capture was already started; make a new CaptureProcess")
        FrameRing.remove_orphans()
        deadline = time.monotonic() + timeout
        status_r, status_w = self._ctx.Pipe(duplex=False)
        ctrl_r, ctrl_w = self._ctx.Pipe(duplex=False)
        self._free = self._ctx.Semaphore(self._cfg.slots) if self._cfg.lossless else None
        self._status = status_r
        self._proc = self._ctx.Process(target=_child_main, args=(self._cfg, status_w, ctrl_r, self._free),
                                       name="cemd-capture", daemon=True)
        try:
            self._proc.start()
            status_w.close()
            ctrl_r.close()
            height, width = self._wait_opened(deadline)
            self._ring = FrameRing.create(self._cfg.slots, max(height * width * 3, MIN_SLOT_BYTES))
            ctrl_w.send(("ring", self._ring.name))
            self._thread = threading.Thread(target=self._drain, name="cemd-capture-drain", daemon=True)
            self._thread.start()
            with self._cond:
                self._cond.wait_for(lambda: self._state != SourceState.OPENING or bool(self._notes),
                                    max(0.0, deadline - time.monotonic()))
                state, message = self._state, self._message
                if state == SourceState.ERROR:
                    raise CemdError(message)
                if state == SourceState.OPENING and not self._notes:
                    raise CemdError(f"source {self.spec} opened but gave no frame within {timeout:g} s; "
                                    "check that it is sending video, or raise the start timeout")
        except BaseException:
            self.stop()
            raise
        finally:
            ctrl_w.close()

    def _wait_opened(self, deadline: float) -> tuple[int, int]:
        """Phase 1 of start: read messages until the child reports the first frame's size."""
        assert self._status is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CemdError(f"source {self.spec} did not open within the start timeout; check that it "
                                "is reachable, or raise the timeout")
            ready = wait([self._status, self._proc.sentinel], timeout=remaining)
            if self._status in ready:
                try:
                    msg = self._status.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None:
                    if msg[0] == "opened":
                        self._size = (int(msg[1]), int(msg[2]))
                        return self._size
                    self._handle(msg)
                    if self._state == SourceState.ERROR:
                        raise CemdError(self._message)
                    continue
            if self._proc.sentinel in ready or self._status in ready:
                self._proc.join(1.0)
                raise CemdError(f"capture process died while opening {self.spec} "
                                f"(exit code {self._proc.exitcode})")

    def stop(self) -> None:
        """Terminate the child, close and unlink the ring. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(3.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if self._status is not None:
            self._status.close()
        if self._ring is not None:
            self._ring.close()
            self._ring.unlink()
        self._free = None  # its finalizer unlinks the named semaphore in /dev/shm
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> "CaptureProcess":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    # ------------------------------------------------------------------ frames

    @property
    def ring_name(self) -> str | None:
        """The shared-memory ring's name, once started (an overlay display on this machine can read it)."""
        return self._ring.name if self._ring is not None else None

    def next_frame(self, timeout: float, copy: bool = True, fresh: float = 0.0) -> Frame | None:
        """The next frame (live: the newest; lossless: the oldest unread), or None.

        ``fresh`` (live mode only, a fraction of the measured frame period, 0 = off): when the
        newest frame is already older than ``fresh`` × period, wait until the next one is due
        (at most one period plus a quarter after the newest) and take that instead, counting the
        older one as dropped. A consumer slower than the source then scores frames at most
        ``fresh`` of a period old instead of up to a whole period, at the cost of fewer frames
        scored; if the next frame is late, the newest one is taken after all.

        None means: nothing arrived within ``timeout``, or the source ended/failed and every
        frame has been taken.

        ``copy=False``: ``image`` is a read-only view into the ring (no 6 MB copy per 1080p
        frame, for a consumer that reads only a crop of it). The slot stays reserved until
        ``release(frame)``, which says whether the frame stayed intact meanwhile (live mode
        may lap a slow reader); the next ``next_frame`` call releases it anyway.
        """
        self.release(None)
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._notes:
                    if self._stopped or self._state in (SourceState.ENDED, SourceState.ERROR):
                        return None
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
                if fresh > 0 and not self._cfg.lossless:
                    self._wait_fresher(fresh)
                slot, seq, _ = self._notes.popleft()
            ring, free = self._ring, self._free
            if ring is None or self._stopped:
                return None
            got = ring.read(slot, expect_seq=seq, copy=copy)
            if not copy and got is not None:
                self._held = (slot, seq)
            elif free is not None:
                free.release()
            with self._cond:
                if got is None:  # the writer lapped us during the copy: that frame is lost
                    self._dropped += 1
                    continue
                self._delivered += 1
            image, meta = got
            return Frame(image, meta.frame_id, meta.pts, meta.time_base, meta.t_capture_mono_ns,
                         meta.t_capture_wall_ns, meta.seq)

    def _wait_fresher(self, fresh: float) -> None:
        """With ``_cond`` held and a note queued: let a fresher frame replace a stale newest one."""
        period = self._period_ns()
        if period is None:
            return
        t_newest = self._notes[-1][2]
        now = time.monotonic_ns()
        if now - t_newest <= fresh * period:
            return
        deadline = t_newest + period + period // 4
        while self._notes[-1][2] == t_newest and not self._stopped and self._state not in (SourceState.ENDED, SourceState.ERROR):
            remaining = (deadline - time.monotonic_ns()) / 1e9
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _period_ns(self) -> int | None:
        """The source's frame period from recent arrivals (None until a few frames came)."""
        n = min(len(self._arrivals), _PERIOD_FRAMES + 1)
        if n < 3:
            return None
        return (self._arrivals[-1] - self._arrivals[-n]) // (n - 1)

    def release(self, frame: Frame | None) -> bool:
        """End the use of a ``copy=False`` frame; False if the writer overwrote it meanwhile."""
        held, self._held = self._held, None
        if held is None:
            return frame is None
        slot, seq = held
        intact = self._ring is not None and self._ring.holds(slot, seq)
        if self._free is not None:
            self._free.release()
        if not intact:
            with self._cond:
                self._dropped += 1
                self._delivered -= 1
        return intact

    # ------------------------------------------------------------------ status

    def poll_events(self) -> list[SourceEvent]:
        """State changes and errors since the last call."""
        with self._cond:
            events, self._events = self._events, []
        return events

    @property
    def state(self) -> str:
        return self._state

    @property
    def ended(self) -> bool:
        """The source reached EOF and every frame has been taken."""
        with self._cond:
            return self._state == SourceState.ENDED and not self._notes

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child runs, as far as the messages taken so far say.

        A child that has just exited counts as alive until its last messages (the final frames,
        ``ended``) are taken, so a caller sees ``ended`` before it sees a dead child; one that
        died unexpectedly turns the state into ``error`` before ``alive`` turns False.
        """
        if self._proc is None or self._stopped:
            return False
        if self._thread is None:
            return bool(self._proc.is_alive())
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic_ns()
        with self._cond:
            child = dict(self._child_stats)
            while self._arrivals and now - self._arrivals[0] > _FPS_WINDOW_NS:
                self._arrivals.popleft()
            n = len(self._arrivals)
            fps = (n - 1) / ((self._arrivals[-1] - self._arrivals[0]) / 1e9) if n >= 3 else 0.0
            age = None if self._last_capture_ns is None else (now - self._last_capture_ns) / 1e6
            return {
                "state": self._state,
                "message": self._message,
                "mode": self.mode,
                "frames_read": max(self._frames_read, int(child.get("frames_read", 0))),
                "frames_delivered": self._delivered,
                "frames_dropped": self._dropped,
                "decode_errors": int(child.get("decode_errors", 0)),
                "reconnects": int(child.get("reconnects", 0)),
                "loops": int(child.get("loops", 0)),
                "fps": round(fps, 2),
                "nominal_fps": child.get("nominal_fps"),
                "width": int(child.get("width", self._size[1])),
                "height": int(child.get("height", self._size[0])),
                "last_frame_age_ms": None if age is None else round(age, 1),
                "oversize_frames": int(child.get("oversize_frames", 0)),
                "torn_reads": self._ring.torn_reads if self._ring is not None else 0,
            }

    # ------------------------------------------------------------------ drain thread

    def _drain(self) -> None:
        """Move child messages into parent state as they arrive; report a dead child."""
        status, proc = self._status, self._proc
        assert status is not None
        while not self._closing:
            try:
                ready = wait([status, proc.sentinel], timeout=0.25)
            except OSError:
                return
            if status in ready:
                try:
                    msg = status.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None:
                    self._handle(msg)
                    continue
            if ready:
                break
        if self._closing:
            return
        proc.join(1.0)
        with self._cond:
            if self._state not in (SourceState.ENDED, SourceState.ERROR) and not self._closing:
                self._set_state(SourceState.ERROR, f"capture process died (exit code {proc.exitcode})", time.monotonic_ns())
            elif self._state == SourceState.ENDED and proc.exitcode not in (0, None):
                self._set_state(SourceState.ERROR, f"capture process exited with code {proc.exitcode}", time.monotonic_ns())
            self._cond.notify_all()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        with self._cond:
            if kind == "f":
                _, slot, seq, t_ns = msg
                if self._cfg.lossless:
                    self._notes.append((slot, seq, t_ns))
                else:
                    if self._notes:
                        self._dropped += len(self._notes)
                        self._notes.clear()
                    self._notes.append((slot, seq, t_ns))
                self._frames_read = seq
                self._last_capture_ns = t_ns
                self._arrivals.append(time.monotonic_ns())
            elif kind == "state":
                _, state, message, t_ns = msg
                self._set_state(state, message, t_ns)
            elif kind == "stats":
                self._child_stats.update(msg[1])
            self._cond.notify_all()

    def _set_state(self, state: str, message: str, t_ns: int) -> None:
        self._state, self._message = state, message
        self._events.append(SourceEvent(state, message, t_ns))


# ============================================================================ child side


def _child_main(cfg: _ChildConfig, status: Connection, control: Connection, free: Any) -> None:
    """Entry point of the capture process (spawned; must stay importable and picklable)."""
    import sys

    child = _CaptureChild(cfg, status, control, free)
    signal.signal(signal.SIGTERM, child.request_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    try:
        code = child.run()
    except Exception as exc:  # a bug or an unexpected library failure: report, then exit non-zero
        traceback.print_exc()
        child.set_state(SourceState.ERROR, f"capture failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        child.close()
    sys.exit(code)


class _CaptureChild:
    """The decode loop: open, pace, write into the ring, watch frame age, reconnect."""

    def __init__(self, cfg: _ChildConfig, status: Connection, control: Connection, free: Any) -> None:
        self.cfg = cfg
        self.status = status
        self.control = control
        self.free = free
        self.stopping = False
        self.lock = threading.RLock()  # status.send from the main and the watchdog thread
        self.state = ""
        self.ring: FrameRing | None = None
        self.reader: FrameReader | None = None
        self.seq = 0
        self.frame_id = 0
        self.loops = 0
        self.reconnects = 0
        self.errors_before = 0  # decode errors of readers already closed
        self.nominal_fps: float | None = None
        self.size = (0, 0)
        self.last_progress_ns = time.monotonic_ns()
        self.waiting_on_purpose = False
        self.last_stats_ns = 0

    # ---- plumbing

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def send(self, msg: tuple) -> None:
        with self.lock:
            try:
                self.status.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                self.stopping = True  # the parent is gone

    def set_state(self, state: str, message: str = "", force: bool = False) -> None:
        with self.lock:
            if state == self.state and not force:
                return
            self.state = state
            if state in (SourceState.ENDED, SourceState.ERROR, SourceState.STALLED, SourceState.RECONNECTING):
                self.send_stats()
            self.send(("state", state, message, time.monotonic_ns()))

    def send_stats(self) -> None:
        errors = self.errors_before + (self.reader.decode_errors if self.reader is not None else 0)
        self.last_stats_ns = time.monotonic_ns()
        self.send(("stats", {
            "frames_read": self.seq, "decode_errors": errors, "reconnects": self.reconnects,
            "loops": self.loops, "nominal_fps": self.nominal_fps, "height": self.size[0],
            "width": self.size[1], "oversize_frames": self.ring.oversize_frames if self.ring else 0,
        }))

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    # ---- main loop

    def run(self) -> int:
        self.set_state(SourceState.OPENING)
        try:
            self.reader = self.open()
            first = self.reader.read()
        except CemdError as exc:
            self.set_state(SourceState.ERROR, str(exc))
            return 2
        except SourceLost as exc:
            self.set_state(SourceState.ERROR, f"{self.cfg.spec} opened but gave no frame: {exc}; check that it sends video")
            return 2
        if first is None:
            self.set_state(SourceState.ERROR, f"{self.cfg.spec} holds no video frames; give a video with at least one frame")
            return 2
        self.send(("opened", first.image.shape[0], first.image.shape[1], self.nominal_fps))
        if not self.attach_ring():
            return 0
        threading.Thread(target=self.watchdog, name="cemd-capture-watchdog", daemon=True).start()
        return self.loop(first)

    def open(self) -> FrameReader:
        reader = open_reader(self.cfg.spec, self.cfg.open_timeout, self.cfg.read_timeout)
        self.nominal_fps = reader.fps
        return reader

    def attach_ring(self) -> bool:
        while not self.stopping:
            if self.control.poll(0.1):
                try:
                    _, name = self.control.recv()
                except (EOFError, OSError):
                    return False
                self.ring = FrameRing.attach(name)
                return True
            if not _parent_alive():
                return False
        return False

    def loop(self, frame: DecodedFrame | None) -> int:
        pacer = Pacer(self.nominal_fps) if self.cfg.paced else None
        while not self.stopping:
            if frame is None:  # EOF
                if self.cfg.spec.is_live:
                    frame = self.reconnect("the stream ended")
                    continue
                if not self.cfg.loop:
                    self.set_state(SourceState.ENDED, f"end of {self.cfg.spec} after {self.seq} frames")
                    return 0
                try:
                    frame = self.restart()
                except (CemdError, SourceLost) as exc:
                    self.set_state(SourceState.ERROR, f"could not restart {self.cfg.spec} for --loop: {exc}")
                    return 1
                if pacer is not None:
                    pacer.reset()
                if frame is None:
                    self.set_state(SourceState.ERROR, f"{self.cfg.spec} gave no frames when restarted for --loop")
                    return 1
                continue
            if pacer is not None:
                self.waiting_on_purpose = True  # pacing is not a stall
                self.sleep(pacer.delay(frame))
                self.waiting_on_purpose = False
                if self.stopping:
                    break
            if not self.write(frame):
                break
            try:
                frame = self.reader.read() if self.reader is not None else None
            except CemdError as exc:  # e.g. a pixel format that cannot become RGB, mid-stream
                self.set_state(SourceState.ERROR, str(exc))
                return 1
            except SourceLost as exc:
                if not self.cfg.spec.is_live:
                    self.set_state(SourceState.ERROR, f"{self.cfg.spec} cannot be decoded any further: {exc}")
                    return 1
                frame = self.reconnect(str(exc))
        return 0

    def write(self, frame: DecodedFrame) -> bool:
        assert self.ring is not None
        if self.free is not None:  # lossless: wait for a slot the reader has finished with
            self.waiting_on_purpose = True
            try:
                while not self.free.acquire(timeout=0.1):
                    if self.stopping or not _parent_alive():
                        return False
            finally:
                self.waiting_on_purpose = False
            if not self.wait_for_tap(self.seq + 1 - self.ring.slots):
                return False
        self.seq += 1
        slot = (self.seq - 1) % self.ring.slots
        t_mono, t_wall = time.monotonic_ns(), time.time_ns()
        self.ring.write(slot, self.seq, frame.image, self.frame_id, frame.pts, frame.time_base, t_mono, t_wall)
        self.size = frame.image.shape[:2]
        self.frame_id += 1
        self.last_progress_ns = time.monotonic_ns()
        self.send(("f", slot, self.seq, t_mono))
        if self.state != SourceState.RUNNING:
            self.set_state(SourceState.RUNNING, "frames are arriving")
        if self.last_progress_ns - self.last_stats_ns > _STATS_EVERY_S * 1e9:
            with self.lock:
                self.send_stats()
        return True

    def wait_for_tap(self, old_seq: int) -> bool:
        """Lossless: let an overlay display copy frame ``old_seq`` before its slot is reused.

        A display that falls 2 s behind is detached (it then counts what it misses), so a stuck
        or killed display never stalls the analysis.
        """
        assert self.ring is not None
        if old_seq < 1:
            return True
        deadline = time.monotonic() + _TAP_PATIENCE_S
        self.waiting_on_purpose = True
        try:
            while self.ring.tap_holds_back(old_seq):
                if self.stopping or not _parent_alive():
                    return False
                if time.monotonic() > deadline:
                    self.ring.tap_detach()
                    break
                time.sleep(0.001)
        finally:
            self.waiting_on_purpose = False
        return True

    def restart(self) -> DecodedFrame | None:
        """``--loop`` at EOF: rewind (synthetic) or reopen (file); frame ids keep increasing."""
        self.loops += 1
        with self.lock:
            self.send_stats()
        rewind = getattr(self.reader, "rewind", None)
        if rewind is not None:
            rewind()
        else:
            self.replace_reader(None)
            self.reader = self.open()
        return self.reader.read()

    def replace_reader(self, reader: FrameReader | None) -> None:
        if self.reader is not None:
            self.errors_before += self.reader.decode_errors
            self.reader.close()
        self.reader = reader

    def reconnect(self, reason: str) -> DecodedFrame | None:
        """Reopen a live source with exponential back-off until it gives a frame (or we stop)."""
        with self.lock:
            if self.state != SourceState.STALLED:
                self.set_state(SourceState.STALLED, reason)
        self.replace_reader(None)
        delay, attempt = BACKOFF_START_S, 0
        while not self.stopping:
            attempt += 1
            self.set_state(SourceState.RECONNECTING, f"attempt {attempt} in {delay:g} s ({reason})", force=True)
            self.sleep(delay)
            if self.stopping:
                break
            try:
                reader = self.open()
                frame = reader.read()
                if frame is None:
                    reader.close()
                    raise SourceLost("the stream ended right after opening")
            except (CemdError, SourceLost) as exc:
                reason = str(exc)
                delay = min(delay * 2, BACKOFF_CAP_S)
                continue
            self.reader = reader
            self.reconnects += 1
            return frame
        return None

    def watchdog(self) -> None:
        """Flag ``stalled`` when no frame came for ``stall_after_s`` (the read may still be blocked)."""
        limit_ns = int(self.cfg.stall_after_s * 1e9)
        while not self.stopping:
            time.sleep(0.05)
            if not _parent_alive():
                self.stopping = True
                return
            if self.waiting_on_purpose:
                self.last_progress_ns = time.monotonic_ns()
                continue
            age_ns = time.monotonic_ns() - self.last_progress_ns
            with self.lock:
                if self.state == SourceState.RUNNING and age_ns > limit_ns:
                    self.set_state(SourceState.STALLED, f"no frame for {age_ns / 1e9:.1f} s")


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()
