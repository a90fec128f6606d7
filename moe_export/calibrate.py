"""Per-layer thresholds from router statistics on calibration data, to hit a compute budget."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import MoeExportError, UsageError, genai
from .files import Output, Progress, model_files
from .graph import load_model
from .rewrite import Policy, convert_model, repolicy, rewrite_model, routers_metadata, set_policy
from .schema import ATTRIBUTES
from .spec import RouterAttrs, SpecError, policy_counts, policy_view
from .runtime import load_inputs, run_exposed


def router_logits(model_path, feeds, batch=16):
    """Runs the model with each router's logits (and bias) exposed, routing statically, and
    returns per router: (name, its attributes as read off the graph, [tokens, E] logits, bias).
    An original model is run as its static conversion, made in memory: it reproduces the
    original's logits, and its regrouped experts take memory in proportion to the tokens, where
    a batched export gathers a weight matrix per (token, slot) (24 GB for 32 x 128 tokens of a
    1 GB model). A converted model is run with its routers set to static."""
    model = load_model(model_path)
    meta = routers_metadata(model)
    if meta is None:
        rewrite_model(model, Policy("static"))
    elif meta["portable"]:
        raise MoeExportError("a --portable conversion cannot be retuned; calibrate the original model")
    else:
        set_policy(model, Policy("static"))
    routers = [(r["layer"], r["attrs"], r["logits"], r.get("bias")) for r in routers_metadata(model)["routers"]]
    tensors = [t for r in routers for t in r[2:] if t is not None]
    with Progress("running the model on the calibration data", 1) as bar:
        got = dict(zip(tensors, run_exposed(model, Path(model_path).parent, tensors, feeds, batch,
                                            progress=bar)))
    out = []
    for name, attrs, logits, bias in routers:
        E = attrs["num_experts"]
        lg = np.concatenate([c.reshape(-1, E) for c in got[logits]]).astype(np.float32)
        b = got[bias][0].reshape(E).astype(np.float32) if bias else None
        out.append((name, attrs, lg, b))
    return out


def _solve(mean_count, target, increasing, lo=0.0, hi=1.0, iters=40):
    """Threshold whose mean expert count is closest to `target` (counts move monotonically)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        c = mean_count(mid)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (mid, c)
        if (c < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


_ROUTING = tuple(a.name for a in ATTRIBUTES if a.routing)


def calibrate(model_path, feeds, target, policy="top-p", mode="per-layer", min_experts=1, max_experts=None):
    """Thresholds (per layer, or one global) that give `target` experts per token on the data."""
    if policy == "static":
        raise MoeExportError("calibration needs a dynamic policy (top-p, ratio or entropy)")
    if mode not in ("per-layer", "global"):
        raise MoeExportError(f"unknown mode {mode!r} (per-layer or global)")
    routers = router_logits(model_path, feeds)
    views, attrs = [], []
    for name, base, logits, bias in routers:
        gate = {k: v for k, v in base.items() if k not in _ROUTING}
        try:
            a = RouterAttrs(**gate, policy=policy, threshold=0.5, min_experts=min_experts,
                            max_experts=max_experts or base.get("max_experts") or gate["k"]).resolved()
        except SpecError as e:
            raise MoeExportError(f"invalid policy arguments: {e}") from None
        if not (a.min_experts <= target <= a.max_experts):
            raise MoeExportError(f"--target-experts {target} outside [{a.min_experts}, {a.max_experts}] at {name}")
        views.append(policy_view(logits, bias, **asdict(a)))
        attrs.append(a)
    increasing = policy == "top-p"  # more mass wanted -> more experts; ratio/entropy go the other way
    hi = 1.0 if policy != "entropy" else 0.999

    def mean(i, t):
        attrs[i].threshold = float(t)
        return float(policy_counts(attrs[i], views[i])[0].mean())

    if mode == "per-layer":
        chosen = [_solve(lambda t, i=i: mean(i, t), target, increasing, hi=hi) for i in range(len(routers))]
    else:
        t, _ = _solve(lambda t: np.mean([mean(i, t) for i in range(len(routers))]), target, increasing, hi=hi)
        chosen = [(t, mean(i, t)) for i in range(len(routers))]
    return [{"layer": r[0], "threshold": t, "mean_experts": c, "k": r[1]["k"]}
            for r, (t, c) in zip(routers, chosen)]


def unreachable(layers, target, mode, tolerance=0.05):
    """Warnings for layers whose routing on this data cannot come near the target."""
    out = []
    for r in layers:
        if abs(r["mean_experts"] - target) > max(tolerance, tolerance * target):
            why = ("one threshold serves every layer (--mode global)" if mode == "global" else
                   "the router's scores on this data leave no threshold in between")
            out.append(f"{r['layer']}: {r['mean_experts']:.3f} experts/token at best, target {target} ({why})")
    return out


def calibrate_and_convert(model_path, data_path, out, target=None, policy="top-p", mode="per-layer",
                          min_experts=1, max_experts=None, portable=False, max_ppl_increase=None, holdout=0.25,
                          renormalize=None):
    """Calibrates and writes the model: to `target` experts per token, or (max_ppl_increase) to
    the cheapest routing within that perplexity budget (budget.py; `renormalize` None: searched
    per layer, else fixed). Returns (layers, warnings,
    notes about the written files, the budget search's report or None)."""
    from .budget import budget_policy, calibrate_budget

    if (target is None) == (max_ppl_increase is None):
        raise UsageError("give one of --target-experts (a compute budget) or --max-ppl-increase (a quality budget)")
    if policy == "auto" and max_ppl_increase is None:
        raise UsageError("--policy auto picks each layer's policy by perplexity: it needs --max-ppl-increase")
    model_path, out = Path(model_path), Path(out)
    graph = genai.resolve(model_path)
    model = load_model(graph)
    protect = model_files(graph) + [Path(data_path)]
    if genai.is_folder(model_path):  # before the long part
        if out.exists():
            raise MoeExportError(f"{out} exists; remove it or choose another name")
    else:
        Output(protected=protect).check_model_path(out)
    converted = routers_metadata(model) is not None
    if converted and portable:
        raise MoeExportError("--portable applies to converting an original model; this one is converted")
    data_notes = []
    feeds = load_inputs(data_path, model, graph.parent, data_notes)
    report, warnings = None, []
    if max_ppl_increase is not None:
        report = calibrate_budget(model, graph.parent, feeds, max_ppl_increase, policy, min_experts, max_experts,
                                  holdout, renormalize=renormalize)
        layers, pol = report["layers"], budget_policy(report, min_experts, max_experts)
        if not report["routing"]:
            warnings.append(f"no layer's routing could change within +{100 * max_ppl_increase:g}% perplexity on "
                            "this data: the output routes statically")
    else:
        layers = calibrate(graph, feeds, target, policy, mode, min_experts, max_experts)
        pol = Policy(policy, layers[0]["threshold"], min_experts, max_experts,
                     per_layer={r["layer"]: r["threshold"] for r in layers},
                     renormalize=1.0 if renormalize is None else renormalize)
        warnings = unreachable(layers, target, mode)
    if converted:
        _, notes = repolicy(model_path, out, pol, protect=[data_path])
    else:
        _, notes = convert_model(model_path, out, pol, portable=portable, protect=[data_path])
    return layers, warnings, data_notes + notes, report
