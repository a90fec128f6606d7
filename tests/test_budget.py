"""calibrate --max-ppl-increase: the budget search (budget.py) on exported causal LM graphs."""
import itertools
import json
import math

import numpy as np
import onnx
import pytest

import moe_export
from helpers import GRAPHS, run_cli
from moe_export.run.budget import allocate
from moe_export.conversion import routers_metadata


def brute_force(curves, budget):
    layers = list(curves)
    best = 0.0
    for pick in itertools.product(*[[(0.0, 0.0)] + [(s, c) for s, c, _ in curves[l]] for l in layers]):
        if sum(c for _, c in pick) <= budget:
            best = max(best, sum(s for s, _ in pick))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_feasible_and_optimal_on_concave_curves(seed):
    """Savings concave in cost (diminishing returns, what dropping experts gives): the Lagrangian
    sweep finds the knapsack optimum whenever the budget falls on a hull vertex, and is never
    infeasible."""
    rng = np.random.default_rng(seed)
    curves = {}
    for layer in "abcd":
        cost = np.cumsum(rng.uniform(0.001, 0.01, 5) * np.arange(1, 6))  # rising marginal cost
        save = np.cumsum(rng.uniform(0.02, 0.05, 5))
        curves[layer] = [(float(s), float(c), (layer, j)) for j, (s, c) in enumerate(zip(save, cost))]
    for budget in (0.0, 0.01, 0.03, 0.08, 1.0):
        pick, saving, cost = allocate(curves, budget)
        assert cost <= budget + 1e-12
        assert saving == pytest.approx(sum(next((s for s, _, ch in curves[l] if ch == c), 0.0)
                                           for l, c in pick.items()))
        assert saving <= brute_force(curves, budget) + 1e-12
        if budget in (0.0, 1.0):
            assert saving == pytest.approx(brute_force(curves, budget))
        assert saving >= 0.9 * brute_force(curves, budget)


def test_allocation_fills_what_the_hull_leaves():
    """A non-concave curve: the hull skips its middle point; the fill takes it when it fits."""
    curves = {"a": [(0.1, 0.01, 1), (0.12, 0.05, 2), (0.3, 0.1, 3)], "b": [(0.05, 0.02, 1)]}
    pick, saving, cost = allocate(curves, 0.07)
    assert saving == pytest.approx(brute_force(curves, 0.07)) and cost <= 0.07


def nll_and_pairs(path, ids):
    """Next-token NLL and routed pairs of a converted graph, computed here independently."""
    meta = routers_metadata(onnx.load(str(path), load_external_data=False))
    from moe_export.run.validate import with_routing_outputs
    m = with_routing_outputs(onnx.load(str(path)), [r["indices"] for r in meta["routers"]])
    outs = moe_export.session(m).run(None, {"input_ids": ids})
    lg = outs[0].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = np.take_along_axis(lg[:, :-1], ids[:, 1:, None], -1)[..., 0]
    pairs = sum(int((x < r["attrs"]["num_experts"]).sum()) for x, r in zip(outs[-len(meta["routers"]):], meta["routers"]))
    return float((lse[:, :-1] - tgt).mean()), pairs


@pytest.mark.parametrize("graph, policy, wide, check", [
    ("qwen3_moe.onnx", "top-p", None, None), ("mixtral.onnx", "auto", None, "heldout"),
    ("deepseek_v3.onnx", "ratio", None, None), ("mixtral.onnx", "auto", 3, "heldout")])
