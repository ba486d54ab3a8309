"""Training, bundles and evaluation end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_SIZE, tiny_configs
from engine.bundle import load_bundle
from engine.errors import BundleError, DatasetError
from engine.evaluate import evaluate_bundle
from engine.train import Trainer


def _cemd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_bundle_holds_config_hashes_and_both_branches(tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    assert meta["format"] == "cemd-bundle/1"
    assert set(meta["files"]) == {"teacher.pt", "student_wli.pt", "student_nbi.pt"}
    assert meta["model"]["input_size"] == TINY_SIZE and meta["data"]["synthetic"] is True
    assert meta["data"]["paired_images"] > 0
    assert set(meta["score_stats"]) == {"wli", "nbi"}
    assert not (tiny_bundle / ".train_state.pt").exists()
    bundle = load_bundle(tiny_bundle)
    amap, score = bundle.branch("nbi")(torch.rand(2, 3, TINY_SIZE, TINY_SIZE))
    assert amap.shape == (2, 1, TINY_SIZE, TINY_SIZE) and score.shape == (2,)


def test_resume_after_interruption_gives_the_same_weights(tiny_dataset: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    model, train = tiny_configs()
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        # 2 teacher epochs + 1 WLI student epoch, then a simulated crash
        Trainer(tiny_dataset, out, model, train, progress=False, log=lambda _m: None, interrupt_after_epochs=3).run()
    assert (out / ".train_state.pt").is_file() and not (out / "bundle.json").exists()
    Trainer(tiny_dataset, out, model, train, progress=False, log=lambda _m: None, resume=True).run()
    for name in ("teacher.pt", "student_wli.pt", "student_nbi.pt"):
        a = torch.load(out / name, weights_only=True)
        b = torch.load(tiny_bundle / name, weights_only=True)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key} differs after resume")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_edited_weights_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path)
    state = torch.load(b / "student_wli.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 0.01
    torch.save(state, b / "student_wli.pt")
    with pytest.raises(BundleError, match="student_wli.pt does not match the hash"):
        load_bundle(b)


def test_truncated_weights_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path)
    data = (b / "teacher.pt").read_bytes()
    (b / "teacher.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="teacher.pt"):
        load_bundle(b)


def test_other_input_size_and_other_backbone_weights_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"trained for input {TINY_SIZE}"):
        load_bundle(tiny_bundle, input_size=256)
    b = _copy(tiny_bundle, tmp_path)
    meta = json.loads((b / "bundle.json").read_text())
    meta["encoder"]["weights_sha256"] = "0" * 64
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="encoder weights"):
        load_bundle(b)


def test_missing_and_corrupt_bundles_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(tmp_path / "bad")


def test_architecture_mismatch_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path)
    meta = json.loads((b / "bundle.json").read_text())
    meta["student_width"] = 64
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="does not fit the architecture"):
        load_bundle(b)


def test_single_modality_dataset_trains_that_branch_alone(tiny_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "wli_only"
    shutil.copytree(tiny_dataset / "wli", data / "wli")
    model, train = tiny_configs()
    train.student_epochs = 1
    train.teacher_epochs = 1
    out = Trainer(data, tmp_path / "b", model, train, progress=False, log=lambda _m: None).run()
    bundle = load_bundle(out)
    assert bundle.modalities == ("wli",)
    assert bundle.model.fusion is False
    with pytest.raises(BundleError, match="no NBI student"):
        bundle.branch("nbi")


def test_evaluate_writes_metrics_per_kind_and_plots(tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    res = evaluate_bundle(tiny_bundle, tiny_dataset, tmp_path / "m.json", tmp_path / "plots", progress=False)
    saved = json.loads((tmp_path / "m.json").read_text())
    for m in ("wli", "nbi"):
        assert 0.0 <= saved[m]["image_auroc"] <= 1.0 and 0.0 <= saved[m]["pixel_auroc"] <= 1.0
        assert set(saved[m]["per_kind"]) == {"elevated_erythema", "irregular_microvessels", "depressed_neoplasia"}
        assert "baseline_mean_colour" in saved[m]
        assert (tmp_path / "plots" / f"roc_{m}.png").stat().st_size > 5000
        assert (tmp_path / "plots" / f"heatmaps_{m}.png").stat().st_size > 5000
    assert res["wli"]["n_test"] == 16


def test_cli_errors_are_one_clear_line_without_traceback(tiny_dataset: Path, tmp_path: Path) -> None:
    r = _cemd("evaluate", "--bundle", str(tmp_path / "missing"), "--data", str(tiny_dataset), "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cemd("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(tmp_path / "empty") in r.stderr


def test_unpaired_names_in_paired_mode_are_reported(tiny_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "unpaired"
    shutil.copytree(tiny_dataset, data)
    (data / "nbi" / "train" / "good" / "00003.png").rename(data / "nbi" / "train" / "good" / "other.png")
    model, train = tiny_configs()
    with pytest.raises(DatasetError, match="00003"):
        Trainer(data, tmp_path / "b", model, train, progress=False, log=lambda _m: None).run()
