"""Event-level results of a calibrated bundle over several annotated videos (SYNTHETIC unless yours).

    python -m bench.calibrated_eval --bundle B --videos V1.mp4 V2.mp4 … [--json runs/calibrated_eval.json]

Runs ``cemd evaluate-video`` on each video (its events file beside it: NAME.events.json) and
pools the results: lesion events and detections summed, false alerts over the summed
lesion-free time, time to first alert over all detected lesion events. Prints a markdown table
(per video and pooled) for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.provenance import provenance


def evaluate(bundle: Path, video: Path, out_dir: Path) -> dict[str, Any]:
    events = video.with_name(video.stem + ".events.json")
    out = out_dir / f"{video.stem}.json"
    r = subprocess.run([sys.executable, "-m", "realtime.cli", "evaluate-video", "--bundle", str(bundle), "--video",
                        str(video), "--events", str(events), "--json", str(out), "--plot",
                        str(out.with_suffix(".png")), "--no-progress"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"evaluate-video failed on {video}:\n{r.stderr}{r.stdout}")
    return json.loads(out.read_text())


def pool(results: list[dict[str, Any]], modality: str | None = None) -> dict[str, Any]:
    les = [e for r in results for e in r["lesion_events"] if modality is None or e["modality"] == modality]
    blocks = [r["overall"] if modality is None else r["per_modality"].get(modality) for r in results]
    blocks = [b for b in blocks if b]
    free_min = sum(b["lesion_free_minutes"] for b in blocks)
    false = sum(b["false_alerts"] for b in blocks)
    tta = [e["time_to_first_alert_ms"] for e in les if e["detected"]]
    aucs = [b["frame_auroc"] for b in blocks if b["frame_auroc"] is not None]
    return {"lesion_events": len(les), "detected": sum(e["detected"] for e in les),
            "event_sensitivity": round(sum(e["detected"] for e in les) / len(les), 4) if les else None,
            "lesion_free_minutes": round(free_min, 2), "false_alerts": false,
            "false_alerts_per_hour": round(false / (free_min / 60), 2) if free_min else None,
            "false_alerts_per_10_min": round(false / free_min * 10, 2) if free_min else None,
            "median_time_to_first_alert_ms": round(float(np.median(tta)), 1) if tta else None,
            "p90_time_to_first_alert_ms": round(float(np.percentile(tta, 90)), 1) if tta else None,
            "frame_auroc_mean": round(float(np.mean(aucs)), 4) if aucs else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibrated_eval", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path("models/demo"))
    p.add_argument("--videos", type=Path, nargs="+", required=True)
    p.add_argument("--json", type=Path, default=Path("runs/calibrated_eval.json"))
    p.add_argument("--keep", type=Path, default=None, help="folder for the per-video JSON and timeline PNGs")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for v in args.videos:
            print(f"evaluate-video {v} …", flush=True)
            results.append(evaluate(args.bundle, v, out_dir))
    cal = json.loads((args.bundle / "calibration.json").read_text()) if (args.bundle / "calibration.json").exists() \
        else None
    out = {"benchmark": "calibrated_eval", "synthetic": all(r["synthetic"] for r in results),
           "provenance": provenance(), "bundle": str(args.bundle),
           "calibration": {k: cal[k] for k in ("version", "n_of_m", "target_false_alerts_per_hour", "modalities",
                                                "data")} if cal else None,
           "pooled": {"overall": pool(results), "wli": pool(results, "wli"), "nbi": pool(results, "nbi")},
           "videos": [{"video": r["video"]["source"], "frames": r["video"]["frames"], **r["overall"]}
                      for r in results]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print("| video | lesion events | detected | lesion-free min | false alerts | median TTA ms | p90 TTA ms | "
          "frame AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["videos"]:
        print(f"| {Path(r['video']).name} | {r['lesion_events']} | {r['detected']} | {r['lesion_free_minutes']} | "
              f"{r['false_alerts']} | {r['median_time_to_first_alert_ms']} | {r['p90_time_to_first_alert_ms']} | "
              f"{r['frame_auroc']} |")
    for name, b in out["pooled"].items():
        print(f"| **pooled {name}** | {b['lesion_events']} | {b['detected']} ({b['event_sensitivity']}) | "
              f"{b['lesion_free_minutes']} | {b['false_alerts']} ({b['false_alerts_per_10_min']}/10 min) | "
              f"{b['median_time_to_first_alert_ms']} | {b['p90_time_to_first_alert_ms']} | {b['frame_auroc_mean']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
