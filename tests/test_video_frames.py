"""`cemd video-frames`: training frames from video as the monitor sees them, and students trained on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calibration.events import lesion_mask, load_events
from engine.deploy.bundle import load_bundle
from engine.synth.video import VideoScene, render_video
from engine.train.trainer import Trainer
from realtime.cli.main import main as cemd
from tests.conftest import TINY_SIZE, tiny_configs


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vf")
    render_video(d / "lesion.mp4", 4, 10, 30, (320, 240), d / "lesion.events.json", progress=False)
    render_video(d / "normal.mp4", 3, 4, 30, (320, 240), progress=False, lesions=False)
    return d


def _frames(root: Path) -> dict[str, list[Path]]:
    return {m: sorted((root / m / "train" / "good").glob("*.png")) for m in ("wli", "nbi")}


def test_frames_are_cropped_routed_and_skip_lesions(videos: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "frames"
    assert cemd(["video-frames", "--videos", str(videos), "--out", str(out), "--every", "5", "--size", "96",
                 "--no-progress"]) == 0
    got = _frames(out)
    lesion = lesion_mask(load_events(videos / "lesion.events.json"), 300)
    scenes = {"lesion": VideoScene(4, 10, 30, (320, 240)), "normal": VideoScene(3, 4, 30, (320, 240), lesions=False)}
    seen = 0
    for m, files in got.items():
        for f in files:
            stem, idx = f.stem.rsplit("_f", 1)
            i = int(idx)
            assert i % 5 == 0
            assert scenes[stem].modality(i) == m, f"{f.name} is {scenes[stem].modality(i)}, filed under {m}"
            if stem == "lesion":
                assert not lesion[i], f"{f.name} lies inside a lesion interval"
            img = cv2.imread(str(f))
            assert img.shape == (96, 96, 3)
            assert img[0, 0].max() < 10 and img[48, 48].max() > 40  # masked corner, lit centre
            seen += 1
    kept = 60 + 24  # every 5th of 300 + 120 frames
    meta = json.loads((out / "dataset.json").read_text())
    run = meta["video_frames"][-1]
    assert seen == sum(run["written"].values()) == kept - run["skipped_lesion_frames"] - run["skipped_switch_frames"]
    assert run["skipped_lesion_frames"] == int(lesion[::5].sum()) > 0
    assert got["wli"] and got["nbi"]
    assert meta["synthetic"] is False  # normal.mp4 has no events file saying it is synthetic
    assert "wrote" in capsys.readouterr().out

    # run again into the same dataset: same names, counts add up in the metadata
    assert cemd(["video-frames", "--videos", str(videos / "normal.mp4"), "--out", str(out), "--every", "30",
                 "--size", "96", "--no-progress"]) == 0
    assert len(json.loads((out / "dataset.json").read_text())["video_frames"]) == 2
    # the simulator's events mark its video synthetic; a dataset of such frames says so
    assert cemd(["video-frames", "--videos", str(videos / "lesion.mp4"), "--out", str(tmp_path / "syn"),
                 "--every", "60", "--size", "96", "--no-progress"]) == 0
    assert json.loads((tmp_path / "syn" / "dataset.json").read_text())["synthetic"] is True


def test_bad_input_is_one_clear_error(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    assert cemd(["video-frames", "--videos", str(videos / "normal.mp4"), "--out", str(tmp_path / "junk")]) == 2
    assert "non-empty folder without a dataset.json" in capsys.readouterr().err
    assert cemd(["video-frames", "--videos", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.copy(videos / "lesion.mp4", tmp_path / "short.mp4")
    ev = json.loads((videos / "lesion.events.json").read_text())
    ev["frames"] = 100
    ev["lesions"] = [{"start_frame": 1, "end_frame": 5}]
    ev["modality"] = []
    (tmp_path / "short.events.json").write_text(json.dumps(ev))
    assert cemd(["video-frames", "--videos", str(tmp_path / "short.mp4"), "--out", str(tmp_path / "o2")]) == 2
    assert "is it the right file" in capsys.readouterr().err


def test_students_train_on_unpaired_video_frames(videos: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """--stage students keeps the teacher and learns from frames that have no partner in the other modality."""
    data = tmp_path / "frames"
    assert cemd(["video-frames", "--videos", str(videos), "--out", str(data), "--every", "6",
                 "--size", str(TINY_SIZE), "--no-progress"]) == 0
    names = {m: {f.stem for f in fs} for m, fs in _frames(data).items()}
    assert not names["wli"] & names["nbi"]  # one modality on screen per frame: nothing is paired
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    model, train = tiny_configs()
    train.student_epochs = 1
    Trainer(data, out, model, train, stage="students", progress=False, log=lambda _m: None).run()
    before, after = load_bundle(tiny_bundle), load_bundle(out)
    for a, b in zip(before.teacher.state_dict().values(), after.teacher.state_dict().values()):
        assert torch.equal(a, b)
    changed = [not torch.equal(a, b) for a, b in zip(before.students["wli"].state_dict().values(),
                                                      after.students["wli"].state_dict().values())]
    assert any(changed)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, TINY_SIZE, TINY_SIZE), np.float32))
    _amap, score = after.branch("nbi")(x)
    assert torch.isfinite(score).all()
