"""Calibration units: the shared alert state machine, threshold choice, events and event metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.debounce import count_events
from calibration.events import check_fits, event_metrics, lesion_events, load_events, truth_modality
from calibration.run import _check_amount, gather
from calibration.thresholds import (
    CalibrationOptions,
    ModalityCalibration,
    NormalScores,
    calibrate_modality,
    choose,
    suspect_stretches,
)
from engine.errors import CemdError
from realtime.scoring.alerts import AlertConfig, AlertLogic, Thresholds


def _random_stream(seed: int, n: int = 3000):
    rng = np.random.default_rng(seed)
    t_ms = np.cumsum(rng.choice([33.3, 33.4, 66.7], n, p=[0.45, 0.45, 0.1]))  # some dropped frames
    modality = np.where((np.arange(n) // 400) % 2 == 0, "wli", "nbi")
    score = rng.normal(0.3, 0.05, n) + (rng.random(n) < 0.02) * rng.uniform(0.1, 0.3, n)
    for a in rng.integers(0, n - 60, 8):  # sustained bumps
        score[a: a + rng.integers(3, 50)] += 0.2
    return t_ms, modality, score


@pytest.mark.parametrize("n_of_m,hold", [((1, 1), 0.0), ((3, 5), 500.0), ((2, 3), 150.0), ((4, 6), 1000.0)])
def test_count_events_is_the_live_alert_logic(n_of_m, hold) -> None:
    """Calibration counts the events the monitor's AlertLogic raises, frame for frame."""
    t_ms, modality, score = _random_stream(7)
    thr = {"wli": 0.42, "nbi": 0.45}
    logic = AlertLogic(Thresholds(thr, "test"), AlertConfig(n_of_m=n_of_m, hold_ms=hold))
    live = []
    for i in range(len(score)):
        d = logic.update(i, None, int(t_ms[i] * 1e6), str(modality[i]), float(score[i]), np.ones((8, 8)), (0, 0, 8))
        live += [a["frame_id"] for a in d.alerts if a["event"] == "start"]
    above = score > np.array([thr[m] for m in modality])
    replayed = count_events(t_ms, modality, above, *n_of_m, hold)
    assert len(live) > 5
    assert replayed.tolist() == live


def test_alert_logic_takes_debouncing_from_calibration_unless_configured() -> None:
    assert AlertLogic(Thresholds({"wli": 1.0}, "t", n_of_m=(4, 6))).n_of_m == (4, 6)
    assert AlertLogic(Thresholds({"wli": 1.0}, "t", n_of_m=(4, 6)), AlertConfig(n_of_m=(2, 3))).n_of_m == (2, 3)
    assert AlertLogic(Thresholds({"wli": 1.0}, "t")).n_of_m == (3, 5)


def _normal(seed: int, minutes: float, fps: float = 30.0, spikes: int = 20) -> NormalScores:
    rng = np.random.default_rng(seed)
    n = int(minutes * 60 * fps)
    score = rng.normal(0.25, 0.03, n)
    for a in rng.integers(0, n - 10, spikes):  # short bursts: what debouncing is for
        score[a: a + rng.integers(1, 4)] += rng.uniform(0.05, 0.15)
    return NormalScores(np.arange(n) * 1000 / fps, score, np.zeros(n, int), fps)


def test_threshold_meets_the_target_on_the_data_with_margin_and_floor() -> None:
    data = _normal(1, 10)
    opts = CalibrationOptions(target_false_alerts_per_hour=6, margin_sigma=1.0)
    cal = calibrate_modality("wli", data, 1, 1, opts)
    assert cal.bulk_floor == pytest.approx(np.percentile(data.score, 99))
    assert cal.threshold == pytest.approx(max(cal.rate_threshold, cal.bulk_floor) + cal.margin)
    assert cal.margin == pytest.approx(cal.sigma) and 0.02 < cal.sigma < 0.04
    # at the rate threshold the count fits the target (≤ 1 alert in 10 min) and just below it does not
    allowed = 6 * 10 / 60
    above = lambda thr: len(count_events(data.t_ms, np.zeros(len(data.score), "<U1"), data.score > thr, 1, 1, 500))  # noqa: E731
    assert above(cal.rate_threshold) <= allowed < above(cal.rate_threshold - 1e-6)
    assert cal.threshold > np.percentile(data.score, 99)  # never inside the bulk


