"""Where the compiled libraries are: the ORT custom-op library, the CUDA kernel, the TensorRT plugin."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import MoeExportError


def _lib_dirs():
    # lib/ beside this file (regular install), else in site-packages (an editable install keeps
    # the sources here and the compiled libraries there).
    import sysconfig
    yield Path(__file__).resolve().parent / "lib"
    yield Path(sysconfig.get_paths()["platlib"]) / "moe_export" / "lib"


def _native(name: str, env: str, what: str) -> str:
    override = os.environ.get(env)
    if override:
        if not Path(override).is_file():
            raise MoeExportError(f"{env}={override} does not exist")
        return override
    for d in _lib_dirs():
        path = d / f"lib{name}.so"
        if path.is_file():
            return str(path)
    raise MoeExportError(f"{what} is not built (lib{name}.so missing); reinstall with `pip install .` "
                         f"from the repository, or set {env}")


def custom_op_library() -> str:
    """Path of the compiled ONNX Runtime custom-op library (DynamicRouter CPU kernel)."""
    return _native("moe_export_ort", "MOE_EXPORT_OP_LIBRARY", "the ONNX Runtime custom-op library")


def cuda_library() -> str:
    """Path of the CUDA routing kernel library (C entry point moe_dynamic_router_cuda)."""
    return _native("moe_export_cuda", "MOE_EXPORT_CUDA_LIBRARY", "the CUDA routing library")


def trt_plugin_library() -> str:
    """Path of the TensorRT plugin library (exports getCreators)."""
    return _native("moe_export_trt", "MOE_EXPORT_TRT_PLUGIN", "the TensorRT plugin library")
