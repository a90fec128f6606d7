"""Gating-subgraph rules, one per gate form (``moe_export/rules/``), anchored at the TopK that
picks the experts (or another op a rule names, such as a fused MoE op).

A rule reads a gate's parameters off the graph and returns a :class:`Gate` (``match``); when a
TopK is not of its form it raises :class:`Miss` with the reason, and :class:`NearMiss` when the
form is there but a required piece is not (inspect reports both). Rules follow dataflow, not
node order or names, so they hold across the dynamo and TorchScript exporters and transformers
4.x/5.x. A rule also owns how the router's outputs are wired in its gate's place (``wire``):
the default puts the router's weights where the gate's were; a rule whose graph weighs its
experts otherwise gives its own hook. What every rule shares, the expert ids kept right where a
slot is dropped, is one pass after it (conversion/ids.py). Adding a gate form is adding a module
to ``moe_export/rules/`` that defines ``RULE``, with its tests (docs/adding_a_gate_form.md).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ..model.graph import PASS_THROUGH, GraphIndex, NodeBuilder, Surgery, attr, node_axes
from ..op.spec import RouterAttrs


class Miss(Exception):
    """This TopK is not of the rule's form (the message says what is not there)."""


class NearMiss(Exception):
    """A TopK that looks like gating but a required piece is missing (reported by inspect)."""


@dataclass
class Wiring:
    """What a rule's `wire` hook connects: the router, built where the gate's TopK stood."""
    surgery: Surgery
    ix: GraphIndex
    gate: "Gate"
    attrs: RouterAttrs
    builder: NodeBuilder   # the router's nodes (inserted before the gate's TopK)
    logits: str            # the router's input (the gate's logits, its views re-applied)
    weights: str           # the router's weights, in the type of the gate's
    indices: str           # the router's expert ids (num_experts at a dropped slot)
    dtype: int             # the element type of `weights`


def replace_weights(w: Wiring) -> str:
    """The common wiring: the router's weights replace the gate's. Returns the weights the expert
    section reads (recorded for validate, calibrate and the expert regrouping). A gate whose
    router only selects (Gate.gathers: the graph weighs the experts itself from what it gathers
    at the ids) keeps its weights, and the router's go unused."""
    if w.gate.gathers:
        return w.gate.weights
    w.surgery.rewire(w.gate.weights, w.weights)
    return w.weights


@dataclass(frozen=True)
class Rule:
    family: str
    form: str                                   # the op sequence, for people
    models: str                                 # where it is found
    match: Callable[[GraphIndex, object], "Gate"]  # (index, anchor node) -> Gate; raises Miss / NearMiss
    anchors: tuple = ("TopK",)                  # the ops a gate of this form is anchored at
    wire: Callable[[Wiring], str] = replace_weights
    # The anchor computes the experts itself (a fused MoE op): `wire` feeds it the router's
    # choice, and there are no expert ids in the graph to keep right.
    fused: bool = False
    # Whether the wiring can give a token more than k experts: not where the graph's own k
    # weights stay and the router only picks the ids (sparse_mixer).
    wider: bool = True


def rules() -> tuple:
    """Every rule in moe_export/rules/, in the order of their `ORDER` (then module name)."""
    global _RULES
    if _RULES is None:
        from .. import rules as pkg

        mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
                if m.name != "base"]
        _RULES = tuple(m.RULE for m in sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)))
    return _RULES


_RULES = None


def family(name) -> Rule:
    return next(r for r in rules() if r.family == name)


@dataclass
class Gate:
    family: str
    topk: object                 # the NodeProto that selects experts
    logits: str
    bias: str | None
    weights: str                 # the tensor the expert section multiplies by
    indices: str
    attrs: dict                  # DynamicRouter attributes read off the graph
    expert_form: str = "unknown"  # how indices are consumed: "batched" (gather), "loop" (one-hot), "fused"
    cast_to: int | None = None   # a Cast between scores and TopK: the weights' element type
    logits_views: tuple = ()     # view ops between the scores and the ranking, re-applied to the logits
    # The router only selects; the graph weighs the chosen experts itself from the tensors it
    # gathers at the ids: {tensor: what a dropped slot gathers} (0 for scores summed, -inf for
    # logits that go through a sigmoid or an exp). weights is then the graph's own weights (the
    # experts' regrouping reads them) or, where they are not one tensor, the TopK's unused values.
    gathers: dict | None = None

    @property
    def name(self):
        return self.topk.name or self.indices

    @property
    def fused(self) -> bool:
        """The gate is inside a fused MoE op: the router's choice is fed to that op."""
        return family(self.family).fused

    def describe(self) -> dict:
        a = self.attrs
        return {
            "layer": self.name, "family": self.family, "form": f"{family(self.family).form} ({family(self.family).models})",
            "num_experts": a["num_experts"], "k": a["k"], "scoring": a["score_func"],
            "select": a["select"], "normalize": bool(a["normalize"]), "scale": a["scale"],
            "n_group": a["n_group"], "topk_group": a["topk_group"],
            "correction_bias": self.bias is not None, "experts": self.expert_form,
            "logits": self.logits, "weights": self.weights, "indices": self.indices,
        }


