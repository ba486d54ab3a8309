"""One way to score a frame: checks → field of view and crop → WLI/NBI route → branch → floats.

The monitor, file replay (and calibration through it), frame extraction and the inference
workers all go through `FrameScorer`; it is also the public API::

    from realtime.scoring.frame_scorer import FrameScorer

    scorer = FrameScorer.from_bundle("models/demo")
    result = scorer.score(rgb_frame)  # FrameResult: modality, score, map, crop box, location()

State that follows one source (the field-of-view tracker, the router's hysteresis) lives in
the scorer: call `reset()` before another source. The two halves of `score` are public for
callers that must split them: `prepare` (in frame order: crop and route) and `run_branch`
(the branch call, which the monitor may hand to an inference worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.deploy.bundle import Bundle, load_bundle
from engine.errors import CemdError
from engine.model.config import MODALITIES
from realtime.scoring.alerts import locate
from realtime.scoring.preprocess import FramePreprocessor
from realtime.scoring.routing import ModalityClassifier, ModalityRouter

Log = Callable[[str], None]
Branch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def source_time_ns(pts: int | None, time_base: Any, fallback_ns: int) -> int:
    """A frame's source clock: its PTS for files (so analysis faster than real time keeps real
    durations), else ``fallback_ns`` (the capture time, or frame index / fps)."""
    if pts is not None and time_base:
        num, den = time_base
        return int(pts * num * 1_000_000_000 // den)
    return int(fallback_ns)


@dataclass
class PreparedFrame:
    """A frame cropped and routed, ready for its branch."""

    tensor: torch.Tensor  # 1×3×S×S in [0, 1], what the branch reads
    crop: np.ndarray  # S×S×3 uint8 RGB, the same pixels
    box: tuple[int, int, int]  # the crop square in source pixels (x, y, side)
    modality: str
    switched: bool = False  # the router changed modality on this frame


@dataclass
class FrameResult:
    """A scored frame."""

    modality: str
    score: float
    amap: torch.Tensor  # 1×1×S×S, as the branch returned it (on its device)
    box: tuple[int, int, int]  # the crop square in source pixels (x, y, side)

    @property
    def map(self) -> np.ndarray:
        """The anomaly map as an S×S float32 array (crop coordinates)."""
        return self.amap[0, 0].float().cpu().numpy()

    def location(self, level: float = 0.5) -> dict[str, Any] | None:
        """Box, contour and peak of the hot region around the map's peak, in source pixels
        (``level``: the fraction of the peak that bounds the region, as the alert logic uses)."""
        return locate(self.map, self.box, level)


def check_modality(bundle: Bundle, modality: str) -> list[str]:
    """The branches a run with ``modality`` (wli, nbi or auto) needs, or the clear reason it cannot run."""
    if modality not in (*MODALITIES, "auto"):
        raise CemdError(f"modality must be {', '.join(MODALITIES)} or auto, got {modality!r}")
    if modality != "auto":
        bundle.branch(modality)  # raises the clear "bundle has no NBI branch" error
        return [modality]
    have = list(bundle.modalities)
    if len(have) < 2:
        raise CemdError(f"--modality auto needs both branches but bundle {bundle.path} has only "
                        f"{', '.join(m.upper() for m in have)}; use --modality {have[0]}")
    return have


class FrameScorer:
    """Scores RGB frames of one source at a time with a bundle's branches."""

    def __init__(self, input_size: int, classifier: ModalityClassifier | None, modality: str,
                 branches: dict[str, Branch], switch_frames: int = 2, switch_confidence: float = 0.9,
                 redetect_fov_every: int = 15, bundle: Bundle | None = None) -> None:
        """The parts, already loaded (`from_bundle` loads them). ``branches`` may be empty for a
        caller that only crops and routes (frame extraction)."""
        if modality == "auto" and classifier is None:
            raise CemdError("--modality auto needs the bundle's WLI/NBI classifier")
        self.input_size, self.classifier, self.modality = input_size, classifier, modality
        self.branches, self.bundle = branches, bundle
        self.switch = (switch_frames, switch_confidence)
        self.redetect_fov_every = redetect_fov_every
        self.warnings: list[str] = []
        self.reset()

    @classmethod
    def from_bundle(cls, bundle: Bundle | str | Path, modality: str = "auto", backend: str = "auto",
                    device: str = "cpu", precision: str | None = None, switch_frames: int = 2,
                    switch_confidence: float = 0.9, redetect_fov_every: int = 15, log: Log = lambda _s: None,
                    build: bool = True) -> FrameScorer:
        """Load the branches ``modality`` needs on ``backend`` (parity-checked, cached; ``build``
        False never compiles) and warm them. ``log`` gets the backends' progress lines; warnings
        (a classifier fitted on other data) are kept in ``warnings`` for the caller to show."""
        from engine.deploy.backends import load_scorers

        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        modalities = check_modality(bundle, modality)
        branches = load_scorers(bundle, modalities, backend, device, precision, log=log, build=build)
        # auto routes with it; a fixed modality still has it, to notice video of the other light
        classifier, warning = ModalityClassifier.for_bundle(bundle.path)
        scorer = cls(bundle.model.input_size, classifier, modality, branches, switch_frames, switch_confidence,
                     redetect_fov_every, bundle)
        if warning and modality == "auto":
            scorer.warnings.append(warning)
        scorer.warm()
        return scorer

    @classmethod
    def branches_only(cls, bundle: Bundle | str | Path, backends: dict[str, tuple[str, str]],
                      device: str = "cpu") -> FrameScorer:
        """A scorer for an inference worker: the branches exactly as another process loaded and
        parity-checked them (modality → (backend, precision)), loaded and never built; that
        process crops and routes, this one only runs `run_branch` on device tensors."""
        from engine.deploy.backends import compile_branch

        bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        branches = {m: compile_branch(bundle, m, backend, device, precision, build=False)[0]
                    for m, (backend, precision) in backends.items()}
        return cls(bundle.model.input_size, None, next(iter(backends)), branches, bundle=bundle)

    @property
    def backends(self) -> dict[str, str]:
        """Backend of each loaded branch (``eager`` for plain modules)."""
        return {m: getattr(b, "backend", "eager") for m, b in self.branches.items()}

    @property
    def timings(self) -> dict[str, dict[str, float]]:
        """``auto`` on the CPU: each branch's measured p50 per candidate backend (empty otherwise)."""
        return {m: t for m, b in self.branches.items() if (t := getattr(b, "timings_ms", None))}

    def warm(self) -> None:
        """Two calls of every branch on a host tensor, as frames arrive, so that the first frame
        does not pay the first allocations."""
        warm = torch.zeros(1, 3, self.input_size, self.input_size)
        with torch.no_grad():
            for branch in self.branches.values():
                for _ in range(2):
                    branch(warm)

    def reset(self) -> None:
        """Forget the previous source: field of view and router start again."""
        self.preprocess = FramePreprocessor(self.input_size, self.redetect_fov_every)
        self.router = (ModalityRouter(self.classifier, *self.switch)
                       if self.modality == "auto" and self.classifier is not None else None)

    def crop(self, rgb: np.ndarray) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int]]:
        """Field of view and crop (tensor, crop, box); the first half of `prepare`."""
        return self.preprocess(rgb)

    def route(self, crop: np.ndarray) -> tuple[str, bool]:
        """The branch for this crop and whether the router switched on it; the second half of `prepare`."""
        if self.router is None:
            return self.modality, False
        decision = self.router.update(crop)
        return decision.modality, decision.switched

    def prepare(self, rgb: np.ndarray) -> PreparedFrame:
        tensor, crop, box = self.crop(rgb)
        modality, switched = self.route(crop)
        return PreparedFrame(tensor, crop, box, modality, switched)

    def run_branch(self, modality: str, tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The branch call: (1×1×S×S anomaly map, image score)."""
        with torch.no_grad():
            amap, score = self.branches[modality](tensor)
        return amap, float(score.float()[0])

    def score(self, rgb: np.ndarray) -> FrameResult:
        """Score one H×W×3 uint8 RGB frame of the current source."""
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise CemdError(f"a frame is an H×W×3 uint8 RGB array, got {getattr(rgb, 'shape', type(rgb))} "
                            f"{getattr(rgb, 'dtype', '')}")
        frame = self.prepare(rgb)
        amap, score = self.run_branch(frame.modality, frame.tensor)
        return FrameResult(frame.modality, score, amap, frame.box)
