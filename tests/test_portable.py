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
