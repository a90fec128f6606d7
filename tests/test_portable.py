"""The --portable expansion (standard ONNX ops in stock onnxruntime) against the numpy spec, on
the same drawn routers as the compiled kernel (test_kernel.py)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper

import onnxruntime as ort
from moe_export.model.graph import NodeBuilder
from moe_export.conversion.portable import portable_router
from moe_export.op.spec import RouterAttrs, dynamic_router
from test_kernel import probe_threshold, router_case


def portable_model(attrs, bias, sizes=False):
    a = RouterAttrs(**attrs).resolved()
    b = NodeBuilder("portable")
    E = a.num_experts
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", E])]
    if bias:
        ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [E]))
    if sizes:
        ins.append(helper.make_tensor_value_info("sizes", TensorProto.FLOAT, ["n", E]))
    w, idx = portable_router(b, a, "logits", "bias" if bias else None, TensorProto.FLOAT,
                             sizes="sizes" if sizes else None)
    nodes = b.nodes + [helper.make_node("Identity", [w], ["weights"]), helper.make_node("Identity", [idx], ["indices"])]
    outs = [helper.make_tensor_value_info("weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    m = helper.make_model(helper.make_graph(nodes, "portable", ins, outs, initializer=b.inits),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def rank_near_tie(attrs, x, bias):
    """Tokens where two of the best width + 1 ranking keys lie within rounding of each other (or
    tie) while their logits or biases differ: ONNX Runtime's Softmax and Sigmoid round apart from
    the spec's exp32, so such neighbours may swap in the expansion (an E = 256 sigmoid gate's 7th
    and 8th expert did). Ties of equal inputs are ordered alike."""
    from moe_export.op.spec import RouterAttrs, _rank, _sigmoid, _softmax_rows
    a = RouterAttrs(**attrs).resolved()
    x = x.reshape(-1, a.num_experts).astype(np.float32)
    b = np.zeros(a.num_experts, np.float32) if bias is None else bias.astype(np.float32)
    key = x if a.select == "before_score" else (_softmax_rows(x) if a.score_func == "softmax" else _sigmoid(x))
    key = np.where(np.isnan(key + b) | ~_rank(a, x, None if bias is None else b)[1], -np.inf, key + b)
    order = np.argsort(-key, axis=1, kind="stable")[:, : a.width + 1]
    top, xs, bs = (np.take_along_axis(v, order, axis=1) for v in (key, x, np.broadcast_to(b, x.shape)))
    with np.errstate(invalid="ignore"):
        near = np.abs(np.diff(top, axis=1)) <= 1e-6 * np.maximum(np.abs(top[:, 1:]), 1e-30)
    differ = (np.diff(xs, axis=1) != 0) | (np.diff(bs, axis=1) != 0)
    return (near & differ).any(axis=1)


def run_against_spec(attrs, x, bias=None, sizes=None):
    """The expansion's outputs and the spec's (weights, indices, counts, ambiguous), compared on
    the tokens the spec does not mark ambiguous."""
    feeds = {"logits": x}
    if bias is not None:
        feeds["bias"] = bias
    if sizes is not None:
        feeds["sizes"] = sizes
    sess = ort.InferenceSession(portable_model(attrs, bias is not None, sizes is not None).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    w, i = sess.run(None, feeds)
    ref = dynamic_router(x, bias, sizes, return_counts=True, **attrs)
    rw, ri, _, amb = ref
    ok = ~amb & ~rank_near_tie(attrs, x, bias)
    assert w.shape == rw.shape and i.shape == ri.shape
    assert np.array_equal(i[ok], ri[ok]), "indices differ from the spec"
    assert np.allclose(w[ok], rw[ok], atol=1e-5, rtol=1e-4), "weights differ from the spec"
    return ref


# moderate logits: the expansion's arithmetic is ONNX Runtime's own (its Sigmoid flushes scores
# the spec's exp keeps, e.g. at logit -39), so only the spec's non-ambiguous decisions and the
# weights to float32 rounding are compared
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(router_case(kinds=("normal", "ties"), dtypes=("float32",), isas=("auto",)))
def test_portable_matches_spec(case):
    attrs, x, bias, _, _, sizes = case
    f32 = lambda a: None if a is None else a.astype(np.float32)
    run_against_spec(attrs, f32(x), f32(bias), f32(sizes))


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


# every gate form the probe policy meets (test_kernel.py's, drawn here on their own)
PROBE_FORMS = {
    "softmax": dict(score_func="softmax", select="after_score"),
    "softmax_norm": dict(score_func="softmax", select="after_score", normalize=1),
    "before_score": dict(score_func="softmax", select="before_score"),
    "sigmoid_norm": dict(score_func="sigmoid", select="after_score", normalize=1, scale=2.5),
    "sigmoid_grouped": dict(score_func="sigmoid", select="after_score", normalize=1, scale=2.5),
    "sigmoid_before": dict(score_func="sigmoid", select="before_score", normalize=1),
}


@st.composite
def probe_case(draw):
    form = draw(st.sampled_from(sorted(PROBE_FORMS)))
    E = draw(st.sampled_from([1, 2, 3, 8, 16, 64]))
    extra = {}
    if form == "sigmoid_grouped":
        E = max(4, E - E % 4)
        n_group = draw(st.sampled_from([g for g in (2, 4) if E % g == 0]))
        extra = dict(n_group=n_group, topk_group=draw(st.integers(1, n_group)),
                     group_score_topk=draw(st.integers(1, min(2, E // n_group))))
    k = draw(st.integers(1, min(E, 8)))
    max_e = draw(st.integers(1, k))
    attrs = dict(num_experts=E, k=k, policy="probe", min_experts=draw(st.integers(1, max_e)), max_experts=max_e,
                 renormalize=draw(st.sampled_from([1.0, 0.5, 0.0])), **PROBE_FORMS[form], **extra)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    T = draw(st.sampled_from([1, 7, 64]))
    x = (rng.integers(-2, 3, (T, E)) if draw(st.booleans()) else rng.standard_normal((T, E))).astype(np.float32)
    bias = (rng.standard_normal(E) * (0.1 if form == "sigmoid_grouped" else 1.0)).astype(np.float32) \
        if draw(st.booleans()) else None
    sizes = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    odd = rng.random((T, E)) < draw(st.sampled_from([0.0, 0.05]))
    sizes[odd] = rng.choice(np.float32([np.nan, np.inf, -np.inf]), odd.sum())
    attrs["threshold"] = probe_threshold(attrs, x, bias, sizes, draw(st.floats(0.0, 1.0)))
    return attrs, x, bias, sizes


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(probe_case())
def test_portable_probe_matches_spec(case):
    run_against_spec(*case)


@pytest.mark.parametrize("form", sorted(PROBE_FORMS))
@pytest.mark.parametrize("renormalize", [1.0, 0.5, 0.0])
def test_probe_keeps_a_later_slot_past_a_dropped_one(form, renormalize):
    """Ranked 0, 1, 2; expert 1 predicts a small output (dropped), expert 2 a large one (kept):
    the kept are 0 and 2, in that order, and the dropped slot goes last."""
    extra = dict(n_group=2, topk_group=2) if form == "sigmoid_grouped" else {}
    attrs = dict(num_experts=4, k=3, policy="probe", threshold=0.1, max_experts=3, renormalize=renormalize,
                 **PROBE_FORMS[form], **extra)
    x = np.array([[3, 2, 1, -1], [3, 2, 1, -1]], np.float32)
    sizes = np.array([[0, -5, 2, 0], [0, 0, 1, 0]], np.float32)
    _, ri, counts, amb = run_against_spec(attrs, x, sizes=sizes)
    assert not amb.any()
    np.testing.assert_array_equal(ri, [[0, 2, 4], [0, 1, 2]])
    np.testing.assert_array_equal(counts, [2, 3])
