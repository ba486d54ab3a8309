"""Model pieces: losses, CMA masking, branch function, export."""

from __future__ import annotations

import pytest
import torch

from engine.errors import BundleError
from engine.model.anomaly_map import (
    FieldOfViewMask,
    GaussianBlur,
    SmoothUpsample,
    cosine_distance_maps,
    masked_median,
    reduce_score,
)
from engine.model.backbone import FrozenEncoder, build_lite0
from engine.model.branch import StudentBranch
from engine.model.config import ModelConfig
from engine.model.losses import global_cosine, global_cosine_hard, hard_mining_alpha, pixel_cosine
from engine.model.student import StudentNet
from engine.model.teacher import MultimodalTeacher

CH = (24, 40, 112)


def _feats(batch: int = 2, size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // s, size // s, generator=g) for c, s in zip(CH, (4, 8, 16))]


def test_global_cosine_differs_from_pixel_cosine_and_is_zero_for_identical_maps() -> None:
    t = _feats()
    assert global_cosine(t, t).item() < 1e-5
    s = [x + 0.5 * torch.randn_like(x) for x in t]
    s[0][:, :, :4, :4] *= 10  # one region badly off: matters differently to the two losses
    assert abs(global_cosine(t, s).item() - pixel_cosine(t, s).item()) > 1e-3


def test_hard_mining_zeroes_gradient_of_easy_positions() -> None:
    t = [torch.randn(1, 8, 8, 8)]
    s = [t[0].clone()]
    s[0][:, :, 0, 0] = -t[0][:, :, 0, 0]  # one hard position, all others perfect
    s[0].requires_grad_(True)
    global_cosine_hard(t, s, alpha=1.0).backward()
    grad = s[0].grad.abs().sum(dim=1)[0]
    assert grad[0, 0] > 0
    assert grad.flatten()[1:].abs().max() == 0
    assert hard_mining_alpha(0, 1000) == -3 and hard_mining_alpha(100, 1000) == 1


def test_complementary_masks_are_complementary_and_independent_are_not() -> None:
    comp = MultimodalTeacher(ModelConfig(mask_mode="complementary"), CH)
    m = comp.masks(4, 16, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(m["wli"], ~m["nbi"])
    assert 0.3 < m["wli"].float().mean() < 0.7
    ind = MultimodalTeacher(ModelConfig(mask_mode="independent"), CH)
    m = ind.masks(4, 16, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (m["wli"] & m["nbi"]).any()


def test_teacher_reconstruction_loss_decreases_on_paired_features() -> None:
    torch.manual_seed(0)
    teacher = MultimodalTeacher(ModelConfig(), CH)
    # spatially smooth features, like real encoder maps: masked tokens are predictable
    base = [torch.nn.functional.interpolate(f[:, :, ::4, ::4], scale_factor=4, mode="bilinear") for f in _feats(4)]
    feats = {"wli": base, "nbi": [2 * f + 0.1 for f in base]}  # NBI is a function of WLI: learnable
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss = teacher.reconstruction_loss(feats, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_fusion_switch_removes_cross_attention() -> None:
    on = MultimodalTeacher(ModelConfig(fusion=True), CH)
    off = MultimodalTeacher(ModelConfig(fusion=False), CH)
    assert any("cross" in n for n, _ in on.named_parameters())
    assert not any("cross" in n for n, _ in off.named_parameters())


def test_adapters_start_as_identity() -> None:
    teacher = MultimodalTeacher(ModelConfig(), CH)
    f = _feats()
    for a, b in zip(teacher.adapters("wli", f), f):
        assert torch.equal(a, b)


# the shallow reading and frame-relative score these branch tests were written for (the demo bundle's)
SHALLOW = {"backbone": "efficientnet_lite0", "score_reduction": "topk_minus_median", "topk_fraction": 0.01}


def _branch(cfg: ModelConfig) -> StudentBranch:
    torch.manual_seed(0)
    teacher = MultimodalTeacher(cfg, CH)
    return StudentBranch(cfg, FrozenEncoder(build_lite0()), teacher.adapters, StudentNet(CH, 32), "wli").eval()


def test_branch_returns_map_and_score_and_masks_outside_field_of_view() -> None:
    cfg = ModelConfig(input_size=128, **SHALLOW)
    branch = _branch(cfg)
    frames = torch.zeros(2, 3, 128, 128)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    lit = ((yy - 64) ** 2 + (xx - 64) ** 2) < 50**2
    frames[:, :, lit] = torch.rand(2, 3, int(lit.sum()))
    with torch.no_grad():
        amap, score = branch(frames)
    assert amap.shape == (2, 1, 128, 128) and score.shape == (2,)
    assert amap[0, 0, :5, :5].abs().max() == 0  # black corner: never anomalous
    assert amap[0, 0, 64, 64] > 0
    # the default image score: top 1 % of the map minus its median inside the lit field of view
    # (on every 4th pixel each way; the median ignores the black border, whose map is 0)
    k = int(128 * 128 * 0.01)
    top = amap.flatten(1).topk(k, dim=1).values.mean(1)
    sub = amap[..., ::4, ::4].flatten(1)
    with torch.no_grad():
        inside = branch.fov(frames)[..., ::4, ::4].flatten(1) > 0
    assert 0.4 < inside.float().mean() < 0.6  # the lit disc, not the black border
    med = torch.stack([sub[i][inside[i]].median() for i in range(2)])
    torch.testing.assert_close(score, top - med)
    assert (score < top).all()


def test_score_reductions() -> None:
    amap = torch.zeros(1, 1, 10, 10)
    amap[0, 0, 0, 0] = 5.0
    assert reduce_score(amap, "max", 0.01).item() == 5.0
    assert abs(reduce_score(amap, "mean", 0.01).item() - 0.05) < 1e-6
    assert reduce_score(amap, "topk", 0.02).item() == 2.5
    fov = torch.zeros(1, 1, 10, 10)
    fov[0, 0, :5, :4] = 1  # 20 pixels inside: the mean is over them alone
    assert abs(reduce_score(amap, "mean", 0.01, fov).item() - 0.25) < 1e-6


def test_masked_median_matches_the_median_of_the_values_inside() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(3, 500, generator=g)
    mask = (torch.rand(3, 500, generator=g) > 0.4).float()
    mask[2] = 0  # nothing inside: 0, not -inf
    got = masked_median(values, mask)
    for i in range(2):
        assert got[i] == values[i][mask[i] > 0].median()
    assert got[2] == 0
    assert torch.equal(masked_median(values, None), values.median(dim=1).values)


def test_topk_minus_median_scores_a_local_rise_over_the_frames_own_level() -> None:
    """The same lesion on a quiet and on a noisy-but-normal frame: the top-k score moves with the
    frame's level, the contrast score does not; the black border (outside the FOV) counts for nothing."""
    fov = torch.zeros(1, 1, 64, 64)
    fov[..., 8:56, 8:56] = 1
    quiet = torch.full((1, 1, 64, 64), 0.2) * fov
    quiet[..., 28:36, 28:36] = 0.9  # 64 px, more than the top 1 % (40 px)
    loud = torch.where(fov > 0, quiet + 0.15, quiet)
    k_quiet = reduce_score(quiet, "topk_minus_median", 0.01, fov)
    k_loud = reduce_score(loud, "topk_minus_median", 0.01, fov)
    assert abs(reduce_score(loud, "topk", 0.01) - reduce_score(quiet, "topk", 0.01)).item() > 0.1
    assert abs(k_loud - k_quiet).item() < 1e-6
    assert abs(k_quiet.item() - (0.9 - 0.2)) < 1e-6


def test_gaussian_blur_preserves_mass_and_spreads_a_peak() -> None:
    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 32, 32] = 1.0
    y = GaussianBlur(4.0)(x)
    assert abs(y.sum().item() - 1.0) < 1e-4
    assert y[0, 0, 32, 32] < 0.05 and y[0, 0, 32, 36] > 0


def test_fov_mask_ignores_thin_text_on_black() -> None:
    img = torch.zeros(1, 3, 128, 128)
    img[:, :, 4:6, 4:40] = 1.0  # a thin text stroke in the corner
    img[:, :, 40:90, 40:90] = 0.5  # lit mucosa
    fov = FieldOfViewMask(0.08, 15)(img)
    assert fov[0, 0, 5, 20] == 0 and fov[0, 0, 65, 65] == 1


def test_default_branch_reads_lite0_to_stride_32_adds_a_memory_map_scores_the_top_tenth_and_exports() -> None:
    """New bundles' branch: Lite0 read at strides 8/16/32, the stride-32 distillation map plus the memory
    map of the stride-32 features, image score the mean of the map's top 10 %; torch.export takes it
    and matches eager."""
    from engine.model.backbone import get_backbone

    cfg = ModelConfig()
    spec = get_backbone(cfg.backbone)
    assert spec.strides == (8, 16, 32) and cfg.score_scales == (2,) and not cfg.colour_score
    assert cfg.memory_score and cfg.memory_scale == 2 and (cfg.score_reduction, cfg.topk_fraction) == ("topk", 0.1)
    torch.manual_seed(0)
    teacher = MultimodalTeacher(cfg, spec.channels)
    memory = {"bank": torch.randn(500, spec.channels[2]), "weight": 0.01}
    branch = StudentBranch(cfg, FrozenEncoder(spec.build(None)), teacher.adapters, StudentNet(spec.channels, 32),
                           "wli", memory=memory).eval()
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        amap, score = branch(x)
        fov = branch.fov(x)
        feats = branch.encoder(x)
        distillation = cosine_distance_maps(branch.teacher(feats), branch.student(feats), 256, (2,),
                                            upsample=branch.smooth)
        mem = branch.smooth(branch.memory(feats[2]))
    assert amap.shape == (2, 1, 256, 256) and float(branch.memory.weight) == pytest.approx(0.01 * cfg.memory_gain)
    torch.testing.assert_close(amap, (distillation + mem) * fov, atol=1e-5, rtol=1e-5)
    flat = amap.flatten(1)
    torch.testing.assert_close(score, flat.topk(flat.shape[1] // 10, dim=1).values.mean(1))
    program = torch.export.export(branch, (x[:1],))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:1])[1], branch(x[:1])[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(BundleError, match="multiple of 64"):
        ModelConfig(input_size=160).validate()


def test_torch_export_accepts_the_branch_and_matches_eager() -> None:
    cfg = ModelConfig(input_size=128, **SHALLOW)
    branch = _branch(cfg)
    x = torch.rand(1, 3, 128, 128)
    program = torch.export.export(branch, (x,))
    with torch.no_grad():
        eager = branch(x)
        exported = program.module()(x)
    torch.testing.assert_close(exported[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported[1], eager[1], atol=1e-5, rtol=1e-5)


def test_score_scales_select_which_distance_maps_are_summed() -> None:
    torch.manual_seed(0)
    t = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)]
    s = [torch.randn_like(x) for x in t]
    each = [cosine_distance_maps([a], [b], 16) for a, b in zip(t, s)]
    torch.testing.assert_close(cosine_distance_maps(t, s, 16), each[0] + each[1] + each[2])
    torch.testing.assert_close(cosine_distance_maps(t, s, 16, (2,)), each[2])
    torch.testing.assert_close(cosine_distance_maps(t, s, 16, (1, 2)), each[1] + each[2])
    with pytest.raises(BundleError, match="score_scales"):
        ModelConfig(score_scales=(3,)).validate()


def test_fov_opening_equals_the_max_filter_definition() -> None:
    gen = torch.Generator().manual_seed(1)
    frames = torch.zeros(5, 3, 96, 96)
    for i in range(3):  # lit rectangles from thin strokes to large patches on black
        for _ in range(6):
            y, x, h, w = (int(v) for v in torch.randint(1, 60, (4,), generator=gen))
            frames[i, :, y : y + h // 3 + 1, x : x + w] = torch.rand(3, 1, 1, generator=gen) * 0.9 + 0.1
    frames[4] = 1.0
    levels = torch.round(frames.amax(1, keepdim=True) * 255)  # 8-bit brightest channel
    window_sum = torch.round(torch.nn.functional.avg_pool2d(levels, 5, stride=1, padding=2) * 25)
    lit = (window_sum > 0.08 * 255 * 25).float()
    eroded = 1 - torch.nn.functional.max_pool2d(1 - lit, 15, stride=1, padding=7)
    expected = torch.nn.functional.max_pool2d(eroded, 15, stride=1, padding=7)
    assert torch.equal(FieldOfViewMask(0.08, 15)(frames), expected)
    assert 0 < expected[:3].mean() < 1  # the random frames exercise both erosion and dilation


@pytest.mark.parametrize("sigma", [4.0, 0.0])
def test_smooth_upsample_equals_upsampling_then_blurring(sigma: float) -> None:
    gen = torch.Generator().manual_seed(2)
    smooth = SmoothUpsample(64, sigma, (16, 8))
    for side in (16, 8, 4):  # 4: no matrix, the two steps themselves
        d = torch.rand(3, 1, side, side, generator=gen)
        expected = GaussianBlur(sigma)(torch.nn.functional.interpolate(d, size=(64, 64), mode="bilinear",
                                                                        align_corners=False))
        torch.testing.assert_close(smooth(d), expected, atol=1e-6, rtol=1e-6)
