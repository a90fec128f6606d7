"""`polygraphy run MODEL --moe-onnxrt`: a runner for polygraphy's CLI that runs a converted graph
in ONNX Runtime with the DynamicRouter library registered.

Polygraphy's own `--onnxrt` runner builds its session without session options, so it cannot load
a custom-op library. This module is registered under polygraphy's `polygraphy.run.plugins` entry
point (pyproject.toml): `polygraphy run` lists its argument group beside the built-in ones, and
the runner takes onnxrt's `--providers` and `--graph-optimization-level`. It works in generated
scripts too (`--gen-script`), since the loader is importable from here.
"""
from __future__ import annotations

import os

from polygraphy import util
from polygraphy.backend.base import BaseLoader
from polygraphy.tools.args import ModelArgs, OnnxLoadArgs
from polygraphy.tools.args.backend.onnxrt.loader import OnnxrtSessionArgs
from polygraphy.tools.args.base import BaseRunnerArgs
from polygraphy.tools.script import inline, inline_identifier, make_invocable, safe


class SessionWithMoeOps(BaseLoader):
    """Builds an onnxruntime.InferenceSession with the DynamicRouter library registered (what
    polygraphy's SessionFromOnnx does, plus the library and the model's external-data folder)."""

    def __init__(self, model, providers=None, graph_optimization_level=None, data_dir=None):
        """model: a path, serialized bytes, or a callable returning either. providers: names or
        case-insensitive parts of names of onnxruntime's execution providers (default cpu).
        data_dir: where the external data of a model given as bytes lives."""
        self.model, self.providers = model, util.default(providers, ["cpu"])
        self.graph_optimization_level, self.data_dir = graph_optimization_level, data_dir

    def call_impl(self):
        import onnxruntime as ort

        from ..run.runtime import session

        model, _ = util.invoke_if_callable(self.model)
        available = ort.get_available_providers()
        providers = []
        for p in self.providers:
            found = util.find_str_in_iterable(p, available)
            if found is None:
                raise ValueError(f"no onnxruntime execution provider matches {p!r}; available: {available}")
            providers.append(found)
        opts = {} if self.graph_optimization_level is None else {"graph_optimization_level": self.graph_optimization_level}
        return session(model, providers=providers, data_dir=self.data_dir, **opts)


class MoeOnnxrtRunnerArgs(BaseRunnerArgs):
    """
    MoE ONNX-Runtime Inference: running a moe-export converted model in ONNX-Runtime with the DynamicRouter op library registered.

    Depends on:

        - OnnxrtSessionArgs
        - OnnxLoadArgs
        - ModelArgs
    """

    def get_name_opt_impl(self):
        return "MoE ONNX-Runtime", "moe-onnxrt"

    def add_to_script_impl(self, script):
        model_path = self.arg_groups[ModelArgs].path
        if self.arg_groups[OnnxLoadArgs].must_use_onnx_loader():  # e.g. --onnx-outputs: a modified model
            model = self.arg_groups[OnnxLoadArgs].add_to_script(script, serialize_model=True)
        else:
            model = model_path
        sess_args = self.arg_groups[OnnxrtSessionArgs]
        level = None
        if sess_args.graph_optimization_level is not None:
            script.add_import(imports=["onnxruntime"], imp_as="onnxrt")
            level = inline(safe("onnxrt.GraphOptimizationLevel.{:}", inline_identifier(sess_args.graph_optimization_level)))
        script.add_import(imports=["SessionWithMoeOps"], frm="moe_export.deploy.polygraphy_plugin")
        script.add_import(imports=["OnnxrtRunner"], frm="polygraphy.backend.onnxrt")
        data_dir = os.path.dirname(os.path.abspath(model_path)) if model_path else None
        loader = script.add_loader(
            make_invocable("SessionWithMoeOps", model, providers=sess_args.providers,
                           graph_optimization_level=level, data_dir=data_dir),
            "build_moe_onnxrt_session")
        script.add_runner(make_invocable("OnnxrtRunner", loader, name="moe-onnxrt"))


def export_argument_groups():
    """The `polygraphy.run.plugins` entry point: the argument groups this package adds."""
    return [MoeOnnxrtRunnerArgs()]
