"""Training, bundles and evaluation end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SIZE, tiny_configs

from engine.deploy.bundle import load_bundle
from engine.errors import BundleError, DatasetError
from engine.eval.evaluate import evaluate_bundle
from engine.train.trainer import Trainer


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
    lines: list[str] = []
    out = Trainer(data, tmp_path / "b", model, train, progress=False, log=lines.append).run()
    bundle = load_bundle(out)
    assert bundle.modalities == ("wli",)
    assert bundle.model.fusion is False
    # one modality: no fusion to learn, stage 1 is skipped with a line (the teacher is the frozen encoder)
    assert bundle.model.teacher_training is False and "teacher" not in bundle.meta["stopping"]
    assert any("stage 1 skipped" in ln and "--teacher-one-modality" in ln for ln in lines), lines
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


# ---------------------------------------------------------------- early stopping, skipped stages

@pytest.fixture(scope="module")
def wli_only(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("wli_only") / "data"
    shutil.copytree(tiny_dataset / "wli", data / "wli")
    return data


def _greyed(src: Path, dst: Path, modalities: tuple[str, ...]) -> Path:
    """A copy of dataset ``src`` whose ``modalities`` are grayscale (three equal channels)."""
    import cv2

    shutil.copytree(src, dst)
    for m in modalities:
        for p in (dst / m / "train" / "good").glob("*.png"):
            grey = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY)
            cv2.imwrite(str(p), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    return dst


def _stop_rule_configs() -> tuple:
    # small patience, large min_delta: the tiny set's held-out loss stops gaining 10% within a few epochs
    model, train = tiny_configs()
    train.teacher_epochs, train.student_epochs, train.patience, train.min_delta = 25, 25, 2, 0.1
    train.teacher_one_modality = True  # the teacher's stop rule is under test too
    return model, train


@pytest.fixture(scope="module")
def early_stopped(wli_only: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, train = _stop_rule_configs()
    out = tmp_path_factory.mktemp("es") / "b"
    Trainer(wli_only, out, model, train, progress=False, log=lambda _m: None).run()
    return out


def _held_out_student_loss(bundle_dir: Path, data: Path) -> float:
    """The WLI student's held-out loss recomputed from the saved bundle, the way training computes it."""
    from engine.data import dataset as ds
    from engine.model.losses import global_cosine
    from engine.train.trainer import FeatureCache, encode_images, student_val_loss, validation_images

    bundle = load_bundle(bundle_dir)
    paths = validation_images(data, bundle.train.seed, bundle.train.val_fraction)["wli"]
    feats = FeatureCache([p.stem for p in paths],
                         encode_images(bundle.encoder, ds.load_images(paths, bundle.model.input_size), "cpu"))
    with torch.no_grad():
        targets = [t.half() for t in bundle.teacher.adapters("wli", feats.batch(torch.arange(len(paths)), "cpu"))]
    return student_val_loss(bundle.students["wli"], feats, FeatureCache(feats.names, targets), global_cosine, "cpu")


def test_early_stopping_ends_a_stage_before_its_maximum_and_keeps_its_best_epoch(early_stopped: Path,
                                                                               wli_only: Path) -> None:
    meta = json.loads((early_stopped / "bundle.json").read_text())
    for stage, hist in (("teacher", "teacher"), ("student_wli", "student_wli")):
        rec = meta["stopping"][stage]
        assert rec["stopped_early"] is True and rec["epochs_run"] < rec["max_epochs"] == 25, rec
        assert "did not improve by 10.00% for 2 epochs" in rec["reason"]
        val = meta["history"][f"{hist}_val_loss"]
        assert len(val) == len(meta["history"][f"{hist}_loss"]) == rec["epochs_run"]
        assert rec["kept_epoch"] == rec["best_epoch"] == 1 + val.index(min(val))
        assert rec["best_val_loss"] == min(val)
    # the saved student is the best held-out epoch's, not the last one's
    best = meta["stopping"]["student_wli"]["best_val_loss"]
    assert _held_out_student_loss(early_stopped, wli_only) == pytest.approx(best, rel=1e-5)
    assert "train_seconds" in meta


