"""The softmax_group_topk rule (Mistral 4): DeepSeek-V3's group limit over softmax scores."""

import numpy as np
import pytest
from onnx import TensorProto

from helpers import assert_top1_is_the_k1_model
from helpers import E, G, check_parity, normalize, only_row


def softmax_group_topk(fill=0.0, norm=True, scale=None, gather=True):
    """4 groups of 2; the best 2 groups by the sum of their 2 best scores; the rest filled."""
    g = G()
    s = g.op("Softmax", ["logits"], axis=-1)
    best = g.topk(g.op("Reshape", [s, g.const([-1, 4, 2])]), 2)[0]
    gsum = g.op("ReduceSum", [best, g.const([-1])], keepdims=0)
    gidx = g.topk(gsum, 2, sorted=0)[1]
    ones = g.op("Add", [g.op("Mul", [g.cast(gidx, TensorProto.FLOAT), g.const(0.0, np.float32)]), g.const(1.0, np.float32)])
    mask = g.op("ScatterElements", [g.op("Mul", [gsum, g.const(0.0, np.float32)]), gidx, ones], axis=1)
    full = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [mask, g.const([-1])]), g.const([1, 1, 2])]),
                            g.const([-1, E])])
    key = g.op("Where", [g.op("Not", [g.cast(full, TensorProto.BOOL)]), g.const(fill, np.float32), s])
    v, i = g.topk(key, sorted=0)
    w = g.op("GatherElements", [s, i], axis=1) if gather else v
    if norm:
        w = normalize(g, w, 1e-20)
    if scale:
        w = g.op("Mul", [w, g.const(scale, np.float32)])
    return g.model(w, i)


@pytest.mark.parametrize("kw, attrs", [
    ({}, dict(normalize=1, scale=1.0, n_group=4, topk_group=2, group_score_topk=2)),
    ({"fill": -np.inf, "scale": 2.5}, dict(normalize=1, scale=2.5, n_group=4)),
    ({"norm": False}, dict(normalize=0, n_group=4)),
])
def test_branches(kw, attrs, tmp_path):
    m = softmax_group_topk(**kw)
    row = only_row(m)
    assert row["gate"].family == "softmax_group_topk" and row["gate"].bias is None, row
    assert {k: row["gate"].attrs[k] for k in attrs} == pytest.approx(attrs)
    check_parity(m, tmp_path)


def test_declines_and_near_misses():
    row = only_row(softmax_group_topk(fill=0.5))  # a fill above some scores would change the choice
    assert row["gate"] is None and "filled with a constant" in row["why_not"]["softmax_group_topk"]
    row = only_row(softmax_group_topk(gather=False))
    assert row["gate"] is None and "not gathered from the softmax scores" in row["near_miss"]


@pytest.mark.torch
def test_one_expert_routing_is_the_model_with_k_1(tmp_path):
    """Top-p with a tiny threshold keeps the best expert of the best groups: the converted graph
    computes what the same PyTorch model computes with num_experts_per_tok=1."""
    assert_top1_is_the_k1_model('mistral4', tmp_path, num_experts_per_tok=1)
