"""Inference workers (``--inference-workers``): real worker processes, real shared memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.deploy.backends import load_scorer
from engine.deploy.bundle import load_bundle
from engine.errors import CemdError
from realtime.scoring.infer_pool import InferencePool
from tests.helpers.streams import free_port_pair, make_video, wait_for_line

REPO = Path(__file__).resolve().parent.parent


def _frames(size: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(1, 3, size, size, generator=g) for _ in range(n)]


def test_workers_return_what_the_branch_returns_in_process(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    size = bundle.model.input_size
    scorers = {m: load_scorer(bundle, m, "eager", "cpu") for m in bundle.modalities}
    pool = InferencePool(str(tiny_bundle), {m: ("eager", "fp32") for m in bundle.modalities}, "cpu", 2, size)
    pool.start()
    try:
        assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        frames = _frames(size, 6)
        modalities = ["wli", "nbi", "nbi", "wli", "wli", "nbi"]
        got: dict[int, tuple[float, torch.Tensor]] = {}
        pending = list(enumerate(zip(frames, modalities)))
        owner: dict[int, int] = {}
        while pending or pool.in_flight:
            while pending and pool.free:
                k, (x, m) = pending.pop(0)
                owner[pool.submit(m, x)] = k
            assert pool.in_flight <= 2
            for r in pool.collect(timeout=10):
                assert r.error is None, r.error
                got[owner.pop(r.worker)] = (r.score, r.amap)
        assert sorted(got) == list(range(6))
        for k, (x, m) in enumerate(zip(frames, modalities)):
            amap, score = scorers[m](x)
            assert got[k][0] == pytest.approx(float(score[0]), rel=1e-4, abs=1e-6), (k, m)
            assert got[k][1].shape == amap.shape
            assert torch.allclose(got[k][1], amap.float(), rtol=1e-4, atol=1e-5)
        # a frame the branch rejects is an error result, and the worker goes on
        i = pool.submit("xyz", frames[0])
        [bad] = pool.collect(timeout=10)
        assert bad.worker == i and bad.error and "xyz" in bad.error and bad.score is None
        pool.submit("wli", frames[0])
        [ok] = pool.collect(timeout=10)
        assert ok.error is None and ok.score == pytest.approx(got[0][0], rel=1e-6)
    finally:
        pool.close()
    assert pool.pids == []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_worker_that_dies_is_an_error_not_a_hang(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    size = bundle.model.input_size
    pool = InferencePool(str(tiny_bundle), {"wli": ("eager", "fp32")}, "cpu", 2, size)
    pool.start()
    try:
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20  # until it is dead (a zombie or gone), not for a fixed time
        while _alive(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(victim)
        with pytest.raises(CemdError, match="inference worker 0 exited"):
            for _ in range(2):  # the dead worker is the first free one: its request or its reply fails
                pool.submit("wli", _frames(size, 1)[0])
                pool.collect(timeout=10)
    finally:
        pool.close()


def test_an_idle_worker_that_dies_is_noticed_while_the_other_keeps_every_frame(tiny_bundle: Path) -> None:
    """Under a light load the first free worker gets every frame, so worker 1 can sit idle for the
    whole run: its death must still be noticed (by check(), which the monitor calls every loop)."""
    bundle = load_bundle(tiny_bundle)
    size = bundle.model.input_size
    pool = InferencePool(str(tiny_bundle), {"wli": ("eager", "fp32")}, "cpu", 2, size)
    pool.start()
    try:
        pool.check()  # all alive: nothing raised
        for _ in range(3):  # one frame at a time: always worker 0
            assert pool.submit("wli", _frames(size, 1)[0]) == 0
            [r] = pool.collect(timeout=10)
            assert r.worker == 0 and r.error is None
        os.kill(pool.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(CemdError, match="inference worker 1 exited"):
            while time.monotonic() < deadline:
                pool.check()
                time.sleep(0.05)
        assert pool.submit("wli", _frames(size, 1)[0]) == 0  # worker 0 itself is unharmed
        [r] = pool.collect(timeout=10)
        assert r.error is None
    finally:
        pool.close()


def test_a_worker_that_cannot_load_says_why(tiny_bundle: Path) -> None:
    size = load_bundle(tiny_bundle).model.input_size
    pool = InferencePool(str(tiny_bundle), {"wli": ("aoti", "fp32")}, "cpu", 2, size)
    with pytest.raises(CemdError, match="could not load the branches: .*compiled artifact"):
        pool.start()  # the tiny bundle has no AOTInductor package and workers never build one
    assert pool.pids == []
    with pytest.raises(CemdError, match="at least 2"):
        InferencePool(str(tiny_bundle), {"wli": ("eager", "fp32")}, "cpu", 1, size)


def _monitor(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_monitor_with_workers_scores_every_frame_in_order_as_in_process(tiny_bundle: Path, tmp_path: Path) -> None:
    """--fast with two workers: every frame, in order, the same scores as the one-thread monitor."""
    from realtime.clients.client import MonitorClient

    video = make_video(tmp_path / "clip.mp4", n_frames=45, size=(192, 160))
    scores: dict[int, list[dict]] = {}
    for workers in (1, 2):
        endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
        proc = _monitor("--source", str(video), "--fast", "--bundle", str(tiny_bundle), "--backend", "eager",
                        "--modality", "wli", "--inference-workers", str(workers), "--publish", endpoint,
                        "--run-dir", str(tmp_path / f"run{workers}"))
        # bound by then; frame 0 comes ≈ 0.7 s later. A client that connects before the bind may be
        # subscribed only after ZeroMQ's reconnect back-off and miss the first frames.
        lines = wait_for_line(proc, "loading bundle")
        client = MonitorClient(endpoint, topics=("score",))
        got: list[dict] = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = client.recv(timeout_s=0.5)
                if msg is not None:
                    got.append(msg)
                elif proc.poll() is not None:
                    break
            out, _ = proc.communicate(timeout=60)
            out = "".join(lines) + out
        finally:
            proc.kill()
            client.close()
        assert proc.returncode == 0, out
        if workers == 2:
            assert "inference workers ready (pids" in out
        summary = json.loads((tmp_path / f"run{workers}" / "summary.json").read_text())
        assert summary["frames_scored"] == summary["frames_read"] == 45 and summary["frames_dropped"] == 0
        assert summary["config"]["scoring"]["inference_workers"] == summary["inference_workers"] == workers
        scores[workers] = got
    one, two = scores[1], scores[2]
    assert [m["frame_id"] for m in two] == list(range(45)), "every frame once, completed in frame order"
    assert [m["frame_id"] for m in one] == list(range(45))
    np.testing.assert_allclose([m["score"] for m in two], [m["score"] for m in one], rtol=1e-4, atol=1e-6)
    assert all(m["timings_ms"]["inference"] > 0 for m in two)


@pytest.mark.slow
def test_monitor_stops_with_a_status_when_a_worker_dies(tiny_bundle: Path, tmp_path: Path) -> None:
    from realtime.clients.client import MonitorClient

    video = make_video(tmp_path / "clip.mp4", n_frames=300, size=(192, 160), fps=30)
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    client = MonitorClient(endpoint, topics=("score", "status"))
    proc = _monitor("--source", str(video), "--realtime", "--loop", "--bundle", str(tiny_bundle), "--backend",
                    "eager", "--modality", "wli", "--inference-workers", "2", "--publish", endpoint,
                    "--run-dir", str(tmp_path / "run"))
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "inference workers ready (pids" in line:
                pids = [int(p) for p in line.split("pids", 1)[1].strip(" )\n").split(",")]
                break
        else:
            pytest.fail("".join(lines))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # scoring, then one worker is killed
            msg = client.recv(timeout_s=0.5)
            if msg is not None and msg["topic"] == "score":
                break
        os.kill(pids[1], signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = client.recv(timeout_s=0.5)
            if msg is not None and msg["topic"] == "status":
                statuses.append(msg)
                if msg["state"] == "stopped":
                    break
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        client.close()
    out = "".join(lines) + out
    assert proc.returncode != 0, out
    assert "inference worker 1 exited" in out
    assert statuses and statuses[-1]["state"] == "stopped" and "inference worker 1 exited" in statuses[-1]["message"], \
        (out, [(m["state"], m.get("message")) for m in statuses])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "inference worker 1 exited" in summary["message"] and summary["frames_scored"] > 0


def test_workers_run_the_onnx_runtimes_on_one_thread_each(tiny_bundle: Path, tmp_path: Path) -> None:
    """An inference worker loads the exported ONNX graph (never exports one) in its runtime and returns
    what the scorer process's own runtime returns (the one-thread pin itself: tests/test_backends.py)."""
    import shutil

    pytest.importorskip("onnxruntime")
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    bundle = load_bundle(copy)
    size = bundle.model.input_size
    frames = _frames(size, 3)
    for runtime in ("onnxruntime", "openvino"):
        if runtime == "openvino":
            pytest.importorskip("openvino")
        here = load_scorer(bundle, "wli", runtime, "cpu")  # exports the graph once, in this process
        want = [float(here(f)[1][0]) for f in frames]
        pool = InferencePool(str(copy), {"wli": (runtime, "fp32")}, "cpu", 2, size)
        pool.start()
        try:
            got = []
            for f in frames:
                pool.submit("wli", f)
                [r] = pool.collect(timeout=30)
                assert r.error is None, r.error
                got.append(r.score)
        finally:
            pool.close()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), runtime
