"""Calibration to a quality budget: the cheapest per-layer routing whose next-token perplexity on
the calibration tokens stays within `max_ppl_increase` of the static model's.

1. Split the calibration sequences: a fitting part and a held-out part (`holdout`).
2. Per layer and policy, a curve: each threshold that brings that layer (alone dynamic, every
   other static) to a mean of k x 0.95, 0.9, ... 0.3 experts per token, each with the kept
   experts renormalized fully, half or not at all (`renormalize` 1, 0.5, 0, where the gate
   normalizes its weights: which compensates a dropped expert best differs by layer and by how
   many are dropped), and what it costs in log-perplexity and saves in routed pairs on the
   fitting part. Each curve's costs are made monotone in the saving per policy and renormalize
   (`_monotone`): a larger cut measured cheaper than a smaller one is noise of the text.
3. Allocation: pick one point per layer (or static) to save the most pairs for a summed cost
   within a budget, by a Lagrangian sweep over the curves (a multiple-choice knapsack: each layer
   takes the point maximizing saving - lambda x cost).
4. Interaction: layers do not add up exactly, so the whole routing is run jointly, on the
   fitting and the held-out part, and the allocation budget is scaled (bisection) until the
   held-out part's increase, `se` (default 0.5) standard errors above its mean (per-sequence
   increases), and the fitting part's, are within the requested budget (`check="heldout"`).
   The fitting part cannot judge alone: the curves and the allocation were chosen on it, so it
   can under-state what other text sees (BENCHMARKS.md: mixtral8, ratio, +1%: fitting part
   +0.32%, held-out +0.66%, evaluation +0.78%).
   `check="pooled"` (measured, not the default) takes the mean of all the calibration
   sequences instead, and inherits that bias.
5. The uniform routings (every layer at one fraction of k, as target calibration gives, at each
   renormalize value) are checked the same way, and the routing that passes with the fewest
   pairs is returned, so the search never returns less than target calibration would at the
   same check, also where the allocations all fail it (the layers' interaction, or a small
   calibration set's noise).
Policy "auto" pools every policy's points, so each layer gets the policy that serves it best.
With a stand-in for the dropped experts (`calibrate_budget(stand_in=rank)`, conversion/
stand_in.py) the search runs twice, with a stand-in at every layer (renormalize 0) and without
any, and the routing that cuts more expert FLOPs (stand-ins counted) on the fitting part is
taken: a choice per layer, measured with one layer dynamic at a time, picked the noise of those
measurements (BENCHMARKS.md, "The stand-in, built").
"""
from __future__ import annotations

import math

import numpy as np
from ..errors import MoeExportError
from ..conversion.policy import Policy
from ..conversion.probe import attach_probes
from ..conversion.record import Routing
from ..conversion.rewrite import router_nodes, set_attrs
from ..conversion.stand_in import attach_stand_ins
from ..model.files import Progress
from .runtime import BATCH_TOKENS, expose, fixed_batch, run_guarded, session_from_proto, take_rows
from .probe import fit_probes
from .profile import router_flops_per_pair
from .stats import Thresholds, routed_pairs, router_logits, static_copy

DYNAMIC = ("top-p", "ratio", "entropy")
RENORMALIZE = (1.0, 0.5, 0.0)  # the kept experts' share of the dropped ones' weight, searched per layer
MIN_HELDOUT = 8  # fewer held-out sequences than this: their spread cannot bound other text's increase
FRACTIONS = tuple(round(1 - 0.05 * i, 2) for i in range(1, 15))  # 0.95 .. 0.3 of k: each curve's points