def test_stored_threshold_is_never_below_stored_floor_plus_margin() -> None:
    """The numbers of a fresh-clone failure: floor 0.2376485 and margin 0.0170515 each rounded up at
    6 decimals summed to 0.254701 > the threshold rounded to 0.2547. Stored unrounded, the stored
    threshold is the stored floor + margin (float addition is monotonic), on any machine."""
    for floor, margin, rate in ((0.2376485, 0.0170515, 0.2), (0.1234565, 0.0000015, 0.1234564),
                                (0.3, 0.05, 0.3500005)):
        thr = max(rate, floor) + margin
        c = ModalityCalibration("wli", thr, (4, 6), rate, floor, margin, 0.01, 0.2, 100, 1.0, 0, 0.0)
        stored = json.loads(json.dumps(c.to_json()))
        assert stored["threshold"] >= stored["bulk_floor"] + stored["margin"]
        assert stored["threshold"] >= stored["rate_threshold"] + stored["margin"]
        assert stored["threshold"] == thr


def test_debouncing_lowers_the_threshold_and_the_choice_prefers_it() -> None:
    data = {"wli": _normal(2, 10, spikes=200), "nbi": _normal(3, 10, spikes=200)}
    chosen, table = choose(data, CalibrationOptions(margin_sigma=0.0), 30.0)
    thr = {tuple(r["n_of_m"]): r["thresholds"]["wli"] for r in table if "thresholds" in r}
    assert thr[(1, 1)] > thr[(3, 5)]  # isolated 1–3 frame bursts no longer need to be under the threshold
    assert chosen["wli"].n_of_m != (1, 1)
    # the chosen one has the lowest summed threshold in σ above the median
    best = min((r for r in table if "cost_sigma" in r), key=lambda r: r["cost_sigma"])
    assert tuple(best["n_of_m"]) == chosen["wli"].n_of_m == chosen["nbi"].n_of_m
    assert chosen["wli"].curve["threshold"] and len(chosen["wli"].curve["false_alerts_per_hour"]) == 60
    # the delay cap removes candidates
    _, capped = choose(data, CalibrationOptions(max_debounce_ms=40), 30.0)
    assert [r["n_of_m"] for r in capped if "skipped" in r] == [[3, 5], [4, 6]]


def test_too_little_normal_video_says_how_much_is_needed() -> None:
    opts = CalibrationOptions(target_false_alerts_per_hour=6)
    data = {"wli": _normal(4, 2), "nbi": _normal(5, 6)}
    with pytest.raises(CemdError) as err:
        _check_amount(data, ["wli", "nbi"], opts)
    msg = str(err.value)
    assert "WLI has 2.0 min" in msg and "NBI" not in msg.split("and each")[0] and "5.0 min" in msg
    assert "15.0" in msg  # the target the given data could check
    assert "kept" not in msg
    with pytest.raises(CemdError, match="The scores are kept in cache-dir: calibrating again does not score"):
        _check_amount(data, ["wli", "nbi"], opts, kept_in=Path("cache-dir"))  # after scoring, with a cache
    _check_amount({"wli": _normal(4, 5.5), "nbi": _normal(5, 6)}, ["wli", "nbi"], opts)


def test_suspect_stretches_find_a_lesion_in_normal_video() -> None:
    data = _normal(6, 2)
    score = data.score.copy()
    score[900:960] += 0.4  # two seconds of something that is not normal
    runs = suspect_stretches(data.t_ms, score, float(np.median(score)), 0.03, 30.0)
    assert [(a, b) for a, b, _ in runs] == [(900, 959)]
    assert suspect_stretches(data.t_ms, data.score, float(np.median(data.score)), 0.03, 30.0) == []


def test_gather_restarts_the_machine_at_switches_and_videos() -> None:
    class Track:
        def __init__(self, mods: str) -> None:
            self.modality = np.array([{"w": "wli", "n": "nbi"}[c] for c in mods])
            self.score = np.arange(len(mods), dtype=np.float32)
            self.t_ms = np.arange(len(mods)) * 33.3
            self.fps = 30.0

    data = gather([Track("wwnnww"), Track("wnn")], ["wli", "nbi"])
    assert data["wli"].score.tolist() == [0, 1, 4, 5, 0]
    seg = data["wli"].segment.tolist()
    assert seg[0] == seg[1] != seg[2] == seg[3] != seg[4]
    assert data["nbi"].score.tolist() == [2, 3, 1, 2]


# --------------------------------------------------------------------------- events


def _events(tmp_path, **over):
    ev = {"fps": 30.0, "frames": 300, "width": 320, "height": 240, "synthetic": True,
          "lesions": [{"id": 0, "start_frame": 30, "end_frame": 89, "kind": "a", "visible_in": ["wli", "nbi"]},
                      {"id": 1, "start_frame": 150, "end_frame": 209, "kind": "b", "visible_in": ["nbi"]}],
          "modality": [{"start_frame": 0, "end_frame": 179, "modality": "wli"},
                       {"start_frame": 180, "end_frame": 299, "modality": "nbi"}]}
    ev.update(over)
    path = tmp_path / "ev.json"
    path.write_text(json.dumps(ev))
    return path


