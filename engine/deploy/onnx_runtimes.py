"""The branch as an ONNX graph, and the two runtimes that run it: ONNX Runtime and OpenVINO.

One graph per branch (``torch.onnx.export`` of the same ``torch.export`` program the other
backends compile: normalisation, map and score inside), FP32, batch fixed, checked with
``onnx.checker``. It is also the hand-off file for any other runtime (TensorRT's ``trtexec``,
Triton). Both runtimes are optional extras (``pip install -e '.[onnxruntime]'``,
``'.[openvino]'``); a missing one makes its backend unavailable with the command that installs it.

Threads: each runtime is pinned to ``torch.get_num_threads()`` at load time (intra-op), with
one inter-op thread / one stream, so an inference worker that set torch to one thread runs its
runtime on one thread too and two workers on two cores do not oversubscribe. A call touches no
torch op (numpy in, numpy out: `host_array`), so torch's idle threads stay asleep.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.errors import CemdError

ONNX_RUNTIMES = ("onnxruntime", "openvino")
INPUT_NAME = "frames"
OUTPUT_NAMES = ("anomaly_map", "score")
OPSET = 18


class RuntimeMissing(CemdError):
    """The runtime's package is not installed (BackendUnavailable wraps it with the backend's name)."""


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise RuntimeMissing(f"{module} is not installed ({exc}); install it with: pip install -e '.[{extra}]'") from None


def onnx_version() -> str:
    return str(_require("onnx", "onnxruntime").__version__)


def build_onnx(ep: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
    """Write the branch's ONNX graph (weights inside the file) and check it with onnx.checker."""
    onnx = _require("onnx", "onnxruntime")
    _require("onnxscript", "onnxruntime")  # the dynamo exporter's dependency
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and progress lines: not ours
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, (example,), dynamo=True, optimize=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), verbose=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        return str(_require("onnxruntime", "onnxruntime").__version__)
    if runtime == "openvino":
        return str(_require("openvino", "openvino").__version__)
    raise CemdError(f"unknown ONNX runtime {runtime!r}; choose one of {', '.join(ONNX_RUNTIMES)}")


def host_array(frames: torch.Tensor) -> np.ndarray:
    """The frames as a C-contiguous float32 array, copied by numpy: a torch op (``.contiguous()``)
    right before the call wakes torch's OpenMP threads, whose spin-wait then competes with the
    runtime's own threads (measured on 2 cores: ONNX Runtime 12.8 ms per call after one, 7.9 without)."""
    return np.ascontiguousarray(frames.detach().cpu().numpy(), dtype=np.float32)


def _outputs(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    amap, score = arrays
    return torch.from_numpy(np.array(amap, copy=True)), torch.from_numpy(np.array(score, copy=True))


def load_onnxruntime(path: Path, device: str, threads: int) -> Callable[[torch.Tensor], Any]:
    """An ONNX Runtime session: CPU execution provider, or CUDA (TensorRT first) where present."""
    ort = _require("onnxruntime", "onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if device == "cuda":
        have = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
        if not providers:
            raise RuntimeMissing(f"this onnxruntime has no CUDA provider (it has {', '.join(have)}); "
                                 "install onnxruntime-gpu on an NVIDIA machine")
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise CemdError(f"onnxruntime runs on cpu or cuda, not {device!r}")
    session = ort.InferenceSession(str(path), options, providers=providers)

    def run(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _outputs(session.run(list(OUTPUT_NAMES), {INPUT_NAME: host_array(frames)}))

    run.session = session  # type: ignore[attr-defined]  # for tests: the pinned thread counts
    return run


def openvino_device(device: str) -> str:
    """OpenVINO's device for ours: ``cpu`` → CPU; an OpenVINO name (GPU, NPU, GPU.1 …) passes through."""
    if device == "cpu":
        return "CPU"
    if device == "cuda":
        raise RuntimeMissing("OpenVINO does not run on CUDA devices; use --device cpu (or an OpenVINO device "
                             "name such as GPU or NPU)")
    return device


def load_openvino(path: Path, device: str, threads: int) -> Callable[[torch.Tensor], Any]:
    """An OpenVINO compiled model, FP32 (no bf16 on CPUs that have it: parity is against FP32), one stream."""
    ov = _require("openvino", "openvino")
    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    target = openvino_device(device)
    have = core.available_devices
    if target.split(".")[0].split(":")[0] not in {"AUTO", "MULTI", "HETERO", *(d.split(".")[0] for d in have)}:
        raise RuntimeMissing(f"OpenVINO has no {target} device on this machine (it has {', '.join(have)})")
    if target == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), target, config)
    request = compiled.create_infer_request()

    def run(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        request.infer({0: host_array(frames)})
        return _outputs([request.get_output_tensor(i).data for i in range(2)])

    run.compiled = compiled  # type: ignore[attr-defined]  # for tests: the pinned thread count
    return run


def load_runtime(runtime: str, path: Path, device: str, threads: int | None = None) -> Callable[[torch.Tensor], Any]:
    threads = threads or torch.get_num_threads()
    if runtime == "onnxruntime":
        return load_onnxruntime(path, device, threads)
    if runtime == "openvino":
        return load_openvino(path, device, threads)
    raise CemdError(f"unknown ONNX runtime {runtime!r}; choose one of {', '.join(ONNX_RUNTIMES)}")
