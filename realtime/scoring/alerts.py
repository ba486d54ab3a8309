"""Alert logic: per-modality thresholds, N-of-M debouncing, hold time, events with a location.

A frame is *above* when its score exceeds the threshold of the branch that scored it
(divided by the sensitivity knob: 1.2 = 20 % more sensitive). An event opens when at least
N of the last M scored frames of the same modality were above; it stays open while above
frames keep coming and ends ``hold_ms`` of source time after the last one (time, not frame
count, so dropped frames do not stretch it). A modality switch ends the open event: the
other branch has its own scale. Each event emits ``start``, ``update`` (on a new peak, at
most ``update_hz`` a second, and at least every ``heartbeat_ms``) and ``end``. The state
machine itself is ``calibration.debounce.Debouncer``, which calibration replays recorded
scores through, so calibrated false-alert rates are this logic's rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from calibration.debounce import Debouncer
from engine.options import option
from realtime.scoring.preprocess import map_to_source

DEFAULT_N_OF_M = (3, 5)


@dataclass
class AlertConfig:
    sensitivity: float = option(1.0, "threshold divisor: 1.0 = calibrated, 1.2 = 20 % more sensitive",
                                flag="--sensitivity")
    n_of_m: tuple[int, int] | None = option(None, "debouncing: an event opens when N of the last M frames are above "
                                            "the threshold, e.g. [4, 6] (default: the calibration's choice, else "
                                            f"{list(DEFAULT_N_OF_M)}; set, it overrides the calibration)")
    hold_ms: float = option(500.0, "an event ends this long (source time) after its last frame above the threshold")
    update_hz: float = option(5.0, "at most this many `update` alerts per second while an event is open")
    heartbeat_ms: float = option(1000.0, "an open event sends an `update` at least this often")
    location_level: float = option(0.6, "the lesion outline: the map ≥ this fraction of its peak, around the peak")
    location_floor: float = option(0.9, "the lesion outline is also cut at this fraction of the threshold (the map is "
                                        "in the score's units): on real maps 0.6 of the peak alone outlines a diffuse "
                                        "region (docs/STREAMING.md)")
    location_min: float = option(0.8, "inside an open event, a frame scoring below this fraction of the threshold "
                                      "has no location (no box drawn): the branch no longer sees the lesion there")

    def validate(self) -> None:
        from engine.errors import CemdError

        if self.n_of_m is not None:
            n, m = self.n_of_m
            if not (1 <= n <= m <= 120):
                raise CemdError(f"n_of_m must satisfy 1 ≤ N ≤ M ≤ 120, got {n} of {m}")
        if not (0.1 <= self.sensitivity <= 10):
            raise CemdError(f"sensitivity must be between 0.1 and 10 (1.0 = calibrated), got {self.sensitivity}")
        if not self.hold_ms >= 0:
            raise CemdError(f"hold_ms must be ≥ 0, got {self.hold_ms}")
        if not self.update_hz > 0:  # the update interval is 1000 / update_hz ms
            raise CemdError(f"update_hz must be > 0, got {self.update_hz}")
        if not self.heartbeat_ms > 0:
            raise CemdError(f"heartbeat_ms must be > 0, got {self.heartbeat_ms}")
        if not 0 < self.location_level <= 1:
            raise CemdError(f"location_level must be a fraction of the peak in (0, 1], got {self.location_level}")
        if not 0 <= self.location_floor <= 10:
            raise CemdError(f"location_floor must be a fraction of the threshold in [0, 10], got {self.location_floor}")
        if not 0 <= self.location_min <= 1:
            raise CemdError(f"location_min must be a fraction of the threshold in [0, 1], got {self.location_min}")


@dataclass
class Thresholds:
    """Per-modality image-score thresholds, the calibrated debouncing, and where they came from."""

    values: dict[str, float]
    source: str
    warning: str | None = None
    n_of_m: tuple[int, int] | None = None  # from the calibration

    @classmethod
    def for_bundle(cls, bundle: Any) -> "Thresholds":
        """From the bundle's calibration; a branch without one gets the highest normal validation
        score of training, loudly flagged."""
        cal = bundle.calibration or {}
        where = bundle.path / "calibration.json"
        mods = cal.get("modalities", {}) if isinstance(cal.get("modalities"), dict) else {}
        values = {m: _number(mods[m]["threshold"], f"{where}: the {m.upper()} threshold", "re-run cemd calibrate")
                  for m in bundle.modalities if isinstance(mods.get(m), dict) and "threshold" in mods[m]}
        n_of_m = tuple(cal["n_of_m"]) if isinstance(cal.get("n_of_m"), list) and len(cal["n_of_m"]) == 2 else None
        if n_of_m is not None and not (all(isinstance(v, int) and not isinstance(v, bool) for v in n_of_m)
                                       and 1 <= n_of_m[0] <= n_of_m[1] <= 120):
            from engine.errors import BundleError

            raise BundleError(f"{where}: n_of_m must be two whole numbers 1 ≤ N ≤ M ≤ 120, got {list(n_of_m)!r}; "
                              "re-run cemd calibrate")
        warnings = []
        made_for = cal.get("model_files")
        if values and made_for and made_for != bundle.meta.get("files"):
            warnings.append(f"{bundle.path / 'calibration.json'} was made for other model weights (the bundle's files "
                            f"changed since); its thresholds may be wrong: recalibrate with cemd calibrate")
        made_cfg, cfg = cal.get("model_config"), bundle.meta.get("model") or {}
        if values and isinstance(made_cfg, dict) and made_cfg != cfg:
            changed = sorted(k for k in set(made_cfg) | set(cfg) if made_cfg.get(k) != cfg.get(k))
            warnings.append(f"{bundle.path / 'calibration.json'} was made for another score definition (bundle.json "
                            f"model settings changed since: {', '.join(changed)}); its thresholds do not fit these "
                            f"scores: recalibrate with cemd calibrate")
        missing = [m for m in bundle.modalities if m not in values]
        if not missing:
            return cls(values, f"calibration {bundle.path / 'calibration.json'} (version {cal.get('version', '?')})",
                       " ".join(warnings) or None, n_of_m)
        stats = bundle.meta.get("score_stats", {})
        no_stats = [m for m in missing if m not in stats]
        if no_stats:
            from engine.errors import BundleError

            raise BundleError(f"bundle {bundle.path} has neither a calibration nor score statistics for "
                              f"{', '.join(no_stats).upper()}; run: cemd calibrate --bundle {bundle.path} --normal VIDEO")
        for m in missing:
            values[m] = _number(stats[m].get("max") if isinstance(stats[m], dict) else None,
                                f"bundle {bundle.path}: the {m.upper()} score_stats max in bundle.json",
                                "restore bundle.json or retrain the bundle")
        shown = ", ".join(f"{m.upper()} {values[m]:.4f}" for m in missing)
        warnings.insert(0, (
            f"bundle {bundle.path} is not calibrated for {', '.join(m.upper() for m in missing)}: using default "
            f"thresholds ({shown}), the highest score of the training run's normal validation images. Expect false "
            f"alarms or misses on real video; calibrate on normal video of your own (cemd calibrate)."))
        source = ("default: highest normal validation score per branch" if len(missing) == len(bundle.modalities)
                  else f"calibration for {', '.join(m.upper() for m in values if m not in missing)}, default for "
                       f"{', '.join(m.upper() for m in missing)}")
        return cls(values, source, " ".join(warnings), n_of_m)


def _number(value: Any, what: str, fix: str) -> float:
    """A threshold read from a bundle: a finite number, else a BundleError naming it and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        from engine.errors import BundleError

        raise BundleError(f"{what} is not a finite number ({value!r}); {fix}")
    return float(value)


