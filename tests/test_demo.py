"""The shipped demo bundle and the Quick start's embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from engine.deploy.bundle import load_bundle
from engine.eval.demo import DEMO_BUNDLE


def test_demo_bundle_is_complete_and_valid() -> None:
    bundle = load_bundle(DEMO_BUNDLE)  # checks every hash against bundle.json
    assert bundle.modalities == ("wli", "nbi")
    assert bundle.model.input_size == 256 and bundle.model.fusion and bundle.model.teacher_training
    assert bundle.meta["data"]["synthetic"] is True
    assert not (DEMO_BUNDLE / ".train_state.pt").exists()
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir() if p.is_file())
    assert size < 20 * 1024 * 1024, f"demo bundle is {size / 1e6:.1f} MB; keep it small"


def test_the_demo_ships_onnx_graphs_of_its_current_weights() -> None:
    """A fresh clone's first start copies these instead of exporting (docs/BACKENDS.md); a retrained
    demo must ship them again: cemd export --bundle models/demo --backend onnx --ship."""
    from engine.deploy.backends import SHIPPED, onnx_key, stale_reason

    bundle = load_bundle(DEMO_BUNDLE)
    for m in bundle.modalities:
        key, graph, sidecar = onnx_key(bundle, m, 1, DEMO_BUNDLE / SHIPPED)
        assert stale_reason(graph, sidecar, key) is None, (m, stale_reason(graph, sidecar, key))
        assert "parity" not in json.loads(sidecar.read_text())  # no machine's records in a tracked file
    files = list((DEMO_BUNDLE / SHIPPED).iterdir())
    assert len(files) == 2 * len(bundle.modalities), files  # nothing superseded left behind
    assert sum(p.stat().st_size for p in files) < 20 * 1024 * 1024


def test_cemd_demo_runs_end_to_end_and_the_model_separates_lesions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "realtime.cli", "demo", "--run-dir", str(run), "--test", "8"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "image AUROC" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    for m in ("wli", "nbi"):
        # the kinds visible in each modality: a working model separates them from normal tissue
        visible = metrics[m].get("visible_kinds", metrics[m])
        assert visible["image_auroc"] > 0.8, (m, visible)
        assert metrics[m]["baseline_mean_colour"]["image_auroc"] < visible["image_auroc"]
        assert (run / "plots" / f"heatmaps_{m}.png").is_file()


def test_run_stream_default_is_the_synthetic_demo_with_a_dashboard(tmp_path: Path) -> None:
    """The Quick start's embedded default (cut to a few seconds): synthetic source, both branches,
    auto routing, never compiling at start, a live dashboard, a summary and a run folder."""
    from tests.helpers.streams import free_port_pair

    port = free_port_pair()  # the replay socket takes the next port
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run_stream.py", "--max-seconds", "6", "--dashboard", "on", "--run-dir",
                           str(run), "--publish", f"tcp://127.0.0.1:{port}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CEMD monitor" in proc.stdout and "stage latency" in proc.stdout  # dashboard, then summary table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["source"]["source"].startswith("synthetic:")
    assert summary["config"]["scoring"]["build_missing"] is False
    # how many frames 6 s hold depends on the machine and its load (speed is measured in bench/)
    assert set(summary["backend"]) == {"wli", "nbi"} and summary["frames_scored"] > 0
    assert summary["frames_scored"] + summary["frames_dropped"] <= summary["frames_read"]
    assert summary["synthetic_ground_truth"]["routing_accuracy"] > 0.95
    assert (run / "alerts.jsonl").exists()
