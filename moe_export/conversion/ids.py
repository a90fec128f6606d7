"""The one expert-id safety pass every conversion goes through, whatever rule matched the gate:
a dropped slot's id is num_experts, and every use of the ids must stay right with it."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import MoeExportError
from ..model.graph import PASS_THROUGH, GraphIndex, NodeBuilder, Surgery, attr
from ..op.spec import RouterAttrs
from ..rules.base import Gate

# How each use of the expert ids stays right when a slot is dropped (id = E, weight 0). Every
# path from the ids, through view ops, ends in one of these, or the conversion is refused for
# policies that drop slots:
#   compared  (OneHot, Equal: per-expert loops; Less, Greater, ...: LongCat-Flash's ids past its
#             routed experts are identity experts): the raw ids; E matches no expert, so a
#             dropped slot skips its work (clamped, expert E-1 would compute every dropped slot),
#             and whichever branch an ordered comparison sends it to, its weight of 0 cancels it;
#   indexed   (Gather*, the ids as index; a sort of the ids; a scatter that adds up): ids
#             clamped to E-1, so a dropped slot is a pair of expert E-1 everywhere alike, and its
#             zero weight cancels it. A scatter that overwrites is not one of these: a clamped id
#             can repeat a kept E-1 within a token, and the two writes collapse into one. Into
#             zeros, though, it is a scatter that adds (a token's top-k ids are distinct), and
#             becomes one ("counted": JetMoE's per-expert counts then add up to the pairs its
#             sorted rows are split into, dropped ones as zero-weight pairs of E-1);
#   scattered (ScatterElements by id of the routing weights, or of a per-slot function of them:
#             dense router weights; ORT GenAI's log-weights for a fused MoE op): the raw ids into
#             the data widened by a scratch column that is sliced off, so a dropped slot's value
#             never overwrites a kept expert E-1's;
#   widened   (GatherElements from a tensor the graph weighs the experts with, for a gate whose
#             router only selects: Gate.gathers): the raw ids into the tensor widened by a
#             column of what a dropped slot must read (0 or -inf), so it weighs nothing;
#   shape     (Shape): the values do not matter.
_USES = {("OneHot", 0): "compared", ("Equal", 0): "compared", ("Equal", 1): "compared",
         ("Gather", 1): "indexed", ("GatherND", 1): "indexed", ("GatherElements", 1): "indexed",
         ("TopK", 0): "indexed", ("Shape", 0): "shape",
         **{(op, i): "compared" for op in ("Less", "Greater", "LessOrEqual", "GreaterOrEqual") for i in (0, 1)}}


# Elementwise functions of one tensor (the rest of their inputs constant bounds): what a slot
# holds after them still belongs to that slot alone.
_PER_SLOT = PASS_THROUGH | {"Clip", "Log", "Exp", "Neg", "Abs", "Sqrt"}


def _from(ix, tensor, source):
    """Whether `tensor` is a per-slot function of `source` (view ops, Clip, Log, ...)."""
    while tensor != source:
        p = ix.producer.get(tensor)
        if p is None or p.op_type not in _PER_SLOT:
            return False
        if p.op_type not in PASS_THROUGH and any(ix.const(i) is None for i in p.input[1:] if i):
            return False
        tensor = p.input[0]
    return True


def _replaces_some(ix, n, t) -> bool:
    """Where(cond, constant, ids) or Where(cond, ids, constant): ids with some slots set to a
    constant (ZAYA's skip class back to expert 0, weighed 0); a dropped slot's id passes through
    or becomes that constant, so the result is held to the same rules as the ids themselves."""
    if n.op_type != "Where" or list(n.input).index(t) not in (1, 2):
        return False
    return ix.const(n.input[3 - list(n.input).index(t)]) is not None


def _zeros(ix, t) -> bool:
    """Whether `t` is a tensor of zeros: ConstantOfShape(0) or Expand(0, shape)."""
    p = ix.producer.get(t)
    if p is not None and p.op_type == "ConstantOfShape":
        v = next((helper.get_attribute_value(a) for a in p.attribute if a.name == "value"), None)
        return v is None or not np.any(onnx.numpy_helper.to_array(v))
    if p is not None and p.op_type == "Expand":
        v = ix.const(p.input[0])
        return v is not None and v.size == 1 and not np.any(v)
    return False


def _uses(ix, consumer, tensor, gate, region):
    """[(kind, terminal node)] for every path from `tensor` through `consumer` and view ops;
    kind is one of the above, "output" for a graph output, or the op of an unknown use."""
    out, stack, seen = [], [(consumer, tensor)], set()
    while stack:
        n, t = stack.pop()
        if n.name in seen or n.name in region:
            continue
        seen.add(n.name)
        if n.op_type in PASS_THROUGH or _replaces_some(ix, n, t):
            for o in n.output:
                if o in ix.graph_outputs:
                    out.append(("output", n))
                stack.extend((c, o) for c in ix.consumers_of(o))
            continue
        slot = list(n.input).index(t)
        kind = _USES.get((n.op_type, slot), f"{n.op_type} (input {slot})")
        if n.op_type in ("ScatterElements", "ScatterND") and slot == 1:
            reduction = attr(n, "reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if reduction == "add":
                kind = "indexed"
            elif reduction == "none" and n.op_type == "ScatterElements" and _from(ix, n.input[2], gate.weights):
                kind = "scattered"
            elif reduction == "none" and n.op_type == "ScatterElements" and _zeros(ix, n.input[0]):
                kind = "counted"
            else:
                kind = f"{n.op_type} (reduction {reduction}, overwriting by id)"
        if n.op_type == "GatherElements" and slot == 1 and ix.source(n.input[0])[0] in (gate.gathers or {}):
            kind = "widened"
        out.append((kind, n))
    return out


def keep_ids_right(surgery: Surgery, ix: GraphIndex, gate: Gate, a: RouterAttrs, b: NodeBuilder, idx: str,
                   opset: int):
    """Every consumer of the gate's ids reads the router's `idx`, raw or clamped as its uses need
    (the table above); refuses a graph with a use it cannot keep right when slots can be dropped.
    The gate's own nodes are removed. Returns None, or (a static conversion of a graph with such a
    use) why its policy may not be re-set to one that drops slots.
    Everything that keeps the ids right is done in a static conversion too (each is exact while no
    slot drops), so that re-setting its policy (repolicy, calibration) needs no graph change."""
    region = _gate_region(ix, gate)
    raw, clamped, static_only = {}, None, None
    for c in ix.consumers_of(gate.indices):
        uses = _uses(ix, c, gate.indices, gate, region)
        kinds = {kind for kind, _ in uses}
        counted = [n for kind, n in uses if kind == "counted"]
        if counted and opset < 16:  # ScatterElements' reduction attribute came with opset 16
            kinds = kinds - {"counted"} | {f"ScatterElements (counting by id, which needs opset 16; the graph "
                                           f"has {opset})"}
            counted = []
        raw_kinds = {"compared", "scattered", "widened", "shape", "output"}
        kinds = {"indexed" if k == "counted" else k for k in kinds}
        unknown = kinds - raw_kinds - {"indexed"}
        if "indexed" in kinds and kinds & {"scattered", "widened"}:  # one id tensor cannot be both raw and clamped
            unknown.add("a scatter or widened gather and another indexing through one tensor")
        if unknown:
            static_only = (f"{gate.name}: the expert ids feed {sorted(unknown)[0]}, which moe-export cannot "
                           "keep right when a slot is dropped (id = num_experts); only --policy static "
                           "converts this graph")
            if a.drops:
                raise MoeExportError(static_only)
        for n in counted:
            axis = attr(n, "axis", 0)  # ScatterElements has only axis and reduction
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("axis", axis), helper.make_attribute("reduction", "add")])
        if kinds <= raw_kinds:
            raw[c.name] = idx
            for j, (_, n) in enumerate(u for u in uses if u[0] == "scattered"):
                _widen_scatter(surgery, f"{b.prefix}/scatter_{j}", n, a.num_experts)
            for j, (_, n) in enumerate(u for u in uses if u[0] == "widened"):
                _widen_gather(surgery, ix, f"{b.prefix}/gather_{j}_{c.name}", n, gate.gathers[ix.source(n.input[0])[0]])
        elif clamped is None:
            clamped = b.op("Min", [idx, b.const(np.int64(a.num_experts - 1))], hint="clamped_indices")
    surgery.rewire(gate.indices, clamped or idx, exceptions=raw, output=idx)
    surgery.remove(region)
    return static_only


def _widen_scatter(surgery, prefix, n, E):
    """ScatterElements(data, ids, updates) with raw ids: data gets a scratch column E (zeros),
    the result is sliced back to E columns, so dropped slots write where nothing reads."""
    axis = attr(n, "axis", 0)
    pre, post = NodeBuilder(f"{prefix}/widen"), NodeBuilder(f"{prefix}/narrow")
    col = pre.op("Slice", [n.input[0], pre.const([0], np.int64), pre.const([1], np.int64), pre.const([axis], np.int64)])
    wide = pre.op("Concat", [n.input[0], pre.op("Sub", [col, col])], axis=axis)
    sliced = post.op("Slice", [n.output[0], post.const([0], np.int64), post.const([E], np.int64),
                               post.const([axis], np.int64)], hint="scattered")
    surgery.rewire(n.input[0], n.input[0], exceptions={n.name: wide})
    surgery.rewire(n.output[0], sliced)
    surgery.insert(pre, before=n.name)
    surgery.insert(post, after=n.name)


def _widen_gather(surgery, ix, prefix, n, fill):
    """GatherElements(data, ids) -> GatherElements(Concat(data, a column of `fill`), ids): a
    dropped slot's id E reads `fill`."""
    pre = NodeBuilder(prefix)
    data = n.input[0]
    col = pre.filled(data, 1, fill, ix.elem_type(data) or TensorProto.FLOAT)
    wide = pre.op("Concat", [data, col], axis=-1, hint="widened")
    surgery.rewire(data, data, exceptions={n.name: wide})
    surgery.insert(pre, before=n.name)


def _gate_region(ix: GraphIndex, gate: Gate) -> set:
    """Names of nodes between the gate's inputs (logits, bias) and outputs (weights, indices)."""
    stop = {gate.logits, gate.bias}
    region, stack = set(), [gate.topk.output[0] if gate.gathers else gate.weights, gate.indices]
    while stack:
        t = stack.pop()
        if t in stop or t in ix.initializers:
            continue
        n = ix.producer.get(t)
        if n is None or n.name in region:
            continue
        region.add(n.name)
        stack.extend(n.input)
    return region
