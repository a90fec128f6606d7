"""Parity and routing statistics of a converted graph against its original, through polygraphy."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
from onnx import TensorProto

from ..errors import MoeExportError
from ..conversion.record import Routing
from ..model.graph import GraphIndex, attr
from ..model.source import Source
from ..rules.base import find_gates
from .stats import routed_pairs
from .runtime import batches, check_inputs, expose, gathered_per_token, load_inputs, make_feeds, session_from_proto

PAIRS_PREFIX = "moe_export.indices."


def with_routing_outputs(model, index_tensors):
    """A copy of `model` whose router index tensors are also graph outputs, under fixed names."""
    return expose(model, index_tensors, PAIRS_PREFIX)


def routing_indices(model):
    """Index tensors of the gates: from the converter's metadata, else matched in the graph."""
    routing = Routing.read(model)
    if routing is not None:
        return [r.indices for r in routing.routers], [asdict(r.attrs) for r in routing.routers]
    gates, _ = find_gates(model)
    # A fused MoE op keeps its choice inside: its logits are exposed and the choice recomputed.
    return ([g.logits if g.fused else g.indices for g in gates],
            [dict(g.attrs, policy="static", max_experts=g.attrs["k"], fused=g.fused) for g in gates])


def fused_choice(logits, k):
    """The experts a fused com.microsoft MoE op runs: the top k of the logits (its softmax keeps
    the order), ties to the higher expert id as its CPU kernel breaks them."""
    x = np.asarray(logits)[..., ::-1]
    return x.shape[-1] - 1 - np.argsort(-x, axis=-1, kind="stable")[..., :k]


def count_pairs(index_arrays, attrs):
    """Routed (token, expert) pairs per layer: slots whose index is a real expert."""
    return [routed_pairs(ix, a["num_experts"]) for ix, a in zip(index_arrays, attrs)]


# Default tolerances: for float32 models, and for models that compute in float16/bfloat16 anywhere
# (the original rounds after each half-precision op, the kernel once: a few units in the last
# place, about 1e-3 relative, even where the outputs are float32).
TOLERANCE = {"float": (1e-4, 1e-3), "half": (2e-3, 5e-3)}
_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def computes_in_half(model) -> bool:
    g = model.graph
    return (any(v.type.tensor_type.elem_type in _HALF for v in list(g.input) + list(g.output) + list(g.value_info))
            or any(t.data_type in _HALF for t in g.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i in _HALF for a in n.attribute) for n in g.node))


def _tolerances(model, atol, rtol):
    """(atol, rtol): those given, else by the precision the model computes in."""
    default = TOLERANCE["half" if computes_in_half(model) else "float"]
    return (default[0] if atol is None else atol), (default[1] if rtol is None else rtol)


