"""Synthetic paired WLI/NBI gastric endoscopy images with lesion masks (no real data exists here).

One *scene* (mucosa texture, gastric areae and pits, capillaries, deeper vessels, folds, an
optional lesion) is built as a set of physical fields, then rendered twice with a small
Beer-Lambert colour model: white light (WLI) and narrow-band imaging (NBI) differ only in the
base reflectance and in how strongly each field absorbs in each display channel. That is why
superficial capillaries look faint red in WLI but dark brown in NBI, and deep vessels faint
bluish in WLI but cyan in NBI, as in real scopes.

Randomness is split into independent streams derived from one seed:

- the *scene* stream (patient tone, texture, vessels, camera, text) never depends on the lesion,
  so ``render_pair(s, kind=None)`` and ``render_pair(s, kind=k)`` show the same scene and differ
  only where the lesion is (the visibility tests rely on this);
- the *lesion* stream (shape, size, position, lesion texture);
- generator 2.0 only: the *nuisance* stream (camera pipeline, exposure, fluids, JPEG quality), also
  independent of the lesion.

Generator 2.0 (``generator="2.0"``; 1.1 stays the default and bit-for-bit unchanged) draws the same
scene and adds, from a third stream, nuisances that do not cancel in log-chromaticity — a camera
pipeline on linear light (light-source colour, channel mixing, coloured flare offset, per-channel
light falloff, another display gamma), over/under-exposure with clipping, bile, blood, mucus and dye
on the mucosa, JPEG compression — and lesions carried by texture, relief and structure with only a
small colour change from within the normal spread (docs/DATA.md#generator-20-nuisances-that-defeat-colour-rules).

Everything is vectorised numpy + OpenCV (about 20 ms per 256² pair on 2 CPU cores; 2.0 about 30 ms).
Lengths are in units of the field-of-view radius, so any image size shows the same anatomy.
``engine.synth.video`` reuses the scene/lesion/colour functions on a large "world" canvas.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from engine.constants import MODALITIES
from engine.errors import CemdError
from engine.progress import progress_steps

__all__ = [
    "DATASET_FORMAT",
    "GENERATOR_VERSION",
    "GENERATORS",
    "LESION_KINDS",
    "MODALITIES",
    "SynthPair",
    "render_pair",
    "write_dataset",
    "render_example_grid",
    "item_seed",
]

GENERATOR_VERSION = "1.1"  # the default generator (the shipped demo bundle and its calibration were made on it)
GENERATORS: tuple[str, ...] = ("1.1", "2.0")
DATASET_FORMAT = "cemd-dataset/1"

LESION_KINDS: dict[str, dict[str, Any]] = {
    "elevated_erythema": {
        "visible_in": ["wli"],
        "description": "slightly elevated reddish patch with smoothed surface and changed shading; "
        "in NBI at most a faintly darker brownish area",
    },
    "irregular_microvessels": {
        "visible_in": ["nbi"],
        "description": "dense, tortuous, irregular-calibre superficial micro-vessels replacing the "
        "regular pit/capillary pattern; dark brown in NBI, only a faint redness in WLI",
    },
    "depressed_neoplasia": {
        "visible_in": ["wli", "nbi"],
        "description": "shallow depression with an irregular border, paler or redder in WLI, a dark "
        "brownish area with irregular vessels in NBI",
    },
}

_NOISE_GAIN = 1.0 / 0.8  # upsampling white noise keeps ~0.8 of its std
_SCENE, _LESION = 0, 1  # child streams of an item's seed
_NUISANCE = 2  # generator 2.0 only: camera pipeline, fluids, exposure, compression (never drawn by 1.1)
_SPLIT_IDS = {"train": 1, "test": 2, "example": 3}
_KIND_IDS = {None: 0, "elevated_erythema": 1, "irregular_microvessels": 2, "depressed_neoplasia": 3}
_SEED_TAG = 0x53594E54  # "SYNT": keeps these streams apart from other users of the same integer seed


# --------------------------------------------------------------------------- seeds


def _seed_sequence(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CemdError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.SeedSequence([_SEED_TAG, int(seed)])


def _child_rng(ss: np.random.SeedSequence, stream: int) -> np.random.Generator:
    """A child stream without mutating ``ss`` (SeedSequence.spawn is stateful)."""
    child = np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + (stream,))
    return np.random.default_rng(child)


def item_seed(seed: int, split: str, kind: str | None, index: int) -> np.random.SeedSequence:
    """The seed of one dataset item: independent of how many items are generated."""
    return np.random.SeedSequence([_SEED_TAG, int(seed)], spawn_key=(_SPLIT_IDS[split], _KIND_IDS[kind], index))


# --------------------------------------------------------------------------- noise and geometry helpers


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise (std ≈ 1) with features about ``cell`` px wide.

    A small random grid is upsampled bicubically to a ~3 px lattice and then bilinearly to full
    size: as smooth as a full bicubic upsampling (no visible kinks in the shading, which
    differentiates it) at a fraction of the cost.
    """
    if cell <= 1.5:
        return rng.standard_normal((h, w), dtype=np.float32)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    k = max(1, int(cell / 3))
    if k > 1:
        grid = cv2.resize(grid, (gw * k, gh * k), interpolation=cv2.INTER_CUBIC)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_LINEAR)
    o = int(cell)
    return big[o : o + h, o : o + w] * np.float32(_NOISE_GAIN)


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3, gain: float = 0.5) -> np.ndarray:
    """Multi-scale noise normalised to std ≈ 1."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += np.float32(amp) * _noise(rng, h, w, cell / (2**o))
        total += amp * amp
        amp *= gain
    out *= np.float32(1.0 / math.sqrt(total))
    return out


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only x and y coordinate images (cached: every stage of a render needs them)."""
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigma)


def _hex_seeds(rng: np.random.Generator, h: int, w: int, spacing: float, jitter: float) -> np.ndarray:
    """Jittered hexagonal lattice of points (x, y) covering the canvas."""
    dy = spacing * 0.866
    ys = np.arange(-dy, h + dy, dy, dtype=np.float32)
    xs = np.arange(-spacing, w + spacing, spacing, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys)
    gx[1::2] += spacing / 2
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    pts += rng.normal(0, jitter * spacing, pts.shape).astype(np.float32)
    return pts


