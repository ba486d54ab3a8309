"""File faults: truncated recordings, a resolution change mid-stream, 4:2:2 10-bit interlaced and
grayscale input, extreme frame rates. Each runs the real monitor on the file with a real
subscriber (harness.py); the files are re-encodings of one synthetic examination (SYNTHETIC).
They run the shipped bundle as a user does (harness.MonitorRun(shipped=True): models/demo, auto
modality, the default backend and workers); its one lesion event on this examination is frames
50–77, so that check 3 has alerts to count."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import MonitorRun, check_no_alert_lost, exam_video, transcode

pytestmark = pytest.mark.slow
SECONDS, FPS = 12, 10
N = SECONDS * FPS


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exam_video(tmp_path_factory.mktemp("exam") / "exam.mp4", SECONDS, FPS)


def _ended_cleanly(run: MonitorRun) -> dict:
    assert run.returncode == 0, run.output
    states = run.states()
    assert ("running", "running") in states, states
    assert states[-1][0] == "stopped", states
    s = run.summary()
    assert s["source"]["state"] == "ended", s["source"]
    return s


def test_truncated_stream_recording_plays_what_is_there(exam: Path, tmp_path: Path) -> None:
    full = transcode(exam, tmp_path / "full.ts", fmt="mpegts")
    cut = tmp_path / "cut.ts"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6) + 77])  # mid-packet, as a recorder killed by power loss leaves it
    with MonitorRun(tmp_path / "run", "--source", str(cut), "--fast", shipped=True) as run:
        run.wait()
    s = _ended_cleanly(run)
    assert 0.4 * N <= s["frames_read"] < N, s  # the part that is there, no more
    assert s["frames_scored"] == s["frames_read"] and s["frames_dropped"] == 0
    assert check_no_alert_lost(run) > 0


def test_truncated_mp4_without_its_index_is_one_clear_message(exam: Path, tmp_path: Path) -> None:
    full = transcode(exam, tmp_path / "full.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # MP4 keeps its index (moov) at the end
    with MonitorRun(tmp_path / "run", "--source", str(cut), "--fast", wait_for="loading bundle", shipped=True) as run:
        run.wait()
    assert run.returncode != 0
    assert "cut.mp4" in run.output and "Traceback" not in run.output, run.output
    assert run.alerts_logged() == []


def test_resolution_change_mid_stream(exam: Path, tmp_path: Path) -> None:
    small = transcode(exam, tmp_path / "a.ts", fmt="mpegts", size=(320, 240))
    large = transcode(exam, tmp_path / "b.ts", fmt="mpegts", size=(640, 480))
    both = tmp_path / "both.ts"
    both.write_bytes(small.read_bytes() + large.read_bytes())  # MPEG-TS concatenates: new SPS, new size
    with MonitorRun(tmp_path / "run", "--source", str(both), "--fast", shipped=True) as run:
        run.wait()
    s = _ended_cleanly(run)
    assert s["frames_read"] >= 2 * N - 10 and s["frames_scored"] == s["frames_read"], s  # 2 × N frames, a few at the seam may go
    assert (s["source"]["width"], s["source"]["height"]) == (640, 480)  # it followed the change
    check_no_alert_lost(run)


@pytest.mark.parametrize("kind", ["422-10bit-interlaced", "gray"])
def test_unusual_pixel_formats(exam: Path, tmp_path: Path, kind: str) -> None:
    if kind == "gray":
        video = transcode(exam, tmp_path / "gray.mkv", codec="ffv1", pix_fmt="gray")
    else:
        video = transcode(exam, tmp_path / "p10.mkv", pix_fmt="yuv422p10le",
                          options={"flags": "+ildct+ilme", "x264-params": "interlaced=1:tff=1"})
    with MonitorRun(tmp_path / "run", "--source", str(video), "--fast", shipped=True) as run:
        run.wait()
    s = _ended_cleanly(run)
    assert s["frames_scored"] == N and s["decode_errors"] == 0, s
    check_no_alert_lost(run)


@pytest.mark.parametrize("fps, frames", [(5, 20), (120, 360)])
def test_extreme_frame_rates_paced(exam: Path, tmp_path: Path, fps: int, frames: int) -> None:
    video = transcode(exam, tmp_path / f"r{fps}.mp4", fps=fps, frames=frames)
    with MonitorRun(tmp_path / "run", "--source", str(video), "--realtime", shipped=True) as run:
        run.wait()
    s = _ended_cleanly(run)
    states = [src for _, src in run.states()]
    assert "stalled" not in states, states  # 200 ms between frames at 5 fps is not a stall
    assert s["frames_read"] == frames and s["frames_scored"] + s["frames_dropped"] == frames, s
    if fps == 120:
        assert s["frames_dropped"] > 0, s  # faster than any CPU branch: latest frame wins, drops counted
    check_no_alert_lost(run)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_full_disk_for_the_alert_log_still_publishes_every_alert_and_says_so(exam: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "alerts.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC, even for root
    with MonitorRun(run_dir, "--source", str(exam), "--fast", shipped=True) as run:
        run.wait()
    assert run.returncode == 0, run.output
    alerts = [m for m in run.messages if m["topic"] == "alert"]
    assert len(alerts) >= 3 and [m["seq"] for m in alerts] == list(range(len(alerts)))  # published, none lost
    degraded = [m for m in run.messages if m["topic"] == "status" and m["state"] == "degraded"]
    assert degraded and "alert log" in degraded[0]["message"], run.states()  # published …
    assert "alert log" in run.output  # … and shown
    assert run.summary()["publisher"]["log_errors"] >= len(alerts)
