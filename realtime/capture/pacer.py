"""Real-time pacing of a file source: each frame released at its presentation time."""

from __future__ import annotations

import time

from realtime.capture.sources import DecodedFrame


class Pacer:
    """Release frames at their PTS on the monotonic clock (nominal fps when PTS is missing)."""

    def __init__(self, fps: float | None) -> None:
        self.period = 1.0 / fps if fps else 1.0 / 30.0
        self.anchor: tuple[float, float] | None = None  # (monotonic s, media s)
        self.count = 0
        self.first_at = 0.0  # earliest release of the first frame after a (re)start

    def reset(self) -> None:
        """At a loop: the new first frame follows the old last one by one frame period."""
        self.anchor, self.count = None, 0
        self.first_at = time.monotonic() + self.period

    def delay(self, frame: DecodedFrame) -> float:
        if frame.pts is not None and frame.time_base and frame.time_base[1]:
            media = frame.pts * frame.time_base[0] / frame.time_base[1]
        else:
            media = self.count * self.period
        self.count += 1
        now = time.monotonic()
        if self.anchor is None:
            self.anchor = (max(now, self.first_at), media)
            return self.anchor[0] - now
        wait_s = self.anchor[0] + (media - self.anchor[1]) - now
        if wait_s < -0.5 or wait_s > 5.0:  # decoding fell behind or PTS jumped: re-anchor, no burst
            self.anchor = (now, media)
            return 0.0
        return max(0.0, wait_s)
