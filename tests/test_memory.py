"""The memory map: nearest-patch distances, fitting into a bundle, checks on its file, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SIZE

from engine.deploy.bundle import load_bundle
from engine.errors import BundleError
from engine.model.memory import MemoryMap, collect_patches, neighbourhood, subsample


def _cemd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def test_the_map_is_the_distance_to_the_nearest_bank_patch() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=g)
    feat = torch.randn(2, 16, 5, 6, generator=g)
    got = MemoryMap(bank, weight=2.5)(feat)
    q = neighbourhood(feat).permute(0, 2, 3, 1).reshape(-1, 16)
    want = torch.cdist(q, bank).min(1).values.view(2, 5, 6).unsqueeze(1) * 2.5
    assert got.shape == (2, 1, 5, 6)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_patch_in_the_bank_scores_near_zero_and_one_far_from_it_does_not() -> None:
    g = torch.Generator().manual_seed(1)
    feat = torch.rand(1, 8, 4, 4, generator=g)
    bank = collect_patches(lambda x: feat.expand(len(x), -1, -1, -1), torch.zeros((1, 4, 4, 3), dtype=torch.uint8).numpy())
    assert bank.shape == (16, 8)
    mem = MemoryMap(bank)
    near = mem(feat)
    assert near.max() < 1e-2  # the expansion ‖q‖² − 2q·b + ‖b‖² rounds, so not exactly 0; clamped, never NaN
    far = mem(feat + 3.0)
    assert far.min() > 1.0 and torch.isfinite(far).all()


def test_subsample_is_seeded_and_keeps_small_sets_whole() -> None:
    p = torch.arange(100.0).view(50, 2)
    assert torch.equal(subsample(p, 80), p)
    a, b, c = subsample(p, 10, seed=4), subsample(p, 10, seed=4), subsample(p, 10, seed=5)
    assert a.shape == (10, 2) and torch.equal(a, b) and not torch.equal(a, c)


def test_an_empty_bank_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        MemoryMap(torch.zeros(0, 8))


def test_stage_memory_fills_a_bundle_and_its_file_is_checked(tiny_bundle: Path, tiny_dataset: Path,
                                                             tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    x = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = load_bundle(b).branch("wli")(x)
    r = _cemd("train", "--data", str(tiny_dataset), "--out", str(b), "--stage", "memory", "--memory-bank", "200",
              "--memory-gain", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    said = " ".join(r.stdout.split())
    assert "WLI memory map: 200 of" in said and "NBI memory map: 200 of" in said and "recalibrate" in said
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["model"]["memory_score"] is True and meta["model"]["memory_bank"] == 200
    assert meta["model"]["memory_gain"] == 0.5 and "memory.pt" in meta["files"]
    assert all(info["bank"] == 200 and info["weight"] > 0 for info in meta["memory"]["modalities"].values())
    bundle = load_bundle(b)
    branch = bundle.branch("wli")
    assert branch.memory is not None and branch.memory.bank_t.shape[1] == 200
    assert float(branch.memory.weight) == pytest.approx(0.5 * meta["memory"]["modalities"]["wli"]["weight"], rel=1e-5)
    with torch.no_grad():
        after = branch(x)
    inside = after[0] > 0
    # the memory map is ≥ 0 and added: the map rises (or stays) everywhere inside the field of view
    assert (after[0][inside] >= before[0][inside] - 1e-5).all() and not torch.allclose(after[1], before[1])
    # it exports with the branch (the compiled backends start from this graph)
    with torch.no_grad():
        exported = torch.export.export(branch, (x,)).module()(x)
    torch.testing.assert_close(exported[0], after[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exported[1], after[1], atol=1e-5, rtol=1e-4)
    # the file is part of the model: replaced, missing or unreadable, it is refused with the fix
    good = (b / "memory.pt").read_bytes()
    torch.save({"modalities": {"wli": {"bank": torch.zeros(3, 7), "weight": 1.0}}}, b / "memory.pt")
    with pytest.raises(BundleError, match="does not match the hash.*--stage memory"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "files": {**meta["files"],
                                                                 "memory.pt": _sha(b / "memory.pt")}}))
    with pytest.raises(BundleError, match=r"not a memory map \(wli: the bank is not an M×\d+ matrix\)"):
        load_bundle(b)
    (b / "memory.pt").write_bytes(b"not a pickle")
    (b / "bundle.json").write_text(json.dumps({**meta, "files": {**meta["files"], "memory.pt": _sha(b / "memory.pt")}}))
    with pytest.raises(BundleError, match="is not a memory map"):
        load_bundle(b)
    (b / "memory.pt").unlink()
    with pytest.raises(BundleError, match="memory.pt is missing; refit it: cemd train .* --stage memory"):
        load_bundle(b)
    # --stage memory refits a bundle whose file is gone
    r = _cemd("train", "--data", str(tiny_dataset), "--out", str(b), "--stage", "memory", "--memory-bank", "200",
              "--memory-gain", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (b / "memory.pt").read_bytes() == good  # the same seeded draw from the same images
    assert load_bundle(b).branch("nbi").memory is not None


def _sha(path: Path) -> str:
    from engine.model.backbone import file_sha256

    return file_sha256(path)


def test_bundles_from_before_the_memory_map_score_without_one(tiny_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    for key in ("memory_score", "memory_scale", "memory_bank", "memory_gain"):
        meta["model"].pop(key)
    (b / "bundle.json").write_text(json.dumps(meta))
    old = load_bundle(b)
    assert old.model.memory_score is False and old.branch("wli").memory is None


def test_bad_memory_options_are_refused_in_one_line(tiny_dataset: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from realtime.cli.main import main  # in-process: the refusal comes before any work (the subprocess path: above)

    for args, text in ((("--memory-gain", "0"), "--memory-gain must be > 0"),
                       (("--memory-bank", "0"), "--memory-bank must be at least 1"),
                       (("--stage", "memory", "--no-memory-score"), "cannot be combined with --no-memory-score")):
        rc = main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "b"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and text in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "b").exists()


def test_training_with_memory_and_colour_fits_both_and_a_failing_memory_stage_says_how_to_retry(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import tiny_configs

    import engine.train.trainer as train_mod

    data = tmp_path / "wli"
    shutil.copytree(tiny_dataset / "wli", data / "wli")
    model, train = tiny_configs(memory_score=True, memory_bank=300, colour_score=True)
    train.teacher_epochs = train.student_epochs = 1
    out = tmp_path / "b"
    lines: list[str] = []
    train_mod.Trainer(data, out, model, train, progress=False, log=lines.append).run()
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["model"]["memory_score"] is True and meta["model"]["colour_score"] is True
    assert {"memory.pt", "colour.json"} <= set(meta["files"])
    # the memory map is fitted first: the colour map's weight is relative to the map it is added to
    assert next(i for i, ln in enumerate(lines) if "WLI memory map:" in ln) < next(
        i for i, ln in enumerate(lines) if "WLI colour map:" in ln)
    branch = load_bundle(out).branch("wli")
    assert branch.memory is not None and branch.colour is not None

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_mod, "fit_bundle_memory", broken)
    model, _ = tiny_configs(memory_score=True, memory_bank=300)
    lines.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        train_mod.Trainer(data, tmp_path / "c", model, train, progress=False, log=lines.append).run()
    assert (f"the memory map stage failed: the teacher and the WLI student are saved in {tmp_path / 'c'} and usable, "
            "scoring with the distillation map alone; re-run with --stage memory to retry the memory map") in lines[-1]
    assert load_bundle(tmp_path / "c").branch("wli").memory is None
