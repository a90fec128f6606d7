"""A stand-in for each dropped expert, in the graph: where the router drops a pair (token t, expert
e) that the static routing takes, the layer's output gains w S_e(x_t) instead of nothing, with

    S_e(x) = c_e + x G_e V_e   (c [E, H], G [E, H, r], V [E, r, H]: rank r; r = 0 is the mean alone)

fitted on calibration data (run/stand_in.py) and w the pair's static weight. A dropped expert
then costs what its stand-in misses, not its whole output (BENCHMARKS.md, "The stand-in, built"):
at rank 4 the budget search cuts mixtral8's routed pairs by -41.2% within +1% (-39.7% without),
gptoss16's by -58.4% (-49.0%).

The dropped pairs are the static routing's less the router's: a second DynamicRouter node, static,
on the same logits (router-sized work), gives the static pairs and weights. The stand-in is
computed for the dropped pairs only (NonZero, then gathers of each pair's factors), 2 r H + H
multiply-adds each, in standard ONNX ops (opset 11 and up), so it runs wherever the graph does.
The kept experts keep their static weights (renormalize 0): the stand-in takes the dropped weight."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..errors import MoeExportError, UsageError
from ..model.graph import (GraphIndex, NodeBuilder, Surgery, drop_named, opset_version, rename_reads,
                           share_constants)
from ..op.schema import DOMAIN, OP_TYPE, node_attributes
from .probe import cast_like, router_input, section_output
from .record import Routing

PREFIX = "moe_export/stand_in"
MIN_OPSET = 11  # NonZero, GatherND, ScatterND


def check_stand_in(layer, v, hidden=None, num_experts=None) -> tuple:
    """(c [E, H], G [E, H, r], V [E, r, H]) as float32 arrays, finite, their shapes agreeing (with
    the router's H and E where known)."""
    try:
        c, G, V = (np.asarray(x, dtype=np.float32) for x in v)
    except (TypeError, ValueError):
        raise UsageError(f"stand_ins[{layer!r}] must be (c [E, H], G [E, H, r], V [E, r, H]) of numbers") from None
    E, H = c.shape if c.ndim == 2 else (None, None)
    if c.ndim != 2 or G.ndim != 3 or V.ndim != 3 or G.shape[:2] != (E, H) or V.shape != (E, G.shape[2], H) \
            or (hidden is not None and H != hidden) or (num_experts is not None and E != num_experts):
        raise UsageError(f"stand_ins[{layer!r}] must be (c [E, H], G [E, H, r], V [E, r, H]) for this router "
                         f"(E {num_experts or 'E'}, H {hidden or 'H'}), got shapes {c.shape}, {G.shape}, {V.shape}")
    if not all(np.isfinite(a).all() for a in (c, G, V)):
        raise UsageError(f"stand_ins[{layer!r}] must be finite")
    return c, G, V


def _stand_in_sum(b: NodeBuilder, x, static_w, static_ids, k, ids, width, stand_in, y):
    """Nodes computing, per token, the sum over its dropped pairs of w S_e(x), shaped as the
    experts' sum `y` (in float32)."""
    c, G, V = stand_in
    E, H = c.shape
    i64 = b.i64
    sid = b.op("Reshape", [static_ids, i64([-1, k])])  # [T, k]
    sw = b.op("Reshape", [b.op("Cast", [static_w], to=TensorProto.FLOAT), i64([-1, k])])
    did = b.op("Reshape", [ids, i64([-1, width])])  # [T, width], E where dropped
    # kept[t, e] (column E: the dropped slots' id), then at each static slot: was it kept?
    kept = b.op("ScatterElements", [b.filled(sid, E + 1, 0, TensorProto.INT32), did,
                                    b.filled(did, width, 1, TensorProto.INT32)], axis=1)
    dropped = b.op("Equal", [b.op("GatherElements", [kept, sid], axis=1), b.const(np.int32(0))])
    pairs = b.op("Transpose", [b.op("NonZero", [dropped])], perm=[1, 0])  # [P, 2]: (token, slot)
    e = b.op("GatherND", [sid, pairs])
    w = b.op("Reshape", [b.op("GatherND", [sw, pairs]), i64([-1, 1])])
    xs = b.op("Reshape", [b.op("Cast", [x], to=TensorProto.FLOAT), i64([-1, H])])
    xp = b.op("Gather", [xs, b.op("Gather", [pairs, i64(0)], axis=1)], axis=0)
    s = b.op("Gather", [b.const(c, hint="stand_in_mean"), e], axis=0)
    if G.shape[2]:
        z = b.op("MatMul", [b.op("Reshape", [xp, i64([-1, 1, H])]), b.op("Gather", [b.const(G, hint="stand_in_in"), e])])
        lin = b.op("MatMul", [z, b.op("Gather", [b.const(V, hint="stand_in_out"), e])])
        s = b.op("Add", [s, b.op("Reshape", [lin, i64([-1, H])])])
    # back to (token, slot) places (each once), then summed over the slots by a matmul with ones
    zeros = b.filled(b.op("Reshape", [sid, i64([-1, k, 1])]), H, 0.0, TensorProto.FLOAT)  # [T, k, H]
    placed = b.op("ScatterND", [zeros, pairs, b.op("Mul", [s, w])])
    per_token = b.op("MatMul", [b.op("Transpose", [placed], perm=[0, 2, 1]), b.const(np.ones((k, 1), np.float32))])
    return b.op("Reshape", [per_token, b.op("Shape", [y])])


def _static_twin(b: NodeBuilder, node, r):
    """A static DynamicRouter on the router node's logits and bias: the pairs nothing drops."""
    a = r.with_policy("static", 0.0, 1.0, min_experts=1, max_experts=r.k).resolved()
    w, ids = b.name("static_weights"), b.name("static_indices")
    b.nodes.append(helper.make_node(OP_TYPE, list(node.input[:2]) if r.bias else [node.input[0]], [w, ids],
                                    name=b.name("static_twin"), domain=DOMAIN, **node_attributes(a)))
    return w, ids


def detach_stand_ins(model) -> None:
    """Removes every stand-in from converted `model`, in place: its layers' outputs read the
    experts' sum again."""
    routing = Routing.read(model)
    with_one = [r for r in (routing.routers if routing else []) if r.stand_in]
    if not with_one:
        return
    drop_named(model.graph, (f"{PREFIX}/",))
    rename_reads(model.graph, {r.stand_in["sum"]: r.stand_in["of"] for r in with_one})
    for r in with_one:
        r.stand_in = None
    routing.write(model)


def attach_stand_ins(model, stand_ins: dict) -> None:
    """Adds to converted `model` the stand-ins {layer: (c, G, V)}, in place; every stand-in attached
    before is removed first."""
    from .rewrite import router_nodes  # (rewrite imports this module)

    detach_stand_ins(model)
    routing = Routing.read(model)
    if routing is None or routing.portable:
        raise MoeExportError("--stand-in needs the DynamicRouter nodes of a conversion that is not --portable")
    opset = opset_version(model)
    if opset < MIN_OPSET:
        raise MoeExportError(f"--stand-in needs ONNX opset >= {MIN_OPSET}, the model has {opset}")
    ix = GraphIndex(model.graph)
    surgery = Surgery(model.graph)
    for r, node in zip(routing.routers, router_nodes(model, routing)):
        if r.layer not in stand_ins:
            continue
        if node is None:
            raise MoeExportError(f"router {r.layer}: its DynamicRouter node is missing from the graph")
        x, y = router_input(ix, r.logits), section_output(ix, r)
        si = check_stand_in(r.layer, stand_ins[r.layer], ix.static_last_dim(x), r.num_experts)
        b = NodeBuilder(f"{PREFIX}/{r.layer}")
        sw, sid = _static_twin(b, node, r)
        s = _stand_in_sum(b, x, sw, sid, r.k, r.indices, r.attrs.width, si, y)
        ftype = ix.elem_type(y) or ix.elem_type(x)  # (the experts' sum has the hidden states' type)
        if ftype is None and opset < 15:
            raise MoeExportError(f"--stand-in: the type of {r.layer}'s expert output is not stated in this opset-{opset} "
                                 "graph (no value_info); run onnx shape inference on it first")
        total = b.op("Add", [y, cast_like(b, s, y, ftype or TensorProto.FLOAT, opset)], hint="with_stand_in")
        surgery.rewire(y, total)
        surgery.insert(b, after=ix.producer[y].name)
        r.stand_in = {"rank": int(si[1].shape[2]), "hidden": int(si[0].shape[1]), "of": y, "sum": total}
        r.check_drops(r.attrs)
    surgery.apply()
    share_constants(model.graph, f"{PREFIX}/")
    routing.write(model)
