"""The overlay display: real monitor runs, real videos in and out, a real X server for the window."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import zmq

from realtime.clients.layout import Layout
from realtime.clients.overlay import (
    ALERT_RED,
    BOX_COLOUR,
    INACTIVE_AMBER,
    OverlayOptions,
    ResultState,
    View,
    decode_heatmap,
    draw_overlay,
    encode_heatmap,
    scale_view,
)
from realtime.publish.publisher import AlertPublisher
from realtime.publish.schema import encode
from realtime.scoring.alerts import locate
from tests.helpers.streams import free_port_pair, make_video
from tests.helpers.xvfb import read_xwd, start_xvfb

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
SEED, SECONDS, FPS, SIZE = 4, 20, 10, (320, 240)  # the lesion video of test_monitor: one WLI event


@pytest.fixture(scope="module")
def lesion_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from engine.synth.video import render_video

    out = tmp_path_factory.mktemp("video") / "exam.mp4"
    return out, render_video(out, SEED, SECONDS, FPS, SIZE, progress=False)


def frames_of(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as c:
        return list(c.decode(c.streams.video[0]))


def box_hue(image: np.ndarray) -> np.ndarray:
    """Pixels of the lesion box's hue: green and blue well above red (mucosa is red, its glints white,
    NBI teal-grey). A hue test, not a colour distance: H.264 halves the chroma of thin lines."""
    rgb = image.astype(np.int16)
    return (rgb[..., 1] - rgb[..., 0] > 60) & (rgb[..., 2] - rgb[..., 0] > 60)


def box_on(image: np.ndarray, box: list[int]) -> float:
    """The fraction of a box's outline (source pixels) drawn in the box's hue."""
    x, y, w, h = box
    hh, ww = image.shape[:2]
    xs = np.clip(np.arange(x, x + w + 1), 0, ww - 1)
    ys = np.clip(np.arange(y, y + h + 1), 0, hh - 1)
    c = box_hue(image)
    edge = np.concatenate([c[np.clip(y, 0, hh - 1), xs], c[np.clip(y + h, 0, hh - 1), xs],
                           c[ys, np.clip(x, 0, ww - 1)], c[ys, np.clip(x + w, 0, ww - 1)]])
    return float(edge.mean())


def amber_label(image: np.ndarray) -> int:
    """Pixels of the AI NOT ACTIVE label's amber (H.264 shifts colours a little)."""
    return int((np.abs(image.astype(np.int16) - np.array(INACTIVE_AMBER)).max(axis=-1) < 45).sum())


def display_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "realtime.clients.display", *args]


def score_message(frame_id: int, score: float, threshold: float = 0.3, event_id: int | None = None) -> dict:
    return {"frame_id": frame_id, "pts": None, "time_base": None, "t_capture_wall_ns": 0, "t_capture_mono_ns": 0,
            "timings_ms": {}, "modality": "wli", "modality_mode": "fixed", "backend": "eager", "score": score,
            "threshold": threshold, "event_state": "open" if event_id is not None else "none", "event_id": event_id,
            "location": {"box": [100, 80, 60, 50], "contour": [[100, 80], [160, 80], [160, 130], [100, 130]],
                         "peak": [130, 105]} if event_id is not None else None}


def stamp(topic: str, seq: int, boot: str = "b" * 32, **payload: object) -> dict:
    return {"schema": "cemd.monitor/1", "topic": topic, "publisher_id": "t", "boot_id": boot, "seq": seq,
            "t_wall_ns": 0, "t_mono_ns": 0, **payload}


# ---------------------------------------------------------------------------- units


def test_heatmap_round_trip_and_malformed_maps() -> None:
    amap = np.zeros((256, 256), np.float32)
    amap[64:128, 64:128] = 0.6
    msg = encode_heatmap(amap, 16, vmax=0.6)
    grid = decode_heatmap(msg)
    assert grid is not None and grid.shape == (16, 16)
    assert grid[4:8, 4:8].min() > 0.99 and grid[:4].max() == 0 and grid[8:].max() == 0
    import torch

    assert np.array_equal(decode_heatmap(encode_heatmap(torch.from_numpy(amap)[None, None], 16, 0.6)), grid)
    for bad in ({**msg, "data": "%%%"}, {**msg, "size": [17, 16]}, {**msg, "encoding": "png"}, {"size": 3}):
        assert decode_heatmap(bad) is None


