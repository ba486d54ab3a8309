"""A short step of the scoring thread at real-time priority: decision → score message sent.

On two shared cores the scoring thread was preempted now and then in the 0.2 ms between its
alert decision and the return of the socket send (the capture process decodes, the branch's
OpenMP thread spins), which put the decision → sent p99 at 2–4 ms in paced 1080p runs against
the 1 ms goal. For that step only, the thread switches to ``SCHED_FIFO`` priority 1 (above every
normal process, below every kernel real-time thread) and back: two system calls per frame,
measured on the build machine as p99 1.9 → 0.34 ms (docs/BENCHMARKS.md, "Real-time priority
for the send"). The branch itself never runs at that priority; a decode starved for 30 ms would
cost more than it saves.

Linux only, and only where the process may (root or ``CAP_SYS_NICE``, or an ``RLIMIT_RTPRIO``
of at least 1); elsewhere the step runs at normal priority and ``state`` says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class RealtimeStep:
    """``with step():`` runs the body at ``SCHED_FIFO`` 1 when ``enabled`` and allowed."""

    def __init__(self, enabled: bool) -> None:
        self.state = "untried" if enabled else "off"  # untried → on | not permitted: …

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.state not in ("untried", "on"):
            yield
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except (OSError, AttributeError) as exc:  # EPERM without the capability; no SCHED_FIFO off Linux
            self.state = f"not permitted: {exc}"
            yield
            return
        self.state = "on"
        try:
            yield
        finally:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
