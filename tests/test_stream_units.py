"""The monitor's stages called directly with made inputs: preprocessing, routing, alert logic, config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.errors import CemdError
from engine.synth.video import VideoScene
from realtime.config import MonitorConfig, example_config, load_config
from realtime.scoring.alerts import AlertConfig, AlertLogic, Thresholds, locate
from realtime.scoring.preprocess import FramePreprocessor, detect_field_of_view, map_to_source
from realtime.scoring.routing import (
    DEFAULT_CLASSIFIER,
    ModalityClassifier,
    ModalityRouter,
    fit_classifier,
    routing_accuracy,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- field of view


@pytest.mark.parametrize("size", [(640, 480), (1280, 720), (320, 240)])
def test_field_of_view_found_on_synthetic_frames(size: tuple[int, int]) -> None:
    scene = VideoScene(5, 2, 30, size)  # the disc is clipped at top and bottom in most seeds
    for i in (0, 20, 45):
        fov = detect_field_of_view(scene.frame(i))
        assert fov is not None
        assert abs(fov.radius / scene.radius - 1) < 0.05
        assert abs(fov.cx - scene.cx) < 0.03 * scene.radius and abs(fov.cy - scene.cy) < 0.06 * scene.radius


def test_no_field_of_view_in_a_black_frame_keeps_the_last_one() -> None:
    pre = FramePreprocessor(64, redetect_every=1)
    scene = VideoScene(5, 1, 30, (320, 240))
    pre(scene.frame(0))
    good = pre.fov
    assert detect_field_of_view(np.zeros((240, 320, 3), np.uint8)) is None
    pre(np.zeros((240, 320, 3), np.uint8))
    assert pre.fov == good and pre.failed_detections == 1


def test_crop_masks_text_and_maps_back_to_source() -> None:
    scene = VideoScene(3, 1, 30, (640, 480))
    frame = scene.frame(0)
    pre = FramePreprocessor(128)
    tensor, crop, box = pre(frame)
    assert tensor.shape == (1, 3, 128, 128) and 0 <= float(tensor.min()) and float(tensor.max()) <= 1
    # corners of the crop are outside the disc: black (the burnt-in text is gone)
    assert crop[:6, :6].max() == 0 and crop[-6:, -6:].max() == 0
    # the crop centre maps to the disc centre in source pixels
    centre = map_to_source(np.array([[64.0, 64.0]]), box, 128)[0]
    assert abs(centre[0] - scene.cx) < 10 and abs(centre[1] - scene.cy) < 15


def test_preprocess_any_size_and_resolution_change() -> None:
    pre = FramePreprocessor(64)
    for h, w in ((97, 131), (1080, 1920), (240, 320)):
        img = np.zeros((h, w, 3), np.uint8)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 120
        t, _, _ = pre(img)
        assert t.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        pre(np.zeros((10, 10), np.uint8))


# --------------------------------------------------------------------------- routing


def _crops(seed: int, seconds: float) -> tuple[list[np.ndarray], list[str]]:
    scene = VideoScene(seed, seconds, 30, (320, 240))
    pre = FramePreprocessor(64)
    return [pre.crop(scene.frame(i))[0] for i in range(scene.n_frames)], [scene.modality(i) for i in range(scene.n_frames)]


def test_router_follows_switches_within_two_frames() -> None:
    crops, truth = _crops(21, 12)
    router = ModalityRouter(ModalityClassifier.from_json(DEFAULT_CLASSIFIER))
    chosen = [router.update(c).modality for c in crops]
    switches = sum(a != b for a, b in zip(truth, truth[1:]))
    assert switches >= 2 and router.switches == switches
    assert routing_accuracy(chosen, truth) >= 1 - (switches * 1 + 1) / len(truth)


def test_router_ignores_single_odd_frames() -> None:
    crops, truth = _crops(21, 4)
    wli = [c for c, t in zip(crops, truth) if t == "wli"][:40]
    nbi = [c for c, t in zip(crops, truth) if t == "nbi"][:5] or _crops(22, 12)[0][-5:]
    router = ModalityRouter(ModalityClassifier.from_json(DEFAULT_CLASSIFIER), switch_frames=2)
    seq = wli[:10] + nbi[:1] + wli[10:20] + nbi[1:2] + wli[20:30] + [np.zeros_like(wli[0])] * 3 + wli[30:]
    out = [router.update(c).modality for c in seq]
    assert set(out) == {"wli"} and router.switches == 0


def test_classifier_fit_separates_colours() -> None:
    rng = np.random.default_rng(0)
    feats = {"wli": list(rng.normal([0.47, 0.28, 0.25], 0.01, (40, 3))),
             "nbi": list(rng.normal([0.31, 0.37, 0.32], 0.01, (40, 3)))}
    clf = fit_classifier(feats, "test")
    red = np.full((32, 32, 3), (200, 110, 100), np.uint8)
    teal = np.full((32, 32, 3), (110, 130, 115), np.uint8)
    assert clf.p_nbi(red) < 0.05 and clf.p_nbi(teal) > 0.95
    assert clf.p_nbi(np.zeros((32, 32, 3), np.uint8)) is None
    with pytest.raises(CemdError, match="at least 5"):
        fit_classifier({"wli": feats["wli"][:2], "nbi": feats["nbi"]}, "x")


def test_bundle_classifier_file(tmp_path: Path) -> None:
    clf, warning = ModalityClassifier.for_bundle(tmp_path)
    assert warning and "fit-modality" in warning
    (tmp_path / "modality.json").write_text("{broken")
    with pytest.raises(CemdError, match="not a valid modality classifier"):
        ModalityClassifier.for_bundle(tmp_path)
    clf, warning = ModalityClassifier.for_bundle(REPO / "models" / "demo")
    assert warning is None and len(clf.weights) == 3


# --------------------------------------------------------------------------- alert logic


def _blob_map(n: int = 64) -> np.ndarray:
    m = np.zeros((n, n), np.float32)
    m[10:20, 30:46] = 1.0
    return m


def _run(logic: AlertLogic, scores: list[float], modality: str | list[str] = "wli", fps: float = 30):
    out = []
    for i, s in enumerate(scores):
        mod = modality if isinstance(modality, str) else modality[i]
        d = logic.update(i, i, int(i * 1e9 / fps), mod, s, _blob_map, (100, 50, 128))
        out += [(i, a) for a in d.alerts]
    return out


def test_n_of_m_debounce_and_hold_time() -> None:
    logic = AlertLogic(Thresholds({"wli": 0.5, "nbi": 0.5}, "test"), AlertConfig(n_of_m=(3, 5), hold_ms=200))
    # two isolated spikes never open an event; a run of three does, on its third frame
    scores = [0.1] * 5 + [0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1] + [0.9] * 10 + [0.1] * 20
    alerts = _run(logic, scores)
    kinds = [(i, a["event"]) for i, a in alerts]
    assert kinds[0] == (14, "start")
    end = [(i, a) for i, a in alerts if a["event"] == "end"]
    assert len(end) == 1
    i_end, a_end = end[0]
    assert a_end["end_frame_id"] == 21 and a_end["reason"] == "below_threshold"
    assert (i_end - 21) / 30 * 1000 > 200 and (i_end - 1 - 21) / 30 * 1000 <= 200  # the first frame past the hold
    assert all(a["event_id"] == 0 for _, a in alerts)


def test_sensitivity_lowers_the_threshold() -> None:
    scores = [0.45] * 10
    assert _run(AlertLogic(Thresholds({"wli": 0.5}, "t")), scores) == []
    assert _run(AlertLogic(Thresholds({"wli": 0.5}, "t"), AlertConfig(sensitivity=1.2)), scores)[0][1]["event"] == "start"


def test_modality_switch_ends_the_event_and_updates_follow_peaks() -> None:
    logic = AlertLogic(Thresholds({"wli": 0.5, "nbi": 0.5}, "t"), AlertConfig(n_of_m=(2, 3), update_hz=5))
    scores = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]
    mods = ["wli"] * 12 + ["nbi"] * 2
    alerts = _run(logic, scores, mods)
    events = [a["event"] for _, a in alerts]
    assert events[0] == "start" and "update" in events and "end" in events
    end = next(a for _, a in alerts if a["event"] == "end")
    assert end["reason"] == "modality_switch" and end["modality"] == "wli"
    updates = [i for i, a in alerts if a["event"] == "update"]
    assert all(b - a >= 6 for a, b in zip(updates, updates[1:]))  # at most 5 Hz at 30 fps
    assert end["peak_score"] == pytest.approx(1.7)


def test_location_is_in_source_pixels() -> None:
    loc = locate(_blob_map(64), (100, 50, 128), level=0.6)
    x, y, w, h = loc["box"]
    # map rows 10–19, cols 30–45 at 2 source px per map px, offset (100, 50): the cells' edges, exactly
    assert (x, y, w, h) == (160, 70, 32, 20)
    assert loc["peak"][0] in range(160, 193) and len(loc["contour"]) >= 4
    assert locate(np.zeros((64, 64), np.float32), (0, 0, 64), 0.6) is None


def test_the_outline_is_cut_at_the_threshold_on_a_diffuse_map() -> None:
    """A real-looking map: a broad warm region (0.7 of the peak) around a small hot core; 0.6 of the
    peak outlines the whole warm region, the threshold floor only the core."""
    m = np.zeros((64, 64), np.float32)
    m[8:56, 8:56] = 0.7
    m[30:36, 20:28] = 1.0
    assert locate(m, (0, 0, 64), 0.6)["box"] == [8, 8, 48, 48]
    assert locate(m, (0, 0, 64), 0.6, floor=0.9)["box"] == [20, 30, 8, 6]
    assert locate(m, (0, 0, 64), 0.6, floor=5.0)["box"] == [20, 30, 8, 6]  # above the peak: capped, the core stays
    logic = AlertLogic(Thresholds({"wli": 1.0}, "t"), AlertConfig(n_of_m=(1, 1)))  # floor 0.9 × threshold 1.0
    assert logic.update(0, 0, 0, "wli", 1.5, m, (0, 0, 64)).location["box"] == [20, 30, 8, 6]


def test_an_open_event_locates_every_frame_where_the_lesion_is_now() -> None:
    """Below threshold inside an open event, a frame still carries its own location (the lesion
    moved), never the peak frame's; the event keeps its peak location for the alert log."""
    logic = AlertLogic(Thresholds({"wli": 0.5}, "t"), AlertConfig(n_of_m=(2, 3), hold_ms=500))

    def blob_at(col: int) -> np.ndarray:
        m = np.zeros((64, 64), np.float32)
        m[20:30, col:col + 8] = 1.0
        return m

    scores = [0.9, 1.2, 0.45, 0.41, 0.39]  # opens on frame 1 (its peak), then below but still open
    decisions = [logic.update(i, i, int(i * 1e9 / 30), "wli", s, blob_at(4 + 10 * i), (0, 0, 64))
                 for i, s in enumerate(scores)]
    assert [d.event_state for d in decisions] == ["idle", "open", "open", "open", "open"]
    assert decisions[0].location is None  # above, but no event yet: nothing is drawn
    for i, d in enumerate(decisions[1:4], start=1):
        assert d.location is not None and d.location["box"][0] == 4 + 10 * i  # this frame's blob
    assert decisions[4].location is None  # below 0.8 of the threshold: the branch no longer sees it
    assert logic.open_event is not None and logic.open_event.location["box"][0] == 14  # the peak frame's


