"""Compiled student branches: TensorRT, AOTInductor or eager, behind one call, with a parity gate.

    scorer = load_scorer(bundle, "wli", backend="auto", device="cpu")
    amap, score = scorer(frames)            # frames: B×3×S×S float in [0, 1], B = scorer.batch

One `torch.export` graph per branch (static shape: batch × 3 × S × S) feeds the compilers:

- ``tensorrt``: torch-tensorrt, dynamo IR, FP16 by default; the engine is saved as an
  ExportedProgram and reloaded without recompiling. CUDA only; the optional ``tensorrt`` extra.
- ``aoti``: an AOTInductor package (``.pt2``, weights frozen into the code) for CPU, or CUDA.
- ``cuda-graph``: the eager CUDA branch (FP16 by default) captured once in a CUDA graph on a
  static input buffer and replayed per call: one launch instead of hundreds. Nothing is stored.
- ``eager``: the plain module, channels_last, FP16 on CUDA.
- ``onnxruntime`` / ``openvino``: one FP32 ONNX graph per branch (`engine.deploy.onnx_runtimes`).

Compiled artifacts live in BUNDLE/compiled/ (or ``cache_dir``), each beside a JSON key: the
backend, device, precision, shape, torch version, model hash (every weights file's sha256 and
the model config), the artifact's own sha256 and, on CUDA, the GPU name, compute capability,
SM count and TensorRT version. An artifact whose key differs, whose bytes changed, or that
fails to load is rebuilt, never trusted. Before a compiled branch is used it is compared with
eager PyTorch on probe frames (`check_parity`); one that disagrees is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.deploy.bundle import Bundle, atomic_write_json
from engine.deploy.onnx_runtimes import (
    ONNX_RUNTIMES,
    OPSET,
    RuntimeMissing,
    build_onnx,
    load_runtime,
    onnx_version,
    runtime_version,
)
from engine.errors import CemdError
from engine.model.backbone import file_sha256
from engine.model.config import to_dict

BACKENDS = ("tensorrt", "cuda-graph", "aoti", "onnxruntime", "openvino", "eager")
# What `auto` tries on CUDA, in order (onnxruntime after tensorrt where its TensorRT provider is
# installed: `cuda_order`); on the CPU it measures these and keeps the fastest that passes parity
# (AOTInductor only when its package is built already: it takes a minute per branch to build).
AUTO_ORDER = ("tensorrt", "cuda-graph", "aoti", "eager")
AUTO_CPU = ("onnxruntime", "openvino", "aoti", "eager")
TIMED_ROUNDS = 4  # auto on the CPU: 4 interleaved blocks of 5 timed calls per candidate (`_timings`)
ONNX_KEY = {"opset": OPSET, "torch": torch.__version__.split("+")[0]}
SHIPPED = "exported"  # BUNDLE/exported/: ONNX graphs a bundle ships (tracked with it; `cemd export --ship`)
# Bumped when the code inside a compiled branch changes, so older packages are rebuilt, not reused
# (2: the field-of-view mask as convolutions; 3: its window sums as running sums, the
# distillation map's upsampling and blur as matrix products).
ARTIFACT_FORMAT = "cemd-compiled/3"
# Parity tolerances: max |compiled − eager| over the anomaly map (map values are ~0.05–1.5).
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


class BackendUnavailable(CemdError):
    """This backend cannot run here (missing library, no GPU, no compiler); the reason says which."""


class ParityError(CemdError):
    """A compiled branch disagrees with eager PyTorch beyond tolerance."""


Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- keys and hashes


def model_hash(bundle: Bundle, modality: str) -> str:
    """Changes whenever anything that the branch computes could change."""
    h = hashlib.sha256()
    h.update(json.dumps(to_dict(bundle.model), sort_keys=True).encode())
    h.update(json.dumps(bundle.meta.get("files", {}), sort_keys=True).encode())
    h.update(json.dumps(bundle.meta.get("encoder", {}), sort_keys=True).encode())
    h.update(modality.encode())
    return h.hexdigest()


def device_info(device: str) -> dict[str, Any]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                "sm_count": props.multi_processor_count}
    return {"cpu": True}


def artifact_key(bundle: Bundle, modality: str, backend: str, device: str, precision: str, batch: int,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": ARTIFACT_FORMAT, "backend": backend, "modality": modality, "device": device,
            "precision": precision, "shape": [batch, 3, bundle.model.input_size, bundle.model.input_size],
            "torch": torch.__version__, "model_hash": model_hash(bundle, modality), **device_info(device),
            **(extra or {})}


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _artifact_suffix(backend: str) -> str:
    return {"aoti": ".pt2", "onnx": ".onnx"}.get(backend, ".ep")


def sidecar_of(artifact: Path) -> Path:
    """The JSON key stored beside a compiled artifact."""
    return artifact.with_suffix(".json")


def artifact_paths(cache_dir: Path, key: dict[str, Any]) -> tuple[Path, Path]:
    stem = f"{key['modality']}-{key['backend']}-{key['device']}-{key['precision']}-b{key['shape'][0]}-{_key_digest(key)}"
    artifact = cache_dir / f"{stem}{_artifact_suffix(key['backend'])}"
    return artifact, sidecar_of(artifact)


def artifact_location(bundle: Bundle, modality: str, backend: str, device: str, precision: str, batch: int,
                      cache_dir: Path | None = None, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path, Path]:
    """(key, artifact, sidecar) of one branch's compiled artifact; default folder ``BUNDLE/compiled``."""
    key = artifact_key(bundle, modality, backend, device, precision, batch, extra)
    return (key, *artifact_paths(Path(cache_dir) if cache_dir else bundle.path / "compiled", key))


