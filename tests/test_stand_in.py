"""The stand-in for dropped experts (--stand-in): its fit, its nodes against the numpy formula on
the real exporter's graphs and the real kernel, and calibrate / convert with it."""
import json
import sys

import numpy as np
import onnx
import pytest
import torch

from helpers import GRAPHS, run_cli, session_of
from moe_export.conversion.policy import Policy
from moe_export.conversion.probe import router_input
from moe_export.conversion.record import Routing
from moe_export.conversion.rewrite import router_nodes, set_policy
from moe_export.conversion.stand_in import attach_stand_ins
from moe_export.model.graph import GraphIndex
from moe_export.model.source import Source
from moe_export.run.budget import BudgetSearch
from moe_export.run.probe import fit_probes
from moe_export.run.runtime import load_inputs, run_exposed
from moe_export.run.stand_in import fit_stand_in, stand_in_at
from moe_export.run.stats import static_copy


def _ids(n=8, seq=24, seed=0):
    return np.random.default_rng(seed).integers(0, 128, (n, seq))


def test_the_fit_recovers_experts_of_its_rank():
    """Experts that are exactly affine maps of rank r are fitted to within the ridge's shrinkage;
    rank 0 is each expert's mean output; a rank above H is H's."""
    rng = np.random.default_rng(0)
    N, k, H, E, r = 3000, 2, 16, 4, 2
    x = rng.normal(size=(N, H)).astype(np.float32)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    maps = [(rng.normal(size=H), rng.normal(size=(H, r)) @ rng.normal(size=(r, H))) for _ in range(E)]
    outs = np.stack([np.stack([maps[e][0] + x[t] @ maps[e][1] for e in ids[t]]) for t in range(N)]).astype(np.float32)
    si = fit_stand_in(x, ids, outs, E, r)
    err = np.abs(stand_in_at(x, ids, si) - outs).max() / np.abs(outs).max()
    assert err < 0.01
    c0, G0, V0 = fit_stand_in(x, ids, outs, E, 0)
    assert G0.shape == (E, H, 0) and np.allclose(c0[1], outs[ids == 1].mean(axis=0), atol=1e-4)
    assert fit_stand_in(x[:50], ids[:50], outs[:50], E, 99)[1].shape == (E, H, H)
    few = fit_stand_in(x[:40], ids[:40], outs[:40], E, r)  # fewer tokens than H per expert: the dual form
    assert np.abs(stand_in_at(x[:40], ids[:40], few) - outs[:40]).max() / np.abs(outs).max() < 0.5


def _exposed(model, base_dir, names, feeds):
    """Each named tensor on one batch of `feeds`."""
    return dict(zip(names, (v[0] for v in run_exposed(model, base_dir, names, feeds))))


def _feeds(tmp_path, model, base_dir, seed):
    path = tmp_path / f"ids{seed}.npy"
    np.save(path, _ids(seed=seed))
    return load_inputs(path, model, base_dir)


def test_fits_on_subsets_of_one_read_out_are_each_subsets_own():
    """Cross-fitting's fits (budget.py): the probes and stand-ins fitted on subsets of the
    sequences from one read-out are those fitted on each subset's sequences alone."""
    static = static_copy(onnx.load(str(GRAPHS / "qwen3_moe.onnx")))
    ids = _ids(n=8, seq=12)
    subsets = [np.arange(8), np.array([0, 2, 5]), np.array([1, 3, 4, 6, 7])]
    together = fit_probes(static, GRAPHS, {"input_ids": ids}, True, 2, subsets)
    for rows, (probes, stand_ins) in zip(subsets, together):
        alone_p, alone_s = fit_probes(static, GRAPHS, {"input_ids": ids[rows]}, True, 2)
        for layer in alone_p:
            # (the factors G, V of a stand-in are its product's up to a rotation: the product is compared)
            unique = lambda p, s: list(p) + [s[0], s[1] @ s[2]]
            for a, b in zip(unique(probes[layer], stand_ins[layer]), unique(alone_p[layer], alone_s[layer])):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(together[1][1][layer][0], together[2][1][layer][0])


