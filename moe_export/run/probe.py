"""Fitting policy probe's probes (conversion/probe.py) on calibration data: per layer and expert,
least squares of the log of the expert's output size on the router's input, over the tokens the
static routing sends to it.

The sizes are read out of the graph itself, so every expert-section form is served the same way:
per layer, the graph up to the routed experts' sum (`section_output`) is run with the router's
weights and ids replaced by inputs, once per slot with only that slot's expert kept at weight 1,
so the sum is that expert's output. Layers before it route statically, so each layer sees the
hidden states it sees in the static model. Cost: k runs of the graph up to each layer on at
most MAX_TOKENS calibration tokens."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import MoeExportError
from ..conversion.probe import router_input
from ..conversion.record import Routing
from ..model.files import Progress
from ..model.graph import GraphIndex, NodeBuilder, prune, reads_of, rename_reads
from .runtime import batches, run_guarded, session_from_proto

RIDGE = 1.0       # the least squares' regularizer, in units of the inputs' mean square
MAX_TOKENS = 32768  # per layer: a fit of H + 1 unknowns per expert needs no more
MIN_TOKENS = 8    # an expert routed fewer tokens than this gets a constant: its mean log size
_SLOT = "moe_export.probe.slot"
# where a layer's output joins the hidden states: an Add, or ORT's fusion of it with the next norm
RESIDUAL_ADDS = ("Add", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def section_output(ix: GraphIndex, r) -> str:
    """The routed experts' weighted sum of router r: forward from its weights and ids, the routed
    operand of the first Add whose other operand is computed from the graph's inputs without
    them (the residual stream, or a shared expert's output)."""
    live = {i.name for i in ix.graph.input} - set(ix.initializers)
    routed = {r.weights, r.indices}
    for n in ix.graph.node:
        reads = reads_of([n])
        if reads & routed:
            if n.op_type in RESIDUAL_ADDS and len(n.input) >= 2:
                mine = [i in routed for i in n.input[:2]]
                if mine[0] != mine[1] and n.input[mine[0]] in live:
                    return n.input[mine[1]]
            routed.update(o for o in n.output if o)
        if reads & live:
            live.update(o for o in n.output if o)
    raise MoeExportError(f"policy probe: the output of {r.layer}'s experts is not added to the hidden states in "
                         "this graph, so their sizes cannot be read out")


def _layer_graph(model, r, x, y):
    """A copy of `model` running only up to layer r's expert sum `y`, whose expert section is fed
    one slot of the router's: the expert in slot `_SLOT` (an input) at weight 1, the others
    dropped. It outputs y, the router input x and the router's (static) ids."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    ids, w = f"{_SLOT}.ids", f"{_SLOT}.weights"
    rename_reads(g, {r.weights: w, r.indices: ids})
    b = NodeBuilder("moe_export/probe_slot")
    mask = b.op("Equal", [b.const(np.arange(r.attrs.width, dtype=np.int64)), _SLOT])
    b.nodes.append(helper.make_node("Where", [mask, r.indices, b.const(np.int64(r.num_experts))], [ids]))
    one = b.op("Pow", [r.weights, b.const(np.float32(0.0))])  # ones of the weights' type and shape
    b.nodes.append(helper.make_node("Where", [mask, one, b.op("Sub", [one, one])], [w]))
    last = max(i for i, n in enumerate(g.node) if {r.weights, r.indices} & set(n.output))
    outs = [y, x, r.indices]
    names = [f"{_SLOT}.out{i}" for i in range(len(outs))]
    b.nodes += [helper.make_node("Identity", [t], [o]) for t, o in zip(outs, names)]
    nodes = list(g.node)
    kept = prune(nodes[:last + 1] + b.nodes + nodes[last + 1:], set(names))
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(b.inits)
    del g.output[:]
    g.output.extend(helper.make_empty_tensor_value_info(o) for o in names)
    g.input.append(helper.make_tensor_value_info(_SLOT, onnx.TensorProto.INT64, []))
    return m, names


def expert_sizes(model, base_dir, feeds, r, progress=None):
    """Layer r's router inputs x [N, H] (float32), static expert ids [N, k] and each slot's expert
    output norm [N, k] (float64), on at most MAX_TOKENS tokens of `feeds`."""
    ix = GraphIndex(model.graph)
    x_name, y_name = router_input(ix, r.logits), section_output(ix, r)
    m, names = _layer_graph(model, r, x_name, y_name)
    sess = session_from_proto(m, base_dir)
    k = r.k
    xs, ids, norms, seen = [], [], [], 0
    for rows in batches(model, feeds):
        try:
            y, x, idx = run_guarded(sess, names, rows | {_SLOT: np.array(0, np.int64)})
        except MoeExportError:
            raise
        except Exception as e:  # an expert section that does not read the weights per slot
            raise MoeExportError(f"policy probe: {r.layer}'s expert outputs cannot be read out of this graph "
                                 f"(onnxruntime: {str(e).splitlines()[0][:200]})") from None
        H = x.shape[-1]
        x, idx = x.reshape(-1, H), idx.reshape(-1, idx.shape[-1])[:, :k]
        if idx.shape[0] != x.shape[0] or y.size != x.size:
            raise MoeExportError(f"policy probe: {r.layer}'s router input ({x.shape[0]} x {H}), ids ({idx.shape[0]} "
                                 f"tokens) and expert sum {y_name!r} ({y.size} values) do not match")
        out = np.zeros(idx.shape, np.float64)
        for j in range(k):
            if j:
                y = run_guarded(sess, names[:1], rows | {_SLOT: np.array(j, np.int64)})[0]
            out[:, j] = np.linalg.norm(y.reshape(-1, H).astype(np.float64), axis=1)
        xs.append(x.astype(np.float32))
        ids.append(idx)
        norms.append(out)
        seen += x.shape[0]
        if progress is not None:
            progress()
        if seen >= MAX_TOKENS:
            break
    return np.concatenate(xs)[:MAX_TOKENS], np.concatenate(ids)[:MAX_TOKENS], np.concatenate(norms)[:MAX_TOKENS]


def fit(x, ids, norms, num_experts):
    """(P [H, E], b [E]): per expert e, ridge least squares of log norm on [x, 1] over the
    (token, slot) pairs routed to e."""
    N, H = x.shape
    logn = np.log(np.maximum(norms, 1e-30))
    ridge = RIDGE * max(float(np.mean(np.square(x, dtype=np.float64))), 1e-12)
    P, b = np.zeros((H, num_experts), np.float32), np.zeros(num_experts, np.float32)
    routed = ids < num_experts
    fallback = float(logn[routed].mean()) if routed.any() else 0.0
    for e in range(num_experts):
        tok, slot = np.nonzero(ids == e)
        if len(tok) < MIN_TOKENS:
            b[e] = float(logn[tok, slot].mean()) if len(tok) else fallback
            continue
        X = np.concatenate([x[tok].astype(np.float64), np.ones((len(tok), 1))], axis=1)
        reg = ridge * np.eye(H + 1)
        reg[H, H] = 0.0  # (the bias is not shrunk)
        sol = np.linalg.solve(X.T @ X + reg, X.T @ logn[tok, slot])
        P[:, e], b[e] = sol[:H], sol[H]
    return P, b


def fit_probes(model, base_dir, feeds) -> dict:
    """{layer: (P, b)} for every router of the converted (static) `model`, fitted on `feeds`."""
    routing = Routing.read(model)
    for r in routing.routers:
        if r.static_only:
            raise MoeExportError(f"policy probe drops slots: {r.static_only}")
    probes = {}
    n = len(batches(model, feeds))
    with Progress("fitting the probes of the experts' output sizes", len(routing.routers) * n) as bar:
        done = [0]

        def tick():
            done[0] += 1
            bar.update(done[0])
        for r in routing.routers:
            x, ids, norms = expert_sizes(model, base_dir, feeds, r, tick)
            probes[r.layer] = fit(x, ids, norms, r.num_experts)
    return probes
