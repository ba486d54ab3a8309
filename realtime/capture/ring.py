"""A shared-memory ring of RGB frames between the capture process and the pipeline.

Why shared memory: pickling a 1080p frame through ``mp.Queue`` costs ~18 ms p50, a
``np.copyto`` into a mapped segment ~0.5 ms (docs/streaming-notes.md §2.5).

Layout of the one segment::

    [ global header: int64 x 8 ]  magic, version, slots, slot_bytes, owner pid, ...
    [ slot headers:  int64 x slots x N_FIELDS ]
    [ slot data:     slots x slot_bytes ]

Writer protocol per slot: ``seq=0`` (being written) → copy pixels → write meta → ``seq=n``.
Readers copy, then re-check ``seq``; a changed seq means the writer lapped the reader
during the copy (a *torn* read) and the copy is thrown away.

Only the owner (``create``) unlinks. Python 3.11 registers every attach with the resource
tracker, which may unlink the segment when the attaching process ends; see ``attach``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import secrets
import sys
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import cv2
import numpy as np

from engine.errors import CemdError

__all__ = ["FrameRing", "SlotMeta", "PTS_NONE", "NAME_PREFIX"]

NAME_PREFIX = "cemd_ring_"
PTS_NONE = np.iinfo(np.int64).min  # "no pts" sentinel in the int64 header
_MAGIC = 0x43454D4452494E47  # "CEMDRING"
_VERSION = 1
_GLOBAL = 8
# per-slot header fields
SEQ, FRAME_ID, PTS, TB_NUM, TB_DEN, T_MONO, T_WALL, HEIGHT, WIDTH = range(9)
_N_FIELDS = 10  # one spare
# global header fields for one passive reader (the overlay display's "tap")
_TAP_ON, _TAP_SEQ = 5, 6
_ALIGN = 64


@dataclass(frozen=True)
class SlotMeta:
    """What the writer stamped next to the pixels of one slot."""

    seq: int
    frame_id: int
    pts: int | None
    time_base: tuple[int, int] | None
    t_capture_mono_ns: int
    t_capture_wall_ns: int
    height: int
    width: int


class FrameRing:
    """``slots`` fixed-size frame slots in one ``SharedMemory`` segment.

    One process writes, one reads; which slot to use is the caller's policy (latest-wins or
    lossless lives in ``realtime.capture.process``). Counters are per process: ``oversize_frames`` on
    the writer, ``torn_reads`` on the reader.
    """

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.owner = owner
        glob = np.ndarray((_GLOBAL,), dtype=np.int64, buffer=shm.buf, offset=0)
        if int(glob[0]) != _MAGIC or int(glob[1]) != _VERSION:
            shm.close()
            raise CemdError(f"shared memory {shm.name!r} is not a CEMD frame ring (bad magic/version)")
        self.slots = int(glob[2])
        self.slot_bytes = int(glob[3])
        self.owner_pid = int(glob[4])
        self._glob = glob
        self._head = np.ndarray((self.slots, _N_FIELDS), dtype=np.int64, buffer=shm.buf, offset=_GLOBAL * 8)
        data_off = _data_offset(self.slots)
        self._data = np.ndarray((self.slots, self.slot_bytes), dtype=np.uint8, buffer=shm.buf, offset=data_off)
        self.oversize_frames = 0
        self.torn_reads = 0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, slots: int = 4, max_bytes: int = 1920 * 1080 * 3) -> "FrameRing":
        """Create a new segment owned by this process (it must ``unlink`` it)."""
        if slots < 2:
            raise CemdError(f"a frame ring needs at least 2 slots, got {slots}")
        if max_bytes < 3:
            raise CemdError(f"slot capacity must be at least one RGB pixel, got {max_bytes} bytes")
        slot_bytes = -(-int(max_bytes) // _ALIGN) * _ALIGN
        size = _data_offset(slots) + slots * slot_bytes
        name = f"{NAME_PREFIX}{os.getpid()}_{_boot_tag()}_{secrets.token_hex(4)}"
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        except OSError as exc:
            raise CemdError(f"could not create a {size / 1e6:.1f} MB shared-memory frame ring: {exc}; "
                            "free space in /dev/shm or use fewer/smaller slots") from exc
        glob = np.ndarray((_GLOBAL,), dtype=np.int64, buffer=shm.buf, offset=0)
        glob[:] = 0
        glob[2], glob[3], glob[4] = slots, slot_bytes, os.getpid()
        glob[1] = _VERSION
        glob[0] = _MAGIC
        head = np.ndarray((slots, _N_FIELDS), dtype=np.int64, buffer=shm.buf, offset=_GLOBAL * 8)
        head[:] = 0
        head[:, PTS] = PTS_NONE
        del glob, head
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "FrameRing":
        """Map an existing ring created by another process.

        Python < 3.13 registers the attach with the resource tracker. A process with its *own*
        tracker would then unlink the owner's segment when it exits, so we unregister. A
        multiprocessing child of the owner shares the owner's tracker (spawn passes its fd):
        there the registration is a harmless duplicate and unregistering would remove the
        owner's entry (the tracker then prints a KeyError at ``unlink``), so we keep it.
        """
        try:
            if sys.version_info >= (3, 13):
                shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
            else:
                shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise CemdError(f"frame ring {name!r} does not exist (its owner stopped or never created it)") from None
        ring = cls(shm, owner=False)
        if sys.version_info < (3, 13) and not _shares_tracker_with(ring.owner_pid):
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return ring

    @property
    def name(self) -> str:
        return self._shm.name

    def close(self) -> None:
        """Unmap (idempotent). Views handed out earlier must be gone; ``read`` only returns copies."""
        if self._closed:
            return
        self._closed = True
        del self._glob, self._head, self._data
        try:
            self._shm.close()
        except BufferError:  # a stray view still exported; the mapping goes with the process
            pass

    def unlink(self) -> None:
        """Remove the segment name (owner only; idempotent)."""
        if not self.owner:
            return
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
        self.owner = False

    @staticmethod
    def remove_orphans(shm_dir: str = "/dev/shm") -> list[str]:
        """Unlink rings whose owner process is gone (left behind by a SIGKILLed owner)."""
        removed = []
        pattern = re.compile(rf"^{NAME_PREFIX}(\d+)_")
        for path in Path(shm_dir).glob(f"{NAME_PREFIX}*"):
            m = pattern.match(path.name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    path.unlink()
                    removed.append(path.name)
                except OSError:
                    pass
        return removed

    # ------------------------------------------------------------------ writer

    def write(self, slot: int, seq: int, image: np.ndarray, frame_id: int, pts: int | None,
              time_base: tuple[int, int] | None, t_mono_ns: int, t_wall_ns: int) -> bool:
        """Copy one RGB frame into ``slot`` and publish it as ``seq`` (>= 1).

        A frame larger than the slot is downscaled (INTER_AREA) to fit, so a mid-stream
        resolution change cannot crash the writer; returns True (and counts) when that happened.
        """
        if seq < 1:
            raise ValueError("seq must be >= 1 (0 marks a slot being written)")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 frame, got {image.shape} {image.dtype}")
        oversize = image.nbytes > self.slot_bytes
        if oversize:
            image = fit_to_bytes(image, self.slot_bytes)
            self.oversize_frames += 1
        h, w = image.shape[:2]
        head = self._head[slot]
        head[SEQ] = 0
        dst = self._data[slot, : h * w * 3].reshape(h, w, 3)
        np.copyto(dst, image)
        head[FRAME_ID] = frame_id
        head[PTS] = PTS_NONE if pts is None else pts
        head[TB_NUM], head[TB_DEN] = time_base if time_base else (0, 0)
        head[T_MONO], head[T_WALL] = t_mono_ns, t_wall_ns
        head[HEIGHT], head[WIDTH] = h, w
        head[SEQ] = seq
        return oversize

    # ------------------------------------------------------------------ reader

    def seq(self, slot: int) -> int:
        return int(self._head[slot, SEQ])

    def read(self, slot: int, expect_seq: int | None = None, copy: bool = True
             ) -> tuple[np.ndarray, SlotMeta] | None:
        """A private copy of ``slot`` and its meta, or None when torn/being written/not ``expect_seq``.

        ``copy=False`` returns a read-only view into the segment instead: valid only while the
        slot still holds ``seq`` (check with ``holds``), for a reader that needs only part of it.
        """
        head = self._head[slot]
        seq = int(head[SEQ])
        if seq == 0 or (expect_seq is not None and seq != expect_seq):
            self.torn_reads += 1
            return None
        h, w = int(head[HEIGHT]), int(head[WIDTH])
        pts = int(head[PTS])
        num, den = int(head[TB_NUM]), int(head[TB_DEN])
        meta = SlotMeta(seq, int(head[FRAME_ID]), None if pts == PTS_NONE else pts,
                        (num, den) if den else None, int(head[T_MONO]), int(head[T_WALL]), h, w)
        if h * w * 3 > self.slot_bytes or h <= 0 or w <= 0:
            self.torn_reads += 1
            return None
        image = self._data[slot, : h * w * 3].reshape(h, w, 3)
        if not copy:
            image = image.view()
            image.flags.writeable = False
            return image, meta
        image = image.copy()
        if int(head[SEQ]) != seq:
            self.torn_reads += 1
            return None
        return image, meta

    # ------------------------------------------------------------------ tap (a second, passive reader)

    def tap_attach(self) -> None:
        """Register a passive reader (the overlay display): a lossless writer then keeps each frame
        until the tap has copied it (``tap_done``), so the tap sees every frame of a file analysis."""
        self._glob[_TAP_SEQ] = 0
        self._glob[_TAP_ON] = 1

    def tap_done(self, seq: int) -> None:
        self._glob[_TAP_SEQ] = seq

    def tap_detach(self) -> None:
        self._glob[_TAP_ON] = 0

    def tap_holds_back(self, seq: int) -> bool:
        """True while an attached tap has not yet copied frame ``seq`` (the writer wants its slot)."""
        return bool(self._glob[_TAP_ON]) and int(self._glob[_TAP_SEQ]) < seq

    def holds(self, slot: int, seq: int) -> bool:
        """True while ``slot`` still holds frame ``seq`` (the writer has not started over it)."""
        return int(self._head[slot][SEQ]) == seq

    def __repr__(self) -> str:
        return f"FrameRing({self.name!r}, slots={self.slots}, slot_bytes={self.slot_bytes})"


def fit_to_bytes(image: np.ndarray, max_bytes: int) -> np.ndarray:
    """Downscale (keeping the aspect ratio) so that ``image.nbytes <= max_bytes``."""
    h, w = image.shape[:2]
    scale = math.sqrt(max_bytes / (h * w * 3))
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    while nh * nw * 3 > max_bytes:
        nh, nw = max(1, nh - 1), max(1, nw - 1)
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)


def _data_offset(slots: int) -> int:
    head_end = (_GLOBAL + slots * _N_FIELDS) * 8
    return -(-head_end // _ALIGN) * _ALIGN


def _boot_tag() -> str:
    """A short boot id: names from an earlier boot can never collide with ours."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "noboot"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shares_tracker_with(owner_pid: int) -> bool:
    """True when this process is the owner or its multiprocessing child (same resource tracker)."""
    if owner_pid == os.getpid():
        return True
    parent = multiprocessing.parent_process()
    return parent is not None and parent.pid == owner_pid
