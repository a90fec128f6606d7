"""Each gate rule on minimal synthetic graphs: every optional branch taken and not taken, and
the reason a rule gives when a TopK is not of its form. Converted graphs are run against the
original in ONNX Runtime for the positive cases."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import moe_export
from helpers import E, G, check_parity, normalize, only_row
from moe_export.conversion import Policy, rewrite_model
from moe_export.rules.base import rules


def softmax_topk(norm=False, eps=None, scale=None, cast=False, axis=-1, guard="Add"):
    g = G()
    p = g.op("Softmax", ["logits"], axis=axis)
    if cast:
        p = g.cast(g.cast(p, TensorProto.FLOAT16), TensorProto.FLOAT)
    w, i = g.topk(p)
    if norm:
        w = normalize(g, w, eps, guard)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    return g.model(w, i)


def topk_softmax(scale=None, cast=False, extra_consumer=False):
    g = G()
    v, i = g.topk("logits")
    if cast:
        v = g.cast(g.cast(v, TensorProto.FLOAT16), TensorProto.FLOAT)
    w = g.op("Softmax", [v], axis=-1)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    if extra_consumer:
        g.op("Neg", [v])
    return g.model(w, i)


def sigmoid_topk(bias=False, groups=False, gather=True, norm=False, eps=None, scale=None, both_vary=False,
                 view=False, spelled=None):
    g = G()
    if spelled:  # ORT GenAI's builder: Reciprocal(1 + Exp(-x)), or 1 / (1 + Exp(-x))
        den = g.op("Add", [g.op("Exp", [g.op("Neg", ["logits"])]), g.const(1.0, np.float32)])
        s = g.op("Reciprocal", [den]) if spelled == "Reciprocal" else g.op("Div", [g.const(1.0, np.float32), den])
    else:
        s = g.op("Sigmoid", ["logits"])
    b = np.linspace(-0.1, 0.1, E)
    if view:  # optimum (TorchScript): scores.view(-1, E) + bias.unsqueeze(0)
        choice = g.op("Add", [g.op("Reshape", [s, g.const([-1, E])]), g.const(b[None], np.float32)])
    else:
        choice = g.op("Add", [s, g.const(b, np.float32)]) if bias else s
    key = choice
    if groups:  # DeepSeek-V3: 4 groups of 2, the best 2 groups by the sum of their best 2 keys
        grouped = g.op("Reshape", [choice, g.const([-1, 4, 2])])
        best = g.topk(grouped, 2)[0]
        gsum = g.op("ReduceSum", [best, g.const([-1])], keepdims=0)
        gidx = g.topk(gsum, 2)[1]
        mask = g.op("ScatterElements", [g.op("Mul", [gsum, g.const(0.0, np.float32)]), gidx,
                                        g.op("Add", [g.op("Mul", [g.cast(gidx, TensorProto.FLOAT), g.const(0.0, np.float32)]),
                                                     g.const(1.0, np.float32)])], axis=1)
        full = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [mask, g.const([-1])]), g.const([1, 1, 2])]),
                                g.const([-1, E])])
        off = g.op("Not", [g.cast(full, TensorProto.BOOL)])
        other = "logits" if both_vary else g.const(-np.inf, np.float32)
        key = g.op("Where", [off, other, choice])
    w, i = g.topk(key)
    if gather:
        w = g.op("GatherElements", [s, i], axis=1)
    if norm:
        w = normalize(g, w, eps)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    return g.model(w, i)


@pytest.mark.parametrize("kw, attrs", [
    ({}, dict(normalize=0, scale=1.0)),
    ({"norm": True}, dict(normalize=1)),
    ({"norm": True, "eps": 1e-20}, dict(normalize=1)),
    ({"norm": True, "eps": 1e-12, "guard": "Clip"}, dict(normalize=1)),
    ({"norm": True, "eps": 1e-12, "guard": "Max"}, dict(normalize=1)),
    ({"scale": 2.5}, dict(normalize=0, scale=2.5)),
    ({"norm": True, "scale": 1.5, "cast": True}, dict(normalize=1, scale=1.5)),
])
def test_softmax_topk_branches(kw, attrs, tmp_path):
    m = softmax_topk(**kw)
    row = only_row(m)
    assert row["gate"] is not None and row["gate"].family == "softmax_topk", row
    assert {k: row["gate"].attrs[k] for k in attrs} == pytest.approx(attrs)
    check_parity(m, tmp_path)


def test_softmax_topk_declines():
    row = only_row(softmax_topk(axis=0))
    assert row["gate"] is None and "not over the experts" in row["why_not"]["softmax_topk"]
    # an eps that is not small is not a renormalization's guard: the gate stops before it
    row = only_row(softmax_topk(norm=True, eps=0.5))
    assert row["gate"].attrs["normalize"] == 0
    row = only_row(softmax_topk(norm=True, eps=0.5, guard="Clip"))
    assert row["gate"].attrs["normalize"] == 0


@pytest.mark.parametrize("kw, scale", [({}, 1.0), ({"scale": 3.0}, 3.0), ({"cast": True}, 1.0)])
def test_topk_softmax_branches(kw, scale, tmp_path):
    m = topk_softmax(**kw)
    row = only_row(m)
    assert row["gate"].family == "topk_softmax" and row["gate"].attrs["select"] == "before_score"
    assert row["gate"].attrs["scale"] == scale
    check_parity(m, tmp_path)


def test_topk_softmax_declines_values_used_elsewhere():
    row = only_row(topk_softmax(extra_consumer=True))
    assert row["gate"] is None and "Softmax alone" in row["why_not"]["topk_softmax"]


@pytest.mark.parametrize("kw, attrs", [
    ({"gather": False}, dict(n_group=1, normalize=0)),
    ({"bias": True}, dict(n_group=1)),
    ({"bias": True, "norm": True, "eps": 1e-20, "scale": 2.5}, dict(normalize=1, scale=2.5)),
    ({"bias": True, "groups": True, "norm": True}, dict(n_group=4, topk_group=2, group_score_topk=2, normalize=1)),
    ({"bias": True, "view": True, "groups": True, "norm": True, "scale": 2.5}, dict(n_group=4, normalize=1, scale=2.5)),
    ({"bias": True, "spelled": "Reciprocal"}, dict(normalize=0)),
    ({"gather": False, "spelled": "Div", "norm": True}, dict(normalize=1)),
])
def test_sigmoid_topk_branches(kw, attrs, tmp_path):
    m = sigmoid_topk(**kw)
    row = only_row(m)
    assert row["gate"].family == "sigmoid_topk", row
    assert (row["gate"].bias is not None) == kw.get("bias", False)
    assert [v.op_type for v in row["gate"].logits_views] == (["Reshape"] if kw.get("view") else [])
    assert {k: row["gate"].attrs[k] for k in attrs} == pytest.approx(attrs)
    check_parity(m, tmp_path)


def test_a_sigmoid_spelled_otherwise_is_not_one():
    g = G()  # 1 / (2 + exp(-x)) is no sigmoid
    den = g.op("Add", [g.op("Exp", [g.op("Neg", ["logits"])]), g.const(2.0, np.float32)])
    w, i = g.topk(g.op("Reciprocal", [den]))
    row = only_row(g.model(w, i))
    assert row["gate"] is None and "Sigmoid" in row["why_not"]["sigmoid_topk"]


def test_sigmoid_topk_declines_and_near_misses():
    row = only_row(sigmoid_topk(bias=True, groups=True, both_vary=True))
    assert row["gate"] is None and "both branches vary" in row["why_not"]["sigmoid_topk"]
    # a biased ranking whose weights do not come from the sigmoid scores: the form is there, a piece is not
    row = only_row(sigmoid_topk(bias=True, gather=False))
    assert row["gate"] is None and "not gathered from the sigmoid scores" in row["near_miss"]


def test_every_rule_says_why_not():
    g = G()
    w, i = g.topk(g.op("Relu", ["logits"]))
    row = only_row(g.model(w, i))
    assert row["gate"] is None and set(row["why_not"]) == {r.family for r in rules() if "TopK" in r.anchors}
    assert all(row["why_not"].values())


@pytest.mark.parametrize("router", ["Gemm_transB", "Gemm", "MatMul"])
def test_number_of_experts_from_the_router_weight(router):
    """No shape information on the logits: E comes from the router's weight."""
    H = 6
    g = G()
    w = np.random.default_rng(0).standard_normal((E, H) if router == "Gemm_transB" else (H, E)).astype(np.float32)
    op = router.split("_")[0]
    kw = {"transB": 1} if router == "Gemm_transB" else {}
    logits = g.op(op, ["hidden", g.const(w, np.float32)], **kw)
    wts, idx = g.topk(g.op("Softmax", [logits], axis=-1))
    m = g.model(wts, idx)
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", H]))
    row = only_row(m)
    assert row["gate"].attrs["num_experts"] == E, row


