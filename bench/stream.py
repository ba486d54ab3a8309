"""Streaming benchmarks on a synthetic 1080p30 H.264 examination video (SYNTHETIC content).

Three measurements, each with provenance, written as JSON and printed as a table:

* ``throughput``: ``--fast`` (every frame, none dropped) against the two stages alone, measured in
  the same run: decode alone (the capture reader: PyAV decode + RGB conversion, one process),
  branch alone (preprocess + routing + branch on decoded frames held in memory), and the whole
  monitor as a subprocess. On a machine where decode and inference share the cores the target
  is 0.9 × 1/(1/decode + 1/branch); with spare cores 0.9 × min(decode, branch).
* ``latency``: the monitor paced at 30 fps (``--realtime --loop``) for ``--minutes``; a real SUB
  client records every score message: frame written into the ring → message published
  (``t_mono_ns − t_capture_mono_ns``, one host, one monotonic clock), per minute and overall, with
  the decision → publish delay and the frames dropped.

* ``display``: the monitor paced (``--realtime --loop``) with and without ``--overlay file``,
  alternating, ``--repeat`` rounds of ``--seconds-each``: the latency the overlay display adds
  (frame available in the ring → annotated frame written), the frames it showed and missed,
  and the monitor's own frame → published latency both ways.

    python -m bench.stream throughput --json runs/stream_throughput.json
    python -m bench.stream latency --minutes 5 --json runs/stream_latency.json
    python -m bench.stream display --size 640x480 --json runs/stream_display.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bench.provenance import provenance
from engine.malloc import tune_malloc
from engine.synth.video import parse_size
from realtime.stats import latency_summary
from tests.helpers.streams import free_port_pair, wait_for_line

REPO = Path(__file__).resolve().parent.parent


def bench_video(path: Path, seconds: float, size: tuple[int, int] = (1920, 1080), seed: int = 31) -> Path:
    """Render (once) the synthetic 30 fps H.264 video the benchmarks read (1080p unless --size)."""
    from engine.synth.video import render_video

    if not path.is_file():
        print(f"rendering {path} ({seconds:g} s, {size[0]}x{size[1]} at 30 fps, synthetic) …", flush=True)
        render_video(path, seed, seconds, 30, size, events_out=path.with_suffix(".events.json"))
    return path


def decode_alone(video: Path) -> dict[str, Any]:
    from realtime.capture.sources import open_reader, parse_source

    reader = open_reader(parse_source(str(video)))
    n, t0 = 0, time.perf_counter()
    try:
        while reader.read() is not None:
            n += 1
    finally:
        reader.close()
    s = time.perf_counter() - t0
    return {"frames": n, "seconds": round(s, 3), "fps": round(n / s, 2)}


def _branch_loop(video: str, bundle: str, backend: str, frames: int, build: bool, threads: int | None = None,
                 barrier: Any = None, results: Any = None) -> dict[str, Any]:
    """Preprocess + route + branch, the scorer's whole per-frame work, on frames already decoded.
    In a worker process (``barrier``, ``results``): starts timing with its siblings, reports to ``results``."""
    from engine.deploy.backends import load_scorer
    from engine.deploy.bundle import load_bundle
    from realtime.capture.sources import open_reader, parse_source
    from realtime.scoring.preprocess import FramePreprocessor
    from realtime.scoring.routing import ModalityClassifier, ModalityRouter

    if threads:
        torch.set_num_threads(threads)
    reader = open_reader(parse_source(str(video)))
    images = []
    try:
        while len(images) < 60 and (f := reader.read()) is not None:
            images.append(f.image)
    finally:
        reader.close()
    b = load_bundle(bundle)
    scorers = {m: load_scorer(b, m, backend, "cpu", build=build) for m in b.modalities}
    pre = FramePreprocessor(b.model.input_size)
    router = ModalityRouter(ModalityClassifier.for_bundle(b.path)[0])
    for img in images[:5]:  # warm-up
        t, crop, _ = pre(img)
        scorers[router.update(crop).modality](t)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for i in range(frames):
        t, crop, _ = pre(images[i % len(images)])
        scorers[router.update(crop).modality](t)
    s = time.perf_counter() - t0
    out = {"frames": frames, "seconds": round(s, 3), "fps": round(frames / s, 2),
           "backend": {m: sc.backend for m, sc in scorers.items()}}
    if results is not None:
        results.put(out)
    return out


def branch_alone(video: Path, bundle: str, backend: str, frames: int, build: bool, workers: int = 1
                 ) -> dict[str, Any]:
    """The branch's throughput alone: in this process with its torch threads (``workers`` 1), or in
    ``workers`` single-thread processes side by side, each on ``frames / workers`` frames, as the
    monitor's --inference-workers runs it (fps = all frames / the slowest worker's time)."""
    if workers < 2:
        return _branch_loop(str(video), bundle, backend, frames, build)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    each = -(-frames // workers)
    procs = [ctx.Process(target=_branch_loop, args=(str(video), bundle, backend, each, False, 1, barrier, results))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    parts = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    s = max(p["seconds"] for p in parts)
    return {"frames": each * workers, "seconds": s, "fps": round(each * workers / s, 2), "workers": workers,
            "backend": parts[0]["backend"]}


def messages_until_exit(client: Any, proc: subprocess.Popen, deadline: float | None = None) -> Iterator[dict | None]:
    """A client's messages until the monitor process exits (or ``deadline``); None every idle half second."""
    while deadline is None or time.monotonic() < deadline:
        msg = client.recv(timeout_s=0.5)
        if msg is None and proc.poll() is not None:
            return
        yield msg


