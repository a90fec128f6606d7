"""Replace every matched gate with one DynamicRouter node (or its standard-ONNX expansion)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import MoeExportError, genai
from .files import Output, model_files
from .graph import PASS_THROUGH, GraphIndex, NodeBuilder, Surgery, attr, load_model
from .patterns import Gate, family, find_gates, fused_after, no_gates_message
from .schema import DOMAIN, OP_TYPE, VERSION, node_attributes
from .spec import RouterAttrs, SpecError

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


@dataclass
class Policy:
    policy: str = "static"
    threshold: float = 0.0
    min_experts: int = 1
    max_experts: int | None = None  # None: the gate's own k
    # per-gate overrides written by calibrate: {gate name: threshold, or (policy, threshold[,
    # renormalize])}
    per_layer: dict | None = None
    renormalize: float = 1.0

    def of(self, layer) -> tuple:
        """(policy, threshold, renormalize) of one layer."""
        v = (self.per_layer or {}).get(layer, self.threshold)
        if not isinstance(v, (tuple, list)):
            return self.policy, float(v), self.renormalize
        return v[0], float(v[1]), float(v[2]) if len(v) > 2 else self.renormalize


def router_attrs(gate: Gate, pol: Policy, group_experts=True) -> RouterAttrs:
    policy, t, r = pol.of(gate.name)
    a = RouterAttrs(**gate.attrs, policy=policy, threshold=t, renormalize=r, min_experts=pol.min_experts,
                    max_experts=pol.max_experts or gate.attrs["k"])
    # More than k slots per token: a per-expert loop takes any number (each expert gathers its
    # own rows), a fused op once its k is raised; a batched section only once regrouped, whose
    # combine is then widened.
    if a.max_experts > a.k and not (gate.expert_form in ("loop", "fused")
                                    or (gate.expert_form == "batched" and group_experts)):
        raise MoeExportError(f"max_experts={a.max_experts} exceeds the graph's k={a.k} at {gate.name}: the "
                             f"expert section of this graph ({gate.expert_form}) is built for k slots per token"
                             + ("; drop --no-group-experts" if gate.expert_form == "batched" else ""))
    try:
        return a.resolved()
    except SpecError as e:
        raise MoeExportError(f"invalid policy arguments: {e}") from None


def _portable(b: NodeBuilder, a: RouterAttrs, logits: str, bias: str | None, float_type: int):
    """DynamicRouter in standard ONNX ops (opset >= 13), following spec.dynamic_router step by step."""
    E, W = a.num_experts, a.width
    f32 = lambda v: b.const(np.float32(v))
    i64 = lambda v: b.const(np.asarray(v, dtype=np.int64))
    x = b.op("Cast", [logits], to=TensorProto.FLOAT) if float_type != TensorProto.FLOAT else logits
    lead = b.op("Slice", [b.op("Shape", [x]), i64([0]), i64([-1])])
    x = b.op("Reshape", [x, i64([-1, E])])
    s = b.op("Softmax", [x], axis=-1) if a.score_func == "softmax" else b.op("Sigmoid", [x])
    key = x if a.select == "before_score" else s
    if bias:
        bf = b.op("Cast", [bias], to=TensorProto.FLOAT)
        key = b.op("Add", [key, bf])
    valid = None
    if a.n_group > 1:
        G, gs = a.n_group, E // a.n_group
        gv = b.op("TopK", [b.op("Reshape", [key, i64([-1, G, gs])]), i64([a.group_score_topk])], n_out=2)[0]
        gsc = b.op("ReduceSum", [gv, i64([-1])], keepdims=0)
        gidx = b.op("TopK", [gsc, i64([a.topk_group])], n_out=2)[1]
        zeros = b.op("Mul", [gsc, f32(0.0)])
        ones = b.op("Add", [b.op("Mul", [b.op("Cast", [gidx], to=TensorProto.FLOAT), f32(0.0)]), f32(1.0)])
        gmask = b.op("ScatterElements", [zeros, gidx, ones], axis=1)
        gm3 = b.op("Expand", [b.op("Unsqueeze", [gmask, i64([-1])]), i64([1, 1, gs])])
        valid = b.op("Greater", [b.op("Reshape", [gm3, i64([-1, E])]), f32(0.5)])
        key = b.op("Where", [valid, key, f32(-np.inf)])
    vals, idx = b.op("TopK", [key, i64([W])], n_out=2, axis=-1, largest=1, sorted=1)
    slot = b.op("Unsqueeze", [i64(list(range(W))), i64([0])])
    if a.policy == "static":
        keep = b.op("Less", [slot, i64(a.k)])
    else:
        if a.score_func == "softmax":
            q = b.op("Softmax", [b.op("Where", [valid, x, f32(-np.inf)])], axis=-1) if valid else s
        else:
            sv = b.op("Where", [valid, s, f32(0.0)]) if valid else s
            q = b.op("Div", [sv, b.op("ReduceSum", [sv, i64([-1])], keepdims=1)])
        qs = b.op("GatherElements", [q, idx], axis=1)
        M = a.max_experts
        n_valid = a.topk_group * (E // a.n_group)
        if a.policy == "top-p":
            cum = b.op("CumSum", [qs, i64(1)])
            below = b.op("Cast", [b.op("Less", [b.op("Slice", [cum, i64([0]), i64([M - 1]), i64([1])]),
                                                f32(a.threshold)])], to=TensorProto.FLOAT)
            cnt = b.op("Add", [b.op("ReduceSum", [below, i64([-1])], keepdims=1), f32(1.0)])
        elif a.policy == "ratio":
            ref = b.op("Mul", [b.op("Slice", [qs, i64([0]), i64([1]), i64([1])]), f32(a.threshold)])
            ge = b.op("Cast", [b.op("GreaterOrEqual", [b.op("Slice", [qs, i64([1]), i64([M]), i64([1])]), ref])],
                      to=TensorProto.FLOAT)
            cnt = b.op("Add", [b.op("ReduceSum", [ge, i64([-1])], keepdims=1), f32(1.0)])
        else:
            pos = b.op("Greater", [q, f32(0.0)])
            safe = b.op("Where", [pos, q, f32(1.0)])
            H = b.op("Neg", [b.op("ReduceSum", [b.op("Mul", [safe, b.op("Log", [safe])]), i64([-1])], keepdims=1)])
            hn = b.op("Div", [H, f32(np.log(n_valid) if n_valid > 1 else np.inf)])
            frac = b.op("Clip", [b.op("Div", [b.op("Sub", [hn, f32(a.threshold)]), f32(1.0 - a.threshold)]),
                                 f32(0.0), f32(1.0)])
            raw = b.op("Mul", [frac, f32(a.max_experts - a.min_experts)])
            cnt = b.op("Add", [b.op("Floor", [b.op("Add", [raw, f32(0.5)])]), f32(a.min_experts)])
        hi = min(a.max_experts, n_valid)
        cnt = b.op("Cast", [b.op("Clip", [cnt, f32(min(a.min_experts, hi)), f32(hi)])], to=TensorProto.INT64)
        keep = b.op("Less", [slot, cnt])
    softmax_kept = a.select == "before_score" and a.score_func == "softmax"
    # With renormalize < 1 the values are normalized over the static k (or the kept, where more
    # are kept) and the kept take (sk / sc)^renormalize of it (spec._part_factor); rows keeping
    # k are the same either way.
    part = a.policy != "static" and a.renormalize != 1.0 and a.sums_to_one
    over = b.op("Less", [slot, b.op("Max", [cnt, i64(a.k)])]) if part else keep
    if softmax_kept:
        # the ranked values carry the bias, the weights are the unbiased logits' softmax
        kept = b.op("GatherElements", [x, idx], axis=1) if bias else vals
        w = b.op("Softmax", [b.op("Where", [over, kept, f32(-np.inf)])], axis=-1)
    else:
        w = b.op("Where", [over, b.op("GatherElements", [s, idx], axis=1), f32(0.0)])
        if a.normalize and not part:
            tot = b.op("ReduceSum", [w, i64([-1])], keepdims=1)
            w = b.op("Div", [w, b.op("Where", [b.op("Greater", [tot, f32(0.0)]), tot, f32(1.0)])])
    if part:
        total = lambda m: b.op("ReduceSum", [b.op("Where", [m, w, f32(0.0)]), i64([-1])], keepdims=1)
        sk, sc = total(b.op("Less", [slot, i64(a.k)])), total(keep)
        ok = b.op("And", [b.op("Greater", [sk, f32(0.0)]), b.op("Greater", [sc, f32(0.0)])])
        one = lambda v: b.op("Where", [ok, v, f32(1.0)])
        f = b.op("Div", [b.op("Pow", [b.op("Div", [sk, one(sc)]), f32(a.renormalize)]), one(sk)])
        w = b.op("Mul", [w, b.op("Where", [ok, f, f32(0.0)])])
    w = b.op("Where", [keep, b.op("Mul", [w, f32(a.scale)]), f32(0.0)])
    idx = b.op("Where", [keep, idx, i64(E)])
    out_shape = b.op("Concat", [lead, i64([W])], axis=0)
    w = b.op("Reshape", [w, out_shape])
    if float_type != TensorProto.FLOAT:
        w = b.op("Cast", [w], to=float_type)
    return w, b.op("Reshape", [idx, out_shape])


def _float_type(ix: GraphIndex, gate: Gate):
    t = ix.elem_type(gate.logits) or ix.elem_type(gate.weights)
    return t or TensorProto.FLOAT


def rewrite_model(model: onnx.ModelProto, pol: Policy, portable=False, group_experts=True, per_expert_weights=False):
    """Rewrites `model` in memory; returns (model, gates). Raises MoeExportError if nothing matches.
    group_experts: also regroup batched expert sections so dropped slots cost nothing;
    per_expert_weights: with each expert's matrices as initializers of their own (experts.py)."""
    for j, n in enumerate(model.graph.node):  # the passes below track nodes by name
        if not n.name:
            n.name = f"moe_export/node_{j}"
    ix = GraphIndex(model.graph)
    gates, misses = find_gates(model, ix)
    if not gates:
        raise MoeExportError(no_gates_message(model, misses))
    if portable and _opset(model) < 13:
        raise MoeExportError(f"--portable needs ONNX opset >= 13, the model has {_opset(model)}")
    surgery = Surgery(model.graph)
    routers = []       # recorded in metadata for validate/profile/calibrate
    for gi, gate in enumerate(gates):
        a = router_attrs(gate, pol, group_experts)
        b = NodeBuilder(f"moe_export/router_{gi}")
        ftype = _float_type(ix, gate)
        logits = gate.logits
        for v in gate.logits_views:  # the views the gate took its scores through, on the logits
            logits = b.op(v.op_type, [logits, *v.input[1:]],
                          **{x.name: helper.get_attribute_value(x) for x in v.attribute})
        if portable:
            w, idx = _portable(b, a, logits, gate.bias, ftype)
        else:
            inputs = [logits] + ([gate.bias] if gate.bias else [])
            w, idx = b.name("weights"), b.name("indices")
            b.nodes.append(helper.make_node(OP_TYPE, inputs, [w, idx], name=b.name("DynamicRouter"),
                                            domain=DOMAIN, **node_attributes(a)))
        if gate.cast_to is not None and gate.cast_to != ftype:
            w = b.op("Cast", [w], to=gate.cast_to)
        if gate.dense:
            w = _dense(b, logits, w, idx, a.num_experts, gate.cast_to or ftype)
        record = {"layer": gate.name, "family": gate.family, "weights": w, "indices": idx,
                  "logits": gate.logits, "bias": gate.bias, "attrs": node_attributes(a)}
        routers.append(record)
        fused = [gate.topk] if gate.fused else fused_after(ix, gate.indices)
        if fused:
            from .rules.fused_moe import flops_per_pair
            record["flops_per_pair"] = flops_per_pair(ix, fused[0])
        if gate.fused:
            family(gate.family).feed(surgery, b, ix, gate, a, w, idx)
            surgery.insert(b, before=gate.topk.name)
            continue
        for f in fused:  # an in-graph selection scattered into a fused op's routing input
            k = next(x for x in f.attribute if x.name == "k")
            k.i = max(k.i, a.width)
        region = _gate_region(ix, gate)
        raw, clamped = {}, None
        drops = not (a.policy == "static" and a.width == a.k)  # whether any slot can be dropped
        for c in ix.consumers_of(gate.indices):
            uses = _uses(ix, c, gate.indices, gate, region)
            kinds = {kind for kind, _ in uses}
            raw_kinds = {"compared", "scattered", "widened", "shape", "output"}
            kinds = {"indexed" if k == "counted" else k for k in kinds}
            unknown = kinds - raw_kinds - {"indexed"}
            if "indexed" in kinds and kinds & {"scattered", "widened"}:  # one id tensor cannot be both raw and clamped
                unknown.add("a scatter or widened gather and another indexing through one tensor")
            if unknown and drops:
                raise MoeExportError(f"{gate.name}: the expert ids feed {sorted(unknown)[0]}, which moe-export cannot "
                                     "keep right when a slot is dropped (id = num_experts); only --policy static "
                                     "converts this graph")
            for n in (n for kind, n in uses if kind == "counted" and drops):
                axis = attr(n, "axis", 0)  # ScatterElements has only axis and reduction
                del n.attribute[:]
                n.attribute.extend([helper.make_attribute("axis", axis), helper.make_attribute("reduction", "add")])
            if kinds <= raw_kinds:
                raw[c.name] = idx
                for j, (_, n) in enumerate(u for u in uses if u[0] == "scattered"):
                    _widen_scatter(surgery, f"moe_export/router_{gi}/scatter_{j}", n, a.num_experts)
                for j, (_, n) in enumerate(u for u in uses if u[0] == "widened"):
                    _widen_gather(surgery, ix, f"moe_export/router_{gi}/gather_{j}_{c.name}", n,
                                  gate.gathers[ix.source(n.input[0])[0]])
            elif clamped is None:
                clamped = b.op("Min", [idx, b.const(np.int64(a.num_experts - 1))], hint="clamped_indices")
        if gate.gathers:  # the graph weighs the experts itself: its weights stay, the router's go unused
            record["weights"] = gate.weights
        elif gate.masks:
            post = NodeBuilder(f"moe_export/router_{gi}/mask")
            dropped = post.op("Equal", [idx, post.const(np.int64(a.num_experts))])
            zero = post.op("CastLike", [post.const(np.float32(0)), gate.weights])
            record["weights"] = masked = post.op("Where", [dropped, zero, gate.weights], hint="masked_weights")
            surgery.rewire(gate.weights, masked)
            surgery.insert(post, after=ix.producer[gate.weights].name)
        else:
            surgery.rewire(gate.weights, w)
        surgery.rewire(gate.indices, clamped or idx, exceptions=raw, output=idx)
        # The router goes where the gate's TopK stood: after logits and bias, before any user.
        surgery.insert(b, before=gate.topk.name)
        surgery.remove(region)
    surgery.apply()
    unfused = [i for i, g in enumerate(gates) if g.expert_form != "fused"]
    kept = {i: "--no-group-experts" for i in unfused}
    if group_experts:
        from .experts import group_by_expert
        grouped = group_by_expert(model, [routers[i] for i in unfused], per_expert_weights)
        kept = {i: grouped[j] for j, i in enumerate(unfused)}
    for i, (g, r) in enumerate(zip(gates, routers)):
        r["expert_section"] = ("fused com.microsoft MoE op (skips the routes of weight 0 on CPU)" if i not in kept else
                               "grouped by expert" if kept[i] is None else
                               "per-expert loop (a dropped slot matches no expert)" if g.expert_form == "loop" else
                               f"{g.expert_form}, kept as exported: {kept[i]}")
        if r["attrs"]["max_experts"] > r["attrs"]["k"] and g.expert_form == "batched" and kept.get(i) is not None:
            raise MoeExportError(f"max_experts={r['attrs']['max_experts']} exceeds the graph's k={r['attrs']['k']} at "
                                 f"{g.name}: its batched expert section cannot be regrouped ({kept[i]})")
    set_routers_metadata(model, routers, portable, sum(v is None for v in kept.values()))
    if not portable and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    return model, gates


