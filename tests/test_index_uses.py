"""Every use of the expert ids stays right when a slot is dropped (id = num_experts, weight 0):
compared ids stay raw, gathered ids are clamped, scattered ids go into a widened tensor, and
any other use is refused for policies that drop slots."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import moe_export
from moe_export import MoeExportError
from moe_export.rewrite import Policy, rewrite_model
from test_rules import E, G


def dense_router(extra=None):
    """Softmax -> TopK(2); the weights scattered into a dense [n, E] tensor (optimum's GPT-OSS
    export does this: ScatterElements(zeros, ids, weights))."""
    g = G()
    w, i = g.topk(g.op("Softmax", ["logits"], axis=-1))
    zeros = g.op("ConstantOfShape", [g.op("Shape", ["logits"])])
    dense = g.op("ScatterElements", [zeros, i, w], axis=1)
    m = g.model(w, i)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(dense, TensorProto.FLOAT, None))
    if extra:
        extra(g, m, i)
    return m


def logits_with_last_expert_on_top(n=64):
    x = np.random.default_rng(0).standard_normal((n, E)).astype(np.float32)
    x[::2, E - 1] += 6.0  # half the rows keep only expert E-1 under a tiny top-p threshold
    return x


def run(m, x):
    return moe_export.session(m).run(None, {"logits": x})[0]


def test_scattered_ids_never_overwrite_a_kept_expert():
    m = dense_router()
    x = logits_with_last_expert_on_top()
    rewrite_model(m, Policy("top-p", 1e-6))
    dense = run(m, x)
    w, idx = moe_export.dynamic_router(x, num_experts=E, k=2, policy="top-p", threshold=1e-6)
    want = np.zeros_like(x)
    for r in range(len(x)):
        for s in range(2):
            if idx[r, s] < E:
                want[r, idx[r, s]] = w[r, s]
    assert (idx[::2, 0] == E - 1).all() and (idx[:, 1] == E).all()
    np.testing.assert_allclose(dense, want, rtol=1e-6)


def test_scattered_ids_static_reproduces():
    m = dense_router()
    x = logits_with_last_expert_on_top()
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": x})[0]
    rewrite_model(m, Policy("static"))
    np.testing.assert_allclose(run(m, x), ref, rtol=1e-6)


def shifted_ids(g, m, i):
    out = g.op("Add", [i, g.const(1)])
    m.graph.node.extend(g.nodes[-1:])
    m.graph.initializer.extend(g.inits[-1:])
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.INT64, None))


def test_an_unknown_use_is_refused_when_slots_can_drop():
    with pytest.raises(MoeExportError, match="the expert ids feed Add .*only --policy static"):
        rewrite_model(dense_router(shifted_ids), Policy("top-p", 0.5))
    m = dense_router(shifted_ids)
    rewrite_model(m, Policy("static"))  # static drops nothing: any use is right
    assert sum(n.op_type == "DynamicRouter" for n in m.graph.node) == 1
