"""`run_stream.py --supervise`: a monitor that dies comes back by itself.

Real processes throughout: the supervisor (``run_stream.py --supervise``), the monitor child it
starts, a subscriber (``MonitorClient``) in this process and the overlay display
(``cemd display``) in another, all on 127.0.0.1. The monitor child is SIGKILLed mid-examination;
each case waits for the event it checks (no sleeps, no wall-clock bounds: how fast it comes back
is measured by ``python -m bench.restart``, docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.faults.harness import ALERTING, BASE_ARGS, REPO, plain_demo, until
from tests.helpers.process_tree import process_tree
from tests.helpers.streams import free_port_pair

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="checks leftovers through /proc")]

SOURCE = "synthetic:seed=4,seconds=600,size=320x240,fps=10"  # live and long: only the kill ends a boot
ENV = dict(os.environ, PYTHONPATH=str(REPO))


class Lines:
    """A process's merged output, read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def having(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]

    def recovered(self) -> bool:
        """An "AI NOT ACTIVE" line, and an "AI active" line after it (the display's own log)."""
        lines = list(self.lines)
        down = next((i for i, line in enumerate(lines) if "AI NOT ACTIVE" in line), None)
        return down is not None and any("AI active" in line for line in lines[down + 1:])

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self.lines)


def _supervisor(run_dir: Path, endpoint: str, *args: str) -> tuple[subprocess.Popen, Lines]:
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--supervise", *BASE_ARGS, "--bundle", str(plain_demo()),
           "--publish", endpoint, "--run-dir", str(run_dir), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, Lines(proc)


def _children(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "supervisor.json").read_text())["children"]
    except (OSError, ValueError, KeyError):
        return []  # not written yet (it is replaced atomically: never half-written)


