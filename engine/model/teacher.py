"""The CEMD multimodal teacher (stage 1, paired WLI+NBI normal images).

The teacher is the frozen encoder plus, per modality and per scale, a residual adapter
whose output feeds the CMA fusion module. Stage 1 trains adapters and CMA jointly by
masked cross-modal reconstruction of the frozen encoder features. After stage 1 the
adapter alone turns one modality's encoder features into "multimodal-enhanced" features
(model-spec.md §4.4 option a), which is what lets the students learn without pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.config import ModelConfig
from engine.model.fusion import CrossMaskedAttentionFusion, block_mask


class ModalityAdapter(nn.Module):
    """T = E + conv(gelu(conv(E))), last conv zero-initialised so training starts at T = E."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class TeacherAdapters(nn.Module):
    """Per-modality, per-scale adapters: everything of the teacher a student branch needs."""

    def __init__(self, channels: tuple[int, ...], scales: tuple[int, ...], modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.adapters = nn.ModuleDict(
            {m: nn.ModuleDict({str(k): ModalityAdapter(channels[k]) for k in scales}) for m in modalities}
        )

    def forward(self, modality: str, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        per = self.adapters[modality]
        return [per[str(k)](f) if str(k) in per else f for k, f in enumerate(feats)]


def _block_size(h: int) -> int:
    return max(1, h // 8)


class MultimodalTeacher(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapters = TeacherAdapters(channels, cfg.cma_scales, cfg.modalities)
        self.cma = nn.ModuleDict(
            {
                str(k): CrossMaskedAttentionFusion(
                    channels[k], cfg.token_dim, cfg.heads, cfg.max_kv_tokens, cfg.modalities,
                    fusion=cfg.fusion, local_reconstruction=cfg.local_reconstruction,
                )
                for k in cfg.cma_scales
            }
        )

    def masks(self, batch: int, h: int, w: int, generator: torch.Generator | None, device: torch.device
              ) -> dict[str, torch.Tensor]:
        mods = self.cfg.modalities
        first = block_mask(batch, h, w, self.cfg.mask_ratio, _block_size(h), generator, device)
        out = {mods[0]: first}
        if len(mods) == 2:
            if self.cfg.mask_mode == "complementary":
                out[mods[1]] = ~first
            else:
                out[mods[1]] = block_mask(batch, h, w, self.cfg.mask_ratio, _block_size(h), generator, device)
        return out

    def reconstruction_loss(self, feats: dict[str, list[torch.Tensor]], generator: torch.Generator | None = None
                            ) -> torch.Tensor:
        """Masked reconstruction of the frozen encoder features, summed over CMA scales.

        feats[m] is the list of frozen encoder features of modality m (paired batches when
        there are two modalities). Only masked positions count, as in masked modelling.
        """
        loss = next(iter(feats.values()))[0].new_zeros(())
        for k in self.cfg.cma_scales:
            raw = {m: f[k] for m, f in feats.items()}
            b, _, h, w = next(iter(raw.values())).shape
            device = next(iter(raw.values())).device
            masks = self.masks(b, h, w, generator, device)
            adapted = {m: self.adapters.adapters[m][str(k)](x) for m, x in raw.items()}
            recon, _, _ = self.cma[str(k)](adapted, masks)
            for m, r in recon.items():
                target = raw[m].flatten(2).transpose(1, 2).detach()
                d = 1 - F.cosine_similarity(r, target, dim=-1)
                sel = masks[m].to(d.dtype)
                loss = loss + (d * sel).sum() / sel.sum().clamp_min(1)
        return loss
