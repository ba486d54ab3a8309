"""Model and training configuration.

Every choice that is not stated in the CEMD abstract is a named switch here, so that it
can be turned off for ablation (see docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.constants import MODALITIES

SCORE_REDUCTIONS = ("topk", "topk_minus_median", "max", "mean")
COLOUR_STRIDES = (1, 2, 4, 8)


@dataclass
class ModelConfig:
    # Real colonoscopy (Kvasir-SEG windows, docs/RESULTS.md): the stride-32 output of Lite0 separates
    # polyps from normal mucosa far better than its stride-4/8/16 features (nearest-neighbour image
    # AUROC 0.88 vs 0.76 at stride 16), so new bundles read strides 8, 16, 32. Bundles that say
    # "efficientnet_lite0" (the demo) keep strides 4, 8, 16.
    backbone: str = "efficientnet_lite0_deep"
    input_size: int = 256
    modalities: tuple[str, ...] = MODALITIES
    # Stage 1: the multimodal teacher. False = plain reverse distillation (teacher = frozen encoder).
    teacher_training: bool = True
    # Cross-attention between the two modalities inside the CMA module. False = each
    # modality's adapter learns from intra-modal masked reconstruction only.
    fusion: bool = True
    # "complementary": NBI is masked where WLI is visible and vice versa; "independent": two random masks.
    mask_mode: str = "complementary"
    mask_ratio: float = 0.5
    # Local (intra-modal, depth-wise conv) reconstruction of masked tokens before cross attention.
    local_reconstruction: bool = True
    # Encoder scales (0 = stride 4, 1 = stride 8, 2 = stride 16) that get a CMA module and adapter.
    cma_scales: tuple[int, ...] = (1, 2)
    token_dim: int = 64
    heads: int = 4
    # Keys/values are average-pooled to at most this many tokens per side (PVT-style reduction).
    max_kv_tokens: int = 256
    # Student loss: "global" cosine over the flattened map (CEMD/RD4AD/ReContrast) or "pixel" (per-pixel mean).
    student_loss: str = "global"
    hard_mining: bool = False
    # Scoring. Scales whose cosine-distance maps are summed into the anomaly map. RD4AD sums
    # all three; on our data the stride-4/8 maps mostly echo normal fine texture (mucosal pits,
    # capillaries) and dilute the lesion signal, so by default only the stride-16 map scores
    # (students still learn all three). Ablation: docs/RESULTS.md.
    score_scales: tuple[int, ...] = (2,)
    smoothing_sigma: float = 4.0
    # Image score: mean of the top `topk_fraction` of the map (robust to single hot pixels) | max | mean (inside
    # the field of view) | topk_minus_median (that top mean minus the map's median inside the field of view:
    # the frame's own level, which the demo bundle uses). The top 10 % was chosen with the memory map on a
    # validation split of real windows (docs/RESULTS.md): a polyp fills much of a window.
    score_reduction: str = "topk"
    topk_fraction: float = 0.1
    # Zero the anomaly map outside the lit field of view (black border, on-screen text).
    fov_mask: bool = True
    fov_threshold: float = 0.08
    fov_window: int = 15
    # Colour outlier map (engine/model/colour.py) added to the distillation map: catches lesions that
    # differ from mucosa mainly in colour, which ImageNet features hardly encode. Its statistics
    # are fitted on the normal training images (BUNDLE/colour.json); `colour_gain` scales its
    # weight relative to the distillation map's normal spread. A bundle.json without the key
    # (written before the map existed) reads as False: such bundles score as they always did.
    # `colour_stride`: the map is computed at 1/stride of the input size and upsampled (it is
    # smooth; 4 costs a sixteenth of the pixels); a bundle.json without the key reads as 1.
    # `colour_background`: σ (input pixels) of the local colour background each pixel is compared
    # with (a focal spot counts, a broad flush does not); 0 = the frame's median colour, which is
    # what a bundle.json without the key (fitted before it existed) reads as.
    # `colour_brownish`: the modalities whose colour map scores only deviations toward brown
    # (redder and less blue than the background: the NBI sign of neoplasia); the others score
    # any direction. A bundle.json without the key (fitted before it existed) reads as none.
    # `colour_vessel_cut`: in those brownish modalities, the local background leaves out the
    # pixels more than this many normal standard deviations *less* brown than a first background
    # (cyan vessels), so that dense vessels do not make the mucosa between them read brown;
    # 0 = off, what a bundle.json without the key reads as.
    colour_score: bool = False
    colour_sigma: float = 4.0
    colour_gain: float = 1.0
    colour_stride: int = 4
    colour_background: float = 32.0
    colour_brownish: tuple[str, ...] = ()
    colour_vessel_cut: float = 0.0
    # Memory map (engine/model/memory.py) added to the distillation map: the distance of each patch of the
    # frozen encoder's features at scale `memory_scale` (0/1/2 = the backbone's three strides) to the
    # nearest of `memory_bank` patches drawn at random from the normal training images (PatchCore-style
    # scoring; BUNDLE/memory.pt). `memory_gain` scales its weight relative to the distillation map's
    # normal spread; 4 was chosen on a validation split of real windows (docs/RESULTS.md). A
    # bundle.json without the key (written before the map existed) reads as False.
    memory_score: bool = True
    memory_scale: int = 2
    memory_bank: int = 4096
    memory_gain: float = 4.0

    def validate(self) -> None:
        from engine.errors import BundleError, shown

        if self.mask_mode not in ("complementary", "independent"):
            raise BundleError(f"mask_mode must be complementary or independent, not {shown(self.mask_mode)}")
        if self.student_loss not in ("global", "pixel"):
            raise BundleError(f"student_loss must be global or pixel, not {shown(self.student_loss)}")
        if self.score_reduction not in SCORE_REDUCTIONS:
            raise BundleError(f"score_reduction must be one of {', '.join(SCORE_REDUCTIONS)}, "
                              f"not {shown(self.score_reduction)}")
        if not self.score_scales or any(k not in (0, 1, 2) for k in self.score_scales):
            raise BundleError(f"score_scales must be a non-empty subset of (0, 1, 2), not {shown(self.score_scales)}")
        if self.colour_stride not in COLOUR_STRIDES:
            raise BundleError(f"colour_stride must be one of {', '.join(map(str, COLOUR_STRIDES))}, "
                              f"not {self.colour_stride}")
        if not 0 <= self.colour_background <= self.input_size / 4:
            raise BundleError(f"colour_background must be 0 (off) or a σ of up to input_size / 4 = "
                              f"{self.input_size / 4:g} px, not {self.colour_background:g}")
        if any(m not in MODALITIES for m in self.colour_brownish):
            raise BundleError(f"colour_brownish must be a subset of {MODALITIES}, not {shown(self.colour_brownish)}")
        if not 0 <= self.colour_vessel_cut <= 10:
            raise BundleError(f"colour_vessel_cut must be 0 (off) or up to 10 standard deviations, "
                              f"not {self.colour_vessel_cut:g}")
        if self.memory_scale not in (0, 1, 2):
            raise BundleError(f"memory_scale must be 0, 1 or 2 (the backbone's three strides), not {self.memory_scale}")
        if self.memory_bank < 1:
            raise BundleError(f"memory_bank must be at least 1 patch, not {self.memory_bank}")
        if not self.memory_gain > 0:
            raise BundleError(f"memory_gain must be > 0, not {self.memory_gain:g}")
        for name, low, high in (("input_size", 32, 4096), ("token_dim", 1, 4096), ("heads", 1, 64),
                                ("max_kv_tokens", 1, 1 << 20), ("fov_window", 1, 1023), ("memory_bank", 1, 1 << 24)):
            if not low <= getattr(self, name) <= high:
                raise BundleError(f"{name} must be from {low} to {high}, not {getattr(self, name)}")
        if self.token_dim % self.heads:
            raise BundleError(f"token_dim ({self.token_dim}) must be a multiple of heads ({self.heads})")
        for name, low, high in (("mask_ratio", 0.0, 1.0), ("topk_fraction", 1e-6, 1.0), ("fov_threshold", 0.0, 1.0),
                                ("smoothing_sigma", 0.0, 1e3), ("colour_sigma", 0.0, 1e3), ("colour_gain", 0.0, 1e6),
                                ("memory_gain", 0.0, 1e6)):
            if not low <= getattr(self, name) <= high:
                raise BundleError(f"{name} must be from {low:g} to {high:g}, not {getattr(self, name):g}")
        if any(k not in (0, 1, 2) for k in self.cma_scales):
            raise BundleError(f"cma_scales must be a subset of (0, 1, 2), not {shown(self.cma_scales)}")
        from engine.model.backbone import BACKBONES, get_backbone

        if self.backbone not in BACKBONES:
            raise BundleError(f"unknown backbone {shown(self.backbone)}; known: {', '.join(sorted(BACKBONES))}")
        step = 2 * max(get_backbone(self.backbone).strides)  # the student's bottleneck halves the deepest map
        if self.input_size % step:
            raise BundleError(f"input_size must be a multiple of {step} for backbone {self.backbone}, "
                              f"not {self.input_size}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise BundleError(f"modalities must be a non-empty subset of {MODALITIES}, not {shown(self.modalities)}")


@dataclass
class TrainConfig:
    seed: int = 0
    teacher_epochs: int = 20
    student_epochs: int = 60
    batch_size: int = 16
    teacher_lr: float = 1e-3
    teacher_weight_decay: float = 0.05
    student_lr: float = 5e-3
    student_weight_decay: float = 1e-5
    # Fraction of the paired training set used for stage 1 (tests "low paired-data dependence").
    paired_fraction: float = 1.0
    # Held-out normal training images used for model selection / score statistics, never test data.
    val_fraction: float = 0.1
    # Denoising students (DeSTSeg / RD++ style, engine/train/anomalies.py): share of stage-2 samples
    # shown with a generic synthetic anomaly pasted in, the target staying the clean image's
    # teacher features. 0 = off (CEMD as stated). `synthetic_copies` anomalous copies per image
    # are made and encoded once, like the clean features.
    synthetic_anomalies: float = 0.0
    synthetic_copies: int = 4
    # Early stopping on the held-out normal images' loss (teacher: masked reconstruction with fixed
    # masks; students: the student loss against the teacher's targets). The epoch counts above are
    # then maxima: a stage stops once its held-out loss has not improved by a relative `min_delta`
    # for `patience` epochs, and keeps its best epoch's weights; the one-cycle learning rate is cut
    # on the way at each plateau. Off: every epoch, the last kept, as before (docs/MODEL.md#training;
    # engine/train/trainer.py EpochControl says why).
    early_stopping: bool = True
    patience: int = 5
    min_delta: float = 0.002
    # With one modality there is no fusion to learn: stage 1 would only train the adapters on masked
    # reconstruction, which was level with none on real colonoscopy at 2.2x the training time
    # (docs/MODEL.md#training). So `cemd train` (stage all) skips it there and the teacher is the
    # frozen encoder, as `teacher_training` off; True trains it anyway (`--teacher-one-modality`).
    teacher_one_modality: bool = False
    device: str = "cpu"
    threads: int = 0  # 0 = torch default


def to_dict(obj: Any) -> dict[str, Any]:
    data = asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


MAX_WHOLE = 2**53  # a setting's whole number past this is no size, count or seed


def _setting(name: str, value: Any, default: Any, hint: str, where: str) -> Any:
    """``value`` as the type of the setting's ``default`` (a list for a tuple), else a BundleError."""
    from engine.errors import BundleError, shown

    def bad(kind: str) -> BundleError:
        return BundleError(f"{where}: {name} must be {kind}, not {shown(value)}; restore bundle.json or retrain")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_WHOLE:
            raise bad("a whole number")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= 1e300:
            raise bad("a finite number")  # abs() first: an int too big for a float; NaN fails <=
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, tuple):
        item = int if "tuple[int" in hint else str
        if not isinstance(value, (list, tuple)) or len(value) > 16 or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise bad(f"a list of {'whole numbers' if item is int else 'strings'}")
        if item is int and any(abs(v) > MAX_WHOLE for v in value):
            raise bad("a list of small whole numbers")
        return tuple(value)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls`` from the settings in ``data`` (a bundle.json section): every value of its setting's
    type (``true`` is no number), numbers finite; else a BundleError naming the setting."""
    from engine.errors import BundleError, shown

    if not isinstance(data, dict):
        raise BundleError(f"{where} must be an object of settings, not {shown(data)}; restore bundle.json or retrain")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BundleError(f"{where}: unknown setting(s) {shown(', '.join(unknown), 120)[1:-1]}; "
                          f"written by a newer cemd?")
    defaults = cls()
    kwargs = {name: _setting(name, value, getattr(defaults, name), str(known[name].type), where)
              for name, value in data.items()}
    return cls(**kwargs)
