"""Cross-masked attention (CMA) fusion: the stage-1 module of the CEMD multimodal teacher.

From the abstract: the module "mines latent inter-modal relationships through local feature
reconstruction and a cross-attention mechanism". The reconstruction below follows
model-spec.md §4.3 (an inferred design): complementary block masks across the two
modalities, intra-modal depth-wise reconstruction of masked tokens, then cross attention
to the other modality, and linear heads that predict the frozen encoder features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_position_embedding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2-D sin-cos embedding, (h·w)×dim; computed, not learned, so any grid size works."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    oy = ys.reshape(-1, 1) * omega
    ox = xs.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)


def block_mask(batch: int, h: int, w: int, ratio: float, block: int, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """Random mask on block×block token blocks; True = masked. Shape batch×(h·w)."""
    bh, bw = math.ceil(h / block), math.ceil(w / block)
    n = bh * bw
    k = max(1, int(round(n * ratio)))
    noise = torch.rand(batch, n, generator=generator, device="cpu").to(device)
    idx = noise.argsort(dim=1)[:, :k]
    coarse = torch.zeros(batch, n, dtype=torch.bool, device=device)
    coarse.scatter_(1, idx, True)
    coarse = coarse.view(batch, 1, bh, bw).float()
    fine = F.interpolate(coarse, scale_factor=block, mode="nearest")[:, :, :h, :w]
    return fine.flatten(1) > 0.5


class LocalReconstruction(nn.Module):
    """Fills masked tokens from visible neighbours of the same modality (depth-wise 3×3 convs)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw = nn.Conv2d(dim, dim, 1)

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, h, w)
        grid = grid + self.pw(self.dw2(F.gelu(self.dw1(grid))))
        return grid.reshape(b, d, n).transpose(1, 2)


class CrossAttention(nn.Module):
    """Queries from one modality, keys/values from the other (global: tolerates misregistration)."""

    def __init__(self, dim: int, heads: int, max_kv_tokens: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.max_kv_tokens = max_kv_tokens

    def _reduce(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if h * w <= self.max_kv_tokens:
            return tokens
        factor = math.ceil(math.sqrt(h * w / self.max_kv_tokens))
        b, n, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, h, w)
        grid = F.avg_pool2d(grid, factor, ceil_mode=True)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, query: torch.Tensor, other: torch.Tensor, h: int, w: int) -> torch.Tensor:
        kv = self.norm_kv(self._reduce(other, h, w))
        out, _ = self.attn(self.norm_q(query), kv, kv, need_weights=False)
        z = query + out
        return z + self.mlp(self.norm_mlp(z))


class CrossMaskedAttentionFusion(nn.Module):
    """CMA at one encoder scale, for the modality pair (wli, nbi).

    With `fusion=False` the cross-attention is skipped: each modality reconstructs its own
    masked tokens from its own context (the "no fusion" ablation and single-modality data).
    """

    def __init__(self, channels: int, dim: int, heads: int, max_kv_tokens: int, modalities: tuple[str, ...],
                 fusion: bool, local_reconstruction: bool) -> None:
        super().__init__()
        self.modalities = modalities
        self.fusion = fusion and len(modalities) == 2
        self.embed = nn.ModuleDict({m: nn.Conv2d(channels, dim, 1) for m in modalities})
        self.embed_norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in modalities})
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in modalities})
        self.local = nn.ModuleDict(
            {m: LocalReconstruction(dim) if local_reconstruction else nn.Identity() for m in modalities}
        )
        self.cross = nn.ModuleDict(
            {m: CrossAttention(dim, heads, max_kv_tokens) for m in modalities} if self.fusion else {}
        )
        self.head = nn.ModuleDict({m: nn.Linear(dim, channels) for m in modalities})
        self.fuse = nn.Linear(2 * dim, dim) if self.fusion else None
        for p in self.mask_token.values():
            nn.init.normal_(p, std=0.02)

    def tokens(self, modality: str, feat: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feat.shape
        x = self.embed[modality](feat).flatten(2).transpose(1, 2)
        return self.embed_norm[modality](x) + sincos_position_embedding(h, w, x.shape[-1], feat.device)

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
        """feats: per modality B×C×H×W adapted features; masks: B×(H·W), True = hidden.

        Returns per-modality reconstructions B×(H·W)×C, per-modality fused tokens, and the
        fused teacher representation T_F (B×(H·W)×dim) when fusion is on.
        """
        h, w = next(iter(feats.values())).shape[-2:]
        local = {}
        for m, f in feats.items():
            x = self.tokens(m, f)
            x = torch.where(masks[m].unsqueeze(-1), self.mask_token[m].to(x.dtype).expand_as(x), x)
            local[m] = self.local[m](x, h, w) if not isinstance(self.local[m], nn.Identity) else x
        if self.fusion:
            a, b = self.modalities
            z = {a: self.cross[a](local[a], local[b], h, w), b: self.cross[b](local[b], local[a], h, w)}
            fused = self.fuse(torch.cat([z[a], z[b]], dim=-1))
        else:
            z, fused = local, None
        recon = {m: self.head[m](z[m]) for m in z}
        return recon, z, fused
