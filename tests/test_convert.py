"""Conversion of every reference graph: static parity, portable parity, dynamic savings."""
import json

import numpy as np
import onnx
import pytest

import moe_export
from helpers import ALL_GRAPHS, FAMILY_GRAPHS, GATE_GRAPHS, GRAPHS, input_feeds, run_cli
from moe_export.model.graph import load_model
from moe_export.rules.base import find_gates
from moe_export.conversion import Policy, convert, routers_metadata
from moe_export.run.runtime import make_feeds
from moe_export.run.validate import validate


def ids(paths):
    return [p.stem for p in paths]


def stock_session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def unordered_topk(graph):
    """Gates with TopK(sorted=0) (DeepSeek-V3) leave the slot order unspecified: compare each
    token's (index, weight) pairs as a set. Whole models are insensitive to it anyway."""
    from moe_export.model.graph import attr
    m = onnx.load(str(graph), load_external_data=False)
    return any(n.op_type == "TopK" and attr(n, "sorted", 1) == 0 for n in m.graph.node)


def canonical(outputs):
    if len(outputs) == 2 and outputs[1].dtype == np.int64:
        order = np.argsort(outputs[1], axis=-1, kind="stable")
        return [np.take_along_axis(o, order, axis=-1) for o in outputs]
    return outputs


@pytest.mark.parametrize("graph", ALL_GRAPHS, ids=ids(ALL_GRAPHS))
def test_static_reproduces_original(graph, tmp_path, ort_ref):
    n_gates = len(find_gates(onnx.load(str(graph), load_external_data=False))[0])
    assert n_gates >= 1
    out = tmp_path / "static.onnx"
    gates = convert(graph, out, Policy("static"))
    converted = onnx.load(str(out))
    assert len(gates) == n_gates
    assert sum(n.op_type == "DynamicRouter" for n in converted.graph.node) == n_gates
    assert find_gates(converted)[0] == [], "a static gate was left in place"
    for seed in range(3):
        feeds = input_feeds(graph, seed=seed)
        ref = ort_ref(graph, feeds)
        got = moe_export.session(out).run(None, feeds)
        if unordered_topk(graph):
            ref, got = canonical(ref), canonical(got)
        for r, g in zip(ref, got):
            if np.issubdtype(r.dtype, np.floating):
                np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
            else:
                np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("graph", ALL_GRAPHS, ids=ids(ALL_GRAPHS))
def test_portable_runs_in_stock_onnxruntime(graph, tmp_path, ort_ref):
    out = tmp_path / "portable.onnx"
    convert(graph, out, Policy("static"), portable=True)
    m = onnx.load(str(out))
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert not any(o.domain == "moe_export" for o in m.opset_import)
    feeds = input_feeds(graph)
    ref, got = ort_ref(graph, feeds), stock_session(out).run(None, feeds)
    if unordered_topk(graph):
        ref, got = canonical(ref), canonical(got)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy, threshold, renormalize", [("top-p", 0.1, 1.0), ("ratio", 0.95, 0.5),
                                                           ("entropy", 0.5, 0.0)])
@pytest.mark.parametrize("graph", ALL_GRAPHS, ids=ids(ALL_GRAPHS))
def test_dynamic_policies_route_fewer_pairs(graph, policy, threshold, renormalize, tmp_path):
    out = tmp_path / "dyn.onnx"
    convert(graph, out, Policy(policy, threshold, renormalize=renormalize))
    rep = validate(graph, out)
    assert all(np.isfinite([s["max_abs"] for s in rep["outputs"].values()]))
    assert rep["routed_pairs"]["converted"] < rep["routed_pairs"]["original"]
    # The compiled op and its standard-ONNX expansion make the same routing decisions.
    port = tmp_path / "dyn_portable.onnx"
    convert(graph, port, Policy(policy, threshold, renormalize=renormalize), portable=True)
    feeds = input_feeds(graph)
    a = moe_export.session(out).run(None, feeds)
    b = stock_session(port).run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-3)


def test_min_and_max_experts_bound_the_counts(tmp_path):
    graph = next(p for p in GATE_GRAPHS if "e64k8" in p.name and "softmax" in p.name)
    out = tmp_path / "bounded.onnx"
    convert(graph, out, Policy("top-p", 0.999, min_experts=2, max_experts=5))
    x = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32)
    w, idx = moe_export.session(out).run(None, {"logits": x})
    kept = (idx < 64).sum(axis=1)
    assert idx.shape == (500, 8) and kept.min() >= 2 and kept.max() == 5
    assert (w[idx == 64] == 0).all()


WIDE = [("mixtral.onnx", "wide/mixtral_top3.onnx"), ("qwen2_moe.onnx", "wide/qwen2_moe_top3.onnx"),
        ("legacy_mixtral_dynamo.onnx", "wide/legacy_mixtral_dynamo_top3.onnx")]


