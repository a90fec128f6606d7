"""Expert FLOPs, experts per token and per-expert load of a converted model, static vs dynamic
(the dynamic model's expert FLOPs count its stand-ins' for the dropped experts, where it has them)."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..errors import MoeExportError
from ..conversion.record import Routing
from ..conversion.stand_in import PREFIX as STAND_IN_PREFIX
from ..model.source import Source
from ..op.spec import dynamic_router
from .runtime import load_inputs, run_exposed
from .stats import fewer, logits_in, routed_pairs, router_inputs, router_tensors


def flops_per_pair(model, E, n_layers):
    """2 x the parameters of one expert, read off the per-expert weight tensors ([E, ...], rank 3,
    as exported with batched experts; not the stand-ins' factors); None where the experts are not
    stored that way."""
    per_expert = sum(int(np.prod(t.dims[1:])) for t in model.graph.initializer
                     if len(t.dims) == 3 and t.dims[0] == E and not t.name.startswith(STAND_IN_PREFIX))
    return 2.0 * per_expert / n_layers if per_expert else None


def router_flops_per_pair(model, routing, override=None) -> list:
    """FLOPs of one (token, expert) pair at each router (None where not known): `override`, else
    what conversion measured of a fused op, else read off the expert weights."""
    by_e = {}
    for r in routing.routers:
        by_e[r.num_experts] = by_e.get(r.num_experts, 0) + 1
    return [override or r.flops_per_pair or flops_per_pair(model, r.num_experts, by_e[r.num_experts])
            for r in routing.routers]


def profile(model_path, data_path, flops_per_pair_override=None, batch=16):
    src = Source.of(model_path)
    model = src.model
    routing = Routing.read(model)
    if routing is None:
        raise MoeExportError(f"{src.graph}: not written by moe-export convert; profile a converted model")
    notes = []
    feeds = load_inputs(data_path, model, src.base_dir, notes)
    tensors = routing.tensors("indices") + router_tensors(model, routing)
    got = dict(zip(tensors, run_exposed(model, src.base_dir, tensors, feeds, batch, custom_ops=not routing.portable)))
    layers = []
    fpps = router_flops_per_pair(model, routing, flops_per_pair_override)
    for r, lg, fpp in zip(routing.routers, logits_in(model, routing), fpps):
        a = r.attrs
        E, k = r.num_experts, r.k
        idx = np.concatenate([x.reshape(-1, x.shape[-1]) for x in got[r.indices]])
        logits, bias, _ = router_inputs(got, r, lg)
        _, sidx = dynamic_router(logits, bias, **asdict(r.with_policy("static", 0.0, max_experts=k, min_experts=1)))
        load = np.bincount(idx[idx < E], minlength=E)
        sload = np.bincount(sidx[sidx < E], minlength=E)
        pairs, spairs = routed_pairs(idx, E), routed_pairs(sidx, E)
        tokens = idx.shape[0]
        # a stand-in computes (2 r + 1) H multiply-adds for each static pair the router dropped
        dropped = int((~(sidx[:, :, None] == idx[:, None, :]).any(axis=2)).sum()) if r.stand_in else 0
        stand_in_flops = 2 * (2 * r.stand_in["rank"] + 1) * r.stand_in["hidden"] * dropped if r.stand_in else 0
        layers.append({
            "layer": r.layer, "tokens": tokens, "num_experts": E, "k": k, "policy": a.policy,
            "threshold": a.threshold, "pairs_static": spairs, "pairs": pairs,
            "mean_experts_static": spairs / max(tokens, 1), "mean_experts": pairs / max(tokens, 1),
            "experts_per_token_hist": np.bincount((idx < E).sum(axis=1), minlength=idx.shape[1] + 1).tolist(),
            "expert_gflops_static": None if fpp is None else spairs * fpp / 1e9,
            "expert_gflops": None if fpp is None else (pairs * fpp + stand_in_flops) / 1e9,
            "stand_in_gflops": stand_in_flops / 1e9,
            "load_static": sload.tolist(), "load": load.tolist(),
            "load_cv_static": float(sload.std() / max(sload.mean(), 1e-9)),
            "load_cv": float(load.std() / max(load.mean(), 1e-9)),
            "load_max_over_mean": float(load.max() / max(load.mean(), 1e-9)),
        })
    tp, tsp = sum(x["pairs"] for x in layers), sum(x["pairs_static"] for x in layers)
    total = {"pairs_static": tsp, "pairs": tp, "pair_reduction": 1 - tp / tsp if tsp else 0.0}
    if all(x["expert_gflops"] is not None for x in layers):
        total["expert_gflops_static"] = sum(x["expert_gflops_static"] for x in layers)
        total["expert_gflops"] = sum(x["expert_gflops"] for x in layers)
        total["flops_reduction"] = 1 - total["expert_gflops"] / total["expert_gflops_static"]
    return {"model": str(src.graph), "layers": layers, "total": total, "notes": notes,
            "flops_source": "--flops-per-pair" if flops_per_pair_override else "expert weights"}


def print_profile(rep) -> str:
    lines = [f"{'layer':40s} {'experts/token':>16s} {'expert GFLOPs':>20s} {'load CV':>14s}",
             f"{'':40s} {'static -> dyn':>16s} {'static -> dyn':>20s} {'static -> dyn':>14s}"]
    for x in rep["layers"]:
        fl = "n/a" if x["expert_gflops"] is None else f"{x['expert_gflops_static']:.4g} -> {x['expert_gflops']:.4g}"
        lines.append(f"{x['layer'][:40]:40s} {x['mean_experts_static']:6.2f} -> {x['mean_experts']:5.2f} "
                     f"{fl:>20s} {x['load_cv_static']:5.2f} -> {x['load_cv']:4.2f}")
        top = max(x["load"]) or 1
        lines.append("  load " + "".join(" .:-=+*#%@"[min(9, int(9 * v / top))] for v in x["load"]))
    t = rep["total"]
    stand_ins = sum(x.get("stand_in_gflops", 0.0) for x in rep["layers"])
    lines.append(f"routed pairs {t['pairs_static']} -> {t['pairs']} ({fewer(t['pair_reduction'])})"
                 + (f"; expert FLOPs {fewer(t['flops_reduction'])}" if "flops_reduction" in t else "")
                 + (f" (the stand-ins' {stand_ins:.4g} GFLOPs counted)" if stand_ins and "flops_reduction" in t else ""))
    return "\n".join(lines + [f"note: {n}" for n in rep.get("notes", [])])
