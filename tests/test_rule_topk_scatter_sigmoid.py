"""The topk_scatter_sigmoid rule (Llama 4): TopK on the raw logits, the chosen logits scattered
into a table of -inf, its Sigmoid the dense routing weights (0 for experts not chosen)."""

import numpy as np
import pytest
import onnxruntime as ort

import moe_export
from helpers import assert_top1_is_the_k1_model
from moe_export.conversion import Policy, rewrite_model
from moe_export.rules.base import family
from moe_export.rules.topk_scatter_sigmoid import dense_weights
from helpers import E, G, only_row


def topk_scatter_sigmoid(fill=float("-inf")):
    g = G()
    v, i = g.topk("logits")
    table = g.op("Expand", [g.const(fill, np.float32), g.op("Shape", ["logits"])])
    dense = g.op("Sigmoid", [g.op("ScatterElements", [table, i, v], axis=1)])
    return g.model(dense, i)


def logits(n=64):
    return np.random.default_rng(0).standard_normal((n, E)).astype(np.float32) * 3


def test_static_reproduces_the_dense_weights():
    m = topk_scatter_sigmoid()
    g = only_row(m)["gate"]
    assert g.family == "topk_scatter_sigmoid" and family(g.family).wire is dense_weights
    assert (g.attrs["score_func"], g.attrs["select"], g.attrs["normalize"]) == ("sigmoid", "before_score", 0)
    x = logits()
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": x})
    rewrite_model(m, Policy("static"))
    got = moe_export.session(m).run(None, {"logits": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[1], want[1])


def test_a_dropped_slot_is_zero_in_the_dense_table():
    m = topk_scatter_sigmoid()
    x = logits()
    rewrite_model(m, Policy("top-p", 1e-6))
    dense, idx = moe_export.session(m).run(None, {"logits": x})
    top = x.argmax(1)
    want = np.zeros_like(x)
    want[np.arange(len(x)), top] = 1 / (1 + np.exp(-x[np.arange(len(x)), top]))
    np.testing.assert_allclose(dense, want, rtol=1e-6)
    assert (idx[:, 1] == E).all()  # the graph output keeps the router's raw ids


def test_a_table_not_of_minus_infinity_is_not_this_form():
    row = only_row(topk_scatter_sigmoid(fill=0.0))
    assert row["gate"] is None and "topk_scatter_sigmoid" in row["why_not"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    assert_top1_is_the_k1_model('llama4_text', tmp_path, num_experts_per_tok=1)