def _voronoi(seeds: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest seed and distance to the nearest cell border (both px)."""
    src = np.full((h, w), 255, np.uint8)
    xi = np.clip(np.rint(seeds[:, 0]).astype(np.int32), 0, w - 1)
    yi = np.clip(np.rint(seeds[:, 1]).astype(np.int32), 0, h - 1)
    src[yi, xi] = 0
    d_seed, labels = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    d_edge = cv2.distanceTransform(np.where(edge, 0, 255).astype(np.uint8), cv2.DIST_L2, 5)
    return d_seed, d_edge


def _draw_polylines(canvas: np.ndarray, lines: Sequence[np.ndarray], thickness: int, value: float = 255) -> None:
    """Anti-aliased sub-pixel polylines (points as float (n, 2) arrays of x, y)."""
    if not lines:
        return
    pts = [np.rint(p * 4).astype(np.int32) for p in lines]
    cv2.polylines(canvas, pts, False, float(value), max(1, int(thickness)), cv2.LINE_AA, shift=2)


def _walks(
    rng: np.random.Generator, starts: np.ndarray, steps: int, step_len: float, turn_sigma: float, smooth: bool
) -> np.ndarray:
    """Random-walk curves (n, steps+1, 2).

    ``smooth`` low-passes the turning rate (a moving average), giving vessel-like arcs that
    meander without curling into spirals.
    """
    n = len(starts)
    theta0 = rng.uniform(0, 2 * np.pi, (n, 1))
    turns = rng.normal(0, turn_sigma, (n, steps + 5))
    if smooth:
        c = np.cumsum(turns, axis=1)
        turns = (c[:, 5:] - c[:, :-5]) * 0.6
    else:
        turns = turns[:, :steps]
    ang = theta0 + np.cumsum(turns, axis=1)
    d = np.stack([np.cos(ang), np.sin(ang)], -1) * step_len
    pts = np.concatenate([np.zeros((n, 1, 2)), np.cumsum(d, axis=1)], axis=1)
    return (pts + starts[:, None, :]).astype(np.float32)


# --------------------------------------------------------------------------- scene: tissue fields


@dataclass(frozen=True)
class Tissue:
    """Patient/site parameters: the wide normal variation the model must learn to accept."""

    zoom: float  # optical magnification: all texture lengths scale with it
    pit_spacing: float  # in FOV radii
    pit_strength: float
    honey_strength: float  # regular subepithelial capillary network around pits
    areae_spacing: float
    groove_strength: float
    areae_relief: float
    fold_strength: float
    fold_wavelength: float
    fold_angle: float
    bump_strength: float
    redness_patch: float  # patchy diffuse hyperaemia (normal gastritis-like variation)
    pallor: float  # atrophy-like paleness
    deep_density: float  # deep vessels per FOV radius²
    deep_strength: float
    cap_density: float
    cap_strength: float
    gloss_threshold: float
    light_dir: tuple[float, float]
    wli_base: tuple[float, float, float]
    nbi_base: tuple[float, float, float]


def sample_tissue(rng: np.random.Generator) -> Tissue:
    """One patient/site: tones, texture scales, vessel densities (atrophy couples several)."""
    atrophy = float(rng.beta(1.3, 3.0))
    redness = float(rng.uniform(-1, 1))
    yellow = float(rng.uniform(-1, 1))
    bright = float(rng.uniform(-1, 1))
    wli = (234 + 10 * redness + 10 * bright, 150 - 24 * redness + 12 * yellow + 16 * bright,
           128 - 16 * redness - 14 * yellow + 14 * bright)
    brown = float(rng.uniform(-1, 1))
    teal = float(rng.uniform(-1, 1))
    nb = float(rng.uniform(-1, 1))
    nbi = (122 + 16 * brown + 10 * nb, 152 - 4 * brown + 14 * teal + 12 * nb, 136 - 12 * brown + 18 * teal + 12 * nb)
    ang = rng.uniform(0, 2 * np.pi)
    return Tissue(
        zoom=float(np.exp(rng.uniform(np.log(0.75), np.log(1.45)))),
        pit_spacing=float(rng.uniform(0.055, 0.085)),
        pit_strength=float(rng.uniform(0.25, 0.9) * (1 - 0.5 * atrophy)),
        honey_strength=float(rng.uniform(0.1, 0.35) * (1 - 0.4 * atrophy)),
        areae_spacing=float(rng.uniform(0.22, 0.42)),
        groove_strength=float(rng.uniform(0.25, 0.9)),
        areae_relief=float(rng.uniform(0.2, 1.0)),
        fold_strength=float(rng.uniform(0.0, 1.0) if rng.random() < 0.65 else 0.0),
        fold_wavelength=float(rng.uniform(0.6, 1.3)),
        fold_angle=float(rng.uniform(0, np.pi)),
        bump_strength=float(rng.uniform(0.3, 1.0)),
        redness_patch=float(rng.uniform(0.0, 0.25)),
        pallor=float(0.35 * atrophy * rng.uniform(0.3, 1.0)),
        deep_density=float(rng.uniform(1.0, 4.0) * (0.4 + 1.6 * atrophy)),
        deep_strength=float(rng.uniform(0.15, 0.45) + 0.7 * atrophy),
        cap_density=float(rng.uniform(3.0, 12.0)),
        cap_strength=float(rng.uniform(0.25, 0.65)),
        gloss_threshold=float(rng.uniform(2.3, 2.9)),
        light_dir=(float(np.cos(ang)), float(np.sin(ang))),
        wli_base=wli,
        nbi_base=nbi,
    )


@dataclass
class Fields:
    """Physical fields of one scene (float32 H×W). Lesions edit these; colour is derived from them."""

    height: np.ndarray  # surface relief in px (its gradient gives shading)
    groove: np.ndarray  # areae gastricae grooves 0..1
    pit: np.ndarray  # foveola openings 0..1
    cap: np.ndarray  # superficial capillary density
    deep: np.ndarray  # deeper (submucosal) vessel density
    hb: np.ndarray  # diffuse hyperaemia (erythema)
    shb: np.ndarray  # diffuse superficial haemoglobin (NBI "brownish area")
    pale: np.ndarray  # whitish discolouration 0..1
    gloss: np.ndarray  # wet-surface glint potential (noise, std ≈ 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height.shape  # type: ignore[return-value]


def _deep_vessels(rng: np.random.Generator, h: int, w: int, L: float, t: Tissue) -> np.ndarray:
    """Branching, slowly curving, blurred vessels of a few calibres."""
    canvas = np.zeros((h, w), np.float32)
    n = int(rng.poisson(t.deep_density * h * w / (L * L)))
    if n == 0:
        return canvas
    steps = 24
    step = 0.07 * L
    starts = np.stack([rng.uniform(-0.2 * w, 1.2 * w, n), rng.uniform(-0.2 * h, 1.2 * h, n)], 1)
    trunks = _walks(rng, starts, steps, step, 0.09, smooth=True)
    thick = rng.uniform(0.018, 0.04, n) * L
    by_width: dict[int, list[np.ndarray]] = {}
    for i in range(n):
        by_width.setdefault(max(1, round(thick[i])), []).append(trunks[i])
        nb = rng.integers(0, 3)
        if nb:
            at = rng.integers(3, steps - 3, nb)
            br = _walks(rng, trunks[i, at], steps // 2, step * 0.8, 0.12, smooth=True)
            for b in br:
                by_width.setdefault(max(1, round(thick[i] * 0.6)), []).append(b)
    for width, lines in by_width.items():
        _draw_polylines(canvas, lines, width, 1.0)
    return _blur(canvas, 0.012 * L + 0.4)


def _capillaries(rng: np.random.Generator, h: int, w: int, L: float, density: float) -> np.ndarray:
    """Sparse thin tortuous superficial capillaries (normal mucosa)."""
    canvas = np.zeros((h, w), np.float32)
    n = int(rng.poisson(density * h * w / (L * L)))
    if n:
        starts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
        walks = _walks(rng, starts, 10, 0.02 * L, 0.45, smooth=False)
        _draw_polylines(canvas, list(walks), max(1, round(0.006 * L)), 1.0)
    return canvas


def render_tissue(rng: np.random.Generator, t: Tissue, h: int, w: int, radius: float) -> Fields:
    """All scene fields for a canvas whose FOV radius is ``radius`` px (texture scales follow zoom)."""
    L = radius * t.zoom  # px per physical unit
    # Gastric pits on a jittered hex lattice; the regular capillary honeycomb runs between them.
    pit_sp = t.pit_spacing * L
    d_seed, d_edge = _voronoi(_hex_seeds(rng, h, w, pit_sp, 0.18), h, w)
    pit = np.exp(-((d_seed / (0.22 * pit_sp)) ** 2)) * np.float32(t.pit_strength)
    honey = np.exp(-((d_edge / max(0.55, 0.08 * pit_sp)) ** 2))
    # Areae gastricae: larger polygonal domes separated by wobbly grooves.
    # Their cells are large, so the Voronoi is computed at half resolution and sampled up by
    # the same remap that makes the borders wobble.
    ar_sp = t.areae_spacing * L
    hh, hw = (h + 1) // 2, (w + 1) // 2
    _, a_edge = _voronoi(_hex_seeds(rng, hh, hw, ar_sp / 2, 0.3), hh, hw)
    wob = 0.18 * ar_sp
    gx, gy = _pixel_grid(h, w)
    mx = (gx + _noise(rng, h, w, 0.5 * ar_sp) * np.float32(wob)) * np.float32(0.5)
    my = (gy + _noise(rng, h, w, 0.5 * ar_sp) * np.float32(wob)) * np.float32(0.5)
    a_edge = cv2.remap(a_edge, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT) * np.float32(2.0)
    groove_w = 0.05 * ar_sp + 0.4
    groove_mod = 0.6 + 0.4 * np.clip(_noise(rng, h, w, ar_sp), -1.5, 1.5)
    groove = np.exp(-((a_edge / groove_w) ** 2)) * groove_mod * np.float32(t.groove_strength)
    dome = np.sqrt(np.minimum(a_edge / (0.5 * ar_sp), 1.0))
    # Relief: rugae (long folds), areae domes, fine bumps.
    u = (gx * math.cos(t.fold_angle) + gy * math.sin(t.fold_angle)) / (t.fold_wavelength * L)
    phase = 2 * np.pi * u + 2.2 * _noise(rng, h, w, 0.8 * L)
    folds = (0.5 + 0.5 * np.sin(phase)) ** 2
    height = (
        folds * np.float32(0.12 * t.fold_strength * L)
        + dome * np.float32(0.02 * t.areae_relief * ar_sp)
        + _fbm(rng, h, w, 0.06 * L, 2) * np.float32(0.006 * t.bump_strength * L)
    )
    cap = honey * np.float32(t.honey_strength) + _capillaries(rng, h, w, L, t.cap_density) * np.float32(t.cap_strength)
    deep = _deep_vessels(rng, h, w, L, t) * np.float32(t.deep_strength)
    hb = np.maximum(_fbm(rng, h, w, 0.35 * L, 2) * np.float32(t.redness_patch), 0) + np.float32(0.08)
    shb = np.maximum(_fbm(rng, h, w, 0.2 * L, 2) * np.float32(0.08), 0)
    pale = np.clip(_noise(rng, h, w, 0.4 * L) * 0.5 + 0.5, 0, 1) * np.float32(t.pallor)
    gloss = _fbm(rng, h, w, 0.05 * L, 2)
    return Fields(height, groove.astype(np.float32), pit, cap, deep, hb, shb, pale.astype(np.float32), gloss)


# --------------------------------------------------------------------------- lesions


@dataclass
class LesionShape:
    kind: str
    center: tuple[float, float]
    polygon: np.ndarray  # (n, 2) float x, y
    mask: np.ndarray  # uint8 0/1, the ground truth
    alpha: np.ndarray  # float32 soft weight used for rendering
    r_mean: float


def lesion_polygon(
    rng: np.random.Generator, kind: str, center: tuple[float, float], area_px: float
) -> tuple[np.ndarray, float]:
    """Star-shaped outline scaled to ``area_px``; depressed lesions get a ragged border."""
    n = 128
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if kind == "depressed_neoplasia":
        harmonics, sigma, decay = 16, 0.16, 0.7
    elif kind == "irregular_microvessels":
        harmonics, sigma, decay = 8, 0.12, 1.0
    else:
        harmonics, sigma, decay = 5, 0.12, 1.2
    r = np.ones(n)
    for k in range(2, harmonics + 1):
        r += rng.normal(0, sigma / k**decay) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.45, None)
    elong, rot = rng.uniform(1.0, 1.6), rng.uniform(0, np.pi)
    x, y = r * np.cos(theta) * elong, r * np.sin(theta) / elong
    xr = x * math.cos(rot) - y * math.sin(rot)
    yr = x * math.sin(rot) + y * math.cos(rot)
    area = 0.5 * abs(np.dot(xr, np.roll(yr, 1)) - np.dot(yr, np.roll(xr, 1)))
    s = math.sqrt(area_px / area)
    poly = np.stack([xr * s + center[0], yr * s + center[1]], 1).astype(np.float32)
    return poly, float(s * np.mean(r))


def _fill_polygon(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.rint(poly * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def make_lesion(
    rng: np.random.Generator, kind: str, center: tuple[float, float], area_px: float, h: int, w: int
) -> LesionShape:
    poly, r_mean = lesion_polygon(rng, kind, center, area_px)
    mask = _fill_polygon(poly, h, w)
    soft = {"elevated_erythema": 0.10, "irregular_microvessels": 0.06, "depressed_neoplasia": 0.035}[kind]
    alpha = _blur(mask.astype(np.float32), soft * r_mean + 0.5)
    # Soft edge that stays mostly inside the outline, so the pixel labels match what is visible.
    alpha = np.clip(alpha * 1.6 - 0.3, 0, 1)
    return LesionShape(kind, center, poly, mask, alpha, r_mean)


def _lesion_vessels(
    rng: np.random.Generator, lesion: LesionShape, density: float, L: float, min_walks: int = 6
) -> np.ndarray:
    """Dense tortuous vessels of irregular calibre, confined to the lesion (at least ``min_walks`` of them)."""
    h, w = lesion.mask.shape
    ys, xs = np.nonzero(lesion.mask)
    canvas = np.zeros((h, w), np.float32)
    if len(xs) == 0:
        return canvas
    step = 0.018 * L
    n = max(min_walks, int(density * len(xs) / (4.5 * step) ** 2))
    pick = rng.integers(0, len(xs), n)
    starts = np.stack([xs[pick], ys[pick]], 1).astype(np.float32)
    walks = _walks(rng, starts, 12, step, 0.75, smooth=False)
    unit = max(1.0, 0.0065 * L)
    by_width: dict[int, list[np.ndarray]] = {}
    for wk in walks:
        for c in range(0, 12, 4):  # calibre changes along each vessel
            wd = max(1, round(unit * rng.choice([1.0, 1.0, 1.6, 2.4])))
            by_width.setdefault(wd, []).append(wk[c : c + 5])
    for wd, lines in by_width.items():
        _draw_polylines(canvas, lines, wd, 1.0)
    canvas *= np.clip(lesion.alpha * 1.5, 0, 1)
    canvas *= 0.75 + 0.25 * np.clip(_noise(rng, h, w, 0.05 * L), -1, 1)
    return _blur(canvas, 0.3 * unit)


def apply_lesion(fields: Fields, lesion: LesionShape, rng: np.random.Generator, L: float) -> None:
    """Edit the scene fields in place so the lesion shows per modality as LESION_KINDS describes."""
    a = lesion.alpha
    h, w = a.shape
    r = lesion.r_mean
    tex = 0.8 + 0.2 * np.clip(_noise(rng, h, w, 0.04 * L), -2, 2)
    if lesion.kind == "elevated_erythema":
        fields.hb += a * tex * np.float32(rng.uniform(1.3, 1.9))
        dome = _blur(lesion.mask.astype(np.float32), 0.35 * r)
        fields.height += dome * np.float32(rng.uniform(0.2, 0.32) * r)
        fields.groove *= 1 - 0.85 * a
        fields.pit *= 1 - 0.7 * a
        fields.shb += a * np.float32(0.08)
    elif lesion.kind == "irregular_microvessels":
        fields.cap *= 1 - a
        fields.pit *= 1 - 0.8 * a
        fields.groove *= 1 - 0.4 * a
        fields.cap += _lesion_vessels(rng, lesion, rng.uniform(0.8, 1.3), L) * np.float32(rng.uniform(1.1, 1.5))
        fields.shb += a * np.float32(rng.uniform(0.15, 0.3))
        fields.hb += a * np.float32(0.06)
    elif lesion.kind == "depressed_neoplasia":
        dip = _blur(lesion.mask.astype(np.float32), 0.06 * r + 0.5)
        fields.height -= dip * np.float32(rng.uniform(0.1, 0.16) * r)
        # Irregular, uneven surface inside the depression (what the endoscopist sees in WLI).
        fields.height += a * _fbm(rng, h, w, 0.05 * L, 2) * np.float32(0.02 * L)
        if rng.random() < 0.5:
            fields.pale += a * tex * np.float32(rng.uniform(0.75, 0.95))
        else:
            fields.hb += a * tex * np.float32(rng.uniform(1.1, 1.6))
        fields.shb += a * tex * np.float32(rng.uniform(0.85, 1.2))
        fields.cap *= 1 - 0.85 * a
        fields.pit *= 1 - 0.85 * a
        fields.groove *= 1 - 0.85 * a
        fields.cap += _lesion_vessels(rng, lesion, rng.uniform(0.4, 0.8), L) * np.float32(rng.uniform(0.7, 1.0))
    else:  # pragma: no cover - guarded by callers
        raise CemdError(f"unknown lesion kind {lesion.kind!r}; choose one of {', '.join(LESION_KINDS)}")


# --------------------------------------------------------------------------- generator 2.0: lesions


def _inside_mean(a: np.ndarray, inside: np.ndarray) -> float:
    v = a[inside]
    return float(v.mean()) if v.size else 0.0


def _replace_pattern(field_: np.ndarray, pattern: np.ndarray, a: np.ndarray, inside: np.ndarray, gain: float) -> None:
    """In place: ``field_`` → ``pattern`` under the lesion weight ``a``, the pattern scaled so that the
    field's mean inside the lesion changes only by ``gain`` (structure changes, mean absorbance not)."""
    target = _inside_mean(field_, inside) * gain
    m = _inside_mean(pattern, inside)
    field_ *= 1 - a
    if m > 1e-6 and target > 0:
        field_ += a * pattern * np.float32(target / m)


def _ridge_pattern(rng: np.random.Generator, h: int, w: int, spacing: float, lesion: LesionShape) -> np.ndarray:
    """Tubular/gyrus-like surface pattern (0..1): wavy ridges about ``spacing`` px apart that bend and fork."""
    gx, gy = _pixel_grid(h, w)
    cx, cy = lesion.center
    theta = np.float32(rng.uniform(0, np.pi)) + np.float32(0.35) * _noise(rng, h, w, max(2.0, lesion.r_mean))
    u = (gx - np.float32(cx)) * np.cos(theta) + (gy - np.float32(cy)) * np.sin(theta)
    phase = u * np.float32(2 * np.pi / spacing) + np.float32(2.5) * _noise(rng, h, w, max(2.0, 1.5 * spacing))
    ridges = np.float32(0.5) + np.float32(0.5) * np.cos(phase)
    return (ridges * ridges).astype(np.float32)


def _irregular_pits(rng: np.random.Generator, h: int, w: int, spacing: float) -> np.ndarray:
    """Pits of uneven size on a disordered lattice (0..1), instead of the regular hexagonal one."""
    sp = spacing * float(rng.uniform(0.75, 1.35))
    d_seed, _ = _voronoi(_hex_seeds(rng, h, w, sp, 0.45), h, w)
    size = np.float32(0.22 * sp) * (1 + 0.45 * np.clip(_noise(rng, h, w, max(2.0, 1.2 * sp)), -1.5, 1.5))
    return np.exp(-((d_seed / size) ** 2)).astype(np.float32)


def _network_vessels(rng: np.random.Generator, lesion: LesionShape, L: float, target: float, inside: np.ndarray,
                     intensity: float) -> np.ndarray:
    """A dense network of tortuous lesion vessels of uneven calibre (1–3 px), as many as give a mean of
    ``target`` inside the lesion at about ``intensity``: a changed vessel pattern, not a browner area."""
    h, w = lesion.mask.shape
    canvas = np.zeros((h, w), np.float32)
    ys, xs = np.nonzero(inside)
    if len(xs) == 0 or target <= 0:
        return canvas
    steps, step = 12, 0.022 * L
    per_walk = steps * step * 2.0  # px of vessel per walk (calibre 1–3 px)
    n = int(np.clip(round(target * len(xs) / (per_walk * intensity)), 3, 400))
    pick = rng.integers(0, len(xs), n)
    walks = _walks(rng, np.stack([xs[pick], ys[pick]], 1).astype(np.float32), steps, step, 0.8, smooth=False)
    by_width: dict[int, list[np.ndarray]] = {}
    for wk in walks:
        for c in range(0, steps, 4):  # calibre changes along each vessel
            by_width.setdefault(int(rng.choice([1, 2, 2, 3])), []).append(wk[c : c + 5])
    for wd, lines in by_width.items():
        _draw_polylines(canvas, lines, wd, 1.0)
    canvas *= np.clip(lesion.alpha * 1.5, 0, 1)
    canvas *= 0.7 + 0.3 * np.clip(_noise(rng, h, w, max(2.0, 0.05 * L)), -1, 1)
    return _blur(canvas, 0.35)


def _v2_elevated_erythema(fields: Fields, lesion: LesionShape, rng: np.random.Generator, L: float, t: Tissue,
                          inside: np.ndarray) -> None:
    """Generator 2.0, elevated erythema: a nodular dome with a tubular surface and mottled redness."""
    a = lesion.alpha
    h, w = a.shape
    r = lesion.r_mean
    pit_sp = t.pit_spacing * L
    solid = lesion.mask.astype(np.float32)
    fields.height += _blur(solid, 0.35 * r) * np.float32(rng.uniform(0.2, 0.32) * r)
    # nodular, granular surface on the dome (shading texture in both lights)
    fields.height += a * _fbm(rng, h, w, max(2.0, 1.6 * pit_sp), 2) * np.float32(rng.uniform(0.022, 0.035) * L)
    ridges = _ridge_pattern(rng, h, w, float(rng.uniform(1.6, 2.4)) * pit_sp, lesion)
    fields.height += a * ridges * np.float32(rng.uniform(0.004, 0.008) * L)  # tubular surface relief
    _replace_pattern(fields.pit, ridges, a, inside, float(rng.uniform(0.85, 1.15)))
    _replace_pattern(fields.groove, ridges, a, inside, float(rng.uniform(0.85, 1.15)))
    # mottled redness: fine red speckle of (almost) zero mean, plus a share of the scene's own redness
    speck = np.maximum(_noise(rng, h, w, max(1.6, 0.9 * pit_sp)), 0)
    speck -= np.float32(_inside_mean(speck, inside))
    fields.hb += a * (speck * np.float32(rng.uniform(0.4, 0.7))
                      + np.float32(rng.uniform(0.0, 0.8) * t.redness_patch))
    np.maximum(fields.hb, 0, out=fields.hb)
    fields.gloss += a * np.float32(rng.uniform(0.3, 0.8))  # wet dome: glints follow the bump


def _v2_irregular_microvessels(fields: Fields, lesion: LesionShape, rng: np.random.Generator, L: float, t: Tissue,
                               inside: np.ndarray) -> None:
    """Generator 2.0, irregular microvessels: a dense vessel network and coarse ridges instead of pits."""
    a = lesion.alpha
    h, w = a.shape
    pit_sp = t.pit_spacing * L
    gain = float(rng.uniform(2.5, 4.0))
    vessels = _network_vessels(rng, lesion, L, _inside_mean(fields.cap, inside) * gain, inside,
                               float(rng.uniform(0.6, 0.9)))
    _replace_pattern(fields.cap, vessels, a, inside, gain)
    # irregular microsurface: the pits give way to coarse, bent ridges (pits absorb ~3× more in NBI)
    ridges = _ridge_pattern(rng, h, w, float(rng.uniform(1.6, 2.4)) * pit_sp, lesion)
    _replace_pattern(fields.pit, ridges, a, inside, float(rng.uniform(2.0, 3.0)))
    fields.height += a * _fbm(rng, h, w, max(2.0, 1.2 * pit_sp), 2) * np.float32(rng.uniform(0.004, 0.008) * L)
    fields.shb += a * np.float32(rng.uniform(0.0, 0.05))
    fields.hb += a * np.float32(rng.uniform(0.0, 0.5) * t.redness_patch)


def _v2_depressed_neoplasia(fields: Fields, lesion: LesionShape, rng: np.random.Generator, L: float, t: Tissue,
                            inside: np.ndarray) -> None:
    """Generator 2.0, depressed neoplasia: an uneven dip with irregular grooves, pits and vessels."""
    a = lesion.alpha
    h, w = a.shape
    r = lesion.r_mean
    pit_sp = t.pit_spacing * L
    solid = lesion.mask.astype(np.float32)
    dip = _blur(solid, 0.06 * r + 0.5)
    fields.height -= dip * np.float32(rng.uniform(0.1, 0.16) * r)
    # irregular, uneven surface: fine roughness (as 1.1) and coarse nodules
    fields.height += a * _fbm(rng, h, w, 0.05 * L, 2) * np.float32(0.02 * L)
    fields.height += a * _fbm(rng, h, w, 0.15 * L, 2) * np.float32(rng.uniform(0.02, 0.035) * L)
    ridges = _ridge_pattern(rng, h, w, float(rng.uniform(1.2, 2.0)) * pit_sp, lesion)
    _replace_pattern(fields.groove, ridges, a, inside, float(rng.uniform(0.7, 1.1)))
    fields.height += a * ridges * np.float32(rng.uniform(0.004, 0.008) * L)
    _replace_pattern(fields.pit, _irregular_pits(rng, h, w, pit_sp), a, inside, float(rng.uniform(0.6, 1.0)))
    gain = float(rng.uniform(1.0, 1.6))
    vessels = _network_vessels(rng, lesion, L, _inside_mean(fields.cap, inside) * gain, inside,
                               float(rng.uniform(0.5, 0.9)))
    _replace_pattern(fields.cap, vessels, a, inside, gain)
    if rng.random() < 0.5:
        fields.pale += a * np.float32(rng.uniform(0.0, 0.5) * t.pallor)
    else:
        fields.hb += a * np.float32(rng.uniform(0.0, 0.8) * t.redness_patch)
    fields.shb += a * np.float32(rng.uniform(0.0, 0.05))


def apply_lesion_v2(fields: Fields, lesion: LesionShape, rng: np.random.Generator, L: float, t: Tissue) -> None:
    """Generator 2.0: edit the scene fields so the lesion shows by texture, relief and structure.

    Its colour change is small and drawn from the scene's *own* normal colour variation (a share of
    its patchy redness, pallor, brownish tone): pits and grooves are replaced by another pattern of
    about the same mean absorbance, lesion vessels replace the capillaries at one to a few times
    their mean absorbance (a changed pattern, not a browner area), and the relief (a dome or a dip, a
    nodular or uneven surface, glints on the bump) multiplies all channels alike. The lesion's mean
    log-chromaticity stays within the normal regional spread (tests/test_synth.py measures it), so a
    colour rule has little to go on; a texture-aware detector does.
    """
    inside = lesion.alpha > 0.5
    if not inside.any():
        inside = lesion.mask.astype(bool)
    if lesion.kind == "elevated_erythema":
        _v2_elevated_erythema(fields, lesion, rng, L, t, inside)
    elif lesion.kind == "irregular_microvessels":
        _v2_irregular_microvessels(fields, lesion, rng, L, t, inside)
    elif lesion.kind == "depressed_neoplasia":
        _v2_depressed_neoplasia(fields, lesion, rng, L, t, inside)
    else:  # pragma: no cover - guarded by callers
        raise CemdError(f"unknown lesion kind {lesion.kind!r}; choose one of {', '.join(LESION_KINDS)}")


# --------------------------------------------------------------------------- colour model


@dataclass(frozen=True)
class ModalityStyle:
    """Absorption of each field per display channel (R, G, B) and the whitish tone."""

    absorb: np.ndarray  # (6, 3) for groove, pit, cap, deep, hb, shb
    pale_color: tuple[float, float, float]
    pale_weight: float
    cap_blur: float  # capillary blur in FOV radii: red light scatters more, so WLI smears capillaries


# NBI shows the 540 nm image in R and the 415 nm image in G/B: superficial haemoglobin absorbs
# 415 nm (→ dark brown), deeper vessels absorb 540 nm (→ cyan). WLI: blood absorbs G/B (→ red).
STYLES: dict[str, ModalityStyle] = {
    "wli": ModalityStyle(
        absorb=np.array(
            [
                [0.16, 0.28, 0.24],  # groove
                [0.05, 0.12, 0.10],  # pit
                [0.03, 0.20, 0.16],  # cap
                [0.42, 0.26, 0.05],  # deep
                [0.03, 0.85, 0.65],  # hb
                [0.02, 0.14, 0.11],  # shb
            ],
            np.float32,
        ),
        pale_color=(244, 222, 210),
        pale_weight=1.0,
        cap_blur=0.012,
    ),
    "nbi": ModalityStyle(
        absorb=np.array(
            [
                [0.30, 0.32, 0.28],
                [0.15, 0.38, 0.32],
                [0.35, 0.95, 1.25],
                [1.00, 0.18, 0.12],
                [0.07, 0.14, 0.17],
                [0.28, 0.70, 0.95],
            ],
            np.float32,
        ),
        pale_color=(175, 205, 190),
        pale_weight=0.3,
        cap_blur=0.0,
    ),
}


def shading(fields: Fields, t: Tissue) -> np.ndarray:
    """Lambert shading with the light at the scope tip plus a small directional component."""
    gx = cv2.Sobel(fields.height, cv2.CV_32F, 1, 0, ksize=3) * np.float32(0.125)
    gy = cv2.Sobel(fields.height, cv2.CV_32F, 0, 1, ksize=3) * np.float32(0.125)
    lam = 1.0 / np.sqrt(1.0 + 2.0 * (gx * gx + gy * gy))
    lx, ly = t.light_dir
    return np.clip(lam * (1.0 + 0.5 * (lx * gx + ly * gy)), 0.25, 1.5).astype(np.float32)


def colorize(fields: Fields, t: Tissue, modality: str, shade: np.ndarray, radius: float) -> list[np.ndarray]:
    """R, G, B float planes (0..255 scale) of the scene in one modality, before camera effects.

    Works plane by plane: 2-D contiguous arrays keep numpy/OpenCV on their fast paths.
    """
    style = STYLES[modality]
    base = t.wli_base if modality == "wli" else t.nbi_base
    cap = _blur(fields.cap, style.cap_blur * radius * t.zoom)
    f = (fields.groove, fields.pit, cap, fields.deep, fields.hb, fields.shb)
    pale = fields.pale * np.float32(style.pale_weight) if style.pale_weight else None
    planes = []
    for c in range(3):
        a = style.absorb[:, c]
        absorb = f[0] * a[0]
        for k in range(1, 6):
            absorb += f[k] * a[k]
        plane = cv2.exp(-absorb)
        plane *= np.float32(base[c])
        if pale is not None:
            plane += (np.float32(style.pale_color[c]) - plane) * pale
        plane *= shade
        planes.append(plane)
    return planes


def specular(fields: Fields, t: Tissue, shade: np.ndarray, radius: float) -> np.ndarray:
    """Saturated wet-mucosa glints (0..1): noisy gloss that peaks where the surface faces the scope."""
    z = fields.gloss + 4.0 * (shade - 1.0)
    core = np.clip((z - t.gloss_threshold) * 2.5, 0, 1)
    halo = _blur(core, 0.012 * radius + 0.5)
    return np.clip(core + 0.6 * halo, 0, 1)


# --------------------------------------------------------------------------- camera (screen space)


@dataclass(frozen=True)
class Camera:
    """Screen-space effects: field of view, illumination, blur, noise, misregistration, text."""

    cx: float
    cy: float
    radius: float
    vignette: float
    vign_offset: tuple[float, float]
    tilt: tuple[float, float]
    lumen: tuple[float, float, float, float] | None  # x, y, sigma, depth
    exposure: float
    wb: dict[str, tuple[float, float, float]]
    defocus: float
    motion: tuple[int, int]  # box blur kernel (kx, ky)
    noise: float
    misreg: tuple[float, float, float]  # NBI vs WLI: dx, dy (px), rotation (deg)
    text: dict[str, str]


def sample_camera(rng: np.random.Generator, h: int, w: int, misregistration: float) -> Camera:
    s = min(h, w)
    radius = s * rng.uniform(0.44, 0.52)
    lumen = None
    if rng.random() < 0.35:
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.3, 0.9) * radius
        lumen = (w / 2 + d * math.cos(a), h / 2 + d * math.sin(a), rng.uniform(0.15, 0.35) * radius, rng.uniform(0.5, 0.85))
    motion = (1, 1)
    if rng.random() < 0.12:
        k = int(rng.integers(2, max(3, round(s / 50)) + 1))
        motion = (k, 1) if rng.random() < 0.5 else (1, k)
    scale = s / 256.0
    return Camera(
        cx=w / 2 + rng.uniform(-0.03, 0.03) * s,
        cy=h / 2 + rng.uniform(-0.03, 0.03) * s,
        radius=float(radius),
        vignette=float(rng.uniform(0.25, 0.65)),
        vign_offset=(float(rng.uniform(-0.2, 0.2)), float(rng.uniform(-0.2, 0.2))),
        tilt=(float(rng.uniform(-0.25, 0.25)), float(rng.uniform(-0.25, 0.25))),
        lumen=lumen,
        exposure=float(rng.uniform(0.8, 1.15)),
        wb={m: tuple(float(g) for g in rng.uniform(0.93, 1.07, 3)) for m in MODALITIES},  # type: ignore[misc]
        defocus=float(rng.uniform(0.4, 1.6) * scale if rng.random() < 0.3 else 0.0),
        motion=motion,
        noise=float(rng.uniform(1.0, 3.5)),
        misreg=(
            float(rng.uniform(-1.2, 1.2) * scale * misregistration),
            float(rng.uniform(-1.2, 1.2) * scale * misregistration),
            float(rng.uniform(-0.6, 0.6) * misregistration),
        ),
        text=overlay_text(rng),
    )


