"""Our EfficientNet-Lite0 definition must reproduce the reference implementation exactly."""

from __future__ import annotations

import pytest
import torch

from engine.model.backbone import EfficientNetLite0Encoder, FrozenEncoder, build_lite0


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0Encoder:
    return build_lite0().eval()


def _reference_features(x: torch.Tensor, taps: tuple[int, ...], version: int = 0) -> list[torch.Tensor]:
    """The reference package's EfficientNet-Lite``version`` (same weights) after the blocks ``taps``."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="dev extra: efficientnet-lite-pytorch")
    from engine.model.backbone import lite_weights_path

    ref = ref_pkg.EfficientNet.from_pretrained(f"efficientnet-lite{version}",
                                               weights_path=str(lite_weights_path(version))).eval()
    assert len(ref._blocks) == (16, 21, 21)[version]
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
    expected = [(24, size // 4, size // 4), (40, size // 8, size // 8), (112, size // 16, size // 16)]
    assert [tuple(f.shape[1:]) for f in ours] == expected
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version,taps,size", [(0, (4, 10, 15), 256), (1, (6, 14, 20), 240), (2, (6, 14, 20), 260)])
def test_deep_taps_match_reference_package(version: int, taps: tuple[int, ...], size: int) -> None:
    """The deep reading (strides 8, 16, 32) is the reference network's last blocks of stages 3, 5 and 7.

    Compared at the reference's own image size for Lite1/Lite2: its padding is fixed for that size
    (at 256 its stride-2 5×5 convolution pads 2+2 where TensorFlow's SAME, which ours computes from
    the input, pads 1+2)."""
    from engine.model.backbone import get_backbone

    spec = get_backbone(f"efficientnet_lite{version}_deep")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    theirs = _reference_features(x, taps, version)
    with torch.no_grad():
        ours = spec.build(None).eval()(x)
    assert [f.shape[1] for f in ours] == list(spec.channels)
    assert [-(-size // s) for s in spec.strides] == [f.shape[-1] for f in ours]
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
