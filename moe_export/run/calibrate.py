"""Per-layer thresholds from router statistics on calibration data, to hit a compute budget
(--target-experts), or the cheapest routing within a quality budget (--max-ppl-increase, budget.py)."""
from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path

import numpy as np
import onnx

from ..errors import MoeExportError, UsageError
from ..conversion.write import convert_model, repolicy
from ..conversion.policy import Policy
from ..conversion.probe import attach_probes
from ..conversion.record import Routing
from ..model.files import Output, Progress
from ..model.genai import check_folder_output, own_library
from ..model.source import Source
from .budget import budget_policy, calibrate_budget
from .probe import fit_probes
from .runtime import load_inputs
from .stats import Thresholds, router_logits, solve, static_copy


def calibrate(model, feeds, target, policy="top-p", mode="per-layer", min_experts=1, max_experts=None, base_dir=None,
              stand_in=None):
    """Thresholds (per layer, or one global) that give `target` experts per token on the data.
    `model`: a path, a Source or a ModelProto (then `base_dir` is where its data lives);
    `stand_in`: the rank of a stand-in fitted for each layer's dropped experts (None: none)."""
    if policy == "static":
        raise MoeExportError("calibration needs a dynamic policy (top-p, ratio, entropy or probe)")
    if mode not in ("per-layer", "global"):
        raise MoeExportError(f"unknown mode {mode!r} (per-layer or global)")
    if not isinstance(model, onnx.ModelProto):
        src = Source.of(model)
        model, base_dir = src.model, src.base_dir
    static = static_copy(model)
    Routing.read(static).check_dynamic()
    probes = stand_ins = None
    if policy == "probe" or stand_in is not None:
        probes, stand_ins = fit_probes(static, base_dir, feeds, probe=policy == "probe", stand_in=stand_in)
    if probes:
        attach_probes(static, probes)
    routers = Routing.read(static).routers
    with Progress("running the model on the calibration data", 1) as bar:
        logits = router_logits(static, base_dir, feeds, progress=bar)
    layers = []
    for r, (lg, b, sz) in zip(routers, logits):
        th = Thresholds(r, policy, lg, b, min_experts, max_experts, sz)
        if not (th.attrs.min_experts <= target <= th.attrs.max_experts):
            raise MoeExportError(f"--target-experts {target} outside [{th.attrs.min_experts}, {th.attrs.max_experts}] "
                                 f"at {r.layer}")
        layers.append(th)
    if mode == "per-layer":
        chosen = [th.solve(target) for th in layers]
    else:
        th0 = layers[0]
        t, _ = solve(lambda t: np.mean([th.mean(t) for th in layers]), target, th0.increasing,
                     hi=max(th.hi for th in layers))
        chosen = [(t, th.mean(t)) for th in layers]
    return [{"layer": r.layer, "threshold": t, "mean_experts": c, "k": r.k}
            | ({"probe": probes[r.layer]} if probes else {}) | ({"stand_in": stand_ins[r.layer]} if stand_ins else {})
            for r, (t, c) in zip(routers, chosen)]


def unreachable(layers, target, mode, tolerance=0.05):
    """Warnings for layers whose routing on this data cannot come near the target; with one
    threshold for all (global) only the layers' mean aims at it, so only the mean is judged."""
    near = lambda got: abs(got - target) <= max(tolerance, tolerance * target)
    if mode == "global":
        mean = float(np.mean([r["mean_experts"] for r in layers]))
        return [] if near(mean) else [f"the layers' mean: {mean:.3f} experts/token at best, target {target} "
                                      "(one threshold serves every layer, --mode global)"]
    out = []
    for r in layers:
        if not near(r["mean_experts"]):
            out.append(f"{r['layer']}: {r['mean_experts']:.3f} experts/token at best, target {target} (the router's "
                       "scores on this data leave no threshold in between)")
    return out


