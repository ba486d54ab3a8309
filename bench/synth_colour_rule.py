"""Can a colour rule solve the simulator? Generator 1.1 against 2.0, three detectors, one run.

    python -m bench.synth_colour_rule [--root runs] [--seed 11] [--train 120] [--test 40]
                                      [--bank 30000] [--json runs/synth_colour_rule.json]

Writes (or reuses) two datasets with the same seed and counts, ``ROOT/s11`` (``cemd synth
--generator 1.1``) and ``ROOT/s20`` (``--generator 2.0``), and measures per modality and lesion
kind the image AUROC (lesion kind vs test normals) of:

- **mean colour**: the trivial baseline of every evaluation report (``engine.eval.evaluate.mean_colour_baseline``);
- **colour map alone**: the hand-made colour outlier map (``engine.model.colour``), fitted with
  ``fit_colour`` on the training normals with the model's colour settings (σ, stride, local
  background, brownish NBI with its vessel cut), scored inside the lit field of view
  (``FieldOfViewMask``) and reduced with ``reduce_score(..., "topk", 1 %)``;
- **kNN features**: the texture-aware reference, the nearest-neighbour feature peer of
  ``bench.knn_bound`` (frozen EfficientNet-Lite0 stride-8/16 patches, a memory bank of normal
  training patches, the same top-1 % reduction);
- with ``--branch``, **the branch**: `cemd train` with its defaults on each dataset's training
  normals (both modalities; bundles in ``ROOT/branch-s11`` and ``ROOT/branch-s20``, reused when
  trained on the same dataset), scored as shipped, and its learned distillation map and its memory map (no training)
  alone, each with the branch's own image score.

If the colour map alone scores as well as a learned model, the simulator is learnable by a colour
rule and says little about real data, where that map is at chance. Everything here is SYNTHETIC.
Provenance (machine, versions, commit) is in the JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.provenance import provenance, provenance_markdown
from engine.data import dataset as ds
from engine.eval import metrics
from engine.eval.evaluate import mean_colour_baseline
from engine.model.anomaly_map import FieldOfViewMask, GaussianBlur, reduce_score
from engine.model.colour import ColourOutlier, fit_colour

GENERATORS = ("1.1", "2.0")
METHODS = {"mean_colour": "mean colour", "colour_map": "colour map alone", "knn": "kNN features",
           "branch": "branch (defaults)", "branch_learned": "its learned map alone", "branch_memory": "its memory map alone"}
SIZE = 256


@dataclass(frozen=True)
class ColourSettings:
    """The colour map as a bundle builds it (engine/model/config.py ModelConfig defaults when this was written)."""

    sigma: float = 4.0
    stride: int = 4
    background: float = 32.0
    brownish: tuple[str, ...] = ("nbi",)
    vessel_cut: float = 2.0
    fov_threshold: float = 0.08
    fov_window: int = 15
    topk_fraction: float = 0.01


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def colour_map_scores(train: np.ndarray, test: np.ndarray, modality: str, cs: ColourSettings = ColourSettings(),
                      batch: int = 16) -> np.ndarray:
    """Image scores of the colour outlier map alone, fitted on ``train`` normals (N×S×S×3 uint8)."""
    brownish = modality in cs.brownish
    stats = fit_colour(train, cs.sigma, cs.fov_threshold, cs.fov_window, stride=cs.stride,
                       background=cs.background, brownish=brownish, vessel_cut=cs.vessel_cut)
    colour = ColourOutlier(cs.sigma, stats["mean"], stats["inv_cov"], 1.0, cs.stride, cs.background, brownish,
                           cs.vessel_cut).eval()
    lit = FieldOfViewMask(cs.fov_threshold, cs.fov_window)
    scores = []
    for i in range(0, len(test), batch):
        x = _tensor(test[i:i + batch])
        fov = lit(x)
        scores.append(reduce_score(colour(x, fov) * fov, "topk", cs.topk_fraction).numpy())
    return np.concatenate(scores)


class KnnPeer:
    """bench.knn_bound's nearest-neighbour feature peer, loaded once and reused."""

    def __init__(self, bank: int = 30000, seed: int = 0, cs: ColourSettings = ColourSettings()) -> None:
        from engine.model.backbone import FrozenEncoder, build_lite0

        self.encoder = FrozenEncoder(build_lite0()).eval()
        self.bank_size, self.seed = bank, seed
        self.blur, self.lit = GaussianBlur(4.0), FieldOfViewMask(cs.fov_threshold, cs.fov_window)
        self.topk = cs.topk_fraction

    @torch.no_grad()
    def scores(self, train: np.ndarray, test: np.ndarray, batch: int = 32) -> np.ndarray:
        from bench.knn_bound import knn_maps, patch_features

        gen = torch.Generator().manual_seed(self.seed)
        ftr = patch_features(self.encoder, train)
        bank = ftr.permute(0, 2, 3, 1).reshape(-1, ftr.shape[1])
        bank = bank[torch.randperm(len(bank), generator=gen)[:self.bank_size]]
        out = []
        for i in range(0, len(test), batch):
            imgs = test[i:i + batch]
            x = _tensor(imgs)
            amap = self.blur(knn_maps(bank, patch_features(self.encoder, imgs), imgs.shape[1])) * self.lit(x)
            out.append(reduce_score(amap, "topk", self.topk).numpy())
        return np.concatenate(out)