@pytest.mark.parametrize("change,needle", [
    ({"frames": 0}, "frames must be ≥ 1"),
    ({"fps": "fast"}, "fps must be a number"),
    ({"lesions": [{"start_frame": 10}]}, "needs start_frame and end_frame"),
    ({"lesions": [{"start_frame": 290, "end_frame": 300}]}, "outside the video's 0–299"),
    ({"lesions": [{"start_frame": 20, "end_frame": 10}]}, "end before start"),
    ({"lesions": [{"start_frame": 1, "end_frame": 2, "visible_in": ["xray"]}]}, "visible_in"),
    ({"modality": [{"start_frame": 0, "end_frame": 9, "modality": "blue"}]}, "modality segment 0"),
])
def test_bad_events_files_are_named(tmp_path, change, needle) -> None:
    with pytest.raises(CemdError, match=needle):
        load_events(_events(tmp_path, **change))


def test_events_must_fit_the_video(tmp_path) -> None:
    ev = load_events(_events(tmp_path))
    check_fits(ev, 300, 30.0, 320, 240)
    with pytest.raises(CemdError, match="describes 300 frames, the video has 450"):
        check_fits(ev, 450, 30.0)
    with pytest.raises(CemdError, match="at 30 fps, the video at 25 fps"):
        check_fits(ev, 300, 25.0)
    with pytest.raises(CemdError, match="320x240 frames, the video's are 640x480"):
        check_fits(ev, 300, 30.0, 640, 480)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CemdError, match="not valid JSON"):
        load_events(tmp_path / "bad.json")


def test_event_metrics_by_hand(tmp_path) -> None:
    ev = load_events(_events(tmp_path))
    n = 300
    t_ms = np.arange(n) * 1000 / 30
    routed = truth_modality(ev, np.full(n, "wli"))
    # lesion 1 is visible in NBI only: its WLI part (150–179) is not a lesion event
    assert [(e["start_frame"], e["end_frame"], e["modality"]) for e in lesion_events(ev, routed)] == [
        (30, 89, "wli"), (180, 209, "nbi")]
    score = np.full(n, 0.2)
    score[30:90] = 0.5
    score[100] = 0.9  # one normal frame scores high: AUROC below 1
    alerts = [  # detected 6 frames after onset; a false alert at 240–250; the NBI lesion missed
        {"event": "start", "event_id": 0, "frame_id": 36, "modality": "wli", "peak_score": 0.5},
        {"event": "end", "event_id": 0, "frame_id": 95, "end_frame_id": 89, "modality": "wli", "peak_score": 0.5},
        {"event": "start", "event_id": 1, "frame_id": 240, "modality": "nbi", "peak_score": 0.4},
        {"event": "end", "event_id": 1, "frame_id": 250, "end_frame_id": 250, "modality": "nbi", "peak_score": 0.4},
    ]
    m = event_metrics(t_ms, routed, score, alerts, ev, 30.0)
    o = m["overall"]
    assert (o["lesion_events"], o["detected"], o["event_sensitivity"]) == (2, 1, 0.5)
    assert o["median_time_to_first_alert_ms"] == pytest.approx(200.0, abs=0.1)
    free_h = (300 - 60 - 60) / 30 / 3600
    assert o["false_alerts"] == 1 and o["false_alerts_per_hour"] == pytest.approx(1 / free_h, rel=1e-3)
    assert m["per_modality"]["wli"]["event_sensitivity"] == 1.0
    assert m["per_modality"]["nbi"]["event_sensitivity"] == 0.0 and m["per_modality"]["nbi"]["false_alerts"] == 1
    wli_auc = m["per_modality"]["wli"]["frame_auroc"]
    assert 0.95 < wli_auc < 1.0  # positives 0.5 beat every negative except the 0.9 one
    # an alert open from before the onset counts at once
    early = [{"event": "start", "event_id": 0, "frame_id": 25, "modality": "wli", "peak_score": 0.5},
             {"event": "end", "event_id": 0, "frame_id": 40, "end_frame_id": 40, "modality": "wli", "peak_score": 0.5}]
    m2 = event_metrics(t_ms, routed, score, early, ev, 30.0)
    assert m2["overall"]["median_time_to_first_alert_ms"] == 0.0 and m2["overall"]["false_alerts"] == 0