def _stop(proc: subprocess.Popen) -> int:
    tree = process_tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("the supervisor did not stop on SIGTERM") from None
    until(lambda: not [p for p in tree if Path(f"/proc/{p}").exists() and _alive(p)],
          "the monitor's processes to exit after the supervisor", timeout=60)
    return code


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigkilled_monitor_comes_back_on_the_same_endpoint(tmp_path: Path) -> None:
    from realtime.clients.client import MonitorClient

    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    sup, out = _supervisor(run_dir, endpoint, "--source", SOURCE, *ALERTING)
    client = MonitorClient(endpoint, topics=("alert", "status", "heartbeat", "score"), history=True)
    messages: list[dict] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            msg = client.recv(timeout_s=0.2)
            if msg is not None:
                messages.append(msg)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    display = subprocess.Popen([sys.executable, "-m", "realtime.cli.main", "display", endpoint, "--source", SOURCE,
                                "--output", "none"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    shown = Lines(display)
    try:
        def of_boot(boot: str, topic: str) -> list[dict]:
            return [m for m in list(messages) if m["boot_id"] == boot and m["topic"] == topic]

        until(lambda: any(m["topic"] == "alert" for m in messages), "the first boot's first alert", timeout=120)
        first_boot = messages[-1]["boot_id"]
        until(lambda: shown.having("AI active"), "the display to show the AI active", timeout=120)
        # kill with an event open (its last message a start or update): the next boot must end it
        until(lambda: of_boot(first_boot, "alert")[-1]["event"] != "end", "an open event", timeout=120)
        first_child = _children(run_dir)[-1]
        assert first_child["exit"] is None and _alive(first_child["pid"])
        os.kill(first_child["pid"], signal.SIGKILL)  # mid-examination: alerts were flowing

        until(lambda: any(m["boot_id"] != first_boot and m["topic"] == "score" for m in list(messages)),
              "scores from a new boot on the same endpoint", timeout=120)
        second_boot = next(m["boot_id"] for m in list(messages) if m["boot_id"] != first_boot)
        until(lambda: of_boot(second_boot, "alert"), "the new boot's first alert", timeout=120)
        until(shown.recovered, "the display to show AI NOT ACTIVE, then AI active", timeout=120)
    finally:
        code = _stop(sup)
        display.send_signal(signal.SIGTERM)
        display.wait(timeout=60)
        done.set()
        collector.join(timeout=10)
        client.close()
    log = out.text()
    assert code == 0, log

    # the supervisor saw the kill and restarted at once (the first child had not been crash-looping)
    assert "killed by SIGKILL" in log and "restart 1 now" in log, log
    record = json.loads((run_dir / "supervisor.json").read_text())
    assert record["restarts"] == 1 and [c["reason"] for c in record["children"]][:1] == ["killed by SIGKILL"]
    assert len(record["children"]) == 2, record

    # a new boot, counted: restarts in its status and in the summary the stopped child wrote
    statuses = of_boot(second_boot, "status")
    assert statuses and all(m["restarts"] == 1 for m in statuses), statuses[:2]
    assert all(m.get("restarts") == 0 for m in of_boot(first_boot, "status"))
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1

    # alert seq continues from the durable log: no reuse, no hole, everything reached the subscriber
    logged = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines() if line.strip()]
    first_alerts = [a for a in logged if a["boot_id"] == first_boot]
    assert first_alerts and len(first_alerts) < len(logged)
    assert [a["seq"] for a in logged] == list(range(len(logged)))
    assert {m["alert_seq_base"] for m in of_boot(second_boot, "status")} == {len(first_alerts)}
    got = sorted(m["seq"] for m in messages if m["topic"] == "alert")
    assert got == [a["seq"] for a in logged], (got[-5:], len(logged))
    ids = [a["event_id"] for a in logged if a["event"] == "start"]
    assert len(ids) == len(set(ids)), "an event id was reused after the restart"
    # every event ends once; the one the killed monitor left open is ended by the next boot
    ends = [a["event_id"] for a in logged if a["event"] == "end"]
    assert sorted(ends) == sorted(ids), (ids, ends)
    orphans = [a for a in logged if a.get("reason") == "monitor_restarted"]
    assert orphans and all(a["boot_id"] == second_boot and a["event_id"] in
                           {b["event_id"] for b in first_alerts} for a in orphans), orphans
    assert client.unrecovered == 0 and client.boot_changes >= 1

    # the display showed AI NOT ACTIVE while the monitor was down, then recovered by itself
    assert shown.recovered(), shown.text()


def test_crash_loop_backs_off_and_says_so_then_sigterm_stops_it(tmp_path: Path) -> None:
    broken = tmp_path / "exam.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4096))  # a file that is no video
    run_dir = tmp_path / "run"
    sup, out = _supervisor(run_dir, f"tcp://127.0.0.1:{free_port_pair()}", "--source", str(broken))
    try:
        until(lambda: len(_children(run_dir)) >= 4, "four starts of the failing monitor", timeout=240)
    finally:
        code = _stop(sup)
    log = out.text()
    assert code == 0, log
    loops = [line for line in log.splitlines() if "crash loop" in line]
    assert len(loops) >= 2, log
    waits = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in loops]
    assert waits == sorted(waits) and waits[0] < waits[-1], waits  # backing off: 0.5 s, 1 s, 2 s, …
    assert "stopped" in log.splitlines()[-1], log
    record = json.loads((run_dir / "supervisor.json").read_text())
    assert record["restarts"] >= 3 and all(c["exit"] not in (None, 0) for c in record["children"][:-1]), record


def test_a_bad_option_fails_once_without_a_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for bad in (("--source", str(tmp_path / "missing.mp4")), ("--inference-workers", "0"), ("--no-such-option",)):
        proc = subprocess.run([sys.executable, str(REPO / "run_stream.py"), "--supervise", "--run-dir", str(run_dir),
                               *bad], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "supervisor" not in proc.stderr, (bad, proc.stderr)
        assert not (run_dir / "supervisor.json").exists()