def test_budget_holds_on_both_parts_and_the_report_is_what_the_output_does(graph, policy, wide, check, tmp_path):
    """`wide`: --max-experts above the gate's k, hard tokens taking more experts than the model
    was trained with while easy ones take fewer."""
    ids = np.random.default_rng(0).integers(0, 128, (16, 24))
    data, out = tmp_path / "ids.npy", tmp_path / "out.onnx"
    np.save(data, ids)
    r = run_cli("calibrate", GRAPHS / graph, "--data", data, "--max-ppl-increase", "0.002", "--policy", policy,
                "-o", out, "--json", *(["--max-experts", wide] if wide else []), *(["--check", check] if check else []))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["mode"] == "quality budget" and rep["check"] == (check or "crossfit")
    # the check: the fitting part's mean, and the checked sequences half a standard error above theirs
    assert rep["fit"]["ppl_increase"] <= 0.002 + 1e-9 and rep["heldout"]["ppl_increase_upper"] <= 0.002 + 1e-9
    assert rep["heldout"]["ppl_increase"] <= rep["heldout"]["ppl_increase_upper"]
    assert rep["all"]["ppl_increase"] <= rep["all"]["ppl_increase_upper"]
    log = lambda part: math.log1p(rep[part]["ppl_increase"])
    if check == "heldout":
        assert log("all") == pytest.approx((12 * log("fit") + 4 * log("heldout")) / 16, abs=1e-12)
        assert rep["fit"]["sequences"] == 12 and rep["heldout"]["sequences"] == 4
        fit, held = rep["fit"], rep["heldout"]
        want = (fit["pair_reduction"] * 12 + held["pair_reduction"] * 4) / 16
    else:  # every sequence fits and is checked (on the routing chosen without its fold)
        assert rep["fit"]["sequences"] == rep["heldout"]["sequences"] == rep["all"]["sequences"] == 16
        want = rep["fit"]["pair_reduction"]
    # the written model routes as reported: the whole data's perplexity and pairs, measured anew
    static = tmp_path / "static.onnx"
    assert run_cli("convert", GRAPHS / graph, "-o", static).returncode == 0
    (n0, p0), (n1, p1) = nll_and_pairs(static, ids), nll_and_pairs(out, ids)
    assert 1 - p1 / p0 == pytest.approx(want, abs=1e-9)
    assert math.exp(n1 - n0) - 1 <= 0.002 + 1e-6
    meta = routers_metadata(onnx.load(str(out), load_external_data=False))
    got = {x["layer"]: (x["attrs"]["policy"], x["attrs"]["threshold"], x["attrs"]["renormalize"])
           for x in meta["routers"]}
    assert got == {x["layer"]: (x["policy"], pytest.approx(x["threshold"]), x["renormalize"]) for x in rep["layers"]}
    if policy != "auto":
        assert {p for p, _, _ in got.values()} <= {policy, "static"}
    if wide:
        assert {x["attrs"]["max_experts"] for x in meta["routers"]} == {wide}
        assert [x["policy"] for x in rep["layers"]] != ["static"] * len(rep["layers"])


def test_a_given_renormalize_is_kept_and_the_search_tries_others(tmp_path):
    """--renormalize fixes it for every layer; without it the search measures 1, 0.5 and 0 at
    every threshold of a gate that normalizes its weights (Qwen3-MoE's norm_topk_prob)."""
    from moe_export.run.budget import RENORMALIZE, BudgetSearch

    ids = np.random.default_rng(0).integers(0, 128, (16, 24))
    np.save(tmp_path / "ids.npy", ids)
    r = run_cli("calibrate", GRAPHS / "qwen3_moe.onnx", "--data", tmp_path / "ids.npy", "--max-ppl-increase",
                "0.05", "--renormalize", "0.5", "-o", tmp_path / "out.onnx", "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert any(x["policy"] != "static" for x in layers)
    assert {x["renormalize"] for x in layers if x["policy"] != "static"} == {0.5}
    model = onnx.load(str(GRAPHS / "qwen3_moe.onnx"))
    search = BudgetSearch(model, GRAPHS, {"input_ids": ids})
    for points in search.curves.values():
        thresholds = {ch[1] for _, _, ch in points}
        assert sorted(ch[2] for _, _, ch in points) == sorted(RENORMALIZE * len(thresholds))
    # a grid of one's own: every value at every threshold
    grid = (1.0, 0.25)
    for points in BudgetSearch(model, GRAPHS, {"input_ids": ids}, renormalize=grid).curves.values():
        assert sorted(ch[2] for _, _, ch in points) == sorted(grid * len({ch[1] for _, _, ch in points}))
    # the pooled check, kept for comparison: every calibration sequence, half a standard error up
    rep = BudgetSearch(model, GRAPHS, {"input_ids": ids}, check="pooled").run(0.05)
    assert rep["routing"] and rep["all"]["ppl_increase_upper"] <= 0.05 and rep["fit"]["sequences"] == 12


def test_budget_errors_are_one_line(tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 100, (8, 16)))
    logits = tmp_path / "logits.npy"
    np.save(logits, np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    cases = [
        (["calibrate", GRAPHS / "gate_softmax_topk_e64k8.onnx", "--data", logits, "--max-ppl-increase", "0.01"],
         "needs a causal LM graph"),
        (["calibrate", GRAPHS / "mixtral.onnx", "--data", ids, "--target-experts", "1.5", "--policy", "auto"],
         "--policy auto"),
        (["calibrate", GRAPHS / "mixtral.onnx", "--data", ids, "--target-experts", "1.5", "--max-ppl-increase", "0.01"],
         "not allowed with"),
        (["calibrate", GRAPHS / "mixtral.onnx", "--data", ids, "--max-ppl-increase", "5"], "a fraction"),
        (["calibrate", GRAPHS / "mixtral.onnx", "--data", ids, "--max-ppl-increase", "0.01", "--renormalize", "2"],
         "must be in [0, 1]"),
        (["calibrate", GRAPHS / "mixtral.onnx", "--data", ids, "--target-experts", "1.5", "--check", "heldout"],
         "--check applies to --max-ppl-increase"),
    ]
    for args, msg in cases:
        r = run_cli(*args, "-o", tmp_path / "o.onnx")
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "o.onnx").exists()
    from moe_export.run.budget import BudgetSearch  # a grid of the Python API: the same message
    with pytest.raises(moe_export.MoeExportError, match=r"must be in \[0, 1\]"):
        BudgetSearch(onnx.load(str(GRAPHS / "mixtral.onnx")), GRAPHS, {"input_ids": np.load(ids)}, renormalize=(1.0, 2.0))
    with pytest.raises(moe_export.MoeExportError, match="check 'kfold': one of crossfit, heldout, pooled"):
        BudgetSearch(onnx.load(str(GRAPHS / "mixtral.onnx")), GRAPHS, {"input_ids": np.load(ids)}, check="kfold")


