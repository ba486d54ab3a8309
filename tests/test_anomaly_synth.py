"""Synthetic anomalies for denoising students: where they go, what they change, how training uses them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_configs

from engine.deploy.bundle import load_bundle
from engine.synth.stills import render_pair
from engine.train.anomalies import add_synthetic_anomaly
from engine.train.trainer import FeatureCache, Trainer


def _stills(n: int, size: int = 256) -> np.ndarray:
    return np.stack([render_pair(100 + i, size).wli for i in range(n)])


def test_anomaly_is_one_blob_inside_the_lit_field_and_changes_nothing_else() -> None:
    imgs = _stills(6)
    lit_any = 0
    for k in range(24):
        img = imgs[k % 6]
        out, mask = add_synthetic_anomaly(img, np.random.default_rng([7, k]), imgs)
        again, mask2 = add_synthetic_anomaly(img, np.random.default_rng([7, k]), imgs)
        assert np.array_equal(out, again) and np.array_equal(mask, mask2)  # seeded
        lit = img.mean(axis=2) / 255.0 > 0.08
        assert mask[~lit].max(initial=0.0) == 0.0  # never on the black border or the on-screen text
        assert np.array_equal(out[mask == 0], img[mask == 0])  # nothing changes outside the blob
        share = (mask > 0.5).sum() / lit.sum()
        assert share < 0.2, share
        lit_any += share > 0.003
        # Pasted texture is donor tissue, not the donor's black border.
        inside = mask > 0.5
        if inside.any():
            assert (out[inside].max(axis=1) < 12).mean() < 0.02
    assert lit_any >= 20  # a few blobs may shrink at the field's edge; most are real anomalies
    outs = [add_synthetic_anomaly(imgs[0], np.random.default_rng(s), imgs)[0] for s in range(4)]
    assert len({o.tobytes() for o in outs}) == 4


def test_batch_swap_replaces_the_asked_share_with_anomalous_copies() -> None:
    n, shape = 64, (3, 4, 4)
    clean = FeatureCache([str(i) for i in range(n)], [torch.zeros(n, *shape)])
    copies = [FeatureCache(clean.names, [torch.full((n, *shape), float(c + 1))]) for c in range(2)]
    trainer = Trainer.__new__(Trainer)
    trainer.device = "cpu"
    for share, lo, hi in ((0.0, 0, 0), (1.0, n, n), (0.5, 20, 44)):
        trainer.cfg = tiny_configs()[1]
        trainer.cfg.synthetic_anomalies = share
        idx = torch.arange(n)
        feats = trainer._with_anomalies(clean.batch(idx, "cpu"), idx, copies, torch.Generator().manual_seed(0))
        per_sample = feats[0].flatten(1)
        swapped = (per_sample != 0).all(dim=1)
        assert lo <= int(swapped.sum()) <= hi
        assert ((per_sample == 0).all(dim=1) | swapped).all()  # whole samples, never a mix
        if share == 1.0:
            assert set(per_sample[:, 0].tolist()) == {1.0, 2.0}  # both copies used


def test_denoising_students_train_on_the_copies_and_the_bundle_says_so(tiny_bundle: Path, tiny_dataset: Path,
                                                                       tmp_path: Path) -> None:
    weights = {}
    for share in (0.0, 1.0):
        out = tmp_path / f"b{share}"
        shutil.copytree(tiny_bundle, out)
        model, train = tiny_configs(colour_score=share > 0)  # the colour map is fitted after retrained students
        train.student_epochs, train.synthetic_anomalies, train.synthetic_copies = 1, share, 2
        lines: list[str] = []
        Trainer(tiny_dataset, out, model, train, stage="students", progress=False, log=lines.append).run()
        meta = json.loads((out / "bundle.json").read_text())
        assert meta["train"]["synthetic_anomalies"] == share and meta["train"]["student_epochs"] == 1
        made = [ln for ln in lines if ln.startswith("synthetic anomalies: 2 copies")]
        assert len(made) == (2 if share else 0), lines
        assert meta["model"]["colour_score"] is (share > 0) and ("colour.json" in meta["files"]) is (share > 0)
        weights[share] = load_bundle(out).branch("wli").student.state_dict()
    differs = [k for k in weights[0.0] if weights[0.0][k].is_floating_point()
               and not torch.equal(weights[0.0][k], weights[1.0][k])]
    assert differs  # the anomalous inputs reached the student