META_KEY = "moe_export.routers"


def set_routers_metadata(model, routers, portable, grouped=0):
    for i, p in enumerate(model.metadata_props):
        if p.key == META_KEY:
            del model.metadata_props[i]
            break
    model.metadata_props.add(key=META_KEY, value=json.dumps({"portable": portable, "routers": routers,
                                                             "grouped_expert_sections": grouped}))


def routers_metadata(model):
    """The routers a conversion recorded, or None for a graph moe-export did not write."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return None


def _opset(model):
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


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


def _filled(b: NodeBuilder, like, last, value, dtype):
    """A tensor of `value` shaped as `like` but with `last` elements on the last axis."""
    shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [like]), b.const([0], np.int64), b.const([-1], np.int64)]),
                            b.const([last], np.int64)], axis=0)
    return b.op("ConstantOfShape", [shape], value=helper.make_tensor("value", dtype, [1], [value]))


def _widen_gather(surgery, ix, prefix, n, fill):
    """GatherElements(data, ids) -> GatherElements(Concat(data, a column of `fill`), ids): a
    dropped slot's id E reads `fill`."""
    pre = NodeBuilder(prefix)
    data = n.input[0]
    col = _filled(pre, data, 1, fill, ix.elem_type(data) or TensorProto.FLOAT)
    wide = pre.op("Concat", [data, col], axis=-1, hint="widened")
    surgery.rewire(data, data, exceptions={n.name: wide})
    surgery.insert(pre, before=n.name)