def test_costs_are_monotone_in_the_saving_per_policy_and_renormalize():
    """A larger cut measured cheaper than a smaller one (the text's noise) takes the smaller one's
    cost, and no point is free: the allocation cannot pick noise."""
    from moe_export.run.budget import _monotone

    pts = [(0.1, 0.02, ("top-p", 0.9, 1.0)), (0.2, -0.01, ("top-p", 0.8, 1.0)), (0.3, 0.05, ("top-p", 0.7, 1.0)),
           (0.2, -0.03, ("top-p", 0.8, 0.0)), (0.1, 0.01, ("ratio", 0.2, 1.0))]
    got = {(ch, s): c for s, c, ch in _monotone(pts)}
    assert got[("top-p", 0.8, 1.0), 0.2] == 0.02 and got[("top-p", 0.7, 1.0), 0.3] == 0.05
    assert got[("top-p", 0.8, 0.0), 0.2] == 0.0  # its own family: only clipped at zero
    assert got[("ratio", 0.2, 1.0), 0.1] == 0.01 and len(got) == len(pts)


# one causal LM per gate form the rules match (fused_moe's GenAI graphs take a KV cache)
BUDGET = 0.01
GATE_FORM_LMS = ["mixtral.onnx", "gpt_oss.onnx", "deepseek_v3.onnx", "deepseek_v4.onnx", "ernie4_5_moe.onnx",
                 "inkling_text.onnx", "kolibri1.onnx", "llama4_text.onnx", "mistral4.onnx", "phimoe.onnx"]


@pytest.mark.parametrize("graph", GATE_FORM_LMS)
def test_the_search_is_never_worse_than_target_calibration_on_every_gate_form(graph):
    """Six sequences and a tight budget, where the allocations' per-layer costs are noisy: every
    uniform routing (all layers at one fraction of k, what --target-experts gives, at each
    renormalize value the gate allows) that passes the search's own check routes no fewer pairs
    than what the search returns, so the search is not static where a routing within the budget
    exists."""
    from moe_export.run.budget import BudgetSearch, _renormalizations

    model = onnx.load(str(GRAPHS / graph))
    ids = np.random.default_rng(1).integers(0, 100, (6, 16))
    search = BudgetSearch(model, GRAPHS, {"input_ids": ids}, "top-p")
    rep = search.run(BUDGET)
    for r in search.ev.routers:  # (which renormalize serves a model best differs: deepseek16 wants 0)
        assert {u[r.layer][2] for u in search.uniform.values() if r.layer in u} == set(_renormalizations(r))
    passed, static = 0, search.base_pairs.sum()
    for routing in search.uniform.values():
        ok, _, pairs, _, _ = search._judge(routing, math.log1p(BUDGET), 0.5)
        if ok:
            passed += 1
            assert rep["routing"] and rep["fit"]["pair_reduction"] >= 1 - pairs.sum() / static - 1e-12
    assert passed  # the budget leaves room for some uniform routing on every form: the check above ran


