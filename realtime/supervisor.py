"""`cemd run --supervise`: the monitor as a child process, started again when it dies.

The supervisor runs no model and opens no source: it starts `python -m realtime.cli.run` with
the user's options (and one run folder for every start, so the alert log, its seqs and event
ids continue), waits, and when the child dies — killed, crashed, or stopped by a fault — starts
it again on the same endpoint. A child that had run for ``STABLE_S`` is restarted at once; quick
deaths in a row back off (0.5 s, doubling, at most ``BACKOFF_CAP_S``) and each says so. A child
that ends by itself with exit code 0 (the source ended, ``--max-seconds``) ends the supervisor.
SIGTERM or SIGINT to the supervisor stops the child with SIGTERM (SIGKILL after
``STOP_TIMEOUT_S``) and exits 0. Every start and exit is a line on stderr and a record in
``supervisor.json`` in the run folder; the child reports its restart count in ``status`` and
``summary.json`` (``restarts``), read from ``RESTARTS_ENV``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from realtime.config import run_dir_or_default

RESTARTS_ENV = "CEMD_SUPERVISOR_RESTARTS"
STABLE_S = 30.0  # a child that ran this long was not crash-looping: its death is restarted at once
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
STOP_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[1]


def supervised_restarts() -> int | None:
    """The restart count the supervisor handed this process, or None when not supervised."""
    value = os.environ.get(RESTARTS_ENV)
    return int(value) if value is not None and value.isdigit() else None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def backoff_s(quick_deaths: int) -> float:
    """Wait before the next start after ``quick_deaths`` short-lived children in a row (0: none)."""
    if quick_deaths <= 1:
        return 0.0
    return min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (quick_deaths - 2))


class Supervisor:
    """Start, watch and restart one monitor child; ``run()`` returns the exit code for the shell."""

    def __init__(self, argv: list[str], run_dir: Path, log: Callable[[str], None]) -> None:
        self.run_dir = Path(run_dir)
        self.cmd = [sys.executable, "-m", "realtime.cli.run", *argv, "--run-dir", str(self.run_dir)]
        self.log = log
        self.restarts = 0
        self.records: list[dict[str, Any]] = []
        self.child: subprocess.Popen | None = None
        self._stop = threading.Event()

    def request_stop(self, signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        self._stop.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # (a terminal's Ctrl-C has already reached it too)

    def _write_record(self) -> None:
        path = self.run_dir / "supervisor.json"
        tmp = path.with_suffix(".json.tmp")
        data = {"schema": "cemd.supervisor/1", "pid": os.getpid(), "command": self.cmd,
                "restarts": self.restarts, "children": self.records}
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, **{RESTARTS_ENV: str(self.restarts)})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        child = subprocess.Popen(self.cmd, env=env)
        self.records.append({"pid": child.pid, "started_wall_ns": time.time_ns(), "exit": None, "ran_s": None})
        self._write_record()
        self.log(f"supervisor: monitor started (pid {child.pid}, restart {self.restarts})")
        return child

    def _wait(self, child: subprocess.Popen) -> int:
        while True:
            try:
                return child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if self._stop.is_set():
                try:
                    return child.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.log(f"supervisor: the monitor did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM; killing it")
                    child.kill()
                    return child.wait()

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        quick = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.child = self._start()
            code = self._wait(self.child)
            ran = time.monotonic() - t0
            self.records[-1].update(exit=code, ran_s=round(ran, 3), reason=describe_exit(code))
            self._write_record()
            if self._stop.is_set():
                self.log(f"supervisor: stopped; the monitor ended with {describe_exit(code)}")
                return 0
            if code == 0:
                self.log("supervisor: the monitor finished (exit code 0); not restarting")
                return 0
            quick = quick + 1 if ran < STABLE_S else 1
            delay = backoff_s(quick)
            self.restarts += 1
            if delay:
                self.log(f"supervisor: crash loop: the monitor died {quick} times in a row within {STABLE_S:g} s "
                         f"of its start ({describe_exit(code)}, after {ran:.1f} s); restart {self.restarts} "
                         f"in {delay:g} s")
                if self._stop.wait(delay):
                    break
            else:
                self.log(f"supervisor: the monitor died ({describe_exit(code)}, after {ran:.1f} s); "
                         f"restart {self.restarts} now")
        self._write_record()
        return 0


def supervise(argv: list[str], run_dir: str | None, log: Callable[[str], None]) -> int:
    """Run the monitor with ``argv`` under a Supervisor, with SIGTERM/SIGINT handled; blocks."""
    sup = Supervisor(argv, run_dir_or_default(run_dir), log)
    previous = {s: signal.signal(s, sup.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return sup.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