def test_the_read_out_cap_leaves_every_subset_its_share(monkeypatch):
    """The read-out stops at its token cap (run/probe.py MAX_TOKENS): read in data order, the
    first of four folds would take it all and the others' complement fits nothing. Read spread,
    each fold's complement gets about three quarters of it; a cap below one sequence per
    subset is refused in one line."""
    import moe_export.run.probe as probe

    static = static_copy(onnx.load(str(GRAPHS / "qwen3_moe.onnx")))
    ids = _ids(n=16, seq=12)
    folds = np.array_split(np.arange(16), 4)
    subsets = [np.setdiff1d(np.arange(16), f) for f in folds]
    monkeypatch.setattr(probe, "MAX_TOKENS", 4 * 12)  # four sequences
    seen = []
    real = probe.fit_stand_in
    monkeypatch.setattr(probe, "fit_stand_in", lambda x, *a: seen.append(len(x)) or real(x, *a))
    fit_probes(static, GRAPHS, {"input_ids": ids}, False, 2, subsets)
    assert min(seen) >= 2 * 12  # (of four sequences read, spread, each complement has at least two)
    monkeypatch.setattr(probe, "MAX_TOKENS", 12)
    with pytest.raises(probe.MoeExportError, match="too few to fit on each fold's complement"):
        fit_probes(static, GRAPHS, {"input_ids": ids}, False, 2, subsets)


@pytest.mark.parametrize("graph,policy", [("mixtral.onnx", Policy("top-p", 0.5, renormalize=0.0)),
                                          ("deepseek_v3.onnx", Policy("ratio", 0.5, renormalize=0.0)),
                                          ("gpt_oss.onnx", Policy("top-p", 0.6, renormalize=0.0)),
                                          ("legacy_mixtral_torchscript.onnx", Policy("top-p", 0.5, renormalize=0.0)),
                                          ("qwen2_moe.onnx", Policy("top-p", 0.5, renormalize=0.0)),
                                          ("genai/gpt_oss_fp32_cpu", Policy("top-p", 0.6, renormalize=0.0)),
                                          ("genai/qwen3_5_moe_int4_cpu", Policy("top-p", 0.5, renormalize=0.0))])
def test_the_graph_adds_each_dropped_pairs_stand_in(graph, policy, tmp_path):
    """Each expert-section form (a regrouped Scan, a per-expert loop, a shared expert beside the
    routed ones, GenAI's fused MoE / QMoE op): each layer's output gains exactly the sum over its
    dropped pairs of w S_e(x), with w the static weight (the numpy formula on the graph's own x,
    static and dynamic routing); routing statically, the stand-ins add nothing."""
    src = Source.of(GRAPHS / graph)
    static = static_copy(src.model)
    feeds, fit_feeds = (_feeds(tmp_path, static, src.base_dir, seed) for seed in (0, 1))
    _, sis = fit_probes(static, src.base_dir, fit_feeds, probe=False, stand_in=2)
    m = onnx.ModelProto()
    m.CopyFrom(static)
    attach_stand_ins(m, sis)
    out = static.graph.output[0].name
    assert np.array_equal(_exposed(m, src.base_dir, [out], feeds)[out], _exposed(static, src.base_dir, [out], feeds)[out])
    set_policy(m, policy)
    routing = Routing.read(m)
    nodes = {n.output[1]: n for n in m.graph.node if n.op_type == "DynamicRouter"}
    dropped_any = False
    for r, node in zip(routing.routers, router_nodes(m, routing)):
        twin = next(n for n in nodes.values() if n is not node and n.input[0] == node.input[0])
        x = router_input(GraphIndex(m.graph), r.logits)
        got = _exposed(m, src.base_dir, [x, twin.output[0], twin.output[1], r.indices, r.stand_in["of"],
                                         r.stand_in["sum"]], feeds)
        xv, sw, sid, did, y, total = got.values()
        H = xv.shape[-1]
        xv, sw, sid = xv.reshape(-1, H), sw.reshape(-1, r.k), sid.reshape(-1, r.k)
        did = did.reshape(len(sid), -1)
        dropped = ~(sid[:, :, None] == did[:, None, :]).any(axis=2)
        dropped_any |= dropped.any()
        want = (np.where(dropped, sw, 0)[..., None] * stand_in_at(xv, sid, sis[r.layer])).sum(axis=1)
        np.testing.assert_allclose((total - y).reshape(-1, H), want, rtol=1e-4, atol=1e-5)
    assert dropped_any


