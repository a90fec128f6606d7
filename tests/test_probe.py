"""Policy probe: the experts' output sizes read out of exported graphs, the probe's fit, and
calibrate / convert / repolicy with it, on the real exporter's graphs and the real kernel."""
import json
import sys

import numpy as np
import onnx
import pytest
import torch

from helpers import GRAPHS, run_cli, session_of
from moe_export.conversion import routers_metadata
from moe_export.conversion.record import Routing
from moe_export.run.probe import expert_sizes, fit
from moe_export.run.stats import static_copy

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "kolibri1",
            "phimoe", "mistral4", "deepseek_v4", "legacy_mixtral_torchscript", "legacy_qwen2_moe_torchscript",
            "optimum/qwen3_moe", "optimum/deepseek_v3"]
# Half the experts of optimum's DeepSeek-V3 fixture are dead (their output is zero): probe drops
# them first, so no threshold keeps 0.7 k there.
FRACTION = {"optimum/deepseek_v3": 0.5}


def ids_file(tmp_path, n=12, seq=24, seed=0):
    ids = np.random.default_rng(seed).integers(0, 128, (n, seq))
    np.save(tmp_path / "ids.npy", ids)
    return tmp_path / "ids.npy"


def test_read_out_sizes_are_each_experts_output_in_pytorch():
    """The sizes the fit learns from, read out of the ONNX graph, are the norms of each routed
    expert's output that PyTorch computes for the same tokens."""
    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    torch_model = tiny_model("mixtral")
    ids = np.random.default_rng(1).integers(0, 128, (2, 16))
    model = static_copy(onnx.load(str(GRAPHS / "mixtral.onnx")))
    seen = []
    layers = torch_model.model.layers
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
             for layer in layers]
    with torch.no_grad():
        torch_model(input_ids=torch.as_tensor(ids))
    for h in hooks:
        h.remove()
    for li, r in enumerate(Routing.read(model).routers):
        x, idx, norms = expert_sizes(model, GRAPHS, {"input_ids": ids}, r)
        hidden = seen[li].reshape(-1, x.shape[1])
        np.testing.assert_allclose(x, hidden.numpy(), rtol=1e-4, atol=1e-5)
        experts = layers[li].mlp.experts
        with torch.no_grad():
            want = torch.stack([experts(hidden, torch.as_tensor(idx[:, j:j + 1]), torch.ones(len(idx), 1)).norm(dim=-1)
                                for j in range(idx.shape[1])], 1)
        np.testing.assert_allclose(norms, want.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("graph", ["mixtral.onnx", "legacy_mixtral_torchscript.onnx", "legacy_olmoe_torchscript.onnx",
                                   "deepseek_v3.onnx", "qwen2_moe.onnx", "gpt_oss.onnx", "genai/gpt_oss_fp32_cpu",
                                   "genai/qwen3_5_moe_int4_cpu"])
def test_the_slots_read_out_add_up_to_the_layers_expert_output(graph, tmp_path):
    """Each expert-section form (a regrouped Scan, a per-expert loop, a shared expert beside the
    routed ones, GenAI's fused MoE / QMoE op): the outputs read out one slot at a time, weighted by
    the router's weights, add up to what the section computes with every slot, and every routed
    expert's is read (a TorchScript loop adds each expert's rows to zeros of the tokens' shape:
    taking that first sum for the section's read expert 0 alone)."""
    from moe_export.model.graph import GraphIndex
    from moe_export.model.source import Source
    from moe_export.run.probe import SectionReader
    from moe_export.conversion.probe import section_output
    from moe_export.run.runtime import load_inputs, run_exposed

    src = Source.of(GRAPHS / graph)
    model = static_copy(src.model)
    feeds = load_inputs(ids_file(tmp_path, n=2, seq=8), model, src.base_dir)
    r = Routing.read(model).routers[-1]
    ix = GraphIndex(model.graph)
    whole, w = run_exposed(model, src.base_dir, [section_output(ix, r), r.weights], feeds)
    reader = SectionReader(model, src.base_dir, r, ix)
    # the section alone: far fewer nodes than the graph, fed what the prefix computes
    assert len(reader.section_nodes) < len(model.graph.node) / 2
    cut, _, w_cut, _ = reader.prefix_run(feeds)
    np.testing.assert_array_equal(w_cut, w[0])
    H = whole[0].shape[-1]
    w = w[0].reshape(-1, w[0].shape[-1]).astype(np.float64)
    total = sum(w[:, j:j + 1] * reader.slot(cut, j).reshape(-1, H) for j in range(r.k))
    np.testing.assert_allclose(total, whole[0].reshape(-1, H), rtol=1e-3, atol=1e-4 * np.abs(whole[0]).max())
    np.testing.assert_allclose(reader.slot(cut, -1), whole[0], rtol=1e-5, atol=1e-6 * np.abs(whole[0]).max())
    _, idx, norms = expert_sizes(model, src.base_dir, feeds, r)
    assert (norms > 0).all() and len(np.unique(idx)) > 1


def test_the_fit_recovers_a_linear_log_size():
    rng = np.random.default_rng(0)
    N, H, E, k = 4000, 6, 4, 2
    x = rng.standard_normal((N, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    P, b = rng.standard_normal((H, E)), rng.standard_normal(E)
    norms = np.exp(np.take_along_axis(x @ P + b, ids, axis=1))
    P2, b2 = fit(x, ids, norms, E)
    np.testing.assert_allclose(P2, P, atol=0.01)
    np.testing.assert_allclose(b2, b, atol=0.01)
    # an expert no token was routed to: its mean log size over the others, no slope
    P3, b3 = fit(x, np.where(ids == 3, 0, ids), norms, E)
    assert not P3[:, 3].any() and b3[3] == pytest.approx(np.log(norms).mean(), rel=1e-4)
    # a dead expert (its output always zero): never worth keeping; the others' fits are unchanged
    P4, b4 = fit(x, ids, np.where(ids == 2, 0.0, norms), E)
    assert not P4[:, 2].any() and b4[2] < np.log(1e-20)
    np.testing.assert_allclose(P4[:, [0, 1, 3]], P2[:, [0, 1, 3]], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_calibration_converts_every_family(family, tmp_path):
    """calibrate --policy probe on each family's exported graph: the probe is fitted, wired in as
    the routers' sizes input, and the written graph runs in ONNX Runtime with the mean experts
    per token the calibration aimed at."""
    data = ids_file(tmp_path)
    model = onnx.load(str(GRAPHS / f"{family}.onnx"))
    k = Routing.read(static_copy(model)).routers[0].k
    target = k * FRACTION.get(family, 0.7)
    out = tmp_path / "out.onnx"
    r = run_cli("calibrate", GRAPHS / f"{family}.onnx", "--data", data, "--policy", "probe", "--target-experts",
                target, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert all(abs(x["mean_experts"] - target) < 0.1 * k for x in layers), layers
    routers = routers_metadata(onnx.load(str(out)))["routers"]
    assert {x["attrs"]["policy"] for x in routers} == {"probe"} and all(x.get("sizes") for x in routers)
    # the written graph, run on the calibration data, routes what calibration measured
    written = Routing.read(onnx.load(str(out)))
    from moe_export.run.runtime import run_exposed
    from moe_export.run.runtime import load_inputs
    feeds = load_inputs(data, onnx.load(str(out)), tmp_path)
    got = run_exposed(onnx.load(str(out)), tmp_path, written.tensors("indices"), feeds)
    for x, parts in zip(layers, got):
        idx = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts])
        assert (idx < written.routers[0].num_experts).sum(1).mean() == pytest.approx(x["mean_experts"], abs=0.1 * k)


def test_graphs_whose_expert_outputs_cannot_be_read_are_refused_in_one_line(tmp_path):
    data = ids_file(tmp_path)
    # dense scattered weights; sections whose output does not add up slot by slot
    for graph in ("llama4_text.onnx", "inkling_text.onnx", "genai/lfm2_moe_fp32_cpu"):
        out = tmp_path / ("out" if graph.startswith("genai") else "out.onnx")
        r = run_cli("calibrate", GRAPHS / graph, "--data", data, "--policy", "probe", "--target-experts", 1.5, "-o", out)
        assert r.returncode != 0 and "policy probe" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()


def test_probe_needs_a_fitted_probe_and_repolicy_keeps_it(tmp_path):
    data = ids_file(tmp_path)
    out = tmp_path / "probe.onnx"
    r = run_cli("convert", GRAPHS / "mixtral.onnx", "--policy", "probe", "--threshold", "0.1", "-o", out)
    assert r.returncode != 0 and "calibrate --policy probe" in r.stderr and not out.exists()
    r = run_cli("calibrate", GRAPHS / "mixtral.onnx", "--data", data, "--policy", "probe", "--target-experts", 1.5,
                "-o", out)
    assert r.returncode == 0, r.stderr
    feeds = {"input_ids": np.load(data)[:2]}
    # re-set: another threshold keeps the probe; top-p leaves it unused; static reproduces the original
    for policy, t in (("probe", "0"), ("top-p", "0.6"), ("static", None)):
        re = tmp_path / f"re_{policy}.onnx"
        r = run_cli("convert", out, "--repolicy", "--policy", policy, *(["--threshold", t] if t else []), "-o", re)
        assert r.returncode == 0, r.stderr
        got = session_of(str(re)).run(None, feeds)[0]
        if policy != "top-p":  # threshold 0 keeps every slot: the static routing
            want = session_of(str(GRAPHS / "mixtral.onnx")).run(None, feeds)[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # a converted graph without probes cannot be re-set to probe
    plain = tmp_path / "plain.onnx"
    assert run_cli("convert", GRAPHS / "mixtral.onnx", "-o", plain).returncode == 0
    r = run_cli("convert", plain, "--repolicy", "--policy", "probe", "--threshold", "0.1", "-o", tmp_path / "x.onnx")
    assert r.returncode != 0 and "calibrate --policy probe" in r.stderr and not (tmp_path / "x.onnx").exists()


def test_portable_probe_routes_as_the_kernel(tmp_path):
    data = ids_file(tmp_path)
    outs = {}
    for portable in (False, True):
        out = tmp_path / f"p{portable}.onnx"
        r = run_cli("calibrate", GRAPHS / "qwen3_moe.onnx", "--data", data, "--policy", "probe", "--target-experts",
                    2.5, "-o", out, *(["--portable"] if portable else []))
        assert r.returncode == 0, r.stderr
        outs[portable] = session_of(str(out)).run(None, {"input_ids": np.load(data)[:3]})[0]
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-3, atol=1e-4)


def test_budget_search_with_probe_and_auto(tmp_path):
    """--max-ppl-increase with policy probe finds a routing within the budget; auto measures the
    probe beside the other policies."""
    from moe_export.run.budget import BudgetSearch

    data = ids_file(tmp_path, n=16)
    out = tmp_path / "out.onnx"
    r = run_cli("calibrate", GRAPHS / "qwen3_moe.onnx", "--data", data, "--policy", "probe", "--max-ppl-increase",
                "0.05", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {x["policy"] for x in rep["layers"]} <= {"probe", "static"}
    assert any(x["policy"] == "probe" for x in rep["layers"]) and rep["heldout"]["ppl_increase_upper"] <= 0.05
    routers = routers_metadata(onnx.load(str(out)))["routers"]
    assert all(bool(x.get("sizes")) == (x["attrs"]["policy"] == "probe") for x in routers)
    search = BudgetSearch(onnx.load(str(GRAPHS / "qwen3_moe.onnx")), GRAPHS, {"input_ids": np.load(data)}, "auto")
    assert {ch[0] for pts in search.curves.values() for _, _, ch in pts} == {"top-p", "ratio", "entropy", "probe"}


def test_a_probe_graph_calibrated_again_replaces_its_probes(tmp_path):
    data = ids_file(tmp_path)
    src = GRAPHS / "mixtral.onnx"
    for i in range(3):
        out = tmp_path / f"p{i}.onnx"
        r = run_cli("calibrate", src, "--data", data, "--policy", "probe", "--target-experts", 1.5, "-o", out)
        assert r.returncode == 0, r.stderr
        src = out
    m = onnx.load(str(src))
    assert len([t for t in m.graph.initializer if t.name.startswith("moe_export/probe/")]) == 3 * 2  # P, b, 0 bias
    assert len({t.name for t in m.graph.initializer}) == len(m.graph.initializer)
    session_of(str(src)).run(None, {"input_ids": np.load(data)[:2]})


def test_float16_graphs_take_the_probe(tmp_path):
    """The probe runs in float32 and its sizes take the router logits' type: a float16 export
    calibrates with probe, and auto measures it."""
    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    tiny_model("mixtral").to(torch.float16).save_pretrained(tmp_path / "ckpt")
    assert run_cli("export", tmp_path / "ckpt", "-o", tmp_path / "m16.onnx").returncode == 0
    data = ids_file(tmp_path, n=16)
    out = tmp_path / "p16.onnx"
    r = run_cli("calibrate", tmp_path / "m16.onnx", "--data", data, "--policy", "auto", "--max-ppl-increase", "0.05",
                "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert not any("probe left out" in w for w in json.loads(r.stdout)["warnings"])
    r = run_cli("calibrate", tmp_path / "m16.onnx", "--data", data, "--policy", "probe", "--target-experts", 1.5,
                "-o", tmp_path / "t16.onnx")
    assert r.returncode == 0, r.stderr
    session_of(str(tmp_path / "t16.onnx")).run(None, {"input_ids": np.load(data)[:2]})


def test_a_router_wider_than_k_leaves_probe_out_of_auto_and_refuses_it(tmp_path):
    data = ids_file(tmp_path, n=16)
    wide = tmp_path / "wide.onnx"
    assert run_cli("convert", GRAPHS / "qwen3_moe.onnx", "--policy", "top-p", "--threshold", 0.9, "--max-experts", 5,
                   "-o", wide).returncode == 0
    r = run_cli("calibrate", wide, "--data", data, "--policy", "auto", "--max-ppl-increase", "0.05",
                "-o", tmp_path / "a.onnx", "--json")
    assert r.returncode == 0, r.stderr
    assert any("probe left out" in w and "5 wide" in w for w in json.loads(r.stdout)["warnings"])
    r = run_cli("calibrate", wide, "--data", data, "--policy", "probe", "--target-experts", 2, "-o", tmp_path / "p.onnx")
    assert r.returncode != 0 and "5 wide" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()


def test_the_gates_input_is_found_behind_a_dequantized_weight_and_never_guessed():
    """A gate whose weight is dequantized (DequantizeLinear of an int8 initializer) still reads
    the hidden states; a tensor above a matmul of two activations is refused, not probed."""
    from onnx import helper, numpy_helper
    from moe_export.conversion.probe import router_input
    from moe_export.errors import MoeExportError
    from moe_export.model.graph import GraphIndex

    model = static_copy(onnx.load(str(GRAPHS / "mixtral.onnx")))
    r = Routing.read(model).routers[0]
    ix = GraphIndex(model.graph)
    x = router_input(ix, r.logits)
    gate = ix.producer[r.logits]
    assert gate.op_type in ("MatMul", "Gemm") and gate.input[0] == x
    W = numpy_helper.to_array(ix.initializers[gate.input[1]])
    model.graph.initializer.extend([numpy_helper.from_array(np.round(W * 100).astype(np.int8), "wq"),
                                    numpy_helper.from_array(np.float32(0.01), "wscale")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["wq", "wscale"], ["wdq"]))
    gate.input[1] = "wdq"
    assert router_input(GraphIndex(model.graph), r.logits) == x
    gate.input[1] = x  # x @ x: no weight
    with pytest.raises(MoeExportError, match="MatMul or Gemm of it by a weight"):
        router_input(GraphIndex(model.graph), r.logits)


def test_the_python_policy_checks_its_probes(tmp_path):
    from moe_export import Policy, UsageError

    good = (np.zeros((4, 8)), np.zeros(8))
    for probes, message in (([good], "must be a dict"), ({"a": "abc"}, "pair"), ({"a": (np.zeros((4, 8)), np.zeros(7))},
                            "shapes"), ({"a": (np.full((4, 8), np.nan), np.zeros(8))}, "finite")):
        with pytest.raises(UsageError, match=message):
            Policy("probe", 0.1, probes=probes)
    from moe_export.conversion import convert
    from moe_export.errors import MoeExportError
    with pytest.raises(MoeExportError, match="probes names 'nope'"):
        convert(GRAPHS / "mixtral.onnx", tmp_path / "out.onnx", Policy("probe", 0.1, probes={"nope": good}))
    assert not (tmp_path / "out.onnx").exists()
