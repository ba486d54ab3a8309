"""Screenshots of the overlay window from real runs under a virtual X server (docs/img).

    python -m bench.overlay_screens --out docs/img [--sizes 640x480,1920x1080] [--seed 3]

For each size it renders a SYNTHETIC examination video, runs the monitor on it paced
(`run_stream.py --overlay window`, the demo bundle) under Xvfb, once with the default look and
once with `--debug-overlay`, waits until the overlay's draw log shows a box on the lesion (IoU
≥ 0.5 with the frame's ground-truth box, `--boxes-out`, for 8 frames in a row), and saves
the overlay window as ``overlay-{default,debug}-{W}x{H}.jpg``. Needs Xvfb, xwd and xwininfo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from bench.overlay_track import iou
from engine.synth.video import parse_size, render_video
from realtime.clients.overlay import BOX_COLOUR
from tests.helpers.streams import free_port_pair
from tests.helpers.xvfb import screenshot, start_xvfb

REPO = Path(__file__).resolve().parents[1]
WINDOW = "cemd overlay"


def first_box(draw_log: Path, truth: list[dict], hold: int) -> int | None:
    """The first frame from which the draw log has shown, ``hold`` frames in a row, a box on the
    lesion: IoU ≥ 0.5 with that frame's ground-truth box (the moment the screenshots show is
    chosen this way, and the docs say so)."""
    if not draw_log.exists():
        return None
    run = 0
    for line in draw_log.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            break
        gt = truth[d["frame_id"]]["boxes"] if d["frame_id"] < len(truth) else []
        on = bool(d.get("box")) and any(iou(d["box"], g) >= 0.5 for g in gt)
        run = run + 1 if on else 0
        if run >= hold:
            return int(d["frame_id"])
    return None


class NoShot(RuntimeError):
    pass


def window_shot(screen: int) -> np.ndarray:
    """The overlay window's pixels, cut from a screenshot of the whole screen (``xwd -name`` on the
    window itself gave black frames now and then at 1080p)."""
    info = subprocess.run(["xwininfo", "-display", f":{screen}", "-name", WINDOW], capture_output=True, text=True,
                          timeout=20, check=True).stdout
    geo = {k.strip(): int(v) for k, v in (line.split(":", 1) for line in info.splitlines()
                                         if line.strip().startswith(("Absolute upper-left", "Width", "Height")))}
    x, y = geo["Absolute upper-left X"], geo["Absolute upper-left Y"]
    shot = screenshot(screen)[y:y + geo["Height"], x:x + geo["Width"]]
    if shot.size == 0:
        raise ValueError("the window is off the screen")
    return shot


def box_pixels(shot: np.ndarray) -> int:
    """Pixels of the lesion box's colour on a screenshot."""
    return int((np.abs(shot.astype(np.int16) - np.array(BOX_COLOUR)).max(axis=-1) < 30).sum())


def shoot(video: Path, truth: list[dict], size: tuple[int, int], debug: bool, out: Path, work: Path,
          timeout: float, extra: list[str]) -> dict:
    w, h = size
    xvfb, screen = start_xvfb(f"{w + 200}x{h + 240}x24")
    draw_log = work / f"draws-{'debug' if debug else 'default'}-{w}x{h}.jsonl"
    draw_log.unlink(missing_ok=True)
    port = free_port_pair()
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--source", str(video), "--realtime",
           "--publish", f"tcp://127.0.0.1:{port}", "--run-dir", str(work / f"run-{w}x{h}-{int(debug)}"),
           "--overlay", "window", "--overlay-draw-log", str(draw_log), *extra]
    if debug:
        cmd.append("--debug-overlay")
    env = dict(os.environ, DISPLAY=f":{screen}", QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        frame = None
        while time.monotonic() < deadline and proc.poll() is None:
            frame = first_box(draw_log, truth, hold=8)
            if frame is not None:
                break
            time.sleep(0.2)
        shot = last = None
        while frame is not None and time.monotonic() < deadline and proc.poll() is None:
            try:  # the box is in the log: take the screen once it shows it too
                shot = window_shot(screen)
            except (subprocess.CalledProcessError, ValueError):  # the window is being mapped or redrawn
                shot = None
            if shot is not None and box_pixels(shot) >= 2 * min(w, h) // 4:
                break
            last = shot if shot is not None else last
            shot = None
            time.sleep(0.1)
        if shot is None:
            if last is not None:
                cv2.imwrite(str(work / f"failed-{out.name}"), last[..., ::-1])
            state = "exited" if proc.poll() is not None else "running"
            raise NoShot(f"no lesion box on screen within {timeout:.0f} s (monitor {state}; box in the draw log: "
                         f"{'frame ' + str(frame) if frame is not None else 'never'})")
        cv2.imwrite(str(out), shot[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        return {"file": str(out), "frame_id": frame, "window": [int(shot.shape[1]), int(shot.shape[0])]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        xvfb.kill()
        xvfb.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "overlay-screens")
    p.add_argument("--sizes", default="640x480,1920x1080")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for a box per run")
    p.add_argument("--sensitivity", type=float, default=1.0)
    args = p.parse_args(argv)
    if shutil.which("Xvfb") is None or shutil.which("xwd") is None:
        print("error: needs Xvfb and xwd (apt-get install xvfb x11-apps)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    shots = []
    for text in args.sizes.split(","):
        size = parse_size(text)
        video = args.work / f"synth-{size[0]}x{size[1]}-s{args.seed}.mp4"
        boxes = video.with_suffix(".boxes.jsonl")
        if not (video.exists() and boxes.exists()):
            render_video(video, args.seed, args.seconds, 30, size, progress=False, boxes_out=boxes)
        truth = [json.loads(line) for line in boxes.read_text().splitlines()]
        for debug in (False, True):
            out = args.out / f"overlay-{'debug' if debug else 'default'}-{size[0]}x{size[1]}.jpg"
            for attempt in range(1, 4):  # under Xvfb the OpenCV window stays black now and then (a new run fixes it)
                try:
                    shots.append(shoot(video, truth, size, debug, out, args.work, args.timeout,
                                       ["--sensitivity", str(args.sensitivity)]))
                    break
                except NoShot as exc:
                    print(f"{out.name}: attempt {attempt}: {exc}", flush=True)
            else:
                return 1
            print(f"{out}: frame {shots[-1]['frame_id']}, window {shots[-1]['window']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