def locate(amap: np.ndarray, box: tuple[int, int, int], level: float, max_points: int = 48,
           floor: float = 0.0) -> dict[str, Any] | None:
    """Outline, box and peak of the hot region around the map's peak, in source-frame pixels: the
    connected part of the map at or above ``level`` × its peak and above ``floor`` (map units;
    capped at 0.8 × the peak so that a weak peak still outlines a region, not a point).

    The box covers the hot map cells whole (their edges, not their centres), through the same
    crop → source mapping (`map_to_source`) the overlay uses to lay the heat map over the frame.
    """
    amap = np.asarray(amap, np.float32).reshape(amap.shape[-2:])
    n = amap.shape[-1]
    peak_idx = int(np.argmax(amap))
    py, px = divmod(peak_idx, n)
    peak = float(amap[py, px])
    if not math.isfinite(peak) or peak <= 0:
        return None
    hot = (amap >= max(level * peak, min(floor, 0.8 * peak))).astype(np.uint8)
    _, labels = cv2.connectedComponents(hot, connectivity=8)
    region = (labels == labels[py, px]).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    eps = 0.5
    while len(outline) > max_points:
        outline = cv2.approxPolyDP(outline, eps, True)
        eps *= 1.6
    pts = map_to_source(outline.reshape(-1, 2).astype(np.float64) + 0.5, box, n)
    ys, xs = np.nonzero(region)
    (x, y), (x1, y1) = map_to_source(np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.max() + 1]], np.float64), box, n)
    peak_src = map_to_source(np.array([[px + 0.5, py + 0.5]]), box, n)[0]
    x, y = math.floor(x), math.floor(y)
    return {
        "box": [x, y, int(math.ceil(x1)) - x, int(math.ceil(y1)) - y],
        "contour": [[int(round(a)), int(round(b))] for a, b in pts],
        "peak": [int(round(peak_src[0])), int(round(peak_src[1]))],
    }


