"""Two-stage CEMD training: multimodal teacher (paired), then independent students (unpaired).

The encoder is frozen and there is no augmentation, so its features are computed once per
image and cached (float16) — training then costs only the small trainable heads, which is
what keeps a demo bundle under 30 minutes on a 2-core CPU. Checkpoints are written after
every epoch; `resume=True` continues bit-for-bit where an interrupted run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine import dataset as ds
from engine.anomaly_synth import add_synthetic_anomaly
from engine.backbone import FrozenEncoder, file_sha256, get_backbone
from engine.bundle import (
    COLOUR_FILE,
    TEACHER_FILE,
    atomic_write_bytes,
    atomic_write_json,
    encoder_weights_sha,
    load_bundle,
    new_meta,
    save_state,
    student_file,
)
from engine.config import ModelConfig, TrainConfig, to_dict
from engine.errors import BundleError, DatasetError
from engine.losses import global_cosine, global_cosine_hard, hard_mining_alpha, pixel_cosine
from engine.student import StudentNet
from engine.teacher import MultimodalTeacher

STUDENT_WIDTH = 96
STATE_FILE = ".train_state.pt"
MODALITY_IDS = {"wli": 1, "nbi": 2}
STAGE2_KEYS = ("student_epochs", "student_lr", "student_weight_decay", "synthetic_anomalies", "synthetic_copies")


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@dataclass
class FeatureCache:
    """Frozen-encoder features of one modality's training images (float16, on CPU)."""

    names: list[str]
    feats: list[torch.Tensor]

    def batch(self, idx: torch.Tensor, device: str) -> list[torch.Tensor]:
        return [f[idx].to(device=device, dtype=torch.float32) for f in self.feats]

    def subset(self, idx: list[int]) -> "FeatureCache":
        t = torch.as_tensor(idx, dtype=torch.long)
        return FeatureCache([self.names[i] for i in idx], [f[t] for f in self.feats])


@torch.no_grad()
def encode_images(encoder: FrozenEncoder, images: np.ndarray, device: str, batch: int = 16) -> list[torch.Tensor]:
    out: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
        out.append([f.half().cpu() for f in encoder(x)])
    return [torch.cat(parts) for parts in zip(*out)]