def overlay_text(rng: np.random.Generator) -> dict[str, str]:
    """Processor-style burnt-in text: patient id, age/sex, date and time."""
    return {
        "id": f"ID {int(rng.integers(100000, 999999))}",
        "patient": f"{'MF'[int(rng.integers(0, 2))]} {int(rng.integers(35, 86))}Y",
        "date": f"{int(rng.integers(2019, 2026))}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}",
        "time": f"{int(rng.integers(7, 18)):02d}:{int(rng.integers(0, 60)):02d}:{int(rng.integers(0, 60)):02d}",
        "scope": f"GIF-{['H290', 'HQ190', 'XZ1200', 'EG760'][int(rng.integers(0, 4))]}",
    }


def illumination(cam: Camera, h: int, w: int) -> np.ndarray:
    """Vignetting around an off-centre light, a tilt gradient, and an optional dark lumen."""
    gx, gy = _pixel_grid(h, w)
    u = (gx - cam.cx) / np.float32(cam.radius)
    v = (gy - cam.cy) / np.float32(cam.radius)
    r2 = (u - cam.vign_offset[0]) ** 2 + (v - cam.vign_offset[1]) ** 2
    r2 = np.minimum(r2, 2.0)
    illum = (1.0 - cam.vignette * r2 * np.sqrt(np.sqrt(r2))) * (1.0 + cam.tilt[0] * u + cam.tilt[1] * v)
    if cam.lumen is not None:
        lx, ly, sig, depth = cam.lumen
        d2 = ((gx - lx) ** 2 + (gy - ly) ** 2) / np.float32(2 * sig * sig)
        illum *= 1.0 - depth * np.exp(-d2)
    return np.clip(illum * cam.exposure, 0.05, 1.6).astype(np.float32)