def stale_reason(artifact: Path, sidecar: Path, key: dict[str, Any]) -> str | None:
    """None when the artifact can be trusted; otherwise why it must be rebuilt."""
    if not artifact.is_file():
        return "no compiled artifact yet"
    if not sidecar.is_file():
        return f"{sidecar.name} is missing"
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{sidecar.name} is unreadable ({exc})"
    diff = sorted(k for k in set(key) | set(stored.get("key", {})) if stored.get("key", {}).get(k) != key.get(k))
    if diff:
        return f"built for another {', '.join(diff)}"
    if stored.get("sha256") != file_sha256(artifact):
        return f"{artifact.name} changed on disk since it was built (sha256 mismatch)"
    return None


def prune_superseded(folder: Path, key: dict[str, Any], keep: Path) -> list[Path]:
    """Remove the artifacts in a bundle's own ``compiled/`` folder that ``key``'s build replaces.

    Superseded: the same branch, backend, device, precision, shape and torch (and TensorRT)
    version, but another compiled format or other weights — this bundle's code and weights
    can never load those again. Packages for another torch version or GPU are kept (another
    environment may share the bundle), as is anything without a readable sidecar.
    """
    removed = []
    versioned = ("format", "model_hash")
    for side in sorted(folder.glob("*.json")):
        if side == keep:
            continue
        try:
            stored = json.loads(side.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(stored, dict) or stored == key:
            continue
        if any(stored.get(k) != v for k, v in key.items() if k not in versioned):
            continue
        if set(stored) - set(key):
            continue
        artifact = side.with_suffix(_artifact_suffix(key["backend"]))
        artifact.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        removed.append(artifact)
    return removed


# --------------------------------------------------------------------------- the modules


class HalfBranch(nn.Module):
    """FP16 wrapper: frames in FP32 [0, 1], computation in FP16, outputs back in FP32."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.inner = branch.half()

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score = self.inner(frames.half())
        return amap.float(), score.float()


def eager_module(bundle: Bundle, modality: str, device: str, precision: str) -> nn.Module:
    # A private copy: bundle.branch() shares the encoder and teacher with every other branch,
    # and .half() / .to(device) below must not convert the reference or another backend's module.
    branch: nn.Module = copy.deepcopy(bundle.branch(modality)).to(device).eval()
    branch = branch.to(memory_format=torch.channels_last)
    if precision == "fp16":
        if device != "cuda":
            raise BackendUnavailable("fp16 needs CUDA; on the CPU use --precision fp32")
        branch = HalfBranch(branch).eval()
    return branch


def example_input(bundle: Bundle, batch: int, device: str) -> torch.Tensor:
    s = bundle.model.input_size
    return torch.rand(batch, 3, s, s, device=device)


def export_branch(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, (example,), strict=False)


def _import_torch_tensorrt() -> Any:
    try:
        import torch_tensorrt  # noqa: PLC0415
    except Exception as exc:  # it raises a plain Exception (not ImportError) when TensorRT libraries are missing
        raise BackendUnavailable(
            f"torch_tensorrt cannot be imported ({_first_line(exc)}); "
            "on an NVIDIA machine install the extra: pip install -e '.[tensorrt]'"
        ) from exc
    return torch_tensorrt


def tensorrt_version() -> str:
    trt = _import_torch_tensorrt()
    try:
        import tensorrt  # noqa: PLC0415

        return f"{trt.__version__}/{tensorrt.__version__}"
    except Exception:
        return str(trt.__version__)


def build_tensorrt(ep: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
    """torch_tensorrt.dynamo.compile + torch_tensorrt.save (ExportedProgram format).

    Precision comes from the exported graph's dtypes (FP16 = a HalfBranch export), which is what
    torch-tensorrt's explicit typing (the default since 2.x) respects.
    """
    trt = _import_torch_tensorrt()
    trt_gm = trt.dynamo.compile(ep, arg_inputs=[example])
    trt.save(trt_gm, str(path), arg_inputs=[example])


def load_tensorrt(path: Path) -> Callable[[torch.Tensor], Any]:
    _import_torch_tensorrt()  # registers the TensorRT runtime ops the saved program calls
    return torch.export.load(str(path)).module()


def build_aoti(ep: torch.export.ExportedProgram, path: Path) -> None:
    # freezing: weights become constants, so conv+BN fold and CPU kernels use prepacked weights
    # (measured ~2× faster than eager on the 2-core CPU; without it ~1.4×).
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs={"freezing": True})


def load_aoti(path: Path) -> Callable[[torch.Tensor], Any]:
    return torch._inductor.aoti_load_package(str(path))


_PROBE_LOAD = """
import sys, torch
fn = torch._inductor.aoti_load_package(sys.argv[1])
shape = [int(v) for v in sys.argv[3].split(",")]
fn(torch.rand(*shape, device=sys.argv[2]))
"""


def probe_load(path: Path, device: str, shape: list[int], timeout: float = 300) -> str | None:
    """Load and run a package once in a child process; None if that worked, else why not.

    A package that crashes on load (seen: CUDA AOTInductor packages segfaulting in
    aoti_load_package with torch 2.11+cu130 on an H200) would take the whole monitor down;
    in a child process it only costs a fallback.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_LOAD, str(path), device, ",".join(map(str, shape))],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"loading it took over {timeout:.0f} s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"loading it crashed the process (signal {-proc.returncode})"
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["no message"]
    return f"loading it failed: {tail[0][:200]}"


