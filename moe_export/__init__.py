"""moe-export: replace static top-k MoE gating in ONNX graphs with a dynamic-routing op."""
from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

def _lib_dirs():
    # lib/ beside this file (regular install), else in site-packages (an editable install keeps
    # the sources here and the compiled libraries there).
    import sysconfig
    yield Path(__file__).resolve().parent / "lib"
    yield Path(sysconfig.get_paths()["platlib"]) / "moe_export" / "lib"


class MoeExportError(Exception):
    """An error the CLI reports as one line (bad input, unsupported graph, missing build); exit 1."""


class UsageError(MoeExportError):
    """A command line that cannot be acted on whatever the files (a flag's value out of its
    range, flags that exclude each other), found before any file is read; exit 2, as argparse's."""


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


from .schema import DOMAIN, OP_TYPE, register as _register_op_schema  # noqa: E402
from .runtime import session  # noqa: E402  (public API)
from .spec import dynamic_router, RouterAttrs  # noqa: E402

# onnx.checker and onnx.shape_inference then know moe_export::DynamicRouter (docs/dynamic_router.md).
_register_op_schema()

__all__ = ["session", "custom_op_library", "cuda_library", "trt_plugin_library", "dynamic_router",
           "RouterAttrs", "MoeExportError", "UsageError", "DOMAIN", "OP_TYPE", "__version__"]
