"""Dropped slots cost nothing: grouped batched sections (5.x) and per-expert loops (4.x) compute
only the routed (token, expert) pairs; the rows each graph really computes are counted here."""
from collections import deque

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import moe_export
from helpers import FAMILY_GRAPHS, GRAPHS, input_feeds
from moe_export.conversion import Policy, convert, routers_metadata
from moe_export.run.runtime import session_from_proto

# Expert sections kept as exported: routing there changes what the experts compute, not what they cost.
KEPT = {"llama4_text": "Llama 4 runs every expert on every token, weighed 0 where not chosen"}
BATCHED = [p for p in FAMILY_GRAPHS if not p.stem.startswith("legacy_") and p.stem not in KEPT]
LOOPS = [p for p in FAMILY_GRAPHS if p.stem.startswith("legacy_")]


def computed_rows(path, feeds):
    """Per layer, the number of (token, expert) rows the expert section computes: the lengths of
    the per-expert row selections (NonZero outputs) that the router's indices feed, or the pairs
    each expert of a grouped section ran (its Scan's second output)."""
    m = onnx.load(str(path), load_external_data=False)
    meta = routers_metadata(m)
    consumers = {}
    for n in m.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    exposed = []
    for li, r in enumerate(meta["routers"]):
        seen, queue = set(), deque([r["indices"]])
        while queue:  # everything downstream of the indices within this layer
            t = queue.popleft()
            for c in consumers.get(t, []):
                if c.name in seen or c.op_type in ("Add",):  # the residual add leaves the layer
                    continue
                seen.add(c.name)
                if c.op_type == "NonZero":
                    exposed.append((li, c.output[0]))
                elif c.op_type == "Scan":  # the pairs each expert ran
                    exposed.append((li, c.output[1]))
                else:
                    queue.extend(c.output)
    for i, (_, t) in enumerate(exposed):
        m.graph.node.append(helper.make_node("Identity", [t], [f"rows_{i}"]))
        m.graph.output.append(helper.make_empty_tensor_value_info(f"rows_{i}"))
    sess = session_from_proto(m, path.parent)
    outs = sess.run([f"rows_{i}" for i in range(len(exposed))], feeds)
    rows = np.zeros(len(meta["routers"]), dtype=int)
    for (li, _), o in zip(exposed, outs):
        rows[li] += o.sum() if o.ndim == 1 else o.shape[-1]  # pairs per expert, or NonZero's [rank, rows]
    return rows, len(exposed)


def routed_pairs(path, feeds):
    from moe_export.run.validate import routing_indices, with_routing_outputs
    m = onnx.load(str(path), load_external_data=False)
    names, attrs = routing_indices(m)
    sess = session_from_proto(with_routing_outputs(m, names), path.parent)
    outs = sess.run(None, feeds)[-len(names):]
    return np.array([(o < a["num_experts"]).sum() for o, a in zip(outs, attrs)])


@pytest.mark.parametrize("graph", BATCHED + LOOPS, ids=[p.stem for p in BATCHED + LOOPS])
def test_dropped_slots_are_not_computed(graph, tmp_path):
    feeds = input_feeds(graph, tokens=24)
    static, dyn = tmp_path / "s.onnx", tmp_path / "d.onnx"
    convert(graph, static, Policy("static"))
    convert(graph, dyn, Policy("top-p", 0.3))
    rows_s, n_sel = computed_rows(static, feeds)
    rows_d, _ = computed_rows(dyn, feeds)
    assert n_sel > 0, "no per-expert row selection found"
    pairs_s, pairs_d = routed_pairs(static, feeds), routed_pairs(dyn, feeds)
    np.testing.assert_array_equal(rows_s, pairs_s)   # static: every (token, slot)
    np.testing.assert_array_equal(rows_d, pairs_d)   # dynamic: only the routed pairs
    assert rows_d.sum() < rows_s.sum()


@pytest.mark.parametrize("graph", BATCHED, ids=[p.stem for p in BATCHED])
def test_grouping_is_on_by_default_and_can_be_turned_off(graph, tmp_path, ort_ref):
    feeds = input_feeds(graph)
    on, off = tmp_path / "on.onnx", tmp_path / "off.onnx"
    convert(graph, on, Policy("ratio", 0.5))
    convert(graph, off, Policy("ratio", 0.5), group_experts=False)
    m_on = onnx.load(str(on), load_external_data=False)
    m_off = onnx.load(str(off), load_external_data=False)
    assert routers_metadata(m_on)["grouped_expert_sections"] == len(routers_metadata(m_on)["routers"])
    assert routers_metadata(m_off)["grouped_expert_sections"] == 0
    E = routers_metadata(m_on)["routers"][0]["attrs"]["num_experts"]
    tables = {t.name for t in m_on.graph.initializer if t.dims and t.dims[0] == E and len(t.dims) >= 2}
    gathered = lambda m: {n.input[0] for n in m.graph.node if n.op_type == "GatherND" and n.input[0] in tables}
    assert gathered(m_on) < gathered(m_off)
    assert not gathered(m_on) or graph.stem == "deepseek_v4"  # its hash layer routes by a token table, as exported
    a = moe_export.session(on).run(None, feeds)[0]
    b = moe_export.session(off).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(KEPT))
def test_sections_kept_as_exported_say_so(family, tmp_path):
    convert(GRAPHS / f"{family}.onnx", tmp_path / "c.onnx", Policy("top-p", 0.3))
    meta = routers_metadata(onnx.load(str(tmp_path / "c.onnx"), load_external_data=False))
    assert meta["grouped_expert_sections"] == 0
    assert all("kept as exported" in r["expert_section"] for r in meta["routers"])


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


