"""Modality routing accuracy on synthetic examination videos with WLI↔NBI switches (SYNTHETIC).

Every frame of each video goes through the monitor's own preprocessing and ``ModalityRouter``
(the bundle's colour classifier + hysteresis); the branch it picks is compared with the
video's ground-truth modality. Reports accuracy per video and overall, switches followed, and
the delay (frames) after each true switch.

    python -m bench.routing_accuracy --bundle models/demo --seeds 101-106 --seconds 60 --json runs/routing.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.provenance import provenance
from engine.synth.video import VideoScene
from realtime.scoring.preprocess import FramePreprocessor
from realtime.scoring.routing import ModalityClassifier, ModalityRouter, routing_accuracy


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def route_video(classifier: ModalityClassifier, seed: int, seconds: float, size: tuple[int, int], fps: float,
                switch_frames: int, confidence: float) -> dict:
    scene = VideoScene(seed, seconds, fps, size)
    pre = FramePreprocessor(256)
    router = ModalityRouter(classifier, switch_frames, confidence)
    chosen, truth = [], []
    for i in range(scene.n_frames):
        _, crop, _ = pre(scene.frame(i))
        chosen.append(router.update(crop).modality)
        truth.append(scene.modality(i))
    true_switches = [i for i in range(1, len(truth)) if truth[i] != truth[i - 1]]
    delays = []
    for s in true_switches:
        k = s
        while k < len(chosen) and chosen[k] != truth[s]:
            k += 1
        delays.append(k - s)
    return {"seed": seed, "frames": len(truth), "accuracy": routing_accuracy(chosen, truth),
            "true_switches": len(true_switches), "router_switches": router.switches,
            "switch_delay_frames": delays}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("models/demo"))
    p.add_argument("--seeds", default="101-106")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--size", default="640x480")
    p.add_argument("--fps", type=float, default=30)
    p.add_argument("--switch-frames", type=int, default=2)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    classifier, warning = ModalityClassifier.for_bundle(args.bundle)
    if warning:
        print("warning:", warning)
    w, h = (int(v) for v in args.size.split("x"))
    videos = []
    for seed in parse_seeds(args.seeds):
        r = route_video(classifier, seed, args.seconds, (w, h), args.fps, args.switch_frames, args.confidence)
        videos.append(r)
        print(f"seed {seed}: {r['accuracy']:.4f} over {r['frames']} frames, switches {r['router_switches']}/"
              f"{r['true_switches']}, delays {r['switch_delay_frames']}")
    frames = sum(v["frames"] for v in videos)
    overall = sum(v["accuracy"] * v["frames"] for v in videos) / frames
    print(f"overall routing accuracy (SYNTHETIC): {overall:.4f} over {frames} frames "
          f"(switch_frames={args.switch_frames}, confidence={args.confidence})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"provenance": provenance(), "synthetic": True, "config": vars(args) | {
            "json": str(args.json), "bundle": str(args.bundle)}, "overall_accuracy": overall, "frames": frames,
            "videos": videos}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
