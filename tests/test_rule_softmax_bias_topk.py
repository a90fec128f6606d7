"""The softmax_bias_topk rule (ERNIE-4.5-MoE): softmax + bias ranks, unbiased weights."""

import numpy as np
import pytest
from onnx import TensorProto

from helpers import assert_top1_is_the_k1_model
from helpers import E, G, check_parity, normalize, only_row


def softmax_bias_topk(norm=True, guard="Clip", scale=None, gather=True, cast=False):
    g = G()
    p = g.op("Softmax", ["logits"], axis=-1)
    biased = g.op("Add", [p, g.const(np.linspace(-0.2, 0.2, E), np.float32)])
    if cast:
        biased = g.cast(g.cast(biased, TensorProto.FLOAT16), TensorProto.FLOAT)
    v, i = g.topk(biased)
    w = g.op("GatherElements", [p, i], axis=1) if gather else v
    if norm:
        w = normalize(g, w, 1e-12, guard)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    return g.model(w, i)


@pytest.mark.parametrize("kw, attrs", [
    ({}, dict(normalize=1, scale=1.0)),
    ({"norm": False}, dict(normalize=0)),
    ({"guard": "Add", "scale": 2.0}, dict(normalize=1, scale=2.0)),
    ({"cast": True}, dict(normalize=1)),
])
def test_branches(kw, attrs, tmp_path):
    m = softmax_bias_topk(**kw)
    row = only_row(m)
    assert row["gate"].family == "softmax_bias_topk" and row["gate"].bias is not None, row
    assert {k: row["gate"].attrs[k] for k in attrs} == pytest.approx(attrs)
    check_parity(m, tmp_path)


def test_weights_not_from_the_softmax_is_a_near_miss():
    row = only_row(softmax_bias_topk(gather=False))
    assert row["gate"] is None and "not gathered from the softmax scores" in row["near_miss"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    """Top-p with a tiny threshold keeps one expert per token, the one of highest softmax + bias:
    the converted graph computes what the same PyTorch model computes with moe_k=1."""
    assert_top1_is_the_k1_model('ernie4_5_moe', tmp_path, moe_k=1)
