"""convert and repolicy on files: a model source in (an .onnx file or a GenAI folder, never
modified), a new model out, written all-or-nothing."""
from __future__ import annotations

from pathlib import Path

from ..errors import MoeExportError, UsageError
from ..model import genai
from ..model.files import Output
from ..model.source import Source
from .policy import Policy
from .record import Routing
from .rewrite import already_converted, rewrite_model, router_nodes, set_policy


def _write(src: Source, dst, transform, protect=(), portable=False):
    """Writes transform(a copy of src's graph) -> (model, result) to `dst`: a graph file, or for a
    GenAI folder a new folder. `protect`: further input files no output may replace (a calibration
    set, ...). Returns (result, notes about the written files)."""
    dst = Path(dst)
    if src.is_folder:
        return genai.write_folder(src.path, dst, transform, protect, load=src.copy, needs_library=not portable)
    with Output(protected=src.files() + [Path(p) for p in protect]) as out:
        out.check_model_path(dst)
        model, result = transform(src.copy())
        out.model(model, dst, src.base_dir)
    return result, out.notes


def convert_model(src, dst, pol: Policy, portable=False, group_experts=True, protect=(), per_expert_weights=False):
    """Converts the model at `src` (a path or a Source) into `dst`. Returns (gates, notes)."""
    _check_policy(pol)
    src = Source.of(src)

    def transform(model):
        routing = Routing.read(model)
        if routing is not None:
            raise MoeExportError(already_converted(src.path, routing))
        model, gates = rewrite_model(model, pol, portable=portable, group_experts=group_experts,
                                     per_expert_weights=per_expert_weights)
        model.producer_name = "moe-export"
        return model, gates
    return _write(src, dst, transform, protect, portable)


def convert(src, dst, pol: Policy, portable=False, group_experts=True, per_expert_weights=False):
    """Converts the model at `src` into `dst` (never modifying `src`). Returns the gates."""
    return convert_model(src, dst, pol, portable, group_experts, per_expert_weights=per_expert_weights)[0]


def repolicy(src, dst, pol: Policy, protect=()):
    """Writes `src` (a converted model, or GenAI folder) to `dst` with its routers under `pol`.
    Returns (the number of routers, notes)."""
    _check_policy(pol)

    def transform(model):
        set_policy(model, pol)
        return model, len(router_nodes(model))
    return _write(Source.of(src), dst, transform, protect)


def _check_policy(pol) -> None:
    if not isinstance(pol, Policy):
        raise UsageError(f"the policy must be a moe_export Policy, e.g. Policy(\"top-p\", 0.6), got {pol!r}")