def test_result_state_active_stale_silent_and_restarted() -> None:
    state = ResultState(OverlayOptions(max_result_age_s=1.0, heartbeat_timeout_s=3.0))
    assert not state.view(now=0).active and state.view(now=0).reason == "no contact with the monitor"
    state.update(stamp("heartbeat", 0, uptime_s=1, state="running", last_frame_id=None, last_seq={}), now=10)
    assert state.view(now=10).reason == "no results yet"
    state.update(stamp("score", 0, **score_message(5, 0.5, event_id=0)), now=10)
    state.update(stamp("alert", 0, event="start", event_id=0, modality="wli"), now=10)
    v = state.view(now=10.5)
    assert v.active and v.event_id == 0 and v.score == 0.5 and v.location["box"] == [100, 80, 60, 50]
    assert state.take_event_starts() == [0] and state.take_event_starts() == []
    state.update(stamp("heartbeat", 1, uptime_s=2, state="running", last_frame_id=5, last_seq={}), now=12)
    assert state.view(now=12).reason == "no results for 2.0 s"  # heartbeats alone: the scorer is stuck
    assert state.view(now=15.5).reason == "monitor silent for 4 s"
    state.update(stamp("score", 0, boot="c" * 32, **score_message(0, 0.1)), now=16)  # a restarted monitor
    v = state.view(now=16)
    assert v.active and v.event_id is None and state.counts["boot_changes"] == 1  # the old event is gone
    state.update(stamp("status", 3, boot="c" * 32, state="stopped", source={}, scorer={}, open_events=[],
                       message=None), now=16)
    assert state.view(now=16).reason == "monitor stopped"
    # a branch that throws: the monitor says so at once, and the overlay with it, before results age
    state.update(stamp("score", 1, boot="c" * 32, **score_message(1, 0.1)), now=17)
    failing = dict(state="degraded", source={}, open_events=[], message="WLI branch failed on frame 2: …")
    state.update(stamp("status", 4, boot="c" * 32, scorer={"state": "failing"}, **failing), now=17.1)
    assert state.view(now=17.1).reason == "the monitor's branch is failing"
    state.update(stamp("status", 5, boot="c" * 32, scorer={"state": "ready"}, **{**failing, "state": "running"}),
                 now=17.2)
    state.update(stamp("score", 2, boot="c" * 32, **score_message(3, 0.1)), now=17.2)
    assert state.view(now=17.3).active
    assert state.take_problems() == [f"monitor restarted (boot {'c' * 8})"] and state.take_problems() == []
    for k in range(30):  # more than the 20 the summary keeps: the console still hears of each one
        state.problem(f"bad {k}")
    assert state.take_problems() == [f"bad {k}" for k in range(30)] and len(state.problems) == 20


