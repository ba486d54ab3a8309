"""How well the overlay's lesion box follows the lesion: IoU against ground-truth boxes and marker lag.

    python -m bench.overlay_track [synthetic] [--seed 4] [--seconds 60] [--json runs/overlay_track_synthetic.json]
    python -m bench.overlay_track real --real-images ../shared/real/kvasir-dev/full/test/images \\
        --masks ../shared/real/kvasir-dev/full/test/masks --bundle runs/overlay-track/kvasir-bundle [--train-bundle]

Targets (the issue): median IoU ≥ 0.5 while the lesion is detected, marker lag p90 ≤ 120 ms,
on a video paced at 30 fps with the camera moving.

Both modes run the monitor on a file paced at its frame rate (``run_stream.py --realtime``)
with the overlay writing an annotated video and its draw log (``--overlay file
--overlay-draw-log``; one line per frame shown: the frame, the scored frame whose result is
drawn on it and the box drawn, in source pixels), then compare each shown frame's box with the
ground-truth boxes *of that same frame*:

* ``synthetic`` (default): a SYNTHETIC examination (`cemd synth-video --boxes-out`; the camera
  moves) with the simulator's exact per-frame lesion boxes. The default seed (4) has seven
  lesion intervals in 60 s at 640x480: five spent mostly in a modality in which the lesion is
  visible, one visible for 6 frames only and one not at all (it is in NBI, visible in WLI only).
  Every number from this mode is on synthetic video.
* ``real``: a slideshow of real images (`cemd slideshow`, 1 s each at 30 fps, letterboxed into the
  video size); each slide's ground truth is the box of each connected polyp region of its mask
  of at least ``--min-area`` of the image (``--gt-box components``, the default; smaller specks
  are dropped, and a mask with none that large keeps its largest region), or one box around all
  polyp pixels (``--gt-box whole``), mapped through the same letterbox into video pixels. The cut
  between two slides is the "camera motion" here: the lesion jumps. Real images and anything
  made from them go under ``runs/`` only (never the repository). The bundle is trained first:
  ``--train-bundle`` runs ``cemd train --data ../shared/real/kvasir-dev --out
  runs/overlay-track/kvasir-bundle`` (the defaults; several minutes on 2 CPU cores) when it does
  not exist. Such a bundle is not calibrated (there is no normal real video): the monitor uses
  the training run's highest normal validation score as its threshold and says so.

Per frame shown (frames the display missed are not in its log and count nowhere):

* **detected**: the frame has a ground-truth box and a box is drawn on it (the AI active);
* **IoU**: the drawn box against the frame's best-matching ground-truth box;
* **marker lag** of a drawn box: ``(frame_id − result_frame_id) / fps`` in ms, how old the drawn
  location is. It is negative when the display fell behind and drew a newer result on an older
  frame; such frames are counted (``negative``) and kept in the percentiles;
* **stale/misplaced markers**: the share of drawn boxes whose IoU with the frame's ground truth is
  below 0.1 (IoU 0 on a frame with no lesion), and the same over lesion frames only;
* **false boxes**: boxes drawn on frames with no ground-truth box (also counted: those within 1 s
  of a lesion interval, where the lesion is still partly in view but under the presence rule's half).

For comparison, in the same run: the IoU the drawn box has against the ground truth of *its
result frame* (what the box would score with zero lag: the cost of the lag is the difference),
and the IoU of a **peak-frame marker** (the behaviour before the fix: show the open event's
peak-frame location, the ``location`` of the event's latest alert message in ``alerts.jsonl``
at or before the drawn result frame) against each frame's ground truth. The old overlay drew
``score.location or event.location``, and the monitor then set a score location only on frames
above the threshold, so the old display sat between the two; the peak-frame marker is its
worst case. ``offset`` tells which way the drawn box misses: the median of (drawn centre − true
centre) in pixels, its component along the lesion's own motion on screen (``along_motion_px``:
negative = the box trails behind the lesion), the drawn/true width and height ratios, and the
share of the drawn box inside the true one (1 with a low IoU = on the lesion but too small), and
the drawn box's share of the frame. A chance-level reference rides along: the IoU of a fixed box
over the middle half of the frame on the same frames (a marker worse than it does not localise).

The analysis is plain functions of the logs (``parse_draws``, ``parse_boxes``, ``iou``,
``summarise``, …), tested in tests/test_overlay_track.py without running the monitor;
``--reanalyse`` recomputes the figures from a finished run folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from engine.data.slideshow import letterbox_geometry

REPO = Path(__file__).resolve().parent.parent

DEFAULT_SEED = 4  # 60 s at 640x480: seven lesion intervals, five mostly in a modality that shows them
TARGET_IOU_P50 = 0.5  # median IoU while detected
TARGET_LAG_P90_MS = 120.0
STALE_IOU = 0.1  # a drawn box this far off its lesion is stale or misplaced
MAX_ROWS = 25  # lesion intervals printed (all are in the JSON)
DEFAULT_REAL_DATA = REPO.parent / "shared" / "real" / "kvasir-dev"
DEFAULT_REAL_BUNDLE = REPO / "runs" / "overlay-track" / "kvasir-bundle"

Box = list[int]  # [x, y, w, h], source pixels, top-left, the box covers [x, x + w) × [y, y + h)


# ----------------------------------------------------------------------------- parsing


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file; a last line cut short (a writer killed mid-line) is dropped."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows


def _box(value: Any, where: str) -> Box | None:
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: a box must be [x, y, w, h], got {value!r}")
    return [int(round(v)) for v in value]


def parse_draws(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The overlay draw log (``--overlay-draw-log``) by frame id: ``{"result_frame_id", "box", "event_id",
    "active"}``. ``box`` is what was drawn: None when none was, or when the AI was not active (the
    overlay draws no box then). A frame logged twice keeps its last line."""
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        fid = int(row["frame_id"])
        active = bool(row.get("active", True))
        rid = row.get("result_frame_id")
        box = _box(row.get("box"), f"draw log frame {fid}")
        out[fid] = {"result_frame_id": None if rid is None else int(rid), "box": box if active else None,
                    "event_id": row.get("event_id"), "active": active}
    return out