def run_monitor(args: list[str], run_dir: Path, collect: bool, timeout: float) -> tuple[dict, list[dict]]:
    """The monitor as a subprocess; optionally a SUB client records every score message."""
    from realtime.clients.client import MonitorClient

    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--publish", endpoint,
           "--run-dir", str(run_dir), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scores: list[dict] = []
    lines: list[str] = []
    client = None
    try:
        lines = wait_for_line(proc, "loading bundle")
        if collect:
            client = MonitorClient(endpoint, topics=("score", "status"))
            for msg in messages_until_exit(client, proc, time.monotonic() + timeout):
                if msg is None:
                    continue
                if msg["topic"] == "score":
                    scores.append({"frame_id": msg["frame_id"], "e2e_ms": (msg["t_mono_ns"] - msg["t_capture_mono_ns"]) / 1e6,
                                   "t_mono_ns": msg["t_mono_ns"], **{f"{k}_ms": v for k, v in msg["timings_ms"].items()}})
                elif msg["state"] == "stopped":
                    break
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        if client:
            client.close()
    if proc.returncode != 0:
        raise SystemExit("monitor failed:\n" + "".join(lines) + (out or ""))
    return json.loads((run_dir / "summary.json").read_text()), scores


def throughput_round(args: argparse.Namespace, video: Path, k: int) -> dict[str, Any]:
    """Decode alone, the branch alone and the --fast pipeline for each --inference-workers count, in
    one round; the bound uses the fastest branch-alone configuration, whichever the pipeline used."""
    dec = decode_alone(video)
    workers = args.workers
    branch = {w: branch_alone(video, args.bundle, args.backend, args.branch_frames, build=True, workers=w)
              for w in workers}
    best = max(b["fps"] for b in branch.values())
    serial = 1 / (1 / dec["fps"] + 1 / best)
    parallel = min(dec["fps"], best)
    out: dict[str, Any] = {"decode_alone": dec, "branch_alone": {str(w): b for w, b in branch.items()},
                           "branch_alone_best_fps": best, "shared_cores_bound_fps": round(serial, 2),
                           "spare_cores_bound_fps": round(parallel, 2), "pipelines": {}}
    print(f"round {k}: decode alone {dec['fps']:.2f} fps · branch alone "
          + ", ".join(f"{w} worker{'s' if w > 1 else ''} {b['fps']:.2f} fps" for w, b in branch.items())
          + f" ({branch[workers[0]]['backend']}) · shared-core bound {serial:.2f} fps", flush=True)
    for w in workers:
        summary, _ = run_monitor(["--source", str(video), "--fast", "--bundle", args.bundle, "--backend", args.backend,
                                  "--inference-workers", str(w)],
                                 args.out_dir / f"throughput-run{k}-w{w}", collect=False, timeout=1800)
        pipe = summary["fps_scored"]
        print(f"  pipeline --fast --inference-workers {w}: {pipe:.2f} fps, {summary['frames_scored']} frames, "
              f"dropped {summary['frames_dropped']} → ratio to the shared-core bound {pipe / serial:.3f}, "
              f"to the spare-core bound {pipe / parallel:.3f}", flush=True)
        out["pipelines"][str(w)] = {
            "fps": pipe, "frames_scored": summary["frames_scored"], "frames_dropped": summary["frames_dropped"],
            "backend": summary["backend"], "latency_ms": summary["latency_ms"],
            "ratio_to_shared_cores_bound": round(pipe / serial, 3),
            "ratio_to_spare_cores_bound": round(pipe / parallel, 3)}
    return out


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """``--repeat`` rounds of (decode alone, branch alone, pipeline): each ratio uses its own round."""
    video = bench_video(args.video, args.seconds, args.size)
    torch.set_num_threads(os.cpu_count() or 1)
    args.workers = args.workers or [1, 2]
    rounds = [throughput_round(args, video, k) for k in range(1, args.repeat + 1)]
    medians: dict[str, Any] = {}
    for w in args.workers:
        shared = [r["pipelines"][str(w)]["ratio_to_shared_cores_bound"] for r in rounds]
        spare = [r["pipelines"][str(w)]["ratio_to_spare_cores_bound"] for r in rounds]
        medians[str(w)] = {"median_ratio_to_shared_cores_bound": round(float(np.median(shared)), 3),
                           "median_ratio_to_spare_cores_bound": round(float(np.median(spare)), 3)}
        print(f"--inference-workers {w}: ratio to the shared-core bound median {float(np.median(shared)):.3f} "
              f"(rounds {shared}; target ≥ 0.9) · to the spare-core bound median {float(np.median(spare)):.3f} "
              f"(rounds {spare})")
    return {"rounds": rounds, "medians": medians}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    """One paced run per --workers value (default: 1), in the order given."""
    runs = [latency_run(args, w) for w in (args.workers or [1])]
    return runs[0] if len(runs) == 1 else {"runs": runs}