def _dense(b: NodeBuilder, logits, w, idx, E, dtype):
    """The router's weights as a dense [tokens, E] table, zero where no kept slot points: scattered
    into a table one column wider (a dropped slot's id E lands there) that is then sliced off."""
    table = b.op("ScatterElements", [_filled(b, logits, E + 1, 0, dtype), idx, w], axis=-1)
    return b.op("Slice", [table, b.const([0], np.int64), b.const([E], np.int64), b.const([-1], np.int64)],
                hint="dense_weights")


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


def convert(src, dst, pol: Policy, portable=False, group_experts=True, per_expert_weights=False):
    """Converts the model at `src` into `dst` (never modifying `src`). Returns the gates."""
    return convert_model(src, dst, pol, portable, group_experts, per_expert_weights=per_expert_weights)[0]


def convert_model(src, dst, pol: Policy, portable=False, group_experts=True, protect=(), per_expert_weights=False):
    """convert(), also returning what the user should know about the written files.
    `protect`: further input files no output may replace (a calibration set, ...). An ONNX Runtime
    GenAI model folder as `src` is written as a whole folder `dst`."""
    src, dst = Path(src), Path(dst)
    if genai.is_folder(src):
        def transform(model):
            meta = routers_metadata(model)
            if meta is not None:
                raise MoeExportError(already_converted(src, meta))
            model, gates = rewrite_model(model, pol, portable=portable, group_experts=group_experts,
                                         per_expert_weights=per_expert_weights)
            model.producer_name = "moe-export"
            return model, gates
        return genai.write_folder(src, dst, transform, protect)
    model = load_model(genai.resolve(src))
    with Output(protected=model_files(src) + [Path(p) for p in protect]) as out:
        out.check_model_path(dst)
        meta = routers_metadata(model)
        if meta is not None:
            raise MoeExportError(already_converted(src, meta))
        model, gates = rewrite_model(model, pol, portable=portable, group_experts=group_experts,
                                         per_expert_weights=per_expert_weights)
        model.producer_name = "moe-export"
        out.model(model, dst, src.parent)
    return gates, out.notes


