"""Group a batched expert section by expert, so only routed (token, expert) pairs are computed.

transformers 5.x `batched_mm` graphs compute every (token, slot) pair: each pair gathers its
expert's weight matrices (GatherND over [E, ...] tables by the flat expert ids) and runs a batched
matmul, so a dropped slot still costs a full expert and the gathers copy weights per pair. This
pass clones the section once per expert, fed only that expert's pairs (NonZero(ids == e)); gathered
tables become the expert's own slice (Gather(table, e): constant-folded by ONNX Runtime at load,
never read here), batched matmuls become one GEMM per expert, and the contributions are scattered
back to their pair rows before the graph's own per-token sum. A dropped slot (id = E) matches no
expert and costs nothing. Layers whose section does not have this shape are left as they are.
"""
from __future__ import annotations

import numpy as np
import onnx

from .graph import GraphIndex, NodeBuilder, Surgery, attr, node_axes

class _Skip(Exception):
    """The section is not of the batched shape this pass understands."""


def _flat(ix, t):
    """The consumer Reshape(t, [-1]) (through our clamp), i.e. the tensor indexed by pair."""
    for c in ix.consumers_of(t):
        if c.op_type == "Min":
            r = _flat(ix, c.output[0])
            if r:
                return r
        if c.op_type == "Reshape":
            shape = ix.const(c.input[1])
            if shape is not None and shape.reshape(-1).tolist() == [-1]:
                return c.output[0]
    return None


def _section(ix, ids_flat, w_flat):
    """Nodes from the flat ids/weights to the weighted pair contributions, in graph order."""
    wmul = None
    for u in ix.consumers_of(w_flat):
        if u.op_type == "Unsqueeze":
            wmul = next((m for m in ix.consumers_of(u.output[0]) if m.op_type == "Mul"), None)
    if wmul is None:
        raise _Skip("weights are not applied by one Mul")
    inside, stack = set(), [ids_flat, w_flat]
    while stack:
        t = stack.pop()
        for c in ix.consumers_of(t):
            if c.name in inside:
                continue
            inside.add(c.name)
            if c is not wmul:
                stack.extend(c.output)
    nodes = [n for n in ix.graph.node if n.name in inside]
    if any(o in ix.graph_outputs for n in nodes for o in n.output):
        raise _Skip("a pair tensor is a graph output")
    feeds, stack = set(), [wmul]  # every section node must feed the weighted contributions
    while stack:
        n = stack.pop()
        if n.name in feeds:
            continue
        feeds.add(n.name)
        stack.extend(ix.producer[t] for t in n.input if t in ix.producer and ix.producer[t].name in inside)
    if feeds != inside:
        raise _Skip("the section's tensors are used outside it")
    return nodes, wmul


# The external-data location of an expert's own weight matrix that files.Output writes when the
# model is saved (from the [E, a, b] table it is sliced from, one matrix at a time).
EXPERT_SLICE = "moe_export:expert-slice"


def expert_weight(table: onnx.TensorProto, e: int, transpose: bool) -> onnx.TensorProto:
    """Expert e's matrix of an [E, a, b] weight table as an initializer of its own ([b, a] when
    transposed), the form weight-only quantizers look for (a MatMul whose B is an initializer).
    An in-memory table is sliced here; an external one is written when the model is saved."""
    from onnx import numpy_helper

    name = f"{table.name}/expert_{e}" + ("_T" if transpose else "")
    a, b = table.dims[1], table.dims[2]
    if table.data_location != onnx.TensorProto.EXTERNAL:
        w = numpy_helper.to_array(table)[e]
        return numpy_helper.from_array(np.ascontiguousarray(w.T if transpose else w), name)
    t = onnx.TensorProto(name=name, data_type=table.data_type, dims=[b, a] if transpose else [a, b])
    t.data_location = onnx.TensorProto.EXTERNAL
    info = {x.key: x.value for x in table.external_data}
    size = onnx.helper.tensor_dtype_to_np_dtype(table.data_type).itemsize
    for k, v in (("location", EXPERT_SLICE), ("source", info["location"]),
                 ("offset", int(info.get("offset", 0)) + e * a * b * size), ("rows", a), ("cols", b),
                 ("transpose", int(transpose))):
        t.external_data.add(key=k, value=str(v))
    return t


