"""Modality routing: which student branch (WLI or NBI) scores a frame.

In ``auto`` mode every frame is classified from its colour: narrow-band light has little red,
so NBI frames sit far from WLI frames in chromaticity (mean r, g, b / (r + g + b) over the lit
disc). A logistic model on those three numbers is fitted on a bundle's training images and
stored in the bundle as ``modality.json``. A ``ModalityRouter`` adds hysteresis: the branch
changes only after ``switch_frames`` consecutive confident frames of the other modality, so a
switch on the tower is followed within a few frames while a single odd frame (a flash, a
glint, a blurred frame) never flips it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine.constants import MODALITIES
from engine.errors import CemdError

CLASSIFIER_FILE = "modality.json"
_LIT = 20  # an 8-bit level below which a pixel is border or shadow, not tissue

# Used only when a bundle has no modality.json: fitted on the synthetic training set
# data/synth-seed1 (see docs/STREAMING.md); a user with real video should fit their own.
DEFAULT_CLASSIFIER = {"weights": [-78.1646, 174.046, 100.826], "bias": -53.0908,
                      "fitted_on": "built-in default (synthetic data/synth-seed1)"}


def chromaticity(rgb: np.ndarray) -> np.ndarray | None:
    """Mean (r, g, b) chromaticity of the lit pixels of an RGB uint8 image, or None if nothing is lit.

    Computed on a 64×64 area-averaged copy: colour needs no detail, and this keeps routing
    well under a millisecond at any frame size.
    """
    import cv2

    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA) if rgb.shape[0] * rgb.shape[1] > 4096 else rgb
    lit = (small.max(axis=2) > _LIT).astype(np.uint8)
    if int(lit.sum()) < 16:
        return None
    mean = np.asarray(cv2.mean(small, mask=lit)[:3], np.float32)
    return mean / max(float(mean.sum()), 1.0)


@dataclass
class ModalityClassifier:
    """p(NBI) = sigmoid(w · chromaticity + b)."""

    weights: np.ndarray
    bias: float
    fitted_on: str = ""

    def p_nbi(self, rgb: np.ndarray) -> float | None:
        c = chromaticity(rgb)
        if c is None:
            return None
        z = float(np.dot(self.weights, c) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def to_json(self) -> dict[str, Any]:
        return {"format": "cemd-modality/1", "weights": [round(float(w), 4) for w in self.weights],
                "bias": round(self.bias, 4), "fitted_on": self.fitted_on}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModalityClassifier":
        return cls(np.asarray(obj["weights"], np.float32), float(obj["bias"]), str(obj.get("fitted_on", "")))

    @classmethod
    def for_bundle(cls, bundle_path: Path) -> tuple["ModalityClassifier", str | None]:
        """The bundle's classifier, or the built-in default and a warning saying so."""
        path = Path(bundle_path) / CLASSIFIER_FILE
        if not path.is_file():
            return cls.from_json(DEFAULT_CLASSIFIER), (
                f"{path} is missing: --modality auto uses the built-in colour classifier fitted on synthetic "
                f"video; fit one on your images with: cemd fit-modality --bundle {bundle_path} --data DIR")
        try:
            return cls.from_json(json.loads(path.read_text())), None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CemdError(f"{path} is not a valid modality classifier ({exc}); "
                            f"refit it with: cemd fit-modality --bundle {bundle_path} --data DIR") from None


def fit_classifier(features: dict[str, list[np.ndarray]], fitted_on: str, steps: int = 3000) -> ModalityClassifier:
    """Logistic regression (full-batch gradient descent) of NBI vs WLI on chromaticity features."""
    xw, xn = np.asarray(features["wli"], np.float64), np.asarray(features["nbi"], np.float64)
    if len(xw) < 5 or len(xn) < 5:
        raise CemdError(f"fitting the modality classifier needs at least 5 images per modality "
                        f"(have WLI {len(xw)}, NBI {len(xn)})")
    x = np.concatenate([xw, xn])
    y = np.concatenate([np.zeros(len(xw)), np.ones(len(xn))])
    # Standardised features: chromaticities vary by a few hundredths, so on raw values no single
    # step size suits both the weights and the bias (a large one made the bias oscillate).
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    w, b = np.zeros(3), 0.0
    balance = np.where(y == 1, len(y) / (2 * len(xn)), len(y) / (2 * len(xw)))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = (p - y) * balance
        w -= 4.0 * (z.T @ g / len(y) + 1e-5 * w)
        b -= 4.0 * g.mean()
    # Fold the standardisation into weights and bias so the stored model applies to raw chromaticity.
    w_raw = w / std
    return ModalityClassifier(w_raw.astype(np.float32), float(b - w_raw @ mean), fitted_on)


def fit_from_dataset(root: Path, limit: int = 300) -> ModalityClassifier:
    """Fit on the normal training images of both modalities (the dataset layout of docs/DATA.md)."""
    from engine.data.dataset import load_image, scan_dataset

    index = scan_dataset(root, MODALITIES, require_train=True)  # the dataset's own checks and messages
    feats: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    for m in MODALITIES:
        for path in index.modalities[m].train[:limit]:
            c = chromaticity(load_image(path, 64))  # colour needs no detail: the 64×64 chromaticity() uses anyway
            if c is not None:
                feats[m].append(c)
    return fit_classifier(feats, fitted_on=str(root))


@dataclass
class RouteDecision:
    modality: str
    p_nbi: float | None
    switched: bool


@dataclass
class ModalityRouter:
    """Hysteresis over per-frame modality votes."""

    classifier: ModalityClassifier
    switch_frames: int = 2
    confidence: float = 0.9
    modality: str | None = None
    switches: int = 0
    _streak: int = field(default=0, repr=False)

    def update(self, rgb: np.ndarray) -> RouteDecision:
        p = self.classifier.p_nbi(rgb)
        vote = None if p is None else "nbi" if p >= self.confidence else "wli" if p <= 1 - self.confidence else None
        if self.modality is None:  # the first frame decides (a plain 0.5 cut) so scoring can start at once
            self.modality = "nbi" if (p or 0.0) >= 0.5 else "wli"
            return RouteDecision(self.modality, p, False)
        switched = False
        if vote is not None and vote != self.modality:
            self._streak += 1
            if self._streak >= self.switch_frames:
                self.modality, self._streak, switched = vote, 0, True
                self.switches += 1
        elif vote == self.modality:
            self._streak = 0
        return RouteDecision(self.modality, p, switched)


def routing_accuracy(chosen: Iterable[str], truth: Iterable[str]) -> float:
    pairs = list(zip(chosen, truth))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)
