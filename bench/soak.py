"""Bounded soak: the monitor paced on a looped synthetic 1080p30 examination (SYNTHETIC content).

    python -m bench.soak [--minutes 30] [--json runs/soak.json]

The real monitor runs as a subprocess (``--realtime --loop``, latest frame wins) for
``--minutes``; a real subscriber (``realtime.clients.client.MonitorClient``: gaps detected, missed alerts
replayed from the monitor's log) receives every topic. Every ``--sample-s`` seconds the
monitor's process tree (the monitor and its capture process) is sampled from ``/proc``: resident
memory, open file descriptors, threads. Per minute: frame → published latency percentiles,
frames scored and dropped (gaps in the score messages' ``frame_id``).

Pass criteria (issue #7), each reported with its numbers:

* **memory** — the tree's resident memory at the end is within 5 % of its level after warm-up
  (``--warmup-min``, default 2 minutes: model, buffers and allocator pools are in place by then);
* **file handles** — no more open descriptors at the end than after warm-up;
* **latency drift** — the median of the per-minute p50 latencies in the last third of the run is
  within 20 % (and 10 ms) of the first third's after warm-up; p99 reported the same way;
* **lost alerts** — every alert the monitor wrote to ``alerts.jsonl`` reached the subscriber
  (live or replayed), the log's ``seq`` has no hole, and the client counted no unrecoverable gap.

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.provenance import provenance
from bench.stream import bench_video, messages_until_exit
from engine.synth.video import parse_size
from realtime.stats import latency_summary
from tests.helpers.process_tree import process_tree
from tests.helpers.streams import free_port_pair, wait_for_line

REPO = Path(__file__).resolve().parent.parent


def sample_tree(pid: int) -> dict[str, Any]:
    """Resident memory (MiB), open descriptors and threads summed over the process tree."""
    rss_kb = fds = threads = procs = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss_kb += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
            procs += 1
        except OSError:
            continue
    return {"rss_mib": round(rss_kb / 1024, 1), "fds": fds, "threads": threads, "processes": procs}


def verdicts(samples: list[dict[str, Any]], minutes: list[dict[str, Any]], warmup_min: float,
             alerts_logged: list[int], alerts_received: set[int], unrecovered: int) -> dict[str, Any]:
    """``samples[i]["t_s"]`` and the minutes count from the first scored frame (model loading is not soak)."""
    after = [s for s in samples if s["t_s"] >= warmup_min * 60]
    out: dict[str, Any] = {}
    if len(after) >= 2:
        base, end = after[0], after[-1]
        growth = (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
        out["memory"] = {"after_warmup_mib": base["rss_mib"], "end_mib": end["rss_mib"],
                         "max_mib": max(s["rss_mib"] for s in after), "growth": round(growth, 4),
                         "pass": growth < 0.05}
        out["file_handles"] = {"after_warmup": base["fds"], "end": end["fds"], "max": max(s["fds"] for s in after),
                               "pass": end["fds"] <= base["fds"]}
    steady = [m for m in minutes if m["minute"] > warmup_min and m["scored"]]
    if len(steady) >= 3:
        k = max(1, len(steady) // 3)
        first, last = steady[:k], steady[-k:]
        p50a, p50b = (float(np.median([m["e2e_ms"]["p50"] for m in x])) for x in (first, last))
        p99a, p99b = (float(np.median([m["e2e_ms"]["p99"] for m in x])) for x in (first, last))
        out["latency_drift"] = {"first_third_p50_ms": round(p50a, 1), "last_third_p50_ms": round(p50b, 1),
                                "first_third_p99_ms": round(p99a, 1), "last_third_p99_ms": round(p99b, 1),
                                "pass": p50b <= max(1.2 * p50a, p50a + 10)}
    holes = sorted(set(range(min(alerts_logged), max(alerts_logged) + 1)) - set(alerts_logged)) if alerts_logged else []
    missing = sorted(set(alerts_logged) - alerts_received)
    out["alerts"] = {"logged": len(alerts_logged), "received": len(alerts_received & set(alerts_logged)),
                     "missing": missing[:20], "seq_holes_in_log": holes[:20], "unrecovered_gaps": unrecovered,
                     "pass": not missing and not holes and unrecovered == 0}
    out["pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from realtime.clients.client import MonitorClient

    video = bench_video(args.video, args.seconds, args.size, seed=args.seed)
    seconds = args.minutes * 60
    run_dir = args.out_dir / time.strftime("soak-%Y%m%d-%H%M%S")  # the alert log appends: one folder per run
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--publish", endpoint, "--run-dir",
           str(run_dir), "--source", str(video), "--realtime", "--loop", "--bundle", args.bundle, "--backend",
           args.backend, "--max-seconds", str(seconds), "--sensitivity", str(args.sensitivity)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = wait_for_line(proc, "loading bundle")
    client = MonitorClient(endpoint, history=True)
    scores: list[tuple[float, int, float]] = []  # (t since start s, frame_id, e2e ms)
    received: set[int] = set()
    samples: list[dict[str, Any]] = []
    states: list[str] = []
    boot = None
    t0 = time.monotonic()
    next_sample = t0
    try:
        for msg in messages_until_exit(client, proc):
            now = time.monotonic()
            if now >= next_sample:
                samples.append({"t_s": round(now - t0, 1), **sample_tree(proc.pid)})
                s = samples[-1]
                print(f"[{s['t_s'] / 60:5.1f} min since launch] rss {s['rss_mib']:.0f} MiB · fds {s['fds']} · threads "
                      f"{s['threads']} · scored {len(scores)} · alerts {len(received)}", flush=True)
                next_sample += args.sample_s
            if msg is None:
                continue
            boot = msg["boot_id"]  # this run's: the log is checked for its alerts only
            if msg["topic"] == "score":
                scores.append((time.monotonic() - t0, msg["frame_id"], (msg["t_mono_ns"] - msg["t_capture_mono_ns"]) / 1e6))
            elif msg["topic"] == "alert":
                received.add(msg["seq"])
            elif msg["topic"] == "status":
                if not states or states[-1] != msg["state"]:
                    states.append(msg["state"])
                if msg["state"] == "stopped":
                    break
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        unrecovered, gaps, replayed = client.unrecovered, client.gaps, client.replayed
        client.close()
    if proc.returncode != 0:
        raise SystemExit("monitor failed:\n" + "".join(lines) + (out or ""))
    summary = json.loads((run_dir / "summary.json").read_text())
    log = run_dir / "alerts.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    logged = [r["seq"] for r in records if boot is None or r["boot_id"] == boot]
    start = scores[0][0] if scores else 0.0  # the first scored frame: loading the model is not soak
    for x in samples:
        x["t_s"] = round(x["t_s"] - start, 1)
    scores = [(t - start, f, e) for t, f, e in scores]
    minutes = []
    for m in range(int(np.ceil(seconds / 60))):
        part = [s for s in scores if m * 60 <= s[0] < (m + 1) * 60]
        if part:
            ids = [p[1] for p in part]
            minutes.append({"minute": m + 1, "scored": len(part), "dropped": int(max(ids) - min(ids) + 1 - len(set(ids))),
                            "e2e_ms": latency_summary(p[2] for p in part)})
    res = {"provenance": provenance(), "video": str(video), "size": list(args.size), "minutes": args.minutes,
           "bundle": args.bundle, "backend": summary["backend"], "sensitivity": args.sensitivity,
           "frames_read": summary["frames_read"], "frames_scored": summary["frames_scored"],
           "frames_dropped": summary["frames_dropped"], "states": states,
           "client": {"gaps": gaps, "replayed": replayed, "unrecovered": unrecovered},
           "samples": samples, "per_minute": minutes,
           "verdict": verdicts(samples, minutes, args.warmup_min, logged, received, unrecovered)}
    v = res["verdict"]
    print(f"soak {args.minutes:g} min, {args.size[0]}x{args.size[1]} paced: scored {summary['frames_scored']} of "
          f"{summary['frames_read']}, dropped {summary['frames_dropped']} · alerts logged {v['alerts']['logged']}, "
          f"received {v['alerts']['received']} (replayed {replayed}) · " +
          " · ".join(f"{k} {'PASS' if x['pass'] else 'FAIL'}" for k, x in v.items() if isinstance(x, dict)))
    for m in minutes:
        s = next((x for x in samples if x["t_s"] >= m["minute"] * 60), samples[-1])
        print(f"  minute {m['minute']:3d}: scored {m['scored']:5d} dropped {m['dropped']:5d} · p50 "
              f"{m['e2e_ms']['p50']:.1f} p99 {m['e2e_ms']['p99']:.1f} max {m['e2e_ms']['max']:.1f} ms · rss "
              f"{s['rss_mib']:.0f} MiB fds {s['fds']}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--bundle", default="models/demo")
    p.add_argument("--backend", default="auto")
    p.add_argument("--sensitivity", type=float, default=1.0, help="the monitor's --sensitivity")
    p.add_argument("--video", type=Path, default=REPO / "runs" / "bench-video" / "soak-1080p30.mp4")
    p.add_argument("--seconds", type=float, default=60, help="length of the rendered (looped) video")
    p.add_argument("--seed", type=int, default=4001, help="synthetic examination seed (with lesions)")
    p.add_argument("--size", type=parse_size, default=(1920, 1080))
    p.add_argument("--sample-s", type=float, default=60.0, help="seconds between process samples")
    p.add_argument("--warmup-min", type=float, default=2.0)
    p.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench-soak")
    p.add_argument("--json", type=Path, default=REPO / "runs" / "soak.json")
    a = p.parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench.soak reads /proc: Linux only")
    res = soak(a)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(f"wrote {a.json}")
    return 0 if res["verdict"]["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
