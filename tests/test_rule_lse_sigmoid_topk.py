"""The lse_sigmoid_topk rule (Inkling): sigmoid over routed + shared logits, the routed part plus
a bias ranks, the graph weighs chosen and shared experts by log-sigmoids normalized by their
log-sum-exp; the router only selects and a dropped slot gathers a logit of -inf."""

import numpy as np
import pytest
import onnx
import onnxruntime as ort

import moe_export
from helpers import assert_top1_is_the_k1_model
from moe_export.conversion import Policy, rewrite_model
from helpers import E, G, K, only_row

R = E - 1  # routed experts; the last logit is one shared expert's
BIAS = np.linspace(-0.2, 0.2, R).astype(np.float32)


def lse_sigmoid(shared_through_sigmoid=True):
    g = G()
    starts, ends, axes = g.const([0]), g.const([R]), g.const([1])
    routed_scores = g.op("Slice", [g.op("Sigmoid", ["logits"]), starts, ends, axes])
    v, i = g.topk(g.op("Add", [routed_scores, g.const(BIAS, np.float32)]))
    chosen = g.op("GatherElements", [g.op("Slice", ["logits", starts, ends, axes]), i], axis=1)
    shared = g.op("Slice", ["logits", g.const([R]), g.const([E]), axes])
    cat = g.op("Concat", [chosen, shared], axis=1)
    ls = g.op("Log", [g.op("Sigmoid" if shared_through_sigmoid else "Exp", [cat])])
    w = g.op("Exp", [g.op("Sub", [ls, g.op("ReduceLogSumExp", [ls, g.const([-1])], keepdims=1)])])
    return g.model(g.op("Slice", [w, g.const([0]), g.const([K]), axes]), i)


def test_static_is_the_graph_and_a_dropped_slot_leaves_the_normalization():
    m = lse_sigmoid()
    g = only_row(m)["gate"]
    assert g.family == "lse_sigmoid_topk" and g.attrs["num_experts"] == R
    x = np.random.default_rng(0).standard_normal((64, E)).astype(np.float32) * 2
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": x})
    static = onnx.ModelProto()
    static.CopyFrom(m)
    rewrite_model(static, Policy("static"))
    got = moe_export.session(static).run(None, {"logits": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    rewrite_model(m, Policy("top-p", 1e-6))
    w, i = moe_export.session(m).run(None, {"logits": x})
    sig = 1 / (1 + np.exp(-x))
    top = np.argmax(sig[:, :R] + BIAS, axis=1)
    assert (i[:, 0] == top).all() and (i[:, 1] == R).all()
    kept = sig[np.arange(len(x)), top]
    np.testing.assert_allclose(w[:, 0], kept / (kept + sig[:, R]), rtol=1e-5)
    np.testing.assert_array_equal(w[:, 1], 0)


def test_gathered_logits_not_through_a_sigmoid_are_not_this_form():
    row = only_row(lse_sigmoid(shared_through_sigmoid=False))
    assert row["gate"] is None and "lse_sigmoid_topk" in row["why_not"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    assert_top1_is_the_k1_model('inkling_text', tmp_path, num_experts_per_tok=1)
