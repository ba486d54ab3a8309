"""The alert state machine: N-of-M debouncing, hold time, modality switches.

One implementation, used twice: ``realtime.scoring.alerts.AlertLogic`` runs it live (and adds the
event payloads, peaks and locations), and calibration replays recorded scores through it to
count the alerts a threshold would have raised. So a calibrated false-alert rate is the rate
of the live logic, not of an approximation of it.

Rules (times are source times in ns, so dropped frames do not stretch anything):

* a frame is *above* when its score exceeds the threshold of the branch that scored it;
* an event opens when at least N of the last M scored frames of the same modality were above;
* it stays open while above frames keep coming and ends when a frame below the threshold
  arrives more than ``hold_ms`` after the last above frame;
* a modality switch ends the open event and clears the window (the other branch has its own
  scale).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Step:
    """What one frame did: the reasons of events it ended (0–2) and whether it opened one."""

    ended: list[str] = field(default_factory=list)
    opened: bool = False
    counts: bool = False  # above and inside an event (new or open): the frame belongs to it


class Debouncer:
    def __init__(self, n: int, m: int, hold_ms: float) -> None:
        self.n, self.hold_ns = n, hold_ms * 1e6
        self._window: deque[bool] = deque(maxlen=m)
        self.modality: str | None = None
        self.is_open = False
        self.last_above_ns = 0

    def close(self) -> bool:
        """End the open event, if any (source ended, switch, shutdown); True if one was open."""
        was = self.is_open
        self.is_open = False
        self._window.clear()
        return was

    def step(self, t_ns: int, modality: str, above: bool) -> Step:
        out = Step()
        if self.modality is not None and modality != self.modality and self.close():
            out.ended.append("modality_switch")
        self.modality = modality
        self._window.append(above)
        if self.is_open and not above and t_ns - self.last_above_ns > self.hold_ns:
            self.close()
            out.ended.append("below_threshold")
            self._window.append(above)
        if above and (self.is_open or sum(self._window) >= self.n):
            out.opened = not self.is_open
            self.is_open, self.last_above_ns, out.counts = True, t_ns, True
        return out


def count_events(t_ms: np.ndarray, modality: np.ndarray, above: np.ndarray, n: int, m: int,
                 hold_ms: float, segment: np.ndarray | None = None) -> np.ndarray:
    """Frame indices at which an event opens, replaying the live state machine.

    ``segment`` (optional, one id per frame) restarts the machine where it changes: separate
    videos are separate examinations.
    """
    deb = Debouncer(n, m, hold_ms)
    starts = []
    seg_prev = None
    for i in range(len(above)):
        if segment is not None and segment[i] != seg_prev:
            deb = Debouncer(n, m, hold_ms)
            seg_prev = segment[i]
        if deb.step(int(t_ms[i] * 1e6), str(modality[i]), bool(above[i])).opened:
            starts.append(i)
    return np.asarray(starts, np.int64)