def test_no_early_stopping_runs_every_epoch(wli_only: Path, tmp_path: Path) -> None:
    model, train = _stop_rule_configs()
    train.teacher_epochs, train.student_epochs, train.early_stopping = 2, 3, False
    out = Trainer(wli_only, tmp_path / "b", model, train, progress=False, log=lambda _m: None).run()
    meta = json.loads((out / "bundle.json").read_text())
    for stage, n in (("teacher", 2), ("student_wli", 3)):
        rec = meta["stopping"][stage]
        assert rec["epochs_run"] == rec["max_epochs"] == n and rec["stopped_early"] is False
        assert "early stopping off" in rec["reason"] and rec["kept_epoch"] == n
    assert len(meta["history"]["student_wli_loss"]) == 3


def test_stop_rule_keeps_the_best_epoch_and_cuts_the_rate_on_plateaus() -> None:
    from engine.train.trainer import LR_CUT, EpochControl

    _, cfg = tiny_configs()
    cfg.patience, cfg.min_delta = 4, 0.01
    vals = [5.0, 4.0, 3.0, 2.99, 3.5, 2.98, 3.2]  # epoch 3 is the last to gain 1 %; 4–7 do not
    runs = {}
    for early in (True, False):
        net = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        ctl = EpochControl(opt, 1.0, 20, 1, replace(cfg, early_stopping=early), has_val=True)
        stops, lrs = [], []
        for epoch, v in enumerate(vals):
            opt.step()
            ctl.step()
            with torch.no_grad():
                net.weight.fill_(epoch + 1)
            stops.append(ctl.end_epoch(epoch, v, net))
            lrs.append(ctl.lr())
        ctl.finish(net)
        runs[early] = (ctl, stops, lrs, net.weight.item())
    ctl, stops, lrs, kept = runs[True]
    assert stops == [False] * 6 + [True]  # four epochs in a row without a 1 % gain
    assert ctl.best_epoch == 6 and ctl.best == 2.98  # the lowest loss, although not a 1 % gain
    assert kept == 6 and ctl.cuts == 2  # rate cut after 2 and 4 epochs without gain, on top of one-cycle
    one_cycle = runs[False][2]
    assert lrs[:4] == one_cycle[:4]
    assert lrs[4:6] == pytest.approx([r * LR_CUT for r in one_cycle[4:6]])
    assert lrs[6] == pytest.approx(one_cycle[6] * LR_CUT ** 2)
    rec = ctl.record(len(vals), 2)
    assert rec["stopped_early"] and rec["kept_epoch"] == 6 and rec["epochs_run"] == 7 and rec["lr_cuts"] == 2
    off, off_stops, _, off_kept = runs[False]
    assert not any(off_stops) and off.best_state is None and off_kept == 7  # off: every epoch, the last kept


def test_train_options_set_the_stop_rule() -> None:
    from engine.cli import train_config
    from realtime.cli.main import build_parser

    parse = build_parser().parse_args
    default = train_config(parse(["train", "--data", "d", "--out", "o"]))
    assert default.early_stopping is True and default.patience == 5 and default.min_delta == 0.002
    off = train_config(parse(["train", "--data", "d", "--out", "o", "--no-early-stopping", "--patience", "3",
                              "--min-delta", "0.01"]))
    assert off.early_stopping is False and off.patience == 3 and off.min_delta == 0.01
    assert default.teacher_one_modality is False
    assert train_config(parse(["train", "--data", "d", "--out", "o", "--teacher-one-modality"])).teacher_one_modality