def scope_frame(w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame as an endoscope sends it: a lit disc of mucosa on black, the scope's text in all four
    corners and a green position box; returns (frame, the lit disc, the text and box pixels)."""
    img = np.zeros((h, w, 3), np.uint8)
    r = int(0.47 * h)
    cv2.circle(img, (w // 2, h // 2), r, (190, 90, 80), -1)
    lit = img.max(axis=2) > 0
    s = h / 480
    for text, org in (("ID 0042  F 61Y", (8, 22)), ("2026/12/08 09:41:07", (8, 44)), ("GIF-HQ190", (w - 150 * s, 22)),
                      ("Eh:A5 Ce:1", (w - 150 * s, h - 12)), ("CVP:2", (8, h - 12))):
        cv2.putText(img, text, (int(org[0]), int(org[1] * s) if org[1] < 100 else int(h - 12 * s)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.55 * s, (255, 255, 255), max(1, int(2 * s)), cv2.LINE_AA)
    cv2.rectangle(img, (int(8 * s), int(h - 90 * s)), (int(70 * s), int(h - 40 * s)), (40, 220, 40), max(1, int(2 * s)))
    text = (img.max(axis=2) > 0) & ~lit
    return img, lit, cv2.dilate(text.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)])
def test_the_calm_look_writes_nothing_on_the_scope_text_and_keeps_off_the_image(size: tuple[int, int]) -> None:
    base, lit, text = scope_frame(*size)
    opts, debug = OverlayOptions(), OverlayOptions(debug=True)
    assert not opts.heatmap and not opts.debug, "clinical default: no heat map, no numbers"
    w, h = size
    loc = {"box": [w // 2 - 60, h // 2 - 40, 120, 80], "contour": [], "peak": [w // 2, h // 2]}
    grid = np.zeros((8, 8), np.float32)
    grid[3:5, 3:5] = 1.0
    side = int(0.94 * h)
    views = {
        "idle": View(active=True, score=0.1, threshold=0.3, modality="wli", backend="eager", result_age_ms=30,
                     heatmap=grid, heat_box=((w - side) // 2, (h - side) // 2, side)),
        "alert": View(active=True, score=0.5, threshold=0.3, modality="wli", backend="eager", event_id=3, location=loc,
                      result_age_ms=30, display_latency_ms=9),
        "inactive": View(active=False, reason="no results for 1.2 s", display_latency_ms=9),
    }
    layout = Layout.measure(base)
    for name, view in views.items():
        for o in (opts, debug):
            out = draw_overlay(base.copy(), view, o, layout)
            changed = (out != base).any(axis=2)
            assert changed.any(), name
            assert not (changed & text).any(), f"{name}: the overlay wrote on the scope's own text"
            on_image = changed & lit
            if name == "alert":  # on the image: the box, and nothing else
                assert box_on(out, loc["box"]) > 0.9
                x, y, bw, bh = loc["box"]
                around = np.zeros_like(lit)
                pad = int(0.008 * w) + 3
                around[y - pad:y + bh + pad + 1, x - pad:x + bw + pad + 1] = True
                around[y + pad:y + bh - pad, x + pad:x + bw - pad] = False
                assert not (on_image & ~around).any(), "nothing but the box on the image"
            else:
                assert not on_image.any(), f"{name}: nothing on the image (the heat map is off by default)"
            if name == "inactive":  # unmistakable: a large amber label, outside the image here
                assert amber_label(out) > 0.002 * w * h
            else:
                assert amber_label(out) == 0 and not (np.abs(out.astype(int) - ALERT_RED).max(axis=-1) < 30).all(axis=1).any()
        n_calm, n_debug = ((draw_overlay(base.copy(), view, o, layout) != base).any(axis=2).sum() for o in (opts, debug))
        assert n_debug > n_calm, f"{name}: debug adds the numbers"
    heat = draw_overlay(base.copy(), views["idle"], OverlayOptions(heatmap=True), layout)
    assert ((heat != base).any(axis=2) & lit).any(), "key h: the heat map is blended where the map is hot"


def test_box_and_heat_map_share_one_mapping() -> None:
    """The box (`locate` on the branch's map) and the heat map (its 64×64 grid laid over the crop
    square) land on the same source pixels, at full size and scaled for a smaller window."""
    amap = np.zeros((256, 256), np.float32)
    amap[150:190, 40:100] = 1.0  # a lesion off-centre in the crop: an offset between the two would show
    crop = (173, 31, 418)  # x0, y0, side in a 640x480 frame
    loc = locate(amap, crop, 0.6)
    assert loc is not None
    for factor in (1.0, 0.5):
        view = scale_view(View(active=True, score=0.5, threshold=0.25, location=loc, heat_box=crop,
                               heatmap=decode_heatmap(encode_heatmap(amap, 64, 0.5))), factor)
        shape = (int(480 * factor), int(640 * factor), 3)
        plain = replace_view(view, location=None)
        heat = draw_overlay(np.zeros(shape, np.uint8), plain, OverlayOptions(heatmap=True, opacity=1.0))
        heat[(heat == draw_overlay(np.zeros(shape, np.uint8), plain, OverlayOptions())).all(axis=2)] = 0
        ys, xs = np.nonzero(heat.astype(int).sum(axis=2) > 200)  # the heat map at full opacity, nothing else
        hx0, hx1, hy0, hy1 = xs.min(), xs.max(), ys.min(), ys.max()
        bx, by, bw, bh = view.location["box"]
        cell = crop[2] * factor / 64
        for got, want in ((hx0, bx), (hy0, by), (hx1, bx + bw), (hy1, by + bh)):
            assert abs(int(got) - want) <= cell + 1, (factor, (hx0, hy0, hx1, hy1), view.location["box"])
        drawn = draw_overlay(np.zeros(shape, np.uint8), view, OverlayOptions())
        assert box_on(drawn, view.location["box"]) > 0.9


def replace_view(view: View, **changes: object) -> View:
    from dataclasses import replace

    return replace(view, **changes)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = c / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0, 1)
    return 255 * np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def test_the_box_colour_stands_out_on_red_mucosa_with_red_green_colour_blindness() -> None:
    """Protanopia and deuteranopia simulated with Machado, Oliveira & Fernandes 2009 (severity 1, on
    linear sRGB): the box colour stays far (CIELAB ΔE) from every colour of the scene, in normal
    vision and in both simulations, where a green box or a yellow one come close to some."""
    machado = {"normal": np.eye(3),
               "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                                       [-0.003882, -0.048116, 1.051998]]),
               "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                                         [-0.011820, 0.042940, 0.968881]])}
    scene = np.array([(190, 90, 80), (120, 40, 40), (220, 140, 120), (140, 20, 20),  # mucosa, blood
                      (200, 170, 60), (255, 250, 235), (30, 15, 15),  # bile, a glint, the dark lumen
                      (110, 130, 115), (120, 80, 50)], np.float64)  # NBI tones

    def lab(rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
        seen = _linear_to_srgb(_srgb_to_linear(np.asarray(rgb, np.float64)) @ m.T)
        return cv2.cvtColor((seen / 255).astype(np.float32).reshape(-1, 1, 3), cv2.COLOR_RGB2Lab).reshape(-1, 3)

    def worst(colour: tuple[int, int, int]) -> float:
        return min(float(np.linalg.norm(lab(scene, m) - lab(np.array([colour]), m), axis=1).min())
                   for m in machado.values())

    box = worst(BOX_COLOUR)
    assert box > 40, box
    for other in ((0, 200, 0), (255, 235, 0), (255, 255, 255)):  # green, yellow, white boxes
        assert box > worst(other) + 5, (other, worst(other), box)


def test_window_keys_toggle_heatmap_debug_opacity_and_quit() -> None:
    from realtime.clients.display import DisplayConfig, OverlayDisplay

    d = OverlayDisplay(DisplayConfig(source="synthetic", output="none"))
    assert not d.options.heatmap and not d.options.debug and d.options.opacity == 0.45
    assert not d._key("h") and d.options.heatmap
    assert not d._key("d") and d.options.debug
    assert not d._key("+") and d.options.opacity == 0.55
    assert not d._key("-") and not d._key("-") and d.options.opacity == 0.35
    assert not d._key(None) and d._key("q")


def test_file_output_keeps_timestamps_and_survives_a_looped_source(tmp_path: Path) -> None:
    from realtime.clients.display import FileOutput

    out = FileOutput(tmp_path / "o.mp4", 10, (1, 10))
    for pts in (0, 1, 2, 3, 0, 1, 2):  # --loop: the source starts over
        out.write(np.full((48, 63, 3), 40 * (pts + 1), np.uint8), pts)  # odd width: padded to even
    out.close()
    frames = frames_of(tmp_path / "o.mp4")
    assert [round(f.time, 3) for f in frames] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert (frames[0].width, frames[0].height) == (64, 48)


def test_scaled_view_and_a_smaller_annotated_video(tmp_path: Path) -> None:
    from realtime.clients.overlay import scale_view

    v = View(active=True, location={"box": [100, 80, 60, 50], "contour": [[100, 80], [160, 130]], "peak": [130, 105]},
             heat_box=(40, -20, 240))
    half = scale_view(v, 0.5)
    assert half.location == {"box": [50, 40, 30, 25], "contour": [[50, 40], [80, 65]], "peak": [65, 52]}
    assert half.heat_box == (20, -10, 120) and v.heat_box == (40, -20, 240), "the original is untouched"
    r = subprocess.run(display_cmd("tcp://127.0.0.1:1", "--source", "synthetic:seconds=1,size=320x240,fps=10", "--fast",
                                   "--output", "file", "--out", str(tmp_path / "small.mp4"), "--max-width", "160"),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    frames = frames_of(tmp_path / "small.mp4")
    assert len(frames) == 10 and (frames[0].width, frames[0].height) == (160, 120)


# ---------------------------------------------------------------------------- file mode with a real monitor


@pytest.mark.slow
def test_overlay_file_marks_exactly_the_alert_frames(lesion_video: tuple[Path, dict], tmp_path: Path) -> None:
    video, truth = lesion_video
    run_dir = tmp_path / "run"
    port = free_port_pair()
    proc = subprocess.run([sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--source", str(video),
                           "--fast", "--inference-workers", "1", "--backend", "eager",
                           "--publish", f"tcp://127.0.0.1:{port}",
                           "--run-dir", str(run_dir), "--overlay", "file",
                           "--overlay-draw-log", str(run_dir / "draws.jsonl"),
                           # this checks the overlay, not the model: 1.5× the calibrated sensitivity makes
                           # the demo bundle alert on this short clip's lesion
                           "--sensitivity", "1.5"],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    shown = summary["display"]
    assert shown["frames_shown"] == truth["frames"] and shown["frames_missed"] == 0

    out, src = frames_of(run_dir / "overlay.mp4"), frames_of(video)
    assert len(out) == len(src) == truth["frames"]
    assert [f.pts for f in out] == [f.pts for f in src], "same timing as the input"

    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    start = next(a for a in alerts if a["event"] == "start")
    end = next(a for a in alerts if a["event"] == "end")
    draws = [json.loads(line) for line in (run_dir / "draws.jsonl").read_text().splitlines()]
    assert [d["frame_id"] for d in draws] == list(range(truth["frames"]))
    marked = [d["frame_id"] for d in draws if d["box"]]
    # --fast: the capture runs up to 4 ring slots ahead of the scorer and the display shows each frame at
    # once, with the newest result it has: that of a frame up to ~6 frames back (one more in flight)
    lag = 7
    assert marked, "the open event is drawn"
    assert start["frame_id"] <= marked[0] and marked[-1] <= end["frame_id"] + lag, (marked, start["frame_id"],
                                                                                    end["frame_id"])
    assert set(range(start["frame_id"] + lag, end["frame_id"] + 1)) <= set(marked), "on every frame of the event"
    assert all(d["result_frame_id"] <= d["frame_id"] for d in draws if d["result_frame_id"] is not None)
    boxes = {tuple(d["box"]) for d in draws if d["box"]}
    assert len(boxes) > 1, "the box moves with the lesion, not one peak location held"
    for d in draws:  # the pixels: a box exactly where the log says, and no box hue on any other frame
        image = out[d["frame_id"]].to_ndarray(format="rgb24")
        if d["box"]:
            assert box_on(image, d["box"]) > 0.5, d
        elif d["active"] and d["event_id"] is None:
            assert box_hue(image).sum() < 20, d
    assert all(box_hue(f.to_ndarray(format="rgb24")).sum() < 20 for f in src), "the input has no such box"
    lat = shown["display_latency_ms"]
    assert lat["n"] == truth["frames"] and 0 < lat["p50"] <= lat["max"]


def test_the_box_drawn_on_a_frame_is_the_latest_score_location_never_the_peak(tmp_path: Path) -> None:
    """A test publisher: an event whose peak location sits in one corner, then scores whose own
    locations move (and one frame with none). Every drawn box is the location of the score drawn
    on that frame (the draw log says which), never the peak's."""
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    peak = {"box": [10, 10, 30, 30], "contour": [], "peak": [25, 25]}

    def where(k: int) -> dict | None:
        return None if k % 7 == 3 else {"box": [60 + 3 * (k % 40), 60, 50, 40], "contour": [], "peak": [80, 80]}

    with AlertPublisher(endpoint, run_dir=tmp_path / "pub", heartbeat_interval=0.2) as pub:
        disp = subprocess.Popen(display_cmd(endpoint, "--source", "synthetic:seconds=6,size=320x240,fps=10",
                                            "--output", "none", "--draw-log", str(tmp_path / "draws.jsonl")),
                                cwd=REPO, env=ENV, stderr=subprocess.DEVNULL)
        try:
            k = 0
            while disp.poll() is None and k < 200:
                if k % 5 == 0:  # the event, with its peak location, repeated for a late-joining SUB
                    pub.publish("alert", {"event": "start" if k == 0 else "update", "event_id": 0, "modality": "wli",
                                          "frame_id": k, "peak_frame_id": 0, "location": peak})
                pub.publish("score", {**score_message(k, 0.5, event_id=0), "location": where(k)})
                k += 1
                time.sleep(0.05)
            assert disp.wait(timeout=30) == 0
        finally:
            if disp.poll() is None:
                disp.kill()
    draws = [json.loads(line) for line in (tmp_path / "draws.jsonl").read_text().splitlines()]
    drawn = [d for d in draws if d["active"]]
    assert len(drawn) > 20
    for d in drawn:
        expected = where(d["result_frame_id"])
        assert d["box"] == (expected["box"] if expected else None), d
        assert d["box"] != peak["box"]
    assert any(d["box"] is None for d in drawn) and len({tuple(d["box"]) for d in drawn if d["box"]}) > 5


# ---------------------------------------------------------------------------- the scorer goes away and comes back


def _lines(proc: subprocess.Popen, sink: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            sink.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _wait(sink: list[str], text: str, after: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(after, len(sink)):
            if text in sink[i]:
                return i
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {sink[after:]}")


@pytest.mark.slow
def test_scorer_killed_shows_ai_not_active_and_recovers(tmp_path: Path) -> None:
    video = make_video(tmp_path / "n.mp4", 400, size=(320, 240), fps=10)  # 40 s of numbered frames
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    monitor = [sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--backend", "eager",
               "--source", "synthetic:seconds=120,size=320x240,fps=10", "--publish", endpoint,
               "--run-dir", str(tmp_path / "run")]
    disp = subprocess.Popen(display_cmd(endpoint, "--source", str(video), "--output", "file", "--out",
                                        str(tmp_path / "out.mp4"), "--summary", str(tmp_path / "display.json")),
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    _lines(disp, log)
    first = second = None
    try:
        first = subprocess.Popen(monitor, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        i = _wait(log, "AI active", 0, 60)  # results arrive: then the scorer dies
        first.kill()  # SIGKILL: no goodbye status, results just stop
        first.wait()
        i = _wait(log, "AI NOT ACTIVE: no results for", i, 5)
        second = subprocess.Popen(monitor, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(log, "AI active", i, 60)
        assert disp.wait(timeout=60) == 0, "".join(log)
    finally:
        for p in (disp, first, second):
            if p is not None and p.poll() is None:
                p.kill()
    summary = json.loads((tmp_path / "display.json").read_text())
    out = frames_of(tmp_path / "out.mp4")
    assert summary["frames_shown"] == len(out) == 400, "the video went on through it all"
    assert summary["messages"]["boot_changes"] == 1
    spans = summary["inactive_spans"]
    assert len(spans) >= 2 and spans[0][0] == 0, spans  # before the first monitor, then after the kill
    gap = spans[1]
    assert gap[1] < 399, "active again before the end"
    for k in (gap[0], (gap[0] + gap[1]) // 2, gap[1]):
        assert amber_label(out[k].to_ndarray(format="rgb24")) > 400, k  # the AI NOT ACTIVE label
    assert amber_label(out[gap[1] + 2].to_ndarray(format="rgb24")) < 20


# ---------------------------------------------------------------------------- bad input on the socket and the CLI


def test_garbage_other_schema_and_no_monitor_never_crash(tmp_path: Path) -> None:
    port = free_port_pair()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    disp = subprocess.Popen(display_cmd(f"tcp://127.0.0.1:{port}", "--source", "synthetic:seconds=6,size=160x120,fps=10",
                                        "--output", "none", "--summary", str(tmp_path / "d.json")),
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    _lines(disp, log)
    try:
        _wait(log, "AI NOT ACTIVE: no contact with the monitor", 0, 30)
        for _ in range(20):  # the SUB joins in its own time: repeat until it has seen everything
            pub.send_multipart([b"score", b"\xff\xfe not json"])
            pub.send_multipart([b"score", json.dumps(stamp("score", 0, **score_message(1, 0.1))
                                                     | {"schema": "cemd.monitor/9"}).encode()])
            pub.send_multipart([b"nonsense", b"{}"])
            pub.send_multipart(encode("score", stamp("score", 1, **score_message(2, 0.1))))
            time.sleep(0.1)
        _wait(log, "AI active", 0, 10)
        assert disp.wait(timeout=30) == 0, "".join(log)
    finally:
        if disp.poll() is None:
            disp.kill()
        pub.close(0)
        ctx.term()
    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary["frames_shown"] == 60
    text = " ".join(summary["problems"])
    assert "major version 9" in text and "not UTF-8 JSON" in text
    assert summary["messages"]["bad_messages"] >= 2


def test_unreachable_monitor_and_wrong_keys_show_ai_not_active(tmp_path: Path) -> None:
    from realtime.publish.keys import generate_keypair

    port = free_port_pair()
    keys = tmp_path / "keys"
    for name in ("monitor", "client", "stranger"):
        generate_keypair(keys, name)
    with AlertPublisher(f"tcp://127.0.0.1:{port}", run_dir=tmp_path / "pub", heartbeat_interval=0.2,
                        curve=_curve(keys)):
        # the monitor runs, with CURVE on; this client's keys are not the ones it expects
        r = subprocess.run(display_cmd(f"tcp://127.0.0.1:{port}", "--source", "synthetic:seconds=3,size=160x120,fps=10",
                                       "--output", "none", "--summary", str(tmp_path / "d.json"),
                                       "--curve-secret", str(keys / "client.key_secret"),
                                       "--curve-server-key", str(keys / "stranger.key")),
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "AI NOT ACTIVE: no contact with the monitor" in r.stderr, r.stderr
    assert json.loads((tmp_path / "d.json").read_text())["inactive_frames"] == 30
    r = subprocess.run(display_cmd("tcp://127.0.0.1:1", "--source", "synthetic:seconds=1,size=160x120,fps=10",
                                   "--output", "none", "--fast"),
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no contact with the monitor" in r.stderr and "Traceback" not in r.stderr


def _curve(keys: Path):
    from realtime.publish.publisher import CurveServerConfig

    allow = keys / "allow"
    allow.mkdir()
    shutil.copy(keys / "client.key", allow / "client.key")
    return CurveServerConfig(keys / "monitor.key_secret", allow)


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --source --ring is required"),
    (["--source", "synthetic", "--output", "file"], "--output file needs --out"),
    (["--source", "nosuch.mp4", "--output", "none"], "nosuch.mp4"),
    (["--source", "synthetic", "--opacity", "3"], "--opacity must be between"),
    (["--ring", "cemd_ring_0_nope", "--output", "none"], "cannot attach to capture ring"),
    (["--source", "synthetic", "--cue", "nosuch.wav"], "no sound file"),
])
def test_bad_arguments_one_message_exit_2(args: list[str], message: str) -> None:
    env = {k: v for k, v in ENV.items() if k != "DISPLAY"}
    r = subprocess.run(display_cmd("tcp://127.0.0.1:1", *args), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_window_without_a_screen_says_so() -> None:
    env = {k: v for k, v in ENV.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = subprocess.run(display_cmd("tcp://127.0.0.1:1", "--source", "synthetic:seconds=1", "--output", "window"),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs a screen" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- window mode on a virtual X server


@pytest.mark.skipif(shutil.which("Xvfb") is None or shutil.which("xwd") is None,
                    reason="needs Xvfb and xwd (apt-get install xvfb x11-apps; .ci/run installs them)")
def test_window_mode_under_a_virtual_x_server(tmp_path: Path) -> None:
    xvfb, screen = start_xvfb()
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    env = dict(ENV, DISPLAY=f":{screen}", QT_QPA_PLATFORM="xcb")
    disp = None
    try:
        with AlertPublisher(endpoint, run_dir=tmp_path / "pub", heartbeat_interval=0.2) as pub:
            disp = subprocess.Popen(display_cmd(endpoint, "--source", "synthetic:seconds=30,size=320x240,fps=10",
                                                "--output", "window", "--cue", "bell",
                                                "--summary", str(tmp_path / "d.json")),
                                    cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
            log: list[str] = []
            _lines(disp, log)
            amap = np.zeros((256, 256), np.float32)
            amap[100:160, 100:160] = 0.6
            deadline, shot = time.monotonic() + 30, None
            k = 0
            while time.monotonic() < deadline:
                if k % 5 == 0:  # the SUB joins in its own time: keep the event's updates coming
                    pub.publish("alert", {"event": "start" if k == 0 else "update", "event_id": 0,
                                          "modality": "wli", "frame_id": k})
                pub.publish("score", score_message(k, 0.5, event_id=0))
                pub.publish("map", {"frame_id": k, "modality": "wli", "box": [40, 0, 240],
                                    **encode_heatmap(amap, 32, 0.6)})
                k += 1
                time.sleep(0.1)
                if k % 10 == 0 and any("AI active" in line for line in log):
                    r = subprocess.run(["xwd", "-root", "-silent", "-display", f":{screen}"], capture_output=True,
                                       timeout=20)
                    shot = read_xwd(r.stdout)
                    if box_anywhere(shot):
                        break
            if shot is not None and not box_anywhere(shot):
                import cv2

                cv2.imwrite(str(tmp_path / "overlay-window-failed.png"), shot[..., ::-1])
            assert shot is not None and box_anywhere(shot), (
                f"no lesion box on screen :{screen} after {k} frames published "
                f"({'no screenshot taken' if shot is None else f'screen mean {shot.mean():.1f}, saved to {tmp_path}'}); "
                f"display log:\n{''.join(log)}")
            # the audible cue: a new event starts now that the display surely listens
            for j in range(10):
                pub.publish("alert", {"event": "start" if j == 0 else "update", "event_id": 1, "modality": "wli",
                                      "frame_id": k + j})
                pub.publish("score", score_message(k + j, 0.5, event_id=1))
                time.sleep(0.1)
            import cv2

            cv2.imwrite(str(tmp_path / "overlay-window.png"), shot[..., ::-1])
            if os.environ.get("CEMD_SCREENSHOT_DIR"):  # keep it (docs/img has real runs' from bench.overlay_screens)
                shutil.copy(tmp_path / "overlay-window.png", os.environ["CEMD_SCREENSHOT_DIR"])
            disp.send_signal(signal.SIGTERM)
            assert disp.wait(timeout=30) == 0, "".join(log)
    finally:
        if disp is not None and disp.poll() is None:
            disp.kill()
        xvfb.kill()
        xvfb.wait(timeout=10)
    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary["output"] == "window" and summary["alert_frames"] > 0
    assert summary["cues"] >= 1 and "\a" in "".join(log)  # a bell per event start it received


def box_anywhere(shot: np.ndarray) -> bool:
    """The lesion box on screen (the window may sit anywhere): rows and columns of its colour."""
    mask = (np.abs(shot.astype(int) - np.array(BOX_COLOUR)).max(axis=-1) < 30)
    return bool((mask.sum(axis=1) > 40).sum() >= 2 and (mask.sum(axis=0) > 30).sum() >= 2)


def test_the_display_section_of_a_config_file_sets_the_look_and_flags_win(tmp_path: Path) -> None:
    import argparse

    from engine.errors import CemdError
    from realtime.clients.display import add_arguments, config_from_args
    from realtime.clients.display_process import DisplayProcess
    from realtime.config import MonitorConfig, load_config

    cfg_file = tmp_path / "monitor.toml"
    cfg_file.write_text("[display]\nheatmap = false\nopacity = 0.8\nmax_result_age_s = 2.5\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    look = config_from_args(p.parse_args(["--source", "synthetic", "--config", str(cfg_file)])).options
    assert (look.heatmap, look.opacity, look.max_result_age_s) == (False, 0.8, 2.5)
    look = config_from_args(p.parse_args(["--source", "synthetic", "--config", str(cfg_file), "--opacity", "0.3"])).options
    assert look.opacity == 0.3 and look.max_result_age_s == 2.5  # the command line wins
    assert config_from_args(p.parse_args(["--source", "synthetic"])).options == OverlayOptions()
    cfg_file.write_text("[display]\nopacity = 3.0\n")
    with pytest.raises(CemdError, match="opacity must be between"):
        load_config(cfg_file).validate()
    # the monitor hands its [display] section to the display it starts
    cfg = MonitorConfig()
    cfg.run.overlay, cfg.display.heatmap, cfg.display.opacity = "none", False, 0.7
    cmd = DisplayProcess.command(cfg.run, cfg.display, "tcp://*:5556", tmp_path)  # nothing is started
    assert cmd[cmd.index("--opacity") + 1] == "0.7" and "--no-heatmap" in cmd and "tcp://127.0.0.1:5556" in cmd