def per_kind_aurocs(labels: np.ndarray, kinds: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each lesion kind against the test normals."""
    out = {}
    for k in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == k)
        out[k] = round(metrics.auroc(labels[sel], scores[sel]), 4)
    return out


@torch.no_grad()
def branch_scores(bundle: Any, modality: str, part: str, test: np.ndarray, batch: int = 16) -> np.ndarray:
    """Image scores of the bundle's branch (``all``) or one of its maps alone, as bench.real_eval scores them."""
    from bench.real_eval import branch_scorer

    scorer = branch_scorer(bundle, modality, part)
    return np.concatenate([scorer(_tensor(test[i:i + batch]))[1].numpy() for i in range(0, len(test), batch)])


def evaluate_arrays(train: np.ndarray, test: np.ndarray, labels: np.ndarray, kinds: np.ndarray, modality: str,
                    knn: KnnPeer | None, bundle: Any = None) -> dict[str, dict[str, float]]:
    """{method: {kind: image AUROC}} for one modality of one dataset (the branch's rows when ``bundle`` is given)."""
    res = {"mean_colour": per_kind_aurocs(labels, kinds, mean_colour_baseline(train, test)),
           "colour_map": per_kind_aurocs(labels, kinds, colour_map_scores(train, test, modality))}
    if knn is not None:
        res["knn"] = per_kind_aurocs(labels, kinds, knn.scores(train, test))
    if bundle is not None:
        res["branch"] = per_kind_aurocs(labels, kinds, branch_scores(bundle, modality, "all", test))
        res["branch_learned"] = per_kind_aurocs(labels, kinds, branch_scores(bundle, modality, "distillation", test))
        if bundle.model.memory_score and modality in bundle.memory:
            res["branch_memory"] = per_kind_aurocs(labels, kinds, branch_scores(bundle, modality, "memory", test))
    return res


def trained_bundle(data: Path, out: Path) -> tuple[Any, float]:
    """`cemd train` with its defaults on ``data`` into ``out``, and its train time; a bundle already there is
    reused only when it was trained on this dataset (same seed, counts and generator in its dataset.json)."""
    import shutil

    from bench.real_eval import _train
    from engine.model.config import ModelConfig, TrainConfig
    from engine.train.trainer import DATASET_JSON_KEYS

    want = {k: v for k, v in json.loads((data / "dataset.json").read_text()).items() if k in DATASET_JSON_KEYS}
    try:
        trained_on = json.loads((out / "bundle.json").read_text())["data"].get("dataset_json")
    except (OSError, ValueError, KeyError, AttributeError):
        trained_on = None
    if trained_on != want:
        shutil.rmtree(out, ignore_errors=True)
    return _train(data, out, ModelConfig(), TrainConfig(), True, print)


def ensure_dataset(root: Path, generator: str, seed: int, n_train: int, n_test: int) -> Path:
    """ROOT/s11 or ROOT/s20: reused when its dataset.json matches (generator, seed, counts, complete)."""
    from engine.synth.stills import LESION_KINDS, write_dataset

    out = root / f"s{generator.replace('.', '')}"
    want = {"train": {"good": n_train}, "test": {"good": n_test, **{k: n_test for k in LESION_KINDS}}}
    try:
        meta = json.loads((out / "dataset.json").read_text())
        if (meta.get("generator") == f"engine.synth {generator}" and meta.get("seed") == seed
                and meta.get("counts") == want and meta.get("complete") and meta.get("size") == SIZE):
            return out
    except (OSError, ValueError):
        pass
    write_dataset(out, seed, n_train, n_test, SIZE, progress=False, generator=generator)
    return out


def evaluate_dataset(path: Path, knn: KnnPeer | None, branch: bool = False) -> dict[str, Any]:
    index = ds.scan_dataset(path, require_train=True, require_test=True)
    res: dict[str, Any] = {"data": str(path), "synthetic": index.synthetic}
    bundle = None
    if branch:
        bundle, res["branch_train_seconds"] = trained_bundle(path, path.parent / f"branch-{path.name}")
    for m, split in index.modalities.items():
        train = ds.load_images(split.train, SIZE)
        test = ds.load_images([it.path for it in split.test], SIZE)
        labels = np.array([it.label for it in split.test])
        kinds = np.array([it.kind for it in split.test])
        res[m] = evaluate_arrays(train, test, labels, kinds, m, knn, bundle)
        print(f"{path.name} {m.upper()}: " + "; ".join(f"{meth} " + ", ".join(f"{k[:10]} {v:.3f}" for k, v in r.items())
                                                  for meth, r in res[m].items()), flush=True)
    return res


def markdown_table(results: dict[str, Any], visible: dict[str, list[str]]) -> str:
    methods = [meth for meth in METHODS if any(meth in results[g].get(m, {}) for g in results for m in ("wli", "nbi"))]
    lines = ["| modality | lesion kind | visible | generator | " + " | ".join(METHODS[m] for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    mods = [m for m in ("wli", "nbi") if all(m in results[g] for g in results)]
    for m in mods:
        for k in visible:
            for g in results:
                r = results[g][m]
                cells = [f"{r[meth][k]:.3f}" if meth in r else "—" for meth in methods]
                vis = "yes" if m in visible[k] else "no"
                lines.append(f"| {m.upper()} | {k} | {vis} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs"), help="where the two datasets go (ROOT/s11, ROOT/s20)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--train", type=int, default=120, help="normal training pairs per dataset")
    ap.add_argument("--test", type=int, default=40, help="test normals, and test images per lesion kind")
    ap.add_argument("--bank", type=int, default=30000, help="kNN memory-bank patches (random subset)")
    ap.add_argument("--no-knn", action="store_true", help="skip the kNN feature peer (colour rules only)")
    ap.add_argument("--branch", action="store_true",
                    help="also train the defaults on each dataset (ROOT/branch-s11, ROOT/branch-s20) and score the branch")
    ap.add_argument("--json", type=Path, default=None, help="results JSON (default ROOT/synth_colour_rule.json)")
    a = ap.parse_args()
    from engine.synth.stills import LESION_KINDS

    torch.manual_seed(0)
    knn = None if a.no_knn else KnnPeer(a.bank)
    results = {g: evaluate_dataset(ensure_dataset(a.root, g, a.seed, a.train, a.test), knn, a.branch)
               for g in GENERATORS}
    visible = {k: list(v["visible_in"]) for k, v in LESION_KINDS.items()}
    table = markdown_table(results, visible)
    prov = provenance()
    out = {"synthetic": True, "label": "SYNTHETIC: simulator output, not real endoscopy", "provenance": prov,
           "seed": a.seed, "train": a.train, "test": a.test, "bank": a.bank, "settings": ColourSettings().__dict__,
           "metric": "image AUROC, lesion kind vs test normals", "results": results, "table": table}
    path = a.json or a.root / "synth_colour_rule.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nSYNTHETIC — image AUROC per lesion kind (seed {a.seed}, {a.train} train, {a.test} test per kind)\n")
    print(table)
    print(f"\n{provenance_markdown(prov)}\n→ {path}")


if __name__ == "__main__":
    main()
