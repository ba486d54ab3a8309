"""Ground-truth events of a video, and event-level metrics of a replay against them.

The events file is the JSON that ``cemd synth-video --events-out`` writes; annotate your own
videos in the same format (docs/DATA.md#2-video-events)::

    {"fps": 30.0, "frames": 1800,                 # required: the video's frame rate and count
     "width": 1920, "height": 1080,               # optional: checked against the video
     "lesions": [{"start_frame": 114, "end_frame": 211,          # inclusive, 0-based
                  "kind": "depressed_neoplasia",                 # optional
                  "visible_in": ["wli", "nbi"]}],                # optional (default: both)
     "modality": [{"start_frame": 0, "end_frame": 178, "modality": "wli"}, ...]}   # optional

Definitions (all in source time, so they do not depend on how fast the replay ran):

* **lesion event**: a maximal run of frames in which a lesion is present *and* the modality on
  screen shows it (``visible_in``; without a ``modality`` list, the branch that scored each
  frame stands in for it). A lesion that only NBI shows, seen under WLI, is not counted
  against the WLI branch: no single-modality branch can see what its light does not show.
* **detected**: an alert event is open on at least one frame of the lesion event (one that
  started inside it, or one still open from just before, while the lesion was entering).
* **time to first alert**: from the lesion event's first frame to the first of its frames on
  which an alert event is open (0 when one was already open).
* **false alert**: an alert event that overlaps no frame of any lesion interval.
* **false alerts per hour**: false alerts / hours of lesion-free video (frames inside no
  lesion interval), per branch and overall.
* **frame AUROC**: image score of frames inside a lesion event (positives) against lesion-free
  frames (negatives); frames with a lesion the modality does not show are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.constants import MODALITIES
from engine.errors import CemdError, read_document, shown
from engine.eval.metrics import auroc

MAX_FRAMES = 10**9  # more than nine days of video at 1000 fps


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_FRAMES \
            or value != int(value):  # abs() first: no int() of NaN, ±inf or an int too big for a float
        raise CemdError(f"{what} must be a whole number from 0 to {MAX_FRAMES}, got {shown(value)}")
    return int(value)


def load_events(path: Path | str) -> dict[str, Any]:
    """Read and validate an events file; raises ``CemdError`` naming the problem."""
    path = Path(path)
    if not path.exists():
        raise CemdError(f"events file {path} does not exist; write one with cemd synth-video --events-out, or "
                        f"annotate your video in that format (docs/DATA.md#2-video-events)")
    if not path.is_file():
        raise CemdError(f"events file {path} is not a file (a directory or a device?); pass the events JSON")
    ev = read_document(path, json.loads, "events file", "JSON")
    if not isinstance(ev, dict):
        raise CemdError(f"events file {path} must hold a JSON object with fps, frames and lesions")
    missing = [k for k in ("fps", "frames", "lesions") if k not in ev]
    if missing:
        raise CemdError(f"events file {path} lacks {', '.join(missing)} (format: docs/DATA.md#2-video-events)")
    where = f"events file {path}:"
    fps = ev["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (0.01 <= fps <= 1000):
        raise CemdError(f"{where} fps must be a number from 0.01 to 1000, got {shown(fps)}")
    frames = _int(ev["frames"], f"{where} frames")
    if frames < 1:
        raise CemdError(f"{where} frames must be ≥ 1, got {frames}")
    for key in ("width", "height"):
        v = ev.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 16):
            raise CemdError(f"{where} {key} must be a whole number of pixels from 1 to 65536 (or absent), "
                            f"got {shown(v)}")
    if not isinstance(ev["lesions"], list):
        raise CemdError(f"{where} lesions must be a list of {{start_frame, end_frame}} objects")
    lesions = []
    for i, les in enumerate(ev["lesions"]):
        if not isinstance(les, dict) or "start_frame" not in les or "end_frame" not in les:
            raise CemdError(f"{where} lesion {i} needs start_frame and end_frame")
        a, b = _int(les["start_frame"], f"{where} lesion {i} start_frame"), _int(les["end_frame"],
                                                                                f"{where} lesion {i} end_frame")
        if not 0 <= a <= b < frames:
            raise CemdError(f"{where} lesion {i} spans frames {a}–{b}, outside the video's 0–{frames - 1} "
                            f"(or end before start)")
        vis = les.get("visible_in", list(MODALITIES))
        if not isinstance(vis, list) or not vis or any(not isinstance(m, str) or m not in MODALITIES for m in vis):
            raise CemdError(f"{where} lesion {i} visible_in must be a non-empty list of wli/nbi, got {shown(vis)}")
        lesions.append({**les, "start_frame": a, "end_frame": b, "visible_in": list(vis)})
    segments = []
    modality = ev.get("modality")
    if modality is not None and not isinstance(modality, list):
        raise CemdError(f"{where} modality must be a list of {{start_frame, end_frame, modality}} segments, "
                        f"got {shown(modality)}")
    for i, seg in enumerate(modality or []):
        if not isinstance(seg, dict) or not isinstance(seg.get("modality"), str) or seg["modality"] not in MODALITIES:
            raise CemdError(f"{where} modality segment {i} must be {{start_frame, end_frame, modality: wli|nbi}}")
        a, b = _int(seg.get("start_frame"), f"{where} modality segment {i} start_frame"), _int(
            seg.get("end_frame"), f"{where} modality segment {i} end_frame")
        if not 0 <= a <= b < frames:
            raise CemdError(f"{where} modality segment {i} spans frames {a}–{b}, outside 0–{frames - 1}")
        segments.append({"start_frame": a, "end_frame": b, "modality": seg["modality"]})
    return {**ev, "fps": float(fps), "frames": frames, "lesions": lesions, "modality": segments,
            "path": str(path)}


def check_fits(events: dict[str, Any], frames: int, fps: float, width: int | None = None,
               height: int | None = None) -> None:
    """The events must describe this video: same frame count, frame rate and (if given) size."""
    where = f"events file {events.get('path', '')} does not fit the video:"
    if events["frames"] != frames:
        raise CemdError(f"{where} it describes {events['frames']} frames, the video has {frames} "
                        f"({events['frames'] / events['fps']:.1f} s vs {frames / fps:.1f} s); is it the right file?")
    if fps and abs(events["fps"] - fps) > 0.01 * fps:
        raise CemdError(f"{where} it is at {events['fps']:g} fps, the video at {fps:g} fps")
    w, h = events.get("width"), events.get("height")
    if width and height and w and h and (w, h) != (width, height):
        raise CemdError(f"{where} it is for {w}x{h} frames, the video's are {width}x{height}")


def lesion_mask(events: dict[str, Any], frames: int) -> np.ndarray:
    """True on frames inside any lesion interval."""
    mask = np.zeros(frames, bool)
    for les in events["lesions"]:
        mask[les["start_frame"]: les["end_frame"] + 1] = True
    return mask


def truth_modality(events: dict[str, Any], routed: np.ndarray) -> np.ndarray:
    """The modality on screen per frame: the events' segments, else the branch that scored it."""
    out = np.asarray(routed).astype("<U3").copy()
    for seg in events.get("modality") or []:
        out[seg["start_frame"]: seg["end_frame"] + 1] = seg["modality"]
    return out


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    d = np.diff(padded.astype(np.int8))
    return [(int(a), int(b)) for a, b in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1)]


