"""The --portable expansion (standard ONNX ops in stock onnxruntime) against the numpy spec, on
the same drawn routers as the compiled kernel (test_kernel.py)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper

import onnxruntime as ort
from moe_export.model.graph import NodeBuilder
from moe_export.conversion.portable import portable_router
from moe_export.op.spec import RouterAttrs, dynamic_router
from test_kernel import router_case


def portable_model(attrs, bias):
    a = RouterAttrs(**attrs).resolved()
    b = NodeBuilder("portable")
    E = a.num_experts
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", E])]
    if bias:
        ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [E]))
    w, idx = portable_router(b, a, "logits", "bias" if bias else None, TensorProto.FLOAT)
    nodes = b.nodes + [helper.make_node("Identity", [w], ["weights"]), helper.make_node("Identity", [idx], ["indices"])]
    outs = [helper.make_tensor_value_info("weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    m = helper.make_model(helper.make_graph(nodes, "portable", ins, outs, initializer=b.inits),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


# moderate logits: the expansion's arithmetic is ONNX Runtime's own (its Sigmoid flushes scores
# the spec's exp keeps, e.g. at logit -39), so only the spec's non-ambiguous decisions and the
# weights to float32 rounding are compared
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(router_case(kinds=("normal", "ties"), dtypes=("float32",), isas=("auto",)))
def test_portable_matches_spec(case):
    attrs, x, bias, _, _ = case
    x = x.astype(np.float32)
    bias = None if bias is None else bias.astype(np.float32)
    feeds = {"logits": x} if bias is None else {"logits": x, "bias": bias}
    sess = ort.InferenceSession(portable_model(attrs, bias is not None).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    w, i = sess.run(None, feeds)
    rw, ri, _, amb = dynamic_router(x, bias, return_counts=True, **attrs)
    ok = ~amb
    assert w.shape == rw.shape and i.shape == ri.shape
    assert np.array_equal(i[ok], ri[ok]), "indices differ from the spec"
    assert np.allclose(w[ok], rw[ok], atol=1e-5, rtol=1e-4), "weights differ from the spec"


def test_group_sums_equal_in_exact_arithmetic_are_ambiguous():
    """sigmoid(-2) + sigmoid(2) = sigmoid(-1) + sigmoid(1): the spec's float32 sums and the
    expansion's split such a tie differently (a fuzz case); the spec marks those tokens, and
    exact float ties (the same scores in both groups) stay decided and agree."""
    attrs = dict(num_experts=4, k=1, score_func="sigmoid", normalize=1, scale=2.5, n_group=2, topk_group=1,
                 group_score_topk=2)
    x = np.array([[-2, 2, -1, 1], [-2, 2, 0, 0], [2, -2, 1, -1], [2, -2, 2, -2], [1, 0, 0, 1]], np.float32)
    _, i = ort.InferenceSession(portable_model(attrs, False).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"logits": x})
    _, ri, _, amb = dynamic_router(x, None, return_counts=True, **attrs)
    assert amb[:3].all() and not amb[3:].any()
    np.testing.assert_array_equal(i[~amb], ri[~amb])