def group_by_expert(model: onnx.ModelProto, routers, per_expert_weights=False) -> dict:
    """Rewrites, in place, the batched expert sections fed by `routers` (the rewriter's metadata).
    Returns, per router index, None where its section was grouped, else why it was kept.
    per_expert_weights: each expert's MatMuls take their own initializer (expert_weight)
    instead of a slice gathered from the table at run time."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        return {i: f"opset {opset} < 15" for i in range(len(routers))}
    out = {}  # (rewrite_model has named every node: sections are tracked by name)
    for i, r in enumerate(routers):
        ix = GraphIndex(model.graph)
        try:
            _group(model, ix, r, f"moe_export/experts_{i}", per_expert_weights)
            out[i] = None
        except _Skip as e:
            out[i] = str(e)
    return out


def _combine_shape(ix, wmul, k, width):
    """For a router wider than the graph's k: the new shape of the Reshape([-1, k, hidden]) that
    feeds the per-token sum, so it sums `width` slots. The grouped section fills dropped slots
    with zeros, so summing more slots is exact."""
    cs = ix.consumers_of(wmul.output[0])
    r = cs[0] if len(cs) == 1 and cs[0].op_type == "Reshape" else None
    shape = None if r is None else ix.const(r.input[1])
    shape = None if shape is None else shape.reshape(-1)
    if shape is None or shape.size != 3 or shape[1] != k:
        raise _Skip("the per-token combine is not a Reshape to [-1, k, hidden]")
    sums = [c for c in ix.consumers_of(r.output[0]) if c.op_type == "ReduceSum"]
    if len(sums) != 1 or len(ix.consumers_of(r.output[0])) != 1 or node_axes(ix, sums[0]) not in ([1], [-2]):
        raise _Skip("the per-token combine is not a sum over the slot axis")
    return r, np.array([shape[0], width, shape[2]], dtype=np.int64)


def _is_slot_repeat(ix, t, k):
    """Whether pair tensor t repeats a per-token tensor over the k slots (the section's token
    states: Expand(Unsqueeze(x, 1), [1, k, 1]) flattened), so any of a token's rows stands for all."""
    for _ in range(8):
        n = ix.producer.get(t)
        if n is None:
            return False
        if n.op_type == "Expand":
            shape, u = ix.const(n.input[1]), ix.producer.get(n.input[0])
            return (shape is not None and shape.reshape(-1).tolist()[:2] == [1, k] and (shape.reshape(-1)[2:] == 1).all()
                    and u is not None and u.op_type == "Unsqueeze" and node_axes(ix, u) == [1])
        if n.op_type not in ("Reshape", "Unsqueeze", "Cast"):
            return False
        t = n.input[0]
    return False