def lesion_events(events: dict[str, Any], modality: np.ndarray) -> list[dict[str, Any]]:
    """Lesion events: runs of frames where a lesion is present and the modality shows it."""
    out = []
    for les in events["lesions"]:
        a, b = les["start_frame"], les["end_frame"]
        shown = np.isin(modality[a: b + 1], les["visible_in"])
        for ra, rb in _runs(shown):
            out.append({"lesion": les.get("id"), "kind": les.get("kind"), "start_frame": a + ra,
                        "end_frame": a + rb, "modality": str(modality[a + ra])})
    return sorted(out, key=lambda e: e["start_frame"])


def alert_intervals(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(start, end) frames and modality of each alert event, from the monitor's alert messages."""
    opened: dict[int, dict[str, Any]] = {}
    for a in alerts:
        if a["event"] == "start":
            opened[a["event_id"]] = {"event_id": a["event_id"], "start_frame": a["frame_id"], "end_frame": None,
                                     "modality": a["modality"], "peak_score": a["peak_score"]}
        elif a["event"] == "end" and a["event_id"] in opened:
            ev = opened[a["event_id"]]
            ev["end_frame"] = a["end_frame_id"] if a.get("end_frame_id") is not None else a["frame_id"]
            ev["peak_score"] = a["peak_score"]
    for ev in opened.values():
        if ev["end_frame"] is None:
            ev["end_frame"] = ev["start_frame"]
    return sorted(opened.values(), key=lambda e: e["start_frame"])


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def event_metrics(t_ms: np.ndarray, routed: np.ndarray, score: np.ndarray, alerts: list[dict[str, Any]],
                  events: dict[str, Any], fps: float) -> dict[str, Any]:
    """Event sensitivity, false alerts per hour, time to first alert, frame AUROC: per branch and overall."""
    n = len(score)
    t_ms = np.asarray(t_ms, np.float64)
    routed = np.asarray(routed).astype("<U3")
    shown = truth_modality(events, routed)
    in_lesion = lesion_mask(events, n)
    intervals = alert_intervals(alerts)
    alert_open = np.zeros(n, bool)
    for ev in intervals:
        alert_open[ev["start_frame"]: ev["end_frame"] + 1] = True
    lesions = lesion_events(events, shown)
    frame_s = 1.0 / fps
    for les in lesions:
        a, b = les["start_frame"], les["end_frame"]
        hits = np.nonzero(alert_open[a: b + 1])[0]
        les["detected"] = bool(len(hits))
        les["time_to_first_alert_ms"] = round(float(t_ms[a + hits[0]] - t_ms[a]), 1) if len(hits) else None
        les["duration_ms"] = round((b - a + 1) * frame_s * 1000, 1)
    for ev in intervals:
        ev["false"] = not in_lesion[ev["start_frame"]: ev["end_frame"] + 1].any()

    def block(mod: str | None) -> dict[str, Any]:
        les = [e for e in lesions if mod is None or e["modality"] == mod]
        scored = np.ones(n, bool) if mod is None else routed == mod
        free_h = float((scored & ~in_lesion).sum()) * frame_s / 3600
        false = [e for e in intervals if e["false"] and (mod is None or e["modality"] == mod)]
        tta = [e["time_to_first_alert_ms"] for e in les if e["detected"]]
        pos = np.zeros(n, bool)
        for e in les:
            pos[e["start_frame"]: e["end_frame"] + 1] = True
        neg = scored & ~in_lesion
        pos &= scored
        auc = auroc(np.r_[np.ones(pos.sum()), np.zeros(neg.sum())], np.r_[score[pos], score[neg]]) \
            if pos.any() and neg.any() else None
        return {
            "lesion_events": len(les), "detected": sum(e["detected"] for e in les),
            "event_sensitivity": round(sum(e["detected"] for e in les) / len(les), 4) if les else None,
            "lesion_free_minutes": round(free_h * 60, 3), "false_alerts": len(false),
            "false_alerts_per_hour": round(len(false) / free_h, 2) if free_h > 0 else None,
            "median_time_to_first_alert_ms": _pct(tta, 50), "p90_time_to_first_alert_ms": _pct(tta, 90),
            "frame_auroc": round(auc, 4) if auc is not None else None,
            "frames": int(scored.sum()), "alert_events": sum(1 for e in intervals if mod is None or e["modality"] == mod),
        }

    return {"overall": block(None), "per_modality": {m: block(m) for m in MODALITIES if (routed == m).any()},
            "lesion_events": lesions, "alert_events": intervals,
            "definitions": "docs/CALIBRATION.md#what-evaluate-video-reports"}
