"""Markdown tables for docs/RESULTS.md from a `cemd evaluate --json` file.

    python -m bench.results_table --eval runs/demo_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| branch | test set | image AUROC | pixel AUROC (FOV) | AP | F1-max | mean-colour baseline image AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        if m.startswith("_"):
            continue
        base = r.get("baseline_mean_colour", {})
        lines.append(f"| {m.upper()} | all lesion kinds ({r['n_test']} images) | {_f(r['image_auroc'])} | "
                     f"{_f(r['pixel_auroc'])} | {_f(r['ap'])} | {_f(r['f1_max'])} | {_f(base.get('image_auroc'))} |")
        vis = r.get("visible_kinds")
        if vis:
            lines.append(f"| {m.upper()} | kinds visible in {m.upper()} ({', '.join(vis['kinds'])}) | "
                         f"{_f(vis['image_auroc'])} | {_f(vis.get('pixel_auroc'))} | | | |")
        for kind, k in r["per_kind"].items():
            lines.append(f"| {m.upper()} | {kind} vs good | {_f(k['image_auroc'])} | {_f(k.get('pixel_auroc'))} | | | "
                         f"{_f(base.get('per_kind', {}).get(kind))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, required=True)
    print(markdown(json.loads(ap.parse_args().eval.read_text())))


if __name__ == "__main__":
    main()