def scalar(ix: GraphIndex, name):
    v = ix.const(name)
    if v is None or v.size != 1:
        return None
    return v.reshape(()).item()


def last_axis(node, ix, tensor, default=-1):
    ax = attr(node, "axis", default)
    if ax == -1:
        return True
    v = ix.value_info.get(tensor)
    if v is not None and v.type.tensor_type.HasField("shape"):
        return ax == len(v.type.tensor_type.shape.dim) - 1
    return ax == 1  # router tensors are [tokens, experts] in every exporter seen


def topk_k(ix, tk):
    if len(tk.input) < 2:  # opset < 10 keeps k as an attribute
        k = attr(tk, "k")
    else:
        k = scalar(ix, tk.input[1])
    if k is None:
        raise NearMiss(f"TopK {tk.name!r} has a non-constant k; the router's k must be a constant")
    return int(k)


def weights_chain(ix, w0):
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
            den = _guarded(ix, rs.output[0], dv.input[1])
            if dv.input[1] == den:
                cur, normalize, cast = dv.output[0], 1, to or cast
    t, to = ix.through_casts(cur)
    m = ix.only_consumer(t, "Mul")
    if m is not None:
        c = scalar(ix, m.input[1] if m.input[0] == t else m.input[0])
        if c is not None:
            cur, scale, cast = m.output[0], float(c), to or cast
    return cur, normalize, scale, cast


def sigmoid_of(ix, scores):
    """x where `scores` = sigmoid(x): a Sigmoid, or the form spelled out as Reciprocal(1 + Exp(-x))
    or 1 / (1 + Exp(-x)) (ONNX Runtime GenAI's builder writes it so, for its accuracy near 0)."""
    p = ix.producer.get(scores)
    if p is None:
        return None
    if p.op_type == "Sigmoid":
        return p.input[0]
    if p.op_type == "Reciprocal":
        den = p.input[0]
    elif p.op_type == "Div" and scalar(ix, p.input[0]) == 1.0:
        den = p.input[1]
    else:
        return None
    add = ix.producer.get(den)
    if add is None or add.op_type != "Add":
        return None
    one = [i for i in add.input if scalar(ix, i) == 1.0]
    exp = ix.producer.get(next((i for i in add.input if i not in one), ""))
    if len(one) != 1 or exp is None or exp.op_type != "Exp":
        return None
    neg = ix.producer.get(exp.input[0])
    return neg.input[0] if neg is not None and neg.op_type == "Neg" else None


def experts_of(ix, tk, *tensors):
    """The number of experts, read off the first of `tensors` that tells it; a NearMiss if none."""
    E = num_experts(ix, *tensors)
    if E is None:
        raise NearMiss(f"TopK {tk.name!r}: cannot tell the number of experts (run onnx shape inference first)")
    return E


def gathered(ix, tk, scores):
    """The GatherElements taking the weights from `scores` at the ids `tk` chose, or None."""
    return next((c for c in ix.consumers_of(tk.output[1])
                 if c.op_type == "GatherElements" and ix.source(c.input[0])[0] == scores), None)


def _guarded(ix, den, divisor):
    """The denominator of a renormalization, through a guard against a zero sum that changes
    nothing for real scores: sum + eps, Clip(sum, min=eps) or Max(sum, eps), eps < 1e-6."""
    g = ix.only_consumer(den)
    if g is None or g.output[0] != divisor or g.op_type not in ("Add", "Clip", "Max"):
        return den
    if g.op_type == "Clip":
        small = len(g.input) > 1 and g.input[0] == den and (len(g.input) < 3 or not g.input[2])
        eps = scalar(ix, g.input[1]) if small else None
    else:
        eps = scalar(ix, g.input[1] if g.input[0] == den else g.input[0])
    return g.output[0] if eps is not None and abs(eps) < 1e-6 else den


