"""Calibration to a quality budget: the cheapest per-layer routing whose next-token perplexity on
the calibration tokens stays within `max_ppl_increase` of the static model's.

1. The fitting sequences: with the default check ("crossfit") all of them, split into folds of
   `holdout`'s size (4 at 0.25); with "heldout" or "pooled", all but a held-out part of that size.
   A choice at a layer is a policy, a fraction of k and a renormalize value; its threshold, and
   the probes and stand-ins, are fitted on the fitting sequences for the routing written, and
   where cross-fitting also on each fold's complement, for what that fold measures.
2. Per layer and policy, a curve: each threshold that brings that layer (alone dynamic, every
   other static) to a mean of k x 0.95, 0.9, ... 0.3 experts per token, each with the kept
   experts renormalized fully, half or not at all (`renormalize` 1, 0.5, 0, where the gate
   normalizes its weights: which compensates a dropped expert best differs by layer and by how
   many are dropped), and what it costs in log-perplexity and saves in routed pairs, measured
   per fitting sequence (a fold's curve is the mean over the other folds' sequences). Each curve's
   costs are made monotone in the saving per policy and renormalize (`_monotone`): a larger cut
   measured cheaper than a smaller one is noise of the text.
3. Allocation: pick one point per layer (or static) to save the most pairs for a summed cost
   within a budget, by a Lagrangian sweep over the curves (a multiple-choice knapsack: each layer
   takes the point maximizing saving - lambda x cost).
4. Interaction and the check: layers do not add up exactly, so the whole routing is run jointly,
   and the allocation budget is scaled (bisection) to the largest whose routing passes the check,
   `se` (default 0.5) standard errors above the mean of per-sequence increases:
   - "crossfit": at each scale, each fold is run with the routing allocated on the other folds'
     curves, at thresholds and with probes and stand-ins fitted on the other folds, and every
     sequence's increase so measured counts (and the routing allocated on all the curves, which
     is the one written, must keep the mean of all within the budget). (The other folds' points
     were measured with fits that saw this fold, among the others': a second-order leak into
     which choices its routing makes, none into how they are fitted or what it measures.) Whatever was chosen or
     fitted on some text under-states what other text sees: the allocation (BENCHMARKS.md:
     mixtral8, ratio, +1%: fitting part +0.32%, held-out +0.66%, evaluation +0.78%), and a
     stand-in more (deepseek16, 48 sequences, one uniform cut: +2.2% on the sequences it was
     fitted on, +2.9% on others). Cross-fitting removes both as a held-out part does, with four
     times the sequences to bound the spread ("Cross-fitted check" in BENCHMARKS.md).
   - "heldout": the fitting part's mean and the held-out part's bound.
   - "pooled" (measured, not offered): every sequence's in-sample increase, the bias above.
5. The uniform routings (every layer at one fraction of k, as target calibration gives, at each
   renormalize value) are checked the same way, and the routing that passes with the fewest pairs
   is returned, so the search never returns less than target calibration would at the same
   check, also where the allocations all fail it (the layers' interaction, or a small
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
import onnx

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
from .stats import Thresholds, router_logits, static_copy

DYNAMIC = ("top-p", "ratio", "entropy")
CHECKS = ("crossfit", "heldout", "pooled")  # how the joint routing is checked (module docstring, step 4)
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
        self.runs = 0

    def run(self, routing, rows):
        """(mean NLL per predicted token of each sequence [rows], routed pairs of each sequence per
        layer [rows, layers]) with routing {layer: (policy, threshold, renormalize)} (layers absent:
        static) on the sequences `rows`."""
        for r, node in zip(self.routers, self.exposed_nodes):
            set_attrs(node, r.with_policy(*routing.get(r.layer, ("static", 0.0, 1.0))))
        sess = session_from_proto(self.exposed, self.base_dir)
        self.runs += 1
        nll, pairs = [], []
        for s in range(0, len(rows), self.batch):
            sel = rows[s:s + self.batch]
            outs = run_guarded(sess, self.names, take_rows(self.model, self.feeds, sel))
            logits, x = outs[0].astype(np.float64), self.ids[sel]
            m = logits.max(-1, keepdims=True)
            lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[..., 0]
            tgt = np.take_along_axis(logits[:, :-1], x[:, 1:, None], axis=-1)[..., 0]
            nll.extend((lse[:, :-1] - tgt).mean(axis=1))
            # (the ids come token-major, batch first, whatever their rank)
            pairs.append(np.stack([(np.asarray(idx).reshape(len(sel), -1) < r.num_experts).sum(1)
                                   for r, idx in zip(self.routers, outs[1:])], axis=1))
        return np.array(nll), np.concatenate(pairs) if pairs else np.zeros((0, len(self.routers)))


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
    `model`: an original or converted ModelProto (kept as is). `check`: CHECKS.

    A choice at a layer is (policy, fraction of k, renormalize). What it is in a graph, a threshold
    (and the probes and stand-ins around it), is fitted on some of the sequences: on the fitting
    sequences for the routing written (fit 0), and where cross-fitting on each fold's complement
    for the routing that fold is checked on (fit j + 1, `self.fits`)."""

    def __init__(self, model, base_dir, feeds, policy="top-p", min_experts=1, max_experts=None, holdout=0.25,
                 batch=16, renormalize=None, stand_in=None, check="crossfit"):
        check_causal_lm(model, feeds)
        bad = [r for r in np.ravel(() if renormalize is None else renormalize) if not 0 <= r <= 1]
        if bad:
            raise MoeExportError(f"renormalize {bad[0]:g}: must be in [0, 1]")
        if check not in CHECKS:
            raise MoeExportError(f"check {check!r}: one of {', '.join(CHECKS)}")
        if not 0 < holdout < 1:
            raise MoeExportError(f"--holdout {holdout}: the fraction of the sequences held out, between 0 and 1")
        n = len(feeds["input_ids"])
        if n < 2:
            raise MoeExportError("--max-ppl-increase needs at least 2 sequences in --data (one is held out)")
        order, self.check, self.notes, self.folds = np.random.default_rng(0).permutation(n), check, [], []
        self.joint = {}  # (choices, fit, sequences) -> their run, shared by every budget
        if check == "crossfit":  # every sequence fits, and each fold is checked on a routing fitted without it
            k = min(n, max(2, round(1 / holdout)))
            self.fit, self.hold = np.arange(n), np.arange(0)
            # folds of consecutive sequences: a document cut into sequences stays in one fold, so
            # no fold is checked on text whose neighbours the fits saw (BENCHMARKS.md, "The cross-
            # fitted check")
            self.folds = np.array_split(np.arange(n), k)
            checked = n
        else:
            n_hold = max(1, int(round(n * holdout)))
            if n_hold == n:
                raise MoeExportError(f"--holdout {holdout} holds out all {n} sequences of --data, leaving none to fit "
                                     "on; lower it or give more sequences")
            self.hold, self.fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
            checked = n_hold
        if checked < MIN_HELDOUT:
            self.notes.append(f"the budget is checked on {checked} sequence{'s' * (checked > 1)}" +
                              ("" if check == "crossfit" else f" held out of the {n} in --data") +
                              ", too few to bound the increase on other text; give more sequences")
        m = static_copy(model, max_experts)
        Routing.read(m).check_dynamic()
        self.policy, self.stand_in = policy, stand_in
        policies = DYNAMIC if policy == "auto" else (policy,)
        subsets = [self.fit] + [np.setdiff1d(self.fit, f) for f in self.folds]
        parts = self._fit_parts(m, base_dir, feeds, policy, stand_in, subsets)
        self.probes, self.stand_ins = parts[0]
        if self.probes:
            policies += ("probe",) if policy == "auto" else ()
        self.stand_in_cost = {}  # {layer: a stand-in's multiply-adds per dropped pair / an expert's}
        if self.stand_ins:
            renormalize = 0.0  # (the stand-in takes the dropped weight)
        with Progress("measuring each layer's perplexity cost", 1) as bar:
            # each fit's graph and thresholds: the choices are fit 0's reachable ones (_thresholds)
            self.fits, plan, self.uniform = [], [], {}
            for j, (rows, (probes, stand_ins)) in enumerate(zip(subsets, parts)):
                g = m if j == len(subsets) - 1 else onnx.ModelProto()  # (m itself last: nothing reads it after)
                if g is not m:
                    g.CopyFrom(m)
                if stand_ins:
                    attach_stand_ins(g, stand_ins)
                if probes:
                    attach_probes(g, probes)
                ev = Evaluator(g, base_dir, feeds, batch)
                logits = router_logits(g, base_dir, take_rows(g, feeds, rows))
                if j == 0:
                    self.ev = ev
                    self.stand_in_cost = _stand_in_costs(g) if stand_ins else {}
                    for r, (lg, b, sz) in zip(ev.routers, logits):
                        rns = _renormalizations(r, renormalize)
                        for p in policies:
                            for f, _ in _thresholds(r, p, lg, b, min_experts, max_experts, sz):
                                plan += [(r.layer, (p, f, rn)) for rn in rns]
                                # every layer at the same fraction of k (what target calibration
                                # gives), at each renormalize the gate allows: which one serves a
                                # model best differs (deepseek16: 0; benchmarks/drop_signals.py)
                                for rn in rns:
                                    self.uniform.setdefault((p, f, rn), {})[r.layer] = (p, f, rn)
                thresholds, wanted = {}, {(layer, p, f) for layer, (p, f, _) in plan}
                for r, (lg, b, sz) in zip(ev.routers, logits):
                    for p in policies:
                        fs = [f for f in FRACTIONS if (r.layer, p, f) in wanted]
                        th = Thresholds(r, p, lg, b, min_experts, max_experts, sz) if fs else None
                        thresholds.update({(r.layer, p, f): th.solve(r.k * f)[0] for f in fs})
                self.fits.append((ev, thresholds))
            if self.stand_ins and not all(self.stand_in_cost.values()):
                self.notes.append("the stand-ins' own cost is not counted against what they save: this graph's "
                                  "expert weights do not tell an expert's FLOPs")
            self.base_nll, self.base_pairs = self.ev.run({}, np.arange(n))
            for j, rows in [(0, np.arange(n))] + [(j + 1, rows) for j, rows in enumerate(self.folds)]:
                # (routing statically, no fit changes a thing: a stand-in adds exactly 0)
                self.joint[(), j, rows.tobytes()] = (np.zeros(len(rows)), self.base_pairs[rows])
            bar.total = len(plan)
            # each point's cut in pairs and its cost, per fitting sequence, measured on the graph
            # and thresholds fitted without it where cross-fitting: a fold's curves are the means
            # over the other folds' sequences
            groups = [(j + 1, rows) for j, rows in enumerate(self.folds)] or [(0, self.fit)]
            at = {int(row): i for i, row in enumerate(self.fit)}
            self.points = {r.layer: [] for r in self.ev.routers}
            for i, (layer, choice) in enumerate(plan):
                cut, d = np.zeros(len(self.fit)), np.zeros(len(self.fit))
                for j, rows in groups:
                    d_rows, pairs = self._joint({layer: choice}, j, rows)
                    pos = [at[int(row)] for row in rows]
                    cut[pos], d[pos] = (self.base_pairs[rows] - pairs).sum(1), d_rows
                self.points[layer].append((choice, cut, d))
                bar.update(i + 1)
        self.curves = self._curves(self.fit)

    def _fit_parts(self, m, base_dir, feeds, policy, stand_in, subsets):
        """[(probes or None, stand-ins or None)] fitted on each of `subsets`, from one read-out."""
        want_probe = policy in ("probe", "auto")
        if not (want_probe or stand_in is not None):
            return [(None, None)] * len(subsets)
        if len(subsets) == 1:  # (the fitting part alone: read out only it)
            fit_on = lambda probe: [fit_probes(m, base_dir, take_rows(m, feeds, subsets[0]), probe, stand_in)]
        else:
            fit_on = lambda probe: fit_probes(m, base_dir, feeds, probe, stand_in, subsets)
        try:  # (one read-out: a probe learns what the stand-in misses)
            return fit_on(want_probe)
        except MoeExportError as e:
            if policy != "auto":
                raise
            self.notes.append(f"policy probe left out: {e}")
            return fit_on(False) if stand_in is not None else [(None, None)] * len(subsets)

    def _curves(self, rows):
        """{layer: monotone curve} from the points measured on the fitting sequences `rows`."""
        at = np.searchsorted(self.fit, rows)
        total = self.base_pairs[rows].sum()
        return {layer: _monotone([(float(cut[at].sum() / total), float(d[at].mean()), ch) for ch, cut, d in pts])
                for layer, pts in self.points.items()}

    def concrete(self, routing, j=0):
        """{layer: (policy, threshold, renormalize)} of choices {layer: (policy, fraction, renormalize)}
        in fit j."""
        thresholds = self.fits[j][1]
        return {layer: (p, thresholds[layer, p, f], rn) for layer, (p, f, rn) in routing.items()}

    def _net(self, pairs, static):
        """The cut in expert FLOPs: routed pairs cut, less each dropped pair's stand-in in pairs' worth
        (`pairs`, `static`: per layer)."""
        spent = pairs.sum() + sum((static[i] - pairs[i]) * self.stand_in_cost.get(r.layer, 0.0)
                                  for i, r in enumerate(self.ev.routers))  # (a static layer drops none)
        return float(1 - spent / static.sum())

    def _joint(self, routing, j, rows):
        """(each sequence's increase, its routed pairs per layer) of the choices `routing` in fit j
        on the sequences `rows`."""
        key = (tuple(sorted(routing.items())), j, rows.tobytes())
        if key not in self.joint:
            nll, pairs = self.fits[j][0].run(self.concrete(routing, j), rows)
            self.joint[key] = (nll - self.base_nll[rows], pairs)
        return self.joint[key]

    def _judge(self, routing, budget, se, per_fold=None):
        """(passes, every sequence's increase, routed pairs [sequences, layers], the increase and the
        pairs the check saw) of the choices `routing`; `per_fold`: the choices each fold's check
        runs (crossfit: the allocation on the other folds' curves; None: `routing` itself, as for
        a uniform routing), each in its fold's own fit."""
        every = np.arange(len(self.base_nll))
        d, pairs = self._joint(routing, 0, every)
        if self.check == "crossfit":
            seen, seen_pairs = np.empty_like(d), np.empty_like(pairs)
            for j, (rows, r) in enumerate(zip(self.folds, per_fold or [routing] * len(self.folds))):
                seen[rows], seen_pairs[rows] = self._joint(r, j + 1, rows)
            ok = d.mean() <= budget and _upper(seen, se) <= budget
        else:
            seen, seen_pairs = d[self.hold], pairs[self.hold]
            ok = (_upper(d, se) <= budget if self.check == "pooled"
                  else d[self.fit].mean() <= budget and _upper(seen, se) <= budget)
        return ok, d, pairs, seen, seen_pairs

    def run(self, max_ppl_increase, se=0.5):
        """The report at this budget (its "routing": {layer: (policy, threshold, renormalize)},
        layers absent staying static). `se`: standard errors above its mean the increase must
        stay within the budget (0: the mean alone)."""
        if not 0 < max_ppl_increase < 1:
            raise MoeExportError(f"--max-ppl-increase {max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
        budget, ev, curves, fit = math.log1p(max_ppl_increase), self.ev, self.curves, self.fit
        fold_curves = [self._curves(np.setdiff1d(fit, rows)) for rows in self.folds]
        alloc = lambda c, scale: {layer: ch for layer, ch in allocate(c, budget * scale)[0].items() if ch is not None}
        # The joint run: the largest allocation budget (a bisection on its scale) whose routing
        # passes the check.
        chosen, lo, hi = None, 0.0, 2.0
        fewer = lambda got: chosen is None or got[2][fit].sum() < chosen[1][2][fit].sum()
        for _ in range(8):
            scale = (lo + hi) / 2
            routing = alloc(curves, scale)
            got = self._judge(routing, budget, se, [alloc(c, scale) for c in fold_curves])
            if got[0]:
                chosen = (routing, got) if fewer(got) else chosen
                lo = scale
            else:
                hi = scale
        # Every uniform routing too (passing is not monotone in the fraction on a small set): the
        # search then never returns less than target calibration would at this check, also where
        # the layers' interaction or the text's noise defeats every allocation.
        for routing in self.uniform.values():
            got = self._judge(routing, budget, se)
            if got[0] and fewer(got):
                chosen = (routing, got)
        choices, (_, d, pairs, seen, seen_pairs) = chosen or ({}, self._judge({}, budget, se))
        routing = self.concrete(choices)
        seen_rows = np.arange(len(d)) if self.folds else self.hold
        layers = []
        for i, r in enumerate(ev.routers):
            ch = routing.get(r.layer)
            est = next((c for s, c, x in curves[r.layer] if x == choices.get(r.layer)), 0.0)
            layers.append({"layer": r.layer, "policy": ch[0] if ch else "static", "threshold": ch[1] if ch else 0.0,
                           "renormalize": ch[2] if ch else 1.0, "stand_in": bool(ch and self.stand_ins), "k": r.k,
                           "mean_experts": float(pairs[fit, i].sum() / ev.ids[fit].size),
                           "est_ppl_cost": math.expm1(est)})
        part = lambda rows_d, p, static, base: {
            "sequences": int(len(rows_d)), "ppl_increase": math.expm1(float(rows_d.mean())),
            "pair_reduction": float(1 - p.sum() / static.sum()), "net_reduction": self._net(p.sum(0), static.sum(0)),
            "static_ppl": math.exp(float(base.mean()))}
        return {"max_ppl_increase": max_ppl_increase, "policy": self.policy, "routing": routing, "layers": layers,
                "fit": part(d[fit], pairs[fit], self.base_pairs[fit], self.base_nll[fit]),
                "heldout": part(seen, seen_pairs, self.base_pairs[seen_rows], self.base_nll[seen_rows])
                | {"ppl_increase_upper": math.expm1(_upper(seen, se))},
                "all": {"sequences": len(d), "ppl_increase": math.expm1(float(d.mean())),
                        "ppl_increase_upper": math.expm1(_upper(d, se))},
                "check": self.check, "folds": len(self.folds), "se": se, "notes": self.notes,
                "stand_in": self.stand_in, "evaluations": sum(e.runs for e, _ in self.fits),
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
                     holdout=0.25, batch=16, se=0.5, renormalize=None, check="crossfit", stand_in=None):
    """Per-layer routing within the perplexity budget (see the module docstring and BudgetSearch;
    `renormalize`: one value, fixed; else the values searched per layer, None: RENORMALIZE;
    `stand_in`: the rank of the dropped experts' stand-ins, None: none)."""
    if not 0 < max_ppl_increase < 1:
        raise MoeExportError(f"--max-ppl-increase {max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
    ranks = [stand_in, None] if stand_in is not None else [None]  # (a graph refusing the stand-in fails first)
    return best_of([BudgetSearch(model, base_dir, feeds, policy, min_experts, max_experts, holdout, batch,
                                 renormalize, rank, check).run(max_ppl_increase, se) for rank in ranks])


def budget_policy(report, min_experts=1, max_experts=None) -> Policy:
    """The Policy that converts a model to the routing the report chose."""
    return Policy("static", 0.0, min_experts, max_experts, per_layer=dict(report["routing"]),
                  probes=report.get("probes") or None, stand_ins=report.get("stand_ins", {}))

