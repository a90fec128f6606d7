#!/usr/bin/env bash
# Sets moe-export up on a fresh machine: .venv at the repository root, the package with its
# dependencies, and the native libraries (ORT custom op; CUDA kernel and TensorRT plugin when
# nvcc is present). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU build; any other release pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
# Public headers for the native build, cached outside the clone (see plugins/fetch_headers.sh).
export ORT_INCLUDE_DIR="${ORT_INCLUDE_DIR:-$(bash plugins/fetch_headers.sh ort)}"
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  export TENSORRT_INCLUDE_DIR="${TENSORRT_INCLUDE_DIR:-$(bash plugins/fetch_headers.sh trt)}"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check ".[export,test,triton,plot,genai]"
# The serving environment of `moe-export serve` (tests/test_triton_serve.py): Triton's pip wheel
# pins numpy<2, so it gets its own venv, with the onnxruntime and onnxruntime-genai of .venv.
[ -x .venv-serve/bin/python ] || "$PY" -m venv .venv-serve
.venv-serve/bin/python -m pip install -q --disable-pip-version-check nvidia-pytriton==0.7.0 \
  "$(.venv/bin/python -c 'import onnxruntime as o; print("onnxruntime==" + o.__version__)')" \
  "$(.venv/bin/python -c 'from importlib.metadata import version; print("onnxruntime-genai==" + version("onnxruntime-genai"))')"
.venv/bin/python -c "import moe_export; print('moe-export ready:', moe_export.custom_op_library())"
