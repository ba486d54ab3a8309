"""Synthetic endoscopy videos with WLI↔NBI switches, camera motion, blur and lesion events.

Speed comes from rendering the scene once: a large "world" canvas of mucosa (with lesions)
is coloured in both modalities up front; each frame is then one ``cv2.warpAffine`` of the
field-of-view region along a smooth camera path, plus cheap screen-space effects (blur at
half resolution, moving glints, vignetting, FOV, burnt-in text).

Ground truth (``events``): a lesion is *present* in a frame when at least
``PRESENCE_FRACTION`` (50 %) of its area lies inside the circular field of view (and the
frame). Its interval is each maximal run of such frames. Modality intervals tile all frames.
Ground-truth boxes (``boxes``, ``render_video(boxes_out=...)``) follow the same rule: a frame has
a box for a lesion exactly when it lies in one of that lesion's intervals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engine.errors import CemdError
from engine.progress import progress_steps
from engine.synth.stills import (
    LESION_KINDS,
    _blur,
    _noise,
    apply_lesion,
    colorize,
    make_lesion,
    overlay_text,
    render_tissue,
    sample_tissue,
    shading,
    specular,
    text_layer,
)

__all__ = ["PRESENCE_FRACTION", "VideoScene", "render_video", "parse_size", "write_frame_dataset"]

PRESENCE_FRACTION = 0.5
_VIDEO_TAG = 0x56494445  # "VIDE"
_SCENE, _LESION, _PATH, _CAMERA, _SCREEN = 0, 1, 2, 3, 4
_MAX_WORLD_RADIUS = 280.0  # world px per FOV radius: caps memory/setup time for 1080p
_WORLD_W, _WORLD_H = 9.0, 6.5  # world extent in FOV radii
_ZOOM_MIN = 0.75
_SAMPLES_PER_LESION = 400


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' → (640, 480); even sizes only (H.264 4:2:0 needs them)."""
    try:
        w_s, h_s = text.lower().replace("×", "x").split("x")
        w, h = int(w_s), int(h_s)
    except ValueError:
        raise CemdError(f"size must look like 640x480 (WIDTHxHEIGHT), got {text!r}") from None
    _check_size(w, h)
    return w, h


def _check_size(w: int, h: int) -> None:
    if w < 96 or h < 96 or w > 7680 or h > 4320:
        raise CemdError(f"video size {w}x{h} is out of range; use 96x96 up to 7680x4320")
    if w % 2 or h % 2:
        raise CemdError(f"video size {w}x{h} must have an even width and height (H.264 yuv420p)")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_VIDEO_TAG, int(seed)], spawn_key=stream))


# --------------------------------------------------------------------------- camera path


@dataclass
class CameraPath:
    """Per-frame camera state in world coordinates (arrays of length n_frames)."""

    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray  # radians
    zoom: np.ndarray


