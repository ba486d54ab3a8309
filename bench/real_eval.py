"""The branch on real images: train with the defaults, evaluate, and measure its parts and peers in one run.

    python -m bench.real_eval --data ../shared/real/kvasir-dev --json runs/real_eval.json [--out runs/real-eval]

DATA is a dataset in the project's layout (docs/DATA.md) with one modality; the development set
is real Kvasir-SEG colonoscopy (Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020;
research and education use only — never commit it, anything cut from it, or weights trained on
it). A user reproduces the figures by downloading Kvasir-SEG and cutting the same windows.

On the same split and in the same run:

* ``branch`` — `cemd train` with its defaults on ``train/good``, scored as shipped;
* ``distillation only`` / ``colour only`` — the same weights with one map switched off
  (the colour row only when the defaults fit a colour map);
* ``plain RD`` — the same defaults with no teacher training (teacher = frozen encoder); with one
  modality that *is* the default student (stage 1 is skipped there), so the run instead trains the
  defaults with ``--teacher-one-modality`` and reports that branch and its distillation map;
* ``kNN (stride 8+16)`` — the nearest-neighbour bound of ``bench.knn_bound`` (frozen Lite0
  features at strides 8 and 16, no training);
* ``kNN (branch features)`` — the same bound on the encoder scales the branch scores.

Each row: image AUROC and pixel AUROC on the test windows (pixels inside the field of view),
and pixel AUROC on the whole test images (``--whole DIR`` with ``images/`` and ``masks/``;
default DATA/full/test when present). Trained bundles stay in OUT and are reused by
``--reuse`` (their training time is then the one recorded in the bundle).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.knn_bound import knn_maps
from bench.provenance import provenance, provenance_markdown
from engine.data import dataset as ds
from engine.deploy.bundle import Bundle, load_bundle
from engine.errors import DatasetError
from engine.eval import metrics
from engine.model.anomaly_map import FieldOfViewMask, GaussianBlur, reduce_score
from engine.model.backbone import FrozenEncoder, build_lite0, get_backbone
from engine.model.branch import StudentBranch
from engine.model.config import ModelConfig, TrainConfig
from engine.train.trainer import Trainer

Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # N×3×S×S in [0, 1] → (map N×1×S×S, score N)


def _load_whole(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole test images and their masks (``images/X.png`` ↔ ``masks/X.png`` or ``masks/X_mask.png``)."""
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in ds.IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{folder}/images holds no images")
    masks = []
    for p in images:
        cands = [folder / "masks" / f"{p.stem}{p.suffix}", folder / "masks" / f"{p.stem}_mask.png",
                 folder / "masks" / f"{p.stem}.png"]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise DatasetError(f"no mask for {p} in {folder / 'masks'}")
        masks.append(ds.load_mask(found, size))
    return ds.load_images(images, size), np.stack(masks)