def test_resume_mid_stage_with_early_stopping_gives_the_same_weights(early_stopped: Path, wli_only: Path,
                                                                     tmp_path: Path) -> None:
    model, train = _stop_rule_configs()
    stops = json.loads((early_stopped / "bundle.json").read_text())["stopping"]
    # crash one epoch before the student's stop: one epoch without gain counted, the learning rate cut once
    crash = stops["teacher"]["epochs_run"] + stops["student_wli"]["epochs_run"] - 1
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer(wli_only, out, model, train, progress=False, log=lambda _m: None, interrupt_after_epochs=crash).run()
    lines: list[str] = []
    Trainer(wli_only, out, model, train, progress=False, log=lines.append, resume=True).run()
    assert any("resuming: student-wli" in ln for ln in lines), lines
    for name in ("teacher.pt", "student_wli.pt"):
        a = torch.load(out / name, weights_only=True)
        b = torch.load(early_stopped / name, weights_only=True)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key} differs after resume")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["stopping"] == stops  # the teacher's record survived the interruption


def test_grayscale_images_skip_the_colour_map_and_the_bundle_scores(tiny_dataset: Path, tmp_path: Path) -> None:
    data = _greyed(tiny_dataset, tmp_path / "grey", ("wli",))
    shutil.rmtree(data / "nbi")
    out = tmp_path / "b"
    r = _cemd("train", "--data", str(data), "--out", str(out), "--input-size", str(TINY_SIZE), "--seed", "3",
              "--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "8", "--no-progress", "--colour-score",
              "--teacher-one-modality")
    said = " ".join(r.stdout.split())  # rich wraps long lines at 80 columns without a terminal
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("colour map skipped for WLI: the images carry no colour (grayscale) — the branch scores with the "
            "distillation map alone") in said
    assert said.index("its colour map will be skipped") < said.index("stage 1 teacher")  # found up front
    assert "error" not in r.stderr.lower()
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["model"]["colour_score"] is False and "colour.json" not in meta["files"]
    assert meta["colour_skipped"] == {"wli": "the images carry no colour (grayscale)"}
    bundle = load_bundle(out)
    branch = bundle.branch("wli")
    assert branch.colour is None
    with torch.no_grad():
        amap, score = branch(torch.rand(2, 3, TINY_SIZE, TINY_SIZE))
    assert amap.shape == (2, 1, TINY_SIZE, TINY_SIZE) and torch.isfinite(score).all()


def test_colour_map_skips_only_the_grayscale_modality(tiny_bundle: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    data = _greyed(tiny_dataset, tmp_path / "grey_nbi", ("nbi",))
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    model, train = tiny_configs(colour_score=True)
    lines: list[str] = []
    Trainer(data, b, model, train, stage="colour", progress=False, log=lines.append).run()
    assert any(ln.startswith("WLI colour map: fitted on") for ln in lines), lines
    assert any("colour map skipped for NBI: the images carry no colour (grayscale)" in ln for ln in lines), lines
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["model"]["colour_score"] is True and meta["colour_skipped"] == {"nbi": "the images carry no colour (grayscale)"}
    assert set(json.loads((b / "colour.json").read_text())["modalities"]) == {"wli"}
    bundle = load_bundle(b)
    assert bundle.branch("wli").colour is not None and bundle.branch("nbi").colour is None
    x = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        assert all(torch.isfinite(bundle.branch(m)(x)[1]).all() for m in ("wli", "nbi"))


def test_a_failing_stage_says_what_is_saved_and_how_to_retry(wli_only: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.train.trainer as train_mod

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_mod, "fit_bundle_colour", broken)
    model, train = tiny_configs(colour_score=True)
    train.teacher_epochs = train.student_epochs = 1
    out = tmp_path / "b"
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        Trainer(wli_only, out, model, train, progress=False, log=lines.append).run()
    assert (f"the colour map stage failed: the teacher and the WLI student are saved in {out} and usable, scoring "
            "with the distillation map alone; re-run with --stage colour to retry the colour map") in lines[-1]
    assert load_bundle(out).branch("wli").colour is None