@pytest.mark.parametrize("graph", BATCHED, ids=[p.stem for p in BATCHED])
def test_grouped_experts_load_like_the_original(graph, tmp_path):
    """ONNX Runtime constant-folds a slice of an initializer at a constant index at load, and
    prepacks a constant right operand of MatMul/Gemm: a grouped section that took each expert's
    matrices either way made the session copy every expert's weights (1 GB model: 8x the
    original's peak RSS, 50-100x its load time). The default conversion hands the tables whole
    to one Scan per layer (a view of each expert's slice per iteration), gathers from them only
    at run-time indices, and its size does not grow with the experts."""
    convert(graph, tmp_path / "s.onnx", Policy("static"))
    m = onnx.load(str(tmp_path / "s.onnx"), load_external_data=False)
    meta = routers_metadata(m)
    E = meta["routers"][0]["attrs"]["num_experts"]
    consts = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    tables = {t.name for t in m.graph.initializer if len(t.dims) >= 2 and t.dims[0] == E}
    scans = [n for n in m.graph.node if n.op_type == "Scan"]
    assert len(scans) == meta["grouped_expert_sections"] > 0
    scanned = {t for n in scans for t in n.input[1:]}
    assert scanned & tables
    reads = [n for n in _all_nodes(m.graph) if n.op_type in ("Gather", "GatherND", "Slice") and n.input[0] in tables]
    assert not [n.name for n in reads if all(i in consts for i in n.input[1:] if i)]
    ours = [n for n in _all_nodes(m.graph) if n.name.startswith("moe_export/experts_")]
    assert not [n.name for n in ours if n.op_type in ("MatMul", "Gemm") and n.input[1] in consts]
    original = onnx.load(str(graph), load_external_data=False)
    # nothing per expert: the graph, Scan bodies included, stays within a small multiple of the original
    assert sum(1 for _ in _all_nodes(m.graph)) < 3 * len(original.graph.node) + len(scans) * 48


@pytest.mark.parametrize("graph", BATCHED, ids=[p.stem for p in BATCHED])
def test_load_optimizers_leave_the_grouped_sections_as_written(graph, tmp_path):
    """Each onnxruntime optimizer that changes a graph at load re-resolves all of it, every Scan
    and If body included, and a changed round runs its optimizers once more. Small constants
    repeated per layer (ConstantSharing), a Cast of a constant (ConstantFolding), a Shape or Size
    taken twice (CommonSubexpressionElimination) and an Identity of a constant made a 48-layer
    model load in 1.7x the original's time. Basic optimization changes none of them now."""
    convert(graph, tmp_path / "s.onnx", Policy("static"))
    moe_export.session(tmp_path / "s.onnx", optimized_model_filepath=str(tmp_path / "basic.onnx"),
                       graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    ours = lambda m: ({n.name for n in _all_nodes(m.graph) if n.name.startswith("moe_export/experts_")}
                      | {t.name for t in m.graph.initializer if t.name.startswith("moe_export/")})
    written = ours(onnx.load(str(tmp_path / "s.onnx"), load_external_data=False))
    assert written
    assert written == ours(onnx.load(str(tmp_path / "basic.onnx"), load_external_data=False))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_graph_without_recorded_shapes_is_grouped_too(family, tmp_path):
    """Without value_info the grouped section learns its output's shape from a run of the
    section on no pairs; its outputs are the same as with the recorded shapes."""
    bare = onnx.load(str(GRAPHS / f"{family}.onnx"))
    del bare.graph.value_info[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    feeds = input_feeds(GRAPHS / f"{family}.onnx", tokens=24)
    outs = {}
    for name, src in (("recorded", GRAPHS / f"{family}.onnx"), ("bare", tmp_path / "bare.onnx")):
        convert(src, tmp_path / f"{name}.c.onnx", Policy("top-p", 0.5))
        m = onnx.load(str(tmp_path / f"{name}.c.onnx"), load_external_data=False)
        assert routers_metadata(m)["grouped_expert_sections"] > 0
        outs[name] = moe_export.session(tmp_path / f"{name}.c.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(outs["bare"], outs["recorded"], atol=1e-5, rtol=1e-4)


def test_a_graph_that_does_not_sum_its_pairs_per_token_keeps_one_row_per_pair(tmp_path):
    """The Scan adds contributions per token where the graph sums a token's pairs with
    Reshape -> ReduceSum; another combine gets the per-pair state, and the same outputs."""
    g = onnx.load(str(GRAPHS / "qwen3_moe.onnx"))
    producer = {o: n for n in g.graph.node for o in n.output}
    cut = 0
    for i, n in enumerate(list(g.graph.node)):
        src = producer.get(n.input[0]) if n.op_type == "ReduceSum" else None
        if src is not None and src.op_type == "Reshape":
            ident = helper.make_node("Identity", [n.input[0]], [n.input[0] + "/kept"], name=f"kept_{i}")
            n.input[0] = ident.output[0]
            g.graph.node.insert(list(g.graph.node).index(n), ident)
            cut += 1
    assert cut
    onnx.save(g, str(tmp_path / "apart.onnx"))
    feeds = input_feeds(GRAPHS / "qwen3_moe.onnx", tokens=24)
    outs = {}
    for name, src in (("summed", GRAPHS / "qwen3_moe.onnx"), ("apart", tmp_path / "apart.onnx")):
        convert(src, tmp_path / f"{name}.c.onnx", Policy("top-p", 0.5))
        m = onnx.load(str(tmp_path / f"{name}.c.onnx"), load_external_data=False)
        adds = [a.s for n in _all_nodes(m.graph) if n.op_type == "ScatterND" for a in n.attribute if a.name == "reduction"]
        assert bool(adds) == (name == "summed")
        outs[name] = moe_export.session(tmp_path / f"{name}.c.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(outs["apart"], outs["summed"], atol=1e-5, rtol=1e-4)