def parse_boxes(rows: Iterable[dict[str, Any]]) -> dict[int, list[tuple[int, Box]]]:
    """Ground-truth boxes (`cemd synth-video --boxes-out`, docs/DATA.md) by frame id: ``[(lesion id, box), …]``;
    frames with none are left out."""
    out: dict[int, list[tuple[int, Box]]] = {}
    for row in rows:
        fid = int(row["frame_id"])
        boxes, ids = row.get("boxes") or [], row.get("ids") or []
        if len(boxes) != len(ids):
            raise ValueError(f"boxes file frame {fid}: {len(boxes)} boxes but {len(ids)} ids")
        pairs = [(int(i), box) for i, raw in zip(ids, boxes) if (box := _box(raw, f"boxes file frame {fid}")) is not None]
        if pairs:
            out.setdefault(fid, []).extend(pairs)
    return out


def intervals_from_boxes(gt: dict[int, list[tuple[int, Box]]]) -> list[dict[str, Any]]:
    """Each lesion's maximal runs of consecutive frames with a box: ``{"id", "start_frame", "end_frame"}``
    (inclusive), sorted by start."""
    frames_of: dict[int, list[int]] = {}
    for fid, pairs in gt.items():
        for lid in {lid for lid, _ in pairs}:
            frames_of.setdefault(lid, []).append(fid)
    out = []
    for lid, frames in frames_of.items():
        frames.sort()
        start = prev = frames[0]
        for f in frames[1:] + [None]:
            if f is None or f != prev + 1:
                out.append({"id": lid, "start_frame": start, "end_frame": prev})
                if f is not None:
                    start = f
            if f is not None:
                prev = f
    return sorted(out, key=lambda r: (r["start_frame"], r["id"]))


def modality_lookup(events: dict[str, Any] | None) -> Callable[[int], str | None]:
    """frame id → "wli"/"nbi" from the events' modality intervals (None outside them or without events)."""
    spans = [(int(m["start_frame"]), int(m["end_frame"]), str(m["modality"])) for m in (events or {}).get("modality", [])]

    def of(fid: int) -> str | None:
        for a, b, m in spans:
            if a <= fid <= b:
                return m
        return None
    return of


def peak_marker_boxes(alerts: Iterable[dict[str, Any]], draws: dict[int, dict[str, Any]]) -> dict[int, Box]:
    """The peak-frame marker (the overlay before the fix) of each shown frame drawn during an event:
    the ``location.box`` of that event's latest alert message (start/update) at or before the drawn
    result frame: the event's peak-frame location as the display knew it then."""
    by_event: dict[Any, list[tuple[int, Box]]] = {}
    for a in alerts:
        if a.get("topic", "alert") != "alert" or a.get("event") not in ("start", "update"):
            continue
        box = _box((a.get("location") or {}).get("box"), f"alert of event {a.get('event_id')}")
        if box is not None and a.get("frame_id") is not None:
            by_event.setdefault(a.get("event_id"), []).append((int(a["frame_id"]), box))
    for msgs in by_event.values():
        msgs.sort(key=lambda m: m[0])
    out: dict[int, Box] = {}
    for fid, d in draws.items():
        msgs = by_event.get(d["event_id"]) if d["event_id"] is not None else None
        if not msgs or d["result_frame_id"] is None or not d["active"]:
            continue
        known = [box for f, box in msgs if f <= d["result_frame_id"]]
        if known:
            out[fid] = known[-1]
    return out


# ----------------------------------------------------------------------------- geometry


def iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Intersection over union of two ``[x, y, w, h]`` boxes (0 when either is missing or empty)."""
    if a is None or b is None:
        return 0.0
    ax, ay, aw, ah = (float(v) for v in a)
    bx, by, bw, bh = (float(v) for v in b)
    if aw <= 0 or ah <= 0 or bw <= 0 or bh <= 0:
        return 0.0
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def inside(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """The share of box ``a``'s area that lies inside box ``b`` (1 = ``a`` wholly within ``b``)."""
    if a is None or b is None or a[2] <= 0 or a[3] <= 0:
        return 0.0
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, iw) * max(0.0, ih) / (float(a[2]) * float(a[3]))


def best_match(box: Box | None, truth: Sequence[tuple[int, Box]]) -> tuple[float, int | None, Box | None]:
    """The ground-truth box ``box`` overlaps most: (IoU, lesion id, its box); (0, None, None) with none."""
    best: tuple[float, int | None, Box | None] = (0.0, None, None)
    for lid, gt in truth:
        v = iou(box, gt)
        if best[1] is None or v > best[0]:
            best = (v, lid, gt)
    return best


def lag_ms(frame_id: int, result_frame_id: int, fps: float) -> float:
    """How old the drawn result is when drawn on ``frame_id``, in ms of video time."""
    return (frame_id - result_frame_id) * 1000.0 / fps


