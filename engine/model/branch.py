"""The deployable unit: one student branch per modality.

`StudentBranch` takes a batch of RGB frames in [0, 1] (N×3×S×S, S = the bundle's input
size) and returns (anomaly map N×1×S×S, image score N). Normalisation, the teacher's
modality adapter, smoothing, field-of-view masking and score reduction are all inside, so a
compiled engine and PyTorch compute the same function. It imports no training code.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.anomaly_map import FieldOfViewMask, SmoothUpsample, cosine_distance_maps, reduce_score
from engine.model.backbone import FrozenEncoder, get_backbone
from engine.model.colour import ColourOutlier
from engine.model.config import ModelConfig
from engine.model.memory import MemoryMap
from engine.model.student import StudentNet
from engine.model.teacher import TeacherAdapters


class TeacherView(nn.Module):
    """Teacher targets for one modality: frozen encoder features refined by that modality's adapters."""

    def __init__(self, adapters: TeacherAdapters, modality: str) -> None:
        super().__init__()
        self.adapters = adapters.adapters[modality]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.adapters[str(k)](f) if str(k) in self.adapters else f for k, f in enumerate(feats)]


class StudentBranch(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: FrozenEncoder, adapters: TeacherAdapters, student: StudentNet,
                 modality: str, colour: dict | None = None, memory: dict | None = None) -> None:
        super().__init__()
        self.modality = modality
        self.input_size = cfg.input_size
        self.encoder = encoder
        self.teacher = TeacherView(adapters, modality)
        self.student = student
        # upsampling + σ blur of the distillation map as two small matrix products per scale
        strides = get_backbone(cfg.backbone).strides
        self.smooth = SmoothUpsample(cfg.input_size, cfg.smoothing_sigma,
                                     tuple(cfg.input_size // s for s in strides))
        self.fov = FieldOfViewMask(cfg.fov_threshold, cfg.fov_window) if cfg.fov_mask else None
        # colour: the fitted statistics (bundle.json "colour"[modality]); None = distillation map only
        self.colour = None
        if cfg.colour_score and colour is not None:
            self.colour = ColourOutlier(cfg.colour_sigma, colour["mean"], colour["inv_cov"],
                                        colour["weight"] * cfg.colour_gain, cfg.colour_stride,
                                        cfg.colour_background, modality in cfg.colour_brownish,
                                        cfg.colour_vessel_cut)
            if self.fov is None:
                self.fov = FieldOfViewMask(cfg.fov_threshold, cfg.fov_window)
        # memory: the bank and weight of this modality (BUNDLE/memory.pt); None = no memory map
        self.memory = None
        self.memory_scale = cfg.memory_scale
        if cfg.memory_score and memory is not None:
            self.memory = MemoryMap(memory["bank"], float(memory["weight"]) * cfg.memory_gain)
        self.score_scales = tuple(cfg.score_scales)
        self.score_reduction = cfg.score_reduction
        self.topk_fraction = cfg.topk_fraction

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(frames)
        amap = cosine_distance_maps(self.teacher(feats), self.student(feats), self.input_size, self.score_scales,
                                    upsample=self.smooth)
        if self.memory is not None:
            amap = amap + self.smooth(self.memory(feats[self.memory_scale]))
        fov = None
        if self.fov is not None:
            fov = self.fov(frames)
            if self.colour is not None:
                amap = amap + self.colour(frames, fov)
            amap = amap * fov
        return amap, reduce_score(amap, self.score_reduction, self.topk_fraction, fov)
