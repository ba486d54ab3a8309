"""Two-stage CEMD training: multimodal teacher (paired), then independent students (unpaired).

The encoder is frozen and there is no augmentation, so its features are computed once per
image and cached (float16) — training then costs only the small trainable heads, which is
what keeps a demo bundle under 30 minutes on a 2-core CPU. Checkpoints are written after
every epoch; `resume=True` continues bit-for-bit where an interrupted run stopped.

Each stage is scored every epoch on the held-out normal training images (``val_fraction``) and,
with ``early_stopping``, stops once that loss has not improved by a relative ``min_delta`` for
``patience`` epochs, keeping its best epoch (`EpochControl`). A stage that cannot apply to the
data (the colour map of images without colour) is skipped with a line saying why.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from engine.data import dataset as ds
from engine.deploy.bundle import (
    COLOUR_FILE,
    MEMORY_FILE,
    TEACHER_FILE,
    Bundle,
    atomic_write_bytes,
    atomic_write_json,
    encoder_weights_sha,
    load_bundle,
    new_meta,
    save_state,
    student_file,
)
from engine.errors import BundleError, DatasetError
from engine.model.backbone import BackboneSpec, FrozenEncoder, file_sha256, get_backbone
from engine.model.config import ModelConfig, TrainConfig, to_dict
from engine.model.losses import global_cosine, global_cosine_hard, hard_mining_alpha, pixel_cosine
from engine.model.student import StudentNet
from engine.model.teacher import MultimodalTeacher
from engine.progress import progress_bar
from engine.train.anomalies import add_synthetic_anomaly

STUDENT_WIDTH = 96
STATE_FILE = ".train_state.pt"
MODALITY_IDS = {"wli": 1, "nbi": 2}
STAGE2_KEYS = ("student_epochs", "student_lr", "student_weight_decay", "synthetic_anomalies", "synthetic_copies")
# A modality's training images count as colourless (grayscale) when at most GREY_SHARE of their
# pixels have channels further apart than GREY_LEVELS (of 255): JPEG noise and a small coloured
# on-screen overlay stay below it, while lit mucosa of a colour endoscope is coloured almost everywhere.
GREY_LEVELS = 6
GREY_SHARE = 0.01
LR_CUT = 0.2  # with early stopping: the learning rate is multiplied by this on each plateau
ONECYCLE_WARMUP = 0.1  # one-cycle's pct_start: the share of the maximum epochs the rate warms up over


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


def _bundle_split(index: ds.DatasetIndex, data: Path, m: str, train: TrainConfig, what: str = ""
                  ) -> tuple[list[Path], list[Path]]:
    """The fit and held-out training images of modality ``m``, split as the bundle's training split them
    (``train``: its seed and val_fraction); ``what`` the missing modality's images were needed for."""
    if m not in index.modalities:
        raise DatasetError(f"{data} has no {m.upper()} training images to {what}")
    paths = {p.stem: p for p in index.modalities[m].train}
    fit, val = _split_names(sorted(paths), train.val_fraction, train.seed)
    return [paths[n] for n in fit], [paths[n] for n in val]


