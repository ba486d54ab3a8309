"""The benchmark helpers that docs/RESULTS.md numbers come from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_SIZE

from bench import overlay_track as ot
from bench.ablation import RESCORE, VARIANTS, markdown, rescored_bundle
from bench.provenance import provenance
from engine.data.slideshow import letterbox
from engine.deploy.bundle import load_bundle


def test_rescored_bundle_keeps_weights_and_changes_only_scoring(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = rescored_bundle(tiny_bundle, tmp_path / "all_scales", VARIANTS["all_scales"])
    a, b = load_bundle(tiny_bundle), load_bundle(copy)  # hashes still verify
    assert a.model.score_scales == (2,) and b.model.score_scales == (0, 1, 2)
    x = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        map_a, _ = a.branch("wli")(x)
        map_b, _ = b.branch("wli")(x)
    assert (map_b > map_a + 1e-6).any()  # more scales summed: a larger map somewhere
    assert all(base in VARIANTS and base not in RESCORE for base in RESCORE.values())


def test_ablation_markdown_has_visible_and_all_kind_columns() -> None:
    kind = {"image_auroc": 0.9, "pixel_auroc": 0.95}
    res = {"train_data": "a", "test_data": "b", "teacher_epochs": 1, "student_epochs": 1, "seed": 0,
           "provenance": provenance(),
           "variants": {"cemd": {"train_seconds": 3.0, "wli": {
               "image_auroc": 0.8, "pixel_auroc": 0.85, "per_kind": {"elevated_erythema": kind},
               "visible_kinds": {"image_auroc": 0.97, "pixel_auroc": 0.98}}}}}
    md = markdown(res)
    assert "| cemd | WLI | 0.970 | 0.980 | 0.800 | 0.850 | 0.900 / 0.950 |" in md


def test_time_calls_counts_every_call_and_latency_table_gives_ratio_to_eager() -> None:
    from bench.model_latency import markdown as latency_markdown
    from bench.timing import time_calls

    calls: list[int] = []
    stats = time_calls(lambda: calls.append(1), runs=7, warmup=3, sync=lambda: None)
    assert len(calls) == 10 and stats["runs"] == 7 and 0 <= stats["p50_ms"] <= stats["max_ms"]
    row = {"modality": "wli", "batch": 1, "precision": "fp32", "p95_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0}
    out = {"provenance": provenance(), "results": [
        {**row, "backend": "eager", "p50_ms": 40.0},
        {**row, "backend": "aoti", "p50_ms": 20.0, "compile_s": 45.0,
         "parity": {"max_abs_map_error": 1e-7, "frames": 200, "same_ranking": True}},
        {"backend": "tensorrt", "modality": "wli", "batch": 1, "unavailable": "no GPU"}]}
    md = latency_markdown(out)
    assert "| WLI | aoti | fp32 | 1 | 20.00 |" in md and "| 0.50 | 45 | 1.0e-07 (200 frames) | True |" in md
    assert "tensorrt" not in md.split("Provenance")[0]


def _track(scores: list[float], mods: str, lesions: list[tuple[int, int]]):  # type: ignore[no-untyped-def]

    from bench.alert_rules import Track

    n = len(scores)
    events = {"fps": 30.0, "frames": n, "lesions": [{"id": k, "start_frame": a, "end_frame": b, "kind": "x",
                                                      "visible_in": ["wli", "nbi"]} for k, (a, b) in enumerate(lesions)]}
    mod = np.array(["wli" if c == "W" else "nbi" for c in mods], "<U3")
    return Track("t", np.arange(n) * 1000 / 30, mod, np.asarray(scores, np.float64), 30.0, events)


def test_alert_rules_baseline_is_causal_and_per_branch() -> None:
    from bench.alert_rules import baseline, smoothed

    tr = _track([0.1] * 40 + [0.9] * 5 + [0.5] * 20, "W" * 45 + "N" * 20, [])
    b = baseline(tr, frames=20, gap=5, q=50)
    assert np.isnan(b[:15]).all() and b[15] == 0.1
    assert b[44] == 0.1  # the jump at 40 is inside the gap: not yet in the baseline
    assert np.isnan(b[45])  # NBI has no history of its own
    assert np.isclose(smoothed(tr, 3)[45], 0.5) and np.isclose(smoothed(tr, 3)[42], 0.9)


def test_alert_rules_best_threshold_catches_more_with_more_false_alerts_allowed() -> None:
    from bench.alert_rules import above_abs, best_absolute, pooled

    # one normal spike at 0.6 (3 frames) and a lesion at 0.5: catching the lesion costs a false alert
    s = [0.1] * 100 + [0.6] * 3 + [0.1] * 100 + [0.5] * 10 + [0.1] * 100
    tr = _track(s, "W" * len(s), [(203, 212)])
    assert pooled([tr], [above_abs(tr, {"wli": 0.55, "nbi": 1.0})], 1, 1, 100.0)["false_alerts"] == 1
    rows = best_absolute([tr], [(1, 1)], 100.0, max_false=1, steps=20)
    assert [(r["false_alerts_allowed"], r["detected"], r["false_alerts"]) for r in rows] == [(0, 0, 0), (1, 1, 1)]


def test_soak_verdicts_flag_growth_new_descriptors_drift_and_lost_alerts() -> None:
    from bench.soak import process_tree, sample_tree, verdicts

    def minute(k: int, p50: float) -> dict:
        return {"minute": k, "scored": 100, "e2e_ms": {"p50": p50, "p99": 2 * p50}}

    flat = [{"t_s": 60.0 * k, "rss_mib": 500.0, "fds": 30} for k in range(0, 10)]
    ok = verdicts(flat, [minute(k, 50) for k in range(1, 10)], 2, [0, 1, 2], {0, 1, 2}, 0)
    assert ok["pass"] and ok["memory"]["growth"] == 0
    leak = [dict(s, rss_mib=500.0 + 10 * k, fds=30 + k) for k, s in enumerate(flat)]
    bad = verdicts(leak, [minute(k, 50 + 20 * k) for k in range(1, 10)], 2, [0, 1, 3], {0, 1}, 0)
    assert not bad["memory"]["pass"] and not bad["file_handles"]["pass"] and not bad["latency_drift"]["pass"]
    assert bad["alerts"]["missing"] == [3] and bad["alerts"]["seq_holes_in_log"] == [2] and not bad["pass"]
    import os

    assert os.getpid() in process_tree(os.getpid()) and sample_tree(os.getpid())["rss_mib"] > 10


# ---------------------------------------------------------------- bench/overlay_track.py
# bench/overlay_track.py: the analysis on hand-made draw logs and boxes, and one paced end-to-end run.
#
# The end-to-end run renders a short SYNTHETIC video (seed 3, 5 s, 320x240: an elevated erythema,
# visible in WLI, in view from frame 116 to the last, 149) and runs the benchmark's synthetic mode on it with
# the demo bundle, paced. It checks the result's shape and ranges only: speed and accuracy
# targets belong to the benchmark, not to a test on a shared machine.

TRACK_FPS = 30.0


def _draw(fid: int, rid: int | None, box: list[int] | None, event: int | None = 0, active: bool = True) -> dict:
    return {"frame_id": fid, "result_frame_id": rid, "box": box, "event_id": event if box else None, "active": active}


def test_iou_of_known_boxes() -> None:
    assert ot.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert ot.iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert ot.iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert ot.iou([0, 0, 10, 10], [2, 2, 5, 5]) == pytest.approx(25 / 100)  # inside
    assert ot.iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching edges: half-open boxes do not overlap
    assert ot.iou([0, 0, 10, 10], [50, 50, 4, 4]) == 0.0
    assert ot.iou(None, [0, 0, 1, 1]) == 0.0 and ot.iou([0, 0, 0, 5], [0, 0, 5, 5]) == 0.0
    v, lid, box = ot.best_match([0, 0, 10, 10], [(3, [40, 40, 5, 5]), (7, [1, 0, 10, 10])])
    assert (lid, box) == (7, [1, 0, 10, 10]) and v == pytest.approx(90 / 110)
    assert ot.best_match([0, 0, 1, 1], []) == (0.0, None, None)
    assert ot.inside([2, 2, 5, 5], [0, 0, 10, 10]) == 1.0 and ot.inside([0, 0, 10, 10], [2, 2, 5, 5]) == 0.25
    assert ot.inside([0, 0, 10, 10], [5, 0, 10, 10]) == 0.5 and ot.inside([0, 0, 4, 4], [9, 9, 1, 1]) == 0.0


def test_lag_is_frame_distance_in_ms() -> None:
    assert ot.lag_ms(10, 9, TRACK_FPS) == pytest.approx(33.333, abs=1e-3)
    assert ot.lag_ms(10, 10, TRACK_FPS) == 0.0
    assert ot.lag_ms(10, 6, 25.0) == 160.0
    assert ot.lag_ms(5, 7, TRACK_FPS) < 0  # the display behind: a newer result on an older frame


def test_parse_draws_and_boxes() -> None:
    draws = ot.parse_draws([_draw(0, None, None), _draw(1, 0, [1.4, 2, 3, 4]), _draw(2, 1, [1, 2, 3, 4], active=False),
                            _draw(1, 0, [5, 5, 5, 5])])
    assert draws[0] == {"result_frame_id": None, "box": None, "event_id": None, "active": True}
    assert draws[1]["box"] == [5, 5, 5, 5]  # logged twice: the last line wins
    assert draws[2]["box"] is None  # AI NOT ACTIVE: no box is drawn
    gt = ot.parse_boxes([{"frame_id": 0, "boxes": [], "ids": []},
                         {"frame_id": 1, "boxes": [[1, 2, 3, 4], [9, 9, 2, 2]], "ids": [0, 4]}])
    assert gt == {1: [(0, [1, 2, 3, 4]), (4, [9, 9, 2, 2])]}
    with pytest.raises(ValueError):
        ot.parse_boxes([{"frame_id": 0, "boxes": [[1, 2, 3, 4]], "ids": []}])
    with pytest.raises(ValueError):
        ot.parse_draws([_draw(0, 0, [1, 2, 3])])


def test_read_jsonl_drops_a_cut_last_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ', encoding="utf-8")
    assert ot.read_jsonl(p) == [{"a": 1}, {"a": 2}]
    p.write_text('{"a": 1}\nnope\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError):
        ot.read_jsonl(p)


def test_intervals_from_boxes() -> None:
    gt = {f: [(0, [0, 0, 4, 4])] for f in (3, 4, 5, 9, 10)}
    gt[4].append((1, [8, 8, 4, 4]))
    assert ot.intervals_from_boxes(gt) == [{"id": 0, "start_frame": 3, "end_frame": 5},
                                           {"id": 1, "start_frame": 4, "end_frame": 4},
                                           {"id": 0, "start_frame": 9, "end_frame": 10}]


def _scenario() -> tuple[dict, dict, list[dict]]:
    """A lesion moving 10 px right per frame on frames 10–19 (box 20×20), none elsewhere in 0–29.

    The display draws each frame with the previous frame's result (lag 1 frame), from frame 12 on
    (frames 10, 11 not detected); frames 20 and 21 still show a box after the lesion left (false
    boxes); frame 25 shows a box far from anything; frame 16 is missing from the log (display missed).
    """
    gt_rows = [{"frame_id": f, "boxes": [[10 * f, 50, 20, 20]] if 10 <= f <= 19 else [],
                "ids": [0] if 10 <= f <= 19 else []} for f in range(30)]
    draws = []
    for f in range(30):
        if f == 16:
            continue
        box = [10 * (f - 1), 50, 20, 20] if 12 <= f <= 21 else ([500, 500, 10, 10] if f == 25 else None)
        draws.append(_draw(f, f - 1 if f else None, box, event=0 if box else None))
    alerts = [{"topic": "alert", "event": "start", "event_id": 0, "frame_id": 11, "location": {"box": [110, 50, 20, 20]}},
              {"topic": "alert", "event": "update", "event_id": 0, "frame_id": 14, "location": {"box": [140, 50, 20, 20]}},
              {"topic": "alert", "event": "end", "event_id": 0, "frame_id": 22, "location": {"box": [140, 50, 20, 20]}}]
    return ot.parse_draws(draws), ot.parse_boxes(gt_rows), alerts


def test_summary_of_a_known_scenario() -> None:
    draws, gt, alerts = _scenario()
    peaks = ot.peak_marker_boxes(alerts, draws)
    # the latest start/update at or before the drawn result frame; frame 25 (event 0, result 24) too
    assert peaks[12] == [110, 50, 20, 20] and peaks[15] == [140, 50, 20, 20] and peaks[21] == [140, 50, 20, 20]
    assert 11 not in peaks  # nothing drawn there
    events = {"modality": [{"start_frame": 0, "end_frame": 14, "modality": "wli"},
                           {"start_frame": 15, "end_frame": 29, "modality": "nbi"}]}
    intervals = [{"id": 0, "start_frame": 10, "end_frame": 19, "kind": "k", "visible_in": ["wli"]}]
    s = ot.summarise(draws, gt, TRACK_FPS, intervals, ot.modality_lookup(events), peaks)

    assert s["frames_shown"] == 29 and s["frames_shown_with_lesion"] == 9 and s["frames_shown_without_lesion"] == 20
    assert s["boxes_drawn"] == 10  # 12–21 less the missed 16, plus 25
    assert s["detected_frames"] == 7 and s["detected_fraction"] == pytest.approx(7 / 9, abs=1e-4)
    assert s["frames_shown_with_visible_lesion"] == 5  # 10–14 are WLI
    assert s["detected_fraction_visible"] == pytest.approx(3 / 5)
    # each drawn box is one frame (10 px) behind a 20 px box: IoU 10·20 / (2·400 − 200) = 1/3
    assert s["iou"]["n"] == 7 and s["iou"]["p50"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["iou_vs_result_frame"]["p50"] == pytest.approx(1.0)  # zero lag would be exact
    assert s["lag_ms"]["n"] == 10 and s["lag_ms"]["p50"] == pytest.approx(1000 / 30, abs=1e-3)
    assert s["lag_ms"]["negative"] == 0
    assert s["false_boxes"] == 3 and s["false_box_fraction_of_clear_frames"] == pytest.approx(3 / 20)
    assert s["false_boxes_within_1s_of_a_lesion"] == 3  # 20, 21, 25 are all within 30 frames of frame 19
    # IoU < 0.1: the three false boxes; none on lesion frames
    assert s["stale_share"] == pytest.approx(3 / 10) and s["stale_share_on_lesion_frames"] == 0.0
    # peak marker: frames 12, 13, 14 show [110, 50] (the lesion at 120, 130, 140 → IoU 1/3, 0, 0);
    # 15, 17, 18, 19 show [140, 50] (lesion at 150, 170, 180, 190 → 1/3, 0, 0, 0)
    assert s["iou_peak_marker"]["n"] == 7 and s["iou_peak_marker"]["p50"] == 0.0
    assert s["iou_peak_marker"]["mean"] == pytest.approx((2 / 3) / 7, abs=1e-4)
    # the box trails the lesion by 10 px along its motion
    assert s["offset"]["dx_px"] == -10 and s["offset"]["dy_px"] == 0
    assert s["offset"]["along_motion_px"]["p50"] == pytest.approx(-10)
    assert s["offset"]["width_ratio"] == 1.0 and s["offset"]["share_of_box_inside_truth"]["p50"] == 0.5
    (les,) = s["per_lesion"]
    assert les["frames"] == 10 and les["frames_shown"] == 9 and les["detected_frames"] == 7
    assert les["frames_visible"] == 5 and les["detected_fraction_visible"] == pytest.approx(0.6)
    assert les["first_box_after_ms"] == pytest.approx(2000 / 30, abs=0.1)
    assert les["iou_p50"] == pytest.approx(1 / 3, abs=1e-4) and les["inside_truth_p50"] == 0.5
    t = ot.targets(s)
    assert t["iou_p50"]["met"] is False and t["lag_p90_ms"]["met"] is True
    assert s["iou_centre_box"]["n"] == 0  # no frame size given
    sized = ot.summarise(draws, gt, TRACK_FPS, intervals, None, peaks, frame_size=(300, 200))
    # the chance reference [75, 50, 150, 100] holds each 20×20 lesion box whole: IoU 400 / 15000
    assert sized["iou_centre_box"]["n"] == 7 and sized["iou_centre_box"]["p50"] == pytest.approx(400 / 15000, abs=1e-4)
    assert sized["box_area_share_of_frame"]["n"] == 10
    assert sized["box_area_share_of_frame"]["p50"] == pytest.approx(400 / 60000, abs=1e-4)


def test_summary_without_events_or_boxes() -> None:
    draws, gt, _ = _scenario()
    s = ot.summarise(draws, gt, TRACK_FPS)  # intervals from the boxes, no visibility
    assert s["detected_fraction_visible"] is None and s["per_lesion"][0]["frames_visible"] is None
    assert s["iou_peak_marker"]["n"] == 0 and s["iou_peak_marker"]["p50"] is None
    empty = ot.summarise({}, {}, TRACK_FPS)
    assert empty["detected_fraction"] is None and empty["iou"]["n"] == 0 and empty["stale_share"] is None
    assert ot.targets(empty)["iou_p50"]["met"] is False


def test_negative_lag_is_counted() -> None:
    draws = ot.parse_draws([_draw(5, 7, [0, 0, 10, 10]), _draw(6, 5, [0, 0, 10, 10])])
    s = ot.summarise(draws, ot.parse_boxes([{"frame_id": 5, "boxes": [[0, 0, 10, 10]], "ids": [0]}]), TRACK_FPS)
    assert s["lag_ms"]["negative"] == 1 and s["lag_ms"]["min"] == pytest.approx(-66.6667, abs=1e-3)


@pytest.mark.parametrize("src,dst", [((256, 256), (256, 256)), ((256, 256), (640, 480)), ((300, 200), (320, 240)),
                                     ((255, 255), (256, 256)), ((500, 300), (320, 320))])
def test_letterbox_mapping_matches_the_slideshow(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """A white rectangle letterboxed by the slideshow lands inside (and fills) the mapped box."""
    iw, ih = src
    img = np.zeros((ih, iw, 3), np.uint8)
    box = [iw // 5, ih // 3, iw // 2, ih // 4]
    img[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = 255
    out = letterbox(img, dst)
    mapped = ot.map_box(box, src, dst)
    ys, xs = np.nonzero(out[..., 0] > 127)
    seen = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    assert ot.iou(mapped, seen) > 0.93, (mapped, seen)
    x, y, w, h = mapped
    assert x <= seen[0] + 1 and y <= seen[1] + 1 and x + w >= seen[0] + seen[2] - 1 and y + h >= seen[1] + seen[3] - 1


def test_mask_boxes() -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 20:50] = 255  # 600 px
    mask[70:80, 70:80] = 255  # 100 px
    mask[0, 99] = 255  # a speck
    assert ot.mask_boxes(mask, "components", 0.005) == [[20, 10, 30, 20], [70, 70, 10, 10]]
    assert ot.mask_boxes(mask, "components", 0.02) == [[20, 10, 30, 20]]
    assert ot.mask_boxes(mask, "components", 0.5) == [[20, 10, 30, 20]]  # none that large: the largest
    assert ot.mask_boxes(mask, "whole") == [[20, 0, 80, 80]]
    assert ot.mask_boxes(np.zeros((8, 8), np.uint8)) == []


def test_slideshow_truth(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((100, 200, 3), np.uint8))
    m = np.zeros((100, 200), np.uint8)
    m[20:40, 100:150] = 255
    cv2.imwrite(str(masks / "a.png"), m)
    cv2.imwrite(str(images / "b.jpg"), np.zeros((100, 200, 3), np.uint8))
    cv2.imwrite(str(masks / "b_mask.png"), np.zeros((50, 100), np.uint8))  # no polyp
    meta = {"fps": 30.0, "frames": 6, "size": [400, 400],
            "slides": [{"index": 0, "image": str(images / "a.png"), "first_frame": 0, "last_frame": 2},
                       {"index": 1, "image": str(images / "b.jpg"), "first_frame": 3, "last_frame": 5}]}
    rows, events = ot.slideshow_truth(meta, masks)
    # 200x100 into 400x400: × 2, 100 px bars above and below
    assert rows[0] == {"frame_id": 0, "boxes": [[200, 140, 100, 40]], "ids": [0]} and rows[2]["boxes"] == rows[0]["boxes"]
    assert rows[3] == {"frame_id": 3, "boxes": [], "ids": []}
    assert [(e["id"], e["start_frame"], e["end_frame"]) for e in events["lesions"]] == [(0, 0, 2)]
    assert events["modality"] == [{"start_frame": 0, "end_frame": 5, "modality": "wli"}]


@pytest.mark.slow
def test_synthetic_mode_end_to_end(tmp_path: Path) -> None:
    """The benchmark's synthetic mode on 5 s of 320x240, paced with the demo bundle: the JSON's shape and ranges."""
    out = tmp_path / "bench"
    result = ot.main(["synthetic", "--seed", "3", "--seconds", "5", "--size", "320x240", "--out", str(out),
                      "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert saved["label"] == "SYNTHETIC" and "provenance" in saved and saved["provenance"]["commit"]
    for key in ("run", "targets", "video", "summary", "command", "low_iou_shares"):
        assert key in saved
    assert saved["run"]["backend"] and saved["run"]["bundle"].endswith("demo")
    s = saved["summary"]
    for key in ("iou", "iou_vs_result_frame", "iou_peak_marker", "lag_ms", "detected_fraction", "stale_share",
                "false_boxes", "per_lesion", "offset"):
        assert key in s
    assert s["frames_shown"] > 0 and s["frames_shown_with_lesion"] > 0
    assert [p["id"] for p in s["per_lesion"]] == [le["id"] for le in saved["video"]["lesions"]]
    draws = ot.parse_draws(ot.read_jsonl(out / "run" / "draws.jsonl"))
    gt = ot.parse_boxes(ot.read_jsonl(out / "video.boxes.jsonl"))
    lags = [ot.lag_ms(f, d["result_frame_id"], TRACK_FPS) for f, d in draws.items() if d["box"] is not None]
    assert len(lags) == s["lag_ms"]["n"]
    # the display may fall behind the scorer for a moment (a newer result on an older frame): those
    # are the only negative lags, and the summary counts them
    assert sum(v < 0 for v in lags) == s["lag_ms"]["negative"]
    assert all(math.isfinite(v) for v in lags)
    ious = [ot.best_match(d["box"], gt[f])[0] for f, d in draws.items() if d["box"] is not None and f in gt]
    assert len(ious) == s["iou"]["n"] and all(0.0 <= v <= 1.0 for v in ious)
    for name in ("iou", "iou_vs_result_frame", "iou_peak_marker"):
        st = s[name]
        assert st["n"] == 0 or 0.0 <= st["min"] <= st["p50"] <= st["max"] <= 1.0
    if s["lag_ms"]["n"]:
        assert s["lag_ms"]["p50"] >= 0
    assert 0 <= (s["detected_fraction"] or 0) <= 1 and 0 <= (s["stale_share"] or 0) <= 1
    assert isinstance(result["targets"]["iou_p50"]["met"], bool)