@pytest.mark.parametrize("base,top3", WIDE, ids=[w[0] for w in WIDE])
def test_max_experts_above_k_matches_a_wider_model(tmp_path, base, top3):
    # ratio 0 keeps every slot up to max_experts: a top-2 graph widened to 3 must compute what the
    # same weights exported with top-3 compute, in batched (regrouped) and loop sections alike.
    out = tmp_path / "wide.onnx"
    convert(GRAPHS / base, out, Policy("ratio", 0.0, max_experts=3))
    feeds = make_feeds(load_model(GRAPHS / base))
    got = moe_export.session(out).run(None, feeds)[0]
    want = moe_export.session(GRAPHS / top3).run(None, feeds)[0]
    narrow = moe_export.session(GRAPHS / base).run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4 < np.abs(narrow - want).max()


def test_more_pairs_than_the_original_are_said_so(tmp_path):
    out = tmp_path / "wide.onnx"
    assert run_cli("convert", GRAPHS / "legacy_mixtral_dynamo.onnx", "-o", out, "--policy", "ratio", "--threshold",
                   "0", "--max-experts", "3").returncode == 0
    r = run_cli("validate", GRAPHS / "legacy_mixtral_dynamo.onnx", out)
    assert r.returncode == 0 and "% more)" in r.stdout and "-" not in r.stdout.split("pairs:")[1], r.stdout


def test_max_experts_above_k_is_refused_where_the_graph_cannot_take_it(tmp_path):
    batched = GRAPHS / "mixtral.onnx"
    r = run_cli("convert", batched, "-o", tmp_path / "x.onnx", "--policy", "top-p", "--threshold", "0.5",
                "--max-experts", "3", "--no-group-experts")
    assert r.returncode == 1 and "exceeds the graph's k" in r.stderr and "Traceback" not in r.stderr
    gate = next(p for p in GATE_GRAPHS if "e8k2" in p.name)  # no expert section at all
    r = run_cli("convert", gate, "-o", tmp_path / "y.onnx", "--policy", "top-p", "--threshold", "0.5",
                "--max-experts", "3")
    assert r.returncode == 1 and "exceeds the graph's k" in r.stderr
    r = run_cli("convert", batched, "-o", tmp_path / "z.onnx", "--policy", "top-p", "--threshold", "0.5",
                "--max-experts", "64")
    assert r.returncode == 1 and "max_experts" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("graph", GATE_GRAPHS, ids=lambda p: p.stem)
def test_bare_gate_static_matches_native_subgraph_exactly(graph, tmp_path):
    out = tmp_path / "gate.onnx"
    convert(graph, out, Policy("static"))
    ref = stock_session(graph)
    (name, E), = [(i.name, i.shape[-1]) for i in ref.get_inputs()]
    x = np.random.default_rng(3).standard_normal((4096, E)).astype(np.float32) * 3
    (rw, ri), (w, i) = ref.run(None, {name: x}), moe_export.session(out).run(None, {name: x})
    if unordered_topk(graph):
        (rw, ri), (w, i) = canonical([rw, ri]), canonical([w, i])
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(w, rw, atol=1e-6, rtol=0)


def test_cli_inspect_lists_layers(tmp_path):
    graph = next(p for p in FAMILY_GRAPHS if p.stem == "deepseek_v3")
    r = run_cli("inspect", graph, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["layers"]
    assert len(rows) == 2
    assert rows[0]["scoring"] == "sigmoid" and rows[0]["n_group"] == 4 and rows[0]["topk_group"] == 2
    assert rows[0]["num_experts"] == 16 and rows[0]["k"] == 4 and rows[0]["scale"] == 2.5
    assert rows[0]["correction_bias"] and rows[0]["normalize"]
    r = run_cli("inspect", graph)
    assert r.returncode == 0 and "2 MoE layer(s)" in r.stdout


def test_cli_convert_then_validate(tmp_path):
    graph = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
    out = tmp_path / "m.dynamic.onnx"
    r = run_cli("convert", graph, "-o", out, "--policy", "top-p", "--threshold", "0.6")
    assert r.returncode == 0, r.stderr
    meta = routers_metadata(onnx.load(str(out), load_external_data=False))
    assert [x["attrs"]["policy"] for x in meta["routers"]] == ["top-p", "top-p"]
    r = run_cli("validate", graph, out, "--json", "--dim", "seq=32")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["static_policy"] is False and rep["static_reproduces"] is None
    assert 0 < rep["routed_pairs"]["reduction"] < 1
    static = tmp_path / "m.static.onnx"
    assert run_cli("convert", graph, "-o", static).returncode == 0
    r = run_cli("validate", graph, static)
    assert r.returncode == 0 and "reproduces the original: yes" in r.stdout
    capped = tmp_path / "m.static_capped.onnx"  # static ignores --max-experts below k
    assert run_cli("convert", graph, "-o", capped, "--max-experts", "1").returncode == 0
    rep = validate(graph, capped)
    assert rep["static_policy"] is True and rep["static_reproduces"] is True


def test_input_is_never_modified(tmp_path):
    import hashlib
    graph = FAMILY_GRAPHS[0]
    before = hashlib.sha256(graph.read_bytes()).hexdigest()
    convert(graph, tmp_path / "o.onnx", Policy("top-p", 0.5))
    assert hashlib.sha256(graph.read_bytes()).hexdigest() == before