def validate(original, converted, feeds=None, atol=None, rtol=None, dims=None, seed=0, trt=False):
    """Runs both graphs on the same inputs (given, or random from the input specs) in batches()
    sized to bounded memory, and reports per output the differences, the routed pairs, and at a
    static policy whether the original is reproduced (outputs within the tolerances, the same
    experts)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # expected differences (dynamic policies) are reported by us
    np.seterr(divide="ignore", invalid="ignore")  # polygraphy's relative error divides by zeros
    orig, conv = Source.of(original), Source.of(converted)
    orig_m, conv_m = orig.model, conv.model
    oi, oattrs = routing_indices(orig_m)
    ci, cattrs = routing_indices(conv_m)
    if Routing.read(conv_m) is None:
        raise MoeExportError(f"{conv.graph}: not written by moe-export convert (no router metadata)")
    shape = lambda attrs: [(a["num_experts"], a["k"]) for a in attrs]
    if shape(oattrs) != shape(cattrs):
        raise MoeExportError(f"{conv.graph} is not a conversion of {orig.graph}: their MoE layers differ "
                             f"((experts, k) per layer: {shape(oattrs)} vs {shape(cattrs)})")
    notes = []
    if feeds is None:
        feeds = make_feeds(orig_m, dims=dims, seed=seed, base=orig.base_dir)
    elif isinstance(feeds, (str, Path)):
        feeds = load_inputs(feeds, orig_m, orig.base_dir, notes)
    else:
        feeds = check_inputs(feeds, orig_m, notes=notes)
    names_o = {o.name for o in orig_m.graph.output}
    names_c = {o.name for o in conv_m.graph.output}
    if names_o != names_c:
        raise MoeExportError(f"the graphs' outputs differ: {sorted(names_o ^ names_c)}")
    # Sessions made once and handed to the runners, so each batch reuses them. Without onnxruntime's
    # arena each batch's memory is returned: with it, an original batched section's weight gathers
    # (7 GB for one 512-token sequence of a 1 GB Qwen3-MoE export) grew the arena again per batch.
    sess = lambda m, d: session_from_proto(m, d, enable_cpu_mem_arena=False)
    runners = [OnnxrtRunner(sess(with_routing_outputs(orig_m, oi), orig.base_dir), name="original"),
               OnnxrtRunner(sess(with_routing_outputs(conv_m, ci), conv.base_dir), name="converted")]
    if trt:
        runners.append(_trt_runner(conv.graph))
    # The static policy keeps exactly k whatever the cap; only a router wider than k changes shapes.
    static = all(a.get("policy", "static") == "static" and a.get("max_experts", a["k"]) <= a["k"] for a in cattrs)
    graph_outputs = [o.name for o in orig_m.graph.output]
    try:  # polygraphy >= 0.50; CompareFunc.simple before
        from polygraphy.comparator.compare import SimpleCompareFunc as simple
    except ImportError:
        simple = CompareFunc.simple
    defaults = atol is None and rtol is None
    atol, rtol = _tolerances(orig_m, atol, rtol)
    pairs = [("original", "converted")] + ([("original", "tensorrt")] if trt else [])
    stats = {p: {} for p in pairs}
    po, pc = np.zeros(len(oi), dtype=np.int64), np.zeros(len(ci), dtype=np.int64)
    tokens, same_experts = np.zeros(len(ci), dtype=np.int64), True
    parts = batches(orig_m, feeds, token_bytes=gathered_per_token(orig_m, oattrs))
    unsorted = _unsorted_gates(orig_m, len(oi))  # matched once, not per batch
    for part in parts:
        try:
            results = Comparator.run(runners, data_loader=[part])
        except MoeExportError:
            raise
        except Exception as e:
            raise MoeExportError(f"running the graphs failed: {str(e).splitlines()[0]}") from None
        _canonical_slot_order(results, unsorted)
        accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol, check_shapes=True))
        if not hasattr(accuracy, "keys"):  # polygraphy >= 0.50 returns one AccuracyResult per compare func
            accuracy = accuracy[0]
        for pair in pairs:
            for name, r in accuracy[pair][0].items():
                if name in graph_outputs:
                    _merge(stats[pair], name, r, results[pair[0]][0][name].size)
        outs = {runner: res[0] for runner, res in results.items()}
        o_idx = [outs["original"][f"{PAIRS_PREFIX}{i}"] for i in range(len(oi))]
        o_idx = [fused_choice(x, a["k"]) if a.get("fused") else x for x, a in zip(o_idx, oattrs)]
        c_idx = [outs["converted"][f"{PAIRS_PREFIX}{i}"] for i in range(len(ci))]
        po += count_pairs(o_idx, oattrs)
        pc += count_pairs(c_idx, cattrs)
        tokens += [a.size // a.shape[-1] if a.ndim else 0 for a in c_idx]
        same_experts &= all(np.array_equal(a, b) for a, b in zip(o_idx, c_idx))
    report = {"original": str(orig.graph), "converted": str(conv.graph), "atol": atol, "rtol": rtol,
              "static_policy": static, "batches": len(parts), "notes": notes}
    report["outputs"] = {name: _final(v) for name, v in stats[pairs[0]].items()}
    if trt:
        report["tensorrt"] = {name: _final(v) for name, v in stats[pairs[1]].items()}
    report["layers"] = [{"layer": i, "pairs_original": int(a), "pairs_converted": int(b), "mean_experts": b / max(1, t)}
                        for i, (a, b, t) in enumerate(zip(po, pc, tokens))]
    report["routed_pairs"] = {"original": int(po.sum()), "converted": int(pc.sum()),
                              "reduction": 1 - pc.sum() / po.sum() if po.sum() else 0.0}
    report["outputs_match"] = all(v["passed"] for v in report["outputs"].values())
    report["same_experts"] = same_experts
    report["static_reproduces"] = (report["outputs_match"] and same_experts) if static else None
    if static and defaults and same_experts and not report["outputs_match"] and computes_in_half(orig_m):
        notes.append("every token got the same experts; where a model computes in float16 or bfloat16 the "
                     "original rounds after each half-precision op and the router once, which a deep or "
                     "untrained model can amplify past the default tolerances: judge with --atol/--rtol "
                     "suited to it")
    return report


def _merge(acc, name, r, size):
    """Folds one batch's comparison of an output into the running statistics."""
    a = acc.setdefault(name, {"max_abs": 0.0, "sum_abs": 0.0, "max_rel": 0.0, "sum_rel": 0.0, "n": 0, "passed": True})
    a["max_abs"] = max(a["max_abs"], float(r.max_absdiff))
    a["max_rel"] = max(a["max_rel"], float(r.max_reldiff))
    a["sum_abs"] += float(r.mean_absdiff) * size
    a["sum_rel"] += float(r.mean_reldiff) * size
    a["n"] += size
    a["passed"] &= bool(r)


