"""Parity and routing statistics of a converted graph against its original, through polygraphy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import MoeExportError
from .graph import GraphIndex, load_model
from .patterns import find_gates
from .rewrite import routers_metadata

PAIRS_PREFIX = "moe_export.indices."

_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
       TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


def _int_bound(ix: GraphIndex, name):
    """Token ids index an embedding: the first Gather over an initializer tells the vocab size."""
    for c in ix.consumers_of(name):
        if c.op_type == "Gather" and c.input[1] == name and c.input[0] in ix.initializers:
            return ix.initializers[c.input[0]].dims[0]
    return None


def make_feeds(model, dims=None, seed=0, tokens=16, batch=2):
    """Random inputs from the graph's input specs. Symbolic dims take `dims[name]`, else `batch`
    for a dim named like a batch and `tokens` for the others."""
    dims = dict(dims or {})
    ix = GraphIndex(model.graph)
    rng = np.random.default_rng(seed)
    symbolic = {d.dim_param for i in graph_inputs(model) for d in i.type.tensor_type.shape.dim if d.dim_param}
    if set(dims) - symbolic:
        raise MoeExportError(f"--dim {', '.join(sorted(set(dims) - symbolic))}: no such input dimension "
                             f"(the graph's symbolic dimensions: {', '.join(sorted(symbolic)) or 'none'})")
    feeds = {}
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                guess = batch if "batch" in d.dim_param.lower() else tokens
                shape.append(int(dims.get(d.dim_param, guess)))
        dt = _NP.get(tt.elem_type)
        if dt is None:
            raise MoeExportError(f"input {inp.name!r}: element type {tt.elem_type} is not supported; pass --data")
        if np.issubdtype(dt, np.integer):
            hi = _int_bound(ix, inp.name) or 100
            feeds[inp.name] = rng.integers(0, hi, size=shape).astype(dt)
        elif dt is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[inp.name] = (rng.standard_normal(shape) * 2.0).astype(dt)
    return feeds


def graph_inputs(model):
    """The inputs a caller feeds: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def load_inputs(path, model):
    """Inputs for `model` from an .npz of named arrays, or an .npy for a single-input graph
    (token ids [batch, seq], router logits [tokens, E]); checked against the graph's inputs."""
    p = Path(path)
    if not p.is_file():
        raise MoeExportError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                data = {k: data[k] for k in data.files}
    except Exception as e:
        raise MoeExportError(f"{p}: cannot read inputs ({type(e).__name__}); expected .npy or .npz") from None
    inputs = graph_inputs(model)
    if not isinstance(data, dict):
        if len(inputs) != 1:
            raise MoeExportError(f"{p}: an .npy feeds a single-input graph; this one has {len(inputs)} inputs "
                                 f"({', '.join(i.name for i in inputs)}): pass an .npz with one array each")
        rank = len(inputs[0].type.tensor_type.shape.dim)
        if data.ndim == rank - 1:  # one sequence of token ids: a batch of one
            data = data[None]
        data = {inputs[0].name: data}
    return check_inputs(data, model, str(p))


def check_inputs(feeds, model, where="--data"):
    """Names, element kinds and ranks of `feeds` against the graph's inputs; arrays cast to the
    graph's element types. One-line errors."""
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown, missing = sorted(set(feeds) - set(inputs)), sorted(set(inputs) - set(feeds))
    if unknown or missing:
        raise MoeExportError(f"{where}: inputs do not match the graph's ({', '.join(inputs)}): "
                             + "; ".join(x for x in (unknown and f"unknown {', '.join(unknown)}",
                                                     missing and f"missing {', '.join(missing)}") if x))
    out = {}
    for name, arr in feeds.items():
        tt = inputs[name].type.tensor_type
        want = _NP.get(tt.elem_type)
        arr = np.asarray(arr)
        if want is None:
            raise MoeExportError(f"input {name!r}: element type {tt.elem_type} is not supported")
        kind = lambda d: "bool" if d == np.bool_ else "integer" if np.issubdtype(d, np.integer) else \
            "float" if np.issubdtype(d, np.floating) else str(d)
        if kind(arr.dtype) != kind(np.dtype(want)):
            raise MoeExportError(f"{where}: input {name!r} is {arr.dtype}, the graph wants {np.dtype(want).name}")
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if arr.ndim != len(dims):
                raise MoeExportError(f"{where}: input {name!r} has rank {arr.ndim}, the graph wants {len(dims)}")
            for j, d in enumerate(dims):
                if d.HasField("dim_value") and arr.shape[j] != d.dim_value:
                    raise MoeExportError(f"{where}: input {name!r} has shape {list(arr.shape)}, "
                                         f"dimension {j} must be {d.dim_value}")
        out[name] = arr.astype(want, copy=False)
    return out