def _centre(b: Box) -> tuple[float, float]:
    return b[0] + b[2] / 2.0, b[1] + b[3] / 2.0


def stats(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, p10, p50, p90, max (None when empty), rounded for the report."""
    if not len(values):
        return {"n": 0, "mean": None, "min": None, "p10": None, "p50": None, "p90": None, "max": None}
    v = np.asarray(values, np.float64)
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4),
            "p10": round(float(p10), 4), "p50": round(float(p50), 4), "p90": round(float(p90), 4),
            "max": round(float(v.max()), 4)}


def _share(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


# ----------------------------------------------------------------------------- summary


def summarise(draws: dict[int, dict[str, Any]], gt: dict[int, list[tuple[int, Box]]], fps: float,
              intervals: list[dict[str, Any]] | None = None, modality_of: Callable[[int], str | None] | None = None,
              peak_boxes: dict[int, Box] | None = None, frame_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Every figure of the benchmark from the parsed logs (see the module docstring).

    ``intervals``: the lesion intervals (the events' ``lesions``: id, start_frame, end_frame, and
    optionally kind and visible_in); default ``intervals_from_boxes(gt)``. ``modality_of``: frame →
    modality, to count the frames on which a lesion is visible in the modality shown (with
    ``visible_in``). ``peak_boxes``: ``peak_marker_boxes`` for the before/after comparison.
    ``frame_size`` (W, H): also the drawn boxes' share of the frame and a chance-level reference, a
    fixed box over the middle half of the frame (``iou_centre_box``) on the same frames.
    """
    intervals = intervals if intervals is not None else intervals_from_boxes(gt)
    peak_boxes = peak_boxes or {}
    visible_in = {iv["id"]: iv.get("visible_in") for iv in intervals}

    def visible(fid: int, lid: int) -> bool | None:
        vis = visible_in.get(lid)
        mod = modality_of(fid) if modality_of else None
        return None if vis is None or mod is None else mod in vis

    shown = sorted(draws)
    iou_now, iou_result, iou_peak, iou_now_where_peak = [], [], [], []
    lags, result_lags = [], []
    drawn = stale = lesion_frames = lesion_drawn = stale_on_lesion = false_boxes = clear_frames = 0
    vis_frames = vis_detected = near_lesion = 0
    near = int(round(fps))  # false boxes within a second of a lesion interval: the lesion mostly out of view
    dx, dy, along, w_ratio, h_ratio, within, area_share, iou_centre = [], [], [], [], [], [], [], []
    centre = [frame_size[0] // 4, frame_size[1] // 4, frame_size[0] // 2, frame_size[1] // 2] if frame_size else None
    for fid in shown:
        d = draws[fid]
        box, rid = d["box"], d["result_frame_id"]
        truth = gt.get(fid, [])
        if rid is not None and d["active"]:
            result_lags.append(lag_ms(fid, rid, fps))
        is_vis = any(visible(fid, lid) for lid, _ in truth)
        if truth:
            lesion_frames += 1
            vis_frames += is_vis
        else:
            clear_frames += 1
        if box is None:
            continue
        drawn += 1
        if frame_size:
            area_share.append(box[2] * box[3] / float(frame_size[0] * frame_size[1]))
        if rid is not None:
            lags.append(lag_ms(fid, rid, fps))
        v, lid, gbox = best_match(box, truth)
        stale += v < STALE_IOU
        if not truth:
            false_boxes += 1
            near_lesion += any(iv["start_frame"] - near <= fid <= iv["end_frame"] + near for iv in intervals)
            continue
        lesion_drawn += 1
        vis_detected += is_vis
        stale_on_lesion += v < STALE_IOU
        iou_now.append(v)
        if centre is not None:
            iou_centre.append(best_match(centre, truth)[0])
        iou_result.append(best_match(box, gt.get(rid, []))[0] if rid is not None else 0.0)
        if fid in peak_boxes:
            iou_peak.append(best_match(peak_boxes[fid], truth)[0])
            iou_now_where_peak.append(v)
        assert gbox is not None
        (cx, cy), (gx, gy) = _centre(box), _centre(gbox)
        dx.append(cx - gx)
        dy.append(cy - gy)
        w_ratio.append(box[2] / max(gbox[2], 1))
        h_ratio.append(box[3] / max(gbox[3], 1))
        within.append(inside(box, gbox))
        prev = best_match(gbox, [(i, b) for i, b in gt.get(fid - 1, []) if i == lid])[2]
        if prev is not None:  # the lesion's own motion on screen since the previous frame
            px, py = _centre(prev)
            mx, my = gx - px, gy - py
            norm = math.hypot(mx, my)
            if norm >= 0.5:
                along.append(((cx - gx) * mx + (cy - gy) * my) / norm)

    per_lesion = [_interval_summary(iv, draws, gt, fps, visible) for iv in intervals]
    negative = sum(1 for v in lags if v < 0)
    return {
        "fps": fps,
        "frames_shown": len(shown),
        "frames_shown_with_lesion": lesion_frames,
        "frames_shown_with_visible_lesion": vis_frames if modality_of else None,
        "frames_shown_without_lesion": clear_frames,
        "boxes_drawn": drawn,
        "detected_frames": lesion_drawn,
        "detected_fraction": _share(lesion_drawn, lesion_frames),
        "detected_fraction_visible": _share(vis_detected, vis_frames) if modality_of else None,
        "iou": stats(iou_now),
        "iou_vs_result_frame": stats(iou_result),
        "iou_peak_marker": stats(iou_peak),
        "iou_same_frames_as_peak_marker": stats(iou_now_where_peak),
        "iou_centre_box": stats(iou_centre),
        "box_area_share_of_frame": stats(area_share),
        "lag_ms": {**stats(lags), "negative": negative},
        "result_age_ms_all_active_frames": stats(result_lags),
        "stale_share": _share(stale, drawn),
        "stale_share_on_lesion_frames": _share(stale_on_lesion, lesion_drawn),
        "false_boxes": false_boxes,
        "false_box_fraction_of_clear_frames": _share(false_boxes, clear_frames),
        "false_boxes_within_1s_of_a_lesion": near_lesion,
        "offset": {"dx_px": stats(dx)["p50"], "dy_px": stats(dy)["p50"], "along_motion_px": stats(along),
                   "width_ratio": stats(w_ratio)["p50"], "height_ratio": stats(h_ratio)["p50"],
                   "share_of_box_inside_truth": stats(within)},
        "intervals_with_a_box": sum(1 for p in per_lesion if p["detected_frames"]),
        "intervals": len(per_lesion),
        "per_lesion": per_lesion,
    }


def _interval_summary(iv: dict[str, Any], draws: dict[int, dict[str, Any]], gt: dict[int, list[tuple[int, Box]]],
                      fps: float, visible: Callable[[int, int], bool | None]) -> dict[str, Any]:
    lid, a, b = iv["id"], int(iv["start_frame"]), int(iv["end_frame"])
    shown = detected = vis = vis_detected = 0
    known = False  # whether visibility is known (visible_in and the modality of the frames)
    ious, first, w_ratio, h_ratio, within = [], None, [], [], []
    for fid in range(a, b + 1):
        d = draws.get(fid)
        own = [(i, box) for i, box in gt.get(fid, []) if i == lid]
        if d is None or not own:
            continue
        shown += 1
        is_vis = visible(fid, lid)
        known = known or is_vis is not None
        vis += bool(is_vis)
        if d["box"] is None:
            continue
        detected += 1
        vis_detected += bool(is_vis)
        v, _, gbox = best_match(d["box"], own)
        assert gbox is not None
        ious.append(v)
        w_ratio.append(d["box"][2] / max(gbox[2], 1))
        h_ratio.append(d["box"][3] / max(gbox[3], 1))
        within.append(inside(d["box"], gbox))
        first = fid if first is None else first
    out = {k: iv[k] for k in ("id", "kind", "visible_in") if k in iv}
    out.update({
        "start_frame": a, "end_frame": b, "frames": b - a + 1, "frames_shown": shown,
        "frames_visible": vis if known else None,
        "detected_frames": detected, "detected_fraction": _share(detected, shown),
        "detected_fraction_visible": _share(vis_detected, vis) if known else None,
        "iou_p50": stats(ious)["p50"], "width_ratio_p50": stats(w_ratio)["p50"],
        "height_ratio_p50": stats(h_ratio)["p50"], "inside_truth_p50": stats(within)["p50"],
        "first_box_after_ms": round((first - a) * 1000.0 / fps, 1) if first is not None else None,
    })
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against a summary: median IoU while detected, and marker lag p90."""
    iou_p50, lag_p90 = summary["iou"]["p50"], summary["lag_ms"]["p90"]
    return {
        "iou_p50": {"target": f">= {TARGET_IOU_P50}", "value": iou_p50,
                    "met": iou_p50 is not None and iou_p50 >= TARGET_IOU_P50},
        "lag_p90_ms": {"target": f"<= {TARGET_LAG_P90_MS:g}", "value": lag_p90,
                       "met": lag_p90 is not None and lag_p90 <= TARGET_LAG_P90_MS},
    }


def analyse(run_dir: Path, gt_rows: list[dict[str, Any]], fps: float, events: dict[str, Any] | None) -> dict[str, Any]:
    """``summarise`` over a finished run folder (draws.jsonl, alerts.jsonl) and the ground truth."""
    draws = parse_draws(read_jsonl(run_dir / "draws.jsonl"))
    gt = parse_boxes(gt_rows)
    alerts_path = run_dir / "alerts.jsonl"
    alerts = read_jsonl(alerts_path) if alerts_path.is_file() else []
    intervals = None
    if events and events.get("lesions"):
        intervals = [{k: les[k] for k in ("id", "start_frame", "end_frame", "kind", "visible_in") if k in les}
                     for les in events["lesions"]]
    modality_of = modality_lookup(events) if events and events.get("modality") else None
    size = (int(events["width"]), int(events["height"])) if events and events.get("width") else None
    return summarise(draws, gt, fps, intervals, modality_of, peak_marker_boxes(alerts, draws), size)


# ----------------------------------------------------------------------------- report


def _f(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    s, label = result["summary"], result["label"]
    run = result.get("run", {})
    lines = [f"**{label}** — {result['what']}; bundle {run.get('bundle')}, backend {run.get('backend')}, "
             f"{s['frames_shown']} frames shown, paced {s['fps']:g} fps",
             "",
             "| box | IoU p10 | IoU p50 | IoU p90 | IoU mean | share IoU < 0.1 | n |",
             "|---|---|---|---|---|---|---|"]

    def row(name: str, st: dict[str, Any], low: float | None) -> str:
        return (f"| {name} | {_f(st['p10'])} | {_f(st['p50'])} | {_f(st['p90'])} | {_f(st['mean'])} | "
                f"{_f(low)} | {st['n']} |")

    def low_share(vals_key: str) -> float | None:
        return result.get("low_iou_shares", {}).get(vals_key)

    lines.append(row("drawn box vs the frame's truth (now)", s["iou"], s["stale_share_on_lesion_frames"]))
    lines.append(row("drawn box vs its result frame's truth (zero lag)", s["iou_vs_result_frame"],
                     low_share("iou_vs_result_frame")))
    lines.append(row("peak-frame marker vs the frame's truth (before the fix)", s["iou_peak_marker"],
                     low_share("iou_peak_marker")))
    if s.get("iou_centre_box", {}).get("n"):
        lines.append(row("reference: a fixed box over the middle half of the frame", s["iou_centre_box"],
                         low_share("iou_centre_box")))
    lag = s["lag_ms"]
    off = s["offset"]
    lines += [
        "",
        f"- detected: {s['detected_frames']} of {s['frames_shown_with_lesion']} lesion frames shown "
        f"({_f(s['detected_fraction'])})" + (f"; {_f(s['detected_fraction_visible'])} of those where the lesion is "
                                             f"visible in the modality shown" if s["detected_fraction_visible"]
                                             is not None else "")
        + f"; {s['intervals_with_a_box']} of {s['intervals']} lesion intervals got a box",
        f"- marker lag (ms): p50 {_f(lag['p50'], 1)}, p90 {_f(lag['p90'], 1)}, max {_f(lag['max'], 1)} "
        f"over {lag['n']} drawn boxes ({lag['negative']} negative: the display behind the scorer)",
        f"- stale/misplaced boxes (IoU < {STALE_IOU}): {_f(s['stale_share'])} of all drawn boxes, "
        f"{_f(s['stale_share_on_lesion_frames'])} of those on lesion frames; false boxes (no lesion in the frame): "
        f"{s['false_boxes']} ({_f(s['false_box_fraction_of_clear_frames'], 3)} of {s['frames_shown_without_lesion']} "
        f"lesion-free frames; {s['false_boxes_within_1s_of_a_lesion']} of them within 1 s of a lesion interval, where "
        f"less than half the lesion is in view)",
        f"- offset of the drawn box (median drawn − true centre): dx {_f(off['dx_px'], 1)} px, dy "
        f"{_f(off['dy_px'], 1)} px; along the lesion's motion p50 {_f(off['along_motion_px']['p50'], 1)} px "
        f"(negative = trailing); width × {_f(off['width_ratio'])}, height × {_f(off['height_ratio'])}; share of "
        f"the drawn box inside the true one p50 {_f(off['share_of_box_inside_truth']['p50'])}"
        + (f"; drawn box area / frame area p10 {_f(s['box_area_share_of_frame']['p10'])}, p50 "
           f"{_f(s['box_area_share_of_frame']['p50'])}, p90 {_f(s['box_area_share_of_frame']['p90'])}"
           if s.get("box_area_share_of_frame", {}).get("n") else ""),
        "",
        "| lesion | kind | frames | visible in | shown | detected (share of shown) | detected where visible | IoU p50 | "
        "drawn/true width, height | drawn box inside truth | first box after ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in s["per_lesion"][:MAX_ROWS]:
        lines.append(f"| {p['id']} | {p.get('kind', '–')} | {p['start_frame']}–{p['end_frame']} | "
                     f"{','.join(p.get('visible_in') or []) or '–'} | {p['frames_shown']} | {_f(p['detected_fraction'])} | "
                     f"{_f(p['detected_fraction_visible'])} | {_f(p['iou_p50'])} | {_f(p['width_ratio_p50'])}, "
                     f"{_f(p['height_ratio_p50'])} | {_f(p['inside_truth_p50'])} | {_f(p['first_box_after_ms'], 0)} |")
    if len(s["per_lesion"]) > MAX_ROWS:
        lines.append(f"| … {len(s['per_lesion']) - MAX_ROWS} more in the JSON | | | | | | | | | | |")
    t = result["targets"]
    lines += ["",
              f"Targets ({label}): median IoU while detected {t['iou_p50']['target']}: {_f(t['iou_p50']['value'])} — "
              f"{'MET' if t['iou_p50']['met'] else 'NOT MET'}; marker lag p90 {t['lag_p90_ms']['target']} ms: "
              f"{_f(t['lag_p90_ms']['value'], 1)} — {'MET' if t['lag_p90_ms']['met'] else 'NOT MET'}"]
    return "\n".join(lines)


def _low_iou_shares(run_dir: Path, gt_rows: list[dict[str, Any]], fps: float,
                    events: dict[str, Any] | None) -> dict[str, float | None]:
    """Share of IoU < STALE_IOU for the two comparison boxes (result-frame truth, peak-frame marker)."""
    draws = parse_draws(read_jsonl(run_dir / "draws.jsonl"))
    gt = parse_boxes(gt_rows)
    alerts = read_jsonl(run_dir / "alerts.jsonl") if (run_dir / "alerts.jsonl").is_file() else []
    peaks = peak_marker_boxes(alerts, draws)
    size = (int(events["width"]), int(events["height"])) if events and events.get("width") else None
    centre = [size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2] if size else None
    res, peak, cen = [], [], []
    for fid, d in draws.items():
        truth = gt.get(fid, [])
        if d["box"] is None or not truth:
            continue
        rid = d["result_frame_id"]
        res.append(best_match(d["box"], gt.get(rid, []))[0] if rid is not None else 0.0)
        if fid in peaks:
            peak.append(best_match(peaks[fid], truth)[0])
        if centre is not None:
            cen.append(best_match(centre, truth)[0])
    return {"iou_vs_result_frame": _share(sum(v < STALE_IOU for v in res), len(res)),
            "iou_peak_marker": _share(sum(v < STALE_IOU for v in peak), len(peak)),
            "iou_centre_box": _share(sum(v < STALE_IOU for v in cen), len(cen))}


# ----------------------------------------------------------------------------- running the monitor


def default_backend() -> str:
    """onnxruntime when installed (starts in seconds, no compile), else eager."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "eager"
    return "onnxruntime"


def run_monitor(video: Path, run_dir: Path, bundle: Path, backend: str, modality: str = "auto",
                sensitivity: float | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """The monitor on ``video`` paced at its frame rate with the overlay writing ``overlay.mp4`` and
    ``draws.jsonl`` into ``run_dir``; its summary.json."""
    from tests.helpers.streams import free_port_pair

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("draws.jsonl", "alerts.jsonl", "summary.json", "display.json"):
        (run_dir / name).unlink(missing_ok=True)
    port = free_port_pair()
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--source", str(video), "--realtime",
           "--overlay", "file", "--overlay-out", str(run_dir / "overlay.mp4"),
           "--overlay-draw-log", str(run_dir / "draws.jsonl"), "--run-dir", str(run_dir), "--dashboard", "off",
           "--publish", f"tcp://127.0.0.1:{port}", "--bundle", str(bundle), "--backend", backend,
           "--modality", modality]
    if sensitivity is not None:
        cmd += ["--sensitivity", str(sensitivity)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(run_dir / "monitor.log", "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the monitor ran past {timeout_s:.0f} s; see {run_dir / 'monitor.log'}") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not (run_dir / "draws.jsonl").is_file():
        tail = (run_dir / "monitor.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"the monitor failed (exit {proc.returncode}); {run_dir / 'monitor.log'} ends:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    (run_dir / "monitor.command.json").write_text(json.dumps({"command": " ".join(cmd), "wall_s": round(wall, 1)}) + "\n",
                                                  encoding="utf-8")
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "summary": summary}


def _run_info(mon: dict[str, Any] | None, run_dir: Path, bundle: Path, backend: str) -> dict[str, Any]:
    summary = mon["summary"] if mon else (json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
                                          if (run_dir / "summary.json").is_file() else {})
    display = summary.get("display") or {}
    if mon is None and (run_dir / "monitor.command.json").is_file():  # --reanalyse: what run_monitor recorded
        mon = {**json.loads((run_dir / "monitor.command.json").read_text(encoding="utf-8")), "summary": summary}
    return {
        "run_dir": str(run_dir), "bundle": str(bundle), "backend_requested": backend,
        "backend": ", ".join(f"{k.upper()} {v}" for k, v in (summary.get("backend") or {}).items()) or backend,
        "device": summary.get("device"), "thresholds": summary.get("thresholds"),
        "frames_read": summary.get("frames_read"), "frames_scored": summary.get("frames_scored"),
        "frames_dropped": summary.get("frames_dropped"), "display_frames_shown": display.get("frames_shown"),
        "display_frames_missed": display.get("frames_missed"), "end_to_end_ms": (summary.get("latency_ms") or {}).get(
            "end_to_end"), "display_latency_ms": display.get("display_latency_ms"),
        "events": summary.get("events"), "warnings": summary.get("warnings"),
        "command": mon["command"] if mon else None, "wall_s": mon["wall_s"] if mon else None,
    }


def _finish(result: dict[str, Any], out_dir: Path, json_out: Path | None) -> dict[str, Any]:
    from bench.provenance import provenance

    result["provenance"] = provenance()
    text = json.dumps(result, indent=2) + "\n"
    (out_dir / "overlay_track.json").write_text(text, encoding="utf-8")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text, encoding="utf-8")
    print(markdown(result), flush=True)
    return result


# ----------------------------------------------------------------------------- synthetic


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    from engine.synth.video import parse_size, render_video

    size = parse_size(args.size)
    out = args.out or REPO / "runs" / "overlay-track" / f"synthetic-seed{args.seed}-{args.seconds:g}s-{size[0]}x{size[1]}"
    out.mkdir(parents=True, exist_ok=True)
    video, events_path, boxes_path = out / "video.mp4", out / "video.events.json", out / "video.boxes.jsonl"
    run_dir = out / "run"
    bundle = args.bundle or REPO / "models" / "demo"
    backend = args.backend or default_backend()
    mon = None
    if not args.reanalyse:
        if not (video.is_file() and events_path.is_file() and boxes_path.is_file()):
            print(f"rendering {video} (SYNTHETIC, seed {args.seed}, {args.seconds:g} s, {size[0]}x{size[1]} "
                  f"at {args.fps:g} fps) …", flush=True)
            render_video(video, args.seed, args.seconds, args.fps, size, events_path, progress=False,
                         boxes_out=boxes_path)
        print(f"running the monitor paced ({bundle}, {backend}) …", flush=True)
        mon = run_monitor(video, run_dir, bundle, backend, args.modality, args.sensitivity,
                          timeout_s=args.seconds * 3 + 180)
    events = json.loads(events_path.read_text(encoding="utf-8"))
    gt_rows = read_jsonl(boxes_path)
    fps = float(events["fps"])
    summary = analyse(run_dir, gt_rows, fps, events)
    result = {
        "label": "SYNTHETIC", "mode": "synthetic",
        "what": f"synthetic examination, seed {args.seed}, {args.seconds:g} s {size[0]}x{size[1]} at {fps:g} fps, "
                f"moving camera, simulator ground-truth boxes",
        "video": {"path": str(video), "seed": args.seed, "seconds": args.seconds, "size": list(size), "fps": fps,
                  "frames": events["frames"], "lesions": events["lesions"]},
        "run": _run_info(mon, run_dir, bundle, backend),
        "summary": summary, "targets": targets(summary),
        "low_iou_shares": _low_iou_shares(run_dir, gt_rows, fps, events),
        "command": "python -m bench.overlay_track " + " ".join(args.argv),
    }
    return _finish(result, out, args.json)


# ----------------------------------------------------------------------------- real (slideshow)


def map_box(box: Box, src: tuple[int, int], frame: tuple[int, int]) -> Box:
    """A ``[x, y, w, h]`` box in the pixels of a ``src`` (W, H) image → video pixels, through the
    slideshow's letterbox into ``frame`` (W, H) (outward to whole pixels, clipped to the frame)."""
    nw, nh, x0, y0 = letterbox_geometry(src, frame)
    sx, sy = nw / src[0], nh / src[1]
    fw, fh = frame
    a, b = math.floor(x0 + box[0] * sx + 1e-9), math.floor(y0 + box[1] * sy + 1e-9)
    c, d = math.ceil(x0 + (box[0] + box[2]) * sx - 1e-9), math.ceil(y0 + (box[1] + box[3]) * sy - 1e-9)
    a, b, c, d = max(0, a), max(0, b), min(fw, c), min(fh, d)
    return [a, b, c - a, d - b]


def mask_boxes(mask: np.ndarray, mode: str = "components", min_area: float = 0.005) -> list[Box]:
    """Ground-truth boxes of a polyp mask (> 127 = polyp): one per 8-connected region of at least
    ``min_area`` × the mask's pixels (``components``; if none is that large, the largest region), or
    one around all polyp pixels (``whole``); [] for an empty mask."""
    import cv2

    fg = (np.asarray(mask) > 127).astype(np.uint8)
    if not fg.any():
        return []
    if mode == "whole":
        ys, xs = np.nonzero(fg)
        return [[int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]]
    if mode != "components":
        raise ValueError(f"mode must be components or whole, got {mode!r}")
    n, _, st, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    regions = [st[i] for i in range(1, n)]
    keep = [r for r in regions if r[cv2.CC_STAT_AREA] >= min_area * fg.size] or [
        max(regions, key=lambda r: r[cv2.CC_STAT_AREA])]
    return [[int(r[cv2.CC_STAT_LEFT]), int(r[cv2.CC_STAT_TOP]), int(r[cv2.CC_STAT_WIDTH]), int(r[cv2.CC_STAT_HEIGHT])]
            for r in keep]


def find_mask(image: Path, masks: Path) -> Path | None:
    for cand in (masks / image.name, masks / f"{image.stem}_mask.png", masks / f"{image.stem}.png"):
        if cand.is_file():
            return cand
    return None


def slideshow_truth(meta: dict[str, Any], masks: Path, mode: str = "components",
                    min_area: float = 0.005) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-frame ground-truth rows (the boxes-file format) and an events dict for a slideshow's
    ``.slides.json``: each slide's mask boxes, mapped into video pixels, on every frame of the slide
    (lesion id = slide index; one WLI interval per slide with a polyp)."""
    import cv2

    w, h = meta["size"]
    rows = [{"frame_id": i, "boxes": [], "ids": []} for i in range(int(meta["frames"]))]
    lesions = []
    for slide in meta["slides"]:
        image = Path(slide["image"])
        mpath = find_mask(image, masks)
        if mpath is None:
            raise FileNotFoundError(f"no mask for {image.name} in {masks}")
        mask = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE)
        img = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
        if mask is None or img is None:
            raise ValueError(f"cannot read {mpath if mask is None else image}")
        ih, iw = img.shape[:2]
        boxes = mask_boxes(mask, mode, min_area)
        if mask.shape[:2] != (ih, iw):  # a mask of another size than its image: to image pixels first
            mx, my = iw / mask.shape[1], ih / mask.shape[0]
            boxes = [map_box(b, (mx, my, 0, 0), (iw, ih)) for b in boxes]
        boxes = [b for b in (map_box(b, (iw, ih), (w, h)) for b in boxes) if b[2] > 0 and b[3] > 0]
        if not boxes:
            continue
        for f in range(slide["first_frame"], slide["last_frame"] + 1):
            rows[f] = {"frame_id": f, "boxes": [list(b) for b in boxes], "ids": [slide["index"]] * len(boxes)}
        lesions.append({"id": slide["index"], "start_frame": slide["first_frame"], "end_frame": slide["last_frame"],
                        "kind": "polyp", "visible_in": ["wli"], "image": image.name})
    events = {"fps": meta["fps"], "frames": meta["frames"], "width": w, "height": h, "synthetic": False,
              "lesions": lesions, "modality": [{"start_frame": 0, "end_frame": int(meta["frames"]) - 1,
                                                "modality": "wli"}]}
    return rows, events


def train_bundle(data: Path, out: Path) -> None:
    """`cemd train --data DATA --out OUT` with its defaults (as bench.real_eval's ``branch`` row)."""
    cmd = [sys.executable, "-m", "realtime.cli", "train", "--data", str(data), "--out", str(out), "--no-progress"]
    print(f"training {out} (defaults; several minutes on a CPU): {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    from engine.data.slideshow import write_slideshow
    from engine.synth.video import parse_size

    if args.real_images is None or args.masks is None:
        raise SystemExit("real mode needs --real-images DIR and --masks DIR")
    images, masks = Path(args.real_images).resolve(), Path(args.masks).resolve()
    out = (args.out or REPO / "runs" / "overlay-track" / "real").resolve()
    if REPO in out.parents and (REPO / "runs") not in out.parents:
        raise SystemExit(f"--out {out}: real images and anything made from them stay under runs/ (git-ignored)")
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle or DEFAULT_REAL_BUNDLE)
    if args.train_bundle and not (bundle / "bundle.json").is_file():
        train_bundle(Path(args.train_data), bundle)
    if not (bundle / "bundle.json").is_file():
        raise SystemExit(f"no bundle at {bundle}: train one with --train-bundle, or cemd train --data "
                         f"{DEFAULT_REAL_DATA} --out {bundle}")
    backend = args.backend or default_backend()
    size = parse_size(args.size) if args.size else None
    folder = images
    if args.limit:  # the first N images (by name), linked into the run folder
        folder = out / "images"
        folder.mkdir(exist_ok=True)
        for p in folder.iterdir():
            p.unlink()
        for p in sorted(q for q in images.iterdir() if q.is_file())[: args.limit]:
            (folder / p.name).symlink_to(p)
    video = out / "slideshow.mp4"
    run_dir = out / "run"
    mon = None
    if not args.reanalyse:
        print(f"writing the slideshow {video} …", flush=True)
        write_slideshow(folder, video, fps=args.fps, seconds_each=args.seconds_each, size=size, progress=False)
    meta = json.loads((out / "slideshow.slides.json").read_text(encoding="utf-8"))
    gt_rows, events = slideshow_truth(meta, masks, args.gt_box, args.min_area)
    with open(out / "slideshow.boxes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in gt_rows)
    if not args.reanalyse:
        print(f"running the monitor paced ({bundle}, {backend}, {meta['frames'] / meta['fps']:.0f} s) …", flush=True)
        mon = run_monitor(video, run_dir, bundle, backend, args.modality or "wli", args.sensitivity,
                          timeout_s=meta["frames"] / meta["fps"] * 3 + 180)
    summary = analyse(run_dir, gt_rows, float(meta["fps"]), events)
    result = {
        "label": "REAL (slideshow)", "mode": "real",
        "what": f"slideshow of {len(meta['slides'])} real images from {images} ({args.seconds_each:g} s each, "
                f"{meta['size'][0]}x{meta['size'][1]} at {meta['fps']:g} fps; each cut is a jump), "
                f"ground truth = {args.gt_box} mask boxes"
                + (f" (regions ≥ {args.min_area:.1%} of the image)" if args.gt_box == "components" else ""),
        "video": {"path": str(video), "images": str(images), "masks": str(masks), "slides": len(meta["slides"]),
                  "frames": meta["frames"], "fps": meta["fps"], "size": meta["size"], "gt_box": args.gt_box,
                  "min_area": args.min_area},
        "run": _run_info(mon, run_dir, bundle, backend),
        "summary": summary, "targets": targets(summary),
        "low_iou_shares": _low_iou_shares(run_dir, gt_rows, float(meta["fps"]), events),
        "command": "python -m bench.overlay_track " + " ".join(args.argv),
    }
    return _finish(result, out, args.json)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.overlay_track", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["synthetic", "real"], default="synthetic")
    ap.add_argument("--out", type=Path, help="work folder (video, run folder, overlay_track.json); default under "
                                             "runs/overlay-track/")
    ap.add_argument("--json", type=Path, help="also write the result JSON here")
    ap.add_argument("--bundle", type=Path, help="bundle (default: models/demo for synthetic, "
                                                "runs/overlay-track/kvasir-bundle for real)")
    ap.add_argument("--backend", help="the monitor's --backend (default onnxruntime when installed, else eager)")
    ap.add_argument("--modality", choices=["auto", "wli", "nbi"], help="the monitor's --modality (default: auto for "
                                                                       "synthetic, wli for real)")
    ap.add_argument("--sensitivity", type=float, help="the monitor's --sensitivity (default: the calibrated 1.0)")
    ap.add_argument("--reanalyse", action="store_true", help="only recompute the figures from the run folder in --out")
    ap.add_argument("--fps", type=float, default=30.0)
    syn = ap.add_argument_group("synthetic")
    syn.add_argument("--seed", type=int, default=DEFAULT_SEED)
    syn.add_argument("--seconds", type=float, default=60.0)
    syn.add_argument("--size", help="WxH (synthetic default 640x480; real default: the first image's size)")
    real = ap.add_argument_group("real")
    real.add_argument("--real-images", type=Path, help="folder of whole real images")
    real.add_argument("--masks", type=Path, help="their masks (X.png, X_mask.png), > 127 = polyp")
    real.add_argument("--seconds-each", type=float, default=1.0)
    real.add_argument("--gt-box", choices=["components", "whole"], default="components")
    real.add_argument("--min-area", type=float, default=0.005, help="components: the smallest region kept, as a "
                                                                    "fraction of the image")
    real.add_argument("--limit", type=int, help="only the first N images (by name)")
    real.add_argument("--train-bundle", action="store_true", help="train --bundle first when it does not exist "
                                                                  "(cemd train defaults on --train-data)")
    real.add_argument("--train-data", type=Path, default=DEFAULT_REAL_DATA)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.mode == "synthetic":
        args.modality = args.modality or "auto"
        args.size = args.size or "640x480"
        return run_synthetic(args)
    return run_real(args)


if __name__ == "__main__":
    main()
