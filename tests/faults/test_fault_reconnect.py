"""A live sender that dies and comes back: the monitor goes stalled → reconnecting → running,
counts the reconnect, scores again within a stated bound and loses no alert.

Two transports, each with a real sender process (PyAV re-encoding a synthetic examination):
UDP MPEG-TS (the monitor listens; the second sender sends smaller frames), and TCP MPEG-TS where
the sender is the server (``tcp://…?listen=1``) and the monitor connects to it, so while the
sender is gone each reconnect attempt is refused. RTSP: no RTSP server can be installed from a
Python package here (docs/RELIABILITY.md), so it is not covered.

The bound: the back-off between attempts doubles from 0.5 s to at most 8 s
(``BACKOFF_CAP_S``), an attempt may wait ``open_timeout`` (5 s), and a new H.264 sender needs
a keyframe (every 10 frames here): from the second sender's start to its first scored frame
at most BACKOFF_CAP_S + open_timeout + 5 s of sender start-up and decoder lock on a loaded
2-core machine = 18 s.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from realtime.capture.process import BACKOFF_CAP_S
from tests.faults.harness import ALERTING, MonitorRun, check_no_alert_lost, exam_video, start_file_sender, until
from tests.helpers.streams import free_port_pair, free_udp_port

pytestmark = pytest.mark.slow

SECONDS, FPS = 30, 10  # long enough that the first sender is still sending when it is killed
BACK_WITHIN_S = BACKOFF_CAP_S + 5.0 + 5.0
TOPICS = ("alert", "status", "heartbeat", "score")


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exam_video(tmp_path_factory.mktemp("exam") / "exam.mp4", SECONDS, FPS)


def _scores(run: MonitorRun) -> list[dict]:
    return [m for m in list(run.messages) if m["topic"] == "score"]


def _source_states(run: MonitorRun, since: int) -> list[str]:
    return [(m.get("source") or {}).get("state", "") for m in list(run.messages)[since:] if m["topic"] == "status"]


def _die_and_come_back(run: MonitorRun, send_url: str, exam: Path, size: str | None,
                       first: subprocess.Popen | None = None) -> dict:
    first = first or start_file_sender(send_url, exam)
    until(lambda: len(_scores(run)) >= 3, timeout=120)  # scoring the first sender
    assert first.poll() is None, "the first sender ended before it could be killed"
    first.send_signal(signal.SIGKILL)  # the sender dies mid-stream, without a goodbye
    first.wait()
    mark = len(run.messages)
    until(lambda: "reconnecting" in _source_states(run, mark), timeout=30)
    last_before = max(m["frame_id"] for m in _scores(run))
    t_back = time.monotonic_ns()
    second = start_file_sender(send_url, exam, size=size)
    # a frame captured after the second sender started is its own (scores of the first may still be in flight)
    until(lambda: any(m["t_capture_mono_ns"] > t_back for m in _scores(run)), timeout=60)
    t_scored = next(m["t_mono_ns"] for m in _scores(run) if m["t_capture_mono_ns"] > t_back)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    return {"mark": mark, "back_s": (t_scored - t_back) / 1e9, "last_before": last_before}


def _check(run: MonitorRun, res: dict) -> dict:
    assert run.returncode == 0, run.output
    after = _source_states(run, res["mark"])
    i = after.index("reconnecting")
    assert "stalled" in after[:i + 1] or "stalled" in _source_states(run, res["mark"] - 5), after
    assert "running" in after[i:], after  # stalled → reconnecting → running
    summary = run.summary()
    assert summary["source"]["reconnects"] >= 1, summary["source"]
    print(f"scored again {res['back_s']:.1f} s after the sender came back (bound {BACK_WITHIN_S:.0f} s)")
    assert res["back_s"] <= BACK_WITHIN_S, res
    assert summary["frames_scored"] > res["last_before"] / 2  # scoring went on after the return
    check_no_alert_lost(run)
    return summary


def test_udp_sender_dies_and_comes_back_with_smaller_frames(exam: Path, tmp_path: Path) -> None:
    url = f"udp://127.0.0.1:{free_udp_port()}?overrun_nonfatal=1"
    with MonitorRun(tmp_path / "run", "--source", url, "--max-seconds", "120", *ALERTING, topics=TOPICS) as run:
        res = _die_and_come_back(run, url.split("?")[0], exam, size="240x180")
    summary = _check(run, res)
    assert (summary["source"]["width"], summary["source"]["height"]) == (240, 180)  # the new sender's frames


def test_tcp_server_dies_and_comes_back(exam: Path, tmp_path: Path) -> None:
    port = free_port_pair()
    url = f"tcp://127.0.0.1:{port}"
    send_url = f"{url}?listen=1"
    first = start_file_sender(send_url, exam)  # the server listens before the monitor connects
    try:
        with MonitorRun(tmp_path / "run", "--source", url, "--max-seconds", "120", *ALERTING, topics=TOPICS) as run:
            res = _die_and_come_back(run, send_url, exam, size=None, first=first)
    finally:
        first.kill()
    _check(run, res)