def check_compiler() -> None:
    """AOTInductor compiles with ``$CXX`` or g++ (its default); without importing Inductor (2 s)."""
    candidates = [c for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c]
    if not any(shutil.which(c) for c in candidates):
        raise BackendUnavailable("AOTInductor needs a C++ compiler and none was found (install g++ or set CXX)")


# --------------------------------------------------------------------------- parity


def probe_frames(size: int, n: int, seed: int = 7, modality: str = "wli") -> torch.Tensor:
    """Synthetic frames with and without lesions, so scores spread (for the ranking check)."""
    from engine.synth.stills import LESION_KINDS, item_seed, render_pair  # noqa: PLC0415

    kinds = [None, *LESION_KINDS]
    imgs = [render_pair(item_seed(seed, "test", kinds[i % len(kinds)], i), size, kinds[i % len(kinds)]).image(modality)
            for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255)


@torch.no_grad()
def run_batched(fn: Callable[[torch.Tensor], Any], frames: torch.Tensor, batch: int, device: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    maps, scores = [], []
    n = len(frames)
    for i in range(0, n, batch):
        x = frames[i : i + batch]
        pad = batch - len(x)
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        amap, score = fn(x.to(device).contiguous())
        maps.append(amap[: batch - pad].float().cpu())
        scores.append(score[: batch - pad].float().cpu())
    return torch.cat(maps), torch.cat(scores)


def check_parity(reference: Callable[[torch.Tensor], Any] | tuple[torch.Tensor, torch.Tensor],
                 candidate: Callable[[torch.Tensor], Any], frames: torch.Tensor, batch: int, device: str,
                 precision: str) -> dict[str, Any]:
    """Max abs map error within TOLERANCE[precision]; in FP32 also the same image-score ranking.
    ``reference``: the eager module, or its (maps, scores) on ``frames`` computed already."""
    ref_map, ref_score = reference if isinstance(reference, tuple) else run_batched(reference, frames, batch, device)
    map_, score = run_batched(candidate, frames, batch, device)
    err = float((ref_map - map_).abs().max())
    same_rank = bool(torch.equal(torch.argsort(ref_score, stable=True), torch.argsort(score, stable=True)))
    ok = err <= TOLERANCE[precision] and (same_rank or precision != "fp32")
    return {"max_abs_map_error": err, "max_abs_score_error": float((ref_score - score).abs().max()),
            "tolerance": TOLERANCE[precision], "same_ranking": same_rank, "frames": len(frames), "ok": ok}


class Probe:
    """One branch's probe frames and eager FP32 PyTorch's outputs on them, made on first use and
    shared by every candidate's parity check (and timing), instead of once per candidate."""

    def __init__(self, bundle: Bundle, modality: str, n: int) -> None:
        self.bundle, self.modality, self.n = bundle, modality, max(n, 2)
        self._frames: torch.Tensor | None = None
        self._reference: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def frames(self) -> torch.Tensor:
        if self._frames is None:
            self._frames = probe_frames(self.bundle.model.input_size, self.n, modality=self.modality)
        return self._frames

    def reference(self, device: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, batch) not in self._reference:
            module = eager_module(self.bundle, self.modality, device, "fp32")
            self._reference[device, batch] = run_batched(module, self.frames, batch, device)
        return self._reference[device, batch]

    def check(self, name: str, fn: Callable[[torch.Tensor], Any], batch: int, device: str, precision: str
              ) -> dict[str, Any]:
        """`check_parity` against the shared reference; a disagreement raises ParityError."""
        parity = check_parity(self.reference(device, batch), fn, self.frames, batch, device, precision)
        if not parity["ok"]:
            raise ParityError(
                f"{name} {self.modality.upper()} branch disagrees with eager PyTorch: max map error "
                f"{parity['max_abs_map_error']:.2e} (tolerance {parity['tolerance']:.0e}), same ranking: "
                f"{parity['same_ranking']}; refused"
            )
        return parity


# --------------------------------------------------------------------------- the scorer


@dataclass
class Scorer:
    modality: str
    backend: str
    device: str
    precision: str
    batch: int
    input_size: int
    fn: Callable[[torch.Tensor], Any] = field(repr=False)
    artifact: Path | None = None
    compile_seconds: float | None = None
    parity: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # better backends and why they were not used
    timings_ms: dict[str, float] | None = None  # auto on the CPU: p50 of each candidate, measured here

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(frames.shape) != (self.batch, 3, self.input_size, self.input_size):
            raise CemdError(f"the {self.backend} {self.modality.upper()} branch takes "
                            f"{self.batch}×3×{self.input_size}×{self.input_size} frames, got {tuple(frames.shape)}")
        if self.backend in ONNX_RUNTIMES:  # they copy to numpy themselves: no torch op to wake its threads
            return self.fn(frames)
        # contiguous: a compiled graph assumes the memory layout of its export example
        return self.fn(frames.to(self.device).contiguous())


def _update_sidecar(artifact: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``update`` to the artifact's sidecar JSON and write it back (nothing if it is unreadable)."""
    sidecar = sidecar_of(artifact)
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return
    update(data)
    atomic_write_json(sidecar, data)


def record_parity(artifact: Path, backend: str, device: str, parity: dict[str, Any]) -> None:
    """Keep the parity check's result in the artifact's sidecar (per runtime and device: one ONNX
    graph serves several)."""
    checked = {**parity, "checked": time.strftime("%Y-%m-%d %H:%M:%S")}
    _update_sidecar(artifact, lambda data: data.setdefault("parity", {}).__setitem__(f"{backend}/{device}", checked))


def default_precision(backend: str, device: str) -> str:
    return "fp16" if device == "cuda" and backend in ("tensorrt", "cuda-graph", "eager") else "fp32"


def capture_cuda_graph(module: nn.Module, example: torch.Tensor, warmup: int = 3
                       ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``module`` captured once in a CUDA graph: each call copies the frames into the static input
    buffer, replays the graph and returns copies of the static outputs (the next replay overwrites
    them). Warm-up runs on the capture stream itself, so libraries create their handles before
    the capture, not inside it."""
    static_in = torch.zeros_like(example)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):
            module(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
        static_map, static_score = module(static_in)

    def run(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        static_in.copy_(frames)
        graph.replay()
        return static_map.clone(), static_score.clone()

    run.graph = graph  # type: ignore[attr-defined]  # kept alive with the callable
    return run


def _cuda_graph_branch(bundle: Bundle, modality: str, device: str, precision: str, batch: int, log: Log
                       ) -> tuple[Callable[[torch.Tensor], Any], None, float]:
    if device != "cuda":
        raise BackendUnavailable("a CUDA graph needs an NVIDIA GPU (--device cuda)")
    t0 = time.perf_counter()
    try:
        fn = capture_cuda_graph(eager_module(bundle, modality, device, precision), example_input(bundle, batch, device))
    except BackendUnavailable:
        raise
    except Exception as exc:  # an operation that cannot be captured (a host sync, say): fall back, say why
        raise BackendUnavailable(f"CUDA graph capture failed: {_first_line(exc)}") from exc
    seconds = time.perf_counter() - t0
    log(f"{modality.upper()} cuda-graph: captured in {seconds:.2f} s")
    return fn, None, seconds


def cuda_order() -> list[str]:
    """`auto` on CUDA: tensorrt → (onnxruntime, where its TensorRT provider is installed) → cuda-graph → aoti → eager."""
    order = list(AUTO_ORDER)
    try:
        import onnxruntime  # noqa: PLC0415

        if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
            order.insert(1, "onnxruntime")
    except ImportError:
        pass
    return order


def compile_branch(bundle: Bundle, modality: str, backend: str, device: str = "cpu", precision: str | None = None,
                   batch: int = 1, cache_dir: Path | None = None, rebuild: bool = False, log: Log = _quiet,
                   build: bool = True) -> tuple[Callable[[torch.Tensor], Any], Path | None, float | None]:
    """Load the cached artifact for this key, or build it; returns (callable, artifact path, compile seconds).

    ``build=False`` never compiles: a missing or stale artifact makes the backend unavailable
    (for quick starts that must not spend a minute compiling).
    """
    precision = precision or default_precision(backend, device)
    if precision not in TOLERANCE:
        raise CemdError(f"precision must be fp16 or fp32, not {precision!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is available")
    if backend == "eager":
        return eager_module(bundle, modality, device, precision), None, None
    if backend == "cuda-graph":
        return _cuda_graph_branch(bundle, modality, device, precision, batch, log)
    if backend in ONNX_RUNTIMES:
        return _onnx_branch(bundle, modality, backend, device, precision, batch, cache_dir, rebuild, log, build)
    extra = _backend_key_extra(backend, device)
    key, artifact, sidecar = artifact_location(bundle, modality, backend, device, precision, batch, cache_dir, extra)
    reason = "--rebuild" if rebuild else stale_reason(artifact, sidecar, key)
    if reason is None:
        try:
            fn = _load_artifact(artifact, backend, device, key["shape"])
            log(f"{modality.upper()} {backend}: loaded {artifact}")
            return fn, artifact, None
        except BackendUnavailable:
            raise
        except Exception as exc:  # a corrupt or incompatible artifact: rebuild, never trust it
            reason = f"it failed to load ({_first_line(exc)})"
    if not build:
        raise BackendUnavailable(f"no usable compiled artifact ({reason}); build it once with: "
                                 f"cemd export --bundle {bundle.path} --backend {backend} --device {device}")
    seconds = _build_logged(bundle, modality, backend, device, precision, batch, key, artifact, sidecar, reason, log)
    return _load_artifact(artifact, backend, device, key["shape"]), artifact, seconds


def _build_logged(bundle: Bundle, modality: str, backend: str, device: str, precision: str, batch: int,
                  key: dict[str, Any], artifact: Path, sidecar: Path, reason: str, log: Log) -> float:
    """`_build_artifact` with its log lines (why, how long), then the packages it supersedes in the
    bundle's own compiled/ folder removed; returns the seconds."""
    what = ("exporting", "exported", "; about 10 s, once") if backend == "onnx" else ("building", "built", "")
    log(f"{modality.upper()} {backend}: {what[0]} {artifact.name} ({reason}{what[2]})")
    seconds = _build_artifact(bundle, modality, backend, device, precision, batch, key, artifact, sidecar)
    log(f"{modality.upper()} {backend}: {what[1]} in {seconds:.0f} s")
    if artifact.parent == bundle.path / "compiled":  # never in a cache folder other bundles may share
        removed = prune_superseded(artifact.parent, key, sidecar)
        if removed:
            log(f"{modality.upper()} {backend}: removed {len(removed)} superseded package(s) of earlier weights "
                f"or an earlier format: {', '.join(p.name for p in removed)}")
    return seconds


def _backend_key_extra(backend: str, device: str) -> dict[str, Any]:
    """Check a compiling backend can run here; returns what its artifact key adds (TensorRT's version)."""
    if backend == "tensorrt":
        if device != "cuda":
            raise BackendUnavailable("TensorRT needs an NVIDIA GPU (--device cuda)")
        return {"tensorrt": tensorrt_version()}
    if backend == "aoti":
        check_compiler()
        return {}
    raise CemdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or auto")


def _build_artifact(bundle: Bundle, modality: str, backend: str, device: str, precision: str, batch: int,
                    key: dict[str, Any], artifact: Path, sidecar: Path) -> float:
    """Export and compile the branch into ``artifact`` (atomically) with its ``sidecar`` key; returns the seconds."""
    t0 = time.perf_counter()
    module = eager_module(bundle, modality, device, precision)
    example = example_input(bundle, batch, device)
    ep = export_branch(module, example)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    tmp = artifact.with_name(f".tmp-{os.getpid()}-{artifact.name}")  # keeps the suffix AOTInductor insists on
    tmp.unlink(missing_ok=True)
    try:
        if backend == "aoti":
            build_aoti(ep, tmp)
        elif backend == "onnx":
            build_onnx(ep, example, tmp)
        else:
            build_tensorrt(ep, example, tmp)
    except BackendUnavailable:
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise BackendUnavailable(f"{backend} compilation failed: {_first_line(exc)}") from exc
    os.replace(tmp, artifact)
    seconds = time.perf_counter() - t0
    atomic_write_json(sidecar, {"key": key, "sha256": file_sha256(artifact), "compile_seconds": round(seconds, 1),
                                "built": time.strftime("%Y-%m-%d %H:%M:%S")})
    return seconds


def onnx_key(bundle: Bundle, modality: str, batch: int = 1, cache_dir: Path | None = None
             ) -> tuple[dict[str, Any], Path, Path]:
    """(key, graph, sidecar) of a branch's ONNX graph. The key names the opset and the exporter's
    release (torch 2.13.0, the same graph from a CPU or a CUDA build), not the onnx package: any
    runtime reads a graph of a known opset."""
    return artifact_location(bundle, modality, "onnx", "cpu", "fp32", batch, cache_dir, ONNX_KEY)


def onnx_graph(bundle: Bundle, modality: str, batch: int = 1, cache_dir: Path | None = None, rebuild: bool = False,
               log: Log = _quiet, build: bool = True) -> tuple[Path, float | None]:
    """The branch's FP32 ONNX graph (one per branch and batch, device-independent), exported once
    and cached with its sidecar key like any artifact — or copied from the graphs the bundle ships
    in BUNDLE/exported/ when their key matches; returns (path, export seconds or None)."""
    key, artifact, sidecar = onnx_key(bundle, modality, batch, cache_dir)
    reason = "--rebuild" if rebuild else stale_reason(artifact, sidecar, key)
    if reason is None:
        return artifact, None
    if not rebuild and _copy_shipped(bundle, key, artifact):
        log(f"{modality.upper()} onnx: using the graph the bundle ships ({SHIPPED}/{artifact.name})")
        return artifact, None
    if not build:
        raise BackendUnavailable(f"no ONNX graph of the {modality.upper()} branch ({reason}); export it once with: "
                                 f"cemd export --bundle {bundle.path} --backend onnx")
    try:
        onnx_version()
    except RuntimeMissing as exc:
        raise BackendUnavailable(str(exc)) from None
    return artifact, _build_logged(bundle, modality, "onnx", "cpu", "fp32", batch, key, artifact, sidecar, reason, log)


def _copy_shipped(bundle: Bundle, key: dict[str, Any], artifact: Path) -> bool:
    """Copy the bundle's shipped graph for ``key`` (BUNDLE/exported/, tracked with the bundle and
    never written at run time) into the cache, where the parity records go; False if there is none."""
    src = bundle.path / SHIPPED / artifact.name
    if src.parent == artifact.parent or stale_reason(src, sidecar_of(src), key) is not None:
        return False
    _copy_atomic(src, artifact)
    _copy_atomic(sidecar_of(src), sidecar_of(artifact))  # the sidecar last: it makes the pair valid
    return True


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy to a temporary name beside ``dst``, then rename: a reader never sees half a file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def ship_onnx(bundle: Bundle, modality: str, batch: int = 1, log: Log = _quiet) -> Path:
    """Put the branch's graph (exported if needed) in BUNDLE/exported/ with a clean sidecar (no
    machine's parity records), replacing graphs of earlier weights there; returns its path."""
    graph, _ = onnx_graph(bundle, modality, batch, log=log)
    key, target, target_sidecar = onnx_key(bundle, modality, batch, bundle.path / SHIPPED)
    stored = json.loads(sidecar_of(graph).read_text())
    _copy_atomic(graph, target)
    atomic_write_json(target_sidecar, {k: stored[k] for k in ("key", "sha256", "compile_seconds", "built") if k in stored})
    removed = prune_superseded(target.parent, key, target_sidecar)
    if removed:
        log(f"{modality.upper()} onnx: removed {', '.join(p.name for p in removed)} (earlier weights) from {SHIPPED}/")
    return target


def _onnx_branch(bundle: Bundle, modality: str, runtime: str, device: str, precision: str, batch: int,
                 cache_dir: Path | None, rebuild: bool, log: Log, build: bool
                 ) -> tuple[Callable[[torch.Tensor], Any], Path | None, float | None]:
    """The ONNX graph (exported if needed) loaded in ONNX Runtime or OpenVINO."""
    if precision != "fp32":
        raise BackendUnavailable(f"{runtime} runs the FP32 ONNX graph; use --precision fp32")
    try:
        runtime_version(runtime)
    except RuntimeMissing as exc:
        raise BackendUnavailable(str(exc)) from None
    graph, seconds = onnx_graph(bundle, modality, batch, cache_dir, rebuild, log, build)
    try:
        fn = load_runtime(runtime, graph, device)
    except RuntimeMissing as exc:
        raise BackendUnavailable(str(exc)) from None
    except Exception as exc:  # a corrupt graph: export it again, never trust it
        if not build:
            raise BackendUnavailable(f"{runtime} could not load {graph.name} ({_first_line(exc)})") from exc
        log(f"{modality.upper()} {runtime}: {graph.name} failed to load ({_first_line(exc)}); exporting it again")
        graph, seconds = onnx_graph(bundle, modality, batch, cache_dir, True, log, build)
        fn = load_runtime(runtime, graph, device)
    log(f"{modality.upper()} {runtime}: loaded {graph} ({torch.get_num_threads()} threads)")
    return fn, graph, seconds


def _load_artifact(artifact: Path, backend: str, device: str, shape: list[int]) -> Callable[[torch.Tensor], Any]:
    if backend == "aoti" and device == "cuda":  # see probe_load: a crash here must not take the process down
        crash = probe_load(artifact, device, shape)
        if crash:
            raise BackendUnavailable(f"the AOTInductor CUDA package {artifact.name}: {crash}")
    return load_aoti(artifact) if backend == "aoti" else load_tensorrt(artifact)


def load_scorer(bundle: Bundle, modality: str, backend: str = "auto", device: str = "cpu",
                precision: str | None = None, batch: int = 1, cache_dir: Path | None = None, parity_frames: int = 8,
                rebuild: bool = False, log: Log = _quiet, build: bool = True, probe: Probe | None = None) -> Scorer:
    """The best working branch: `auto` on CUDA tries `cuda_order()`, on the CPU measures (`_auto_cpu`);
    compiled ones must pass parity
    (on ``probe``'s frames: pass one to share its reference outputs between calls for one branch)."""
    order = cuda_order() if backend == "auto" else [backend]
    if backend != "auto" and backend not in BACKENDS:
        raise CemdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or auto")
    skipped: dict[str, str] = {}
    if backend == "auto" and device == "cpu":
        return _auto_cpu(bundle, modality, batch, cache_dir, probe or Probe(bundle, modality, parity_frames), rebuild,
                         log, build)
    if device not in ("cpu", "cuda") and backend != "openvino":
        raise CemdError(f"device {device!r} is not cpu or cuda; other device names (GPU, NPU …) are OpenVINO's and "
                        "go with the openvino backend")
    tensors = device if device in ("cpu", "cuda") else "cpu"  # an OpenVINO device takes host tensors
    probe = probe or Probe(bundle, modality, parity_frames)
    for name in order:
        prec = precision or default_precision(name, device)
        try:
            fn, artifact, seconds = compile_branch(bundle, modality, name, device, prec, batch, cache_dir, rebuild, log,
                                                      build)
            parity = None if name == "eager" else probe.check(name, fn, batch, tensors, prec)
            if parity is not None and artifact is not None:
                record_parity(artifact, name, device, parity)
            return Scorer(modality, name, tensors, prec, batch, bundle.model.input_size, fn, artifact, seconds, parity,
                          skipped)
        except (BackendUnavailable, ParityError) as exc:
            if backend != "auto":
                raise
            skipped[name] = str(exc)
            log(f"{modality.upper()}: {name} skipped: {exc}")
    raise BackendUnavailable(f"no backend could run the {modality.upper()} branch: {skipped}")


def _timings(scorers: dict[str, Scorer], frame: torch.Tensor, rounds: int = TIMED_ROUNDS, calls: int = 5,
             warm: int = 2, gap_s: float = 0.05) -> dict[str, float]:
    """Median ms per call of each candidate, measured in interleaved blocks: ``rounds`` times, each
    candidate in turn gets a short pause (the previous runtime's threads go idle), ``warm`` untimed
    calls, then ``calls`` timed ones. Interleaving spreads a shared machine's slow spells over all
    candidates instead of letting them fall on whichever was timed then."""
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(rounds):
        for name, scorer in scorers.items():
            time.sleep(gap_s)
            for i in range(warm + calls):
                t0 = time.perf_counter()
                scorer(frame)
                if i >= warm:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(float(np.median(t)), 2) for name, t in times.items()}


def _machine(bundle: Bundle, modality: str, batch: int) -> dict[str, Any]:
    """What a CPU choice depends on: the branch, the machine's CPU and threads, the libraries."""
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for runtime in ONNX_RUNTIMES:
        try:
            versions[runtime] = runtime_version(runtime)
        except RuntimeMissing:
            versions[runtime] = None
    return {"model_hash": model_hash(bundle, modality), "batch": batch, "cpu": cpu or platform.processor(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, **versions}


def _ready(bundle: Bundle, modality: str, batch: int, cache_dir: Path | None) -> dict[str, bool]:
    """Which built artifacts a CPU choice could use now (a new one means: measure again)."""
    out = {}
    for backend, extra in (("onnx", ONNX_KEY), ("aoti", {})):
        key, artifact, sidecar = artifact_location(bundle, modality, backend, "cpu", "fp32", batch, cache_dir, extra)
        out[backend] = stale_reason(artifact, sidecar, key) is None
    return out


def _auto_cpu(bundle: Bundle, modality: str, batch: int, cache_dir: Path | None, probe: Probe, rebuild: bool,
              log: Log, build: bool) -> Scorer:
    """`auto` on the CPU: every candidate that can run here without a long build (the ONNX runtimes
    export their graph once, in seconds; AOTInductor counts only if its package exists) is parity-
    checked and timed on a probe frame; the fastest wins. The choice and the timings are kept in
    ``compiled/auto-<modality>-cpu-b<batch>.json`` and reused while nothing they depend on changes."""
    folder = Path(cache_dir) if cache_dir else bundle.path / "compiled"
    record_path = folder / f"auto-{modality}-cpu-b{batch}.json"
    machine = {**_machine(bundle, modality, batch), "ready": _ready(bundle, modality, batch, cache_dir)}
    skipped = {"tensorrt": "CPU device (TensorRT needs an NVIDIA GPU)"}
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() and not rebuild else None
    except (OSError, json.JSONDecodeError):
        record = None
    if record and record.get("machine") == machine and record.get("chosen") in AUTO_CPU:
        try:
            scorer = load_scorer(bundle, modality, record["chosen"], "cpu", None, batch, cache_dir, probe.n, False, log,
                                 build, probe)
            scorer.timings_ms, scorer.skipped = record["timings_ms"], {**skipped, **record.get("skipped", {})}
            log(f"{modality.upper()} auto: {record['chosen']} (measured {record['measured']}: "
                f"{_timings_text(record['timings_ms'])})")
            return scorer
        except (BackendUnavailable, ParityError) as exc:
            log(f"{modality.upper()} auto: the recorded choice {record['chosen']} cannot run ({exc}); measuring again")
    scorers: dict[str, Scorer] = {}
    for name in AUTO_CPU:
        try:
            scorers[name] = load_scorer(bundle, modality, name, "cpu", None, batch, cache_dir, probe.n, rebuild, log,
                                        build and name != "aoti", probe)
        except (BackendUnavailable, ParityError) as exc:
            skipped[name] = str(exc)
            log(f"{modality.upper()}: {name} skipped: {exc}")
    if not scorers:
        raise BackendUnavailable(f"no backend could run the {modality.upper()} branch: {skipped}")
    frame = probe.frames[:batch] if len(probe.frames) >= batch else probe.frames[:1].expand(batch, -1, -1, -1)
    timings = _timings(scorers, frame)
    chosen = min(timings, key=timings.__getitem__)
    log(f"{modality.upper()} auto: {_timings_text(timings)} → {chosen}")
    measured = time.strftime("%Y-%m-%d %H:%M:%S")
    folder.mkdir(parents=True, exist_ok=True)
    machine["ready"] = _ready(bundle, modality, batch, cache_dir)  # as the next start will find them
    atomic_write_json(record_path, {"machine": machine, "timings_ms": timings, "chosen": chosen, "measured": measured,
                                    "skipped": {k: v for k, v in skipped.items() if k != "tensorrt"}})
    scorer = scorers[chosen]
    if scorer.artifact is not None:
        _record_choice(scorer.artifact, chosen, timings, measured)
    scorer.timings_ms, scorer.skipped = timings, skipped
    return scorer


def _timings_text(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(timings.items(), key=lambda kv: kv[1]))


def _record_choice(artifact: Path, chosen: str, timings: dict[str, float], measured: str) -> None:
    """The auto choice in the chosen artifact's sidecar too, beside its parity record."""
    choice = {"chosen": chosen, "timings_ms": timings, "measured": measured}
    _update_sidecar(artifact, lambda data: data.__setitem__("auto_cpu", choice))


def _build_main(argv: list[str]) -> int:
    """Child process of `load_scorers`: build (or find) one branch's AOTInductor package."""
    from engine.deploy.bundle import load_bundle  # noqa: PLC0415

    path, modality, device, precision, cache_dir, batch, rebuild = argv
    try:
        compile_branch(load_bundle(path), modality, "aoti", device, precision or None, int(batch),
                       cache_dir=Path(cache_dir) if cache_dir else None, rebuild=rebuild == "1",
                       log=lambda msg: print(f"log: {msg}", file=sys.stderr, flush=True))
        return 0
    except Exception as exc:  # the parent's load_scorer meets the same problem and reports it properly
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 1


def _build_at_once(bundle: Bundle, modalities: list[str], device: str, precision: str | None, batch: int,
                   cache_dir: Path | None, rebuild: bool, log: Log) -> set[str]:
    """Compile these branches' AOTInductor packages in parallel, one child interpreter each;
    returns the modalities whose child succeeded.

    Plain child interpreters, not multiprocessing: its children re-run the caller's main script
    (a script without a ``__main__`` guard would build everything in every child). A child that
    fails is only logged; the caller's `load_scorer` then builds that branch itself.
    """
    log(f"compiling the {' and '.join(m.upper() for m in modalities)} aoti branches at once "
        f"({len(modalities)} processes; a minute or two, once per machine)")
    t0 = time.perf_counter()
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from engine.deploy.backends import _build_main; sys.exit(_build_main(sys.argv[1:]))"
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for m in modalities:
            with open(Path(tmp) / m, "w") as err:  # a file, not a pipe: a chatty child never blocks
                procs.append((m, subprocess.Popen(
                    [sys.executable, "-c", code, str(bundle.path), m, device, precision or "", str(cache_dir or ""),
                     str(batch), "1" if rebuild else "0"],
                    stdout=subprocess.DEVNULL, stderr=err, env=env)))
        built = set()
        for m, proc in procs:
            proc.wait()
            lines = [x for x in (Path(tmp) / m).read_text(errors="replace").splitlines() if x.strip()]
            if proc.returncode == 0:
                built.add(m)
                for x in lines:  # what the parent's log would have said: the pruned packages
                    if x.startswith("log: ") and "superseded" in x:
                        log(x[5:])
            else:
                log(f"{m.upper()} aoti: parallel build failed ({(lines or [f'exit {proc.returncode}'])[-1]}); "
                    f"trying again in this process")
    log(f"compiled in {time.perf_counter() - t0:.0f} s")
    return built


def load_scorers(bundle: Bundle, modalities: list[str], backend: str = "auto", device: str = "cpu",
                 precision: str | None = None, batch: int = 1, cache_dir: Path | None = None, rebuild: bool = False,
                 log: Log = _quiet, build: bool = True) -> dict[str, Scorer]:
    """`load_scorer` for several branches; on the CPU, AOTInductor packages that are missing are
    compiled at the same time (`_build_at_once`): lowering and the C++ compiler each use one core,
    so two branches took 66 s at once against about 100 s one after the other on the 2-core
    machine (docs/BENCHMARKS.md)."""
    built: set[str] = set()
    if build and device == "cpu" and backend == "aoti" and len(modalities) > 1 and (os.cpu_count() or 1) > 1:
        prec = precision or default_precision("aoti", device)
        try:
            check_compiler()
            todo = []
            for m in modalities:
                key, artifact, sidecar = artifact_location(bundle, m, "aoti", device, prec, batch, cache_dir)
                if rebuild or stale_reason(artifact, sidecar, key):
                    todo.append(m)
        except BackendUnavailable:
            todo = []  # no compiler: load_scorer says so and falls back
        if len(todo) > 1:
            built = _build_at_once(bundle, todo, device, precision, batch, cache_dir, rebuild, log)
    scorers = {}
    for m in modalities:
        # a branch its child built just now is loaded, not rebuilt, even with rebuild
        scorers[m] = load_scorer(bundle, m, backend, device, precision, batch, cache_dir=cache_dir,
                                 rebuild=rebuild and m not in built, log=log, build=build)
        if m in built and scorers[m].artifact is not None and scorers[m].compile_seconds is None:
            try:
                sidecar = json.loads(sidecar_of(scorers[m].artifact).read_text())
                scorers[m].compile_seconds = sidecar.get("compile_seconds")
            except (OSError, ValueError):
                pass
    return scorers