def _calibrate(tmp_path, src, out, *args):
    data = tmp_path / "ids.npy"
    if not data.exists():
        np.save(data, _ids(n=16))
    return run_cli("calibrate", src, "--data", data, "-o", out, *map(str, args))


def _stand_ins(path):
    m = onnx.load(str(path))
    names = [t.name for t in m.graph.initializer]
    assert len(set(names)) == len(names)
    return [r.stand_in and r.stand_in["rank"] for r in Routing.read(m).routers], m


def test_calibrate_writes_stand_ins_and_calibrating_again_replaces_or_removes_them(tmp_path):
    feeds = {"input_ids": _ids(n=2, seed=3)}
    one = tmp_path / "one.onnx"
    r = _calibrate(tmp_path, GRAPHS / "mixtral.onnx", one, "--target-experts", 1.5, "--policy", "probe", "--stand-in", 2)
    assert r.returncode == 0, r.stderr
    ranks, m = _stand_ins(one)
    assert ranks == [2, 2] and all(r.attrs.renormalize == 0 for r in Routing.read(m).routers)
    session_of(str(one)).run(None, feeds)
    two = tmp_path / "two.onnx"
    assert _calibrate(tmp_path, one, two, "--target-experts", 1.5, "--stand-in", 1).returncode == 0
    assert _stand_ins(two)[0] == [1, 1]
    none = tmp_path / "none.onnx"
    assert _calibrate(tmp_path, two, none, "--target-experts", 1.5).returncode == 0
    ranks, m = _stand_ins(none)
    assert ranks == [None, None] and not any(n.name.startswith("moe_export/stand_in") for n in m.graph.node)
    # profile counts the stand-ins' multiply-adds in the expert FLOPs: one per pair dropped
    r = run_cli("profile", one, "--data", tmp_path / "ids.npy", "--json")
    assert r.returncode == 0, r.stderr
    plain = run_cli("profile", none, "--data", tmp_path / "ids.npy", "--json")
    for x, y in zip(json.loads(r.stdout)["layers"], json.loads(plain.stdout)["layers"]):
        assert x["expert_gflops_static"] == y["expert_gflops_static"]  # (the stand-ins' factors are no expert's)
        H = 32  # make_graphs' tiny mixtral
        assert x["stand_in_gflops"] * 1e9 == pytest.approx(2 * 5 * H * (x["pairs_static"] - x["pairs"]))
        assert x["expert_gflops"] > x["pairs"] / x["pairs_static"] * x["expert_gflops_static"]
    # re-set: the kept experts may not take the dropped weight the stand-in takes; static is the original
    r = run_cli("convert", one, "--repolicy", "--policy", "top-p", "--threshold", 0.5, "-o", tmp_path / "x.onnx")
    assert r.returncode == 1 and "--renormalize 0" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    for args in (["--policy", "top-p", "--threshold", 0.5, "--renormalize", 0], ["--policy", "static"]):
        re = tmp_path / "re.onnx"
        r = run_cli("convert", one, "--repolicy", *args, "-o", re)
        assert r.returncode == 0, r.stderr
        assert _stand_ins(re)[0] == [2, 2]
    np.testing.assert_allclose(session_of(str(re)).run(None, feeds)[0],
                               session_of(str(GRAPHS / "mixtral.onnx")).run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def test_budget_search_with_a_stand_in(tmp_path):
    """--max-ppl-increase with --stand-in: the search with a stand-in at every layer and without
    any, the routing cutting more expert FLOPs on the fitting part taken (each within the budget),
    and the written model has the stand-ins exactly where the report says."""
    ids = _ids(n=16)
    data = tmp_path / "ids.npy"
    np.save(data, ids)
    model = onnx.load(str(GRAPHS / "qwen3_moe.onnx"))
    each = [BudgetSearch(model, GRAPHS, {"input_ids": ids}, "probe", stand_in=rank).run(0.05) for rank in (None, 2)]
    assert each[0]["stand_in"] is None and not each[0]["stand_ins"] and each[1]["stand_in"] == 2
    assert all(x["stand_in"] and x["renormalize"] == 0 for x in each[1]["layers"] if x["policy"] != "static")
    # a stand-in's multiply-adds count against the pairs it lets drop
    assert each[1]["fit"]["net_reduction"] < each[1]["fit"]["pair_reduction"] or not each[1]["routing"]
    out = tmp_path / "out.onnx"
    r = _calibrate(tmp_path, GRAPHS / "qwen3_moe.onnx", out, "--max-ppl-increase", 0.05, "--policy", "probe",
                   "--stand-in", 2, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    best = max(each, key=lambda x: x["fit"]["net_reduction"])
    assert rep["fit"]["net_reduction"] == pytest.approx(best["fit"]["net_reduction"])
    assert rep["heldout"]["ppl_increase_upper"] <= 0.05
    assert any("stand-ins cut" in w for w in rep["warnings"])
    ranks, _ = _stand_ins(out)
    assert ranks == [2 if x["stand_in"] else None for x in rep["layers"]]
    session_of(str(out)).run(None, {"input_ids": _ids(n=2)})


def test_a_float16_export_takes_a_stand_in(tmp_path):
    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    tiny_model("mixtral").to(torch.float16).save_pretrained(tmp_path / "ckpt")
    assert run_cli("export", tmp_path / "ckpt", "-o", tmp_path / "m16.onnx").returncode == 0
    out = tmp_path / "s16.onnx"
    r = _calibrate(tmp_path, tmp_path / "m16.onnx", out, "--target-experts", 1.5, "--stand-in", 2)
    assert r.returncode == 0, r.stderr
    got = session_of(str(out)).run(None, {"input_ids": _ids(n=2)})[0]
    assert got.dtype == np.float16 and np.isfinite(got).all()


@pytest.mark.parametrize("args,exit_code,words", [
    (["--stand-in", -1], 2, "a rank"),
    (["--stand-in", 2, "--renormalize", 1], 2, "renormalize must be 0"),
    (["--stand-in", 2, "--portable"], 2, "--portable"),
])
def test_bad_stand_in_arguments_are_refused_in_one_line(tmp_path, args, exit_code, words):
    out = tmp_path / "out.onnx"
    r = _calibrate(tmp_path, GRAPHS / "mixtral.onnx", out, "--target-experts", 1.5, *args)
    assert r.returncode == exit_code and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_a_graph_whose_expert_outputs_cannot_be_read_refuses_a_stand_in(tmp_path):
    out = tmp_path / "out.onnx"
    r = _calibrate(tmp_path, GRAPHS / "llama4_text.onnx", out, "--target-experts", 1.5, "--stand-in", 2)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr


def test_the_python_api_holds_stand_ins_to_their_shapes(tmp_path):
    from moe_export.conversion import convert
    from moe_export.errors import MoeExportError, UsageError

    E, H = 8, 32  # make_graphs' tiny mixtral
    ok = (np.zeros((E, H)), np.zeros((E, H, 2)), np.zeros((E, 2, H)))
    for bad in ([1, 2], (np.zeros((E, H)), np.zeros((E, H, 2)), np.zeros((E, 3, H))), ok[:2] + (np.full((E, 2, H), np.nan),)):
        with pytest.raises(UsageError):
            Policy("top-p", 0.5, renormalize=0.0, stand_ins={"x": bad})
    layers = [r.layer for r in Routing.read(static_copy(onnx.load(str(GRAPHS / "mixtral.onnx")))).routers]
    wrong_h = (np.zeros((E, 16)), np.zeros((E, 16, 2)), np.zeros((E, 2, 16)))
    for stand_ins, words in (({"nope": ok}, "not a MoE layer"), ({layers[0]: wrong_h}, "H 32")):
        with pytest.raises((MoeExportError, UsageError), match=words):
            convert(GRAPHS / "mixtral.onnx", tmp_path / "o.onnx", Policy("top-p", 0.5, renormalize=0.0,
                                                                         stand_ins=stand_ins))
        assert not (tmp_path / "o.onnx").exists()
    out = tmp_path / "ok.onnx"
    convert(GRAPHS / "mixtral.onnx", out, Policy("top-p", 0.5, renormalize=0.0, stand_ins={layers[0]: ok}))
    assert _stand_ins(out)[0] == [2, None]


def test_stand_ins_leave_an_experts_flops_unknown_where_they_were_and_refuse_wide_routers(tmp_path):
    """Per-expert weights (a TorchScript loop) tell no expert's FLOPs: the stand-ins' factors [E, H,
    r] are not taken for them. A router wider than k (--max-experts above k) is refused: the
    stand-in replaces the static k's dropped experts."""
    out = tmp_path / "loop.onnx"
    assert _calibrate(tmp_path, GRAPHS / "legacy_mixtral_torchscript.onnx", out, "--target-experts", 1.5,
                      "--stand-in", 2).returncode == 0
    r = run_cli("profile", out, "--data", tmp_path / "ids.npy", "--json")
    assert r.returncode == 0, r.stderr
    assert all(x["expert_gflops"] is None for x in json.loads(r.stdout)["layers"])
    wide = tmp_path / "wide.onnx"
    assert run_cli("convert", GRAPHS / "qwen3_moe.onnx", "--policy", "top-p", "--threshold", 0.9, "--max-experts", 5,
                   "-o", wide).returncode == 0
    r = _calibrate(tmp_path, wide, tmp_path / "w.onnx", "--target-experts", 2, "--stand-in", 2)
    assert r.returncode == 1 and "5 wide" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "w.onnx").exists()


def test_a_stand_in_generates_through_the_kv_cache_past_the_sliding_window(tmp_path):
    """The stand-in is per token and keeps no state: a GPT-OSS-style export with a KV cache and a
    sliding window, calibrated with stand-ins, generates through the cache, three windows past its
    prompt, what a prefill of the whole sequence so far predicts at every step."""
    import moe_export
    from moe_export.run.runtime import greedy

    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    ckpt, graph, out = tmp_path / "ckpt", tmp_path / "m.onnx", tmp_path / "s.onnx"
    tiny_model("gpt_oss").save_pretrained(ckpt)
    window = tiny_model("gpt_oss").config.sliding_window
    assert run_cli("export", ckpt, "-o", graph, "--with-past").returncode == 0
    r = _calibrate(tmp_path, graph, out, "--target-experts", 1.2, "--stand-in", 2)
    assert r.returncode == 0, r.stderr
    assert all(_stand_ins(out)[0])
    sess = moe_export.session(out)
    prompt = np.random.default_rng(0).integers(3, 100, (2, 7))
    seq = greedy(sess, prompt, 3 * window)
    for t in range(prompt.shape[1], seq.shape[1]):
        np.testing.assert_array_equal(greedy(sess, seq[:, :t], 1)[:, -1], seq[:, t])
