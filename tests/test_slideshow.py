"""`cemd slideshow`: a folder of drawn images → H.264 video + slides.json, checked by decoding with PyAV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="400")  # wide: rich must not wrap the lines we look for
# H.264 (crf 18, yuv420p) on a flat colour: the centre's mean stays within a few levels of the drawn
# RGB; 12 per channel leaves room for the RGB↔YUV round trip and is far below the gaps between colours.
TOLERANCE = 12.0

# name, (width, height), RGB colour: three sizes and the three suffixes a user is most likely to have
IMAGES = [
    ("a_red.png", (160, 120), (220, 30, 30)),
    ("b_green.jpg", (90, 140), (30, 200, 40)),
    ("c_blue.webp", (240, 100), (40, 50, 210)),
]


def cemd(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "realtime.cli", "slideshow", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)


def draw(folder: Path, images: list[tuple[str, tuple[int, int], tuple[int, int, int]]] = IMAGES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h), rgb in images:
        img = np.empty((h, w, 3), np.uint8)
        img[:] = rgb[::-1]  # cv2 writes BGR
        ok, data = cv2.imencode(Path(name).suffix, img, [cv2.IMWRITE_JPEG_QUALITY, 95] if name.endswith(".jpg") else [])
        assert ok
        (folder / name).write_bytes(data.tobytes())


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def centre_mean(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return frame[h // 2 - h // 8: h // 2 + h // 8, w // 2 - w // 8: w // 2 + w // 8].reshape(-1, 3).mean(axis=0)


def test_video_frames_and_slides(tmp_path: Path) -> None:
    images = tmp_path / "images"
    draw(images)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "new" / "folder" / "show.mp4"  # the output folder does not exist yet
    fps, seconds_each = 10, 1
    r = cemd(images, "--out", out, "--fps", fps, "--seconds-each", seconds_each)
    assert r.returncode == 0, r.stderr
    assert "30 frames" in r.stdout and "160x120" in r.stdout and str(out) in r.stdout
    assert "notes.txt" in r.stdout  # ignored, with a warning

    frames = decode(out)
    per = fps * seconds_each
    assert len(frames) == len(IMAGES) * per
    assert {f.shape for f in frames} == {(120, 160, 3)}  # the first image's size
    for k in range(len(frames)):
        expected = np.array(IMAGES[k // per][2], float)
        got = centre_mean(frames[k])
        assert np.abs(got - expected).max() <= TOLERANCE, (k, got, expected)

    # the tall green image is letterboxed: black bars left and right, none above and below
    green = frames[per + per // 2]
    assert green[:, :8].max() <= TOLERANCE and green[:, -8:].max() <= TOLERANCE
    assert np.abs(green[2, 80].astype(float) - IMAGES[1][2]).max() <= TOLERANCE * 2

    meta = json.loads((out.parent / "show.slides.json").read_text())
    assert meta["frames"] == len(frames) and meta["size"] == [160, 120] and meta["duration_s"] == 3.0
    assert [Path(s["image"]).name for s in meta["slides"]] == [n for n, _, _ in IMAGES]
    for i, s in enumerate(meta["slides"]):
        assert (s["first_frame"], s["last_frame"]) == (i * per, (i + 1) * per - 1)
        assert (s["start_ms"], s["end_ms"]) == (i * 1000.0, (i + 1) * 1000.0)
    assert meta["skipped"] == []


def test_size_and_fractional_timing(tmp_path: Path) -> None:
    draw(tmp_path / "images")
    out = tmp_path / "v.mp4"
    r = cemd(tmp_path / "images", "--out", out, "--fps", 4, "--seconds-each", 0.5, "--size", "96x96")
    assert r.returncode == 0, r.stderr
    frames = decode(out)
    assert len(frames) == len(IMAGES) * 2 and {f.shape for f in frames} == {(96, 96, 3)}
    blue = frames[4]  # 240x100 into 96x96: 96x40 with black bars above and below
    assert blue[:20].max() <= TOLERANCE and blue[-20:].max() <= TOLERANCE
    assert np.abs(centre_mean(blue) - IMAGES[2][2]).max() <= TOLERANCE
    slides = json.loads((tmp_path / "v.slides.json").read_text())["slides"]
    assert [(s["first_frame"], s["last_frame"], s["start_ms"], s["end_ms"]) for s in slides] == [
        (0, 1, 0.0, 500.0), (2, 3, 500.0, 1000.0), (4, 5, 1000.0, 1500.0)]


def test_odd_first_image_rounds_up_to_even(tmp_path: Path) -> None:
    draw(tmp_path / "images", [("x.png", (101, 75), (200, 200, 40))])
    out = tmp_path / "v.mp4"
    r = cemd(tmp_path / "images", "--out", out, "--fps", 3)
    assert r.returncode == 0, r.stderr
    frames = decode(out)
    assert len(frames) == 3 and frames[0].shape == (76, 102, 3)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path: Path) -> None:
    images = tmp_path / "images"
    draw(images)
    (images / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "v.mp4"
    r = cemd(images, "--out", out, "--fps", 5)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stdout and "b_broken.png" in r.stdout
    assert len(decode(out)) == len(IMAGES) * 5
    meta = json.loads((tmp_path / "v.slides.json").read_text())
    assert [Path(s["image"]).name for s in meta["slides"]] == [n for n, _, _ in IMAGES]
    assert [Path(s["image"]).name for s in meta["skipped"]] == ["b_broken.png"]
    assert meta["slides"][1]["first_frame"] == 5  # the slide after the skipped file follows at once


def test_no_readable_image_fails_naming_the_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "only.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    r = cemd(images, "--out", tmp_path / "v.mp4")
    assert r.returncode == 2
    assert "only.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_missing_folder(tmp_path: Path) -> None:
    r = cemd(tmp_path / "nowhere", "--out", tmp_path / "v.mp4")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_folder_without_images_names_the_suffixes(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("x")
    r = cemd(tmp_path / "images", "--out", tmp_path / "v.mp4")
    assert r.returncode == 2
    assert "no images" in r.stderr
    assert all(s in r.stderr for s in (".png", ".jpg", ".webp"))


@pytest.mark.parametrize("option", [("--fps", "0"), ("--fps", "-5"), ("--seconds-each", "0"),
                                    ("--seconds-each", "-1")])
def test_bad_rate_options(tmp_path: Path, option: tuple[str, str]) -> None:
    draw(tmp_path / "images")
    r = cemd(tmp_path / "images", "--out", tmp_path / "v.mp4", *option)
    assert r.returncode == 2
    assert option[0] in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "v.mp4").exists()