def fov_soft(cx: float, cy: float, radius: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased circular field of view (1 inside, 0 outside)."""
    gx, gy = _pixel_grid(h, w)
    d = np.sqrt((gx - cx) ** 2 + (gy - cy) ** 2)
    return np.clip(radius + 0.5 - d, 0, 1).astype(np.float32)


def text_layer(h: int, w: int, corners: dict[str, list[str]], keep_out: np.ndarray | None = None) -> np.ndarray:
    """Burnt-in text as a uint8 layer: ``corners`` maps "tl", "tr", "bl", "br" to lines of text.

    Pixels inside ``keep_out`` (the field of view) stay empty: processors never write over the image.
    """
    scale = max(0.28, min(h, w) / 900)
    th = 1 if scale < 0.9 else 2
    line_h = int(round(28 * scale)) + 2
    m = max(2, int(4 * scale))
    layer = np.zeros((h, w), np.uint8)
    for corner, lines in corners.items():
        right, bottom = corner[1] == "r", corner[0] == "b"
        for i, text in enumerate(lines):
            (tw, tht), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
            x = w - m - tw if right else m
            y = (h - m - (len(lines) - 1 - i) * line_h) if bottom else (m + tht + i * line_h)
            cv2.putText(layer, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 235, th, cv2.LINE_AA)
    if keep_out is not None:
        layer[keep_out] = 0
    return layer


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    """Round and saturate (OpenCV's conversion rounds half to even and clips)."""
    return cv2.convertScaleAbs(np.maximum(plane, 0, out=plane))


def _sensor_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Zero-mean per-channel noise with std ``sigma`` (uniform draws: 4× cheaper than normal ones)."""
    noise = rng.random((3, h, w), dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(sigma * math.sqrt(12.0))
    return noise


def _warp(plane: np.ndarray, m: np.ndarray) -> np.ndarray:
    h, w = plane.shape[:2]
    return cv2.warpAffine(plane, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _misreg_matrix(cam: Camera) -> np.ndarray:
    dx, dy, rot = cam.misreg
    m = cv2.getRotationMatrix2D((cam.cx, cam.cy), rot, 1.0)
    m[:, 2] += (dx, dy)
    return m


# --------------------------------------------------------------------------- generator 2.0: nuisances

_DECODE_GAMMA = 2.2  # display values ↔ linear light

# Absorbance per unit thickness of the fluids over the mucosa, per display channel (R, G, B).
# Bile (bilirubin/biliverdin) absorbs blue and some red: yellow to green in WLI; it absorbs the
# 415 nm light of NBI's G/B channels strongly, so it looks red-orange there, as in real NBI.
# Blood absorbs G/B in WLI (deep red) and both NBI bands (near black-brown). Indigo carmine
# absorbs around 610 nm: blue in WLI, a dark teal in NBI (some 540 nm absorption).
FLUID_ABSORB: dict[str, dict[str, tuple[float, float, float]]] = {
    "bile": {"wli": (0.70, 0.20, 1.60), "nbi": (0.15, 1.30, 1.50)},
    "blood": {"wli": (0.25, 2.00, 1.60), "nbi": (1.40, 2.20, 2.20)},
    "dye": {"wli": (1.60, 0.45, 0.05), "nbi": (0.90, 0.20, 0.10)},
}
MUCUS_WHITE: dict[str, tuple[float, float, float]] = {"wli": (238.0, 228.0, 220.0), "nbi": (200.0, 225.0, 215.0)}
NUISANCE_KINDS = ("bile", "blood", "mucus", "dye")


@dataclass(frozen=True)
class CameraPipeline:
    """Generator 2.0, one modality of one examination: what the light source and the processor do
    to colour beyond a per-channel gain (a gain cancels in log-chromaticity; these do not)."""

    temperature: tuple[float, float, float]  # light-source colour: per-channel gain on linear light
    mix: np.ndarray  # 3×3 channel mixing on linear light (sensor crosstalk, colour-correction matrix)
    offset: tuple[float, float, float]  # additive linear offset: coloured veiling flare / black level
    chroma_vignette: tuple[float, float, float]  # per-channel exponent on the light falloff
    gamma: float  # the processor's display gamma (the scene is decoded with 2.2)


@dataclass
class Nuisances:
    """Generator 2.0, one examination: camera pipeline, exposure, compression, fluids on the mucosa."""

    exposure: float  # extra exposure factor (1 = none; 1.2–1.5 over-exposed, clipping; 0.5–0.7 under-exposed)
    pipeline: dict[str, CameraPipeline]
    jpeg_quality: int  # 0 = not compressed
    layers: dict[str, np.ndarray]  # fluid thickness / opacity maps (bile, blood, mucus; dye coverage)
    wet_glint: np.ndarray  # glint potential of the fluid surfaces (noise, std ≈ 1)
    glint_threshold: float

    def meta(self, fov_mask: np.ndarray) -> dict[str, Any]:
        """What this examination shows, for tests and dataset.json: the share of the FOV each fluid
        covers (0 when absent), the exposure and the JPEG quality (None when not compressed)."""
        n = max(1, int(fov_mask.sum()))
        cover = {k: round(float(((self.layers[k] > 0.1) & fov_mask).sum() / n), 4) if k in self.layers else 0.0
                 for k in NUISANCE_KINDS}
        return {**cover, "exposure": round(self.exposure, 3),
                "jpeg_quality": self.jpeg_quality or None,
                "pipeline": {m: {"temperature": [round(v, 3) for v in p.temperature],
                                 "offset": [round(v, 4) for v in p.offset], "gamma": round(p.gamma, 3)}
                             for m, p in self.pipeline.items()}}


def _blob(rng: np.random.Generator, cam: Camera, h: int, w: int, frac: tuple[float, float]) -> np.ndarray:
    """A soft, irregular, elongated patch (0..1) of about ``frac`` (log-uniform) of the FOV area."""
    f = float(np.exp(rng.uniform(np.log(frac[0]), np.log(frac[1]))))
    r = cam.radius * math.sqrt(f)
    ang, d = rng.uniform(0, 2 * np.pi), cam.radius * 0.85 * math.sqrt(rng.uniform(0, 1))
    cx, cy = cam.cx + d * math.cos(ang), cam.cy + d * math.sin(ang)
    elong, rot = float(rng.uniform(1.0, 2.0)), float(rng.uniform(0, np.pi))
    gx, gy = _pixel_grid(h, w)
    dx, dy = gx - np.float32(cx), gy - np.float32(cy)
    u = (dx * np.float32(math.cos(rot)) + dy * np.float32(math.sin(rot))) / np.float32(elong)
    v = (dy * np.float32(math.cos(rot)) - dx * np.float32(math.sin(rot))) * np.float32(elong)
    dist = np.sqrt(u * u + v * v) / np.float32(r)
    edge = 1 - dist + np.float32(0.35) * _noise(rng, h, w, max(2.0, 0.6 * r))
    return np.clip(edge * 4, 0, 1).astype(np.float32)


def _streaks(rng: np.random.Generator, cam: Camera, h: int, w: int) -> np.ndarray:
    """A few smeared streaks (0..1): blood wiped across the mucosa or running down it."""
    canvas = np.zeros((h, w), np.float32)
    n = int(rng.integers(1, 4))
    ang = rng.uniform(0, 2 * np.pi, n)
    d = cam.radius * 0.7 * np.sqrt(rng.uniform(0, 1, n))
    starts = np.stack([cam.cx + d * np.cos(ang), cam.cy + d * np.sin(ang)], 1).astype(np.float32)
    walks = _walks(rng, starts, 16, 0.035 * cam.radius, 0.12, smooth=True)
    for wk in walks:
        _draw_polylines(canvas, [wk], max(1, round(rng.uniform(0.02, 0.07) * cam.radius)), 1.0)
    return np.clip(_blur(canvas, 0.015 * cam.radius + 0.5) * 1.3, 0, 1)


def _mucus(rng: np.random.Generator, cam: Camera, h: int, w: int) -> np.ndarray:
    """Whitish translucent mucus (opacity 0..1): a thin sheet, strands and small bubbles."""
    out = np.zeros((h, w), np.float32)
    if rng.random() < 0.7:
        out = np.maximum(out, _blob(rng, cam, h, w, (0.01, 0.12)) * np.float32(rng.uniform(0.1, 0.35)))
    strands = np.zeros((h, w), np.float32)
    n = int(rng.integers(0, 3))
    if n:
        ang = rng.uniform(0, 2 * np.pi, n)
        d = cam.radius * 0.8 * np.sqrt(rng.uniform(0, 1, n))
        starts = np.stack([cam.cx + d * np.cos(ang), cam.cy + d * np.sin(ang)], 1).astype(np.float32)
        for wk in _walks(rng, starts, 14, 0.04 * cam.radius, 0.1, smooth=True):
            _draw_polylines(strands, [wk], max(1, round(rng.uniform(0.008, 0.03) * cam.radius)),
                            255 * rng.uniform(0.2, 0.5))
    bubbles = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(0, 4))):
        ang, d = rng.uniform(0, 2 * np.pi), cam.radius * 0.85 * math.sqrt(rng.uniform(0, 1))
        c = (int(round((cam.cx + d * math.cos(ang)) * 4)), int(round((cam.cy + d * math.sin(ang)) * 4)))
        rad = int(round(rng.uniform(0.015, 0.06) * cam.radius * 4))
        cv2.circle(bubbles, c, max(4, rad), 255 * rng.uniform(0.3, 0.6), 1, cv2.LINE_AA, shift=2)
    out = np.maximum(out, _blur(strands, 0.6) / np.float32(255))
    return np.maximum(out, bubbles / np.float32(255))


def _pipeline(rng: np.random.Generator) -> CameraPipeline:
    t = float(rng.uniform(-1, 1))
    k = float(rng.uniform(-0.15, 0.25))  # saturation change of the colour-correction matrix
    mix = (1 + k) * np.eye(3) - (k / 3) * np.ones((3, 3)) + rng.uniform(-0.04, 0.04, (3, 3)) * (1 - np.eye(3))
    mix -= (mix.sum(1, keepdims=True) - 1) / 3  # grey stays grey
    flare = 1.0 if rng.random() < 0.6 else 0.25
    return CameraPipeline(
        temperature=(1 + 0.15 * t, 1.0, 1 - 0.18 * t),
        mix=mix.astype(np.float32),
        offset=tuple(float(v) for v in rng.uniform(0, 0.012, 3) * flare),  # type: ignore[arg-type]
        chroma_vignette=tuple(float(v) for v in rng.uniform(-0.2, 0.2, 3)),  # type: ignore[arg-type]
        gamma=float(rng.uniform(2.0, 2.45)),
    )


def sample_nuisances(rng: np.random.Generator, cam: Camera, h: int, w: int) -> Nuisances:
    """One examination's nuisances (generator 2.0), from their own stream: never from the lesion's."""
    u = rng.random()
    exposure = float(rng.uniform(1.2, 1.5) if u < 0.1 else rng.uniform(0.5, 0.7) if u < 0.2 else 1.0)
    pipeline = {m: _pipeline(rng) for m in MODALITIES}
    jpeg = int(rng.integers(50, 96)) if rng.random() < 0.6 else 0
    layers: dict[str, np.ndarray] = {}
    if rng.random() < 0.35:
        bile = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):  # mostly thin films: strongly coloured, little darker
            bile = np.maximum(bile, _blob(rng, cam, h, w, (0.01, 0.15)) * np.float32(rng.uniform(0.1, 0.4)))
        layers["bile"] = bile * (0.75 + 0.25 * np.clip(_noise(rng, h, w, 0.08 * cam.radius), -2, 2))
    if rng.random() < 0.15:
        blood = _streaks(rng, cam, h, w) if rng.random() < 0.3 else _blob(rng, cam, h, w, (0.005, 0.08))
        layers["blood"] = blood * np.float32(rng.uniform(0.1, 0.5))
    if rng.random() < 0.2:
        layers["mucus"] = _mucus(rng, cam, h, w)
    if rng.random() < 0.08:
        layers["dye"] = _blob(rng, cam, h, w, (0.15, 0.6)) * np.float32(rng.uniform(0.3, 0.8))
    wet = _fbm(rng, h, w, 0.03 * cam.radius, 2)
    return Nuisances(exposure, pipeline, jpeg, layers, wet, float(rng.uniform(1.5, 2.1)))


def _dye_thickness(coverage: np.ndarray, fields: Fields) -> np.ndarray:
    """Sprayed dye pools in the grooves and pits: a thin film plus what the surface pattern holds."""
    return coverage * (np.float32(0.25) + np.float32(2.0) * fields.groove + np.float32(1.5) * fields.pit)


def apply_fluids(planes: list[np.ndarray], nuis: Nuisances, modality: str, fields: Fields) -> list[np.ndarray]:
    """Fluids over the mucosa (before the light falloff, like the tissue): Beer–Lambert absorption of
    bile, blood and dye, then translucent mucus that scatters white and blurs what lies under it."""
    for name in ("dye", "bile", "blood"):
        if name not in nuis.layers:
            continue
        thick = _dye_thickness(nuis.layers[name], fields) if name == "dye" else nuis.layers[name]
        for c, plane in enumerate(planes):
            plane *= cv2.exp(thick * np.float32(-FLUID_ABSORB[name][modality][c]))
    if "mucus" in nuis.layers:
        m = nuis.layers["mucus"]
        for c, plane in enumerate(planes):
            under = plane + (_blur(plane, 1.5) - plane) * np.minimum(m * 2, 1)
            planes[c] = under + (np.float32(MUCUS_WHITE[modality][c]) - under) * m
    return planes


def wet_glints(nuis: Nuisances) -> np.ndarray | None:
    """Glints on the wet fluid surfaces (0..1), or None without fluids."""
    wet = None
    for name, weight in (("mucus", 2.0), ("bile", 0.8), ("blood", 0.8)):
        if name in nuis.layers:
            layer = np.minimum(nuis.layers[name] * np.float32(weight), 1)
            wet = layer if wet is None else np.maximum(wet, layer)
    if wet is None:
        return None
    return np.clip((nuis.wet_glint - np.float32(nuis.glint_threshold)) * np.float32(2.5), 0, 1) * wet


def apply_pipeline(planes: list[np.ndarray], pipe: CameraPipeline) -> list[np.ndarray]:
    """Display planes → linear light → light-source colour, channel mixing, coloured flare → the
    processor's own gamma. Unlike a per-channel gain, none of these cancels in log-chromaticity."""
    lin = [cv2.pow(np.maximum(p, 0) * np.float32(1 / 255), _DECODE_GAMMA) * np.float32(pipe.temperature[c])
           for c, p in enumerate(planes)]
    out = []
    for i in range(3):
        acc = lin[0] * pipe.mix[i, 0] + lin[1] * pipe.mix[i, 1] + lin[2] * pipe.mix[i, 2]
        acc += np.float32(pipe.offset[i])
        out.append(cv2.pow(np.maximum(acc, 0), 1.0 / pipe.gamma) * np.float32(255))
    return out


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG at ``quality`` (block artefacts, 4:2:0 chroma smear)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV always has a JPEG codec
        raise CemdError("OpenCV could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- paired still images


@dataclass
class SynthPair:
    """A paired WLI/NBI view of one scene.

    The field of view is fixed by the scope optics, so it is one mask for both modalities
    (``fov_mask``); a misregistration moves the *scene* inside it, so each modality has its own
    lesion mask. ``area_fraction`` = lesion area in WLI / FOV area (0 when ``kind`` is None).
    ``generator`` is the simulator version that drew it; ``nuisances`` (generator 2.0 only, empty for
    1.1) says what the examination shows besides mucosa: the share of the FOV under bile, blood,
    mucus and dye, the exposure factor, the JPEG quality and the camera pipeline.
    """

    wli: np.ndarray
    nbi: np.ndarray
    mask_wli: np.ndarray
    mask_nbi: np.ndarray
    kind: str | None
    fov_mask: np.ndarray
    area_fraction: float
    generator: str = GENERATOR_VERSION
    nuisances: dict[str, Any] = field(default_factory=dict)

    def image(self, modality: str) -> np.ndarray:
        return self.wli if modality == "wli" else self.nbi

    def mask(self, modality: str) -> np.ndarray:
        return self.mask_wli if modality == "wli" else self.mask_nbi


def _place_lesion(
    rng: np.random.Generator, kind: str, cam: Camera, illum: np.ndarray, fov_area: float, h: int, w: int
) -> LesionShape:
    """A lesion of 1–10 % of the FOV area (log-uniform), fully inside the FOV, on well-lit mucosa."""
    frac = float(np.exp(rng.uniform(np.log(0.01), np.log(0.10))))
    area = frac * fov_area
    best: tuple[float, tuple[float, float]] | None = None
    for _ in range(24):
        rad_eq = math.sqrt(area / math.pi) * 1.9  # generous bound on the outline's reach
        reach = max(cam.radius - rad_eq - 2, 1.0)
        a, d = rng.uniform(0, 2 * np.pi), reach * math.sqrt(rng.uniform(0, 1))
        c = (cam.cx + d * math.cos(a), cam.cy + d * math.sin(a))
        lit = float(illum[int(np.clip(c[1], 0, h - 1)), int(np.clip(c[0], 0, w - 1))])
        if best is None or lit > best[0]:
            best = (lit, c)
        if lit > 0.6:
            break
    assert best is not None
    return make_lesion(rng, kind, best[1], area, h, w)


def _check_render_args(size: int, kind: str | None, generator: str) -> None:
    """CemdError for an unknown generator or lesion kind, or an image size that is not an integer ≥ 64."""
    if generator not in GENERATORS:
        raise CemdError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    if kind is not None and kind not in LESION_KINDS:
        raise CemdError(f"unknown lesion kind {kind!r}; choose one of {', '.join(LESION_KINDS)}")
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise CemdError(f"image size must be an integer ≥ 64, got {size!r}")


def _add_lesion(ss: np.random.SeedSequence, kind: str | None, fields: Fields, tissue: Tissue, cam: Camera,
                illum: np.ndarray, fov_mask: np.ndarray, v2: bool) -> np.ndarray:
    """Place a lesion of ``kind`` from the lesion stream and edit ``fields`` with it; return its mask (uint8)."""
    h, w = fields.shape
    mask = np.zeros((h, w), np.uint8)
    if kind is not None:
        lrng = _child_rng(ss, _LESION)
        lesion = _place_lesion(lrng, kind, cam, illum, float(fov_mask.sum()), h, w)
        if v2:
            apply_lesion_v2(fields, lesion, lrng, cam.radius * tissue.zoom, tissue)
        else:
            apply_lesion(fields, lesion, lrng, cam.radius * tissue.zoom)
        mask = lesion.mask
    return mask


def _text_layers(cam: Camera, h: int, w: int, fov: np.ndarray) -> dict[str, np.ndarray]:
    """Each modality's on-screen text (patient/scope corners and the modality name), outside the FOV only."""
    t = cam.text
    shared = text_layer(h, w, {"tl": [t["id"], t["patient"]], "tr": [t["date"], t["time"]], "br": [t["scope"]]})
    text = {m: text_layer(h, w, {"bl": [m.upper()]}) for m in MODALITIES}
    for m in MODALITIES:
        text[m] = cv2.max(text[m], shared)
        text[m][fov > 0] = 0
    return text


def _render_v1(fields: Fields, tissue: Tissue, cam: Camera, shade: np.ndarray, spec: np.ndarray, illum: np.ndarray,
               fov: np.ndarray, m_nbi: np.ndarray, misregistration: float, text: dict[str, np.ndarray],
               noise_draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Generator 1.1's camera: colour, misregistration, light falloff, white balance, glints, blur, noise, text."""
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        planes = colorize(fields, tissue, modality, shade, cam.radius)
        gains = cam.wb[modality]
        warp = modality == "nbi" and misregistration
        glint = _warp(spec, m_nbi) if warp else spec
        out = []
        for c, plane in enumerate(planes):
            if warp:
                plane = _warp(plane, m_nbi)
            plane *= illum
            plane *= np.float32(gains[c])
            plane += (np.float32(262.0) - plane) * glint  # glints saturate to white in both modalities
            if cam.defocus:
                plane = _blur(plane, cam.defocus)
            if cam.motion != (1, 1):
                plane = cv2.blur(plane, cam.motion)
            plane += noise_draws[modality][c]
            plane *= fov
            out.append(cv2.max(_to_uint8(plane), text[modality]))
        images[modality] = cv2.merge(out)
    return images


def _lesion_masks(mask: np.ndarray, kind: str | None, misregistration: float, m_nbi: np.ndarray,
                  fov_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The WLI and NBI lesion masks (bool): the NBI one moved with the scene's misregistration, both cut to the FOV."""
    h, w = mask.shape
    mask_wli = mask.astype(bool)
    if kind is not None and misregistration:
        warped = cv2.warpAffine(mask * 255, m_nbi, (w, h), flags=cv2.INTER_LINEAR)
        mask_nbi = warped >= 128
    else:
        mask_nbi = mask_wli.copy()
    mask_wli &= fov_mask
    mask_nbi &= fov_mask
    return mask_wli, mask_nbi


def render_pair(
    seed: int | np.random.SeedSequence,
    size: int = 256,
    kind: str | None = None,
    *,
    misregistration: float = 1.0,
    generator: str = GENERATOR_VERSION,
) -> SynthPair:
    """Render one paired WLI/NBI image of a random scene, with a lesion of ``kind`` (or none).

    ``misregistration`` scales the small NBI-vs-WLI shift/rotation (0 = perfectly aligned).
    Same seed → identical arrays; the same seed with ``kind=None`` is the same scene without the lesion.
    ``generator`` "1.1" (default, unchanged since 1.1) or "2.0": the same scene plus nuisances that do
    not cancel in log-chromaticity, and lesions carried by texture and relief (docs/DATA.md).
    """
    _check_render_args(size, kind, generator)
    ss = _seed_sequence(seed)
    rng = _child_rng(ss, _SCENE)
    h = w = int(size)
    tissue = sample_tissue(rng)
    cam = sample_camera(rng, h, w, misregistration)
    fields = render_tissue(rng, tissue, h, w, cam.radius)
    illum = illumination(cam, h, w)
    fov = fov_soft(cam.cx, cam.cy, cam.radius, h, w)
    fov_mask = fov >= 0.5
    noise = _sensor_noise(rng, h, w, cam.noise)
    noise_draws = {"wli": noise, "nbi": noise[::-1, ::-1, ::-1]}  # one draw, decorrelated by flipping
    v2 = generator == "2.0"
    nuis = sample_nuisances(_child_rng(ss, _NUISANCE), cam, h, w) if v2 else None

    mask = _add_lesion(ss, kind, fields, tissue, cam, illum, fov_mask, v2)

    shade = shading(fields, tissue)
    spec = specular(fields, tissue, shade, cam.radius) * (illum > 0.45)
    m_nbi = _misreg_matrix(cam)
    text = _text_layers(cam, h, w, fov)
    if nuis is not None:
        images = _render_v2(fields, tissue, cam, nuis, shade, spec, illum, fov, m_nbi, misregistration, text,
                            noise_draws)
    else:
        images = _render_v1(fields, tissue, cam, shade, spec, illum, fov, m_nbi, misregistration, text, noise_draws)

    mask_wli, mask_nbi = _lesion_masks(mask, kind, misregistration, m_nbi, fov_mask)
    frac = float(mask_wli.sum() / max(1, fov_mask.sum()))
    if nuis is not None:
        return SynthPair(images["wli"], images["nbi"], mask_wli, mask_nbi, kind, fov_mask, frac, generator,
                         nuis.meta(fov_mask))
    return SynthPair(images["wli"], images["nbi"], mask_wli, mask_nbi, kind, fov_mask, frac)


def _render_v2(fields: Fields, tissue: Tissue, cam: Camera, nuis: Nuisances, shade: np.ndarray, spec: np.ndarray,
               illum: np.ndarray, fov: np.ndarray, m_nbi: np.ndarray, misregistration: float,
               text: dict[str, np.ndarray], noise_draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Generator 2.0's camera: 1.1's steps plus fluids on the mucosa, glints on them, a per-channel
    light falloff, over/under-exposure, the colour pipeline on linear light, and JPEG compression."""
    wet = wet_glints(nuis)
    glint_scene = spec if wet is None else np.maximum(spec, wet)
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        pipe = nuis.pipeline[modality]
        falloff = [cv2.pow(illum, 1.0 + d) * np.float32(nuis.exposure) for d in pipe.chroma_vignette]
        planes = apply_fluids(colorize(fields, tissue, modality, shade, cam.radius), nuis, modality, fields)
        gains = cam.wb[modality]
        warp = modality == "nbi" and misregistration
        glint = _warp(glint_scene, m_nbi) if warp else glint_scene
        for c in range(3):
            plane = _warp(planes[c], m_nbi) if warp else planes[c]
            plane *= falloff[c]
            plane *= np.float32(gains[c])
            plane += (np.float32(262.0) - plane) * glint
            if cam.defocus:
                plane = _blur(plane, cam.defocus)
            if cam.motion != (1, 1):
                plane = cv2.blur(plane, cam.motion)
            planes[c] = plane
        out = []
        for c, plane in enumerate(apply_pipeline(planes, pipe)):
            plane += noise_draws[modality][c]
            plane *= fov
            out.append(cv2.max(_to_uint8(plane), text[modality]))
        img = cv2.merge(out)
        images[modality] = jpeg_roundtrip(img, nuis.jpeg_quality) if nuis.jpeg_quality else img
    return images


# --------------------------------------------------------------------------- dataset writer


def _write_png(path: Path, rgb_or_gray: np.ndarray, compression: int = 1) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
        raise CemdError(f"could not write {path}; check the disk space and permissions")


def _is_synth_dataset(out: Path) -> bool:
    try:
        meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == DATASET_FORMAT and meta.get("synthetic") is True


def _prepare_out(out: Path) -> None:
    """Refuse to write into a file or a foreign non-empty folder; clear a previous synthetic dataset."""
    if out.exists() and not out.is_dir():
        raise CemdError(f"{out} is a file; give a folder path for the dataset")
    if out.is_dir() and any(out.iterdir()):
        if not _is_synth_dataset(out):
            raise CemdError(
                f"{out} is not empty and is not a synthetic dataset written by 'cemd synth'; "
                "choose a new or empty folder"
            )
        for modality in MODALITIES:
            shutil.rmtree(out / modality, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _dataset_items(n_train: int, n_test: int) -> Iterator[tuple[str, str | None, int]]:
    for i in range(n_train):
        yield "train", None, i
    for i in range(n_test):
        yield "test", None, i
    for kind in LESION_KINDS:
        for i in range(n_test):
            yield "test", kind, i


def _dataset_meta(seed: int, size: int, counts: dict[str, Any], complete: bool,
                  generator: str = GENERATOR_VERSION) -> dict[str, Any]:
    return {
        "format": DATASET_FORMAT,
        "synthetic": True,
        "seed": int(seed),
        "size": int(size),
        "paired": True,
        "modalities": list(MODALITIES),
        "kinds": {k: {"visible_in": list(v["visible_in"])} for k, v in LESION_KINDS.items()},
        "counts": counts,
        "generator": f"engine.synth {generator}",
        "complete": complete,
    }


def _check_dataset_args(seed: int, n_train: int, n_test: int, size: int) -> None:
    """CemdError for a negative count, a size under 64, nothing to write, or an invalid seed."""
    for name, value, low in (("n_train", n_train, 0), ("n_test", n_test, 0), ("size", size, 64)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise CemdError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if n_train + n_test == 0:
        raise CemdError("nothing to write: both n_train and n_test are 0")
    _seed_sequence(seed)


def _make_folders(out: Path, n_train: int, n_test: int) -> None:
    """Create each modality's split/kind image folders and ground-truth mask folders that will get files."""
    for modality in MODALITIES:
        for split, kind in [("train", None), ("test", None)] + [("test", k) for k in LESION_KINDS]:
            if (split == "train" and n_train) or (split == "test" and n_test):
                (out / modality / split / (kind or "good")).mkdir(parents=True, exist_ok=True)
            if kind and n_test:
                (out / modality / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)


def _write_items(out: Path, seed: int, n_train: int, n_test: int, size: int, progress: bool,
                 generator: str) -> tuple[list[float], dict[str, dict[str, int]]]:
    """Render and write every item's images and masks; return the lesion area fractions and the nuisance tallies."""
    total = n_train + n_test * (1 + len(LESION_KINDS))
    fractions: list[float] = []
    shown: dict[str, dict[str, int]] = {}
    with progress_steps(progress, total, f"synth → {out}") as advance:
        for split, kind, i in _dataset_items(n_train, n_test):
            pair = render_pair(item_seed(seed, split, kind, i), size, kind, generator=generator)
            if pair.nuisances:
                tally = shown.setdefault(split, {"images": 0, **{k: 0 for k in _NUISANCE_TALLY}})
                tally["images"] += 1
                for k, hit in _nuisance_flags(pair.nuisances).items():
                    tally[k] += hit
            name = f"{i:05d}"
            for modality in MODALITIES:
                _write_png(out / modality / split / (kind or "good") / f"{name}.png", pair.image(modality))
                if kind is not None:
                    mask = pair.mask(modality).astype(np.uint8) * 255
                    _write_png(out / modality / "ground_truth" / kind / f"{name}_mask.png", mask)
            if kind is not None:
                fractions.append(pair.area_fraction)
            advance()
    return fractions, shown


def write_dataset(
    out: Path,
    seed: int,
    n_train: int = 200,
    n_test: int = 100,
    size: int = 256,
    progress: bool = True,
    generator: str = GENERATOR_VERSION,
) -> dict[str, Any]:
    """Write a paired MVTec-style dataset (layout in docs/DATA.md) and return its dataset.json.

    ``n_test`` is the number of test normals and the number per lesion kind. Items are seeded by
    (seed, split, kind, index), so a bigger dataset extends a smaller one with the same seed, and
    train/test never share a scene. ``complete`` in dataset.json is false until the last file is written.
    ``generator`` picks the simulator version (default 1.1); dataset.json records it, and a 2.0 dataset
    also counts the images per split that show each nuisance (``nuisances``).
    """
    if generator not in GENERATORS:
        raise CemdError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    out = Path(out)
    _check_dataset_args(seed, n_train, n_test, size)
    _prepare_out(out)
    counts: dict[str, Any] = {"train": {"good": n_train}, "test": {"good": n_test, **{k: n_test for k in LESION_KINDS}}}
    (out / "dataset.json").write_text(json.dumps(_dataset_meta(seed, size, counts, False, generator), indent=2)
                                      + "\n")
    _make_folders(out, n_train, n_test)

    fractions, shown = _write_items(out, seed, n_train, n_test, size, progress, generator)
    meta = _dataset_meta(seed, size, counts, True, generator)
    if shown:
        meta["nuisances"] = shown
    if fractions:
        f = np.asarray(fractions)
        meta["lesion_area_fraction"] = {
            "min": round(float(f.min()), 4),
            "median": round(float(np.median(f)), 4),
            "max": round(float(f.max()), 4),
        }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


_NUISANCE_TALLY = (*NUISANCE_KINDS, "over_exposed", "under_exposed", "jpeg")


def _nuisance_flags(nuisances: dict[str, Any]) -> dict[str, bool]:
    """Which nuisances one pair's metadata shows (for dataset.json's per-split counts)."""
    flags = {k: nuisances[k] > 0 for k in NUISANCE_KINDS}
    flags.update(over_exposed=nuisances["exposure"] > 1.1, under_exposed=nuisances["exposure"] < 0.9,
                 jpeg=nuisances["jpeg_quality"] is not None)
    return flags


# --------------------------------------------------------------------------- documentation figure


def _contour_copy(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = img.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 0), 1, cv2.LINE_AA)
    return out


def _typical_example(seed: int, size: int, kind: str | None, generator: str = GENERATOR_VERSION) -> SynthPair:
    """The first example with a mid-sized lesion (3–7 % of the FOV), so the figure shows it clearly."""
    pair = render_pair(item_seed(seed, "example", kind, 0), size, kind, generator=generator)
    for index in range(1, 40):
        if kind is None or 0.03 <= pair.area_fraction <= 0.07:
            break
        pair = render_pair(item_seed(seed, "example", kind, index), size, kind, generator=generator)
    return pair


def render_example_grid(path: Path, seed: int = 0, size: int = 256, generator: str = GENERATOR_VERSION) -> Path:
    """docs/img/synth_examples.png: one row per kind (normal first); WLI, WLI+mask, NBI, NBI+mask
    (``generator`` 2.0: docs/img/synth_examples_2.0.png)."""
    path = Path(path)
    rows: list[tuple[str, str | None]] = [("normal", None)] + [(k, k) for k in LESION_KINDS]
    cols = ["WLI", "WLI + mask", "NBI", "NBI + mask"]
    pad, left, top = 6, 190, 30
    H = top + len(rows) * (size + pad)
    W = left + len(cols) * (size + pad)
    canvas = np.full((H, W, 3), 255, np.uint8)
    for j, name in enumerate(cols):
        cv2.putText(canvas, name, (left + j * (size + pad) + 8, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (label, kind) in enumerate(rows):
        pair = _typical_example(seed, size, kind, generator)
        tiles = [pair.wli, _contour_copy(pair.wli, pair.mask_wli), pair.nbi, _contour_copy(pair.nbi, pair.mask_nbi)]
        y = top + i * (size + pad)
        for j, tile in enumerate(tiles):
            x = left + j * (size + pad)
            canvas[y : y + size, x : x + size] = tile
        words = label.replace("_", " ").split(" ")
        for k, word in enumerate(words):
            cv2.putText(canvas, word, (8, y + size // 2 - 10 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        if kind is not None:
            vis = "visible in " + "+".join(m.upper() for m in LESION_KINDS[kind]["visible_in"])
            cv2.putText(canvas, vis, (8, y + size // 2 - 10 + 22 * len(words)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (90, 90, 90), 1, cv2.LINE_AA)
            cv2.putText(canvas, f"area {pair.area_fraction:.1%} of FOV", (8, y + size // 2 + 8 + 22 * len(words)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
    label = "SYNTHETIC" if generator == GENERATOR_VERSION else f"SYNTHETIC {generator}"
    cv2.putText(canvas, label, (8, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (200, 0, 0), 2, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png(path, canvas, compression=9)
    return path