def _final(a):
    n = max(a["n"], 1)
    return {"max_abs": a["max_abs"], "mean_abs": a["sum_abs"] / n, "max_rel": a["max_rel"],
            "mean_rel": a["sum_rel"] / n, "passed": a["passed"]}


def _unsorted_gates(orig_m, n_routers):
    """[(router position, graph outputs that are its weights or indices)] for the original's gates
    whose TopK has sorted=0 (DeepSeek-V3): there the order of a token's slots is unspecified."""
    if Routing.read(orig_m) is not None:
        return []
    ix = GraphIndex(orig_m.graph)
    gates, _ = find_gates(orig_m, ix)
    outs = {o.name for o in orig_m.graph.output}
    return [(i, [t for t in (ix.through_casts(g.weights)[0], ix.through_casts(g.indices)[0]) if t in outs])
            for i, g in enumerate(gates[:n_routers]) if attr(g.topk, "sorted", 1) == 0]


def _canonical_slot_order(results, unsorted):
    """Every runner's (index, weight) pairs of the `unsorted` gates put in index order before
    comparing, in the exposed indices and in graph outputs that are that gate's weights or indices."""
    for i, gate_outs in unsorted:
        for _, iterations in results.items():
            for res in iterations:
                order = np.argsort(res[f"{PAIRS_PREFIX}{i}"], axis=-1, kind="stable")
                for name in [f"{PAIRS_PREFIX}{i}"] + gate_outs:
                    if name in res and res[name].shape == order.shape:
                        res[name] = np.take_along_axis(res[name], order, axis=-1)


def _trt_runner(converted):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise MoeExportError("--trt needs TensorRT (pip install tensorrt, with NVIDIA's index) and a GPU") from None
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, TrtRunner
    from polygraphy.backend.trt import load_plugins
    from ..native import trt_plugin_library

    load_plugins(plugins=[trt_plugin_library()])
    # the engine built once (not a loader): the runner is activated once per batch
    return TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(converted)))(), name="tensorrt")
