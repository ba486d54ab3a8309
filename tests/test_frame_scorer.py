"""FrameScorer: the one per-frame path (checks → crop → route → branch), and the public API of the README."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.deploy.bundle import load_bundle
from engine.errors import CemdError
from engine.synth.stills import render_pair
from realtime.scoring.frame_scorer import FrameResult, FrameScorer, source_time_ns

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"


def _frame(seed: int, kind: str | None = None, size: int = 320) -> np.ndarray:
    """A synthetic WLI frame inside a black border (a wider frame, as a video source gives)."""
    pair = render_pair(seed, 256, kind)
    canvas = np.zeros((256, size, 3), np.uint8)
    canvas[:, (size - 256) // 2:(size - 256) // 2 + 256] = pair.wli
    return canvas


@pytest.fixture(scope="module")
def demo_scorer() -> FrameScorer:
    return FrameScorer.from_bundle(DEMO, "wli", backend="eager")


def test_the_readme_three_lines_score_a_frame() -> None:
    scorer = FrameScorer.from_bundle(DEMO, backend="eager")  # README: FrameScorer.from_bundle("models/demo")
    result = scorer.score(_frame(3, "elevated_erythema"))
    assert isinstance(result, FrameResult) and result.modality in ("wli", "nbi")
    assert isinstance(result.score, float) and np.isfinite(result.score)
    size = load_bundle(DEMO).model.input_size
    assert result.map.shape == (size, size) and result.map.dtype == np.float32
    x, y, side = result.box
    assert 0 <= x and 0 <= y and x + side <= 320 + 1 and side > 0  # the crop square lies in the source frame
    loc = result.location()
    assert loc is not None
    bx, by, bw, bh = loc["box"]
    assert x - 1 <= bx and bx + bw <= x + side + 1 and by + bh <= y + side + 1  # inside the crop, in source pixels


def test_score_is_the_branch_on_the_prepared_crop(demo_scorer: FrameScorer) -> None:
    """Nothing between the crop and the branch: the score equals the branch module called directly."""
    demo_scorer.reset()
    frame = demo_scorer.prepare(_frame(5))
    assert frame.modality == "wli" and frame.tensor.shape[-1] == demo_scorer.input_size
    demo_scorer.reset()
    result = demo_scorer.score(_frame(5))
    with torch.no_grad():
        amap, score = load_bundle(DEMO).branch("wli")(frame.tensor)
    assert result.score == pytest.approx(float(score[0]), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(result.map, amap[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_a_lesion_frame_scores_above_a_normal_one(demo_scorer: FrameScorer) -> None:
    normal = [demo_scorer.score(_frame(s)).score for s in range(40, 44)]
    lesion = [demo_scorer.score(_frame(s, "elevated_erythema")).score for s in range(40, 44)]
    assert np.median(lesion) > np.median(normal)


def test_bad_frames_and_modalities_are_refused_clearly(demo_scorer: FrameScorer) -> None:
    with pytest.raises(CemdError, match="H×W×3 uint8 RGB"):
        demo_scorer.score(np.zeros((64, 64), np.uint8))
    with pytest.raises(CemdError, match="H×W×3 uint8 RGB"):
        demo_scorer.score(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(CemdError, match="modality must be wli, nbi or auto"):
        FrameScorer.from_bundle(DEMO, "xray", backend="eager")
    demo = load_bundle(DEMO)
    one = replace(demo, students={"wli": demo.students["wli"]})  # a bundle with one branch
    with pytest.raises(CemdError, match="--modality auto needs both branches"):
        FrameScorer.from_bundle(one, "auto", backend="eager")
    with pytest.raises(CemdError, match="NBI"):
        FrameScorer.from_bundle(one, "nbi", backend="eager")


def test_auto_routes_each_light_and_reset_forgets_the_source() -> None:
    scorer = FrameScorer.from_bundle(DEMO, "auto", backend="eager")
    pair = render_pair(11, 256)
    mods = [scorer.score(pair.nbi).modality for _ in range(6)]
    assert mods[-1] == "nbi"
    wli = [scorer.score(pair.wli).modality for _ in range(6)]
    assert wli[0] == "nbi" and wli[-1] == "wli"  # hysteresis: the switch comes a frame or two late
    assert scorer.router.switches == 1
    scorer.reset()
    assert scorer.router is not None and scorer.router.switches == 0


def test_source_clock() -> None:
    assert source_time_ns(90_000, (1, 90_000), 5) == 1_000_000_000
    assert source_time_ns(None, (1, 90_000), 5) == 5
    assert source_time_ns(3, None, 7) == 7
