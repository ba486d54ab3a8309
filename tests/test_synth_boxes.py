"""Ground-truth lesion boxes of synthetic videos (`cemd synth-video --boxes-out`, `render_video(boxes_out=...)`).

One short video (seed 3, 6 s at 15 fps, 320x240: an elevated erythema, visible in WLI, is in view
from frame 51 to the end) is rendered with and without lesions; the boxes file must agree with the
events file frame by frame and must cover what the lesion changes in the decoded video.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import CemdError
from engine.synth.video import PRESENCE_FRACTION, VideoScene, render_video

REPO = Path(__file__).resolve().parents[1]
SEED, SECONDS, FPS, SIZE = 3, 6, 15, (320, 240)
DIFF_THRESHOLD = 20  # grey levels (max over RGB) between the decoded lesion and lesion-free frames
MIN_IOU, MIN_INSIDE = 0.5, 0.8  # box vs. the region the lesion changes


def _read_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _decode(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("boxes")
    events = render_video(d / "v.mp4", SEED, SECONDS, FPS, SIZE, d / "v.events.json", progress=False,
                          boxes_out=d / "deeper" / "v.boxes.jsonl")
    clean_events = render_video(d / "n.mp4", SEED, SECONDS, FPS, SIZE, progress=False, lesions=False,
                                boxes_out=d / "n.boxes.jsonl")
    return {"dir": d, "events": events, "clean_events": clean_events,
            "boxes": _read_lines(d / "deeper" / "v.boxes.jsonl"), "clean_boxes": _read_lines(d / "n.boxes.jsonl"),
            "scene": VideoScene(SEED, SECONDS, FPS, SIZE)}


def test_one_line_per_frame_in_order(rendered: dict) -> None:
    n = rendered["events"]["frames"]
    assert n == SECONDS * FPS
    for rows in (rendered["boxes"], rendered["clean_boxes"]):
        assert [r["frame_id"] for r in rows] == list(range(n))
        for r in rows:
            assert set(r) == {"frame_id", "boxes", "ids"} and len(r["boxes"]) == len(r["ids"])
            for box in r["boxes"]:
                assert len(box) == 4 and all(isinstance(v, int) for v in box)
    assert not list(rendered["dir"].rglob("*.tmp"))  # written via FILE.tmp, then renamed


def test_frames_with_boxes_are_exactly_the_event_intervals(rendered: dict) -> None:
    events, rows = rendered["events"], rendered["boxes"]
    assert events["lesions"], f"seed {SEED} should show a lesion in {SECONDS} s"
    expected: dict[int, set[int]] = {i: set() for i in range(events["frames"])}
    for e in events["lesions"]:
        for i in range(e["start_frame"], e["end_frame"] + 1):
            expected[i].add(e["id"])
    assert {r["frame_id"]: set(r["ids"]) for r in rows} == expected
    assert all(len(set(r["ids"])) == len(r["ids"]) for r in rows)
    assert not rows[0]["boxes"] and any(r["boxes"] for r in rows)
    # The same rule as the events: present ⇔ at least PRESENCE_FRACTION of the lesion in view.
    vis = rendered["scene"].visible_fractions()
    for r in rows:
        assert set(r["ids"]) == set(np.flatnonzero(vis[r["frame_id"]] >= PRESENCE_FRACTION).tolist())
    # Without lesions: the events list none, and every frame's boxes are empty.
    assert rendered["clean_events"]["lesions"] == []
    assert all(r["boxes"] == [] and r["ids"] == [] for r in rendered["clean_boxes"])
    assert len(rendered["clean_boxes"]) == events["frames"]


def test_boxes_lie_inside_the_frame_and_the_field_of_view(rendered: dict) -> None:
    scene: VideoScene = rendered["scene"]
    w_img, h_img = SIZE
    lo_x, hi_x = math.floor(scene.cx - scene.radius), math.ceil(scene.cx + scene.radius)
    lo_y, hi_y = math.floor(scene.cy - scene.radius), math.ceil(scene.cy + scene.radius)
    fov = scene.fov_mask()
    for r in rendered["boxes"]:
        for x, y, w, h in r["boxes"]:
            assert w >= 1 and h >= 1
            assert 0 <= x and 0 <= y and x + w <= w_img and y + h <= h_img
            assert lo_x <= x and x + w - 1 <= hi_x and lo_y <= y and y + h - 1 <= hi_y
            # Tight: every edge row and column of the box touches a lit pixel.
            assert fov[y, x : x + w].any() and fov[y + h - 1, x : x + w].any()
            assert fov[y : y + h, x].any() and fov[y : y + h, x + w - 1].any()
    # The file holds what the scene computes.
    assert [{k: r[k] for k in ("frame_id", "boxes", "ids")} for r in scene.boxes()] == rendered["boxes"]


def test_boxes_follow_the_camera(rendered: dict) -> None:
    boxes = [tuple(b) for r in rendered["boxes"] for b, j in zip(r["boxes"], r["ids"]) if j == 0]
    assert len(boxes) >= 10
    assert len(set(boxes)) >= len(boxes) // 2  # the scope moves: the box moves with it
    centres = np.array([(x + w / 2, y + h / 2) for x, y, w, h in boxes])
    assert np.ptp(centres, axis=0).max() >= 10


def test_boxes_cover_what_the_lesion_changes_in_the_decoded_video(rendered: dict) -> None:
    # lesions=False renders the same camera path and screen effects (the path, modality, blur,
    # glint and noise streams do not depend on the lesions), so the frames differ only where a
    # lesion is drawn; the clock and corner text are identical in both and cancel.
    scene = rendered["scene"]
    clean = VideoScene(SEED, SECONDS, FPS, SIZE, lesions=False)
    for a, b in ((scene.path.x, clean.path.x), (scene.path.y, clean.path.y), (scene.path.angle, clean.path.angle)):
        assert np.array_equal(a, b)
    assert np.array_equal(scene.frame(0), clean.frame(0))

    d = rendered["dir"]
    with_lesion, without = _decode(d / "v.mp4"), _decode(d / "n.mp4")
    assert len(with_lesion) == len(without) == len(rendered["boxes"])
    def overlap(changed: np.ndarray, x: int, y: int, w: int, h: int) -> tuple[float, float]:
        box = np.zeros_like(changed)
        box[max(0, y) : y + h, max(0, x) : x + w] = True
        return float((changed & box).sum() / (changed | box).sum()), float((changed & box).sum() / changed.sum())

    lit = [r for r in rendered["boxes"] if r["boxes"]]
    assert len(lit) >= 20
    for r in lit:  # every frame with a box, including those where the FOV edge clips the lesion
        i = r["frame_id"]
        (x, y, w, h), = r["boxes"]
        changed = np.abs(with_lesion[i].astype(int) - without[i].astype(int)).max(-1) > DIFF_THRESHOLD
        assert changed.sum() >= 200, i
        iou, inside = overlap(changed, x, y, w, h)
        assert iou >= MIN_IOU and inside >= MIN_INSIDE, (i, r["boxes"], round(iou, 2), round(inside, 2))
        # The tolerance is not vacuous: the same box one width to the side fails it.
        iou, inside = overlap(changed, x - w if x + 2 * w > SIZE[0] else x + w, y, w, h)
        assert iou < MIN_IOU and inside < MIN_INSIDE, (i, "shifted box passes")
    frames_without = [i for i, r in enumerate(rendered["boxes"]) if not r["boxes"]]
    assert np.array_equal(with_lesion[frames_without[0]], without[frames_without[0]])


def test_boxes_out_must_be_a_new_file_path(tmp_path: Path) -> None:
    for bad in (tmp_path / "v.mp4", tmp_path / "v.events.json"):
        with pytest.raises(CemdError, match="must differ"):
            render_video(tmp_path / "v.mp4", SEED, 1, 8, (160, 120), tmp_path / "v.events.json", progress=False,
                         boxes_out=bad)
    assert not list(tmp_path.iterdir())


def _cemd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400"}  # one line for the closing summary, paths unbroken
    return subprocess.run([sys.executable, "-m", "realtime.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_cli_writes_the_boxes_and_says_where(tmp_path: Path) -> None:
    boxes = tmp_path / "made" / "here" / "clip.boxes.jsonl"
    proc = _cemd("synth-video", "--out", str(tmp_path / "clip.mp4"), "--seed", "1", "--seconds", "2", "--fps", "8",
                 "--size", "160x120", "--no-progress", "--boxes-out", str(boxes))
    assert proc.returncode == 0, proc.stderr
    rows = _read_lines(boxes)
    events = json.loads((tmp_path / "clip.events.json").read_text())
    assert [r["frame_id"] for r in rows] == list(range(events["frames"])) == list(range(16))
    assert sum(bool(r["boxes"]) for r in rows) == sum(e["end_frame"] - e["start_frame"] + 1 for e in events["lesions"])
    assert f"boxes → {boxes}" in proc.stdout

    proc = _cemd("synth-video", "--out", str(tmp_path / "normal.mp4"), "--seed", "1", "--seconds", "2", "--fps", "8",
                 "--size", "160x120", "--no-progress", "--no-lesions", "--boxes-out", str(tmp_path / "normal.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert all(r["boxes"] == [] for r in _read_lines(tmp_path / "normal.jsonl"))


def test_cli_refuses_a_folder_as_boxes_out_before_rendering(tmp_path: Path) -> None:
    folder = tmp_path / "boxes"
    folder.mkdir()
    out = tmp_path / "video" / "clip.mp4"
    proc = _cemd("synth-video", "--out", str(out), "--seed", "1", "--seconds", "2", "--fps", "8", "--size", "160x120",
                 "--no-progress", "--boxes-out", str(folder))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a folder" in lines[0] and str(folder) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not out.parent.exists() and not list(folder.iterdir())
