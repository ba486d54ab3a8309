"""`cemd calibrate` and `cemd evaluate-video` end to end: real videos, the real scorer, subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.run import calibrate
from calibration.thresholds import CalibrationOptions
from engine.synth.video import VideoScene, render_video
from realtime.scoring.alerts import Thresholds

REPO = Path(__file__).resolve().parent.parent


def cemd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("calvideos")
    render_video(d / "normal.mp4", 3, 12, 30, (320, 240), d / "normal.events.json", progress=False, lesions=False)
    render_video(d / "lesion.mp4", 4, 12, 30, (320, 240), d / "lesion.events.json", progress=False)
    return {"normal": d / "normal.mp4", "lesion": d / "lesion.mp4", "lesion_events": d / "lesion.events.json",
            "normal_events": d / "normal.events.json"}


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.mark.slow
def test_calibrate_then_evaluate_video(bundle: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report"
    cache = tmp_path / "cache"
    r = cemd("calibrate", "--bundle", str(bundle), "--normal", str(videos["normal"]), "--backend", "eager",
             "--target-false-alerts-per-hour", "600", "--report", str(report), "--no-progress",
             "--score-cache", str(cache))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "score cache" not in r.stdout and len(list(cache.glob("*.npz"))) == 1
    cal = json.loads((bundle / "calibration.json").read_text())
    assert cal["format"] == "cemd-calibration/1" and cal["version"] == 1 and cal["synthetic"] is True
    assert cal["data"][0]["frames"] == 360 and len(cal["data"][0]["sha256"]) == 64
    assert cal["model_files"] == json.loads((bundle / "bundle.json").read_text())["files"]
    assert cal["model_config"] == json.loads((bundle / "bundle.json").read_text())["model"]
    rep = json.loads((report / "report.json").read_text())
    for m in ("wli", "nbi"):
        c = cal["modalities"][m]
        assert c["threshold"] >= c["bulk_floor"] + c["margin"] and c["margin"] > 0  # stored unrounded
        assert c["false_alerts_per_hour_on_data"] <= 600
        assert rep["curves"][m]["false_alerts_per_hour"]
    for png in ("histograms.png", "false_alerts.png"):
        assert cv2.imread(str(report / png)) is not None
    assert "calibration v1" in r.stdout and "SYNTHETIC" in r.stdout

    out = tmp_path / "eval.json"
    plot = tmp_path / "timeline.png"
    r = cemd("evaluate-video", "--bundle", str(bundle), "--video", str(videos["lesion"]), "--events",
             str(videos["lesion_events"]), "--json", str(out), "--plot", str(plot), "--backend", "eager",
             "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    ev = json.loads(out.read_text())
    for key in ("event_sensitivity", "false_alerts_per_hour", "median_time_to_first_alert_ms",
                "p90_time_to_first_alert_ms", "frame_auroc"):
        assert key in ev["overall"]
    assert ev["thresholds"] == {m: cal["modalities"][m]["threshold"] for m in ("wli", "nbi")}
    assert ev["n_of_m"] == cal["n_of_m"] and "calibration" in ev["threshold_source"]
    assert ev["video"]["frames"] == 360 and ev["overall"]["lesion_events"] >= 1
    assert cv2.imread(str(plot)).shape[1] >= 900

    # the monitor itself now runs on the calibration (no uncalibrated warning)
    class B:
        path, modalities = bundle, ("wli", "nbi")
        meta = json.loads((bundle / "bundle.json").read_text())
        calibration = cal
    th = Thresholds.for_bundle(B)
    assert th.warning is None and th.n_of_m == tuple(cal["n_of_m"]) and "version 1" in th.source

    # calibrating again with another target reads the kept scores instead of scoring the video again
    r = cemd("calibrate", "--bundle", str(bundle), "--normal", str(videos["normal"]), "--backend", "eager",
             "--target-false-alerts-per-hour", "1200", "--report", str(tmp_path / "report2"), "--no-progress",
             "--score-cache", str(cache))
    assert r.returncode == 0, r.stderr + r.stdout
    said = " ".join(r.stdout.split())  # rich wraps long lines
    assert "scores read from the score cache" in said and "calibration v2" in said, r.stdout
    rep2 = json.loads((tmp_path / "report2" / "report.json").read_text())
    assert rep2["scores_from_cache"] == [str(videos["normal"])] and rep2["data"] == rep["data"]


def test_evaluate_video_refuses_events_of_another_video(bundle: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    short = json.loads(videos["lesion_events"].read_text())
    short["frames"], short["lesions"], short["modality"] = 200, [], []
    bad = tmp_path / "other.events.json"
    bad.write_text(json.dumps(short))
    r = cemd("evaluate-video", "--bundle", str(bundle), "--video", str(videos["lesion"]), "--events", str(bad),
             "--json", str(tmp_path / "o.json"), "--backend", "eager", "--no-progress", timeout=60)
    assert r.returncode == 2
    assert "does not fit the video: it describes 200 frames, the video has 360" in r.stderr
    assert not (tmp_path / "o.json").exists()


def test_calibrate_bad_input_fails_fast(bundle: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    r = cemd("calibrate", "--bundle", str(bundle), "--normal", str(videos["normal"]), "--no-progress", timeout=60)
    assert r.returncode == 2
    assert "too little normal video" in r.stderr and "0.2 min long" in r.stderr and "5.0 min" in r.stderr
    assert "loading" not in r.stdout  # refused before any model loaded
    r = cemd("calibrate", "--bundle", str(bundle), "--normal", str(videos["normal_events"]), timeout=60)
    assert r.returncode == 2 and "not a readable video file" in r.stderr
    r = cemd("calibrate", "--bundle", str(tmp_path / "nope"), "--normal", str(videos["normal"]), timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (bundle / "calibration.json").exists()


def test_calibrate_refuses_video_of_the_other_modality(bundle: Path, tmp_path: Path) -> None:
    scene = VideoScene(5, 6, 30, (320, 240), lesions=False)
    frames = tmp_path / "wli_frames"
    frames.mkdir()
    for i in range(0, 180):
        cv2.imwrite(str(frames / f"{i:04d}.png"), cv2.cvtColor(scene.frame(i, "wli"), cv2.COLOR_RGB2BGR))
    r = cemd("calibrate", "--bundle", str(bundle), "--normal", str(frames), "--modality", "nbi", "--backend",
             "eager", "--target-false-alerts-per-hour", "600", "--no-progress", "--no-score-cache")
    assert r.returncode == 2, r.stdout
    assert "looks like WLI video" in r.stderr and "--modality wli" in r.stderr
    assert not (bundle / "calibration.json").exists()


# --------------------------------------------------------------------------- without a model


class _Track:
    def __init__(self, source: str, score: np.ndarray, modality: np.ndarray) -> None:
        n = len(score)
        self.source, self.kind, self.fps, self.width, self.height, self.sha256 = source, "video", 30.0, 64, 48, "0" * 64
        self.frame_id, self.t_ms = np.arange(n), np.arange(n) * 1000 / 30
        self.score, self.modality, self.decode_errors = score.astype(np.float32), modality, 0

    @property
    def frames(self) -> int:
        return len(self.score)

    def to_json(self) -> dict:
        return {"source": self.source, "frames": self.frames, "sha256": self.sha256}


class _FakeReplayer:
    """Stands in for the scorer: hands back prepared per-frame scores."""

    modality = "auto"
    backends = {"wli": "eager", "nbi": "eager"}

    def __init__(self, tracks: dict[str, _Track]) -> None:
        self.tracks = tracks

    def replay(self, path, alerts=None, image_fps=30.0, progress=None, workers=1, cache=None):
        return self.tracks[Path(path).name]

    def check_modality(self, track):
        return None


class _Bundle:
    def __init__(self, path: Path) -> None:
        self.path, self.meta, self.modalities = path, {"files": {"student_wli.pt": "ab"}}, ("wli", "nbi")
        path.mkdir()

    @property
    def calibration(self):
        f = self.path / "calibration.json"
        return json.loads(f.read_text()) if f.exists() else None


def test_lesion_in_normal_data_is_reported_with_where_and_versions_are_kept(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    n = 30 * 60 * 12  # 12 minutes, half WLI, half NBI
    score = rng.normal(0.3, 0.02, n)
    modality = np.where(np.arange(n) < n // 2, "wli", "nbi")
    score[30 * 75: 30 * 77] += 0.5  # 2 s at 01:15 that are no normal mucosa
    video = tmp_path / "exam.mp4"
    video.write_bytes(b"")  # expand_inputs wants it to exist; the fake replayer never reads it
    replayer = _FakeReplayer({"exam.mp4": _Track(str(video), score, modality)})
    bundle = _Bundle(tmp_path / "b")
    logged: list[str] = []
    opts = CalibrationOptions()
    monkeypatch.setattr("calibration.run.probe_minutes", lambda inputs, fps: None)  # the stand-in file is empty
    rep = calibrate(bundle, replayer, [video], opts, tmp_path / "r1", log=logged.append, synthetic=True)
    assert any("01:15.0–01:17.0" in w and "(frames 2250–2309, WLI)" in w and "lesion" in w for w in rep["warnings"])
    assert logged and rep["version"] == 1
    first = json.loads((bundle.path / "calibration.json").read_text())
    rep2 = calibrate(bundle, replayer, [video], opts, tmp_path / "r2", log=logged.append, synthetic=True)
    assert rep2["version"] == 2
    assert json.loads((bundle.path / "calibration-history" / "calibration.v1.json").read_text()) == first


@pytest.mark.slow
def test_parallel_replay_scores_every_frame_like_one_process(tiny_bundle: Path, videos: dict[str, Path]) -> None:
    from engine.deploy.bundle import load_bundle
    from realtime.offline.replay import Replayer

    rep = Replayer(load_bundle(tiny_bundle), "auto", "eager")
    seen: list[int] = []
    one = rep.replay(videos["normal"])
    two = rep.replay(videos["normal"], workers=2, progress=lambda done, total: seen.append(done))
    assert two.frames == one.frames == 360 and np.array_equal(two.frame_id, one.frame_id)
    assert (two.modality == one.modality).all() and set(two.modality) == {"wli", "nbi"}
    np.testing.assert_allclose(two.score, one.score, rtol=0, atol=1e-5)
    np.testing.assert_allclose(two.t_ms, one.t_ms, atol=1e-6)
    assert seen[-1] == 360 and seen == sorted(seen)


@pytest.mark.slow
def test_score_cache_returns_the_same_scores_and_never_a_stale_or_broken_entry(tiny_bundle: Path,
                                                                                tmp_path: Path) -> None:
    from engine.deploy.bundle import load_bundle
    from realtime.offline.replay import Replayer

    video = tmp_path / "short.mp4"
    render_video(video, 5, 2, 10, (160, 120), progress=False, lesions=False)
    cache = tmp_path / "cache"
    rep = Replayer(load_bundle(tiny_bundle), "auto", "eager")
    first = rep.replay(video, cache=cache)
    assert not first.cached and first.frames == 20
    [entry] = list(cache.iterdir())
    again = rep.replay(video, cache=cache)
    assert again.cached
    for k in ("frame_id", "t_ms", "modality", "score"):
        assert np.array_equal(getattr(first, k), getattr(again, k)), k
    assert (again.sha256, again.fps, again.looks_like) == (first.sha256, first.fps, first.looks_like)
    # other settings are another entry: a fixed branch scores every frame with WLI
    wli = Replayer(load_bundle(tiny_bundle), "wli", "eager")
    assert not wli.replay(video, cache=cache).cached and len(list(cache.iterdir())) == 2
    # other content under the same name is another entry too
    render_video(video, 6, 2, 10, (160, 120), progress=False, lesions=False)
    assert not rep.replay(video, cache=cache).cached and len(list(cache.iterdir())) == 3
    # a broken entry is scored again (and replaced), never read
    entry.write_bytes(b"not an npz")
    render_video(video, 5, 2, 10, (160, 120), progress=False, lesions=False)
    rescored = rep.replay(video, cache=cache)
    assert not rescored.cached and np.array_equal(rescored.score, first.score)
    assert rep.replay(video, cache=cache).cached


def test_a_folder_of_webp_frames_replays_like_the_same_frames_as_png(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every suffix training accepts can be replayed and calibrated too (one list: engine.constants)."""
    from engine.constants import IMAGE_SUFFIXES
    from engine.deploy.bundle import load_bundle
    from realtime.offline.replay import Replayer

    assert ".webp" in IMAGE_SUFFIXES
    scene = VideoScene(5, 1, 10, (160, 120), lesions=False)
    png, webp = tmp_path / "png", tmp_path / "webp"
    png.mkdir()
    webp.mkdir()
    for i in range(6):
        bgr = cv2.cvtColor(scene.frame(i, "wli"), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(png / f"{i:04d}.png"), bgr)
        cv2.imwrite(str(webp / f"{i:04d}.webp"), bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])  # >100: lossless
    rep = Replayer(load_bundle(tiny_bundle), "wli", "eager")
    a, b = rep.replay(png), rep.replay(webp)
    assert a.frames == b.frames == 6 and b.kind == "images"
    np.testing.assert_allclose(b.score, a.score, rtol=1e-5, atol=1e-6)