def _epoch_order(n: int, seed: int, tag: str, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{tag}:{epoch}".encode()).hexdigest()[:15], 16))
    return torch.randperm(n, generator=g)


def colourless_reason(images: np.ndarray) -> str | None:
    """Why a colour map cannot apply to these N×S×S×3 uint8 images, or None when they carry colour."""
    coloured = total = 0
    for i in range(0, len(images), 32):
        x = images[i:i + 32]
        spread = x.max(axis=-1).astype(np.int16) - x.min(axis=-1).astype(np.int16)
        coloured += int((spread > GREY_LEVELS).sum())
        total += spread.size
    if total and coloured <= GREY_SHARE * total:
        return "the images carry no colour (grayscale)"
    return None


def _clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class EpochControl:
    """One stage's learning-rate schedule and stop rule, driven by its held-out loss.

    The schedule is one-cycle over the maximum epochs, as without early stopping. With early
    stopping (``cfg.early_stopping`` and held-out images to score) two things are added: whenever
    the held-out loss has not improved by a relative ``min_delta`` for ``max(1, patience // 2)``
    epochs (after the warm-up) the learning rate is multiplied by ``LR_CUT`` from then on, and after
    ``patience`` such epochs in a row the stage stops and keeps the weights of its best held-out
    epoch. Why not one-cycle alone, cut short: it spreads its annealing over the maximum, so the
    held-out loss keeps creeping down until the last epochs and a stop rule alone could only end
    the stage near the end (no time saved) or at a still high learning rate (a worse model). Why
    not plateau cuts alone: a loss that keeps creeping down at the peak rate would never be
    annealed. Together: a stage whose loss keeps falling trains exactly as before (the same
    one-cycle run, to the maximum); one whose loss levels off is annealed there and ends a few
    epochs later. Every quantity is a function of the epochs seen, so the same seed gives the
    same stop, and the state (best weights, counters, scale) resumes exactly.

    Without early stopping (or without held-out images) the stage runs every epoch and keeps its
    last one, as before."""

    def __init__(self, opt: torch.optim.Optimizer, max_lr: float, epochs: int, steps_per_epoch: int,
                 cfg: TrainConfig, has_val: bool) -> None:
        self.opt, self.max_lr, self.epochs = opt, max_lr, epochs
        self.cfg, self.has_val = cfg, has_val
        self.early = cfg.early_stopping and has_val
        self.lr_patience = max(1, cfg.patience // 2)
        total = max(epochs * steps_per_epoch, 1)
        self.warm_steps = int(ONECYCLE_WARMUP * total)
        self.onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total,
                                                            pct_start=ONECYCLE_WARMUP)
        self.step_i, self.scale, self.cuts = 0, 1.0, 0
        self.best, self.best_epoch, self.ref = math.inf, 0, math.inf
        self.bad = self.lr_bad = 0
        self.stopped = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.val_history: list[float] = []

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def _scale_lr(self) -> None:
        # OneCycleLR sets each step's rate from its own position (not from the current rate): scaling it
        # after the scheduler's step does not compound
        if self.scale != 1.0:
            for g in self.opt.param_groups:
                g["lr"] *= self.scale

    def step(self) -> None:
        """After every optimiser step."""
        self.onecycle.step()
        self.step_i += 1
        self._scale_lr()

    def end_epoch(self, epoch: int, val: float | None, module: torch.nn.Module) -> bool:
        """Record epoch ``epoch`` (0-based)'s held-out loss; True when the stage should stop."""
        if val is None:
            return False
        self.val_history.append(val)
        if val < self.best:
            self.best, self.best_epoch = val, epoch + 1
            if self.early:
                self.best_state = _clone_state(module)
        if val < self.ref * (1 - self.cfg.min_delta):
            self.ref, self.bad, self.lr_bad = val, 0, 0
        else:
            self.bad += 1
            self.lr_bad += 1
            if self.early and self.step_i >= self.warm_steps and self.lr_bad >= self.lr_patience:
                self.scale *= LR_CUT
                self.cuts += 1
                self.lr_bad = 0
                for g in self.opt.param_groups:
                    g["lr"] *= LR_CUT
        self.stopped = self.early and self.bad >= self.cfg.patience
        return self.stopped

    def info(self) -> str:
        if not self.val_history:
            return ""
        return (f"val {self.val_history[-1]:.4f} (best {self.best:.4f} @{self.best_epoch}"
                + (f", {self.bad}/{self.cfg.patience} without gain" if self.early and self.bad else "") + ")")

    def finish(self, module: torch.nn.Module) -> None:
        """Give the module the weights the stage keeps: its best held-out epoch's (early stopping)."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)

    def record(self, epochs_run: int, val_images: int) -> dict[str, Any]:
        cfg = self.cfg
        early_end = self.stopped and epochs_run < self.epochs
        plateau = f"the held-out loss did not improve by {cfg.min_delta:.2%} for {cfg.patience} epochs"
        if early_end:
            reason = f"stopped: {plateau}"
        elif self.stopped:
            reason = f"reached the maximum epochs (where {plateau} either)"
        elif not cfg.early_stopping:
            reason = "early stopping off: ran every epoch, kept the last"
        elif not self.has_val:
            reason = "no held-out images (under 10 training images): ran every epoch, kept the last"
        else:
            reason = "reached the maximum epochs"
        out: dict[str, Any] = {"epochs_run": epochs_run, "max_epochs": self.epochs, "stopped_early": early_end,
                               "reason": reason, "val_images": val_images}
        if self.val_history:
            out.update(best_epoch=self.best_epoch, best_val_loss=self.best,
                       kept_epoch=self.best_epoch if self.best_state is not None else epochs_run)
        if self.early:
            out.update(patience=cfg.patience, min_delta=cfg.min_delta, lr_cuts=self.cuts)
        return out

    def state(self) -> dict[str, Any]:
        return {"onecycle": self.onecycle.state_dict(), "step": self.step_i, "scale": self.scale,
                "cuts": self.cuts, "best": self.best, "best_epoch": self.best_epoch, "ref": self.ref,
                "bad": self.bad, "lr_bad": self.lr_bad, "stopped": self.stopped, "best_state": self.best_state,
                "val_history": list(self.val_history)}

    def load(self, state: dict[str, Any]) -> None:
        """After the optimiser's state is loaded (it holds the current, scaled rate)."""
        self.onecycle.load_state_dict(state["onecycle"])
        self.step_i, self.scale, self.cuts = state["step"], state["scale"], state["cuts"]
        self.best, self.best_epoch, self.ref = state["best"], state["best_epoch"], state["ref"]
        self.bad, self.lr_bad, self.stopped = state["bad"], state["lr_bad"], state["stopped"]
        self.best_state, self.val_history = state["best_state"], list(state["val_history"])


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# what of DATA/dataset.json a bundle records (bundle.json data.dataset_json): which synthetic set it was trained on
DATASET_JSON_KEYS = ("format", "seed", "size", "generator", "counts")


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
        if stage not in ("teacher", "students", "all", "memory", "colour"):
            raise BundleError(f"--stage must be teacher, students, memory, colour or all, not {stage!r}")
        self.data, self.out, self.stage, self.resume = Path(data), Path(out), stage, resume
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.console = console or Console()
        self.log = log or (lambda msg: self.console.print(msg, highlight=False))
        self.show_progress = progress
        # Simulates a crash after this many epochs in total (tests of --resume).
        self.interrupt_after_epochs = interrupt_after_epochs
        self.epochs_run = 0
        # what each finished stage leaves for bundle.json (carried in the state file, so a resumed run keeps it)
        self.records: dict[str, dict[str, Any]] = {"history": {}, "stopping": {}}
        self.want_colour = model_cfg.colour_score
        self.want_memory = model_cfg.memory_score
        self.colour_skip: dict[str, str] = {}  # modality → why its colour map cannot apply (found up front)
        self.saved: list[str] = []  # usable results on disk, for the message when a later stage fails
        self.bundle_written = False
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
        if (len(available) == 1 and self.stage == "all" and self.model_cfg.teacher_training
                and not self.cfg.teacher_one_modality):
            self.log("one modality: stage 1 skipped, the teacher is the frozen encoder (a trained teacher was level "
                     "with it on real colonoscopy at twice the time; --teacher-one-modality trains it)")
            self.model_cfg = replace(self.model_cfg, teacher_training=False)
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
        self.paired_val: list[str] = []  # held-out pairs: the stage-1 stop rule's loss
        # pairs matter to stage 1 only: students train on each modality's images alone (unpaired is fine)
        if self.stage != "students" and self.model_cfg.fusion and self.model_cfg.teacher_training and len(available) == 2:
            names = ds.paired_train_names(index, paired=True)
            fit = set(self.fit_names["wli"]) & set(self.fit_names["nbi"])
            self.paired = [n for n in names if n in fit]
            keep = max(1, int(round(len(self.paired) * self.cfg.paired_fraction)))
            self.paired = self.paired[:keep]
            held = set(self.val_names["wli"]) & set(self.val_names["nbi"])
            self.paired_val = [n for n in names if n in held]

    def _encode_all(self) -> None:
        spec = get_backbone(self.model_cfg.backbone)
        self.encoder = FrozenEncoder(spec.build(None)).to(self.device).eval()
        self.caches: dict[str, FeatureCache] = {}
        self.val_caches: dict[str, FeatureCache] = {}
        self.anomaly_caches: dict[str, list[FeatureCache]] = {}
        size = self.model_cfg.input_size
        for m, by_name in self.train_paths.items():
            names = self.fit_names[m]
            images = ds.load_images([by_name[n] for n in names], size,
                                    progress=f"loading {m.upper()} images" if self.show_progress else None)
            if self.want_colour and self.stage != "teacher":
                reason = colourless_reason(images)
                if reason:  # found now, so that the end of the run does not load and fit it for nothing
                    self.colour_skip[m] = reason
                    self.log(f"[yellow]{m.upper()}: {reason}: its colour map will be skipped[/]")
            t0 = time.perf_counter()
            feats = encode_images(self.encoder, images, self.device)
            self.caches[m] = FeatureCache(names, feats)
            val = self.val_names[m]
            if val:
                held = ds.load_images([by_name[n] for n in val], size)
                self.val_caches[m] = FeatureCache(val, encode_images(self.encoder, held, self.device))
            self.log(f"encoded {len(names)} {m.upper()} images (+ {len(val)} held out) in "
                     f"{time.perf_counter() - t0:.1f} s")
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
        train = to_dict(replace(self.cfg, device="cpu", threads=0))
        if state.get("model") != to_dict(self.model_cfg) or state.get("train") != train:
            raise BundleError(
                f"{self._state_path()} was written with other settings; rerun with the same options or without --resume"
            )
        self.log(f"resuming: {state['stage']} at epoch {state['epoch']}")
        return state

    def _stage_state(self, stage: str, epoch: int, ctl: EpochControl, history: list[float],
                     opt: torch.optim.Optimizer, **extra: Any) -> dict[str, Any]:
        return {"stage": stage, "epoch": epoch, "optim": opt.state_dict(), "control": ctl.state(),
                "history": history, "records": self.records, **extra,
                "model": to_dict(self.model_cfg), "train": to_dict(replace(self.cfg, device="cpu", threads=0))}

    def _epoch_done(self, prog: Progress, task: Any, label: str, epoch: int, total: int, loss: float,
                    ctl: EpochControl, t0: float, start: int) -> None:
        """Progress bar (the time left is the maximum's: the stop rule may end the stage sooner); without
        a terminal (a log file, CI) the bar is invisible: a log line every tenth epoch instead."""
        val = ctl.info()
        prog.update(task, advance=1, info=f"loss {loss:.4f}" + (f" · {val}" if val else ""))
        if self.show_progress and not self.console.is_terminal and ((epoch + 1) % max(1, total // 10) == 0
                                                                   or epoch + 1 == total):
            took = time.perf_counter() - t0
            left = took / (epoch + 1 - start) * (total - epoch - 1)
            self.log(f"{label} epoch {epoch + 1}/{total}: loss {loss:.4f}" + (f", {val}" if val else "")
                     + f"; {_duration(took)} elapsed, at most {_duration(left)} left")

    def _stage_end(self, prog: Progress, task: Any, label: str, key: str, ctl: EpochControl, epochs_run: int,
                   val_images: int) -> None:
        rec = ctl.record(epochs_run, val_images)
        self.records["stopping"][key] = rec
        if ctl.stopped:
            prog.update(task, total=epochs_run)
        kept = rec.get("kept_epoch", epochs_run)
        best = f"; kept epoch {kept} (held-out loss {ctl.best:.4f})" if ctl.val_history else ""
        self.log(f"{label}: {epochs_run}/{ctl.epochs} epochs, {rec['reason']}{best}")

    # ------------------------------------------------------------------ stage 1
    def _teacher_rows(self, caches: dict[str, FeatureCache], names: list[str] | None) -> tuple[dict[str, list[int]], int]:
        """Rows of each modality's cache in stage-1 order: the pairs (``names``), or each modality's own."""
        if names is not None:
            pos = {m: {n: i for i, n in enumerate(caches[m].names)} for m in caches}
            return {m: [pos[m][n] for n in names] for m in caches}, len(names)
        rows = {m: list(range(len(caches[m].names))) for m in caches}
        return rows, min((len(r) for r in rows.values()), default=0)

    @torch.no_grad()
    def _teacher_val_loss(self, teacher: MultimodalTeacher) -> float | None:
        """Masked-reconstruction loss on the held-out images, with the same masks every epoch."""
        if set(self.val_caches) != set(self.caches):
            return None
        rows, n = self._teacher_rows(self.val_caches, self.paired_val if self.paired else None)
        if n == 0:
            return None
        teacher.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + 999)
        total = 0.0
        for i in range(0, n, self.cfg.batch_size):
            feats = {m: self.val_caches[m].batch(torch.as_tensor(r[i:i + self.cfg.batch_size]), self.device)
                     for m, r in rows.items()}
            total += teacher.reconstruction_loss(feats, gen).item() * len(next(iter(feats.values()))[0])
        teacher.train()
        return total / n

    def train_teacher(self, teacher: MultimodalTeacher, state: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.cfg
        teacher.to(self.device).train()
        params = [p for p in teacher.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=cfg.teacher_weight_decay)
        rows, n_items = self._teacher_rows(self.caches, self.paired if self.paired else None)
        steps_per_epoch = max(1, math.ceil(n_items / cfg.batch_size))
        n_val = len(self.paired_val) if self.paired else min((len(c.names) for c in self.val_caches.values()), default=0)
        if set(self.val_caches) != set(self.caches):
            n_val = 0
        ctl = EpochControl(opt, cfg.teacher_lr, cfg.teacher_epochs, steps_per_epoch, cfg, n_val > 0)
        start, history = 0, []
        if state and state["stage"] == "teacher":
            teacher.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optim"])
            ctl.load(state["control"])
            start, history = state["epoch"], state["history"]
        mode = "paired, cross-masked fusion" if self.paired else "intra-modal (fusion off)"
        self.log(f"stage 1 teacher: {n_items} {'pairs' if self.paired else 'images per modality'}, {mode}; "
                 f"at most {cfg.teacher_epochs} epochs" + (f", early stopping on {n_val} held-out" if ctl.early else ""))
        t0 = time.perf_counter()
        with self._progress() as prog:
            task = prog.add_task("teacher", total=cfg.teacher_epochs, completed=start, info="")
            for epoch in range(start, cfg.teacher_epochs):
                if ctl.stopped:
                    break
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
                    ctl.step()
                    losses.append(loss.item())
                history.append(float(np.mean(losses)))
                ctl.end_epoch(epoch, self._teacher_val_loss(teacher), teacher)
                self._epoch_done(prog, task, "teacher", epoch, cfg.teacher_epochs, history[-1], ctl, t0, start)
                self._save_state(self._stage_state("teacher", epoch + 1, ctl, history, opt,
                                                   teacher=teacher.state_dict()))
            self._stage_end(prog, task, "stage 1 teacher", "teacher", ctl, len(history), n_val)
        ctl.finish(teacher)
        teacher.eval()
        out = {"teacher_loss": history, **({"teacher_val_loss": ctl.val_history} if ctl.val_history else {})}
        self.records["history"].update(out)
        return out

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def _targets(self, teacher: MultimodalTeacher, m: str, cache: FeatureCache | None = None) -> list[torch.Tensor]:
        cache = cache if cache is not None else self.caches[m]
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
        val = self.val_caches.get(m)
        val_targets = FeatureCache(val.names, self._targets(teacher, m, val)) if val is not None else None
        steps_per_epoch = max(1, math.ceil(len(cache.names) / cfg.batch_size))
        ctl = EpochControl(opt, cfg.student_lr, cfg.student_epochs, steps_per_epoch, cfg, val is not None)
        start, history = 0, []
        if state and state["stage"] == f"student-{m}":
            net.load_state_dict(state["student"])
            opt.load_state_dict(state["optim"])
            ctl.load(state["control"])
            start, history = state["epoch"], state["history"]
        loss_fn = pixel_cosine if mc.student_loss == "pixel" else global_cosine
        anomalous = self.anomaly_caches.get(m, [])
        if anomalous:
            self.log(f"{m.upper()} student: {cfg.synthetic_anomalies:.0%} of samples with a synthetic anomaly "
                     f"(target: the clean image's teacher features)")
        label = f"{m.upper()} student"
        t0 = time.perf_counter()
        with self._progress() as prog:
            task = prog.add_task(label, total=cfg.student_epochs, completed=start, info="")
            for epoch in range(start, cfg.student_epochs):
                if ctl.stopped:
                    break
                history.append(self._student_epoch(m, epoch, net, opt, ctl, cache, targets, loss_fn, anomalous))
                # held out: the plain student loss (also under hard mining), clean images, eval-mode BatchNorm
                held = student_val_loss(net, val, val_targets, loss_fn, self.device) if val is not None else None
                ctl.end_epoch(epoch, held, net)
                self._epoch_done(prog, task, label, epoch, cfg.student_epochs, history[-1], ctl, t0, start)
                self._save_state(self._stage_state(f"student-{m}", epoch + 1, ctl, history, opt,
                                                   student=net.state_dict(), teacher=teacher.state_dict(), done=done))
            self._stage_end(prog, task, label, f"student_{m}", ctl, len(history), len(val.names) if val else 0)
        ctl.finish(net)
        self.records["history"][f"student_{m}_loss"] = history
        if ctl.val_history:
            self.records["history"][f"student_{m}_val_loss"] = ctl.val_history
        return net.eval(), history

    def _student_epoch(self, m: str, epoch: int, net: StudentNet, opt: torch.optim.Optimizer, ctl: EpochControl,
                       cache: FeatureCache, targets: FeatureCache,
                       loss_fn: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor],
                       anomalous: list[FeatureCache]) -> float:
        """One epoch of the ``m`` student's optimiser steps; returns its mean training loss (nan without steps)."""
        cfg, mc = self.cfg, self.model_cfg
        n = len(cache.names)
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total = cfg.student_epochs * steps_per_epoch
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
            ctl.step()
            losses.append(loss.item())
        return float(np.mean(losses)) if losses else float("nan")

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
    def _progress(self) -> Progress:
        prog = progress_bar(self.console, field="info", elapsed=True)
        prog.disable = not self.show_progress
        return prog

    def run(self) -> Path:
        self.current = {"colour": "colour map", "memory": "memory map"}.get(self.stage, "data")
        try:
            return self._run()
        except (Exception, KeyboardInterrupt) as exc:
            self._say_what_is_saved(exc)
            raise

    def _say_what_is_saved(self, exc: BaseException) -> None:
        """Before the error: which stages of this run are saved and usable, and how to go on."""
        if not (self.saved or self.epochs_run or self.bundle_written):
            return  # nothing of this run on disk (a bad dataset, a bundle that does not load): the error says it
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        names = " and ".join([", ".join(self.saved[:-1])] * (len(self.saved) > 1) + self.saved[-1:])
        state = self._state_path().is_file()
        if self.bundle_written:
            try:
                with_memory = bool(json.loads((self.out / "bundle.json").read_text())["model"].get("memory_score"))
            except (OSError, ValueError, KeyError):
                with_memory = False
            maps = "the distillation and memory maps" if with_memory else "the distillation map alone"
            msg = f"{names} {'are' if len(self.saved) > 1 else 'is'} saved in {self.out} and usable, scoring with {maps}"
            retry = (f"re-run with --stage {self.current.split()[0]} to retry the {self.current}"
                     if self.current in ("colour map", "memory map") else "re-run with --resume to finish" if state else "")
        elif self.saved:
            msg = f"{names} {'are' if len(self.saved) > 1 else 'is'} trained and saved in {self.out}"
            retry = "re-run with --resume to continue without training them again" if state else ""
        else:
            msg = f"its progress up to the last finished epoch is in {self._state_path()}" if state else ""
            retry = "re-run with --resume to continue from there" if state else ""
        self.log(f"[yellow]the {self.current} stage {what}" + (f": {msg}" if msg else "")
                 + (f"; {retry}" if retry else "") + "[/]")

    def _run(self) -> Path:
        """The stages this run asks for, then the bundle, its score statistics and its memory and colour maps."""
        t_start = time.perf_counter()
        if self.stage in ("colour", "memory"):
            return self._refit_maps()
        # The memory and colour maps are fitted last, on the finished branches (their weights depend on their maps).
        self.model_cfg = replace(self.model_cfg, colour_score=False, memory_score=False)
        self._prepare_data()
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        if state is not None:
            self.records = state.get("records", self.records)
        spec = get_backbone(self.model_cfg.backbone)
        meta_path = self.out / "bundle.json"
        teacher, meta = self._teacher_and_meta(spec)
        self._encode_all()
        meta["data"] = self._data_meta()
        self._teacher_stage(teacher, state, meta)
        if self.stage == "teacher":
            self._merge_records(meta)
            atomic_write_json(meta_path, meta)
            self._state_path().unlink(missing_ok=True)
            return self.out
        self._student_stage(teacher, state, meta, spec)
        self._finish_bundle(meta, meta_path, t_start)
        return self.out

    def _refit_maps(self) -> Path:
        """--stage colour or memory: refit that map of the finished bundle (memory: then its colour map too)."""
        if self.stage == "colour":
            self._fit_colour()
            return self.out
        self._fit_memory()
        if load_bundle(self.out).model.colour_score:  # its weight is relative to the map it is added to
            self.current = "colour map"
            self._fit_colour()
        return self.out

    def _teacher_and_meta(self, spec: BackboneSpec) -> tuple[MultimodalTeacher, dict[str, Any]]:
        """The teacher and bundle.json to start from: the bundle's (--stage students) or new ones."""
        if self.stage == "students":
            existing = load_bundle(self.out, require_students=False)
            if set(self.model_cfg.modalities) - set(existing.model.modalities):
                raise BundleError(f"bundle {self.out} teacher was trained for {existing.model.modalities}")
            # retrained students keep their memory and colour maps
            self.want_colour = self.want_colour or existing.model.colour_score
            self.want_memory = self.want_memory or existing.model.memory_score
            new = self.model_cfg
            self.model_cfg = replace(existing.model, modalities=new.modalities,
                                     student_loss=new.student_loss, hard_mining=new.hard_mining,
                                     colour_score=False, colour_gain=new.colour_gain
                                     if new.colour_score else existing.model.colour_gain,
                                     memory_score=False, **{k: getattr(new if new.memory_score else existing.model, k)
                                                            for k in ("memory_scale", "memory_bank", "memory_gain")})
            teacher = existing.teacher.to(self.device)
            meta = existing.meta
            # The teacher keeps its stage-1 settings; the stage-2 ones are this run's.
            meta.setdefault("train", {}).update({k: v for k, v in to_dict(self.cfg).items() if k in STAGE2_KEYS})
            self.saved.append("the teacher")
        else:
            torch.manual_seed(self.cfg.seed)
            teacher = MultimodalTeacher(self.model_cfg, spec.channels)
            meta = new_meta(self.model_cfg, self.cfg, encoder_weights_sha(self.model_cfg.backbone, None), STUDENT_WIDTH)
        return teacher, meta

    def _teacher_stage(self, teacher: MultimodalTeacher, state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
        """Stage 1: train the teacher (unless done or off, or resumed past it) and save it into the bundle."""
        teacher_done = self.stage == "students" or (state is not None and state["stage"].startswith("student"))
        if not teacher_done:
            self.current = "teacher"
            if self.model_cfg.teacher_training:
                self.train_teacher(teacher, state)
            else:
                self.log("stage 1 skipped (teacher_training off): teacher = frozen encoder, plain reverse distillation")
        elif state is not None and "teacher" in state:
            teacher.load_state_dict(state["teacher"])
        teacher.to(self.device).eval()
        meta["model"] = to_dict(self.model_cfg)
        meta["files"][TEACHER_FILE] = save_state(self.out / TEACHER_FILE, teacher)
        if "the teacher" not in self.saved:
            self.saved.append("the teacher")

    def _student_stage(self, teacher: MultimodalTeacher, state: dict[str, Any] | None, meta: dict[str, Any],
                       spec: BackboneSpec) -> None:
        """Stage 2: train each modality's student (or take the interrupted run's finished ones) and save them."""
        done: dict[str, dict[str, torch.Tensor]] = dict(state.get("done", {})) if state else {}
        for m in self.model_cfg.modalities:
            self.current = f"{m.upper()} student"
            if m in done:
                net = StudentNet(spec.channels, STUDENT_WIDTH)
                net.load_state_dict(done[m])
            else:
                resume_state = state if state and state["stage"] == f"student-{m}" else None
                net, _hist = self.train_student(m, teacher, resume_state, done)
                done[m] = {k: v.cpu() for k, v in net.state_dict().items()}
            meta["files"][student_file(m)] = save_state(self.out / student_file(m), net.cpu())
            self.saved.append(f"the {m.upper()} student")

    def _finish_bundle(self, meta: dict[str, Any], meta_path: Path, t_start: float) -> None:
        """Write bundle.json with its score statistics, drop the state file, then fit the memory and colour maps."""
        self._merge_records(meta)
        meta["train_seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(meta_path, meta)
        self.bundle_written = True
        self.current = "score statistics"
        self._score_stats(meta)
        atomic_write_json(meta_path, meta)
        self._state_path().unlink(missing_ok=True)
        if self.want_memory:
            self.current = "memory map"
            self._fit_memory()
        if self.want_colour:
            self.current = "colour map"
            self._fit_colour(self.colour_skip)
        self.log(f"bundle written to {self.out} in {time.perf_counter() - t_start:.0f} s")

    def _merge_records(self, meta: dict[str, Any]) -> None:
        """Loss curves and where/why each stage stopped, into bundle.json (a --stage students run keeps the teacher's)."""
        meta.setdefault("history", {}).update(self.records["history"])
        meta.setdefault("stopping", {}).update(self.records["stopping"])

    def _fit_colour(self, skip: dict[str, str] | None = None) -> None:
        cfg = self.model_cfg
        fit_bundle_colour(self.out, self.data, cfg.colour_gain, self.log, cfg.colour_stride, cfg.colour_background,
                          cfg.colour_brownish, cfg.colour_vessel_cut, skip=skip)

    def _fit_memory(self) -> None:
        cfg = self.model_cfg
        fit_bundle_memory(self.out, self.data, self.log, cfg.memory_scale, cfg.memory_bank, cfg.memory_gain)

    def _data_meta(self) -> dict[str, Any]:
        info: dict[str, Any] = {"root": str(self.data), "synthetic": self.index.synthetic, "modalities": {}}
        src = self.data / "dataset.json"
        if src.is_file():
            try:
                info["dataset_json"] = {k: v for k, v in json.loads(src.read_text()).items() if k in DATASET_JSON_KEYS}
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
def student_val_loss(net: StudentNet, feats: FeatureCache, targets: FeatureCache,
                     loss_fn: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor], device: str,
                     batch: int = 32) -> float:
    """Mean student loss over cached (held-out) features against their teacher targets, BatchNorm in eval mode."""
    was_training = net.training
    net.eval()
    total, n = 0.0, len(feats.names)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        total += loss_fn(targets.batch(idx, device), net(feats.batch(idx, device))).item() * len(idx)
    net.train(was_training)
    return total / max(n, 1)


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


def _spread(px: np.ndarray) -> float:
    """A map's normal spread over these pixels: p99 − median (0 without pixels)."""
    return float(np.percentile(px, 99) - np.median(px)) if len(px) else 0.0


def _write_meta_and_stats(out: Path, meta: dict[str, Any], changed: bool, held_out: dict[str, list[Path]]) -> None:
    """Write bundle.json; when the scores ``changed``, again with the score statistics of the refitted bundle."""
    atomic_write_json(out / "bundle.json", meta)
    if changed:
        meta["score_stats"] = score_stats(load_bundle(out), held_out)
        atomic_write_json(out / "bundle.json", meta)


@torch.no_grad()
def fit_bundle_colour(out: Path, data: Path, gain: float, log: Callable[[str], None],
                      stride: int = ModelConfig.colour_stride,
                      background: float = ModelConfig.colour_background,
                      brownish: tuple[str, ...] = ModelConfig.colour_brownish,
                      vessel_cut: float = ModelConfig.colour_vessel_cut,
                      skip: dict[str, str] | None = None) -> dict[str, Any]:
    """Fit the colour outlier map (engine/model/colour.py) of every branch of bundle ``out`` on the normal
    training images of ``data``, computed at 1/``stride`` of the input size against a local colour
    background of σ ``background`` px (0: the frame's median), scoring only browner-than-normal
    deviations in the modalities of ``brownish`` (their background without the pixels more than
    ``vessel_cut`` normal standard deviations less brown than a first one), and switch it on; the
    weight puts the colour map's normal spread (p99 − median of its pixels on the held-out images)
    on the distillation map's.

    A modality whose map cannot apply — images without colour (``skip``: the reasons already found),
    no lit pixels, a flat map on the held-out images — is skipped with a line saying why: its branch
    scores with the distillation map alone (bundle.json ``colour_skipped``; with every modality
    skipped, ``model.colour_score`` is off)."""
    t0 = time.perf_counter()
    bundle = load_bundle(out)
    was_on = bundle.model.colour_score
    plain = replace(bundle.model, colour_score=False)
    index = ds.scan_dataset(data, require_train=True)
    fitted: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    held_out: dict[str, list[Path]] = {}  # the split training made: its held-out images get the score stats
    for m in bundle.modalities:
        fit_paths, held_out[m] = _bundle_split(index, data, m, bundle.train, f"fit the {m.upper()} colour map on")
        if skip and m in skip:
            stats, reason = None, skip[m]
        else:
            stats, reason = _fit_modality_colour(bundle, plain, m, fit_paths, held_out[m], stride, background,
                                                 brownish, vessel_cut)
        if stats is None:
            skipped[m] = reason
            log(f"[yellow]colour map skipped for {m.upper()}: {reason} — the branch scores with the distillation "
                f"map alone[/]")
            continue
        fitted[m] = stats
        log(f"{m.upper()} colour map: fitted on {stats['images']} images, weight {stats['weight']:.4g} "
            f"(× gain {gain:g})")
    path = out / COLOUR_FILE
    meta = json.loads((out / "bundle.json").read_text())
    _colour_meta(meta, path, data, bundle, fitted, skipped, gain, stride, background, brownish, vessel_cut)
    _write_meta_and_stats(out, meta, bool(fitted) or was_on, held_out)
    if fitted:
        log(f"colour maps written to {path} in {time.perf_counter() - t0:.0f} s; recalibrate: the scores changed")
    elif was_on:
        log(f"colour map removed from {out}; recalibrate: the scores changed")
    return fitted


def _fit_modality_colour(bundle: Bundle, plain: ModelConfig, m: str, fit_paths: list[Path], held_paths: list[Path],
                         stride: int, background: float, brownish: tuple[str, ...], vessel_cut: float
                         ) -> tuple[dict[str, Any] | None, str]:
    """Modality ``m``'s colour statistics and weight, or (None, why its colour map cannot apply)."""
    from engine.model.anomaly_map import FieldOfViewMask
    from engine.model.branch import StudentBranch
    from engine.model.colour import ColourOutlier, fit_colour

    size = bundle.model.input_size
    images = ds.load_images(fit_paths, size)
    reason = colourless_reason(images)
    if reason:
        return None, reason
    try:
        stats = fit_colour(images, bundle.model.colour_sigma, bundle.model.fov_threshold,
                           bundle.model.fov_window, seed=bundle.train.seed, stride=stride, background=background,
                           brownish=m in brownish, vessel_cut=vessel_cut)
    except ValueError as exc:  # no lit pixels at all
        return None, str(exc).split(":")[0]
    branch = StudentBranch(plain, bundle.encoder, bundle.teacher.adapters, bundle.students[m], m,
                           memory=bundle.memory.get(m)).eval()
    colour = ColourOutlier(bundle.model.colour_sigma, stats["mean"], stats["inv_cov"], 1.0, stride, background,
                           m in brownish, vessel_cut)
    lit = branch.fov if branch.fov is not None else FieldOfViewMask(bundle.model.fov_threshold,
                                                                     bundle.model.fov_window)
    held = ds.load_images(held_paths or fit_paths[:32], size)
    spread_d, spread_c = _colour_spreads(branch, colour, lit, held)
    if not spread_c > 0:
        return None, "its colour map is flat on the held-out images (no colour variation to weight)"
    stats.update(weight=spread_d / spread_c, spread_distillation=spread_d, spread_colour=spread_c,
                 held_out_images=len(held))
    return stats, ""


def _colour_spreads(branch: torch.nn.Module, colour: torch.nn.Module, lit: Callable[[torch.Tensor], torch.Tensor],
                    held: np.ndarray) -> tuple[float, float]:
    """The normal spreads of the distillation and colour maps inside the lit field on the ``held`` images."""
    d_px, c_px = [], []
    for i in range(0, len(held), 16):
        x = torch.from_numpy(held[i:i + 16]).permute(0, 3, 1, 2).float().div_(255)
        fov = lit(x)
        inside = fov > 0
        d_px.append(branch(x)[0][inside].numpy())
        c_px.append(colour(x, fov)[inside].numpy())
    d_all, c_all = np.concatenate(d_px), np.concatenate(c_px)
    return _spread(d_all), _spread(c_all)


def _colour_meta(meta: dict[str, Any], path: Path, data: Path, bundle: Bundle, fitted: dict[str, Any],
                 skipped: dict[str, str], gain: float, stride: int, background: float, brownish: tuple[str, ...],
                 vessel_cut: float) -> None:
    """Write colour.json with the fitted maps (or remove it when none) and record them in ``meta``."""
    meta.pop("colour_skipped", None)
    if fitted:
        atomic_write_json(path, {"format": "cemd-colour/1", "data": str(data), "modalities": fitted})
        meta["files"][COLOUR_FILE] = file_sha256(path)
        meta["model"]["colour_score"] = True
        meta["model"]["colour_gain"] = gain
        meta["model"]["colour_sigma"] = bundle.model.colour_sigma
        meta["model"]["colour_stride"] = stride
        meta["model"]["colour_background"] = background
        meta["model"]["colour_brownish"] = [m for m in brownish if m in bundle.modalities]
        meta["model"]["colour_vessel_cut"] = float(vessel_cut)
        if skipped:  # engine/deploy/bundle.py: these branches score without colour although model.colour_score is on
            meta["colour_skipped"] = skipped
    else:  # nothing to fit: the bundle scores with the distillation maps alone, as without --colour-score
        path.unlink(missing_ok=True)
        meta["files"].pop(COLOUR_FILE, None)
        meta["model"]["colour_score"] = False
        meta["colour_skipped"] = skipped


@torch.no_grad()
def fit_bundle_memory(out: Path, data: Path, log: Callable[[str], None], scale: int = ModelConfig.memory_scale,
                      bank_size: int = ModelConfig.memory_bank, gain: float = ModelConfig.memory_gain) -> dict[str, Any]:
    """Fill the memory map (engine/model/memory.py) of every branch of bundle ``out`` from the normal
    training images of ``data`` (the images training fitted on, not its held-out ones): the 3×3-
    averaged encoder patches at ``scale``, ``bank_size`` of them drawn at random (seeded), kept in
    float16. Its weight puts the memory map's normal spread (p99 − median inside the field of view
    on the held-out images) on the distillation map's; ``gain`` multiplies it. A modality whose map
    is flat there is skipped with a line saying why (it scores with the distillation map alone);
    with every modality skipped, ``model.memory_score`` is off."""
    t0 = time.perf_counter()
    bundle = load_bundle(out, with_memory=False)
    plain = replace(bundle.model, colour_score=False, memory_score=False)
    index = ds.scan_dataset(data, require_train=True)
    fitted: dict[str, Any] = {}
    info: dict[str, Any] = {}
    held_out: dict[str, list[Path]] = {}
    for m in bundle.modalities:
        fit_paths, held_out[m] = _bundle_split(index, data, m, bundle.train, f"fill the {m.upper()} memory map from")
        bank, n_patches, spread_d, spread_k, n_held = _fill_modality_memory(bundle, plain, m, fit_paths, held_out[m],
                                                                            scale, bank_size)
        if not (spread_k > 0 and spread_d > 0):
            log(f"[yellow]memory map skipped: the {m.upper()} {'memory' if spread_d > 0 else 'distillation'} map is "
                f"flat on the held-out images (nothing to weight it by) — every branch scores with the "
                f"distillation map alone[/]")
            break
        fitted[m] = {"bank": bank, "weight": spread_d / spread_k}
        info[m] = {"patches": int(n_patches), "bank": int(len(bank)), "images": len(fit_paths),
                   "weight": spread_d / spread_k, "spread_distillation": spread_d, "spread_memory": spread_k,
                   "held_out_images": n_held}
        log(f"{m.upper()} memory map: {len(bank)} of {n_patches} normal patches from {len(fit_paths)} images, "
            f"weight {spread_d / spread_k:.4g} (× gain {gain:g})")
    path = out / MEMORY_FILE
    meta = json.loads((out / "bundle.json").read_text())
    was_on = bool(meta.get("model", {}).get("memory_score"))
    _memory_meta(meta, path, data, set(fitted) == set(bundle.modalities), fitted, info, scale, bank_size, gain)
    _write_meta_and_stats(out, meta, bool(fitted) or was_on, held_out)
    if meta["model"]["memory_score"]:
        log(f"memory maps written to {path} in {time.perf_counter() - t0:.0f} s; recalibrate: the scores changed")
    elif was_on:
        log(f"memory map removed from {out}; recalibrate: the scores changed")
    return info if meta["model"]["memory_score"] else {}


def _fill_modality_memory(bundle: Bundle, plain: ModelConfig, m: str, fit_paths: list[Path], held_paths: list[Path],
                          scale: int, bank_size: int) -> tuple[torch.Tensor, int, float, float, int]:
    """Modality ``m``'s memory bank, with (bank, patches drawn from, distillation and memory spreads, held-out images)."""
    from engine.model.anomaly_map import FieldOfViewMask
    from engine.model.branch import StudentBranch
    from engine.model.memory import MemoryMap, collect_patches, subsample

    size = bundle.model.input_size
    patches = collect_patches(lambda x: bundle.encoder(x)[scale], ds.load_images(fit_paths, size))
    bank = subsample(patches, bank_size, bundle.train.seed).half()
    branch = StudentBranch(plain, bundle.encoder, bundle.teacher.adapters, bundle.students[m], m).eval()
    memory = MemoryMap(bank, 1.0)
    lit = FieldOfViewMask(bundle.model.fov_threshold, bundle.model.fov_window)
    held = ds.load_images(held_paths or fit_paths[:32], size)
    d_px, k_px = [], []
    for i in range(0, len(held), 16):
        x = torch.from_numpy(held[i:i + 16]).permute(0, 3, 1, 2).float().div_(255)
        inside = lit(x) > 0
        d_px.append(branch(x)[0][inside].numpy())
        k_px.append(branch.smooth(memory(bundle.encoder(x)[scale]))[inside].numpy())
    d_all, k_all = np.concatenate(d_px), np.concatenate(k_px)
    return bank, len(patches), _spread(d_all), _spread(k_all), len(held)


def _memory_meta(meta: dict[str, Any], path: Path, data: Path, complete: bool, fitted: dict[str, Any],
                 info: dict[str, Any], scale: int, bank_size: int, gain: float) -> None:
    """Write memory.pt when every branch has its map (``complete``), else remove it; record it in ``meta``."""
    if complete:
        buf = io.BytesIO()
        torch.save({"format": "cemd-memory/1", "modalities": fitted}, buf)
        atomic_write_bytes(path, buf.getvalue())
        meta["files"][MEMORY_FILE] = file_sha256(path)
        meta["memory"] = {"data": str(data), "modalities": info}
        meta["model"].update(memory_score=True, memory_scale=scale, memory_bank=bank_size, memory_gain=gain)
    else:  # a branch without its map would score on another scale than its siblings: all or none
        path.unlink(missing_ok=True)
        meta["files"].pop(MEMORY_FILE, None)
        meta.pop("memory", None)
        meta["model"]["memory_score"] = False


def validation_images(data: Path, seed: int, val_fraction: float) -> dict[str, list[Path]]:
    """The held-out normal training images of a dataset, split as training split it."""
    index = ds.scan_dataset(data, require_train=True)
    split = TrainConfig(seed=seed, val_fraction=val_fraction)
    return {m: _bundle_split(index, data, m, split)[1] for m in index.modalities}