def validation_windows(data: Path, modality: str, size: int, window: int = 96, seed: int = 0,
                       val_fraction: float = 0.1, images: set[str] | None = None,
                       normal: list[Path] | None = None) -> dict[str, np.ndarray] | None:
    """A validation split for choices, disjoint from the test split: the normal training windows the
    trainer holds out (or ``normal``), and a window centred on each polyp of the whole *training*
    images (DATA/full/train, or only those whose stem is in ``images``; ``window`` px at their size,
    ≥ 10 % polyp pixels), as the test windows were cut."""
    import cv2

    from engine.train.trainer import validation_images

    folder = data / "full" / "train"
    if not (folder / "images").is_dir():
        return None
    if normal is None:
        normal = validation_images(data, seed, val_fraction)[modality]
    cuts = []
    for p in sorted(q for q in (folder / "images").iterdir() if q.suffix.lower() in ds.IMAGE_SUFFIXES):
        if images is not None and p.stem not in images:
            continue
        img = cv2.imread(str(p))[:, :, ::-1]
        mpath = next((c for c in (folder / "masks" / p.name, folder / "masks" / f"{p.stem}_mask.png") if c.is_file()), None)
        if mpath is None:
            continue
        mask = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE) > 127
        n, lab, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
        h, w = mask.shape
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] < 50:
                continue
            cx, cy = (int(round(v)) for v in cents[k])
            x0, y0 = min(max(cx - window // 2, 0), w - window), min(max(cy - window // 2, 0), h - window)
            m = mask[y0:y0 + window, x0:x0 + window]
            if m.mean() >= 0.1:
                cuts.append((cv2.resize(np.ascontiguousarray(img[y0:y0 + window, x0:x0 + window]), (size, size),
                                        interpolation=cv2.INTER_AREA),
                             cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0))
    if not cuts or not normal:
        return None
    good = ds.load_images(normal, size)
    images = np.concatenate([good, np.stack([c[0] for c in cuts])])
    masks = np.concatenate([np.zeros(good.shape[:3], bool), np.stack([c[1] for c in cuts])])
    labels = np.concatenate([np.zeros(len(good), int), np.ones(len(cuts), int)])
    return {"images": images, "masks": masks, "labels": labels}


REDUCTIONS = (("max", 0.0), ("topk", 0.01), ("topk", 0.1), ("mean", 0.0), ("topk_minus_median", 0.01))


@torch.no_grad()
def reduction_table(branch: StudentBranch, fov_mask: FieldOfViewMask, sets: dict[str, dict[str, np.ndarray]]
                    ) -> dict[str, dict[str, float]]:
    """Image AUROC of the branch's map under each image-score reduction, on each set (one scoring pass)."""
    out: dict[str, dict[str, float]] = {}
    for name, d in sets.items():
        maps, _, fovs = _run(branch, fov_mask, d["images"])
        amap, fov = torch.from_numpy(maps)[:, None], torch.from_numpy(fovs.astype(np.float32))[:, None]
        for red, frac in REDUCTIONS:
            key = f"{red} {frac:g}" if red.startswith("topk") else red
            out.setdefault(key, {})[name] = metrics.auroc(d["labels"], reduce_score(amap, red, frac, fov).numpy())
    return out


@torch.no_grad()
def _run(scorer: Scorer, fov_mask: FieldOfViewMask, images: np.ndarray, batch: int = 16
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    maps, scores, fovs = [], [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div_(255)
        amap, score = scorer(x)
        maps.append(amap[:, 0].numpy())
        scores.append(score.numpy())
        fovs.append(fov_mask(x)[:, 0].numpy() > 0.5)
    return np.concatenate(maps), np.concatenate(scores), np.concatenate(fovs)


def _row(scorer: Scorer, fov_mask: FieldOfViewMask, windows: dict[str, np.ndarray],
         whole: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    maps, scores, fovs = _run(scorer, fov_mask, windows["images"])
    row: dict[str, Any] = {"image_auroc": metrics.auroc(windows["labels"], scores),
                           "pixel_auroc": metrics.pixel_auroc(maps, windows["masks"], valid=fovs)}
    if whole is not None:
        wmaps, _, wfovs = _run(scorer, fov_mask, whole[0])
        row["whole_pixel_auroc"] = metrics.pixel_auroc(wmaps, whole[1], valid=wfovs)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def branch_scorer(bundle: Bundle, modality: str, part: str) -> Scorer:
    """The branch as shipped (``all``), or one of its maps alone (``distillation``, ``memory``, ``colour``)."""
    if part == "all":
        return bundle.branch(modality)
    if part == "distillation":
        cfg = replace(bundle.model, colour_score=False, memory_score=False)
        return StudentBranch(cfg, bundle.encoder, bundle.teacher.adapters, bundle.students[modality], modality).eval()
    full = bundle.branch(modality)
    if getattr(full, part, None) is None:
        raise ValueError(f"the bundle has no {part} map")
    fov_mask = full.fov if full.fov is not None else FieldOfViewMask(bundle.model.fov_threshold, bundle.model.fov_window)

    def one_map(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fov = fov_mask(x)
        if part == "colour":
            amap = full.colour(x, fov) * fov
        else:
            amap = full.smooth(full.memory(full.encoder(x)[full.memory_scale])) * fov
        return amap, reduce_score(amap, full.score_reduction, full.topk_fraction, fov)

    return one_map


def kind(bundle: Bundle, modality: str) -> str:
    """What makes up the branch's map: the learned distillation map, plus the maps that need no training."""
    parts = ["learned"]
    if bundle.model.memory_score and modality in bundle.memory:
        parts.append("memory (no training)")
    if bundle.model.colour_score and modality in bundle.colour:
        parts.append("hand-made")
    return " + ".join(parts)


def _fitted_copy(bundle_dir: Path, copy: Path, data: Path, reuse: bool, fit: Callable[[Path], Any]) -> Bundle:
    """A copy of the bundle with one more map fitted on the same weights (reused when --reuse finds it)."""
    import shutil

    if not (reuse and (copy / "bundle.json").is_file()):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(bundle_dir, copy)
        fit(copy)
    return load_bundle(copy)


class KnnPeer:
    """PatchCore-style bound with no training: distance of each test patch to the nearest normal patch."""

    def __init__(self, encoder: FrozenEncoder, scales: tuple[int, ...], train_images: np.ndarray, bank: int,
                 size: int, reduction: str, topk_fraction: float, seed: int = 0) -> None:
        self.encoder, self.scales, self.size = encoder.eval(), scales, size
        self.reduction, self.topk_fraction = reduction, topk_fraction
        self.blur, self.fov = GaussianBlur(4.0), FieldOfViewMask(0.08, 15)
        feats = torch.cat([self._patches(torch.from_numpy(train_images[i:i + 16]).permute(0, 3, 1, 2).float() / 255)
                           for i in range(0, len(train_images), 16)])
        flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        g = torch.Generator().manual_seed(seed)
        self.bank = flat[torch.randperm(len(flat), generator=g)[:bank]]

    @torch.no_grad()
    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        picked = [F.avg_pool2d(f[k], 3, 1, 1) for k in self.scales]
        side = max(p.shape[-1] for p in picked)
        return torch.cat([F.interpolate(p, size=(side, side), mode="bilinear", align_corners=False)
                          if p.shape[-1] != side else p for p in picked], 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fov = self.fov(x)
        amap = self.blur(knn_maps(self.bank, self._patches(x), self.size)) * fov
        return amap, reduce_score(amap, self.reduction, self.topk_fraction, fov)


def _train(data: Path, out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, reuse: bool,
           log: Callable[[str], None]) -> tuple[Bundle, float]:
    if reuse and (out / "bundle.json").is_file():
        bundle = load_bundle(out)
        log(f"reusing {out}")
        return bundle, float(bundle.meta.get("train_seconds", float("nan")))
    t0 = time.perf_counter()
    Trainer(data, out, model_cfg, train_cfg, progress=False, log=log).run()
    return load_bundle(out), round(time.perf_counter() - t0, 1)


def run(data: Path, out: Path, whole_dir: Path | None, reuse: bool, bank: int,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    index = ds.scan_dataset(data, require_train=True, require_test=True)
    if len(index.modalities) != 1:
        raise DatasetError(f"{data}: bench.real_eval takes one modality, found {', '.join(index.modalities)}")
    (modality, split), = index.modalities.items()
    model_cfg, train_cfg = ModelConfig(), TrainConfig()
    size = model_cfg.input_size
    items = split.test
    windows = {"images": ds.load_images([it.path for it in items], size), "masks": ds.load_masks(items, size),
               "labels": np.array([it.label for it in items])}
    whole = _load_whole(whole_dir, size) if whole_dir is not None else None
    result: dict[str, Any] = {
        "provenance": provenance(), "data": str(data), "synthetic": index.synthetic, "modality": modality,
        "train_images": len(split.train), "test_windows": {"normal": int((windows["labels"] == 0).sum()),
                                                           "anomalous": int(windows["labels"].sum())},
        "whole_images": None if whole is None else {"dir": str(whole_dir), "count": len(whole[0])},
        "defaults": {"model": {k: v for k, v in vars(model_cfg).items()},
                     "train": {k: v for k, v in vars(train_cfg).items()}},
        "rows": {},
    }
    rows: dict[str, dict[str, Any]] = result["rows"]
    fov_mask = FieldOfViewMask(model_cfg.fov_threshold, model_cfg.fov_window)

    bundle, secs = _train(data, out / "default", model_cfg, train_cfg, reuse, log)
    rows["branch (defaults)"] = {**_row(branch_scorer(bundle, modality, "all"), fov_mask, windows, whole),
                                 "train_seconds": secs, "kind": kind(bundle, modality)}
    log(f"branch: {rows['branch (defaults)']}")
    if not bundle.model.memory_score:  # the memory map, fitted on the same weights, as a variant
        from engine.train.trainer import fit_bundle_memory

        with_memory = _fitted_copy(out / "default", out / "default+memory", data, reuse, lambda b: fit_bundle_memory(
            b, data, log, model_cfg.memory_scale, model_cfg.memory_bank, model_cfg.memory_gain))
        rows["branch + memory map (off by default)"] = {
            **_row(branch_scorer(with_memory, modality, "all"), fov_mask, windows, whole), "kind": kind(with_memory, modality)}
    else:
        with_memory = bundle
    if with_memory.model.memory_score and modality in with_memory.memory:
        rows["distillation map only"] = {**_row(branch_scorer(bundle, modality, "distillation"), fov_mask, windows,
                                                whole), "kind": "learned" if bundle.model.teacher_training
                                                                 else "learned (plain RD)"}
        rows["memory map only"] = {**_row(branch_scorer(with_memory, modality, "memory"), fov_mask, windows, whole),
                                   "kind": "no training"}
    if bundle.model.colour_score and modality in bundle.colour:
        coloured = bundle
    else:  # does the hand-made colour map earn its place? fit it on the same weights and score both together
        from engine.train.trainer import fit_bundle_colour

        mc = replace(bundle.model, colour_score=True)
        coloured = _fitted_copy(out / "default", out / "default+colour", data, reuse, lambda b: fit_bundle_colour(
            b, data, mc.colour_gain, log, mc.colour_stride, mc.colour_background, mc.colour_brownish,
            mc.colour_vessel_cut))
        if modality in coloured.colour:
            rows["branch + colour map (off by default)"] = {
                **_row(branch_scorer(coloured, modality, "all"), fov_mask, windows, whole), "kind": kind(coloured, modality)}
    if modality in coloured.colour:
        rows["colour map only"] = {**_row(branch_scorer(coloured, modality, "colour"), fov_mask, windows, whole),
                                   "kind": "hand-made"}
    val = validation_windows(data, modality, size, seed=train_cfg.seed, val_fraction=train_cfg.val_fraction)
    sets = {"test": windows} if val is None else {"validation": val, "test": windows}
    if val is not None:
        result["validation_windows"] = {"normal": int((val["labels"] == 0).sum()), "anomalous": int(val["labels"].sum())}
    result["reductions"] = reduction_table(branch_scorer(bundle, modality, "all"), fov_mask, sets)
    log(f"reductions: {result['reductions']}")

    if bundle.model.teacher_training:
        plain, secs = _train(data, out / "plain-rd", replace(model_cfg, teacher_training=False, colour_score=False,
                                                             memory_score=False), train_cfg, reuse, log)
        rows["plain RD (no teacher training, no memory, no colour)"] = {
            **_row(branch_scorer(plain, modality, "all"), fov_mask, windows, whole), "train_seconds": secs,
            "kind": "learned peer"}
    else:  # one modality: the default student is plain RD already; does training the teacher anyway help?
        taught, secs = _train(data, out / "trained-teacher", model_cfg, replace(train_cfg, teacher_one_modality=True),
                              reuse, log)
        rows["branch with a trained teacher (--teacher-one-modality)"] = {
            **_row(branch_scorer(taught, modality, "all"), fov_mask, windows, whole), "train_seconds": secs,
            "kind": kind(taught, modality)}
        rows["its distillation map only"] = {
            **_row(branch_scorer(taught, modality, "distillation"), fov_mask, windows, whole), "kind": "learned"}

    train_images = ds.load_images(split.train, size)
    lite0 = FrozenEncoder(build_lite0())
    knn = KnnPeer(lite0, (1, 2), train_images, bank, size, "topk", 0.01)
    rows["kNN, Lite0 stride 8+16 (bench.knn_bound)"] = {**_row(knn, fov_mask, windows, whole), "kind": "no training"}
    spec = get_backbone(model_cfg.backbone)
    own = KnnPeer(FrozenEncoder(spec.build(None)), tuple(model_cfg.score_scales), train_images, bank, size,
                  model_cfg.score_reduction, model_cfg.topk_fraction)
    rows[f"kNN, the branch's scales {tuple(model_cfg.score_scales)} of {model_cfg.backbone}"] = {
        **_row(own, fov_mask, windows, whole), "kind": "no training"}
    for name, r in rows.items():
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return result


def markdown(result: dict[str, Any]) -> str:
    tw = result["test_windows"]
    wh = result["whole_images"]
    lines = [f"Real ({result['data']}, {result['modality'].upper()}): trained on {result['train_images']} normal "
             f"windows; tested on {tw['normal']} normal + {tw['anomalous']} polyp windows"
             + (f" and {wh['count']} whole images" if wh else "") + ".", "",
             "| what | kind | image AUROC | pixel AUROC (windows) | pixel AUROC (whole images) | train s |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        cell = lambda k: f"{r[k]:.3f}" if isinstance(r.get(k), float) else "–"  # noqa: E731
        ts = r.get("train_seconds")
        lines.append(f"| {name} | {r['kind']} | {cell('image_auroc')} | {cell('pixel_auroc')} | "
                     f"{cell('whole_pixel_auroc')} | {ts if ts is not None else '–'} |")
    if result.get("reductions"):
        sets = list(next(iter(result["reductions"].values())))
        lines += ["", "Image score of the branch's map, image AUROC: | reduction | " + " | ".join(sets) + " |",
                  "|---|" + "---|" * len(sets)]
        lines += [f"| {k} | " + " | ".join(f"{v[s]:.3f}" for s in sets) + " |" for k, v in result["reductions"].items()]
    lines += ["", provenance_markdown(result["provenance"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset in the project's layout, one modality")
    ap.add_argument("--json", type=Path, required=True, help="where to write the results (and a .md table beside)")
    ap.add_argument("--out", type=Path, default=Path("runs/real-eval"), help="folder for the trained bundles")
    ap.add_argument("--whole", type=Path, default=None,
                    help="folder with images/ and masks/ of whole test frames (default DATA/full/test if present)")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already trained in --out")
    ap.add_argument("--bank", type=int, default=60000, help="memory-bank patches of the kNN peers")
    a = ap.parse_args()
    whole = a.whole if a.whole is not None else (a.data / "full" / "test")
    if not (whole / "images").is_dir():
        whole = None
    t0 = time.perf_counter()
    res = run(a.data, a.out, whole, a.reuse, a.bank)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    a.json.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
