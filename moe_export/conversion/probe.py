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
from ..model.graph import GraphIndex, NodeBuilder, Surgery
from .record import Routing

PREFIX = "moe_export/probe"


def router_input(ix: GraphIndex, logits: str) -> str:
    """The tensor the gate's matmul reads (the hidden states the experts read too): the input of
    the nearest MatMul or Gemm of a weight above the router logits, within a few nodes (views,
    casts, a bias, a score function such as DeepSeek-V4's sqrt(softplus(x)))."""
    def weight(t):
        while (p := ix.producer.get(t)) is not None and p.op_type in ("Cast", "Transpose"):
            t = p.input[0]
        return t in ix.initializers
    frontier, seen = [logits], {logits}
    for _ in range(8):
        nxt = []
        for t in frontier:
            p = ix.producer.get(t)
            if p is None:
                continue
            if p.op_type in ("MatMul", "Gemm", "MatMulNBits") and weight(p.input[1]) and not weight(p.input[0]):
                if not (p.op_type == "Gemm" and any(a.name == "transA" and a.i for a in p.attribute)):
                    return p.input[0]
            nxt += [i for i in p.input if i and i not in seen and ix.const(i) is None and i not in ix.initializers]
            seen.update(nxt)
        frontier = nxt
    raise MoeExportError(f"policy probe reads the router's input, and the logits {logits!r} do not come from a "
                         "MatMul or Gemm of it")


def probe_sizes(b: NodeBuilder, x: str, probe, like: str, ftype: int) -> str:
    """Nodes computing x P + b shaped as the router logits `like`, of the router's float type."""
    P, bias = (np.asarray(v, dtype=np.float32) for v in probe)
    if ftype != TensorProto.FLOAT:
        x = b.op("Cast", [x], to=TensorProto.FLOAT)
    s = b.op("Add", [b.op("MatMul", [x, b.const(P, hint="probe_weight")]), b.const(bias, hint="probe_bias")])
    s = b.op("Reshape", [s, b.op("Shape", [like])])
    return b.op("Cast", [s], to=ftype) if ftype != TensorProto.FLOAT else s


def zero_bias(b: NodeBuilder, num_experts: int, ftype: int) -> str:
    """A correction bias of zeros, which ranks as none does: the op takes sizes as its third input."""
    z = b.const(np.zeros(num_experts, np.float32), hint="no_bias")
    return b.op("Cast", [z], to=ftype) if ftype != TensorProto.FLOAT else z


def check_probe(probe, hidden: int | None, num_experts: int, layer: str) -> None:
    P, bias = (np.asarray(v) for v in probe)
    if P.ndim != 2 or P.shape[1] != num_experts or bias.shape != (num_experts,) or \
            (hidden is not None and P.shape[0] != hidden):
        raise MoeExportError(f"the probe of {layer} is [{', '.join(map(str, P.shape))}] + [{bias.size}]; the router "
                             f"needs [{hidden or 'H'}, {num_experts}] + [{num_experts}]")


def attach_probes(model, probes: dict) -> None:
    """Gives the DynamicRouter nodes of converted `model` the probes {layer: (P [H, E], b [E])} as
    their sizes input, in place (replacing one attached before)."""
    from .rewrite import router_nodes  # (rewrite imports this module)

    routing = Routing.read(model)
    ix = GraphIndex(model.graph)
    surgery = Surgery(model.graph)
    for r, node in zip(routing.routers, router_nodes(model, routing)):
        if r.layer not in probes:
            continue
        if node is None:
            raise MoeExportError(f"router {r.layer}: its DynamicRouter node is missing from the graph")
        x = router_input(ix, r.logits)
        check_probe(probes[r.layer], ix.static_last_dim(x), r.num_experts, r.layer)
        prefix = f"{PREFIX}/{r.layer}"
        surgery.remove(n.name for n in model.graph.node if n.name.startswith(prefix + "/"))
        b = NodeBuilder(prefix)
        ftype = ix.elem_type(node.output[0]) or ix.elem_type(node.input[0]) or TensorProto.FLOAT
        r.sizes = probe_sizes(b, x, probes[r.layer], node.input[0], ftype)
        bias = r.bias or zero_bias(b, r.num_experts, ftype)
        del node.input[1:]
        node.input.extend([bias, r.sizes])
        surgery.insert(b, before=node.name)
    surgery.apply()
    routing.write(model)
