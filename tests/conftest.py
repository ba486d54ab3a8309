"""Shared fixtures: a tiny synthetic dataset and a bundle trained on it (session-scoped, built once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.model.config import ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent
TINY_SIZE = 128

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.synth.stills import write_dataset

    out = tmp_path_factory.mktemp("data") / "tiny"
    write_dataset(out, seed=11, n_train=24, n_test=4, size=TINY_SIZE, progress=False)
    return out


def tiny_configs(**model_kwargs: object) -> tuple[ModelConfig, TrainConfig]:
    # The colour and memory maps are off in the shared tiny bundles (their fit and the bigger compiled
    # graph would cost every backend test); tests/test_colour.py, test_anomaly_synth.py and
    # test_memory.py train with them on.
    # They also keep the shallow Lite0 reading and the frame-relative score they were written for (the
    # plumbing tests do not depend on it); tests/test_model.py covers the deep default itself.
    model = ModelConfig(input_size=TINY_SIZE, **{"colour_score": False, "memory_score": False, "backbone": "efficientnet_lite0",  # type: ignore[arg-type]
                                                 "score_reduction": "topk_minus_median", "topk_fraction": 0.01,
                                                 **model_kwargs})
    train = TrainConfig(seed=3, teacher_epochs=2, student_epochs=2, batch_size=8)
    return model, train


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.train.trainer import Trainer

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    model, train = tiny_configs()
    Trainer(tiny_dataset, out, model, train, progress=False, log=lambda _m: None).run()
    return out
