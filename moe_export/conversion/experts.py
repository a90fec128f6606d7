"""Group a batched expert section by expert, so only routed (token, expert) pairs are computed.

transformers 5.x `batched_mm` graphs compute every (token, slot) pair: each pair gathers its
expert's weight matrices (GatherND over [E, ...] tables by the flat expert ids) and runs a batched
matmul, so a dropped slot still costs a full expert and the gathers copy weights per pair. This
pass runs the section per expert, fed only that expert's pairs (NonZero(ids == e)), in one Scan
over the experts (_scanned): each iteration receives its expert's slice of every table as a view,
runs one GEMM per matrix on it where it lies, and adds its contributions into their tokens' rows,
in place of the graph's own per-token sum (or scatters them into their pair rows before a sum of
another form). An expert with no pairs skips its branch.
A dropped slot (id = E) is computed by no expert.

In this default form no weight is read at a constant index (ONNX Runtime would constant-fold
Gather(initializer, constant) at load: a copy of every expert, 8x the original's peak RSS and
50-100x its load time at 1 GB of weights), and no expert matrix is a GEMM's constant right operand
(prepacked at load, a second copy); per_expert_weights trades both for the quantizable form.
Layers whose section does not have this shape are left as they are.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..model.files import EXPERT_SLICE
from ..model.graph import GraphIndex, NodeBuilder, Surgery, attr, node_axes, opset_version, prune

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
    By default one Scan over the experts reads each expert's matrices where they lie in the
    tables (_scanned). per_expert_weights: one section per expert instead, each MatMul with an
    [in, out] initializer of its own as the right operand (expert_weight), the form weight-only
    quantizers look for; onnxruntime prepacks those at load, a second copy in memory."""
    opset = opset_version(model)
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


def _token_sum(ix, wmul, k):
    """The graph's per-token sum of the weighted pairs, Reshape(pairs, [-1, k, hidden]) ->
    ReduceSum over the slot axis, as (the Reshape, the ReduceSum, its shape); or why not."""
    cs = ix.consumers_of(wmul.output[0])
    r = cs[0] if len(cs) == 1 and cs[0].op_type == "Reshape" else None
    shape = None if r is None else ix.const(r.input[1])
    shape = None if shape is None else shape.reshape(-1)
    if shape is None or shape.size != 3 or shape[1] != k:
        return "the per-token combine is not a Reshape to [-1, k, hidden]"
    sums = [c for c in ix.consumers_of(r.output[0]) if c.op_type == "ReduceSum"]
    if len(sums) != 1 or len(ix.consumers_of(r.output[0])) != 1 or node_axes(ix, sums[0]) not in ([1], [-2]):
        return "the per-token combine is not a sum over the slot axis"
    return r, sums[0], shape


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


def _subgraph(name, nb, outs, types):
    """A graph of nb's nodes that feed `outs` (of the given element types, any shape)."""
    return onnx.helper.make_graph(prune(nb.nodes, set(outs)), name, [], [
        onnx.helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)])


def _static_rest(ix, t):
    """t's dims after the first, where its value_info knows them all (dynamo exports record it)."""
    v = ix.value_info.get(t)
    dims = v.type.tensor_type.shape.dim if v is not None and v.type.tensor_type.HasField("shape") else []
    return [d.dim_value for d in dims[1:]] if len(dims) > 1 and all(d.HasField("dim_value") for d in dims[1:]) else None


def _pair_zeros(b, lead, like, ftype=None):
    """Zeros of like's type (ftype, where known) and trailing shape, with `lead` ([n]) rows."""
    i64 = b.i64
    shape = b.op("Concat", [lead, b.op("Slice", [b.op("Shape", [like]), i64([1]), i64([2**62])])], axis=0)
    zero = b.zero(ftype) if ftype else b.op("CastLike", [b.const(np.float32(0)), like])
    return b.op("Expand", [zero, shape])


