"""Policy probe's input in the graph: each router's `sizes`, a linear probe of the log of every
expert's output size on the router's own input, x P + b (an [H, E] matrix, the gate's own size:
one more router-sized matmul per token, no expert FLOPs). The router logits do not tell how large
a dropped expert's output would have been, and that size decides what dropping it costs
(BENCHMARKS.md, "What the router does not know"); the probe is fitted on calibration data
(run/probe.py)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..errors import MoeExportError
from ..model.graph import (GraphIndex, NodeBuilder, Surgery, drop_named, input_dependent, opset_version,
                           reads_of)
from .record import Routing

PREFIX = "moe_export/probe"
# where a layer's output joins the hidden states: an Add, or ORT's fusion of it with the next norm
RESIDUAL_ADDS = ("Add", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def router_input(ix: GraphIndex, logits: str) -> str:
    """The tensor the gate's matmul reads (the hidden states the experts read too): the other
    operand of the nearest MatMul or Gemm above the router logits whose one operand is a weight
    (computed from constants only: an initializer, or one dequantized, cast or transposed), within
    a few nodes (views, casts, a bias, a score function such as DeepSeek-V4's sqrt(softplus(x)))."""
    live = input_dependent(ix.graph)
    constant = lambda t: t not in live
    frontier, seen = [logits], {logits}
    for _ in range(8):
        nxt = []
        for t in frontier:
            p = ix.producer.get(t)
            if p is None:
                continue
            if p.op_type in ("MatMul", "Gemm", "MatMulNBits"):
                gemm_ta = p.op_type == "Gemm" and any(a.name == "transA" and a.i for a in p.attribute)
                if constant(p.input[1]) and not constant(p.input[0]) and not gemm_ta:
                    return p.input[0]
                break  # the nearest matmul is not the gate's: refuse rather than probe another tensor
            nxt += [i for i in p.input if i and i not in seen and not constant(i)]
            seen.update(nxt)
        else:
            frontier = nxt
            continue
        break
    raise MoeExportError(f"policy probe reads the router's input, and the logits {logits!r} do not come from a "
                         "MatMul or Gemm of it by a weight")


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
    raise MoeExportError(f"the output of {r.layer}'s experts is not added to the hidden states in this graph, so "
                         "it cannot be read out (policy probe) nor stood in for (--stand-in)")


def cast_like(b: NodeBuilder, t: str, like: str, ftype: int, opset: int) -> str:
    """Float32 `t` in the type of `like` (whose type a graph without value_info may not state)."""
    if opset >= 15:
        return b.op("CastLike", [t, like])
    return b.op("Cast", [t], to=ftype) if ftype != TensorProto.FLOAT else t


def probe_sizes(b: NodeBuilder, x: str, probe, like: str, ftype: int, opset: int) -> str:
    """Nodes computing x P + b in float32 (the gate's matmul may run in another type than its
    logits), shaped and typed as the router logits `like`."""
    P, bias = (np.asarray(v, dtype=np.float32) for v in probe)
    x = b.op("Cast", [x], to=TensorProto.FLOAT)
    s = b.op("Add", [b.op("MatMul", [x, b.const(P, hint="probe_weight")]), b.const(bias, hint="probe_bias")])
    return cast_like(b, b.op("Reshape", [s, b.op("Shape", [like])]), like, ftype, opset)


def zero_bias(b: NodeBuilder, num_experts: int, like: str, ftype: int, opset: int) -> str:
    """A correction bias of zeros, which ranks as none does: the op takes sizes as its third input."""
    return cast_like(b, b.const(np.zeros(num_experts, np.float32), hint="no_bias"), like, ftype, opset)


def check_probe(probe, hidden: int | None, num_experts: int, layer: str) -> None:
    P, bias = (np.asarray(v) for v in probe)
    if P.ndim != 2 or P.shape[1] != num_experts or bias.shape != (num_experts,) or \
            (hidden is not None and P.shape[0] != hidden):
        raise MoeExportError(f"the probe of {layer} is [{', '.join(map(str, P.shape))}] + [{bias.size}]; the router "
                             f"needs [{hidden or 'H'}, {num_experts}] + [{num_experts}]")


def build_probe(ix: GraphIndex, layer: str, logits: str, like: str, bias: str | None, probe, num_experts: int,
                ftype: int, opset: int) -> tuple:
    """(nodes under this layer's probe prefix, sizes, the bias the router reads): the probe of the
    gate whose logits are `logits`, for a router reading `like`."""
    x = router_input(ix, logits)
    check_probe(probe, ix.static_last_dim(x), num_experts, layer)
    b = NodeBuilder(f"{PREFIX}/{layer}")
    sizes = probe_sizes(b, x, probe, like, ftype, opset)
    return b, sizes, bias or zero_bias(b, num_experts, like, ftype, opset)


def attach_probes(model, probes: dict) -> None:
    """Gives the DynamicRouter nodes of converted `model` the probes {layer: (P [H, E], b [E])} as
    their sizes input, in place (replacing one attached before)."""
    from .rewrite import router_nodes  # (rewrite imports this module)

    routing = Routing.read(model)
    # a probe attached before goes first: the new one's nodes take the same names
    drop_named(model.graph, tuple(f"{PREFIX}/{r.layer}/" for r in routing.routers if r.layer in probes))
    nodes = router_nodes(model, routing)
    ix = GraphIndex(model.graph)
    surgery = Surgery(model.graph)
    for r, node in zip(routing.routers, nodes):
        if r.layer not in probes:
            continue
        if node is None:
            raise MoeExportError(f"router {r.layer}: its DynamicRouter node is missing from the graph")
        ftype = ix.elem_type(node.input[0]) or ix.elem_type(node.output[0]) or TensorProto.FLOAT
        b, r.sizes, bias = build_probe(ix, r.layer, r.logits, node.input[0], r.bias, probes[r.layer],
                                       r.num_experts, ftype, opset_version(model))
        del node.input[1:]
        node.input.extend([bias, r.sizes])
        surgery.insert(b, before=node.name)
    surgery.apply()
    routing.write(model)
