#!/usr/bin/env bash
# On an NVIDIA machine with the project installed (installs nothing): build every backend that
# can run here (eager FP16, its CUDA-graph replay, AOTInductor, TensorRT and ONNX Runtime's CUDA
# providers where installed), check parity against eager, print the latency table.
#   bash bench/gpu_check.sh [BUNDLE] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-models/demo}
OUT=${2:-runs/gpu_check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
"$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import torch_tensorrt
    print("torch_tensorrt", torch_tensorrt.__version__)
except Exception as exc:  # plain Exception when the TensorRT libraries are missing
    print("torch_tensorrt unavailable:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
PY
BACKENDS=eager,cuda-graph,aoti
"$PY" -c "import torch_tensorrt" 2>/dev/null && BACKENDS=$BACKENDS,tensorrt
"$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null \
  && BACKENDS=$BACKENDS,onnxruntime
"$PY" -m pytest -q -m gpu tests/test_backends.py -p no:cacheprovider || echo "GPU tests failed"
"$PY" -m bench.model_latency --bundle "$BUNDLE" --device cuda --backends "$BACKENDS" --json "$OUT/model_latency_cuda.json"
