"""moe-export: replace static top-k MoE gating in ONNX graphs with a dynamic-routing op."""
from __future__ import annotations

import importlib
import importlib.util
import sys

from .errors import MoeExportError, UsageError
from .native import cuda_library, custom_op_library, trt_plugin_library
from .op.schema import DOMAIN, OP_TYPE, register as _register_op_schema
from .op.spec import RouterAttrs, dynamic_router
from .run.runtime import session

__version__ = "0.1.0"

# onnx.checker and onnx.shape_inference then know moe_export::DynamicRouter (docs/dynamic_router.md).
_register_op_schema()

# The rest of the public API, imported on first use (the CLI starts without torch or polygraphy).
# validate, calibrate and profile are functions of the modules of those names (below).
_API = {"convert": "conversion", "convert_model": "conversion", "repolicy": "conversion", "Policy": "conversion",
        "Routing": "conversion", "routers_metadata": "conversion", "calibrate_and_convert": "run.calibrate",
        "export_checkpoint": "model.export", "load_model": "model.graph", "Source": "model.source",
        "build_engine": "deploy.tensorrt", "triton_repository": "deploy.triton"}


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    if name in _MOVED:  # moe_export.runtime and the like, as 0.1's `import moe_export` gave them
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'moe_export' has no attribute {name!r}")


# Module paths of moe-export 0.1 (scripts, polygraphy --gen-script output), before the layout
# grouped modules by layer: each imports the module or package that holds its code now, so the
# names 0.1 documented import as they did (moe_export.rewrite's Policy, convert, convert_model,
# routers_metadata; moe_export.validate's validate; ...).
_MOVED = {"rewrite": "conversion", "experts": "conversion.experts", "patterns": "rules.base", "schema": "op.schema",
          "spec": "op.spec", "graph": "model.graph", "files": "model.files", "genai": "model.genai",
          "export": "model.export", "runtime": "run.runtime", "validate": "run.validate", "calibrate": "run.calibrate",
          "budget": "run.budget", "profile": "run.profile", "serve": "deploy.serve",
          "polygraphy_plugin": "deploy.polygraphy_plugin"}


class _MovedModules:
    def find_spec(self, name, path=None, target=None):
        head, _, leaf = name.rpartition(".")
        if head == __name__ and leaf in _MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    own_specs = {}  # alias -> the module's own spec, which the import system replaces with the alias's

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        self.own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_specs.pop(module.__spec__.name)


sys.meta_path.append(_MovedModules())

__all__ = ["session", "custom_op_library", "cuda_library", "trt_plugin_library", "dynamic_router",
           "RouterAttrs", "MoeExportError", "UsageError", "DOMAIN", "OP_TYPE", "__version__", *_API]
