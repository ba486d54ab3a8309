"""Monitor start to first scored frame, as a user starts it: a new process on a bundle copy.

    python -m bench.startup [--bundle models/demo] [--runs 3] [--json OUT]

Each case copies the bundle without its ``compiled/`` folder (what a fresh clone has; the
tracked ``exported/`` graphs are copied), then starts ``run_stream.py`` on a synthetic source
twice: ``fresh`` (nothing built or measured on this machine) and ``again`` (the second start,
reusing what the first one built and measured). The clock starts before the process is spawned
and stops when a subscriber receives the first ``score`` message (SUB socket connected before the
monitor binds, reconnect interval 10 ms, so the subscription adds at most ~10 ms). Cases:
``auto`` (the default backend, exports allowed), ``auto --no-compile`` (the no-argument demo's
setting) and ``eager``. Prints a table and writes JSON with provenance.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from bench.provenance import provenance, provenance_markdown
from tests.helpers.streams import free_port_pair

REPO = Path(__file__).resolve().parents[1]
CASES = {"auto": [], "auto --no-compile": ["--no-compile"], "eager": ["--backend", "eager"]}
SOURCE = "synthetic:seed=7,seconds=60,size=640x480,fps=30"


def first_score_seconds(bundle: Path, extra: list[str], run_dir: Path, timeout: float = 300) -> dict[str, Any]:
    """Start the monitor; seconds from spawn to its first published score, and what it chose."""
    port = free_port_pair()  # and the replay socket on the next port
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RECONNECT_IVL, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"score")
    sub.connect(f"tcp://127.0.0.1:{port}")
    cmd = [sys.executable, "run_stream.py", "--bundle", str(bundle), "--source", SOURCE, "--max-seconds", "3",
           "--publish", f"tcp://127.0.0.1:{port}", "--dashboard", "off", "--run-dir", str(run_dir), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = None
    try:
        if sub.poll(int(timeout * 1000)):
            sub.recv_multipart()
            seconds = time.perf_counter() - t0
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        sub.close(linger=0)
    if seconds is None:
        raise RuntimeError(f"no score within {timeout:.0f} s: {' '.join(cmd)}\n{err[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seconds": round(seconds, 2), "backend": summary.get("backend")}


def run_case(bundle: Path, name: str, runs: int, work: Path) -> dict[str, Any]:
    fresh, again, chosen = [], [], []
    for i in range(runs):
        copy = work / f"{name.replace(' ', '_')}-{i}"
        shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("compiled"))
        first = first_score_seconds(copy, CASES[name], work / f"run-{name.replace(' ', '_')}-{i}-a")
        second = first_score_seconds(copy, CASES[name], work / f"run-{name.replace(' ', '_')}-{i}-b")
        fresh.append(first["seconds"])
        again.append(second["seconds"])
        chosen.append(first["backend"])
        shutil.rmtree(copy)
    return {"case": name, "fresh_s": fresh, "again_s": again, "fresh_median_s": statistics.median(fresh),
            "again_median_s": statistics.median(again), "backends": chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "demo")
    ap.add_argument("--runs", type=int, default=3, help="fresh copies per case (each started twice)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    with tempfile.TemporaryDirectory(prefix="cemd-startup-") as tmp:
        results = []
        for name in cases:
            print(f"{name}: {args.runs} fresh copies …", flush=True)
            results.append(run_case(args.bundle.resolve(), name, args.runs, Path(tmp)))
    info = provenance()
    print(f"\n{provenance_markdown(info)}\n")
    print("| case | fresh copy: start → first score, median (runs) | second start, median (runs) | backends (WLI, NBI) |")
    print("|---|---|---|---|")
    for r in results:
        backends = sorted({json.dumps(b, sort_keys=True) for b in r["backends"]})
        print(f"| {r['case']} | {r['fresh_median_s']:.1f} s ({', '.join(f'{s:.1f}' for s in r['fresh_s'])}) | "
              f"{r['again_median_s']:.1f} s ({', '.join(f'{s:.1f}' for s in r['again_s'])}) | {'; '.join(backends)} |")
    if args.json:
        args.json.write_text(json.dumps({"provenance": info, "source": SOURCE, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