def _split_names(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by name hash, so paired modalities split identically."""
    def key(n: str) -> str:
        return hashlib.sha256(f"{seed}:{n}".encode()).hexdigest()

    ordered = sorted(names, key=key)
    n_val = int(round(len(names) * val_fraction)) if len(names) >= 10 else 0
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])


def _epoch_order(n: int, seed: int, tag: str, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{tag}:{epoch}".encode()).hexdigest()[:15], 16))
    return torch.randperm(n, generator=g)


def dataset_fingerprint(paths: list[Path]) -> str:
    """Hash of file names and sizes: cheap provenance for the bundle (what it was trained on)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
    return h.hexdigest()


class Trainer:
    def __init__(self, data: Path, out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, stage: str = "all",
                 resume: bool = False, console: Console | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = True, interrupt_after_epochs: int | None = None) -> None:
        if stage not in ("teacher", "students", "all", "colour"):
            raise BundleError(f"--stage must be teacher, students, colour or all, not {stage!r}")
        self.data, self.out, self.stage, self.resume = Path(data), Path(out), stage, resume
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.console = console or Console()
        self.log = log or (lambda msg: self.console.print(msg, highlight=False))
        self.show_progress = progress
        # Simulates a crash after this many epochs in total (tests of --resume).
        self.interrupt_after_epochs = interrupt_after_epochs
        self.epochs_run = 0
        self.device = train_cfg.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BundleError("--device cuda asked for but no CUDA GPU is available; use --device cpu")
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)

    # ------------------------------------------------------------------ data
    def _prepare_data(self) -> None:
        index = ds.scan_dataset(self.data, require_train=True)
        for w in index.warnings:
            self.log(f"[yellow]warning:[/] {w}")
        available = tuple(m for m in self.model_cfg.modalities if m in index.modalities)
        if not available:
            raise DatasetError(
                f"{self.data} has none of the modalities {', '.join(self.model_cfg.modalities)}; "
                "expected wli/ and/or nbi/ folders (see docs/DATA.md)"
            )
        if len(available) < len(self.model_cfg.modalities):
            self.log(f"[yellow]only {', '.join(available)} found: training that branch alone, teacher fusion off[/]")
            self.model_cfg = replace(self.model_cfg, modalities=available, fusion=False)
        self.index = index
        self.train_paths: dict[str, dict[str, Path]] = {
            m: {p.stem: p for p in index.modalities[m].train} for m in available
        }
        self.val_names: dict[str, list[str]] = {}
        self.fit_names: dict[str, list[str]] = {}
        for m in available:
            fit, val = _split_names(sorted(self.train_paths[m]), self.cfg.val_fraction, self.cfg.seed)
            self.fit_names[m], self.val_names[m] = fit, val
        self.paired: list[str] = []
        # pairs matter to stage 1 only: students train on each modality's images alone (unpaired is fine)
        if self.stage != "students" and self.model_cfg.fusion and self.model_cfg.teacher_training and len(available) == 2:
            names = ds.paired_train_names(index, paired=True)
            fit = set(self.fit_names["wli"]) & set(self.fit_names["nbi"])
            self.paired = [n for n in names if n in fit]
            keep = max(1, int(round(len(self.paired) * self.cfg.paired_fraction)))
            self.paired = self.paired[:keep]

    def _encode_all(self) -> None:
        spec = get_backbone(self.model_cfg.backbone)
        self.encoder = FrozenEncoder(spec.build(None)).to(self.device).eval()
        self.caches: dict[str, FeatureCache] = {}
        self.anomaly_caches: dict[str, list[FeatureCache]] = {}
        size = self.model_cfg.input_size
        for m, by_name in self.train_paths.items():
            names = self.fit_names[m]
            images = ds.load_images([by_name[n] for n in names], size,
                                    progress=f"loading {m.upper()} images" if self.show_progress else None)
            t0 = time.perf_counter()
            feats = encode_images(self.encoder, images, self.device)
            self.caches[m] = FeatureCache(names, feats)
            self.log(f"encoded {len(names)} {m.upper()} images in {time.perf_counter() - t0:.1f} s")
            if self.stage != "teacher" and self.cfg.synthetic_anomalies > 0:
                self.anomaly_caches[m] = self._encode_anomalous(m, images)

    def _encode_anomalous(self, m: str, images: np.ndarray) -> list[FeatureCache]:
        """``synthetic_copies`` copies of every training image, each with one synthetic anomaly, encoded."""
        t0 = time.perf_counter()
        out = []
        for c in range(self.cfg.synthetic_copies):
            copies = np.empty_like(images)
            for i in range(len(images)):
                rng = np.random.default_rng([self.cfg.seed, MODALITY_IDS[m], c, i])
                copies[i] = add_synthetic_anomaly(images[i], rng, images)[0]
            out.append(FeatureCache(self.caches[m].names, encode_images(self.encoder, copies, self.device)))
        self.log(f"synthetic anomalies: {self.cfg.synthetic_copies} copies of {len(images)} {m.upper()} images "
                 f"made and encoded in {time.perf_counter() - t0:.1f} s")
        return out

    # ------------------------------------------------------------------ state
    def _state_path(self) -> Path:
        return self.out / STATE_FILE

    def _save_state(self, state: dict[str, Any]) -> None:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self._state_path(), buf.getvalue())
        self.epochs_run += 1
        if self.interrupt_after_epochs is not None and self.epochs_run >= self.interrupt_after_epochs:
            raise KeyboardInterrupt(f"simulated interruption after {self.epochs_run} epochs")

    def _load_state(self) -> dict[str, Any] | None:
        if not self.resume or not self._state_path().is_file():
            if self.resume:
                self.log("[yellow]--resume: no interrupted run found in the bundle; starting from scratch[/]")
            return None
        state = torch.load(self._state_path(), map_location="cpu", weights_only=False)
        if state.get("model") != to_dict(self.model_cfg) or state.get("train") != to_dict(replace(self.cfg, device="cpu", threads=0)):
            raise BundleError(
                f"{self._state_path()} was written with other settings; rerun with the same options or without --resume"
            )
        self.log(f"resuming: {state['stage']} at epoch {state['epoch']}")
        return state

    # ------------------------------------------------------------------ stage 1
    def train_teacher(self, teacher: MultimodalTeacher, state: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.cfg
        teacher.to(self.device).train()
        params = [p for p in teacher.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=cfg.teacher_weight_decay)
        if self.paired:
            pos = {m: {n: i for i, n in enumerate(self.caches[m].names)} for m in self.caches}
            rows = {m: [pos[m][n] for n in self.paired] for m in self.caches}
            n_items = len(self.paired)
        else:
            rows = {m: list(range(len(self.caches[m].names))) for m in self.caches}
            n_items = min(len(r) for r in rows.values())
        steps_per_epoch = max(1, math.ceil(n_items / cfg.batch_size))
        total = cfg.teacher_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.teacher_lr, total_steps=max(total, 1), pct_start=0.1)
        start, history = 0, []
        if state and state["stage"] == "teacher":
            teacher.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            start, history = state["epoch"], state["history"]
        mode = "paired, cross-masked fusion" if self.paired else "intra-modal (fusion off)"
        self.log(f"stage 1 teacher: {n_items} {'pairs' if self.paired else 'images per modality'}, {mode}")
        with self._progress() as prog:
            task = prog.add_task("teacher", total=cfg.teacher_epochs, completed=start, info="")
            for epoch in range(start, cfg.teacher_epochs):
                order = {m: _epoch_order(len(rows[m]), cfg.seed, f"teacher-{m}" if not self.paired else "teacher", epoch)
                         for m in rows}
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                losses = []
                for s in range(steps_per_epoch):
                    feats = {}
                    for m in rows:
                        pick = order["wli" if self.paired else m][s * cfg.batch_size : (s + 1) * cfg.batch_size]
                        idx = torch.as_tensor([rows[m][int(i)] for i in pick])
                        feats[m] = self.caches[m].batch(idx, self.device)
                    loss = teacher.reconstruction_loss(feats, gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                history.append(float(np.mean(losses)))
                prog.update(task, advance=1, info=f"loss {history[-1]:.4f}")
                self._epoch_note("teacher", epoch, cfg.teacher_epochs, history[-1])
                self._save_state({"stage": "teacher", "epoch": epoch + 1, "teacher": teacher.state_dict(),
                                  "optim": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                                  "model": to_dict(self.model_cfg), "train": to_dict(replace(cfg, device="cpu", threads=0))})
        teacher.eval()
        return {"teacher_loss": history}

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def _targets(self, teacher: MultimodalTeacher, m: str) -> list[torch.Tensor]:
        cache = self.caches[m]
        out: list[list[torch.Tensor]] = []
        for i in range(0, len(cache.names), 32):
            idx = torch.arange(i, min(i + 32, len(cache.names)))
            out.append([t.half().cpu() for t in teacher.adapters(m, cache.batch(idx, self.device))])
        return [torch.cat(parts) for parts in zip(*out)]

    def train_student(self, m: str, teacher: MultimodalTeacher, state: dict[str, Any] | None,
                      done: dict[str, dict[str, torch.Tensor]]) -> tuple[StudentNet, list[float]]:
        cfg, mc = self.cfg, self.model_cfg
        torch.manual_seed(cfg.seed + (1 if m == "wli" else 2))
        net = StudentNet(get_backbone(mc.backbone).channels, STUDENT_WIDTH).to(self.device).train()
        opt = torch.optim.Adam(net.parameters(), lr=cfg.student_lr, betas=(0.5, 0.999), weight_decay=cfg.student_weight_decay)
        cache = self.caches[m]
        targets = FeatureCache(cache.names, self._targets(teacher, m))
        n = len(cache.names)
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total = cfg.student_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.student_lr, total_steps=max(total, 1), pct_start=0.1)
        start, history = 0, []
        if state and state["stage"] == f"student-{m}":
            net.load_state_dict(state["student"])
            opt.load_state_dict(state["optim"])
            sched.load_state_dict(state["sched"])
            start, history = state["epoch"], state["history"]
        loss_fn = pixel_cosine if mc.student_loss == "pixel" else global_cosine
        anomalous = self.anomaly_caches.get(m, [])
        if anomalous:
            self.log(f"{m.upper()} student: {cfg.synthetic_anomalies:.0%} of samples with a synthetic anomaly "
                     f"(target: the clean image's teacher features)")
        with self._progress() as prog:
            task = prog.add_task(f"{m.upper()} student", total=cfg.student_epochs, completed=start, info="")
            for epoch in range(start, cfg.student_epochs):
                order = _epoch_order(n, cfg.seed, f"student-{m}", epoch)
                pick_gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + MODALITY_IDS.get(m, 0))
                losses = []
                for s in range(steps_per_epoch):
                    idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                    if len(idx) < 2 and n >= 2:
                        continue  # BatchNorm needs two samples
                    feats, tgt = cache.batch(idx, self.device), targets.batch(idx, self.device)
                    if anomalous:
                        feats = self._with_anomalies(feats, idx, anomalous, pick_gen)
                    pred = net(feats)
                    if mc.hard_mining:
                        step = epoch * steps_per_epoch + s
                        loss = global_cosine_hard(tgt, pred, hard_mining_alpha(step, total))
                    else:
                        loss = loss_fn(tgt, pred)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                history.append(float(np.mean(losses)) if losses else float("nan"))
                prog.update(task, advance=1, info=f"loss {history[-1]:.4f}")
                self._epoch_note(f"{m.upper()} student", epoch, cfg.student_epochs, history[-1])
                self._save_state({"stage": f"student-{m}", "epoch": epoch + 1, "student": net.state_dict(),
                                  "optim": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                                  "teacher": teacher.state_dict(), "done": done,
                                  "model": to_dict(self.model_cfg), "train": to_dict(replace(cfg, device="cpu", threads=0))})
        return net.eval(), history

    def _with_anomalies(self, feats: list[torch.Tensor], idx: torch.Tensor, anomalous: list[FeatureCache],
                        gen: torch.Generator) -> list[torch.Tensor]:
        """Swap a ``synthetic_anomalies`` share of the batch for one of its anomalous copies."""
        use = torch.rand(len(idx), generator=gen) < self.cfg.synthetic_anomalies
        which = torch.randint(len(anomalous), (len(idx),), generator=gen)
        for c, copy in enumerate(anomalous):
            sel = use & (which == c)
            if sel.any():
                for f, g in zip(feats, copy.batch(idx[sel], self.device)):
                    f[sel] = g
        return feats

    # ------------------------------------------------------------------ orchestration
    def _epoch_note(self, label: str, epoch: int, total: int, loss: float) -> None:
        """Without a terminal (a log file, CI) the bar is invisible: log every tenth epoch instead."""
        if self.show_progress and not self.console.is_terminal and ((epoch + 1) % max(1, total // 10) == 0
                                                                   or epoch + 1 == total):
            self.log(f"{label} epoch {epoch + 1}/{total}: loss {loss:.4f}")

    def _progress(self) -> Progress:
        prog = progress_bar(self.console)
        prog.disable = not self.show_progress
        return prog

    def run(self) -> Path:
        t_start = time.perf_counter()
        if self.stage == "colour":
            self._fit_colour()
            return self.out
        # The colour map is fitted last, on the finished branches (its weight depends on their maps).
        want_colour = self.model_cfg.colour_score
        self.model_cfg = replace(self.model_cfg, colour_score=False)
        self._prepare_data()
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        spec = get_backbone(self.model_cfg.backbone)
        meta_path = self.out / "bundle.json"

        if self.stage == "students":
            existing = load_bundle(self.out, require_students=False)
            if set(self.model_cfg.modalities) - set(existing.model.modalities):
                raise BundleError(f"bundle {self.out} teacher was trained for {existing.model.modalities}")
            want_colour = want_colour or existing.model.colour_score  # retrained students keep their colour map
            self.model_cfg = replace(existing.model, modalities=self.model_cfg.modalities,
                                     student_loss=self.model_cfg.student_loss, hard_mining=self.model_cfg.hard_mining,
                                     colour_score=False, colour_gain=self.model_cfg.colour_gain
                                     if self.model_cfg.colour_score else existing.model.colour_gain)
            teacher = existing.teacher.to(self.device)
            meta = existing.meta
            # The teacher keeps its stage-1 settings; the stage-2 ones are this run's.
            meta.setdefault("train", {}).update({k: v for k, v in to_dict(self.cfg).items() if k in STAGE2_KEYS})
        else:
            torch.manual_seed(self.cfg.seed)
            teacher = MultimodalTeacher(self.model_cfg, spec.channels)
            meta = new_meta(self.model_cfg, self.cfg, encoder_weights_sha(self.model_cfg.backbone, None), STUDENT_WIDTH)

        self._encode_all()
        meta["data"] = self._data_meta()

        teacher_done = self.stage == "students" or (state is not None and state["stage"].startswith("student"))
        if not teacher_done:
            if self.model_cfg.teacher_training:
                meta["history"].update(self.train_teacher(teacher, state))
            else:
                self.log("stage 1 skipped (teacher_training off): teacher = frozen encoder, plain reverse distillation")
        elif state is not None and "teacher" in state:
            teacher.load_state_dict(state["teacher"])
        teacher.to(self.device).eval()
        meta["model"] = to_dict(self.model_cfg)
        meta["files"][TEACHER_FILE] = save_state(self.out / TEACHER_FILE, teacher)
        if self.stage == "teacher":
            atomic_write_json(meta_path, meta)
            self._state_path().unlink(missing_ok=True)
            return self.out

        done: dict[str, dict[str, torch.Tensor]] = dict(state.get("done", {})) if state else {}
        for m in self.model_cfg.modalities:
            if m in done:
                net = StudentNet(spec.channels, STUDENT_WIDTH)
                net.load_state_dict(done[m])
            else:
                resume_state = state if state and state["stage"] == f"student-{m}" else None
                net, hist = self.train_student(m, teacher, resume_state, done)
                meta["history"][f"student_{m}_loss"] = hist
                done[m] = {k: v.cpu() for k, v in net.state_dict().items()}
            meta["files"][student_file(m)] = save_state(self.out / student_file(m), net.cpu())
        meta["train_seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(meta_path, meta)
        self._score_stats(meta)
        atomic_write_json(meta_path, meta)
        self._state_path().unlink(missing_ok=True)
        if want_colour:
            self._fit_colour()
        self.log(f"bundle written to {self.out} in {time.perf_counter() - t_start:.0f} s")
        return self.out

    def _fit_colour(self) -> None:
        cfg = self.model_cfg
        fit_bundle_colour(self.out, self.data, cfg.colour_gain, self.log, cfg.colour_stride, cfg.colour_background,
                          cfg.colour_brownish, cfg.colour_vessel_cut)

    def _data_meta(self) -> dict[str, Any]:
        info: dict[str, Any] = {"root": str(self.data), "synthetic": self.index.synthetic, "modalities": {}}
        src = self.data / "dataset.json"
        if src.is_file():
            try:
                info["dataset_json"] = {k: v for k, v in json.loads(src.read_text()).items() if k in ("format", "seed", "size", "generator", "counts")}
            except json.JSONDecodeError:
                pass
        for m in self.caches:
            paths = [self.train_paths[m][n] for n in self.fit_names[m]]
            info["modalities"][m] = {"train_images": len(paths), "val_images": len(self.val_names[m]),
                                     "fingerprint": dataset_fingerprint(paths)}
        info["paired_images"] = len(self.paired)
        return info

    def _score_stats(self, meta: dict[str, Any]) -> None:
        """Image scores of held-out normal training images: a first, uncalibrated scale for alerts."""
        meta["score_stats"].update(score_stats(load_bundle(self.out), {
            m: [self.train_paths[m][n] for n in self.val_names.get(m) or []] for m in self.train_paths}))


@torch.no_grad()
def score_stats(bundle: Any, images_by_modality: dict[str, list[Path]]) -> dict[str, dict[str, float]]:
    """Summary of each branch's image scores on these (normal) images, as the bundle scores them now."""
    out = {}
    for m in bundle.modalities:
        paths = images_by_modality.get(m) or []
        if not paths:
            continue
        images = ds.load_images(paths, bundle.model.input_size)
        branch = bundle.branch(m)
        scores = []
        for i in range(0, len(images), 16):
            x = torch.from_numpy(images[i : i + 16]).permute(0, 3, 1, 2).float().div_(255)
            scores.append(branch(x)[1])
        s = torch.cat(scores).numpy()
        out[m] = {"n": int(len(s)), "mean": float(s.mean()), "std": float(s.std()),
                  "p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95)),
                  "p99": float(np.percentile(s, 99)), "max": float(s.max())}
    return out


@torch.no_grad()
def fit_bundle_colour(out: Path, data: Path, gain: float, log: Callable[[str], None],
                      stride: int = ModelConfig.colour_stride,
                      background: float = ModelConfig.colour_background,
                      brownish: tuple[str, ...] = ModelConfig.colour_brownish,
                      vessel_cut: float = ModelConfig.colour_vessel_cut) -> dict[str, Any]:
    """Fit the colour outlier map (engine/colour.py) of every branch of bundle ``out`` on the normal
    training images of ``data``, computed at 1/``stride`` of the input size against a local colour
    background of σ ``background`` px (0: the frame's median), scoring only browner-than-normal
    deviations in the modalities of ``brownish`` (their background without the pixels more than
    ``vessel_cut`` normal standard deviations less brown than a first one), and switch it on; the
    weight puts the colour map's normal spread (p99 − median of its pixels on the held-out images)
    on the distillation map's."""
    from engine.anomaly_map import FieldOfViewMask
    from engine.branch import StudentBranch
    from engine.colour import ColourOutlier, fit_colour

    t0 = time.perf_counter()
    bundle = load_bundle(out)
    plain = replace(bundle.model, colour_score=False)
    index = ds.scan_dataset(data, require_train=True)
    size = bundle.model.input_size
    fitted: dict[str, Any] = {}
    held_out: dict[str, list[Path]] = {}  # the split training made: its held-out images get the score stats
    for m in bundle.modalities:
        if m not in index.modalities:
            raise DatasetError(f"{data} has no {m.upper()} training images to fit the {m.upper()} colour map on")
        paths = {p.stem: p for p in index.modalities[m].train}
        fit, val = _split_names(sorted(paths), bundle.train.val_fraction, bundle.train.seed)
        held_out[m] = [paths[n] for n in val]
        stats = fit_colour(ds.load_images([paths[n] for n in fit], size), bundle.model.colour_sigma,
                           bundle.model.fov_threshold, bundle.model.fov_window, seed=bundle.train.seed,
                           stride=stride, background=background, brownish=m in brownish, vessel_cut=vessel_cut)
        branch = StudentBranch(plain, bundle.encoder, bundle.teacher.adapters, bundle.students[m], m).eval()
        colour = ColourOutlier(bundle.model.colour_sigma, stats["mean"], stats["inv_cov"], 1.0, stride, background,
                               m in brownish, vessel_cut)
        lit = branch.fov if branch.fov is not None else FieldOfViewMask(bundle.model.fov_threshold,
                                                                         bundle.model.fov_window)
        held = ds.load_images([paths[n] for n in (val or fit[:32])], size)
        d_px, c_px = [], []
        for i in range(0, len(held), 16):
            x = torch.from_numpy(held[i:i + 16]).permute(0, 3, 1, 2).float().div_(255)
            fov = lit(x)
            inside = fov > 0
            d_px.append(branch(x)[0][inside].numpy())
            c_px.append(colour(x, fov)[inside].numpy())
        d_all, c_all = np.concatenate(d_px), np.concatenate(c_px)
        spread_d = float(np.percentile(d_all, 99) - np.median(d_all))
        spread_c = float(np.percentile(c_all, 99) - np.median(c_all))
        if not spread_c > 0:
            raise DatasetError(f"the {m.upper()} colour map is flat on the held-out images of {data}: cannot weight it")
        stats.update(weight=spread_d / spread_c, spread_distillation=spread_d, spread_colour=spread_c,
                     held_out_images=len(held))
        fitted[m] = stats
        log(f"{m.upper()} colour map: fitted on {stats['images']} images, weight {stats['weight']:.4g} "
            f"(× gain {gain:g})")
    path = out / COLOUR_FILE
    atomic_write_json(path, {"format": "cemd-colour/1", "data": str(data), "modalities": fitted})
    meta = json.loads((out / "bundle.json").read_text())
    meta["files"][COLOUR_FILE] = file_sha256(path)
    meta["model"]["colour_score"] = True
    meta["model"]["colour_gain"] = gain
    meta["model"]["colour_sigma"] = bundle.model.colour_sigma
    meta["model"]["colour_stride"] = stride
    meta["model"]["colour_background"] = background
    meta["model"]["colour_brownish"] = [m for m in brownish if m in bundle.modalities]
    meta["model"]["colour_vessel_cut"] = float(vessel_cut)
    atomic_write_json(out / "bundle.json", meta)
    meta["score_stats"] = score_stats(load_bundle(out), held_out)
    atomic_write_json(out / "bundle.json", meta)
    log(f"colour maps written to {path} in {time.perf_counter() - t0:.0f} s; recalibrate: the scores changed")
    return fitted


def validation_images(data: Path, seed: int, val_fraction: float) -> dict[str, list[Path]]:
    """The held-out normal training images of a dataset, split as training split it."""
    index = ds.scan_dataset(data, require_train=True)
    out = {}
    for m in index.modalities:
        paths = {p.stem: p for p in index.modalities[m].train}
        out[m] = [paths[n] for n in _split_names(sorted(paths), val_fraction, seed)[1]]
    return out


def train_bundle(data: Path, out: Path, model_cfg: ModelConfig | None = None, train_cfg: TrainConfig | None = None,
                 **kwargs: Any) -> Path:
    return Trainer(data, out, model_cfg or ModelConfig(), train_cfg or TrainConfig(), **kwargs).run()