def latency_run(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    video = bench_video(args.video, args.seconds, args.size)
    seconds = args.minutes * 60
    summary, scores = run_monitor(["--source", str(video), "--realtime", "--loop", "--bundle", args.bundle,
                                   "--backend", args.backend, "--max-seconds", str(seconds),
                                   "--fresh-wait", str(args.fresh_wait), "--inference-workers", str(workers)],
                                  args.out_dir / f"latency-run-w{workers}", collect=True, timeout=seconds + 600)
    if not scores:
        raise SystemExit("no score message received")
    t0 = scores[0]["t_mono_ns"]
    minutes = []
    for m in range(int(np.ceil(seconds / 60))):
        part = [s for s in scores if m * 60e9 <= s["t_mono_ns"] - t0 < (m + 1) * 60e9]
        if part:
            minutes.append({"minute": m + 1, "scored": len(part), "e2e_ms": latency_summary(s["e2e_ms"] for s in part),
                            "publish_ms": latency_summary(s["publish_ms"] for s in part)})
    res = {"minutes": args.minutes, "fresh_wait": args.fresh_wait, "inference_workers": workers,
           "frames_read": summary["frames_read"], "frames_scored": summary["frames_scored"],
           "frames_dropped": summary["frames_dropped"], "fps_scored": summary["fps_scored"],
           "backend": summary["backend"], "received_scores": len(scores),
           "e2e_ms": latency_summary(s["e2e_ms"] for s in scores),
           "publish_ms": latency_summary(s["publish_ms"] for s in scores),  # decision → stamped
           "publish_sent_ms": summary["latency_ms"]["publish"],  # decision → send returned
           "stages_ms": summary["latency_ms"], "per_minute": minutes}
    print(f"paced {args.size[0]}x{args.size[1]} at 30 fps for {args.minutes:g} min, --inference-workers {workers}: "
          f"scored {summary['frames_scored']} of {summary['frames_read']} read, "
          f"dropped {summary['frames_dropped']}; frame→published p50 {res['e2e_ms']['p50']:.1f} p99 "
          f"{res['e2e_ms']['p99']:.1f} max {res['e2e_ms']['max']:.1f} ms; decision → sent (summary) p99 "
          f"{summary['latency_ms']['publish']['p99']:.3f} ms, decision → stamped (messages) p99 "
          f"{res['publish_ms']['p99']:.3f} ms")
    for m in minutes:
        print(f"  minute {m['minute']}: p50 {m['e2e_ms']['p50']:.1f}  p99 {m['e2e_ms']['p99']:.1f}  "
              f"max {m['e2e_ms']['max']:.1f} ms  publish p99 {m['publish_ms']['p99']:.3f} ms")
    return res


def display(args: argparse.Namespace) -> dict[str, Any]:
    video = bench_video(args.video, args.seconds, args.size)
    rounds = []
    for k in range(1, args.repeat + 1):
        row: dict[str, Any] = {"round": k}
        for overlay in ("none", "file"):
            summary, _ = run_monitor(["--source", str(video), "--realtime", "--loop", "--bundle", args.bundle,
                                      "--backend", args.backend, "--max-seconds", str(args.seconds_each),
                                      "--overlay", overlay,
                                      *(["--overlay-max-width", str(args.overlay_max_width)]
                                        if args.overlay_max_width else [])],
                                     args.out_dir / f"display-{overlay}-{k}", collect=False,
                                     timeout=args.seconds_each + 300)
            row[overlay] = {"frames_read": summary["frames_read"], "frames_scored": summary["frames_scored"],
                            "e2e_ms": summary["latency_ms"]["end_to_end"]}
            if overlay == "file":
                d = summary["display"] or {}
                row["display"] = {k2: d.get(k2) for k2 in ("frames_shown", "frames_missed", "display_latency_ms",
                                                           "inactive_frames")}
        rounds.append(row)
        d, a, b = row["display"], row["none"]["e2e_ms"], row["file"]["e2e_ms"]
        lat = d["display_latency_ms"] or {}
        print(f"round {k}: display shown {d['frames_shown']} missed {d['frames_missed']} of "
              f"{row['file']['frames_read']} read; frame → written p50 {lat.get('p50')} p99 {lat.get('p99')} "
              f"max {lat.get('max')} ms; monitor frame → published p50 {a['p50']} / p99 {a['p99']} ms without the "
              f"display, {b['p50']} / {b['p99']} ms with it")
    return {"size": f"{args.size[0]}x{args.size[1]}", "overlay_max_width": args.overlay_max_width, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["throughput", "latency", "display"])
    p.add_argument("--bundle", default="models/demo")
    p.add_argument("--backend", default="auto")
    p.add_argument("--video", type=Path, default=REPO / "runs" / "bench-video" / "synth-1080p30.mp4")
    p.add_argument("--seconds", type=float, default=20, help="length of the rendered video")
    p.add_argument("--size", type=parse_size, default=(1920, 1080), help="WIDTHxHEIGHT of the rendered video")
    p.add_argument("--branch-frames", type=int, default=150)
    p.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")],
                   help="the monitor's --inference-workers counts to compare, e.g. 1,2 (throughput's default; "
                        "latency's is 1)")
    p.add_argument("--repeat", type=int, default=3, help="throughput rounds (the machine is shared and noisy)")
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--seconds-each", type=float, default=30, help="display: seconds per run")
    p.add_argument("--overlay-max-width", type=int, help="display: the monitor's --overlay-max-width")
    p.add_argument("--fresh-wait", type=float, default=0.5, help="the monitor's --fresh-wait (latency)")
    p.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench-stream")
    p.add_argument("--default-malloc", action="store_true",
                   help="glibc's default malloc settings everywhere (to measure what engine/malloc.py changes)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    # the stages alone get the allocator settings the monitor runs with (engine/malloc.py); with
    # --default-malloc neither does (the monitor subprocesses inherit the environment)
    if args.default_malloc:
        os.environ["CEMD_DEFAULT_MALLOC"] = "1"
    malloc = tune_malloc()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res = {"throughput": throughput, "latency": latency, "display": display}[args.what](args)
    out = {"benchmark": f"stream.{args.what}", "synthetic": True, "provenance": provenance(), "malloc": malloc,
           "config": {k: str(v) for k, v in vars(args).items()}, "results": res}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
