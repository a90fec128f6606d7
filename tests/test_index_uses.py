"""Every use of the expert ids stays right when a slot is dropped (id = num_experts, weight 0):
compared ids stay raw, gathered ids are clamped, scattered ids go into a widened tensor, and
any other use is refused for policies that drop slots."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import moe_export
from moe_export import MoeExportError
from moe_export.conversion import Policy, Routing, rewrite_model, set_policy
from helpers import E, G


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


def histogram(reduction, base=0):
    """Per-token expert counts scattered by id (JetMoE counts pairs per expert this way)."""
    def extra(g, m, i):
        ones = g.op("ConstantOfShape", [g.op("Shape", [i])], value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        zeros = g.op("ConstantOfShape", [g.op("Shape", ["logits"])], value=helper.make_tensor("zero", TensorProto.INT64, [1], [base]))
        counts = g.op("ScatterElements", [zeros, i, ones], axis=1, reduction=reduction)
        m.graph.node.extend(g.nodes[-5:])
        m.graph.output.append(helper.make_tensor_value_info(counts, TensorProto.INT64, None))
    return extra


def test_a_static_only_conversion_refuses_a_policy_that_drops():
    """Converted statically, a graph with a use the ids cannot keep is recorded so: re-setting
    (repolicy, calibrate) to a policy that drops a slot is refused, not written broken."""
    m = dense_router(shifted_ids)
    rewrite_model(m, Policy("static"))
    with pytest.raises(MoeExportError, match="the expert ids feed Add .*only --policy static"):
        set_policy(m, Policy("top-p", 0.5))
    with pytest.raises(MoeExportError, match="only --policy static"):
        Routing.read(m).check_dynamic()
    set_policy(m, Policy("static"))  # what it can take


def test_a_scatter_that_overwrites_by_id_is_refused():
    """A clamped id repeating a kept E-1 would collapse into one write: refused, one line."""
    with pytest.raises(MoeExportError, match=r"ScatterElements \(reduction none, overwriting by id\)"):
        rewrite_model(dense_router(histogram("none", base=7)), Policy("ratio", 0.5))


@pytest.mark.parametrize("reduction", ["add", "none"])  # into zeros, distinct ids: overwriting is adding
def test_a_scatter_that_adds_counts_a_dropped_slot_as_a_zero_weight_pair(reduction):
    m = dense_router(histogram(reduction))
    x = logits_with_last_expert_on_top()
    rewrite_model(m, Policy("top-p", 1e-6))
    dense, counts = moe_export.session(m).run(None, {"logits": x})
    np.testing.assert_array_equal(counts.sum(axis=1), 2)  # every pair counted once: kept + dropped at E-1
    assert (counts[::2, E - 1] == 2).all()  # rows keeping E-1: its pair and the dropped one
    assert (dense[::2, E - 1] > 0.5).all()  # and the weights scatter still keeps E-1's weight


def test_a_static_conversion_re_set_to_drop_slots_counts_them_right():
    """The counts' scatter becomes a scatter that adds in a static conversion too (exact while no
    slot drops), so re-setting its policy needs no graph change (JetMoE: static, then repolicy)."""
    x = logits_with_last_expert_on_top()
    m = dense_router(histogram("none"))
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"logits": x})
    rewrite_model(m, Policy("static"))
    dense, counts = moe_export.session(m).run(None, {"logits": x})
    np.testing.assert_allclose(dense, ref[0], rtol=1e-6)  # (the kernel's exp: within an ulp)
    np.testing.assert_array_equal(counts, ref[1])
    set_policy(m, Policy("top-p", 1e-6))
    direct = dense_router(histogram("none"))
    rewrite_model(direct, Policy("top-p", 1e-6))
    counts, want = (moe_export.session(g).run(None, {"logits": x})[1] for g in (m, direct))
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(counts.sum(axis=1), 2)


def test_counts_below_opset_16_convert_statically_only():
    """ScatterElements' reduction came with opset 16: an older graph's counts cannot become a
    scatter that adds, so the graph routes statically (its node left as it was) or is refused."""
    def opset15():
        m = dense_router(histogram("none"))
        m.opset_import[0].version = 15
        for n in m.graph.node:  # (no reduction attribute before opset 16)
            kept = [a for a in n.attribute if a.name != "reduction"]
            del n.attribute[:]
            n.attribute.extend(kept)
        return m
    with pytest.raises(MoeExportError, match="needs opset 16; the graph has 15"):
        rewrite_model(opset15(), Policy("top-p", 0.5))
    m = opset15()
    rewrite_model(m, Policy("static"))
    assert not any(a.name == "reduction" for n in m.graph.node for a in n.attribute)
    assert "needs opset 16" in Routing.read(m).routers[0].static_only
    x = logits_with_last_expert_on_top()
    np.testing.assert_array_equal(moe_export.session(m).run(None, {"logits": x})[1].sum(axis=1), 2)


def test_the_shape_of_the_ids_is_any_ids_shape():
    def shape_of(g, m, i):
        s = g.op("Shape", [i])
        m.graph.node.extend(g.nodes[-1:])
        m.graph.output.append(helper.make_tensor_value_info(s, TensorProto.INT64, None))
    m = dense_router(shape_of)
    rewrite_model(m, Policy("top-p", 0.5))
    out = moe_export.session(m).run(None, {"logits": logits_with_last_expert_on_top()})
    np.testing.assert_array_equal(out[1], [64, 2])


def skip_class_back_to_zero(g, m, i):
    """ZAYA: the last class is a skip expert; its ids are set back to 0 (weighed 0) before the
    experts' one-hot masks: OneHot(Where(ids == E-1, 0, ids), E)."""
    skip = g.op("Equal", [i, g.const(E - 1)])
    ids = g.op("Where", [skip, g.const(0), i])
    mask = g.op("OneHot", [ids, g.const(E), g.const(np.array([0, 1]))], axis=-1)
    m.graph.node.extend(g.nodes[-3:])
    m.graph.initializer.extend(g.inits[-4:])
    m.graph.output.append(helper.make_tensor_value_info(mask, TensorProto.INT64, None))


def test_ids_with_some_slots_set_to_a_constant_are_ids():
    m = dense_router(skip_class_back_to_zero)
    x = logits_with_last_expert_on_top()
    rewrite_model(m, Policy("top-p", 1e-6))
    _, mask = moe_export.session(m).run(None, {"logits": x})
    _, idx = moe_export.dynamic_router(x, num_experts=E, k=2, policy="top-p", threshold=1e-6)
    assert (idx[:, 1] == E).all()  # every second slot dropped
    np.testing.assert_array_equal(mask[:, 1], 0)  # a dropped slot's id passes the Where and matches no expert
    want = np.eye(E, dtype=np.int64)[np.where(idx[:, 0] == E - 1, 0, idx[:, 0])]
    np.testing.assert_array_equal(mask[:, 0], want)


def test_a_where_between_ids_and_a_computed_tensor_is_refused():
    def mixed(g, m, i):
        ids = g.op("Where", [g.op("Equal", [i, g.const(E - 1)]), g.op("Add", [i, g.const(1)]), i])
        m.graph.node.extend(g.nodes[-3:])
        m.graph.initializer.extend(g.inits[-2:])
        m.graph.output.append(helper.make_tensor_value_info(ids, TensorProto.INT64, None))
    with pytest.raises(MoeExportError, match=r"the expert ids feed (Where|Add)"):
        rewrite_model(dense_router(mixed), Policy("top-p", 0.5))
