"""The benchmark helpers that docs/RESULTS.md numbers come from."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_SIZE

from bench.ablation import RESCORE, VARIANTS, markdown, rescored_bundle
from bench.provenance import provenance
from engine.deploy.bundle import load_bundle


def test_rescored_bundle_keeps_weights_and_changes_only_scoring(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = rescored_bundle(tiny_bundle, tmp_path / "all_scales", VARIANTS["all_scales"])
    a, b = load_bundle(tiny_bundle), load_bundle(copy)  # hashes still verify
    assert a.model.score_scales == (2,) and b.model.score_scales == (0, 1, 2)
    x = torch.rand(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        map_a, _ = a.branch("wli")(x)
        map_b, _ = b.branch("wli")(x)
    assert (map_b > map_a + 1e-6).any()  # more scales summed: a larger map somewhere
    assert all(base in VARIANTS and base not in RESCORE for base in RESCORE.values())


def test_ablation_markdown_has_visible_and_all_kind_columns() -> None:
    kind = {"image_auroc": 0.9, "pixel_auroc": 0.95}
    res = {"train_data": "a", "test_data": "b", "teacher_epochs": 1, "student_epochs": 1, "seed": 0,
           "provenance": provenance(),
           "variants": {"cemd": {"train_seconds": 3.0, "wli": {
               "image_auroc": 0.8, "pixel_auroc": 0.85, "per_kind": {"elevated_erythema": kind},
               "visible_kinds": {"image_auroc": 0.97, "pixel_auroc": 0.98}}}}}
    md = markdown(res)
    assert "| cemd | WLI | 0.970 | 0.980 | 0.800 | 0.850 | 0.900 / 0.950 |" in md


def test_time_calls_counts_every_call_and_latency_table_gives_ratio_to_eager() -> None:
    from bench.model_latency import markdown as latency_markdown
    from bench.timing import time_calls

    calls: list[int] = []
    stats = time_calls(lambda: calls.append(1), runs=7, warmup=3, sync=lambda: None)
    assert len(calls) == 10 and stats["runs"] == 7 and 0 <= stats["p50_ms"] <= stats["max_ms"]
    row = {"modality": "wli", "batch": 1, "precision": "fp32", "p95_ms": 1.0, "p99_ms": 1.0, "max_ms": 1.0}
    out = {"provenance": provenance(), "results": [
        {**row, "backend": "eager", "p50_ms": 40.0},
        {**row, "backend": "aoti", "p50_ms": 20.0, "compile_s": 45.0,
         "parity": {"max_abs_map_error": 1e-7, "frames": 200, "same_ranking": True}},
        {"backend": "tensorrt", "modality": "wli", "batch": 1, "unavailable": "no GPU"}]}
    md = latency_markdown(out)
    assert "| WLI | aoti | fp32 | 1 | 20.00 |" in md and "| 0.50 | 45 | 1.0e-07 (200 frames) | True |" in md
    assert "tensorrt" not in md.split("Provenance")[0]


def _track(scores: list[float], mods: str, lesions: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    import numpy as np

    from bench.alert_rules import Track

    n = len(scores)
    events = {"fps": 30.0, "frames": n, "lesions": [{"id": k, "start_frame": a, "end_frame": b, "kind": "x",
                                                      "visible_in": ["wli", "nbi"]} for k, (a, b) in enumerate(lesions)]}
    mod = np.array(["wli" if c == "W" else "nbi" for c in mods], "<U3")
    return Track("t", np.arange(n) * 1000 / 30, mod, np.asarray(scores, np.float64), 30.0, events)


def test_alert_rules_baseline_is_causal_and_per_branch() -> None:
    import numpy as np

    from bench.alert_rules import baseline, smoothed

    tr = _track([0.1] * 40 + [0.9] * 5 + [0.5] * 20, "W" * 45 + "N" * 20, [])
    b = baseline(tr, frames=20, gap=5, q=50)
    assert np.isnan(b[:15]).all() and b[15] == 0.1
    assert b[44] == 0.1  # the jump at 40 is inside the gap: not yet in the baseline
    assert np.isnan(b[45])  # NBI has no history of its own
    assert np.isclose(smoothed(tr, 3)[45], 0.5) and np.isclose(smoothed(tr, 3)[42], 0.9)


def test_alert_rules_best_threshold_catches_more_with_more_false_alerts_allowed() -> None:
    from bench.alert_rules import above_abs, best_absolute, pooled

    # one normal spike at 0.6 (3 frames) and a lesion at 0.5: catching the lesion costs a false alert
    s = [0.1] * 100 + [0.6] * 3 + [0.1] * 100 + [0.5] * 10 + [0.1] * 100
    tr = _track(s, "W" * len(s), [(203, 212)])
    assert pooled([tr], [above_abs(tr, {"wli": 0.55, "nbi": 1.0})], 1, 1, 100.0)["false_alerts"] == 1
    rows = best_absolute([tr], [(1, 1)], 100.0, max_false=1, steps=20)
    assert [(r["false_alerts_allowed"], r["detected"], r["false_alerts"]) for r in rows] == [(0, 0, 0), (1, 1, 1)]


def test_soak_verdicts_flag_growth_new_descriptors_drift_and_lost_alerts() -> None:
    from bench.soak import process_tree, sample_tree, verdicts

    def minute(k: int, p50: float) -> dict:
        return {"minute": k, "scored": 100, "e2e_ms": {"p50": p50, "p99": 2 * p50}}

    flat = [{"t_s": 60.0 * k, "rss_mib": 500.0, "fds": 30} for k in range(0, 10)]
    ok = verdicts(flat, [minute(k, 50) for k in range(1, 10)], 2, [0, 1, 2], {0, 1, 2}, 0)
    assert ok["pass"] and ok["memory"]["growth"] == 0
    leak = [dict(s, rss_mib=500.0 + 10 * k, fds=30 + k) for k, s in enumerate(flat)]
    bad = verdicts(leak, [minute(k, 50 + 20 * k) for k in range(1, 10)], 2, [0, 1, 3], {0, 1}, 0)
    assert not bad["memory"]["pass"] and not bad["file_handles"]["pass"] and not bad["latency_drift"]["pass"]
    assert bad["alerts"]["missing"] == [3] and bad["alerts"]["seq_holes_in_log"] == [2] and not bad["pass"]
    import os

    assert os.getpid() in process_tree(os.getpid()) and sample_tree(os.getpid())["rss_mib"] > 10