def expose(model, tensors, prefix):
    """A copy of `model` with `tensors` also as graph outputs, named prefix + position."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(tensors):
        m.graph.node.append(helper.make_node("Identity", [t], [f"{prefix}{i}"], name=f"moe_export/expose_{prefix}{i}"))
        m.graph.output.append(helper.make_empty_tensor_value_info(f"{prefix}{i}"))
    return m


def with_routing_outputs(model, index_tensors):
    """A copy of `model` whose router index tensors are also graph outputs, under fixed names."""
    return expose(model, index_tensors, PAIRS_PREFIX)


def run_exposed(model, base_dir, tensors, feeds, batch=16, custom_ops=True, progress=None):
    """Runs `model` on `feeds`, `batch` rows of the first axis at a time, and returns for each of
    `tensors` the list of its per-batch values. `progress`: a files.Progress told the batches done."""
    prefix = "moe_export.exposed."
    names = [f"{prefix}{i}" for i in range(len(tensors))]
    sess = session_from_proto(expose(model, tensors, prefix), base_dir, custom_ops=custom_ops)
    n = next(iter(feeds.values())).shape[0]
    got = [[] for _ in tensors]
    if progress is not None:
        progress.total = -(-n // batch)
    for j, s in enumerate(range(0, n, batch)):
        for g, r in zip(got, sess.run(names, {k: v[s:s + batch] for k, v in feeds.items()})):
            g.append(r)
        if progress is not None:
            progress.update(j + 1)
    return got


def session_from_proto(model, base_dir, custom_ops=True, **opts):
    import onnxruntime as ort
    from . import custom_op_library

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a load failure is reported once, as MoeExportError below
    for k, v in opts.items():
        setattr(so, k, v)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    if custom_ops:
        so.register_custom_ops_library(custom_op_library())
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise MoeExportError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None


def routing_indices(model):
    """Index tensors of the gates: from the converter's metadata, else matched in the graph."""
    meta = routers_metadata(model)
    if meta is not None:
        return [r["indices"] for r in meta["routers"]], [r["attrs"] for r in meta["routers"]]
    gates, _ = find_gates(model)
    return [g.indices for g in gates], [dict(g.attrs, policy="static", max_experts=g.attrs["k"]) for g in gates]


def count_pairs(index_arrays, attrs):
    """Routed (token, expert) pairs per layer: slots whose index is a real expert."""
    return [int((np.asarray(ix) < a["num_experts"]).sum()) for ix, a in zip(index_arrays, attrs)]


# Default tolerances: for float32 models, and for models that compute in float16/bfloat16 anywhere
# (the original rounds after each half-precision op, the kernel once: a few units in the last
# place, about 1e-3 relative, even where the outputs are float32).
TOLERANCE = {"float": (1e-4, 1e-3), "half": (2e-3, 5e-3)}
_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _computes_in_half(model) -> bool:
    g = model.graph
    return (any(v.type.tensor_type.elem_type in _HALF for v in list(g.input) + list(g.output) + list(g.value_info))
            or any(t.data_type in _HALF for t in g.initializer)
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i in _HALF for a in n.attribute) for n in g.node))


def _tolerances(model, atol, rtol):
    """(atol, rtol): those given, else by the precision the model computes in."""
    default = TOLERANCE["half" if _computes_in_half(model) else "float"]
    return (default[0] if atol is None else atol), (default[1] if rtol is None else rtol)