def test_unknown_number_of_experts_is_a_near_miss():
    g = G()
    wts, idx = g.topk(g.op("Softmax", [g.op("Relu", ["hidden"])], axis=-1))
    m = g.model(wts, idx)
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None))
    row = only_row(m)
    assert row["gate"] is None and "cannot tell the number of experts" in row["near_miss"]


def test_sigmoid_topk_behind_a_view_routes_as_the_spec():
    """Dynamic routing of the optimum form: the view re-applied to the logits, the [1, E] bias."""
    m = sigmoid_topk(bias=True, view=True, groups=True, norm=True, scale=2.5)
    gate = only_row(m)["gate"]
    conv = rewrite_model(m, Policy("top-p", 0.3))[0]
    x = np.random.default_rng(3).standard_normal((64, E)).astype(np.float32)
    w, idx = moe_export.session(conv).run(None, {"logits": x})
    attrs = {k: v for k, v in gate.attrs.items()}
    sw, sidx = moe_export.dynamic_router(x, np.linspace(-0.1, 0.1, E).astype(np.float32), **attrs,
                                         policy="top-p", threshold=0.3, max_experts=attrs["k"])
    order, sorder = np.argsort(idx, -1), np.argsort(sidx, -1)
    np.testing.assert_array_equal(np.take_along_axis(idx, order, -1), np.take_along_axis(sidx, sorder, -1))
    np.testing.assert_allclose(np.take_along_axis(w, order, -1), np.take_along_axis(sw, sorder, -1), rtol=1e-5)
    assert (idx == E).any()  # the policy dropped slots
