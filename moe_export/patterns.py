"""Gating-subgraph patterns, one per family, anchored at the TopK that picks the experts.

Each pattern reads a gate's parameters off the graph and returns a :class:`Gate`; none of them
touches the graph. Patterns follow dataflow, not node order or names, so they hold across the
dynamo and TorchScript exporters and transformers 4.x/5.x.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import MoeExportError
from .graph import GraphIndex, attr, node_axes
from .schema import gate_defaults

FAMILIES = {
    "softmax_topk": "softmax -> top-k (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)",
    "topk_softmax": "top-k on logits -> softmax (GPT-OSS)",
    "sigmoid_topk": "sigmoid + correction bias -> [group-limited] top-k -> gather (DeepSeek-V3)",
}


@dataclass
class Gate:
    family: str
    topk: object                 # the NodeProto that selects experts
    logits: str
    bias: str | None
    weights: str                 # the tensor the expert section multiplies by
    indices: str
    attrs: dict                  # DynamicRouter attributes read off the graph
    expert_form: str = "unknown"  # how indices are consumed: "batched" (gather) or "loop" (one-hot)
    cast_to: int | None = None   # a Cast between scores and TopK: the weights' element type

    @property
    def name(self):
        return self.topk.name or self.indices

    def describe(self) -> dict:
        a = self.attrs
        return {
            "layer": self.name, "family": self.family, "form": FAMILIES[self.family],
            "num_experts": a["num_experts"], "k": a["k"], "scoring": a["score_func"],
            "select": a["select"], "normalize": bool(a["normalize"]), "scale": a["scale"],
            "n_group": a["n_group"], "topk_group": a["topk_group"],
            "correction_bias": self.bias is not None, "experts": self.expert_form,
            "logits": self.logits, "weights": self.weights, "indices": self.indices,
        }


class NearMiss(Exception):
    """A TopK that looks like gating but a required piece is missing (reported by inspect)."""


def _scalar(ix: GraphIndex, name):
    v = ix.const(name)
    if v is None or v.size != 1:
        return None
    return v.reshape(()).item()


def _last_axis(node, ix, tensor, default=-1):
    ax = attr(node, "axis", default)
    if ax == -1:
        return True
    v = ix.value_info.get(tensor)
    if v is not None and v.type.tensor_type.HasField("shape"):
        return ax == len(v.type.tensor_type.shape.dim) - 1
    return ax == 1  # router tensors are [tokens, experts] in every exporter seen


def _topk_k(ix, tk):
    if len(tk.input) < 2:  # opset < 10 keeps k as an attribute
        k = attr(tk, "k")
    else:
        k = _scalar(ix, tk.input[1])
    if k is None:
        raise NearMiss(f"TopK {tk.name!r} has a non-constant k; the router's k must be a constant")
    return int(k)


def _weights_chain(ix, w0):
    """Follows optional renormalization (x / sum(x) [+eps]) and scaling (x * c) after w0, Casts
    stepped over. Returns (weights, normalize, scale, the type of the last Cast taken, or None)."""
    cur, normalize, scale, cast = w0, 0, 1.0, None
    t, to = ix.through_casts(cur)
    cons = ix.consumers_of(t)
    if len(cons) == 2 and t not in ix.graph_outputs:
        rs = next((c for c in cons if c.op_type == "ReduceSum"), None)
        dv = next((c for c in cons if c.op_type == "Div" and c.input[0] == t), None)
        if rs is not None and dv is not None and attr(rs, "keepdims", 1) == 1 \
                and node_axes(ix, rs) in ([-1], [1]):
            den = rs.output[0]
            eps = ix.only_consumer(den, "Add")
            if eps is not None and dv.input[1] == eps.output[0]:
                other = eps.input[1] if eps.input[0] == den else eps.input[0]
                e = _scalar(ix, other)
                if e is not None and abs(e) < 1e-6:
                    den = eps.output[0]
            if dv.input[1] == den:
                cur, normalize, cast = dv.output[0], 1, to or cast
    t, to = ix.through_casts(cur)
    m = ix.only_consumer(t, "Mul")
    if m is not None:
        c = _scalar(ix, m.input[1] if m.input[0] == t else m.input[0])
        if c is not None:
            cur, scale, cast = m.output[0], float(c), to or cast
    return cur, normalize, scale, cast


def _expert_form(ix, indices):
    ops = set()
    stack, seen = [indices], set()
    while stack:  # look through reshapes to the op that consumes the expert ids
        t = stack.pop()
        for c in ix.consumers_of(t):
            if c.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Transpose") and c.name not in seen:
                seen.add(c.name)
                stack.extend(c.output)
            else:
                ops.add(c.op_type)
    if ops & {"OneHot", "Equal"}:
        return "loop"
    if ops & {"Gather", "GatherND", "GatherElements"}:
        return "batched"
    return "unknown"


def _num_experts(ix, *tensors):
    for t in tensors:
        e = ix.static_last_dim(t)
        if e:
            return e
        p = ix.producer.get(t)  # a linear router: the weight's dims give E without shape inference
        if p is not None and p.op_type in ("Gemm", "MatMul"):
            w = ix.initializers.get(p.input[1])
            if w is not None and len(w.dims) == 2:
                return w.dims[0] if (p.op_type == "Gemm" and attr(p, "transB", 0)) else w.dims[1]
        if p is not None and p.op_type in ("Add", "Cast") and t != p.input[0]:
            e = _num_experts(ix, p.input[0])
            if e:
                return e
    return None


def match_softmax_topk(ix, tk):
    scores, cast_to = ix.source(tk.input[0])
    sm = ix.producer.get(scores)
    if sm is None or sm.op_type != "Softmax" or not _last_axis(sm, ix, sm.input[0]):
        return None
    k = _topk_k(ix, tk)
    E = _num_experts(ix, sm.output[0], sm.input[0])
    if E is None:
        raise NearMiss(f"softmax->TopK {tk.name!r}: cannot tell the number of experts (run onnx shape inference first)")
    w, normalize, scale, cast = _weights_chain(ix, tk.output[0])
    a = gate_defaults(E, k) | dict(normalize=normalize, scale=scale)
    return Gate("softmax_topk", tk, sm.input[0], None, w, tk.output[1], a, cast_to=cast or cast_to)


def match_topk_softmax(ix, tk):
    vals, to = ix.through_casts(tk.output[0])
    sm = ix.only_consumer(vals, "Softmax")
    if sm is None or not _last_axis(sm, ix, vals):
        return None
    k = _topk_k(ix, tk)
    E = _num_experts(ix, tk.input[0])
    if E is None:
        raise NearMiss(f"TopK->softmax {tk.name!r}: cannot tell the number of experts")
    w, _, scale, cast = _weights_chain(ix, sm.output[0])
    a = gate_defaults(E, k) | dict(select="before_score", scale=scale)
    return Gate("topk_softmax", tk, tk.input[0], None, w, tk.output[1], a, cast_to=cast or to)


def _group_params(ix, choice, E):
    """DeepSeek-V3 group limiting: Reshape(choice,[.., G, E/G]) -> TopK(t) -> ReduceSum -> TopK(topk_group)."""
    for r in ix.followers(choice, "Reshape"):
        shape = ix.const(r.input[1])
        if shape is None or shape.size < 2:
            continue
        G, gs = int(shape.reshape(-1)[-2]), int(shape.reshape(-1)[-1])
        if G <= 0 and gs > 0:
            G = E // gs
        if gs <= 0 and G > 0:
            gs = E // G
        # Other consumers (Shape for a zeros_like, ...) may share these tensors.
        first = lambda t, op: next(iter(ix.followers(t, op)), None)
        t1 = first(r.output[0], "TopK")
        if t1 is None or G * gs != E:
            continue
        rs = first(t1.output[0], "ReduceSum")
        t2 = rs and first(rs.output[0], "TopK")
        if t2 is None:
            continue
        return dict(n_group=G, group_score_topk=_topk_k(ix, t1), topk_group=_topk_k(ix, t2))
    raise NearMiss("masked top-k without a recognizable expert-group selection")


def match_sigmoid_topk(ix, tk):
    scores, cast_to = ix.source(tk.input[0])
    src = ix.producer.get(scores)
    where = None
    if src is not None and src.op_type == "Where":
        # masked_fill(~group_mask, -inf): the non-constant branch carries the choice scores
        cands = [i for i in src.input[1:] if ix.const(ix.source(i)[0]) is None]
        if len(cands) != 1:
            return None
        where, choice = src, ix.source(cands[0])[0]
        src = ix.producer.get(choice)
    else:
        choice = scores
    bias = None
    if src is not None and src.op_type == "Add":
        sig = next((n for n in map(lambda i: ix.source_node(i, "Sigmoid"), src.input) if n is not None), None)
        if sig is None:
            return None
        bias = src.input[1] if ix.source(src.input[0])[0] == sig.output[0] else src.input[0]
    elif src is not None and src.op_type == "Sigmoid":
        sig = src
    else:
        return None
    k = _topk_k(ix, tk)
    E = _num_experts(ix, sig.output[0], sig.input[0], bias) if bias else _num_experts(ix, sig.output[0], sig.input[0])
    if E is None:
        raise NearMiss(f"sigmoid->TopK {tk.name!r}: cannot tell the number of experts")
    a = gate_defaults(E, k) | dict(score_func="sigmoid")
    if where is not None:
        a |= _group_params(ix, choice, E)
    ge = next((c for c in ix.consumers_of(tk.output[1])
               if c.op_type == "GatherElements" and ix.source(c.input[0])[0] == sig.output[0]), None)
    if ge is not None:
        w0, w0_cast = ge.output[0], ix.source(ge.input[0])[1]
    elif bias is None and where is None:
        w0, w0_cast = tk.output[0], cast_to  # the top-k values are the sigmoid scores themselves
    else:
        raise NearMiss(f"sigmoid gate {tk.name!r}: weights are not gathered from the sigmoid scores")
    w, normalize, scale, cast = _weights_chain(ix, w0)
    a |= dict(normalize=normalize, scale=scale)
    return Gate("sigmoid_topk", tk, sig.input[0], bias, w, tk.output[1], a, cast_to=cast or w0_cast)


PATTERNS = (match_softmax_topk, match_topk_softmax, match_sigmoid_topk)


def find_gates(model, ix: GraphIndex | None = None):
    """All MoE gates in the main graph, plus near misses (TopKs that almost matched)."""
    ix = ix or GraphIndex(model.graph)
    gates, misses = [], []
    for n in list(model.graph.node):
        if n.op_type != "TopK" or attr(n, "largest", 1) != 1 or not _last_axis(n, ix, n.input[0]):
            continue
        for pat in PATTERNS:
            try:
                g = pat(ix, n)
            except NearMiss as e:
                misses.append(str(e))
                break
            if g is not None:
                if not 1 <= g.attrs["k"] <= g.attrs["num_experts"]:
                    misses.append(f"TopK {n.name!r}: k={g.attrs['k']} outside [1, {g.attrs['num_experts']}]")
                    break
                g.expert_form = _expert_form(ix, g.indices)
                gates.append(g)
                break
    return gates, misses


def no_gates_message(model, misses) -> str:
    if misses:
        return "no MoE gate could be rewritten: " + "; ".join(dict.fromkeys(misses))
    n_topk = sum(n.op_type == "TopK" for n in model.graph.node)
    if n_topk == 0:
        return "no MoE gating found: the graph has no TopK node (expected softmax/sigmoid scores -> TopK over experts)"
    return (f"no MoE gating found among {n_topk} TopK node(s): none is fed by Softmax or Sigmoid scores "
            "over experts, nor followed by a Softmax of its values")