def validate(original, converted, feeds=None, atol=None, rtol=None, dims=None, seed=0, trt=False):
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # expected differences (dynamic policies) are reported by us
    np.seterr(divide="ignore", invalid="ignore")  # polygraphy's relative error divides by zeros
    orig_m, conv_m = load_model(original), load_model(converted)
    oi, oattrs = routing_indices(orig_m)
    ci, cattrs = routing_indices(conv_m)
    if routers_metadata(conv_m) is None:
        raise MoeExportError(f"{converted}: not written by moe-export convert (no router metadata)")
    if feeds is None:
        feeds = make_feeds(orig_m, dims=dims, seed=seed)
    elif isinstance(feeds, (str, Path)):
        feeds = load_inputs(feeds, orig_m)
    else:
        feeds = check_inputs(feeds, orig_m)
    names_o = {o.name for o in orig_m.graph.output}
    names_c = {o.name for o in conv_m.graph.output}
    if names_o != names_c:
        raise MoeExportError(f"the graphs' outputs differ: {sorted(names_o ^ names_c)}")
    so = with_routing_outputs(orig_m, oi)
    sc = with_routing_outputs(conv_m, ci)
    runners = [OnnxrtRunner(lambda: session_from_proto(so, Path(original).parent), name="original"),
               OnnxrtRunner(lambda: session_from_proto(sc, Path(converted).parent), name="converted")]
    if trt:
        runners.append(_trt_runner(converted))
    try:
        results = Comparator.run(runners, data_loader=[feeds])
    except MoeExportError:
        raise
    except Exception as e:
        raise MoeExportError(f"running the graphs failed: {str(e).splitlines()[0]}") from None
    _canonical_slot_order(results, orig_m, len(oi))
    # The static policy keeps exactly k whatever the cap; only a router wider than k changes shapes.
    static = all(a.get("policy", "static") == "static" and a.get("max_experts", a["k"]) <= a["k"] for a in cattrs)
    graph_outputs = [o.name for o in orig_m.graph.output]
    try:  # polygraphy >= 0.50; CompareFunc.simple before
        from polygraphy.comparator.compare import SimpleCompareFunc as simple
    except ImportError:
        simple = CompareFunc.simple
    atol, rtol = _tolerances(orig_m, atol, rtol)
    accuracy = Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol, check_shapes=True))
    report = {"original": str(original), "converted": str(converted), "atol": atol, "rtol": rtol,
              "static_policy": static}
    if not hasattr(accuracy, "keys"):  # polygraphy >= 0.50 returns one AccuracyResult per compare func
        accuracy = accuracy[0]

    def stats(pair):
        per_out = accuracy[pair][0]
        return {name: {"max_abs": float(r.max_absdiff), "mean_abs": float(r.mean_absdiff),
                       "max_rel": float(r.max_reldiff), "mean_rel": float(r.mean_reldiff), "passed": bool(r)}
                for name, r in per_out.items() if name in graph_outputs}
    report["outputs"] = stats(("original", "converted"))
    if trt:
        report["tensorrt"] = stats(("original", "tensorrt"))
    outs = {runner: res[0] for runner, res in results.items()}
    o_idx = [outs["original"][f"{PAIRS_PREFIX}{i}"] for i in range(len(oi))]
    c_idx = [outs["converted"][f"{PAIRS_PREFIX}{i}"] for i in range(len(ci))]
    po, pc = count_pairs(o_idx, oattrs), count_pairs(c_idx, cattrs)
    tokens = [a.size // a.shape[-1] if a.ndim else 0 for a in c_idx]
    report["layers"] = [{"layer": i, "pairs_original": a, "pairs_converted": b, "mean_experts": b / max(1, t)}
                        for i, (a, b, t) in enumerate(zip(po, pc, tokens))]
    report["routed_pairs"] = {"original": sum(po), "converted": sum(pc),
                              "reduction": 1 - sum(pc) / sum(po) if sum(po) else 0.0}
    report["outputs_match"] = all(v["passed"] for v in report["outputs"].values())
    report["static_reproduces"] = (report["outputs_match"] and
                                   all(np.array_equal(a, b) for a, b in zip(o_idx, c_idx))) if static else None
    return report


def _canonical_slot_order(results, orig_m, n_routers):
    """Where the original's TopK has sorted=0 (DeepSeek-V3), the order of a token's slots is
    unspecified: every runner's (index, weight) pairs are put in index order before comparing,
    in the exposed indices and in graph outputs that are that gate's weights or indices."""
    from .graph import attr

    if routers_metadata(orig_m) is not None:
        return
    ix = GraphIndex(orig_m.graph)
    gates, _ = find_gates(orig_m, ix)
    outs = {o.name for o in orig_m.graph.output}
    for i, g in enumerate(gates[:n_routers]):
        if attr(g.topk, "sorted", 1) != 0:
            continue
        gate_outs = [t for t in (ix.through_casts(g.weights)[0], ix.through_casts(g.indices)[0]) if t in outs]
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
    from . import trt_plugin_library

    load_plugins(plugins=[trt_plugin_library()])
    return TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(converted))), name="tensorrt")
