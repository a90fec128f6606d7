"""Calibration to a quality budget: the cheapest per-layer routing whose next-token perplexity on
the calibration tokens stays within `max_ppl_increase` of the static model's.

1. Split the calibration sequences: a fitting part and a held-out part (`holdout`).
2. Per layer and policy, a curve: each threshold that brings that layer (alone dynamic, every
   other static) to a mean of k x 0.95, 0.9, ... 0.3 experts per token, and what it costs in
   log-perplexity and saves in routed pairs on the fitting part.
3. Allocation: pick one point per layer (or static) to save the most pairs for a summed cost
   within a budget, by a Lagrangian sweep over the curves (a multiple-choice knapsack: each layer
   takes the point maximizing saving - lambda x cost).
4. Interaction: layers do not add up exactly, so the whole routing is run jointly and the
   allocation budget is scaled (bisection) until the joint increase on the fitting part, and on
   the held-out part one standard error above its mean (sequences differ: a routing that only
   just fits the held-out sequences overshoots on others about half the time), is within the
   requested budget.
Policy "auto" pools every policy's points, so each layer gets the policy that serves it best.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
from onnx import helper

from . import MoeExportError
from .files import Progress
from .rewrite import Policy, rewrite_model, routers_metadata, router_nodes, set_policy
from .runtime import expose, session_from_proto, take_rows
from .spec import RouterAttrs, policy_counts, policy_view

DYNAMIC = ("top-p", "ratio", "entropy")
FRACTIONS = tuple(round(1 - 0.05 * i, 2) for i in range(1, 15))  # 0.95 .. 0.3 of k: each curve's points


class Evaluator:
    """Runs one converted graph under per-layer routings: next-token NLL and routed pairs."""

    def __init__(self, model, base_dir, feeds, batch=16):
        meta = routers_metadata(model)
        self.model, self.base_dir, self.batch = model, base_dir, batch
        self.routers = meta["routers"]
        self.ids = feeds["input_ids"]
        self.feeds = feeds
        out0 = model.graph.output[0].name
        self.exposed = expose(model, [out0] + [r["indices"] for r in self.routers], "moe_export.budget.")
        self.names = [f"moe_export.budget.{i}" for i in range(len(self.routers) + 1)]
        self.exposed_nodes = router_nodes(self.exposed)

    def run(self, routing, rows):
        """(mean NLL per predicted token, routed pairs per layer, mean NLL of each sequence) with
        routing {layer: (policy, threshold)} (layers absent: static) on the sequences `rows`."""
        for r, node in zip(self.routers, self.exposed_nodes):
            policy, t = routing.get(r["layer"], ("static", 0.0))
            attrs = dict(r["attrs"], policy=policy, threshold=float(t))
            del node.attribute[:]
            node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        sess = session_from_proto(self.exposed, self.base_dir)
        nll, count, pairs, per_seq = 0.0, 0, np.zeros(len(self.routers)), []
        for s in range(0, len(rows), self.batch):
            sel = rows[s:s + self.batch]
            outs = sess.run(self.names, take_rows(self.model, self.feeds, sel))
            logits, x = outs[0].astype(np.float64), self.ids[sel]
            m = logits.max(-1, keepdims=True)
            lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[..., 0]
            tgt = np.take_along_axis(logits[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
            nll += float((lse[:, :-1] - tgt).sum())
            count += tgt.size
            per_seq.extend((lse[:, :-1] - tgt).mean(axis=1))
            for i, (r, idx) in enumerate(zip(self.routers, outs[1:])):
                pairs[i] += int((idx < r["attrs"]["num_experts"]).sum())
        return nll / count, pairs, np.array(per_seq)


def _upper(d, se=1.0):
    """Mean of per-sequence increases plus `se` standard errors."""
    return float(d.mean() + se * (d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0))


def check_causal_lm(model, feeds):
    ids = feeds.get("input_ids")
    out = model.graph.output[0].type.tensor_type
    dims = [d.dim_value or d.dim_param for d in out.shape.dim] if out.HasField("shape") else []
    if ids is None or ids.ndim != 2 or len(dims) != 3:
        inputs = ", ".join(i.name for i in model.graph.input)
        raise MoeExportError("--max-ppl-increase needs a causal LM graph (input_ids [batch, seq] -> logits "
                             f"[batch, seq, vocab] as its first output); this graph takes {inputs} and its first "
                             f"output {model.graph.output[0].name!r} has rank {len(dims) or 'unknown'}")
    if ids.shape[1] < 2:
        raise MoeExportError("--max-ppl-increase needs sequences of at least 2 tokens in --data")


def _thresholds(router, policy, logits, bias, min_experts, max_experts):
    """Per-layer thresholds visiting k x FRACTIONS mean experts per token on these logits."""
    from .calibrate import _solve

    a = RouterAttrs(**dict(router["attrs"], policy=policy, threshold=0.5, min_experts=min_experts,
                           max_experts=max_experts or router["attrs"]["max_experts"])).resolved()
    view = policy_view(logits, bias, **asdict(a))
    k = a.k

    def mean(t):
        a.threshold = float(t)
        return float(policy_counts(a, view)[0].mean())
    hi = 0.999 if policy == "entropy" else 1.0
    out = []
    for f in FRACTIONS:
        target = k * f
        if target < a.min_experts:
            break
        t, got = _solve(mean, target, policy == "top-p", hi=hi)
        if abs(got - target) <= 0.025 * k and all(abs(t - u) > 1e-6 for u in out):  # within half a step
            out.append(t)
    return out


def allocate(curves, budget):
    """One point per layer from `curves` {layer: [(saving, cost, choice)]} (static = (0, 0, None)
    always allowed) maximizing the summed saving with summed cost <= budget. Returns (choices,
    saving, cost)."""
    best = ({}, 0.0, 0.0)
    slopes = {s / c for pts in curves.values() for s, c, _ in pts if c > 0 and s > 0}
    for lam in sorted(slopes | {0.0}, reverse=True):  # every price at which some layer's choice changes
        pick, tot_s, tot_c = {}, 0.0, 0.0
        for layer, pts in curves.items():
            s, c, ch = max([(0.0, 0.0, None)] + pts, key=lambda p: (p[0] - lam * p[1], -p[1]))
            pick[layer] = ch
            tot_s, tot_c = tot_s + s, tot_c + c
        if tot_c <= budget and tot_s > best[1]:
            best = (pick, tot_s, tot_c)
    return _fill(curves, budget, *best)


def _fill(curves, budget, pick, saving, cost):
    """Spends what the Lagrangian pick left of the budget (it only reaches the curves' convex
    hull): repeatedly the one layer move that saves the most and still fits."""
    now = {layer: next(((s, c) for s, c, ch in curves[layer] if ch == pick.get(layer)), (0.0, 0.0))
           for layer in curves}
    while True:
        moves = [(s - now[l][0], l, (s, c, ch)) for l, pts in curves.items() for s, c, ch in pts
                 if s > now[l][0] and cost - now[l][1] + c <= budget]
        if not moves:
            return pick, saving, cost
        gain, layer, (s, c, ch) = max(moves, key=lambda m: m[0])
        saving, cost = saving + gain, cost - now[layer][1] + c
        now[layer], pick = (s, c), dict(pick, **{layer: ch})


def calibrate_budget(model, base_dir, feeds, max_ppl_increase, policy="top-p", min_experts=1, max_experts=None,
                     holdout=0.25, batch=16, se=1.0):
    """Per-layer routing within the perplexity budget (see the module docstring). `model`: an
    original or converted ModelProto (kept as is). Returns the report (its "routing": {layer:
    (policy, threshold)}, layers absent staying static). `se`: standard errors above its mean the
    held-out increase must stay within the budget (0: the mean alone)."""
    check_causal_lm(model, feeds)
    if not 0 < max_ppl_increase < 1:
        raise MoeExportError(f"--max-ppl-increase {max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
    if not 0 < holdout < 1:
        raise MoeExportError(f"--holdout {holdout}: the fraction of the sequences held out, between 0 and 1")
    n = len(feeds["input_ids"])
    n_hold = max(1, int(round(n * holdout))) if n > 1 else 0
    if n_hold == 0:
        raise MoeExportError("--max-ppl-increase needs at least 2 sequences in --data (one is held out)")
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    m = _converted_copy(model, max_experts)
    ev = Evaluator(m, base_dir, feeds, batch)
    policies = DYNAMIC if policy == "auto" else (policy,)
    budget = math.log1p(max_ppl_increase)
    with Progress("measuring each layer's perplexity cost", 1) as bar:
        base_fit, static_pairs, _ = ev.run({}, fit)
        base_hold, static_hold, hold_rows = ev.run({}, hold)
        logits = _router_logits(m, base_dir, take_rows(m, feeds, fit), ev.routers)
        plan = [(r, p, t) for r, (lg, b) in zip(ev.routers, logits) for p in policies
                for t in _thresholds(r, p, lg, b, min_experts, max_experts)]
        bar.total = len(plan)
        curves = {r["layer"]: [] for r in ev.routers}
        total = static_pairs.sum()
        for j, (r, p, t) in enumerate(plan):
            nll, pairs, _ = ev.run({r["layer"]: (p, t)}, fit)
            curves[r["layer"]].append(((total - pairs.sum()) / total, nll - base_fit, (p, t)))
            bar.update(j + 1)
    # The joint run: the largest allocation budget (a bisection on its scale) whose routing keeps
    # the fitting and the held-out part within the budget.
    runs, chosen, lo, hi = {}, None, 0.0, 2.0
    for _ in range(8):
        scale = (lo + hi) / 2
        routing = {layer: ch for layer, ch in allocate(curves, budget * scale)[0].items() if ch is not None}
        key = tuple(sorted(routing.items()))
        if key not in runs:
            (f_nll, f_pairs, _), (h_nll, h_pairs, h_rows) = ev.run(routing, fit), ev.run(routing, hold)
            runs[key] = (f_nll - base_fit, h_nll - base_hold, f_pairs, h_pairs, _upper(h_rows - hold_rows, se))
        if runs[key][0] <= budget and runs[key][4] <= budget:
            if chosen is None or runs[key][2].sum() < chosen[1][2].sum():
                chosen = (routing, runs[key])
            lo = scale
        else:
            hi = scale
    routing, (fc, hc, f_pairs, h_pairs, hu) = chosen or ({}, (0.0, 0.0, static_pairs, static_hold, 0.0))
    layers = []
    for i, r in enumerate(ev.routers):
        ch = routing.get(r["layer"])
        est = next((c for s, c, x in curves[r["layer"]] if x == ch), 0.0)
        layers.append({"layer": r["layer"], "policy": ch[0] if ch else "static", "threshold": ch[1] if ch else 0.0,
                       "k": r["attrs"]["k"], "mean_experts": float(f_pairs[i] / ev.ids[fit].size),
                       "est_ppl_cost": math.expm1(est)})
    return {"max_ppl_increase": max_ppl_increase, "policy": policy, "routing": routing, "layers": layers,
            "fit": {"sequences": int(len(fit)), "ppl_increase": math.expm1(fc),
                    "pair_reduction": float(1 - f_pairs.sum() / static_pairs.sum()), "static_ppl": math.exp(base_fit)},
            "heldout": {"sequences": int(len(hold)), "ppl_increase": math.expm1(hc),
                        "ppl_increase_upper": math.expm1(hu),
                        "pair_reduction": float(1 - h_pairs.sum() / static_hold.sum()), "static_ppl": math.exp(base_hold)},
            "evaluations": len(plan) + 2 + 2 * len(runs)}


def _converted_copy(model, max_experts):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if routers_metadata(m) is None:
        rewrite_model(m, Policy("static", max_experts=max_experts))
    elif max_experts is not None:
        set_policy(m, Policy("static", max_experts=max_experts))
    return m


def _router_logits(model, base_dir, feeds, routers):
    """Each router's [tokens, E] logits and bias on `feeds`, routing statically."""
    from .runtime import run_exposed

    tensors = [t for r in routers for t in (r["logits"], r.get("bias")) if t]
    got = dict(zip(tensors, run_exposed(model, base_dir, tensors, feeds)))
    out = []
    for r in routers:
        E = r["attrs"]["num_experts"]
        lg = np.concatenate([c.reshape(-1, E) for c in got[r["logits"]]]).astype(np.float32)
        b = got[r["bias"]][0].reshape(E).astype(np.float32) if r.get("bias") else None
        out.append((lg, b))
    return out


def budget_policy(report, min_experts=1, max_experts=None) -> Policy:
    """The Policy that converts a model to the routing the report chose."""
    routing = report["routing"]
    return Policy("static", 0.0, min_experts, max_experts,
                  per_layer={layer: (p, t) for layer, (p, t) in routing.items()})

