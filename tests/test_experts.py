"""Dropped slots cost nothing: grouped batched sections (5.x) and per-expert loops (4.x) compute
only the routed (token, expert) pairs; the rows each graph really computes are counted here."""
from collections import deque

import numpy as np
import onnx
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
    the per-expert row selections (NonZero outputs) that the router's indices feed, or of the
    pair positions the grouped section computed (per pair, or in a Loop over the routed experts)."""
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
                elif c.op_type == "If":  # the rows of the pairs either branch computed
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
        rows[li] += o.shape[-1]
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
    """ONNX Runtime constant-folds a slice of an initializer at a constant index at load: a grouped
    section that took each expert's matrices that way made the session copy every expert's
    weights (1 GB model: 8x the original's peak RSS, 50-100x its load time). The default
    conversion reads expert weights only at run-time indices, and its size does not grow with
    the experts: one loop over the routed experts per layer."""
    convert(graph, tmp_path / "s.onnx", Policy("static"))
    m = onnx.load(str(tmp_path / "s.onnx"), load_external_data=False)
    meta = routers_metadata(m)
    E = meta["routers"][0]["attrs"]["num_experts"]
    consts = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    tables = {t.name for t in m.graph.initializer if len(t.dims) >= 2 and t.dims[0] == E}
    reads = [n for n in _all_nodes(m.graph) if n.op_type in ("Gather", "GatherND", "Slice") and n.input[0] in tables]
    assert reads
    assert not [n.name for n in reads if all(i in consts for i in n.input[1:] if i)]
    ifs = [n for n in m.graph.node if n.op_type == "If"]  # per pair (decode) or the loop
    loops = [n for n in _all_nodes(m.graph) if n.op_type == "Loop"]
    assert len(ifs) == len(loops) == meta["grouped_expert_sections"] > 0
    original = onnx.load(str(graph), load_external_data=False)
    bodies = [a.g for n in loops for a in n.attribute if a.name == "body"]
    outside = sum(1 for _ in _all_nodes(m.graph)) - sum(sum(1 for _ in _all_nodes(g)) for g in bodies)
    # nothing per expert outside the loops: the per-pair branch is one more copy of the section
    assert outside < 2 * len(original.graph.node) + len(ifs) * 48
    assert max(len(g.node) for g in bodies) < 3 * len(original.graph.node) / len(loops)
