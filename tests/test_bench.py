"""The benchmark helpers that docs/RESULTS.md numbers come from."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.ablation import RESCORE, VARIANTS, markdown, rescored_bundle
from bench.provenance import provenance
from conftest import TINY_SIZE
from engine.bundle import load_bundle


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
