"""Student network: RD-style one-class bottleneck + decoder, sized for EfficientNet-Lite0.

Each modality has its own independent student (CEMD's "two independent student
branches"); each is trained on its own modality's images only, so no pairs are needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(ch, ch), nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD `BN_layer`), to stride 32."""

    def __init__(self, channels: tuple[int, int, int], width: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(conv_bn_relu(c1, width // 2, stride=2), conv_bn_relu(width // 2, width // 2, stride=2))
        self.down2 = conv_bn_relu(c2, width // 2, stride=2)
        self.proj3 = conv_bn_relu(c3, width // 2, k=1)
        self.embed = nn.Sequential(conv_bn_relu(3 * (width // 2), 2 * width, stride=2), ResidualBlock(2 * width))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.embed(torch.cat([self.down1(f1), self.down2(f2), self.proj3(f3)], dim=1))


class DecoderStage(nn.Module):
    def __init__(self, cin: int, cout: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                                nn.ReLU(inplace=True))
        self.block = ResidualBlock(cout)
        self.out = nn.Conv2d(cout, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.block(self.up(x))
        return x, self.out(x)


class StudentNet(nn.Module):
    """Encoder features (3 scales) → bottleneck (stride 32) → decoded features (3 scales)."""

    def __init__(self, channels: tuple[int, int, int], width: int = 128) -> None:
        super().__init__()
        self.bottleneck = OneClassBottleneck(channels, width)
        c1, c2, c3 = channels
        self.stage3 = DecoderStage(2 * width, width, c3)        # stride 16
        self.stage2 = DecoderStage(width, width // 2, c2)       # stride 8
        self.stage1 = DecoderStage(width // 2, width // 4, c1)  # stride 4

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.bottleneck(feats)
        x, o3 = self.stage3(x)
        x, o2 = self.stage2(x)
        _, o1 = self.stage1(x)
        return [o1, o2, o3]
