"""The logit_sigmoid_topk rule (Kolibri): logits + bias rank, the sigmoid of the chosen logits
weighs (select=before_score with sigmoid scores)."""

import numpy as np
import pytest
from onnx import TensorProto

from helpers import assert_top1_is_the_k1_model
from helpers import E, G, check_parity, normalize, only_row


def logit_sigmoid_topk(bias=True, norm=True, scale=None, cast=False, gather_from_sum=False):
    g = G()
    ranked = g.op("Add", ["logits", g.const(np.linspace(-0.3, 0.3, E), np.float32)]) if bias else "logits"
    if cast:
        ranked = g.cast(g.cast(ranked, TensorProto.FLOAT16), TensorProto.FLOAT)
    v, i = g.topk(ranked)
    w = g.op("Sigmoid", [g.op("GatherElements", [ranked if gather_from_sum else "logits", i], axis=1)])
    if norm:
        w = normalize(g, w)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    return g.model(w, i)


@pytest.mark.parametrize("kw, attrs", [
    ({}, dict(normalize=1, scale=1.0)),
    ({"norm": False}, dict(normalize=0)),
    ({"bias": False, "scale": 2.0}, dict(normalize=1, scale=2.0)),
    ({"cast": True}, dict(normalize=1)),
])
def test_branches(kw, attrs, tmp_path):
    m = logit_sigmoid_topk(**kw)
    row = only_row(m)
    g = row["gate"]
    assert g.family == "logit_sigmoid_topk" and (g.bias is not None) == kw.get("bias", True), row
    assert (g.attrs["score_func"], g.attrs["select"]) == ("sigmoid", "before_score")
    assert {k: g.attrs[k] for k in attrs} == pytest.approx(attrs)
    check_parity(m, tmp_path)


def test_weights_from_the_biased_sum_are_not_this_form():
    row = only_row(logit_sigmoid_topk(gather_from_sum=True))
    assert row["gate"] is None and "logit_sigmoid_topk" in row["why_not"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    """Top-p with a tiny threshold keeps the expert of highest logit + bias: the converted graph
    computes what the same PyTorch model computes with num_experts_per_tok=1."""
    assert_top1_is_the_k1_model('kolibri1', tmp_path, num_experts_per_tok=1)