def _scanned(b, ix, prefix, ids_flat, E, tables, wmul, expert, per_token):
    """Every token's summed contributions ([tokens, ...]; per_token: its pairs' count), or else
    every pair's ([pairs, ...], zeros where no expert computed one), from one Scan over the
    experts. A Scan hands each iteration its expert's slice of every table as a view of
    the table, so no weight is copied, at load or at run time: a Loop can only Gather the slice,
    a copy per routed expert per call that cost more than the GEMMs it fed and got slower with
    threads, and per-expert initializers would grow the graph, and its load time, E-fold. An expert with no pair takes an If's branch that passes the state on, so it
    costs an iteration, not its weights. Contributions are added into a state of one row per
    token where the graph sums its pairs per token itself (per_token: the width of a token's
    pairs), else scattered into one row per pair. The state is copied once per iteration, E x
    rows x hidden per call, so per token it is k times less. Its trailing shape is the graph's
    recorded one, or else comes from the section run on no pairs in each call (Gather of no
    expert's slice; more nodes, so more load time)."""
    i64 = b.i64
    op = b.op
    ftype = (ix.elem_type(wmul.output[0]) or ix.elem_type(wmul.input[0]) or ix.elem_type(wmul.input[1])
             or ix.initializers[next(iter(tables.values()))].data_type)
    rest = _static_rest(ix, wmul.output[0])
    pairs = op("Shape", [ids_flat])
    lead = op("Div", [pairs, i64([per_token])]) if per_token else pairs
    if rest is not None:
        state = op("Expand", [b.zero(ftype), op("Concat", [lead, i64(rest)], axis=0)])
    else:
        state = _pair_zeros(b, lead, expert(b, i64(-1))[0], ftype)
    # ones scattered at the ids over E + 1 slots (the last one the dropped id E): who has a pair
    hits = op("ScatterElements", [i64(np.zeros(E + 1, np.int64)), ids_flat, op("Expand", [i64(1), pairs])])
    routed = op("Cast", [op("Slice", [hits, i64([0]), i64([E])])], to=onnx.TensorProto.BOOL)

    body = NodeBuilder(f"{prefix}/body")
    acc, e, has = body.name("pairs"), body.name("expert"), body.name("routed")
    slices = {g: body.name("slice") for g in tables}
    run = NodeBuilder(f"{prefix}/run")
    contrib, pos, count = expert(run, e, slices=slices)
    if per_token:  # (a token's pairs are other experts', so no row repeats within one scatter)
        rows = run.op("Unsqueeze", [run.op("Div", [pos, i64(per_token)]), i64([-1])])
        ran = [run.op("ScatterND", [acc, rows, contrib], reduction="add"), count]
    else:
        ran = [run.op("ScatterND", [acc, run.op("Unsqueeze", [pos, i64([-1])]), contrib]), count]
    skip = NodeBuilder(f"{prefix}/skip")
    # (its count is the routed flag, 0 here, not a constant: onnxruntime would fold an Identity of one)
    skipped = [skip.op("Identity", [acc]), skip.op("Cast", [has], to=onnx.TensorProto.INT64)]
    types = [ftype, onnx.TensorProto.INT64]
    out = body.op("If", [has], n_out=2, then_branch=_subgraph(f"{prefix}/run", run, ran, types),
                  else_branch=_subgraph(f"{prefix}/skip", skip, skipped, types))
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        body.nodes, f"{prefix}/body",
        [value(acc, ftype, None)]
        + [value(slices[g], ix.initializers[t].data_type, list(ix.initializers[t].dims[1:])) for g, t in tables.items()]
        + [value(e, onnx.TensorProto.INT64, []), value(has, onnx.TensorProto.BOOL, [])],
        [value(out[0], ftype, None), value(out[1], onnx.TensorProto.INT64, [])])
    # (the second output, the pairs each expert ran, is what tests count)
    return op("Scan", [state, *tables.values(), i64(np.arange(E)), routed], n_out=2,
              num_scan_inputs=len(tables) + 2, body=graph)[0]