def test_default_thresholds_warn(tiny_bundle: Path) -> None:
    from engine.deploy.bundle import load_bundle

    b = load_bundle(tiny_bundle)
    t = Thresholds.for_bundle(b)
    assert t.warning and "not calibrated" in t.warning and set(t.values) == {"wli", "nbi"}
    (tiny_bundle / "calibration.json").write_text(json.dumps({"modalities": {"wli": {"threshold": 0.3},
                                                                             "nbi": {"threshold": 0.4}}}))
    try:
        t = Thresholds.for_bundle(load_bundle(tiny_bundle))
        assert t.warning is None and t.values == {"wli": 0.3, "nbi": 0.4} and t.n_of_m is None
        # one branch calibrated: the other falls back, loudly; debouncing comes along
        files = json.loads((tiny_bundle / "bundle.json").read_text())["files"]
        (tiny_bundle / "calibration.json").write_text(json.dumps(
            {"version": 3, "n_of_m": [4, 6], "model_files": files, "modalities": {"wli": {"threshold": 0.3}}}))
        t = Thresholds.for_bundle(load_bundle(tiny_bundle))
        assert t.values["wli"] == 0.3 and t.values["nbi"] == b.meta["score_stats"]["nbi"]["max"]
        assert "not calibrated for NBI" in t.warning and t.n_of_m == (4, 6) and "WLI" in t.source
        # made for other weights: warned
        (tiny_bundle / "calibration.json").write_text(json.dumps(
            {"model_files": {"student_wli.pt": "0" * 64}, "modalities": {"wli": {"threshold": 0.3},
                                                                       "nbi": {"threshold": 0.4}}}))
        t = Thresholds.for_bundle(load_bundle(tiny_bundle))
        assert t.values == {"wli": 0.3, "nbi": 0.4} and "other model weights" in t.warning
        # made for another score definition (e.g. score_reduction changed in bundle.json): warned, naming it
        model = dict(json.loads((tiny_bundle / "bundle.json").read_text())["model"])
        (tiny_bundle / "calibration.json").write_text(json.dumps(
            {"model_files": files, "model_config": model, "modalities": {"wli": {"threshold": 0.3},
                                                                         "nbi": {"threshold": 0.4}}}))
        assert Thresholds.for_bundle(load_bundle(tiny_bundle)).warning is None
        model["score_reduction"] = "max" if model["score_reduction"] != "max" else "topk"
        (tiny_bundle / "calibration.json").write_text(json.dumps(
            {"model_files": files, "model_config": model, "modalities": {"wli": {"threshold": 0.3},
                                                                         "nbi": {"threshold": 0.4}}}))
        t = Thresholds.for_bundle(load_bundle(tiny_bundle))
        assert "another score definition" in t.warning and "score_reduction" in t.warning
    finally:
        (tiny_bundle / "calibration.json").unlink()


