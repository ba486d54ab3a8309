"""The colour outlier map: what it responds to, what it ignores, fitting, bundles, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from engine.deploy.bundle import copy_without, load_bundle
from engine.errors import BundleError
from engine.model.anomaly_map import FieldOfViewMask
from engine.model.backbone import FrozenEncoder, build_lite0
from engine.model.branch import StudentBranch
from engine.model.colour import ColourOutlier, fit_colour
from engine.model.config import ModelConfig
from engine.model.student import StudentNet
from engine.model.teacher import MultimodalTeacher
from engine.synth.stills import render_pair
from realtime.scoring.alerts import Thresholds

CH = (24, 40, 112)
S = 128


def _scene(red_patch: bool, seed: int = 0) -> torch.Tensor:
    """A lit disc of textured pinkish mucosa with a dark shadow band, optionally a flat red patch."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    lit = (((yy - 64) ** 2 + (xx - 64) ** 2) < 60**2).float()
    base = torch.tensor([0.75, 0.45, 0.40]).view(3, 1, 1)
    img = base * (0.85 + 0.3 * torch.rand(1, S, S, generator=g)) * lit
    img[:, 90:100, 20:110] *= 0.15  # shadow: too dark to score colour
    if red_patch:
        patch = (((yy - 45) ** 2 / 14**2 + (xx - 70) ** 2 / 20**2) < 1).float()
        img = img * (1 - patch) + torch.tensor([0.70, 0.12, 0.15]).view(3, 1, 1) * patch * lit
    return img.unsqueeze(0).clamp(0, 1)


