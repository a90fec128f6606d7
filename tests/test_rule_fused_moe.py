"""The fused_moe rule: a com.microsoft MoE / QMoE op whose router_probs are logits. The router
chooses, the op computes: checked against a numpy model of the experts, through ORT's own
MoE kernel, for renormalizing and plain ops, every policy, a router wider than the op's k."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import moe_export
from moe_export.rules.base import explain
from moe_export.conversion import Policy, convert
from moe_export.op.spec import dynamic_router

E, H, I, K = 8, 16, 12, 2


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return dict(fc1=rng.standard_normal((E, I, H)).astype(np.float32) * 0.3,
                b1=rng.standard_normal((E, I)).astype(np.float32) * 0.1,
                fc2=rng.standard_normal((E, H, I)).astype(np.float32) * 0.3,
                b2=rng.standard_normal((E, H)).astype(np.float32) * 0.1,
                router=rng.standard_normal((H, E)).astype(np.float32))


def fused_graph(normalize=1, op="MoE", **extra):
    """x [T, H] -> logits = x @ router -> MoE(x, logits) (relu experts), as ORT's optimizer and
    the GenAI builder lay it out."""
    w = weights()
    inits = [helper.make_tensor(n, TensorProto.FLOAT, v.shape, v.ravel()) for n, v in w.items()]
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"], name="router")]
    ins = ["x", "logits", "fc1", "b1", "fc2", "b2"]
    nodes.append(helper.make_node(op, ins, ["y"], name="moe", domain="com.microsoft", k=K,
                                  activation_type="relu", normalize_routing_weights=normalize, **extra))
    g = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def experts(x, w, ids, wts):
    """What the op computes for given (expert id, weight) slots; id E = none."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, a in zip(ids[t], wts[t]):
            if e < E:
                h = np.maximum(w["fc1"][e] @ x[t] + w["b1"][e], 0)
                out[t] += a * (w["fc2"][e] @ h + w["b2"][e])
    return out


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((64, H)).astype(np.float32)


def run(path, x, custom_ops=True):
    return moe_export.session(path, custom_ops=custom_ops).run(None, {"x": x})[0]


def test_matched_as_one_gate():
    (row,) = explain(fused_graph())
    g = row["gate"]
    assert g.family == "fused_moe" and g.expert_form == "fused" and g.logits == "logits"
    assert (g.attrs["num_experts"], g.attrs["k"], g.attrs["normalize"]) == (E, K, 1)


@pytest.mark.parametrize("normalize", [1, 0])
@pytest.mark.parametrize("policy, threshold, max_experts, renormalize", [
    ("static", 0.0, None, 1.0), ("top-p", 0.5, None, 1.0), ("ratio", 0.6, None, 1.0), ("entropy", 0.5, None, 1.0),
    ("top-p", 0.8, 4, 1.0), ("ratio", 0.6, None, 0.0), ("top-p", 0.8, 4, 0.5)])
def test_the_op_computes_what_the_router_chose(normalize, policy, threshold, max_experts, renormalize, x, tmp_path):
    """The weights too: the op renormalizes over what it is given, and the rescale by the
    router's weights' sum restores the router's (renormalize < 1 included)."""
    src, dst = tmp_path / "m.onnx", tmp_path / "d.onnx"
    onnx.save(fused_graph(normalize), src)
    convert(src, dst, Policy(policy, threshold, max_experts=max_experts, renormalize=renormalize))
    w = weights()
    logits = x @ w["router"]
    a = dict(num_experts=E, k=K, policy=policy, threshold=threshold, max_experts=max_experts or K, normalize=normalize,
             renormalize=renormalize)
    wts, ids = dynamic_router(logits, None, **a)
    got = run(dst, x)
    np.testing.assert_allclose(got, experts(x, w, ids, wts), atol=2e-5, rtol=1e-4)
    if policy == "static":  # and that is what the original op computes
        np.testing.assert_allclose(got, run(src, x, custom_ops=False), atol=2e-6, rtol=1e-5)
    moe = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "MoE")
    assert next(x.i for x in moe.attribute if x.name == "k") == max(K, max_experts or K)


def test_dynamic_routes_fewer_pairs(x, tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "d.onnx"
    onnx.save(fused_graph(), src)
    convert(src, dst, Policy("ratio", 0.9, min_experts=1))
    from moe_export.run.validate import validate

    rep = validate(src, dst, feeds={"x": x})
    assert rep["routed_pairs"]["original"] == 64 * K
    assert 0 < rep["routed_pairs"]["converted"] < 64 * K


def test_sparse_mixer_and_split_router_weights_are_near_misses():
    (row,) = explain(fused_graph(use_sparse_mixer=1))
    assert row["gate"] is None and "use_sparse_mixer" in row["near_miss"]
    m = fused_graph()
    moe = m.graph.node[-1]
    moe.op_type = "QMoE"
    moe.input[:] = ["x", "logits", "fc1", "", "b1", "fc2", "", "b2"] + [""] * 6 + ["logits"]
    (row,) = explain(m)
    assert row["gate"] is None and "router_weights" in row["near_miss"]


def test_in_graph_selection_is_left_to_the_topk_rule():
    """router_probs made by a scatter (LFM2's) are not raw logits: the fused rule declines."""
    m = fused_graph()
    g = m.graph
    g.node[0].output[0] = "raw"
    g.node.insert(1, helper.make_node("ScatterElements", ["raw", "ids", "raw"], ["logits"], axis=1))
    g.initializer.append(helper.make_tensor("ids", TensorProto.INT64, [1, 1], [0]))
    (row,) = explain(m)
    assert row["gate"] is None and "in-graph selection" in row["why_not"]["fused_moe"]