class Evaluator:
    """Runs one converted graph under per-layer routings: next-token NLL and routed pairs."""

    def __init__(self, model, base_dir, feeds, batch=16):
        self.model, self.base_dir = model, base_dir
        self.routers = Routing.read(model).routers
        self.ids = feeds["input_ids"]
        # as runtime.batches(): the graph's own batch size, else bounded in rows and tokens
        self.batch = fixed_batch(model) or max(1, min(batch, BATCH_TOKENS // max(1, self.ids.shape[1])))
        self.feeds = feeds
        out0 = model.graph.output[0].name
        self.exposed = expose(model, [out0] + [r.indices for r in self.routers], "moe_export.budget.")
        self.names = [f"moe_export.budget.{i}" for i in range(len(self.routers) + 1)]
        self.exposed_nodes = router_nodes(self.exposed)

    def run(self, routing, rows):
        """(mean NLL per predicted token, routed pairs per layer, mean NLL of each sequence) with
        routing {layer: (policy, threshold, renormalize)} (layers absent: static) on the sequences
        `rows`."""
        for r, node in zip(self.routers, self.exposed_nodes):
            set_attrs(node, r.with_policy(*routing.get(r.layer, ("static", 0.0, 1.0))))
        sess = session_from_proto(self.exposed, self.base_dir)
        nll, count, pairs, per_seq = 0.0, 0, np.zeros(len(self.routers)), []
        for s in range(0, len(rows), self.batch):
            sel = rows[s:s + self.batch]
            outs = run_guarded(sess, self.names, take_rows(self.model, self.feeds, sel))
            logits, x = outs[0].astype(np.float64), self.ids[sel]
            m = logits.max(-1, keepdims=True)
            lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[..., 0]
            tgt = np.take_along_axis(logits[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
            nll += float((lse[:, :-1] - tgt).sum())
            count += tgt.size
            per_seq.extend((lse[:, :-1] - tgt).mean(axis=1))
            for i, (r, idx) in enumerate(zip(self.routers, outs[1:])):
                pairs[i] += routed_pairs(idx, r.num_experts)
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


def _thresholds(router, policy, logits, bias, min_experts, max_experts, sizes=None):
    """(fraction, threshold) pairs: the thresholds bringing this layer to k x fraction mean
    experts per token on these logits, for the FRACTIONS it can reach."""
    th = Thresholds(router, policy, logits, bias, min_experts, max_experts, sizes)
    k, out = th.attrs.k, []
    unit = lambda t, u: max(t, u) if policy == "probe" else 1.0  # (probe's threshold has the outputs' scale)
    for f in FRACTIONS:
        target = k * f
        if target < th.attrs.min_experts:
            break
        t, got = th.solve(target)
        within_half_a_step = abs(got - target) <= 0.025 * k
        if within_half_a_step and all(abs(t - u) > 1e-6 * unit(t, u) for _, u in out):
            out.append((f, t))
    return out


def _monotone(points):
    """A layer's measured points with each cost raised to the highest cost of any point of the same
    policy and renormalize that saves no more. Dropping more experts does not make a model better;
    where a point measures cheaper than a smaller cut, that is the calibration text's noise, and the
    allocation would pick exactly those points (for free, where the noise is negative) and fail the
    held-out check."""
    out, families = [], {}
    for s, c, ch in points:
        families.setdefault((ch[0], ch[2]), []).append((s, c, ch))
    for pts in families.values():
        worst = 0.0
        for s, c, ch in sorted(pts, key=lambda p: p[0]):
            worst = max(worst, c)
            out.append((s, worst, ch))
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


def _renormalizations(router, renormalize=None):
    """The renormalize values to try at a router: `renormalize` if one value, else where the gate's
    weights sum to 1 (only there has a dropped expert a share to give back) each of `renormalize`
    (None: RENORMALIZE)."""
    if renormalize is not None and np.ndim(renormalize) == 0:
        return (float(renormalize),)
    return tuple(renormalize or RENORMALIZE) if router.attrs.sums_to_one else (1.0,)


def _stand_in_costs(model) -> dict:
    """{layer: a stand-in's multiply-adds per dropped pair over an expert's (0: not known)} of the
    routers of converted `model` that have a stand-in."""
    routing = Routing.read(model)
    return {r.layer: 2 * (2 * r.stand_in["rank"] + 1) * r.stand_in["hidden"] / fpp if fpp else 0.0
            for r, fpp in zip(routing.routers, router_flops_per_pair(model, routing)) if r.stand_in}


class BudgetSearch:
    """The measured part of the budget search (steps 1 and 2 of the module docstring), which does
    not depend on the budget: `run(max_ppl_increase)` then allocates and checks (steps 3, 4).
    `model`: an original or converted ModelProto (kept as is)."""

    def __init__(self, model, base_dir, feeds, policy="top-p", min_experts=1, max_experts=None, holdout=0.25,
                 batch=16, renormalize=None, stand_in=None):
        check_causal_lm(model, feeds)
        bad = [r for r in np.ravel(() if renormalize is None else renormalize) if not 0 <= r <= 1]
        if bad:
            raise MoeExportError(f"renormalize {bad[0]:g}: must be in [0, 1]")
        if not 0 < holdout < 1:
            raise MoeExportError(f"--holdout {holdout}: the fraction of the sequences held out, between 0 and 1")
        n = len(feeds["input_ids"])
        n_hold = max(1, int(round(n * holdout))) if n > 1 else 0
        if n_hold == 0:
            raise MoeExportError("--max-ppl-increase needs at least 2 sequences in --data (one is held out)")
        if n_hold == n:
            raise MoeExportError(f"--holdout {holdout} holds out all {n} sequences of --data, leaving none to fit "
                                 "on; lower it or give more sequences")
        order = np.random.default_rng(0).permutation(n)
        self.hold, self.fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
        m = static_copy(model, max_experts)
        routing = Routing.read(m)
        routing.check_dynamic()
        self.policy = policy
        policies = DYNAMIC if policy == "auto" else (policy,)
        self.probes, self.stand_ins, self.stand_in, self.notes = None, None, stand_in, []
        if n_hold < MIN_HELDOUT:
            self.notes.append(f"the budget is checked on {n_hold} held-out sequence{'s' * (n_hold > 1)} of the {n} in "
                              "--data, too few to bound the increase on other text; give more sequences")
        fit_rows, want_probe = take_rows(m, feeds, self.fit), policy in ("probe", "auto")
        if want_probe or stand_in is not None:  # (one read-out: a probe learns what the stand-in misses)
            try:
                self.probes, self.stand_ins = fit_probes(m, base_dir, fit_rows, want_probe, stand_in)
            except MoeExportError as e:
                if policy != "auto":
                    raise
                self.notes.append(f"policy probe left out: {e}")
                if stand_in is not None:
                    self.stand_ins = fit_probes(m, base_dir, fit_rows, False, stand_in)[1]
        self.stand_in_cost = {}  # {layer: a stand-in's multiply-adds per dropped pair / an expert's}
        if self.stand_ins:
            attach_stand_ins(m, self.stand_ins)
            renormalize = 0.0  # (the stand-in takes the dropped weight)
            self.stand_in_cost = _stand_in_costs(m)
            if not all(self.stand_in_cost.values()):
                self.notes.append("the stand-ins' own cost is not counted against what they save: this graph's "
                                  "expert weights do not tell an expert's FLOPs")
        if self.probes:
            attach_probes(m, self.probes)
            policies += ("probe",) if policy == "auto" else ()
        self.ev = ev = Evaluator(m, base_dir, feeds, batch)
        with Progress("measuring each layer's perplexity cost", 1) as bar:
            self.base_fit, self.static_pairs, self.fit_rows = ev.run({}, self.fit)
            self.base_hold, self.static_hold, self.hold_rows = ev.run({}, self.hold)
            logits = router_logits(m, base_dir, take_rows(m, feeds, self.fit))
            plan, self.uniform = [], {}
            for r, (lg, b, sz) in zip(ev.routers, logits):
                rns = _renormalizations(r, renormalize)
                for p in policies:
                    for f, t in _thresholds(r, p, lg, b, min_experts, max_experts, sz):
                        plan += [(r, (p, t, rn)) for rn in rns]
                        # every layer at the same fraction of k (what target calibration gives), at
                        # each renormalize the gate allows: which one serves a model best differs
                        # (deepseek16: 0; benchmarks/drop_signals.py)
                        for rn in rns:
                            self.uniform.setdefault((p, f, rn), {})[r.layer] = (p, t, rn)
            bar.total = len(plan)
            measured = {r.layer: [] for r in ev.routers}
            total = self.static_pairs.sum()
            for j, (r, choice) in enumerate(plan):
                nll, pairs, _ = ev.run({r.layer: choice}, self.fit)
                measured[r.layer].append(((total - pairs.sum()) / total, nll - self.base_fit, choice))
                bar.update(j + 1)
            self.curves = {layer: _monotone(pts) for layer, pts in measured.items()}
        self.measured = len(plan) + 2
        self.joint = {}  # routing -> its joint run, shared by every budget

    def _net(self, routing, pairs, static):
        """The cut in expert FLOPs: routed pairs cut, less each dropped pair's stand-in in pairs' worth."""
        spent = pairs.sum() + sum((static[i] - pairs[i]) * self.stand_in_cost.get(r.layer, 0.0)
                                  for i, r in enumerate(self.ev.routers) if r.layer in routing)
        return float(1 - spent / static.sum())

    def _joint(self, routing):
        """(fitting part's increase, held-out part's, their routed pairs per layer, every
        sequence's increase: the fitting ones, then the held-out ones) of a routing."""
        key = tuple(sorted(routing.items()))
        if key not in self.joint:
            (f_nll, f_pairs, f_rows), (h_nll, h_pairs, h_rows) = self.ev.run(routing, self.fit), self.ev.run(routing, self.hold)
            self.joint[key] = (f_nll - self.base_fit, h_nll - self.base_hold, f_pairs, h_pairs,
                               np.concatenate([f_rows - self.fit_rows, h_rows - self.hold_rows]))
        return self.joint[key]

    def run(self, max_ppl_increase, se=0.5, check="heldout"):
        """The report at this budget (its "routing": {layer: (policy, threshold, renormalize)},
        layers absent staying static). `se`: standard errors above its mean the increase must
        stay within the budget (0: the mean alone); `check`: of which sequences (step 4)."""
        if not 0 < max_ppl_increase < 1:
            raise MoeExportError(f"--max-ppl-increase {max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
        budget, ev, curves, n_fit = math.log1p(max_ppl_increase), self.ev, self.curves, len(self.fit)

        def within(run):
            fc, _, _, _, d = run
            if check == "pooled":
                return _upper(d, se) <= budget
            return fc <= budget and _upper(d[n_fit:], se) <= budget
        # The joint run: the largest allocation budget (a bisection on its scale) whose routing
        # passes the check.
        tried, chosen, lo, hi = set(), None, 0.0, 2.0
        for _ in range(8):
            scale = (lo + hi) / 2
            routing = {layer: ch for layer, ch in allocate(curves, budget * scale)[0].items() if ch is not None}
            tried.add(tuple(sorted(routing.items())))
            got = self._joint(routing)
            if within(got):
                if chosen is None or got[2].sum() < chosen[1][2].sum():
                    chosen = (routing, got)
                lo = scale
            else:
                hi = scale
        # Every uniform routing too (passing is not monotone in the fraction on a small set): the
        # search then never returns less than target calibration would at this check, also where
        # the layers' interaction or the text's noise defeats every allocation.
        for routing in self.uniform.values():
            tried.add(tuple(sorted(routing.items())))
            got = self._joint(routing)
            if within(got) and (chosen is None or got[2].sum() < chosen[1][2].sum()):
                chosen = (routing, got)
        static = (0.0, 0.0, self.static_pairs, self.static_hold, np.zeros(len(self.fit) + len(self.hold)))
        routing, (fc, hc, f_pairs, h_pairs, d) = chosen or ({}, static)
        fit, hold = self.fit, self.hold
        layers = []
        for i, r in enumerate(ev.routers):
            ch = routing.get(r.layer)
            est = next((c for s, c, x in curves[r.layer] if x == ch), 0.0)
            layers.append({"layer": r.layer, "policy": ch[0] if ch else "static", "threshold": ch[1] if ch else 0.0,
                           "renormalize": ch[2] if ch else 1.0, "stand_in": bool(ch and self.stand_ins), "k": r.k,
                           "mean_experts": float(f_pairs[i] / ev.ids[fit].size), "est_ppl_cost": math.expm1(est)})
        return {"max_ppl_increase": max_ppl_increase, "policy": self.policy, "routing": routing, "layers": layers,
                "fit": {"sequences": int(len(fit)), "ppl_increase": math.expm1(fc),
                        "pair_reduction": float(1 - f_pairs.sum() / self.static_pairs.sum()),
                        "net_reduction": self._net(routing, f_pairs, self.static_pairs),
                        "static_ppl": math.exp(self.base_fit)},
                "heldout": {"sequences": int(len(hold)), "ppl_increase": math.expm1(hc),
                            "ppl_increase_upper": math.expm1(_upper(d[n_fit:], se)),
                            "pair_reduction": float(1 - h_pairs.sum() / self.static_hold.sum()),
                            "net_reduction": self._net(routing, h_pairs, self.static_hold),
                            "static_ppl": math.exp(self.base_hold)},
                "all": {"sequences": int(len(d)), "ppl_increase": math.expm1(float(d.mean())),
                        "ppl_increase_upper": math.expm1(_upper(d, se))},
                "check": check, "se": se, "notes": self.notes, "stand_in": self.stand_in,
                "evaluations": self.measured + 2 * len(tried),
                "probes": {layer: self.probes[layer] for layer, ch in routing.items() if ch[0] == "probe"},
                "stand_ins": {layer: self.stand_ins[layer] for layer in routing} if self.stand_ins else {}}


def best_of(reports):
    """Of budget reports on the same data (with and without stand-ins), the one cutting more
    expert FLOPs on the fitting part; its notes say what it was chosen over."""
    best = max(reports, key=lambda r: r["fit"]["net_reduction"])
    for r in reports:
        if r is not best:
            how = "without" if r["stand_in"] is None else f"with rank-{r['stand_in']}"
            best["notes"] = best["notes"] + [
                f"the routing {how} stand-ins cut {100 * r['fit']['net_reduction']:.1f}% of the expert FLOPs on the "
                f"fitting part, this one {100 * best['fit']['net_reduction']:.1f}%"]
    return best


def calibrate_budget(model, base_dir, feeds, max_ppl_increase, policy="top-p", min_experts=1, max_experts=None,
                     holdout=0.25, batch=16, se=0.5, renormalize=None, check="heldout", stand_in=None):
    """Per-layer routing within the perplexity budget (see the module docstring and BudgetSearch;
    `renormalize`: one value, fixed; else the values searched per layer, None: RENORMALIZE;
    `stand_in`: the rank of the dropped experts' stand-ins, None: none)."""
    if not 0 < max_ppl_increase < 1:
        raise MoeExportError(f"--max-ppl-increase {max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
    ranks = [stand_in, None] if stand_in is not None else [None]  # (a graph refusing the stand-in fails first)
    return best_of([BudgetSearch(model, base_dir, feeds, policy, min_experts, max_experts, holdout, batch,
                                 renormalize, rank).run(max_ppl_increase, se, check) for rank in ranks])


def budget_policy(report, min_experts=1, max_experts=None) -> Policy:
    """The Policy that converts a model to the routing the report chose."""
    return Policy("static", 0.0, min_experts, max_experts, per_layer=dict(report["routing"]),
                  probes=report.get("probes") or None, stand_ins=report.get("stand_ins", {}))