def _group(model, ix, router, prefix, per_expert_weights):
    E = router.num_experts
    ids_flat, w_flat = _flat(ix, router.indices), _flat(ix, router.weights)
    if ids_flat is None or w_flat is None:
        raise _Skip("no flat pair view of the routing")
    nodes, wmul = _section(ix, ids_flat, w_flat)
    k = router.k
    width = max(k, router.attrs.max_experts)
    widen = width != k  # a router wider than the graph's k needs the graph's per-token sum
    token_sum = _token_sum(ix, wmul, k)
    if widen and isinstance(token_sum, str):
        raise _Skip(token_sum)
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
    i64 = b.i64  # constants live in the main graph; a Scan body reads them there

    def own(gathered_t):  # a table slice only expert MatMuls read: their own initializers replace it
        return all(c.op_type == "MatMul" and gathered_t in c.input[:2] for c in ix.consumers_of(gathered_t))

    def weight(gathered_t, e, transpose):
        t = expert_weight(ix.initializers[tables[gathered_t]], e, transpose)
        b.inits.append(t)
        return t.name

    def left(nb, gathered_t, w, x, one, transA=0):
        """x W^T (W^T: W itself when transA), the expert's slice W read where it lies. For one row
        (decode at batch 1) it is Gemm's right operand, a matrix-vector product; for more rows its
        left operand, (W x^T)^T, which MLAS runs faster there (benchmarks/gemm_orientation.py,
        2048 x 1536, one thread: 1 row 0.34 vs 0.56 ms, 2 rows 0.78 vs 0.56 ms).
        Either way the slice is not a constant, so nothing is prepacked. The C of 0 is there
        because onnxruntime fuses Gemm -> Transpose into one Gemm of swapped operands without one."""
        ftype = ix.initializers[tables[gathered_t]].data_type
        vec, mat = NodeBuilder(nb.name("one_row")), NodeBuilder(nb.name("rows"))
        by_vec = vec.op("Gemm", [x, w], transB=1 - transA)
        by_mat = mat.op("Transpose", [mat.op("Gemm", [w, x, b.zero(ftype)], transA=transA, transB=1)], perm=[1, 0])
        return nb.op("If", [one], then_branch=_subgraph(vec.prefix, vec, [by_vec], [ftype]),
                     else_branch=_subgraph(mat.prefix, mat, [by_mat], [ftype]))

    def expert(nb, e, e_const=None, slices=None):
        """Emits into `nb` the section for the pairs routed to expert `e` (a tensor); returns (their
        contributions, their pair positions, their count). The expert's table slices are `slices` (GatherND
        output -> an [a, b] tensor) in a Scan, its own initializers when e_const (its value) is
        given (tables whose slice other ops read too are still gathered), else gathered here (the
        shape probe, for no expert)."""
        op = nb.op
        pos = op("Reshape", [op("NonZero", [op("Equal", [ids_flat, e])]), i64([-1])])
        if slices is None:
            eid = op("Gather", [ids_flat, op("Slice", [pos, i64([0]), i64([1])])], axis=0)  # [e] or []
        count = op("Size", [pos])
        if slices is not None:
            one = op("Equal", [count, i64(1)])
        # With more slots than the graph's k, pair p is (token p // width, slot p % width), while
        # tensors from outside the section still hold k rows per token.
        src_pos = op("Mul", [op("Div", [pos, i64(width)]), i64(k)]) if widen else pos
        m = {}          # section tensor -> this expert's tensor
        gathered = {}   # outside pair tensor -> its rows for this expert
        unsqueezed = {}  # Unsqueeze(product, -1) -> product

        def rows(t):
            if t in m:
                return m[t]
            if t in inside or t in ix.initializers or ix.const(t) is not None:
                return m.get(t, t)
            if t not in gathered:
                routed = t in (ids_flat, w_flat)  # the router's own outputs have width rows per token
                if widen and not routed and not _is_slot_repeat(ix, t, k):
                    raise _Skip("a pair tensor from outside the section is not a per-token repeat")
                gathered[t] = op("Gather", [t, pos if routed else src_pos], axis=0)
            return gathered[t]

        for n in nodes:
            if n.op_type == "Unsqueeze" and n.input[0] == ids_flat:
                continue
            elif n.op_type == "GatherND":  # [1, ...] (or [0, ...]): broadcasts against the pairs as [P, ...] did
                g = n.output[0]
                if slices is not None and not own(g):
                    m[g] = op("Unsqueeze", [slices[g], i64([0])])
                elif slices is None and not (e_const is not None and own(g)):
                    m[g] = op("Gather", [tables[g], eid], axis=0)
                continue
            elif n.op_type == "MatMul" and (n.input[0] in tables or n.input[1] in tables):
                table = ix.initializers[tables[n.input[0] if n.input[0] in tables else n.input[1]]]
                if len(table.dims) != 3:
                    raise _Skip("an expert weight table that is not [E, a, b]")
                if n.input[1] in tables:  # act [P, ..., b] x W [P, b, a]: one GEMM of the rows
                    act = rows(n.input[0])
                    if e_const is not None:
                        m[n.output[0]] = op("MatMul", [act, weight(n.input[1], e_const, False)])
                        continue
                    flat = op("Reshape", [act, i64([-1, table.dims[1]])])
                    if slices is not None:
                        out = left(nb, n.input[1], slices[n.input[1]], flat, one, transA=1)
                    else:
                        out = op("MatMul", [flat, m[n.input[1]]])  # [N, b] x [1 or 0, b, a]
                    lead = op("Slice", [op("Shape", [act]), i64([0]), i64([-1])])
                    m[n.output[0]] = op("Reshape", [out, op("Concat", [lead, i64([table.dims[2]])], axis=0)])
                    continue
                # W [P, a, b] x Unsqueeze(x [P, b], -1): x @ W^T, then the unsqueeze back
                u = ix.producer.get(n.input[1])
                if u is None or u.op_type != "Unsqueeze" or node_axes(ix, u) not in ([-1], [2]):
                    raise _Skip("batched matmul operand of another form")
                if e_const is not None:
                    out = op("MatMul", [rows(u.input[0]), weight(n.input[0], e_const, True)])
                elif slices is not None:
                    out = left(nb, n.input[0], slices[n.input[0]], rows(u.input[0]), one)
                else:  # the shape probe: (W @ x^T)^T on its gathered slice of no expert
                    wx = op("MatMul", [m[n.input[0]], op("Transpose", [rows(u.input[0])], perm=[1, 0])])
                    out = op("Reshape", [op("Transpose", [wx], perm=[0, 2, 1]), i64([-1, table.dims[1]])])
                m[n.output[0]] = op("Unsqueeze", [out, i64([-1])])
                unsqueezed[m[n.output[0]]] = out
                continue
            elif n.op_type == "Squeeze" and m.get(n.input[0]) in unsqueezed and node_axes(ix, n) in ([-1], [2]):
                m[n.output[0]] = unsqueezed[m[n.input[0]]]  # the [N, a] product the Unsqueeze above made
                continue
            elif n.op_type == "MatMul":
                raise _Skip("a matmul of pair tensors that is not an expert weight")
            clone = onnx.NodeProto()
            clone.CopyFrom(n)
            clone.name = nb.name(n.op_type)
            for j, t in enumerate(n.input):
                if t:
                    clone.input[j] = rows(t)
            for j, t in enumerate(n.output):
                if t:
                    clone.output[j] = f"{clone.name}/o{j}"
                    m[t] = clone.output[j]
            nb.nodes.append(clone)
        return m[wmul.output[0]], pos, count

    op, const = b.op, b.const
    # ScatterND's reduction needs opset 16; the Scan then stands for the graph's per-token sum
    summed = None if per_expert_weights or opset_version(model) < 16 or isinstance(token_sum, str) else token_sum
    if per_expert_weights:
        contribs, positions, _ = zip(*(expert(b, i64(e), e) for e in range(E)))
        allc = op("Concat", list(contribs), axis=0)
        allp = op("Unsqueeze", [op("Concat", list(positions), axis=0), i64([-1])])
        combined = op("ScatterND", [_pair_zeros(b, op("Shape", [ids_flat]), allc), allp, allc])
    else:
        combined = _scanned(b, ix, prefix, ids_flat, E, tables, wmul, expert, width if summed else 0)
        if summed and attr(summed[1], "keepdims", 1):
            combined = op("Unsqueeze", [combined, i64([1])])
    surgery = Surgery(model.graph)
    if widen:  # the router's flat outputs now hold `width` rows per token
        surgery.stale |= {ids_flat, w_flat}
    if widen and not summed:  # the per-token sum sums `width` slots: dropped ones hold zeros
        reshape, shape = token_sum[0], token_sum[2]
        reshape.input[1] = const(np.array([shape[0], width, shape[2]], dtype=np.int64))
        surgery.stale.add(reshape.output[0])
    # The new nodes take the place of the section's sink: every section node feeds it, so every
    # input they read is produced before it, and everything reading its result comes after.
    surgery.insert(b, before=wmul.name)
    if summed:
        surgery.rewire(summed[1].output[0], combined)
        surgery.remove([summed[0].name, summed[1].name])
    else:
        surgery.rewire(wmul.output[0], combined)
    surgery.remove(n.name for n in nodes)
    # Dropped slots (id = E) must reach the Equal tests unclamped: they then match no expert.
    flat = ix.producer[ids_flat]
    clamp = ix.producer.get(flat.input[0])
    if clamp is not None and clamp.op_type == "Min" and clamp.name.startswith("moe_export/"):
        surgery.rewire(clamp.output[0], clamp.output[0], exceptions={flat.name: clamp.input[0]})
        surgery.remove([clamp.name])
    surgery.apply()