def already_converted(path, meta) -> str:
    pols = sorted({r["attrs"]["policy"] for r in meta["routers"]})
    how = ("convert the original model again" if meta["portable"] else
           f"`moe-export convert {path} -o OUT --repolicy --policy ...` re-sets the policy, "
           f"`moe-export calibrate {path} ...` retunes it")
    return (f"{path} is already converted by moe-export ({len(meta['routers'])} router(s), policy "
            f"{'/'.join(pols)}{', portable' if meta['portable'] else ''}); {how}")


def router_nodes(model):
    """The DynamicRouter node of each router in the metadata, in the same order."""
    meta = routers_metadata(model)
    by_out = {n.output[1]: n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN}
    return [by_out.get(r["indices"]) for r in meta["routers"]]


def set_policy(model, pol: Policy):
    """Re-sets the routing policy of a converted model's DynamicRouter nodes, in place. The
    routers' output width stays (the expert sections were built for it), and so does each
    router's max_experts unless `pol` gives one."""
    meta = routers_metadata(model)
    if meta is None:
        raise MoeExportError("not written by moe-export convert: no routers to re-set")
    if meta["portable"]:
        raise MoeExportError("a --portable conversion has no DynamicRouter nodes to re-set; convert the "
                             "original model again")
    for r, node in zip(meta["routers"], router_nodes(model)):
        if node is None:
            raise MoeExportError(f"router {r['layer']}: its DynamicRouter node is missing from the graph")
        old = RouterAttrs(**r["attrs"])
        policy, t, rn = pol.of(r["layer"])
        try:
            a = RouterAttrs(**dict(r["attrs"], policy=policy, threshold=t, renormalize=rn, min_experts=pol.min_experts,
                                   max_experts=pol.max_experts or old.max_experts)).resolved()
        except SpecError as e:
            raise MoeExportError(f"invalid policy arguments: {e}") from None
        if a.width != old.width:
            raise MoeExportError(f"--max-experts {a.max_experts} changes {r['layer']}'s router width "
                                 f"({old.width} -> {a.width}); convert the original model again for that")
        attrs = node_attributes(a)
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        r["attrs"] = attrs
    set_routers_metadata(model, meta["routers"], False, meta.get("grouped_expert_sections", 0))
    return model


def repolicy(src, dst, pol: Policy, protect=()):
    """Writes `src` (a converted model, or GenAI folder) to `dst` with its routers under `pol`."""
    src, dst = Path(src), Path(dst)
    if genai.is_folder(src):
        def transform(model):
            set_policy(model, pol)
            return model, len(router_nodes(model))
        return genai.write_folder(src, dst, transform, protect)
    model = load_model(genai.resolve(src))
    with Output(protected=model_files(src) + [Path(p) for p in protect]) as out:
        out.check_model_path(dst)
        set_policy(model, pol)
        out.model(model, dst, src.parent)
    return len(router_nodes(model)), out.notes