@dataclass
class _Event:
    id: int
    modality: str
    start_frame: int
    start_ns: int
    peak_score: float = -math.inf
    peak_frame: int = -1
    location: dict[str, Any] | None = None
    last_above_ns: int = 0
    last_emit_ns: int = 0
    last_frame: int = -1
    pending_peak: bool = False


@dataclass
class Decision:
    above: bool
    threshold: float
    event_state: str  # idle | open
    event_id: int | None
    location: dict[str, Any] | None
    alerts: list[dict[str, Any]] = field(default_factory=list)


class AlertLogic:
    """Turns a stream of (frame, modality, score, map) into alert events."""

    def __init__(self, thresholds: Thresholds, config: AlertConfig | None = None, first_event_id: int = 0) -> None:
        """``first_event_id``: where event ids start (a monitor restarted on its run folder continues them)."""
        self.thresholds = thresholds
        self.config = config or AlertConfig()
        self.config.validate()
        self.n_of_m = self.config.n_of_m or thresholds.n_of_m or DEFAULT_N_OF_M  # config > calibration > default
        n, m = self.n_of_m
        self._debounce = Debouncer(n, m, self.config.hold_ms)
        self._event: _Event | None = None
        self._next_id = first_event_id
        self.events_started = 0

    def threshold(self, modality: str) -> float:
        return self.thresholds.values[modality] / self.config.sensitivity

    @property
    def open_event(self) -> _Event | None:
        return self._event

    def _payload(self, kind: str, ev: _Event, frame_id: int, pts: int | None, score: float, t_ns: int,
                 end_frame: int | None = None, reason: str | None = None) -> dict[str, Any]:
        out = {
            "event": kind, "event_id": ev.id, "modality": ev.modality, "frame_id": frame_id, "pts": pts,
            "start_frame_id": ev.start_frame, "end_frame_id": end_frame, "score": round(float(score), 6),
            "peak_score": round(float(ev.peak_score), 6), "peak_frame_id": ev.peak_frame,
            "threshold": round(self.threshold(ev.modality), 6),
            "duration_ms": round((t_ns - ev.start_ns) / 1e6, 1), "location": ev.location,
        }
        if reason:
            out["reason"] = reason
        return out

    @staticmethod
    def end_orphan(last: dict[str, Any]) -> dict[str, Any]:
        """The ``end`` of an event a previous monitor on this run folder left open (it died), from
        that event's last logged message: its frame ids and duration are the old boot's, up to
        the last frame that monitor reported; reason ``monitor_restarted``."""
        keys = ("event_id", "modality", "frame_id", "pts", "start_frame_id", "score", "peak_score",
                "peak_frame_id", "threshold", "duration_ms", "location")
        out = {k: last.get(k) for k in keys}
        out.update(event="end", end_frame_id=last.get("frame_id"), reason="monitor_restarted")
        return out

    def close(self, frame_id: int, pts: int | None, t_ns: int, reason: str) -> list[dict[str, Any]]:
        """End the open event (source ended, shutdown)."""
        self._debounce.close()
        return self._end(frame_id, pts, t_ns, reason)

    def _end(self, frame_id: int, pts: int | None, t_ns: int, reason: str) -> list[dict[str, Any]]:
        ev, self._event = self._event, None
        if ev is None:
            return []
        return [self._payload("end", ev, frame_id, pts, ev.peak_score, max(t_ns, ev.start_ns), ev.last_frame, reason)]

    def update(self, frame_id: int, pts: int | None, t_ns: int, modality: str, score: float,
               amap: Callable[[], np.ndarray] | np.ndarray, box: tuple[int, int, int]) -> Decision:
        """One scored frame. ``amap`` may be a callable so the map is fetched only when needed."""
        cfg = self.config
        alerts: list[dict[str, Any]] = []
        thr = self.threshold(modality)
        above = bool(score > thr)
        step = self._debounce.step(t_ns, modality, above)
        for reason in step.ended:  # a modality switch, or the hold time ran out
            alerts += self._end(frame_id, pts, t_ns, reason)
        ev = self._event
        location = None
        # a frame of the event (new or open) above the threshold, or an open event's frame below it but
        # near: where the lesion is now, not at the peak. Further below, the map has no lesion to outline
        # (measured on synthetic video: the outline then spreads over a sixth of the crop, IoU with the
        # lesion ~0.1) and no box is better than a wrong one
        if step.counts or (ev is not None and score >= cfg.location_min * thr):
            location = locate(amap() if callable(amap) else amap, box, cfg.location_level,
                              floor=cfg.location_floor * thr)
        if step.counts:
            if step.opened:
                ev = self._event = _Event(self._next_id, modality, frame_id, t_ns)
                self._next_id += 1
                self.events_started += 1
                ev.peak_score, ev.peak_frame, ev.location = score, frame_id, location
                ev.last_above_ns = ev.last_emit_ns = t_ns
                ev.last_frame = frame_id
                alerts.append(self._payload("start", ev, frame_id, pts, score, t_ns))
            else:
                assert ev is not None
                ev.last_above_ns, ev.last_frame = t_ns, frame_id
                if score > ev.peak_score:
                    ev.peak_score, ev.peak_frame, ev.location = score, frame_id, location
                    ev.pending_peak = True
        just_started = bool(alerts) and alerts[-1]["event"] == "start"
        if ev is not None and not just_started:
            since = (t_ns - ev.last_emit_ns) / 1e6
            if (ev.pending_peak and since >= 1000 / cfg.update_hz) or since >= cfg.heartbeat_ms:
                alerts.append(self._payload("update", ev, frame_id, pts, score, t_ns))
                ev.last_emit_ns, ev.pending_peak = t_ns, False
        return Decision(above, thr, "open" if ev is not None else "idle", ev.id if ev else None,
                        location, alerts)
