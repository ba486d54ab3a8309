"""Durable alert record: one JSON line per alert message, fsync'd before the alert is sent.

Append-only JSON lines survive a crash at any instant: the worst case is one torn final
line, which readers skip (and count). The same file serves "alerts since seq N" replays,
so a client that lost alerts on the wire gets exactly what was recorded.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from realtime.publish.schema import dumps


class AlertLog:
    """``alerts.jsonl`` of one run folder; may hold alerts of several publisher boots."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.torn_lines = 0  # unparseable final lines seen by read() (a write cut short)
        self.corrupt_lines = 0  # unparseable lines elsewhere (should never happen)
        self._fd: int | None = None

    def open(self) -> None:
        """Open for appending now, so a folder we cannot write to is known before the first alert."""
        if self._fd is not None:
            return
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and not self._ends_with_newline(size):
                # A previous run died mid-line: end that fragment so our first record is a whole line.
                os.write(fd, b"\n")
                os.fsync(fd)
            if created:
                _fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, message: dict[str, Any]) -> None:
        """Write one complete line and fsync it; OSError (disk full, read-only) goes to the caller."""
        self.open()
        assert self._fd is not None
        line = dumps(message) + b"\n"
        before = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:  # best effort: leave no partial line for the next record to be glued onto
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            self.close()  # reopen on the next append, in case the folder comes back
            raise

    def read(self, since_seq: int, boot_id: str | None = None) -> list[dict[str, Any]]:
        """Logged alert messages with seq > since_seq (of ``boot_id`` when given), in log order."""
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return []  # /dev/full, a FIFO: nothing logged can be read back (and a device may never end)
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        alerts = []
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                message = json.loads(line)
                seq = message["seq"]
                boot = message["boot_id"]
            except (ValueError, KeyError, TypeError):
                if index == len(lines) - 1:
                    self.torn_lines += 1
                else:
                    self.corrupt_lines += 1
                continue
            if isinstance(seq, int) and seq > since_seq and (boot_id is None or boot == boot_id):
                alerts.append(message)
        return alerts

    def resume(self) -> tuple[int, int, list[dict[str, Any]]]:
        """What a monitor started again on this run folder (``--supervise`` restarts it there) must
        continue, from one read of the log: the highest alert seq and the highest event id over
        every boot (-1 each when empty), so that none is used twice; and the last logged message
        of each event with no ``end``, in log order (a monitor that died left them open)."""
        seq = -1
        last: dict[int, dict[str, Any]] = {}
        for message in self.read(-1):
            seq = max(seq, message["seq"])
            event_id = message.get("event_id")
            if isinstance(event_id, int) and not isinstance(event_id, bool):
                last.pop(event_id, None)  # re-insert: dict order follows each event's latest message
                last[event_id] = message
        return seq, max(last, default=-1), [m for m in last.values() if m.get("event") != "end"]

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _ends_with_newline(self, size: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    """A new file's directory entry is durable only once its folder is fsync'd."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