# --------------------------------------------------------------------------- config


def test_the_config_block_in_the_docs_is_what_print_config_prints() -> None:
    """docs/STREAMING.md shows the config file; pasting it must change nothing (n_of_m stays unset)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "STREAMING.md").read_text()
    block = doc.split("option at its default:\n\n```toml\n", 1)[1].split("```", 1)[0]
    assert block.strip() == example_config().strip()
    assert "# n_of_m = ..." in block


def test_config_file_round_trip_and_errors(tmp_path: Path) -> None:
    full = tmp_path / "full.toml"
    full.write_text(example_config())
    assert load_config(full) == MonitorConfig()
    good = tmp_path / "c.toml"
    good.write_text('[source]\nsource = "clip.mp4"\nrealtime = false\n[alerts]\nn_of_m = [2, 4]\nhold_ms = 300\n')
    cfg = load_config(good)
    assert cfg.source.source == "clip.mp4" and not cfg.source.realtime and cfg.alerts.n_of_m == (2, 4)
    assert cfg.alerts.hold_ms == 300.0
    for text, match in (("[source]\nsorce = 1\n", "unknown key 'sorce'"), ("[sauce]\n", "unknown section"),
                        ("[source]\nrealtime = 1\n", "true or false"), ("[alerts]\nn_of_m = 3\n", "pair"),
                        ("[source\n", "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(CemdError, match=match):
            load_config(bad)
    with pytest.raises(CemdError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    cfg = MonitorConfig()
    cfg.alerts.n_of_m = (5, 3)
    with pytest.raises(CemdError, match="N ≤ M"):
        cfg.validate()
    good.write_text("[scoring]\ninference_workers = 3\n")
    assert load_config(good).scoring.inference_workers == 3
    for value in ('"many"', "0", "true", "2.5"):
        good.write_text(f"[scoring]\ninference_workers = {value}\n")
        with pytest.raises(CemdError, match="inference_workers must be auto or a whole number"):
            load_config(good).validate()


def test_auto_inference_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from realtime.config import auto_inference_workers

    for cores, fast_cpu in ((1, 1), (2, 2), (16, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert auto_inference_workers(True, "cpu") == fast_cpu
        assert auto_inference_workers(False, "cpu") == 1, "paced and live: the branch in the scoring thread"
        assert auto_inference_workers(True, "cuda") == 1


# --------------------------------------------------------------------------- capture device


def test_device_reader_with_a_stand_in_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    """STAND-IN: no capture card exists here, so cv2.VideoCapture is replaced by a fake camera that
    yields two BGR frames and then fails; the reader's own logic (buffer size, BGR→RGB, lost
    camera) is what is tested."""
    import cv2

    from realtime.capture.sources import DeviceReader, SourceLost

    class FakeCamera:
        def __init__(self, index: int, backend: int) -> None:
            self.index, self.props, self.left = index, {}, 2

        def isOpened(self) -> bool:  # noqa: N802 — OpenCV's name
            return True

        def set(self, prop: int, value: float) -> bool:
            self.props[prop] = value
            return True

        def get(self, prop: int) -> float:
            return 25.0 if prop == cv2.CAP_PROP_FPS else 0.0

        def read(self):
            if self.left == 0:
                return False, None
            self.left -= 1
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[..., 2] = 200  # red in BGR
            return True, frame

        def release(self) -> None:
            pass

    monkeypatch.setattr(cv2, "VideoCapture", FakeCamera)
    reader = DeviceReader(3, "device:3")
    assert reader.fps == 25.0 and reader._cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1
    frame = reader.read()
    assert frame.image.shape == (48, 64, 3) and frame.image[0, 0].tolist() == [200, 0, 0]  # RGB
    reader.read()
    with pytest.raises(SourceLost, match="device:3"):
        reader.read()
    reader.close()


def test_cemd_fit_modality_writes_a_working_classifier(tiny_dataset: Path, tmp_path: Path) -> None:
    import cv2

    from realtime.cli.main import main

    assert main(["fit-modality", "--bundle", str(tmp_path), "--data", str(tiny_dataset)]) == 0
    clf, warning = ModalityClassifier.for_bundle(tmp_path)
    assert warning is None
    for modality, want in (("wli", False), ("nbi", True)):
        img = next((tiny_dataset / modality / "test" / "good").iterdir())
        rgb = cv2.imread(str(img))[:, :, ::-1]
        assert (clf.p_nbi(np.ascontiguousarray(rgb)) > 0.5) is want
    assert main(["fit-modality", "--bundle", str(tmp_path), "--data", str(tmp_path / "nowhere")]) == 2


def test_message_encoding_is_strict_json_of_plain_values() -> None:
    from realtime.publish.schema import dumps, plain

    value = {"score": np.float32(0.25), "nan": float("nan"), "inf": np.float64("inf"), "box": np.array([1, 2]),
             "pts": np.int64(7), "contour": [(1, 2), (3, 4)], 5: "int key", "nested": {"m": np.float32("nan")}}
    out = json.loads(dumps(value))  # json.loads would accept NaN tokens, so check them explicitly below
    assert out == plain(value) == {"score": 0.25, "nan": None, "inf": None, "box": [1, 2], "pts": 7,
                                   "contour": [[1, 2], [3, 4]], "5": "int key", "nested": {"m": None}}
    assert b"NaN" not in dumps(value) and b"Infinity" not in dumps(value)
    with pytest.raises(TypeError, match="cannot put a object"):
        dumps({"x": object()})


# --------------------------------------------------------------------------- malloc settings


@pytest.mark.parametrize("env, applied", [({}, True), ({"CEMD_DEFAULT_MALLOC": "1"}, False),
                                          ({"MALLOC_TRIM_THRESHOLD_": "4096"}, False)])
def test_malloc_tuning_reaches_child_processes_unless_turned_off(env: dict, applied: bool) -> None:
    import subprocess
    import sys

    code = ("import json, os, subprocess, sys; from engine.malloc import tune_malloc; got = tune_malloc(); "
            "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"MALLOC_MMAP_THRESHOLD_\"), "
            "os.environ.get(\"MALLOC_TRIM_THRESHOLD_\"))'], capture_output=True, text=True).stdout.split(); "
            "print(json.dumps({'got': got, 'child': child}))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CEMD_DEFAULT_MALLOC"}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env, "PYTHONPATH": str(Path(__file__).parent.parent)},
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    if applied:
        assert out["got"] == {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 1 << 30}
        assert out["child"] == [str(32 << 20), str(1 << 30)]
    else:
        assert out["got"] == {}
        assert out["child"] == ["None", env.get("MALLOC_TRIM_THRESHOLD_", "None")]


# --------------------------------------------------------------------------- real-time send step


def test_realtime_step_raises_priority_for_its_body_only() -> None:
    from realtime.scoring.priority import RealtimeStep

    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    step = RealtimeStep(True)
    inside = []
    for _ in range(2):
        with step():
            inside.append(os.sched_getscheduler(0))
        assert os.sched_getscheduler(0) == os.SCHED_OTHER, "back to normal after every step"
    with pytest.raises(ValueError):  # an exception in the body still restores the priority
        with step():
            raise ValueError
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    if step.state == "on":  # root or CAP_SYS_NICE (the build machine, CI)
        assert inside == [os.SCHED_FIFO, os.SCHED_FIFO]
    else:  # elsewhere: the body still runs, at normal priority, and the state says why
        assert step.state.startswith("not permitted") and inside == [os.SCHED_OTHER] * 2
    off = RealtimeStep(False)
    with off():
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert off.state == "off"