def _group(model, ix, router, prefix, per_expert_weights=False):
    E = router["attrs"]["num_experts"]
    ids_flat, w_flat = _flat(ix, router["indices"]), _flat(ix, router["weights"])
    if ids_flat is None or w_flat is None:
        raise _Skip("no flat pair view of the routing")
    nodes, wmul = _section(ix, ids_flat, w_flat)
    a = router["attrs"]
    width = max(a["k"], a["max_experts"])
    widen = _combine_shape(ix, wmul, a["k"], width) if width != a["k"] else None
    inside = {o for n in nodes for o in n.output}
    tables = {}  # GatherND output -> weight table, for tables indexed by Unsqueeze(ids_flat)
    for n in nodes:
        if n.op_type == "Unsqueeze" and n.input[0] == ids_flat:
            continue
        if n.op_type == "GatherND":
            u = ix.producer.get(n.input[1])
            if u is None or u.op_type != "Unsqueeze" or u.input[0] != ids_flat or attr(n, "batch_dims", 0) != 0:
                raise _Skip("ids gather of another form")
            t = ix.initializers.get(n.input[0])
            if t is None or not t.dims or t.dims[0] != E:
                raise _Skip("gathered table is not an [E, ...] initializer")
            tables[n.output[0]] = n.input[0]
        elif ids_flat in n.input:
            raise _Skip(f"expert ids used by {n.op_type}")
    if not tables:
        raise _Skip("no weight tables gathered by expert id")

    b = NodeBuilder(prefix)
    op, const = b.op, b.const
    i64 = lambda v: b.const(v, np.int64)
    contribs, positions = [], []

    def own(gathered_t):  # a table slice only expert MatMuls read: their own initializers replace it
        return all(c.op_type == "MatMul" and gathered_t in c.input[:2] for c in ix.consumers_of(gathered_t))

    def weight(gathered_t, e, transpose):
        table = ix.initializers[tables[gathered_t]]
        if len(table.dims) != 3:
            raise _Skip("an expert weight table that is not [E, a, b]")
        t = expert_weight(table, e, transpose)
        b.inits.append(t)
        return t.name
    for e in range(E):
        pos = op("Reshape", [op("NonZero", [op("Equal", [ids_flat, i64(e)])]), i64([-1])])
        # With more slots than the graph's k, pair p is (token p // width, slot p % width), while
        # tensors from outside the section still hold k rows per token.
        src_pos = op("Mul", [op("Div", [pos, i64(width)]), i64(a["k"])]) if widen else pos
        m = {}          # section tensor -> this expert's tensor
        gathered = {}   # outside pair tensor -> its rows for this expert

        def rows(t):
            if t in m:
                return m[t]
            if t in inside or t in ix.initializers or ix.const(t) is not None:
                return m.get(t, t)
            if t not in gathered:
                routed = t in (ids_flat, w_flat)  # the router's own outputs have width rows per token
                if widen and not routed and not _is_slot_repeat(ix, t, a["k"]):
                    raise _Skip("a pair tensor from outside the section is not a per-token repeat")
                gathered[t] = op("Gather", [t, pos if routed else src_pos], axis=0)
            return gathered[t]

        for n in nodes:
            if n.op_type == "Unsqueeze" and n.input[0] == ids_flat:
                continue
            if n.op_type == "GatherND":
                if not (per_expert_weights and own(n.output[0])):
                    m[n.output[0]] = op("Gather", [tables[n.output[0]], i64(e)], axis=0)
                continue
            if n.op_type == "MatMul" and (n.input[0] in tables or n.input[1] in tables):
                if n.input[1] in tables:  # act [P, 1, b] x W [P, b, a]: a 3-D x 2-D matmul is one GEMM
                    w = weight(n.input[1], e, False) if per_expert_weights else m[n.input[1]]
                    m[n.output[0]] = op("MatMul", [rows(n.input[0]), w])
                else:  # W [P, a, b] x Unsqueeze(x [P, b], -1): x @ W^T, then the unsqueeze back
                    u = ix.producer.get(n.input[1])
                    if u is None or u.op_type != "Unsqueeze" or node_axes(ix, u) not in ([-1], [2]):
                        raise _Skip("batched matmul operand of another form")
                    wt = (weight(n.input[0], e, True) if per_expert_weights
                          else op("Transpose", [m[n.input[0]]], perm=[1, 0]))
                    m[n.output[0]] = op("Unsqueeze", [op("MatMul", [rows(u.input[0]), wt]), i64([-1])])
                continue
            if n.op_type == "MatMul":
                raise _Skip("a matmul of pair tensors that is not an expert weight")
            clone = onnx.NodeProto()
            clone.CopyFrom(n)
            clone.name = b.name(n.op_type)
            for j, t in enumerate(n.input):
                if t:
                    clone.input[j] = rows(t)
            for j, t in enumerate(n.output):
                if t:
                    clone.output[j] = f"{clone.name}/o{j}"
                    m[t] = clone.output[j]
            b.nodes.append(clone)
        contribs.append(m[wmul.output[0]])
        positions.append(pos)
    allc = op("Concat", contribs, axis=0)
    allp = op("Unsqueeze", [op("Concat", positions, axis=0), i64([-1])])
    shape = op("Concat", [op("Shape", [ids_flat]), op("Slice", [op("Shape", [allc]), i64([1]), i64([2**62])])], axis=0)
    zeros = op("Expand", [op("CastLike", [const(np.float32(0)), allc]), shape])
    combined = op("ScatterND", [zeros, allp, allc])
    surgery = Surgery(model.graph)
    if widen:
        widen[0].input[1] = const(widen[1])
        surgery.stale |= {widen[0].output[0], ids_flat, w_flat}
    # The new nodes take the place of the section's sink: every section node feeds it, so every
    # input they read is produced before it, and everything reading its result comes after.
    surgery.insert(b, before=wmul.name)
    surgery.rewire(wmul.output[0], combined)
    surgery.remove(n.name for n in nodes)
    # Dropped slots (id = E) must reach the Equal tests unclamped: they then match no expert.
    flat = ix.producer[ids_flat]
    clamp = ix.producer.get(flat.input[0])
    if clamp is not None and clamp.op_type == "Min" and clamp.name.startswith("moe_export/"):
        surgery.rewire(clamp.output[0], clamp.output[0], exceptions={flat.name: clamp.input[0]})
        surgery.remove([clamp.name])
    surgery.apply()
