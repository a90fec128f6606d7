"""Why a batched expert section is kept as exported: each reason of experts._Skip on the real
exported Mixtral graph, changed just enough to lose the shape the regrouping needs. The router is
still replaced, and the converted graph still reproduces the original where it runs."""
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import GRAPHS
from moe_export import MoeExportError
from moe_export.model.graph import GraphIndex
from moe_export.conversion import Policy, rewrite_model, routers_metadata

MIXTRAL = GRAPHS / "mixtral.onnx"


def node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def kept_because(m, **policy):
    rewrite_model(m, Policy(**policy) if policy else Policy("static"))
    return routers_metadata(m)["routers"][0]["expert_section"]


def opset_14(m):
    next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = 14


def pair_tensor_is_output(m):
    m.graph.output.append(helper.make_empty_tensor_value_info("bmm"))


def pair_tensor_used_outside(m):
    m.graph.node.append(helper.make_node("Identity", ["squeeze"], ["spy"], name="spy"))  # read by nothing else


def weights_not_one_mul(m):
    node(m, "node_mul_434").op_type = "Div"


def table_not_initializer(m):
    g = node(m, "node_GatherND_348")
    m.graph.node.insert(0, helper.make_node("Identity", [g.input[0]], ["table_copy"], name="table_copy"))
    g.input[0] = "table_copy"


def ids_gather_of_another_form(m):
    g = node(m, "node_GatherND_348")
    kept = [a for a in g.attribute if a.name != "batch_dims"]
    del g.attribute[:]
    g.attribute.extend(kept + [helper.make_attribute("batch_dims", 1)])


def ids_used_by_another_op(m):
    u = node(m, "node_Unsqueeze_346")
    m.graph.initializer.append(numpy_helper.from_array(np.int64(0), "zero_id"))
    i = list(m.graph.node).index(u)
    m.graph.node.insert(i, helper.make_node("Add", [u.input[0], "zero_id"], ["ids_plus_0"], name="ids_plus_0"))
    u.input[0] = "ids_plus_0"


def combine_not_reshape_to_k(m):
    wmul = node(m, "node_mul_434")
    r = next(n for n in m.graph.node if wmul.output[0] in n.input)
    m.graph.node.insert(list(m.graph.node).index(r),
                        helper.make_node("Identity", [wmul.output[0]], ["pairs_copy"], name="pairs_copy"))
    r.input[0] = "pairs_copy"


def no_flat_pair_view(m):
    flat = node(m, "node_view_8")  # Reshape(ids, [-1])
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "not_flat"))
    flat.input[1] = "not_flat"


def no_table_gathered(m):
    for name in ("node_GatherND_348", "node_GatherND_357"):
        node(m, name).op_type = "Gather"


def matmul_operand_of_another_form(m):
    node(m, "node_unsqueeze_19").op_type = "Identity"


def matmul_of_pair_tensors(m):
    node(m, "node_mul_422").op_type = "MatMul"


def set_const(m, name, value):
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    return name


def combine_not_a_slot_sum(m):
    node(m, "node_sum_2").input[1] = set_const(m, "axis_2", [2])


def states_not_a_per_token_repeat(m):
    node(m, "node_Expand_334").op_type = "Tile"


WIDE = {"policy": "top-p", "threshold": 0.5, "max_experts": 3}

CASES = [
    (opset_14, {}, "opset 14 < 15"),
    (pair_tensor_is_output, {}, "a pair tensor is a graph output"),
    (pair_tensor_used_outside, {}, "the section's tensors are used outside it"),
    (weights_not_one_mul, {}, "weights are not applied by one Mul"),
    (table_not_initializer, {}, "gathered table is not an [E, ...] initializer"),
    (ids_gather_of_another_form, {}, "ids gather of another form"),
    (ids_used_by_another_op, {}, "expert ids used by Add"),
    (no_flat_pair_view, {}, "no flat pair view of the routing"),
    (no_table_gathered, {}, "no weight tables gathered by expert id"),
    (matmul_operand_of_another_form, {}, "batched matmul operand of another form"),
    (matmul_of_pair_tensors, {}, "a matmul of pair tensors that is not an expert weight"),
    # only a router wider than k needs the per-token combine widened and the states repeated
    (combine_not_reshape_to_k, WIDE, "the per-token combine is not a Reshape to [-1, k, hidden]"),
    (combine_not_a_slot_sum, WIDE, "the per-token combine is not a sum over the slot axis"),
    (states_not_a_per_token_repeat, WIDE, "a pair tensor from outside the section is not a per-token repeat"),
]


@pytest.mark.parametrize("change, policy, reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_section_kept_with_its_reason(change, policy, reason):
    m = onnx.load(str(MIXTRAL))
    change(m)
    if policy:  # a router wider than k cannot be served by the section as exported: one line says why
        with pytest.raises(MoeExportError, match=re.escape(f"cannot be regrouped ({reason})")):
            kept_because(m, **policy)
        return
    assert kept_because(m, **policy).endswith(f"kept as exported: {reason}")
    assert sum(n.op_type == "DynamicRouter" for n in m.graph.node) == 2


def test_loop_sections_need_no_regrouping():
    m = onnx.load(str(GRAPHS / "legacy_mixtral_dynamo.onnx"))
    assert kept_because(m) == "per-expert loop (a dropped slot matches no expert)"


def test_unchanged_graph_is_grouped():
    m = onnx.load(str(MIXTRAL))
    assert kept_because(m) == "grouped by expert"
    ix = GraphIndex(m.graph)
    assert not any(n.op_type == "GatherND" and n.input[0] in ix.initializers for n in m.graph.node)