def test_cross_fitting_checks_each_fold_on_the_routing_chosen_without_it():
    """The default check: the folds partition the sequences in runs of consecutive ones; each point
    is measured on a fold's sequences with the thresholds fitted on the other folds (a fresh run
    agrees), a fold's curves are the means over the other folds' sequences; and what the check
    sees of a fold is its run under that fold's own routing, the written routing's mean over
    every sequence staying within the budget besides."""
    from moe_export.run.budget import BudgetSearch, allocate
    from moe_export.run.stats import Thresholds, router_logits

    ids = np.random.default_rng(3).integers(0, 128, (12, 16))
    search = BudgetSearch(onnx.load(str(GRAPHS / "mixtral.onnx")), GRAPHS, {"input_ids": ids}, "top-p")
    folds, base = search.folds, search.base_nll
    assert [len(f) for f in folds] == [3] * 4 and sorted(np.concatenate(folds)) == list(range(12))
    # consecutive sequences: a document cut into sequences stays in one fold
    assert all(np.array_equal(f, np.arange(f[0], f[-1] + 1)) for f in folds)
    layer, pts = next(iter(search.points.items()))
    router = search.ev.routers[0]
    for choice, cut, d in pts[:3]:
        for j, rows in enumerate(folds):
            ev, thresholds = search.fits[j + 1]
            # fold j's threshold: solved on the other folds' logits
            lg, b, sz = router_logits(ev.model, GRAPHS, {"input_ids": ids[np.setdiff1d(search.fit, rows)]})[0]
            want = Thresholds(router, "top-p", lg, b, sizes=sz).solve(router.k * choice[1])[0]
            assert thresholds[router.layer, "top-p", choice[1]] == pytest.approx(want, abs=1e-12)
            nll, pairs = ev.run(search.concrete({layer: choice}, j + 1), rows)
            np.testing.assert_allclose(d[rows], nll - base[rows], atol=1e-12)
            np.testing.assert_array_equal(cut[rows], (search.base_pairs[rows] - pairs).sum(1))
        others = np.setdiff1d(search.fit, folds[0])
        saving, cost = next((s_, c) for s_, c, ch in search._curves(others)[layer] if ch == choice)
        assert saving == pytest.approx(cut[others].sum() / search.base_pairs[others].sum(), abs=1e-12)
        assert cost >= d[others].mean() - 1e-12  # (monotone: raised to a smaller cut's cost at most)
    budget = math.log1p(0.05)
    per_fold = [{l: ch for l, ch in allocate(search._curves(np.setdiff1d(search.fit, f)), budget)[0].items() if ch}
                for f in folds]
    routing = {l: ch for l, ch in allocate(search.curves, budget)[0].items() if ch}
    ok, d, _, seen, _ = search._judge(routing, budget, 0.5, per_fold)
    for j, (rows, r) in enumerate(zip(folds, per_fold)):
        ev, _ = search.fits[j + 1]
        nll, _ = ev.run(search.concrete(r, j + 1), rows)
        np.testing.assert_allclose(seen[rows], nll - base[rows], atol=1e-12)
    assert ok == (d.mean() <= budget and seen.mean() + 0.5 * seen.std(ddof=1) / math.sqrt(12) <= budget)
    rep = search.run(0.05)
    assert rep["check"] == "crossfit" and rep["heldout"]["sequences"] == 12
    # the routing written: thresholds fitted on every sequence
    assert rep["routing"] and all(t in search.fits[0][1].values() for _, t, _ in rep["routing"].values())


def test_a_converted_model_is_searched_as_its_original():
    """The search measures every layer with the others static: on a model already converted to a
    dynamic policy it finds what it finds on the original (the routers are set static first,
    whatever policy the model was written with)."""
    from moe_export.conversion import Policy, rewrite_model
    from moe_export.run.budget import BudgetSearch

    original = onnx.load(str(GRAPHS / "mixtral.onnx"))
    converted, _ = rewrite_model(onnx.load(str(GRAPHS / "mixtral.onnx")), Policy("top-p", 0.3))
    ids = np.random.default_rng(2).integers(0, 128, (8, 16))
    a = BudgetSearch(original, GRAPHS, {"input_ids": ids}).run(0.05)
    b = BudgetSearch(converted, GRAPHS, {"input_ids": ids}).run(0.05)
    assert a["routing"] == b["routing"] and a["heldout"] == b["heldout"]
