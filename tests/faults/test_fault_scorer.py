"""Scorer faults: the branch raises mid-run (a GPU error, an out-of-memory) for a few frames, or
for good. The real monitor runs through ``failing_branch.py`` (run_stream.py with the branch call
wrapped) on a synthetic examination (SYNTHETIC), with a real subscriber (harness.py). What the
overlay display shows when results stop is in test_display.py (AI NOT ACTIVE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import ALERTING, MonitorRun, check_no_alert_lost, exam_video

pytestmark = pytest.mark.slow

FAILING = "tests/faults/failing_branch.py"


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exam_video(tmp_path_factory.mktemp("exam") / "exam.mp4", 6, 10)


def _scorer_states(run: MonitorRun) -> list[tuple[str, str, int]]:
    """(monitor state, scorer state, frames_failed) of each status, in order."""
    return [(m["state"], m["scorer"]["state"], m["scorer"].get("frames_failed", 0)) for m in run.messages
            if m["topic"] == "status" and m.get("scorer")]


def test_branch_failing_for_a_few_frames_is_reported_and_scoring_resumes(exam: Path, tmp_path: Path) -> None:
    with MonitorRun(tmp_path / "run", "--source", str(exam), "--fast", *ALERTING, entry=(FAILING, "20:5")) as run:
        run.wait()
    assert run.returncode == 0, run.output
    states = _scorer_states(run)
    failing = [i for i, s in enumerate(states) if s[:2] == ("degraded", "failing")]
    assert failing, states  # published at the first failure, not left to the next status tick
    assert any(s[:2] == ("running", "ready") and s[2] == 5 for s in states[failing[0]:]), states  # and recovered
    fault = next(m for m in run.messages if m["topic"] == "status" and m["scorer"]["state"] == "failing")
    assert "WLI branch failed on frame 20" in fault["message"] and "injected fault" in fault["message"]
    assert "fault: WLI branch failed on frame 20" in run.output  # shown: the log, as the dashboard
    assert "branch scoring again from frame 25" in run.output
    s = run.summary()
    assert s["frames_read"] == 60 and s["frames_failed"] == 5 and s["frames_scored"] == 55, s
    assert s["frames_dropped"] == 0 and s["state"] == "stopped" and s["message"] is None, s
    assert "branch failed 5" in run.output  # the closing summary table counts them
    check_no_alert_lost(run)


def test_branch_that_keeps_failing_stops_the_monitor_with_one_clear_message(exam: Path, tmp_path: Path) -> None:
    # sensitivity 5: the calibrated WLI threshold ÷ 5 is below every score of this clip's first 15
    # frames (0.06–0.09), so an event is surely open when the branch starts failing
    with MonitorRun(tmp_path / "run", "--source", str(exam), "--fast", "--sensitivity", "5",
                    entry=(FAILING, "15")) as run:
        run.wait()
    assert run.returncode == 2, run.output
    assert "error: the WLI branch failed 10 frames in a row; last error: injected fault" in run.output, run.output
    assert "Traceback" not in run.output
    # what the run did is shown before the error, as at the end of any run
    assert "branch failed 10" in run.output and "run folder" in run.output, run.output
    assert run.output.index("run folder") < run.output.index("error: the WLI branch")
    states = _scorer_states(run)
    assert ("degraded", "failing", 1) in states, states
    last = [m for m in run.messages if m["topic"] == "status"][-1]
    assert last["state"] == "stopped" and last["message"].startswith("stopping: the WLI branch failed 10"), last
    s = run.summary()  # still written
    assert s["frames_scored"] == 15 and s["frames_failed"] == 10 and s["state"] == "stopped", s
    logged = run.alerts_logged()
    assert check_no_alert_lost(run, logged) > 0
    ends = [a for a in logged if a["event"] == "end"]
    starts = [a for a in logged if a["event"] == "start"]
    assert len(ends) == len(starts)  # no event left open
    # This examination has an event open at frame 14: it ends at the last scored
    # frame, for that reason, with its duration on the file's clock (10 fps: 100 ms a frame).
    last = ends[-1]
    assert last["reason"] == "scorer_failed" and last["end_frame_id"] == 14, last
    assert abs(last["duration_ms"] - 100 * (14 - last["start_frame_id"])) <= 1, last