def calibrate_and_convert(model_path, data_path, out, target=None, policy="top-p", mode="per-layer",
                          min_experts=1, max_experts=None, portable=False, max_ppl_increase=None, holdout=None,
                          renormalize=None, stand_in=None, check=None):
    """Calibrates and writes the model: to `target` experts per token, or (max_ppl_increase) to
    the cheapest routing within that perplexity budget (budget.py; `renormalize` None: searched
    per layer, else fixed; `holdout`: the part of the data checking it, default 0.25; `check`:
    "crossfit" (default) or "heldout", how the budget is checked). `stand_in`:
    the rank of a linear stand-in fitted for each dropped expert (conversion/stand_in.py; None:
    none), which takes the dropped weight (renormalize 0). Returns (layers, warnings, notes
    about the written files, the budget search's report or None)."""
    if (target is None) == (max_ppl_increase is None):
        raise UsageError("give one of --target-experts (a compute budget) or --max-ppl-increase (a quality budget)")
    for name, v in (("target", target), ("max_ppl_increase", max_ppl_increase)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, Real)):
            raise UsageError(f"{name} must be a number, got {v!r}")
    if target is not None and holdout is not None:
        raise UsageError("holdout applies to a quality budget (max_ppl_increase); a target uses all the data")
    if target is not None and check is not None:
        raise UsageError("check applies to a quality budget (max_ppl_increase)")
    if max_ppl_increase is not None and mode != "per-layer":
        raise UsageError("mode applies to a target (experts per token); a quality budget chooses each layer's routing")
    if policy == "auto" and max_ppl_increase is None:
        raise UsageError("--policy auto picks each layer's policy by perplexity: it needs --max-ppl-increase")
    if stand_in is not None:
        if isinstance(stand_in, bool) or not isinstance(stand_in, Integral) or stand_in < 0:
            raise UsageError(f"stand_in must be a rank, a whole number >= 0 (0: the mean output), got {stand_in!r}")
        if renormalize is not None and np.any(np.asarray(renormalize) != 0):
            raise UsageError("a stand-in takes the dropped experts' weight: renormalize must be 0 (or left out) with it")
        if portable:
            raise UsageError("a stand-in needs the DynamicRouter nodes: it cannot be written --portable")
    src, out = Source.of(model_path), Path(out)
    protect = src.files() + [Path(data_path)]
    if src.is_folder:  # before the long part
        check_folder_output(src.path, out)
        own_library(src.path, src.model, needs_library=not portable)
    else:
        Output(protected=protect).check_model_path(out)
    converted = Routing.read(src.model) is not None
    if converted and portable:
        raise MoeExportError("--portable applies to converting an original model; this one is converted")
    data_notes = []
    feeds = load_inputs(data_path, src.model, src.base_dir, data_notes)
    report, warnings = None, []
    if max_ppl_increase is not None:
        report = calibrate_budget(src.model, src.base_dir, feeds, max_ppl_increase, policy, min_experts, max_experts,
                                  0.25 if holdout is None else holdout, renormalize=renormalize, stand_in=stand_in,
                                  check=check or "crossfit")
        layers, pol = report["layers"], budget_policy(report, min_experts, max_experts)
        warnings += report["notes"]
        if not report["routing"]:
            warnings.append(f"no layer's routing could change within +{100 * max_ppl_increase:g}% perplexity on "
                            "this data: the output routes statically")
    else:
        layers = calibrate(src, feeds, target, policy, mode, min_experts, max_experts, stand_in=stand_in)
        pol = Policy(policy, layers[0]["threshold"], min_experts, max_experts,
                     per_layer={r["layer"]: r["threshold"] for r in layers},
                     renormalize=0.0 if stand_in is not None else 1.0 if renormalize is None else renormalize,
                     probes={r["layer"]: r.pop("probe") for r in layers if "probe" in r} or None,
                     stand_ins={r["layer"]: r.pop("stand_in") for r in layers if "stand_in" in r})
        warnings = unreachable(layers, target, mode)
    if converted:
        _, notes = repolicy(src, out, pol, protect=[data_path])
    else:
        _, notes = convert_model(src, out, pol, portable=portable, protect=[data_path])
    return layers, warnings, data_notes + notes, report
