"""The scores_bias_topk rule (DeepSeek-V4): any scores plus a bias rank, the graph weighs the
chosen experts by the unbiased scores it gathers; the router only selects and a dropped slot
gathers 0."""

import numpy as np
import onnxruntime as ort
import pytest

import moe_export
from helpers import assert_top1_is_the_k1_model
from moe_export.conversion import Policy, rewrite_model
from helpers import E, G, normalize, only_row

BIAS = np.linspace(-0.3, 0.3, E).astype(np.float32)


def sqrt_softplus_topk(then=None):
    g = G()
    s = g.op("Sqrt", [g.op("Softplus", ["logits"])])
    v, i = g.topk(g.op("Add", [s, g.const(BIAS, np.float32)]))
    w = g.op("GatherElements", [s, i], axis=1)
    w = g.op(then, [w]) if then else normalize(g, w)
    return g.model(w, i)


def logits(n=64):
    return np.random.default_rng(0).standard_normal((n, E)).astype(np.float32) * 2


def test_static_is_the_graph_and_a_dropped_slot_weighs_nothing():
    m = sqrt_softplus_topk()
    g = only_row(m)["gate"]
    assert g.family == "scores_bias_topk" and g.attrs["select"] == "before_score" and g.bias is not None
    x = logits()
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": x})
    static = onnx_copy(m)
    rewrite_model(static, Policy("static"))
    got = moe_export.session(static).run(None, {"logits": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])  # the graph's own arithmetic: bit for bit
    rewrite_model(m, Policy("top-p", 1e-6))
    w, i = moe_export.session(m).run(None, {"logits": x})
    s = np.sqrt(np.log1p(np.exp(x)))
    np.testing.assert_array_equal(i[:, 0], np.argmax(s + BIAS, axis=1))
    assert (i[:, 1] == E).all()
    np.testing.assert_allclose(w, np.tile([1.0, 0.0], (len(x), 1)), rtol=1e-6)


def onnx_copy(m):
    import onnx
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


@pytest.mark.parametrize("op", ["Exp", "Softmax"])
def test_gathered_scores_through_a_function_that_would_weigh_a_zero_are_not_this_form(op):
    row = only_row(sqrt_softplus_topk(then=op))
    assert row["gate"] is None and "scores_bias_topk" in row["why_not"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    """DeepSeek-V4's learned layers (its hash layers route by a token table and stay as they are)."""
    assert_top1_is_the_k1_model('deepseek_v4', tmp_path, num_experts_per_tok=1)