def _hermite(times: np.ndarray, values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Catmull-Rom style cubic through (times, values) with time-scaled tangents: smooth velocity."""
    n = len(times)
    tan = np.zeros_like(values)
    tan[1:-1] = (values[2:] - values[:-2]) / (times[2:] - times[:-2])[:, None]
    i = np.clip(np.searchsorted(times, t, side="right") - 1, 0, n - 2)
    dt = times[i + 1] - times[i]
    s = ((t - times[i]) / dt)[:, None]
    h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
    h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * values[i] + h10 * dt[:, None] * tan[i] + h01 * values[i + 1] + h11 * dt[:, None] * tan[i + 1]


@dataclass
class _Plan:
    times: np.ndarray
    points: np.ndarray  # (n, 4): x, y, angle, zoom
    lesion_sites: list[tuple[float, float]]


def _far_point(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, avoid: list[np.ndarray], dist: float,
               near: np.ndarray | None = None, reach: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
    """A random point ≥ ``dist`` from every point in ``avoid`` (best of several tries)."""
    best, best_score = None, -np.inf
    for _ in range(64):
        if near is None:
            cand = rng.uniform(lo, hi)
        else:
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(*reach)
            cand = np.clip(near + d * np.array([math.cos(a), math.sin(a)]), lo, hi)
        score = min([float(np.hypot(*(cand - p))) for p in avoid], default=np.inf)
        if score >= dist:
            return cand
        if score > best_score:
            best, best_score = cand, score
    assert best is not None
    return best


def _plan_path(rng: np.random.Generator, seconds: float, world_w: float, world_h: float, rw: float) -> _Plan:
    """Control points of an inspection: wander between lesion-free waypoints, visiting the lesion
    sites one after another every 6–10 s with a slow, zoomed-in dwell.

    Sites are placed first, far from the start and from each other, and waypoints keep away from
    them, so the first seconds and the stretches between visits are lesion-free.
    """
    margin = rw / _ZOOM_MIN * 1.05
    lo, hi = np.array([margin, margin]), np.array([world_w - margin, world_h - margin])
    start = rng.uniform(lo, lo + (hi - lo) * np.array([0.15, 1.0]))
    sites: list[np.ndarray] = []
    for _ in range(min(3, max(1, round(seconds / 8)))):
        cand = _far_point(rng, lo, hi, [start] + sites, 3.2 * rw)
        if min(float(np.hypot(*(cand - p))) for p in [start] + sites) >= 2.6 * rw or not sites:
            sites.append(cand)
    times, points = [0.0], [[start[0], start[1], rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 1.2)]]
    t, pos, angle = 0.0, start, points[0][2]
    visit_at = rng.uniform(3.0, 5.0) if seconds >= 6 else seconds * 0.45
    k = 0
    while t <= seconds + 1.0:
        if t + 2.0 >= visit_at:  # go to the next site and dwell there
            site = sites[k % len(sites)]
            k += 1
            t = max(t + 1.5, visit_at)
            angle += rng.uniform(-0.6, 0.6)
            p1 = site + rng.uniform(-0.2, 0.2, 2) * rw
            times.append(t)
            points.append([p1[0], p1[1], angle, rng.uniform(1.0, 1.3)])
            t += rng.uniform(1.0, 2.5)
            p2 = site + rng.uniform(-0.2, 0.2, 2) * rw
            angle += rng.uniform(-0.3, 0.3)
            times.append(t)
            points.append([p2[0], p2[1], angle, rng.uniform(1.2, 1.6)])
            pos = p2
            visit_at = t + rng.uniform(6.0, 10.0)
            continue
        pos = _far_point(rng, lo, hi, sites, 2.6 * rw, near=pos, reach=(0.8 * rw, 2.0 * rw))
        angle += rng.uniform(-0.6, 0.6)
        t += rng.uniform(1.8, 3.2)
        times.append(t)
        points.append([pos[0], pos[1], angle, rng.uniform(0.8, 1.2)])
    return _Plan(np.asarray(times), np.asarray(points), [(float(p[0]), float(p[1])) for p in sites])


def _sample_path(rng: np.random.Generator, plan: _Plan, n_frames: int, fps: float, rw: float) -> CameraPath:
    t = np.arange(n_frames) / fps
    v = _hermite(plan.times, plan.points, t)
    # Hand tremor: a few small fast sinusoids.
    for axis in (0, 1):
        for _ in range(2):
            v[:, axis] += 0.008 * rw * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 2 * np.pi))
    return CameraPath(v[:, 0], v[:, 1], v[:, 2], np.maximum(v[:, 3], _ZOOM_MIN))


def _modality_segments(rng: np.random.Generator, n_frames: int, fps: float) -> list[tuple[int, int, str]]:
    """WLI first, then alternating segments of about 4–12 s; ≥ 10 s guarantees WLI→NBI→WLI."""
    seconds = n_frames / fps
    n_seg = max(3 if seconds >= 10 else 1, int(round(seconds / 8)))
    weights = rng.uniform(0.2, 1.8, n_seg)
    min_len = min(4.0 * fps, 0.8 * n_frames / n_seg)  # segments of ≥ 4 s where the video allows
    lengths = min_len + (n_frames - n_seg * min_len) * weights / weights.sum()
    bounds = np.round(np.cumsum(lengths)).astype(int)
    bounds[-1] = n_frames
    out, start = [], 0
    for k, end in enumerate(bounds):
        end = max(end, start + 1)
        out.append((int(start), int(min(end, n_frames) - 1), "wli" if k % 2 == 0 else "nbi"))
        start = end
        if start >= n_frames:
            break
    return out


# --------------------------------------------------------------------------- the scene


@dataclass
class _Lesion:
    id: int
    kind: str
    samples: np.ndarray  # (k, 2) world points inside the lesion


class VideoScene:
    """A rendered world, a camera path and a per-frame renderer (random access by frame index).

    ``lesions=False`` renders the same world, path and effects without the lesions — handy to
    check that a lesion interval really shows the lesion.
    """

    def __init__(self, seed: int, seconds: float, fps: float = 30.0, size: tuple[int, int] = (640, 480),
                 lesions: bool = True) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CemdError(f"seed must be a non-negative integer, got {seed!r}")
        if not (seconds > 0 and math.isfinite(seconds)):
            raise CemdError(f"seconds must be > 0, got {seconds!r}")
        if not (fps > 0 and math.isfinite(fps)) or fps > 240:
            raise CemdError(f"fps must be in (0, 240], got {fps!r}")
        self.seed, self.fps = int(seed), float(fps)
        self.width, self.height = int(size[0]), int(size[1])
        _check_size(self.width, self.height)
        self.n_frames = max(1, int(round(seconds * fps)))
        self._setup_camera(_rng(seed, _CAMERA))
        self._setup_world(_rng(seed, _SCENE), _rng(seed, _PATH), lesions)
        self._setup_screen(_rng(seed, _SCREEN))

    # ---- setup

    def _setup_camera(self, rng: np.random.Generator) -> None:
        W, H = self.width, self.height
        self.radius = float(H * rng.uniform(0.46, 0.515))
        self.cx = W / 2 + rng.uniform(-0.01, 0.01) * W
        self.cy = H / 2 + rng.uniform(-0.01, 0.01) * H
        self.q = min(1.0, _MAX_WORLD_RADIUS / self.radius)  # world px per screen px at zoom 1
        self.rw = self.radius * self.q
        self.text = overlay_text(rng)
        h0, m0, s0 = (int(v) for v in self.text["time"].split(":"))
        self._clock0 = h0 * 3600 + m0 * 60 + s0
        self._defocus = self._defocus_episodes(rng)
        self._exposure = float(rng.uniform(0.3, 0.6))  # shutter as a fraction of the frame time

    def _defocus_episodes(self, rng: np.random.Generator) -> np.ndarray:
        """Per-frame defocus sigma in screen px: a few triangular episodes."""
        sig = np.zeros(self.n_frames, np.float32)
        seconds = self.n_frames / self.fps
        for _ in range(int(rng.poisson(seconds / 9)) + (1 if seconds >= 6 else 0)):
            mid = rng.uniform(0, self.n_frames)
            half = rng.uniform(0.2, 0.6) * self.fps
            peak = rng.uniform(1.5, 4.0) * self.radius / 230
            f = np.arange(self.n_frames)
            sig = np.maximum(sig, (peak * np.clip(1 - np.abs(f - mid) / half, 0, 1)).astype(np.float32))
        return sig

    def _setup_world(self, rng: np.random.Generator, path_rng: np.random.Generator, with_lesions: bool) -> None:
        rw = self.rw
        ww, wh = int(_WORLD_W * rw), int(_WORLD_H * rw)
        tissue = dataclasses.replace(sample_tissue(rng), zoom=1.0)
        fields = render_tissue(rng, tissue, wh, ww, rw)
        plan = _plan_path(path_rng, self.n_frames / self.fps, ww, wh, rw)
        self.path = _sample_path(path_rng, plan, self.n_frames, self.fps, rw)
        self.segments = _modality_segments(path_rng, self.n_frames, self.fps)
        self._modality = np.empty(self.n_frames, dtype="<U3")
        for a, b, m in self.segments:
            self._modality[a : b + 1] = m

        kinds = list(LESION_KINDS)
        order = [kinds[i] for i in _rng(self.seed, _LESION).permutation(len(kinds))]
        self.lesions: list[_Lesion] = []
        for i, site in enumerate(plan.lesion_sites):
            lesion_rng = _rng(self.seed, _LESION, i)  # one stream per lesion: shapes never depend on the others
            kind = order[i % len(order)]
            frac = float(np.exp(lesion_rng.uniform(np.log(0.015), np.log(0.06))))
            off = lesion_rng.uniform(-0.25, 0.25, 2) * rw
            center = (site[0] + off[0], site[1] + off[1])
            shape = make_lesion(lesion_rng, kind, center, frac * math.pi * rw * rw, wh, ww)
            if with_lesions:
                apply_lesion(fields, shape, lesion_rng, rw)
            ys, xs = np.nonzero(shape.mask)
            pick = lesion_rng.integers(0, len(xs), _SAMPLES_PER_LESION)
            self.lesions.append(_Lesion(i, kind, np.stack([xs[pick], ys[pick]], 1).astype(np.float32) + 0.5))

        shade = shading(fields, tissue)
        gloss = specular(fields, tissue, shade, rw)
        gloss8 = cv2.convertScaleAbs(gloss, alpha=255.0)
        self.world: dict[str, np.ndarray] = {}
        for modality in ("wli", "nbi"):
            planes = [cv2.convertScaleAbs(p) for p in colorize(fields, tissue, modality, shade, rw)]
            self.world[modality] = cv2.merge(planes + [gloss8])  # RGB + glint potential

    def _setup_screen(self, rng: np.random.Generator) -> None:
        """Static screen-space layers for the FOV's bounding box: vignette×FOV, glint gate, noise."""
        W, H, R = self.width, self.height, self.radius
        self.x0, self.y0 = max(0, int(math.floor(self.cx - R - 1))), max(0, int(math.floor(self.cy - R - 1)))
        self.x1, self.y1 = min(W, int(math.ceil(self.cx + R + 1))), min(H, int(math.ceil(self.cy + R + 1)))
        bw, bh = self.x1 - self.x0, self.y1 - self.y0
        gx, gy = np.meshgrid(np.arange(self.x0, self.x1, dtype=np.float32), np.arange(self.y0, self.y1, dtype=np.float32))
        u, v = (gx - self.cx) / R, (gy - self.cy) / R
        d = np.sqrt(u * u + v * v)
        fov = np.clip((1 - d) * R + 0.5, 0, 1)
        ox, oy = rng.uniform(-0.15, 0.15, 2)
        vign = 1 - rng.uniform(0.35, 0.6) * np.minimum((u - ox) ** 2 + (v - oy) ** 2, 2.0) ** 1.25
        vign *= 1 + rng.uniform(-0.15, 0.15) * u + rng.uniform(-0.15, 0.15) * v
        self._vignette = cv2.convertScaleAbs(np.clip(vign * fov, 0, 1), alpha=255.0)
        self._fov8 = cv2.convertScaleAbs(fov, alpha=255.0)
        # Larger smooth fields that slide slowly over the view: the light falloff with distance
        # to the wall (dark lumen side) and the glint gate, so glints come and go as the scope
        # moves even over a static patch of mucosa.
        pad = int(0.5 * R)
        t = np.arange(self.n_frames) / self.fps

        def sliding(cell: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
            z = _noise(rng, bh + 2 * pad, bw + 2 * pad, cell)
            field = cv2.convertScaleAbs(np.clip(lo + (hi - lo) * (0.5 + 0.3 * z), 0, 1), alpha=255.0)
            off = np.stack([pad + pad * 0.9 * np.sin(2 * np.pi * t / rng.uniform(5, 12) + rng.uniform(0, 6.3))
                            for _ in range(2)], 1)
            return field, np.rint(off).astype(int)

        self._gate, self._gate_off = sliding(0.35 * R, 0.1, 1.2)
        self._depth, self._depth_off = sliding(0.9 * R, 0.45, 1.05)
        npad = 8
        self._noise = cv2.convertScaleAbs(rng.normal(6, 1.6, (bh + npad, bw + npad, 3)).astype(np.float32))
        self._noise_off = rng.integers(0, npad, (self.n_frames, 2))
        self._templates = {m: self._template(m) for m in ("wli", "nbi")}

    def _template(self, modality: str) -> np.ndarray:
        t = self.text
        gx, gy = np.meshgrid(np.arange(self.width, dtype=np.float32), np.arange(self.height, dtype=np.float32))
        inside = (gx - self.cx) ** 2 + (gy - self.cy) ** 2 <= (self.radius + 2) ** 2
        corners = {"tl": [t["id"], t["patient"], t["date"]], "bl": [modality.upper()], "br": [t["scope"]]}
        layer = text_layer(self.height, self.width, corners, inside)
        return cv2.merge([layer, layer, layer])

    # ---- per frame

    def modality(self, i: int) -> str:
        return str(self._modality[i])

    def world_to_screen(self, i: int) -> np.ndarray:
        """2×3 affine mapping world px to screen px for frame ``i``."""
        p = self.path
        k = float(p.zoom[i]) / self.q
        a, b = k * math.cos(p.angle[i]), k * math.sin(p.angle[i])
        tx = self.cx - (a * p.x[i] - b * p.y[i])
        ty = self.cy - (b * p.x[i] + a * p.y[i])
        return np.array([[a, -b, tx], [b, a, ty]], np.float64)

    def _motion(self, i: int) -> tuple[float, float]:
        """Screen displacement (px) of the view centre during the exposure of frame ``i``."""
        if i == 0:
            return 0.0, 0.0
        m_prev, m = self.world_to_screen(i - 1), self.world_to_screen(i)
        inv = cv2.invertAffineTransform(m_prev)
        wpt = inv @ np.array([self.cx, self.cy, 1.0])
        cur = m @ np.array([wpt[0], wpt[1], 1.0])
        return (cur[0] - self.cx) * self._exposure, (cur[1] - self.cy) * self._exposure

    def clock(self, i: int) -> str:
        s = (self._clock0 + int(i / self.fps)) % 86400
        return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"

    def frame(self, i: int, modality: str | None = None) -> np.ndarray:
        """RGB uint8 frame ``i`` (in ``modality`` if given, else the one on screen at ``i``)."""
        modality = modality or self.modality(i)
        bw, bh = self.x1 - self.x0, self.y1 - self.y0
        m = self.world_to_screen(i)
        m[:, 2] -= (self.x0, self.y0)
        mx, my = self._motion(i)
        streak, defocus = max(abs(mx), abs(my)), float(self._defocus[i])
        world = self.world[modality]
        if streak > 0.02 * self.radius or defocus > 0.8:
            # Strong blur: render at half resolution (the blur hides it), blur, upsample.
            view = cv2.warpAffine(world, m * 0.5, ((bw + 1) // 2, (bh + 1) // 2), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT)
            kx, ky = max(1, int(round(abs(mx) / 2))), max(1, int(round(abs(my) / 2)))
            if kx > 1 or ky > 1:
                view = cv2.blur(view, (kx, ky))  # box blur along the motion: a cheap streak
            view = _blur(view, defocus / 2)
            view = cv2.resize(view, (bw, bh), interpolation=cv2.INTER_LINEAR)
        else:
            view = cv2.warpAffine(world, m, (bw, bh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            kx, ky = max(1, int(round(abs(mx)))), max(1, int(round(abs(my))))
            if streak > max(1.5, 0.006 * self.radius):
                view = cv2.blur(view, (kx, ky))
        rgb, gloss = cv2.cvtColor(view, cv2.COLOR_RGBA2RGB), cv2.extractChannel(view, 3)  # contiguous: fast paths
        gx, gy = self._gate_off[i]
        nx, ny = self._noise_off[i]
        rgb = cv2.add(rgb, self._noise[ny : ny + bh, nx : nx + bw])
        rgb = cv2.subtract(rgb, (6, 6, 6, 0))
        dx, dy = self._depth_off[i]
        light = cv2.multiply(self._vignette, self._depth[dy : dy + bh, dx : dx + bw], scale=1 / 255)
        rgb = cv2.multiply(rgb, cv2.merge([light, light, light]), scale=1 / 255)
        # Glints saturate to white whatever the illumination, but only inside the FOV.
        glint = cv2.multiply(gloss, self._gate[gy : gy + bh, gx : gx + bw], scale=1 / 255)
        glint = cv2.multiply(glint, self._fov8, scale=1 / 255)
        rgb = cv2.max(rgb, cv2.merge([glint, glint, glint]))
        out = self._templates[modality].copy()
        region = out[self.y0 : self.y1, self.x0 : self.x1]
        cv2.max(region, rgb, dst=region)
        self._draw_clock(out, i)
        return out

    def _draw_clock(self, img: np.ndarray, i: int) -> None:
        scale = max(0.28, min(self.width, self.height) / 900)
        th = 1 if scale < 0.9 else 2
        text = self.clock(i)
        (tw, tht), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
        m = max(2, int(4 * scale))
        cv2.putText(img, text, (self.width - m - tw, m + tht), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), th,
                    cv2.LINE_AA)

    # ---- ground truth

    def visible_fractions(self) -> np.ndarray:
        """(n_frames, n_lesions): fraction of each lesion's area inside the FOV and the frame."""
        out = np.zeros((self.n_frames, len(self.lesions)), np.float32)
        for i in range(self.n_frames):
            m = self.world_to_screen(i)
            for j, les in enumerate(self.lesions):
                pts = les.samples @ m[:, :2].T + m[:, 2]
                inside = ((pts[:, 0] - self.cx) ** 2 + (pts[:, 1] - self.cy) ** 2 <= self.radius**2)
                inside &= (pts[:, 0] >= 0) & (pts[:, 0] < self.width) & (pts[:, 1] >= 0) & (pts[:, 1] < self.height)
                out[i, j] = inside.mean()
        return out

    def lesion_screen_mask(self, i: int, lesion_id: int) -> np.ndarray:
        """Approximate screen mask of a lesion in frame ``i`` (its sample points, dilated)."""
        m = self.world_to_screen(i)
        pts = self.lesions[lesion_id].samples @ m[:, :2].T + m[:, 2]
        mask = np.zeros((self.height, self.width), np.uint8)
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < self.width) & (pts[:, 1] >= 0) & (pts[:, 1] < self.height)
        p = pts[ok].astype(int)
        mask[p[:, 1], p[:, 0]] = 1
        if len(p) >= 3:
            hull = cv2.convexHull(p.astype(np.int32))
            cv2.fillConvexPoly(mask, hull, 1)
        return mask.astype(bool)

    def fov_mask(self) -> np.ndarray:
        """bool H×W: the lit circular field of view (pixels whose centre lies in the disc, as rendered)."""
        gx = (np.arange(self.width, dtype=np.float64) - self.cx) ** 2
        gy = (np.arange(self.height, dtype=np.float64) - self.cy) ** 2
        return gy[:, None] + gx[None, :] <= self.radius**2

    def lesion_box(self, i: int, lesion_id: int, fov: np.ndarray | None = None) -> list[int] | None:
        """``[x, y, w, h]`` (screen px, top-left, inclusive size) of lesion ``lesion_id`` in frame ``i``:
        the tight box of ``lesion_screen_mask`` within the field of view; None when none of it is lit.
        ``fov`` is ``fov_mask()``, passed in to reuse it across calls."""
        mask = self.lesion_screen_mask(i, lesion_id)
        mask &= self.fov_mask() if fov is None else fov
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            return None
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
        return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]

    def boxes(self, fractions: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Per frame ``{"frame_id", "boxes": [[x, y, w, h], ...], "ids": [lesion id, ...]}``: a box for each
        lesion *present* in the frame (the events' rule), clipped to the frame and the field of view.
        ``fractions`` is ``visible_fractions()`` when already computed."""
        vis = (self.visible_fractions() if fractions is None else fractions) >= PRESENCE_FRACTION
        fov = self.fov_mask()
        out = []
        for i in range(self.n_frames):
            boxes, ids = [], []
            for j in np.flatnonzero(vis[i]):
                box = self.lesion_box(i, int(j), fov)
                if box is None:  # ≥ half the samples are in the disc, so this is (nearly) impossible
                    box = self._sample_box(i, int(j))
                boxes.append(box)
                ids.append(self.lesions[j].id)
            out.append({"frame_id": i, "boxes": boxes, "ids": ids})
        return out

    def _sample_box(self, i: int, lesion_id: int) -> list[int]:
        """Fallback box: the pixels of the lesion's sample points that fall in the disc and the frame."""
        m = self.world_to_screen(i)
        pts = self.lesions[lesion_id].samples @ m[:, :2].T + m[:, 2]
        ok = (pts[:, 0] - self.cx) ** 2 + (pts[:, 1] - self.cy) ** 2 <= self.radius**2
        ok &= (pts[:, 0] >= 0) & (pts[:, 0] < self.width) & (pts[:, 1] >= 0) & (pts[:, 1] < self.height)
        p = pts[ok].astype(int)
        x0, y0 = p.min(0)
        x1, y1 = p.max(0)
        return [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)]

    def events(self, fractions: np.ndarray | None = None) -> dict[str, Any]:
        """The events JSON (docs/DATA.md); ``fractions`` is ``visible_fractions()`` when already computed."""
        vis = (self.visible_fractions() if fractions is None else fractions) >= PRESENCE_FRACTION
        lesions = []
        for j, les in enumerate(self.lesions):
            for a, b in _runs(vis[:, j]):
                lesions.append({"id": les.id, "start_frame": a, "end_frame": b, "kind": les.kind,
                                "visible_in": list(LESION_KINDS[les.kind]["visible_in"])})
        lesions.sort(key=lambda e: (e["start_frame"], e["id"]))
        return {
            "fps": self.fps,
            "frames": self.n_frames,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "synthetic": True,
            "lesions": lesions,
            "modality": [{"start_frame": a, "end_frame": b, "modality": m} for a, b, m in self.segments],
        }


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as inclusive (start, end) frame pairs."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    d = np.diff(padded.astype(np.int8))
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


# --------------------------------------------------------------------------- writer


def render_video(
    out: Path,
    seed: int,
    seconds: float,
    fps: float = 30,
    size: tuple[int, int] = (640, 480),
    events_out: Path | None = None,
    progress: bool = True,
    codec: str = "libx264",
    lesions: bool = True,
    boxes_out: Path | None = None,
) -> dict[str, Any]:
    """Write an H.264 (yuv420p) MP4 of a synthetic examination; return (and optionally write) its events.

    ``lesions=False`` renders the same examination without lesions (normal video, e.g. for
    calibration); its events then list no lesions. ``boxes_out`` also writes the ground-truth
    boxes, one JSON line per frame (``VideoScene.boxes``; format: docs/DATA.md); all empty
    without lesions.
    """
    import av

    out = Path(out)
    if out.is_dir():
        raise CemdError(f"{out} is a folder; give a file path for the video, e.g. {out / 'synth.mp4'}")
    if events_out is not None and Path(events_out).is_dir():
        raise CemdError(f"{events_out} is a folder; give a file path for the events JSON")
    if boxes_out is not None:
        boxes_out = Path(boxes_out)
        if boxes_out.is_dir():
            raise CemdError(f"{boxes_out} is a folder; give a file path for the boxes, e.g. "
                            f"{boxes_out / (out.stem + '.boxes.jsonl')}")
        taken = {out.resolve()} | ({Path(events_out).resolve()} if events_out is not None else set())
        if boxes_out.resolve() in taken:
            raise CemdError(f"{boxes_out}: the boxes file must differ from the video and the events file")
    scene = VideoScene(seed, seconds, fps, size, lesions=lesions)
    fractions = scene.visible_fractions()  # one pass over the frames, shared by events and boxes
    events = scene.events(fractions)
    if not lesions:
        events["lesions"] = []
        fractions = np.zeros_like(fractions)
    boxes = scene.boxes(fractions) if boxes_out is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(scene.fps).limit_denominator(1001)
    try:
        container = av.open(str(out), "w")
    except (OSError, av.error.FFmpegError) as exc:
        raise CemdError(f"cannot write {out}: {exc}") from None
    try:
        try:
            stream = container.add_stream(codec, rate=rate)
        except (ValueError, av.error.FFmpegError) as exc:
            raise CemdError(f"video codec {codec!r} is not available in this PyAV build ({exc})") from None
        stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        with progress_steps(progress, scene.n_frames, f"synth-video → {out.name}") as advance:
            for i in range(scene.n_frames):
                frame = av.VideoFrame.from_ndarray(scene.frame(i), format="rgb24")
                frame.pts = i
                frame.time_base = 1 / rate
                for packet in stream.encode(frame):
                    container.mux(packet)
                advance()
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    if events_out is not None:
        events_out = Path(events_out)
        events_out.parent.mkdir(parents=True, exist_ok=True)
        events_out.write_text(json.dumps(events, indent=2) + "\n", encoding="utf-8")
    if boxes_out is not None and boxes is not None:
        _write_lines_atomic(boxes_out, boxes)
    return events


def _write_lines_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSON Lines to ``path`` via ``path.tmp`` and a rename: a crash never leaves a complete-looking half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CemdError(f"cannot write {path}: {exc}") from None


# --------------------------------------------------------------------------- frame dataset

_DISC_FILL = 0.48  # the monitor's crop: the FOV circle fills 96 % of the square (realtime/scoring/preprocess.py)


def fov_crop(scene: VideoScene, rgb: np.ndarray, size: int) -> np.ndarray:
    """The square around the scene's field of view, resized to ``size`` and masked outside it:
    what the monitor's preprocessing hands the branch (there it is found in the image)."""
    side = max(8, int(round(scene.radius / _DISC_FILL)))
    x0, y0 = int(round(scene.cx - side / 2)), int(round(scene.cy - side / 2))
    canvas = np.zeros((side, side, 3), np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(scene.width, x0 + side), min(scene.height, y0 + side)
    canvas[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    out = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    d = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2)
    disc = np.clip(_DISC_FILL * size + 1.5 - d, 0, 1)[..., None]
    return (out * disc).astype(np.uint8)


def write_frame_dataset(out: Path, seeds: list[int], per_seed: int, seconds: float = 60.0,
                        video_size: tuple[int, int] = (640, 480), size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Paired normal WLI/NBI training frames from lesion-free synthetic examinations.

    Each seed is one examination (its own tissue, camera path, blur, glints, text); ``per_seed``
    frames evenly spread over it are rendered in both modalities (the world is coloured in both,
    so the pair is exact) and cropped like the monitor crops. Layout: docs/DATA.md (train/good).
    """
    out = Path(out)
    total = len(seeds) * per_seed
    with progress_steps(progress, total, f"frames → {out}") as advance:
        for seed in seeds:
            scene = VideoScene(seed, seconds, 30.0, video_size, lesions=False)
            for k, i in enumerate(np.linspace(0, scene.n_frames - 1, per_seed).round().astype(int)):
                name = f"s{seed:04d}_{k:03d}.png"
                for modality in ("wli", "nbi"):
                    folder = out / modality / "train" / "good"
                    folder.mkdir(parents=True, exist_ok=True)
                    crop = fov_crop(scene, scene.frame(int(i), modality), size)
                    cv2.imwrite(str(folder / name), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
                advance()
    meta = {"format": "cemd-dataset/1", "synthetic": True, "generator": "engine.synth_video frames",
            "seeds": list(seeds), "per_seed": per_seed, "size": size, "video_size": list(video_size),
            "counts": {"train": {"good": total}}}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