def _fitted(sigma: float = 2.0, stride: int = ModelConfig.colour_stride, background: float = 0.0,
            normals: list[torch.Tensor] | None = None, brownish: bool = False, vessel_cut: float = 0.0) -> ColourOutlier:
    plain = normals is None
    normals = normals or [_scene(False, s) for s in range(6)]
    images = np.stack([(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for x in normals])
    stats = fit_colour(images, sigma, 0.08, 15, stride=stride, background=background, brownish=brownish)
    if plain:  # uniform mucosa: relative to each frame's background, colour centres on 0
        assert abs(stats["mean"][0]) < 0.05 and abs(stats["mean"][1]) < 0.05
    assert stats["stride"] == stride and stats["background"] == background and stats["brownish"] == brownish
    return ColourOutlier(sigma, stats["mean"], stats["inv_cov"], 1.0, stride, background, brownish, vessel_cut)


def _map(col: ColourOutlier, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return col(x, FieldOfViewMask(0.08, 15)(x))[0, 0]


@pytest.mark.parametrize("stride", [1, 4])
def test_a_red_patch_stands_out_and_cast_brightness_and_shadow_do_not(stride: int) -> None:
    col = _fitted(stride=stride)
    normal, lesion = _map(col, _scene(False, 9)), _map(col, _scene(True, 9))
    assert lesion.shape == (S, S)
    assert lesion[45, 70] > 5 * normal.quantile(0.99)  # the patch is far outside normal colour
    assert lesion[45, 70] > 5 * lesion[70, 40]  # and only the patch
    assert lesion[95, 60] == 0 and lesion[2, 2] == 0  # shadow and black border are not scored
    # a colour cast of the whole examination and a darker exposure move nothing: colour is relative
    cast = (_scene(True, 9) * torch.tensor([0.8, 1.1, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    dim = _scene(True, 9) * 0.6
    for other in (cast, dim):
        m = _map(col, other)
        assert abs(float(m[45, 70]) - float(lesion[45, 70])) < 0.15 * float(lesion[45, 70])


def _flushed(seed: int, spot: bool = False) -> torch.Tensor:
    """Normal mucosa whose left half is broadly flushed red (a smooth ramp, as in gastritis), with
    an optional small focal red spot on the unflushed side."""
    img = _scene(False, seed)[0]
    xx = torch.arange(S).float().view(1, 1, S)
    flush = torch.clamp((70 - xx) / 40, 0, 1)  # full on the left, fading out by x = 70
    img = img * (1 + flush * torch.tensor([0.15, -0.35, -0.30]).view(3, 1, 1))
    if spot:
        yy, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
        patch = (((yy - 40) ** 2 + (xs - 95) ** 2) < 5**2).float()
        img = img * (1 + patch * torch.tensor([0.15, -0.35, -0.30]).view(3, 1, 1))
    return img.unsqueeze(0).clamp(0, 1)


@pytest.mark.parametrize("stride", [1, 4])
def test_a_local_background_ignores_a_broad_flush_but_not_a_focal_spot(stride: int) -> None:
    # both fitted on the same normal frames, half of them flushed: a flush is normal here
    normals = [_scene(False, s) for s in range(4)] + [_flushed(s) for s in range(4, 8)]
    frame_median = _fitted(stride=stride, normals=normals)
    local = _fitted(stride=stride, background=12.0, normals=normals)
    x = _flushed(9, spot=True)
    g, loc = _map(frame_median, x), _map(local, x)
    spot, flush = (40, 95), (64, 25)
    # against the frame's median the broad flush reads as anomalous as the spot...
    assert g[flush] > 0.5 * g[spot], (float(g[flush]), float(g[spot]))
    # ...against the local background only the spot stands out
    assert loc[spot] > 4 * loc[flush], (float(loc[spot]), float(loc[flush]))
    assert loc[spot] > 3 * _map(local, _flushed(9)).quantile(0.99)
    assert loc[95, 60] == 0 and loc[2, 2] == 0  # shadow and black border still not scored
    # the whole frame's colour cast still moves nothing
    cast = (x * torch.tensor([0.8, 1.1, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    assert abs(float(_map(local, cast)[spot]) - float(loc[spot])) < 0.15 * float(loc[spot])


def _spotted(seed: int, shift: tuple[float, float, float]) -> torch.Tensor:
    """Normal mucosa with one small spot whose colour is scaled by 1 + ``shift`` (per R, G, B)."""
    img = _scene(False, seed)[0]
    yy, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    spot = (((yy - 40) ** 2 + (xs - 80) ** 2) < 6**2).float()
    return (img * (1 + spot * torch.tensor(shift).view(3, 1, 1))).unsqueeze(0).clamp(0, 1)


@pytest.mark.parametrize("stride", [1, 4])
def test_a_brownish_map_scores_a_brown_spot_but_not_a_cyan_one(stride: int) -> None:
    # NBI: neoplasia shows as a brownish area (redder, less blue); normal vessels deviate toward cyan
    both = _fitted(stride=stride, background=12.0)
    brown = _fitted(stride=stride, background=12.0, brownish=True)
    b_spot, c_spot = _spotted(9, (0.25, -0.10, -0.35)), _spotted(9, (-0.35, -0.10, 0.25))
    plain_p99 = {name: _map(col, _scene(False, 9)).quantile(0.99) for name, col in (("both", both), ("brown", brown))}
    spot = (40, 80)
    # the Mahalanobis map sees either spot...
    assert _map(both, b_spot)[spot] > 3 * plain_p99["both"] and _map(both, c_spot)[spot] > 3 * plain_p99["both"]
    # ...the brownish one only the brown spot
    assert _map(brown, b_spot)[spot] > 3 * plain_p99["brown"]
    assert _map(brown, c_spot)[spot] < plain_p99["brown"]
    assert (_map(brown, b_spot) >= 0).all() and _map(brown, b_spot)[2, 2] == 0  # one-sided, border unscored
    # still relative: a colour cast of the whole frame moves nothing
    cast = (b_spot * torch.tensor([0.8, 1.1, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    assert abs(float(_map(brown, cast)[spot]) - float(_map(brown, b_spot)[spot])) < 0.15 * float(
        _map(brown, b_spot)[spot])


def _veined(seed: int, spot: bool = False) -> torch.Tensor:
    """Normal mucosa with a dense band of cyan vessels on the left, optionally a brown spot on the right."""
    img = _scene(False, seed)[0]
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    veins = ((xx >= 12) & (xx < 56) & (yy >= 20) & (yy < 86) & ((xx % 8) < 3)).float()
    img = img * (1 + veins * torch.tensor((-0.35, -0.10, 0.25)).view(3, 1, 1))
    if spot:
        img = img * (1 + (((yy - 45) ** 2 + (xx - 104) ** 2) < 6**2).float() * torch.tensor((0.25, -0.10, -0.35)).view(3, 1, 1))
    return img.unsqueeze(0).clamp(0, 1)


def test_vessels_left_out_of_the_background_stop_the_mucosa_between_them_reading_brown() -> None:
    # dense cyan vessels pull a plain local background toward cyan: the mucosa between them then
    # reads brown. With the vessel cut the background is taken again without them.
    plain = _fitted(background=12.0, brownish=True)
    cut = _fitted(background=12.0, brownish=True, vessel_cut=2.0)
    assert cut.vessel_cut == 2.0 and plain.vessel_cut == 0.0
    x = _veined(9, spot=True)
    a, b = _map(plain, x), _map(cut, x)
    band = (slice(30, 76), slice(20, 50))  # inside the vessel band
    spot = (45, 104)
    p99 = {name: float(_map(col, _scene(False, 9)).quantile(0.99)) for name, col in (("plain", plain), ("cut", cut))}
    assert a[band].max() > 10 * p99["plain"], (float(a[band].max()), p99)  # the gaps read as brown spots
    assert b[band].max() < 0.2 * a[band].max(), (float(b[band].max()), float(a[band].max()))
    # the brown spot still stands out. It loses some of its score: the plain mucosa right around it reads
    # slightly cyan against the background the spot itself lifts, so it is left out too (docs/MODEL.md)
    assert b[spot] > 10 * p99["cut"] and b[spot] > 0.5 * a[spot], (float(b[spot]), float(a[spot]), p99)
    # only for a brownish map against a local background; never negative
    assert _fitted(background=12.0, vessel_cut=2.0).vessel_cut == 0.0
    assert _fitted(brownish=True, vessel_cut=2.0).vessel_cut == 0.0
    with pytest.raises(ValueError, match="vessel cut must be >= 0"):
        ColourOutlier(2.0, background=12.0, brownish=True, vessel_cut=-1.0)
    with pytest.raises(BundleError, match="colour_vessel_cut must be 0"):
        ModelConfig(colour_vessel_cut=-1.0).validate()


def test_brownish_modalities_are_checked() -> None:
    from engine.cli import _modality_tuple
    from engine.errors import CemdError

    with pytest.raises(BundleError, match="colour_brownish must be a subset"):
        ModelConfig(colour_brownish=("nbl",)).validate()
    assert _modality_tuple("NBI, wli,nbi", "--colour-brownish") == ("nbi", "wli")
    assert _modality_tuple("none", "--colour-brownish") == ()
    with pytest.raises(CemdError, match="--colour-brownish takes modalities from wli, nbi"):
        _modality_tuple("blue", "--colour-brownish")


def test_a_background_wider_than_the_map_is_refused() -> None:
    with pytest.raises(ValueError, match="too wide"):
        ColourOutlier(2.0, stride=4, background=80.0)(_scene(False), FieldOfViewMask(0.08, 15)(_scene(False)))
    with pytest.raises(ValueError, match=">= 0"):
        ColourOutlier(2.0, background=-1.0)
    with pytest.raises(BundleError, match="colour_background must be 0"):
        ModelConfig(colour_background=70.0).validate()


def test_the_quarter_resolution_map_follows_the_full_one() -> None:
    full, quarter = _map(_fitted(stride=1), _scene(True, 9)), _map(_fitted(stride=4), _scene(True, 9))
    r = np.corrcoef(full.flatten().numpy(), quarter.flatten().numpy())[0, 1]
    assert r > 0.9, r
    assert abs(float(quarter[45, 70]) - float(full[45, 70])) < 0.25 * float(full[45, 70])


BROWNISH, VESSEL_CUT = ("nbi",), 2.0


def _branch(colour: dict | None, modality: str = "wli") -> StudentBranch:
    # the shallow Lite0 of CH, and the NBI settings of the demo bundle (brownish, vessels cut)
    cfg = ModelConfig(input_size=S, colour_score=True, colour_sigma=2.0, backbone="efficientnet_lite0",
                      colour_brownish=BROWNISH, colour_vessel_cut=VESSEL_CUT)
    teacher = MultimodalTeacher(cfg, CH)
    return StudentBranch(cfg, FrozenEncoder(build_lite0()), teacher.adapters, StudentNet(CH, 32), modality,
                         colour).eval()


@pytest.mark.parametrize("modality", ["wli", "nbi"])  # in the demo's settings NBI's map is the brownish one
def test_branch_adds_the_weighted_colour_map_and_exports(modality: str) -> None:
    col = _fitted(background=ModelConfig.colour_background,  # the default local background...
                  brownish=modality in BROWNISH,  # ...and brownish in NBI,
                  vessel_cut=VESSEL_CUT)  # with the vessels left out of its background
    stats = {"mean": col.mean.flatten().tolist(), "inv_cov": col.inv_cov.tolist(), "weight": 0.05}
    with_colour, plain = _branch(stats, modality), _branch(None, modality)
    assert with_colour.colour.brownish == (modality == "nbi")
    plain.load_state_dict(with_colour.state_dict(), strict=False)
    x = _scene(True, 3)
    with torch.no_grad():
        (a1, s1), (a0, s0) = with_colour(x), plain(x)
        fov = with_colour.fov(x)
        torch.testing.assert_close(a1, (a0 + 0.05 * col(x, fov)) * fov)
    assert s1 > s0
    program = torch.export.export(with_colour, (x,))
    with torch.no_grad():
        exported = program.module()(x)
    torch.testing.assert_close(exported[0], a1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported[1], s1, atol=1e-5, rtol=1e-5)


def _cemd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def test_stage_colour_fits_a_bundle_in_place_and_the_file_is_checked(tiny_bundle: Path, tiny_dataset: Path,
                                                                     tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / "calibration.json").write_text(json.dumps({
        "version": 1, "n_of_m": [4, 6], "model_files": json.loads((b / "bundle.json").read_text())["files"],
        "model_config": json.loads((b / "bundle.json").read_text())["model"],
        "modalities": {m: {"threshold": 0.3} for m in ("wli", "nbi")}}))
    x = torch.from_numpy(render_pair(5, 128, "elevated_erythema").wli).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        before = load_bundle(b).branch("wli")(x)[1]
    r = _cemd("train", "--data", str(tiny_dataset), "--out", str(b), "--stage", "colour", "--colour-gain", "2",
              "--colour-stride", "2", "--colour-background", "16", "--colour-brownish", "wli",
              "--colour-vessel-cut", "1.5")
    assert r.returncode == 0, r.stderr
    assert "WLI colour map: fitted on" in r.stdout and "recalibrate" in r.stdout
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["model"]["colour_score"] is True and meta["model"]["colour_gain"] == 2
    assert meta["model"]["colour_stride"] == 2 and meta["model"]["colour_background"] == 16
    assert meta["model"]["colour_brownish"] == ["wli"] and meta["model"]["colour_vessel_cut"] == 1.5
    assert "colour.json" in meta["files"] and set(meta["score_stats"]) == {"wli", "nbi"}
    stats = json.loads((b / "colour.json").read_text())["modalities"]
    assert set(stats) == {"wli", "nbi"} and all(s["weight"] > 0 and s["stride"] == 2 and s["background"] == 16
                                                for s in stats.values())
    assert stats["wli"]["brownish"] is True and stats["nbi"]["brownish"] is False
    assert stats["wli"]["vessel_cut"] == 1.5 and "vessel_cut" not in stats["nbi"]
    bundle = load_bundle(b)
    assert bundle.branch("wli").colour.background == 16
    assert bundle.branch("wli").colour.brownish and not bundle.branch("nbi").colour.brownish
    assert bundle.branch("wli").colour.vessel_cut == 1.5 and bundle.branch("nbi").colour.vessel_cut == 0
    with torch.no_grad():
        after = bundle.branch("wli")(x)[1]
    assert not torch.equal(before, after)  # the score now includes colour
    th = Thresholds.for_bundle(bundle)  # the old calibration no longer fits these scores, and says so
    assert th.warning is not None and "colour_score" in th.warning
    # a copy with the map off (bench.colour_cost compares against it): same weights, the old scores
    plain = load_bundle(copy_without(b, tmp_path / "plain"))
    assert plain.model.colour_score is False and not (tmp_path / "plain" / "calibration.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(plain.branch("wli")(x)[1], before)
    # statistics fitted at another resolution than bundle.json asks for are refused, not misused
    (b / "bundle.json").write_text(json.dumps({**meta, "model": {**meta["model"], "colour_stride": 4}}))
    with pytest.raises(BundleError, match="wli: fitted with stride 2 but bundle.json asks for stride 4\\)"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "model": {**meta["model"], "colour_background": 0}}))
    with pytest.raises(BundleError, match="fitted with background 16 but bundle.json asks for background 0\\)"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "model": {**meta["model"], "colour_brownish": ["nbi"]}}))
    with pytest.raises(BundleError, match="wli: fitted with brownish yes, vessel cut 1.5 but bundle.json asks for "
                                          "brownish no, vessel cut 0\\)"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps({**meta, "model": {**meta["model"], "colour_vessel_cut": 2}}))
    with pytest.raises(BundleError, match="wli: fitted with vessel cut 1.5 but bundle.json asks for vessel cut 2\\)"):
        load_bundle(b)
    (b / "bundle.json").write_text(json.dumps(meta))
    # the colour file is part of the model: edited, it is refused
    (b / "colour.json").write_text((b / "colour.json").read_text().replace('"weight": ', '"weight": 1'))
    with pytest.raises(BundleError, match="does not match the hash"):
        load_bundle(b)
    (b / "colour.json").unlink()
    with pytest.raises(BundleError, match="--stage colour"):
        load_bundle(b)


def test_bundles_from_before_the_colour_map_load_and_score_as_before(tiny_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    for key in ("colour_score", "colour_sigma", "colour_gain", "colour_stride", "colour_background",
                "colour_brownish", "colour_vessel_cut"):
        meta["model"].pop(key)
    (b / "bundle.json").write_text(json.dumps(meta))
    old, now = load_bundle(b), load_bundle(tiny_bundle)
    # off by default: it did not earn its place on real data
    assert old.model.colour_score is False and ModelConfig().colour_score is False
    assert old.model.colour_stride == 1  # a map fitted before the stride existed was fitted at full size
    assert old.model.colour_background == 0  # and against the frame's median colour
    assert old.model.colour_brownish == ()  # in any direction of colour, in both modalities
    assert old.model.colour_vessel_cut == 0  # and nothing left out of a background
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(old.branch("wli")(x)[1], now.branch("wli")(x)[1])
