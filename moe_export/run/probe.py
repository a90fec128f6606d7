"""Fitting policy probe's probes (conversion/probe.py) on calibration data: per layer and expert,
least squares of the log of the expert's output size on the router's input, over the tokens the
static routing sends to it.

The sizes are read out of the graph itself, so every expert-section form is served the same way:
per layer, the graph up to the routed experts' sum (`section_output`) is run with the router's
weights and ids replaced by inputs, once per slot with only that slot's expert kept at weight 1,
so the sum is that expert's output. Layers before it route statically, so each layer sees the
hidden states it sees in the static model; a run with every slot checks, on the first batch,
that the slots add up to the section's output. Cost: k + 1 runs of the graph up to each layer on
at most MAX_TOKENS calibration tokens, and per expert a least-squares solve of the smaller of H
and its token count, cubed."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import MoeExportError
from ..conversion.probe import router_input
from ..conversion.record import Routing
from ..model.files import Progress
from ..model.graph import (GraphIndex, NodeBuilder, drop_unused_initializers, input_dependent, prune, reads_of,
                           rename_reads)
from .runtime import batches, run_guarded, session_from_proto

RIDGE = 1.0       # the least squares' regularizer, in units of the inputs' mean square
MAX_TOKENS = 32768  # per layer, so the read-out's memory and the fit's time stay bounded at any data size
MIN_TOKENS = 8    # an expert routed fewer tokens than this gets a constant: its mean log size
_SLOT = "moe_export.probe.slot"
# where a layer's output joins the hidden states: an Add, or ORT's fusion of it with the next norm
RESIDUAL_ADDS = ("Add", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def section_output(ix: GraphIndex, r) -> str:
    """The routed experts' weighted sum of router r: forward from its weights and ids, the routed
    operand of the first Add whose other operand is computed from the values of the graph's
    inputs without them (the residual stream, or a shared expert's output; not zeros shaped like
    the tokens, which a per-expert loop exported by TorchScript adds each expert's rows to)."""
    live, routed = input_dependent(ix.graph), {r.weights, r.indices}
    for n in ix.graph.node:
        if reads_of([n]) & routed:
            if n.op_type in RESIDUAL_ADDS and len(n.input) >= 2:
                mine = [i in routed for i in n.input[:2]]
                if mine[0] != mine[1] and n.input[mine[0]] in live:
                    return n.input[mine[1]]
            routed.update(o for o in n.output if o)
    raise MoeExportError(f"policy probe: the output of {r.layer}'s experts is not added to the hidden states in "
                         "this graph, so their sizes cannot be read out")


def _layer_graph(model, r, x, y):
    """A copy of `model` running only up to layer r's expert sum `y`, whose expert section is fed
    one slot of the router's: the expert in slot `_SLOT` (an input) at weight 1, the others
    dropped; slot -1 feeds every slot at its weight, the static routing. It outputs y, the
    router input x, and the router's (static) weights and ids."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    ids, w = f"{_SLOT}.ids", f"{_SLOT}.weights"
    rename_reads(g, {r.weights: w, r.indices: ids})
    b = NodeBuilder("moe_export/probe_slot")
    every = b.op("Less", [_SLOT, b.const(np.int64(0))])
    one_slot = b.op("Equal", [b.const(np.arange(r.attrs.width, dtype=np.int64)), _SLOT])
    b.nodes.append(helper.make_node("Where", [b.op("Or", [one_slot, every]), r.indices,
                                              b.const(np.int64(r.num_experts))], [ids]))
    one = b.op("Pow", [r.weights, b.const(np.float32(0.0))])  # ones of the weights' type and shape
    b.nodes.append(helper.make_node("Where", [every, r.weights, b.op("Where", [one_slot, one, b.op("Sub", [one, one])])],
                                    [w]))
    last = max(i for i, n in enumerate(g.node) if {r.weights, r.indices} & set(n.output))
    outs = [y, x, r.weights, r.indices]
    names = [f"{_SLOT}.out{i}" for i in range(len(outs))]
    b.nodes += [helper.make_node("Identity", [t], [o]) for t, o in zip(outs, names)]
    nodes = list(g.node)
    kept = prune(nodes[:last + 1] + b.nodes + nodes[last + 1:], set(names))
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(b.inits)
    drop_unused_initializers(g)
    del g.output[:]
    g.output.extend(helper.make_empty_tensor_value_info(o) for o in names)
    g.input.append(helper.make_tensor_value_info(_SLOT, onnx.TensorProto.INT64, []))
    return m, names


def expert_sizes(model, base_dir, feeds, r, progress=None, ix=None):
    """Layer r's router inputs x [N, H] (float32), static expert ids [N, k] and each slot's expert
    output norm [N, k] (float64), on at most MAX_TOKENS tokens of `feeds`. ix: the model's
    GraphIndex, where the caller has one."""
    ix = ix or GraphIndex(model.graph)
    x_name, y_name = router_input(ix, r.logits), section_output(ix, r)
    m, names = _layer_graph(model, r, x_name, y_name)
    sess = session_from_proto(m, base_dir)
    k = r.k
    unread = (f"policy probe: {r.layer}'s expert outputs cannot be read out of this graph: its expert section "
              "does not compute the router's slots one at a time")

    def run(rows, slot, outputs):
        try:
            return run_guarded(sess, outputs, rows | {_SLOT: np.array(slot, np.int64)})
        except MoeExportError:
            raise
        except Exception as e:
            raise MoeExportError(f"{unread} (onnxruntime: {str(e).splitlines()[0][:160]})") from None
    xs, ids, norms, seen = [], [], [], 0
    for rows in batches(model, feeds):
        whole, x, w, idx = run(rows, -1, names)
        H = x.shape[-1]
        x, w, idx = x.reshape(-1, H), w.reshape(-1, w.shape[-1])[:, :k], idx.reshape(-1, idx.shape[-1])[:, :k]
        if idx.shape[0] != x.shape[0] or whole.size != x.size:
            raise MoeExportError(f"{unread} (its router input has {x.shape[0]} rows for {idx.shape[0]} routed tokens "
                                 f"and an expert sum of {whole.size // max(H, 1)})")
        slots = [run(rows, j, names[:1])[0].reshape(-1, H).astype(np.float64) for j in range(k)]
        if not seen:  # the read-out is this form's only if the slots add up to the section's output
            total = sum(w[:, j:j + 1].astype(np.float64) * slots[j] for j in range(k))
            ref = whole.reshape(-1, H).astype(np.float64)
            read = {int(e) for j, y in enumerate(slots) for e in idx[np.abs(y).max(axis=1) > 0, j]}
            # one expert alone reading anything: the first partial sum of a per-expert accumulation,
            # not experts that are dead (zero weights, which the fit takes as never worth keeping)
            if len(read) < 2 <= len(np.unique(idx)) or \
                    not np.allclose(total, ref, rtol=1e-2, atol=1e-3 * max(float(np.abs(ref).max()), 1e-30)):
                raise MoeExportError(unread)
        xs.append(x.astype(np.float32))
        ids.append(idx)
        norms.append(np.stack([np.linalg.norm(y, axis=1) for y in slots], axis=1))
        seen += x.shape[0]
        if progress is not None:
            progress()
        if seen >= MAX_TOKENS:
            break
    return np.concatenate(xs)[:MAX_TOKENS], np.concatenate(ids)[:MAX_TOKENS], np.concatenate(norms)[:MAX_TOKENS]


def fit(x, ids, norms, num_experts):
    """(P [H, E], b [E]): per expert e, ridge least squares of log norm on x plus an unshrunk
    bias, over the (token, slot) pairs routed to e; solved in the smaller of the two forms, so an
    expert seeing fewer tokens than H costs their count cubed, not H's."""
    H = x.shape[1]
    logn = np.log(np.maximum(norms, 1e-30))
    ridge = RIDGE * max(float(np.mean(np.square(x, dtype=np.float64))), 1e-12)
    P, b = np.zeros((H, num_experts), np.float32), np.zeros(num_experts, np.float32)
    routed = (ids < num_experts) & (norms > 0)
    fallback = float(logn[routed].mean()) if routed.any() else 0.0
    for e in range(num_experts):
        tok, slot = np.nonzero((ids == e) & (norms > 0))  # (a zero output has no log size to fit)
        if not len(tok) and (ids == e).any():
            b[e] = np.log(1e-30)  # an expert whose output is always zero: dropping it costs nothing
            continue
        if len(tok) < MIN_TOKENS:
            b[e] = float(logn[tok, slot].mean()) if len(tok) else fallback
            continue
        X, y = x[tok].astype(np.float64), logn[tok, slot]
        mx, my = X.mean(axis=0), y.mean()
        X, y = X - mx, y - my  # (centred: the bias is the means' difference, not shrunk)
        if len(tok) >= H:
            p = np.linalg.solve(X.T @ X + ridge * np.eye(H), X.T @ y)
        else:
            p = X.T @ np.linalg.solve(X @ X.T + ridge * np.eye(len(tok)), y)
        P[:, e], b[e] = p, my - mx @ p
    return P, b


def check_width(routing) -> None:
    """Refuses routers wider than their k (converted or calibrated with --max-experts above k):
    policy probe chooses among the static k."""
    for r in routing.routers:
        if r.attrs.width > r.k:
            raise MoeExportError(f"policy probe keeps at most the graph's k={r.k} experts, and {r.layer}'s router is "
                                 f"{r.attrs.width} wide (--max-experts {r.attrs.width}); calibrate the original model, "
                                 "or use another policy")


def fit_probes(model, base_dir, feeds) -> dict:
    """{layer: (P, b)} for every router of the converted (static) `model`, fitted on `feeds`."""
    routing = Routing.read(model)
    check_width(routing)
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
        ix = GraphIndex(model.graph)
        for r in routing.routers:
            x, ids, norms = expert_sizes(model, base_dir, feeds, r, tick, ix)
            probes[r.layer] = fit(x, ids, norms, r.num_experts)
    return probes