FUSED_OPS = ("MoE", "QMoE")        # com.microsoft: experts and their mixing in one op
FUSED_DOMAIN = "com.microsoft"


def is_fused(node) -> bool:
    return node.op_type in FUSED_OPS and node.domain == FUSED_DOMAIN


def fused_after(ix, indices):
    """The fused MoE ops whose router_probs are a scatter by `indices` (an in-graph selection
    written into the op's routing input, view ops and Casts stepped over)."""
    def ahead(t, want):  # consumers of t through view ops, with the tensor each reads
        out, stack = [], [t]
        while stack:
            t = stack.pop()
            for c in ix.consumers_of(t):
                if c.op_type in PASS_THROUGH:
                    stack.append(c.output[0])
                elif want(c, t):
                    out.append(c)
        return out

    scatters = ahead(indices, lambda c, t: c.op_type == "ScatterElements" and c.input[1] == t)
    return [f for s in scatters for f in ahead(s.output[0], lambda c, t: is_fused(c) and c.input[1] == t)]


def expert_form(ix, indices):
    ops = set()
    stack, seen = [indices], set()
    while stack:  # look through reshapes to the op that consumes the expert ids
        t = stack.pop()
        for c in ix.consumers_of(t):
            if c.op_type in PASS_THROUGH and c.name not in seen:
                seen.add(c.name)
                stack.extend(c.output)
            else:
                ops.add(c.op_type)
    if ops & {"OneHot", "Equal"}:
        return "loop"
    if ops & {"Gather", "GatherND", "GatherElements"}:
        return "batched"
    return "unknown"


def num_experts(ix, *tensors):
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
            e = num_experts(ix, p.input[0])
            if e:
                return e
    return None


def find_gates(model, ix: GraphIndex | None = None):
    """All MoE gates in the main graph, plus near misses (TopKs that almost matched)."""
    gates, misses = [], []
    for row in explain(model, ix):
        if row["gate"] is not None:
            gates.append(row["gate"])
        elif row["near_miss"]:
            misses.append(row["near_miss"])
    return gates, misses


def explain(model, ix: GraphIndex | None = None) -> list[dict]:
    """For each TopK (and each other op a rule anchors at, such as a fused MoE): the gate a rule
    took it as, or why each rule did not."""
    ix = ix or GraphIndex(model.graph)
    anchors = {op for r in rules() for op in r.anchors}
    out = []
    for n in list(model.graph.node):
        if n.op_type not in anchors:
            continue
        row = {"topk": n.name, "op": n.op_type, "gate": None, "near_miss": None, "why_not": {}}
        out.append(row)
        if n.op_type == "TopK" and (attr(n, "largest", 1) != 1 or not last_axis(n, ix, n.input[0])):
            row["why_not"]["*"] = "not a largest-k selection over the last axis"
            continue
        for rule in rules():
            if n.op_type not in rule.anchors:
                continue
            try:
                g = rule.match(ix, n)
            except Miss as e:
                row["why_not"][rule.family] = str(e)
                continue
            except NearMiss as e:
                row["near_miss"] = str(e)
                break
            if not 1 <= g.attrs["k"] <= g.attrs["num_experts"]:
                row["near_miss"] = f"TopK {n.name!r}: k={g.attrs['k']} outside [1, {g.attrs['num_experts']}]"
                break
            g.expert_form = "fused" if g.fused or fused_after(ix, g.indices) else expert_form(ix, g.indices)
            row["gate"], row["why_not"] = g, {}
            break
    return out


def no_gates_message(model, misses) -> str:
    if misses:
        return "no MoE gate could be rewritten: " + "; ".join(dict.fromkeys(misses))
    n_topk = sum(n.op_type == "TopK" for n in model.graph.node)
    if n_topk == 0:
        return "no MoE gating found: the graph has no TopK node (expected softmax/sigmoid scores -> TopK over experts)"
    return (f"no MoE gating found among {n_topk} TopK node(s): none is fed by Softmax or Sigmoid scores "
            "over experts, nor followed by a Softmax of its values")
