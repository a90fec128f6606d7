"""The `moe-export` command line. Every failure is one line on stderr and a non-zero exit;
--debug shows the traceback.

Exit codes: 0 done (a check passed); 1 the model, the data or a check (validate) failed; 2 the
command line itself is wrong (an unknown flag, a value out of its range, flags that exclude each
other), found before any file is read; 130/143 interrupted (nothing written)."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import MoeExportError, UsageError
from .model.source import Source
from .op.spec import POLICIES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, instead of usage + message
        sys.stderr.write(f"moe-export: error: {message}\n")
        sys.exit(2)


def _threshold(v):
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be finite, got {v}")
    return x


# Argument groups the commands share: each declares its flags once, with one help text.
def _model_arg(c, help):
    c.add_argument("model", type=Path, help=help)


def _output_arg(c, help):
    c.add_argument("-o", "--output", type=Path, required=True, help=help)


def _data_arg(c, required=True, help=".npy token ids [batch, seq] (or .npz of inputs)"):
    c.add_argument("--data", type=Path, required=required, help=help)


def _json_arg(c):
    c.add_argument("--json", action="store_true", help="print a JSON report instead of text")


def _add_policy_args(p):
    p.add_argument("--policy", choices=POLICIES, default="static",
                   help="routing policy: static (the graph's own top-k), top-p, ratio or entropy (default: static); "
                        "probe needs a probe fitted on data (calibrate --policy probe)")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="top-p: cumulative mass to reach; ratio: fraction of the top score; entropy: "
                        "normalized entropy below which tokens get min experts; probe: the least weight x "
                        "predicted output size a kept expert has (>= 0)")
    p.add_argument("--min-experts", type=int, default=None, help="fewest experts per token (default 1)")
    p.add_argument("--max-experts", type=int, default=None, help="most experts per token (default: the graph's k)")
    _renormalize_arg(p, "1: over the kept, the model run with fewer experts")


def _renormalize_arg(p, default):
    p.add_argument("--renormalize", type=_fraction, default=None, metavar="R",
                   help="for gates whose weights sum to 1: how much of the dropped experts' weight the kept ones "
                        f"take, 0 (none: their static weights) to 1 (all) (default {default})")


def _tolerance(v):
    x = _threshold(v)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _positive(v):
    x = _threshold(v)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return x


def _count(v):
    try:
        x = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _fraction(v):
    x = _threshold(v)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return x


COMMANDS = []  # (name, help, declare its arguments, run it), in the order `moe-export --help` lists them


def command(name, help, arguments):
    """Registers `moe-export NAME`: `arguments(parser)` declares its flags, the function runs it."""
    def register(run):
        COMMANDS.append((name, help, arguments, run))
        return run
    return register


def _policy(args):
    from .conversion.policy import Policy
    from .op.schema import SpecError
    from .op.spec import check_threshold

    if args.policy != "static" and args.threshold is None:
        raise UsageError(f"--policy {args.policy} needs --threshold")
    if args.policy == "static":
        given = [f for f, v in (("--threshold", args.threshold), ("--min-experts", args.min_experts),
                                ("--max-experts", args.max_experts), ("--renormalize", args.renormalize))
                 if v is not None]
        if given:
            _warn(f"--policy static routes every token to the graph's k experts; {', '.join(given)} ignored")
        return Policy("static")
    try:
        check_threshold(args.policy, args.threshold)
    except SpecError as e:
        raise UsageError(f"--threshold {args.threshold}: {e}") from None
    args.min_experts = 1 if args.min_experts is None else args.min_experts
    if args.max_experts is not None and args.max_experts < 1:
        raise UsageError(f"--max-experts must be >= 1, got {args.max_experts}")
    if args.min_experts < 1:
        raise UsageError(f"--min-experts must be >= 1, got {args.min_experts}")
    if args.max_experts is not None and args.min_experts > args.max_experts:
        raise UsageError(f"--min-experts ({args.min_experts}) exceeds --max-experts ({args.max_experts})")
    return Policy(args.policy, args.threshold or 0.0, args.min_experts, args.max_experts,
                  renormalize=1.0 if args.renormalize is None else args.renormalize)


def _warn(msg):
    sys.stderr.write(f"moe-export: warning: {msg}\n")


def _dims(items):
    out = {}
    for it in items or []:
        name, eq, val = it.partition("=")
        if not name.strip() or not eq or not val.strip().isdigit():
            raise UsageError(f"--dim wants NAME=SIZE with a whole number, got {it!r}")
        if int(val) == 0 and not any(w in name.lower() for w in ("past", "cache")):
            raise UsageError(f"--dim {it}: only a cache length may be 0 (an empty cache); sizes are >= 1")
        if name.strip() in out:
            raise UsageError(f"--dim {name.strip()} given twice")
        out[name.strip()] = int(val)
    return out


def _data_line(notes):
    return f"; {'; '.join(notes)}" if notes else ""


def _convert_args(c):
    _model_arg(c, "the ONNX model to convert (never modified), or an ONNX Runtime GenAI "
               "model folder (with genai_config.json): then OUTPUT is a new folder og.Model() loads")
    _output_arg(c, "the converted model; external data is shared with the input in its directory, copied elsewhere")
    _add_policy_args(c)
    c.add_argument("--portable", action="store_true",
                   help="express the router in standard ONNX ops (runs without the moe-export library)")
    c.add_argument("--no-group-experts", action="store_true",
                   help="keep batched expert sections as exported (by default they are regrouped by "
                        "expert so that dropped slots cost nothing)")
    c.add_argument("--per-expert-weights", action="store_true",
                   help="give each regrouped expert's MatMuls their own weight initializers (written to "
                        "OUTPUT.experts.data), so weight-only quantizers such as ONNX Runtime's "
                        "MatMulNBitsQuantizer can quantize the experts")
    c.add_argument("--repolicy", action="store_true",
                   help="MODEL is already converted: re-set the policy of its DynamicRouter nodes")
    _json_arg(c)


@command("convert", "replace static top-k gating with DynamicRouter", _convert_args)
def cmd_convert(args):
    from .conversion.write import convert_model, repolicy

    pol = _policy(args)
    if args.repolicy:
        if args.portable or args.no_group_experts:
            raise UsageError("--repolicy re-sets the routers of a converted model; --portable and "
                                 "--no-group-experts apply to converting an original")
        n, notes = repolicy(args.model, args.output, pol)
        families = []
    else:
        if args.per_expert_weights and args.no_group_experts:
            raise UsageError("--per-expert-weights applies to regrouped expert sections; drop --no-group-experts")
        gates, notes = convert_model(args.model, args.output, pol, portable=args.portable,
                                     group_experts=not args.no_group_experts,
                                     per_expert_weights=args.per_expert_weights)
        n, families = len(gates), sorted({g.family for g in gates})
        if args.per_expert_weights and all(g.expert_form == "fused" for g in gates):
            _warn("--per-expert-weights ignored: the fused MoE ops of this graph keep their own weights")
    settings = _settings(args, pol)
    summary = {"output": str(args.output), "layers": n, "policy": args.policy,
               "threshold": pol.threshold if args.policy != "static" else None, "portable": args.portable,
               "families": families, "repolicy": args.repolicy, "settings": settings, "notes": notes}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        what = "re-set" if args.repolicy else "converted"
        fam = f" ({', '.join(families)})" if families else ""
        shown = ", ".join(f"{k} {v}" if v is not True else k for k, v in settings.items())
        print(f"{what} {n} MoE layer(s){fam} -> {args.output} [{shown}]{_data_line(notes)}")


def _settings(args, pol):
    """The policy, and every other setting of the conversion that differs from its default."""
    out = {"policy": args.policy}
    if args.policy != "static":
        out["threshold"] = pol.threshold
        if pol.min_experts != 1:
            out["min-experts"] = pol.min_experts
        if pol.max_experts is not None:
            out["max-experts"] = pol.max_experts
        if pol.renormalize != 1.0:
            out["renormalize"] = pol.renormalize
    for flag in ("portable", "no_group_experts", "per_expert_weights"):
        if getattr(args, flag, False):
            out[flag.replace("_", "-")] = True
    return out


def _inspect_args(c):
    _model_arg(c, "an ONNX model (or GenAI model folder), original or converted")
    _json_arg(c)


@command("inspect", "list the MoE layers found", _inspect_args)
def cmd_inspect(args):
    from .conversion import Policy, Routing, rewrite_model, routers_metadata
    from .rules.base import explain, no_gates_message

    src = Source(args.model)
    model = src.model
    routing = Routing.read(model)
    if routing is not None:
        if args.json:
            print(json.dumps({"model": str(args.model), "converted": routers_metadata(model)}, indent=2))
            return
        for r in routing.routers:
            a = r.attrs
            rn = f" renormalize={a.renormalize:g}" if a.renormalize != 1.0 else ""
            print(f"{r.layer}: DynamicRouter E={a.num_experts} k={a.k} policy={a.policy} "
                  f"threshold={a.threshold}{rn} experts={a.min_experts}..{a.max_experts}")
        return
    topks = explain(model)
    gates = [t["gate"] for t in topks if t["gate"] is not None]
    misses = [t["near_miss"] for t in topks if t["near_miss"]]
    rows = [g.describe() for g in gates]
    if rows:  # what a conversion would do with each expert section (a dry run, in memory)
        try:
            dry, _ = rewrite_model(src.copy(), Policy("static"))
            sections = [r.expert_section for r in Routing.read(dry).routers]
        except MoeExportError as e:
            sections = [f"not convertible: {e}"] * len(rows)
        for r, sec in zip(rows, sections):
            r["expert_section"] = sec
    if args.json:
        print(json.dumps({"model": str(args.model), "layers": rows, "near_misses": misses, "converted": None,
                          "topk": [{"node": t["topk"], "taken_as": t["gate"] and t["gate"].family,
                                    "near_miss": t["near_miss"], "why_not": t["why_not"]} for t in topks]},
                         indent=2))
        return
    if not rows:
        raise MoeExportError(no_gates_message(model, misses))
    for r in rows:
        extra = f" groups={r['topk_group']}/{r['n_group']}" if r["n_group"] > 1 else ""
        print(f"{r['layer']}: {r['form']}; E={r['num_experts']} k={r['k']} scoring={r['scoring']} "
              f"normalize={r['normalize']} scale={r['scale']:g}{extra} experts={r['expert_section']}")
    print(f"{len(rows)} MoE layer(s)")


def _validate_args(c):
    c.description = ("compare a converted graph with its original (polygraphy). Exit 1 when a static-policy "
                     "conversion does not reproduce the original (outputs within the tolerances, the same "
                     "experts); a dynamic policy is expected to differ, and its differences are reported "
                     "with exit 0 unless --strict is given")
    c.add_argument("original", type=Path, help="the model (or GenAI model folder) before conversion")
    c.add_argument("converted", type=Path, help="the model (or folder) moe-export wrote")
    _data_arg(c, required=False, help=".npz of named inputs, or .npy for a single-input graph "
              "(default: random inputs from the input specs)")
    c.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a symbolic input dimension (repeatable)")
    c.add_argument("--atol", type=_tolerance, default=None,
                   help="absolute tolerance on the outputs (default 1e-4; 2e-3 for models computing in float16/bfloat16)")
    c.add_argument("--rtol", type=_tolerance, default=None,
                   help="relative tolerance on the outputs (default 1e-3; 5e-3 for models computing in float16/bfloat16)")
    c.add_argument("--seed", type=_count, default=0, help="seed of the random inputs (default 0)")
    c.add_argument("--trt", action="store_true", help="also run the converted graph in TensorRT")
    c.add_argument("--strict", action="store_true",
                   help="exit 1 when any output differs beyond the tolerances, whatever the policy")
    _json_arg(c)


@command("validate", "compare a converted graph with its original (polygraphy)", _validate_args)
def cmd_validate(args):
    from .run.stats import fewer
    from .run.validate import validate

    rep = validate(args.original, args.converted, feeds=args.data, atol=args.atol, rtol=args.rtol,
                   dims=_dims(args.dim), seed=args.seed, trt=args.trt)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for name, s in rep["outputs"].items():
            print(f"{name}: max_abs={s['max_abs']:.3g} mean_abs={s['mean_abs']:.3g} "
                  f"max_rel={s['max_rel']:.3g} mean_rel={s['mean_rel']:.3g} {'ok' if s['passed'] else 'DIFFERS'}")
        rp = rep["routed_pairs"]
        print(f"routed (token, expert) pairs: original {rp['original']}, converted {rp['converted']} "
              f"({fewer(rp['reduction'])})")
        if rep["static_policy"]:
            print("static policy reproduces the original:", "yes" if rep["static_reproduces"] else "NO")
        for note in rep["notes"]:
            print(f"note: {note}")
    if rep["static_policy"] and not rep["static_reproduces"]:
        sys.exit(1)
    if args.strict and not rep["outputs_match"]:
        sys.stderr.write("moe-export: FAILED: outputs differ beyond the tolerances (--strict)\n")
        sys.exit(1)


def _export_args(c):
    c.add_argument("checkpoint", type=Path, help="a local checkpoint folder (config.json and weights)")
    _output_arg(c, "the .onnx to write (weights beside it, .data)")
    c.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (dynamo: 18, the default, up to what torch's version converter reaches; "
                        "torchscript: 7-17, default 17)")
    c.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; torchscript only works with transformers 4.x)")
    c.add_argument("--embed-weights", action="store_true", help="keep weights inside the .onnx file")
    c.add_argument("--with-past", action="store_true",
                   help="a decoder graph with a KV cache for generation (input_ids, attention_mask, position_ids, "
                        "past_key_values.N.key/value -> logits, present.N.key/value)")


@command("export", "export a local transformers MoE checkpoint to ONNX", _export_args)
def cmd_export(args):
    import onnx

    from .model.export import export_checkpoint

    lo, hi = (18, onnx.defs.onnx_opset_version()) if args.exporter == "dynamo" else (7, 17)
    if args.opset is None:
        args.opset = lo if args.exporter == "dynamo" else hi
    if not lo <= args.opset <= hi:
        raise UsageError(f"--opset {args.opset}: the {args.exporter} exporter writes opsets {lo} to {hi}")
    out = export_checkpoint(args.checkpoint, args.output, opset=args.opset, exporter=args.exporter,
                            external_data=not args.embed_weights, with_past=args.with_past)
    print(f"exported {args.checkpoint} -> {out}")


def _calibrate_args(c):
    _model_arg(c, "the original model, or one already converted (retuned); a GenAI model folder gives a folder")
    _data_arg(c)
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-experts", type=float, help="a compute budget: mean experts per token to aim for")
    budget.add_argument("--max-ppl-increase", type=float, metavar="FRACTION",
                        help="a quality budget: the cheapest routing whose next-token perplexity on the data rises "
                             "at most this much (0.01 = +1%%); a causal LM graph (input_ids -> logits) is needed")
    c.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                     help="with --max-ppl-increase: the size of each fold the budget is checked on, a fraction of "
                          "--data (default 0.25: four folds; with --check heldout, the part held out)")
    c.add_argument("--check", choices=("crossfit", "heldout"), default=None,
                     help="with --max-ppl-increase: how the budget is checked. crossfit (default): on every "
                          "sequence, each fold run with the routing allocated and fitted on the other folds (the "
                          "routing written is fitted on all of --data); heldout: on one held-out part, the routing "
                          "fitted on the rest")
    _output_arg(c, "the calibrated, converted model")
    c.add_argument("--policy", choices=[p for p in POLICIES if p != "static"] + ["auto"], default="top-p",
                     help="dynamic policy whose threshold is calibrated (default top-p); probe fits a linear probe "
                          "of each expert's output size on the data and drops the slots of least weight x size; "
                          "with --max-ppl-increase, auto picks each layer's policy too, probe among them")
    c.add_argument("--mode", choices=("per-layer", "global"), default=None,
                     help="with --target-experts: a threshold per layer hitting the target in each (default), or "
                          "one threshold for all")
    c.add_argument("--min-experts", type=int, default=1, help="fewest experts per token (default 1)")
    c.add_argument("--max-experts", type=int, default=None, help="most experts per token (default: the graph's k)")
    _renormalize_arg(c, "1; with --max-ppl-increase chosen per layer among 1, 0.5 and 0")
    c.add_argument("--stand-in", type=int, default=None, metavar="RANK",
                   help="fit for each expert a linear stand-in of rank RANK (0: its mean output; 4 measured best) that "
                        "replaces it where it is dropped, taking the dropped weight (renormalize 0); it costs (2 x RANK "
                        "+ 1) x hidden multiply-adds per dropped pair. With --target-experts every layer takes it; "
                        "--max-ppl-increase searches with it at every layer and without, and keeps the routing that "
                        "cuts more expert FLOPs")
    c.add_argument("--portable", action="store_true", help="write the routers in standard ONNX ops")
    _json_arg(c)


@command("calibrate", "choose per-layer thresholds for a compute budget and convert", _calibrate_args)
def cmd_calibrate(args):
    from .run.calibrate import calibrate_and_convert

    if args.target_experts is not None and not (math.isfinite(args.target_experts) and args.target_experts >= 1):
        raise UsageError(f"--target-experts must be >= 1 (experts per token), got {args.target_experts}")
    if args.max_ppl_increase is not None and not 0 < args.max_ppl_increase < 1:
        raise UsageError(f"--max-ppl-increase {args.max_ppl_increase}: a fraction, e.g. 0.01 for +1% perplexity")
    if args.target_experts is not None and args.holdout is not None:
        raise UsageError("--holdout applies to --max-ppl-increase (the part of --data that checks the quality budget); "
                         "--target-experts uses all of --data")
    if args.target_experts is not None and args.check is not None:
        raise UsageError("--check applies to --max-ppl-increase (how the quality budget is checked)")
    if args.max_ppl_increase is not None and args.mode is not None:
        raise UsageError("--mode applies to --target-experts; --max-ppl-increase chooses each layer's routing")
    args.mode = args.mode or "per-layer"
    if args.holdout is not None and not 0 < args.holdout < 1:
        raise UsageError(f"--holdout {args.holdout}: the fraction of the sequences held out, between 0 and 1")
    if args.min_experts < 1 or (args.max_experts is not None and args.max_experts < args.min_experts):
        raise UsageError(f"--min-experts {args.min_experts} / --max-experts {args.max_experts}: "
                         "need 1 <= min <= max")
    if args.stand_in is not None and args.stand_in < 0:
        raise UsageError(f"--stand-in {args.stand_in}: a rank, 0 (the mean output) or more")

    layers, warnings, notes, report = calibrate_and_convert(
        args.model, args.data, args.output, args.target_experts, policy=args.policy, mode=args.mode,
        min_experts=args.min_experts, max_experts=args.max_experts, portable=args.portable,
        max_ppl_increase=args.max_ppl_increase, holdout=args.holdout, renormalize=args.renormalize,
        stand_in=args.stand_in, check=args.check)
    for w in warnings:
        _warn(w)
    if args.json:
        summary = {"output": str(args.output), "policy": args.policy, "mode": args.mode, "stand_in": args.stand_in,
                   "target_experts": args.target_experts, "layers": layers, "warnings": warnings, "notes": notes}
        if report is not None:
            summary |= {k: report[k] for k in ("max_ppl_increase", "check", "fit", "heldout", "all", "evaluations")}
            summary["mode"] = "quality budget"
        print(json.dumps(summary, indent=2))
        return
    for r in layers:
        if report is None:
            print(f"{r['layer']}: threshold {r['threshold']:.4f} -> {r['mean_experts']:.3f} experts/token (k={r['k']})")
        else:
            rn = f", renormalize {r['renormalize']:g}" if r["policy"] != "static" and r["renormalize"] != 1 else ""
            rn += " + stand-in" if r.get("stand_in") else ""
            print(f"{r['layer']}: {r['policy']} threshold {r['threshold']:.4f}{rn} -> {r['mean_experts']:.3f} "
                  f"experts/token (k={r['k']}), est. perplexity cost {100 * r['est_ppl_cost']:+.2f}%")
    if report is None and args.stand_in is not None:
        print(f"a stand-in of rank {args.stand_in} for the dropped experts at every layer")
    if report is not None:
        crossfit = report["check"] == "crossfit"
        for part, label in (("fit", "all of --data" if crossfit else "fitting part"),
                            ("heldout", "cross-fitted" if crossfit else "held out")):
            x = report[part]
            upper = (f", {100 * x['ppl_increase_upper']:+.2f}% {report['se']:g} standard errors up"
                     if part == "heldout" else "")
            print(f"{label} ({x['sequences']} sequences): perplexity "
                  f"{100 * x['ppl_increase']:+.2f}%{upper} (static {x['static_ppl']:.4f}), routed pairs "
                  f"{-100 * x['pair_reduction']:+.1f}%" + (f", expert FLOPs {-100 * x['net_reduction']:+.1f}% with the "
                                                           "stand-ins'" if report["stand_ins"] else ""))
    print(f"wrote {args.output}{_data_line(notes)}")


def _profile_args(c):
    _model_arg(c, "a converted model (or GenAI model folder)")
    _data_arg(c)
    c.add_argument("--flops-per-pair", type=_positive, default=None,
                    help="FLOPs of one (token, expert) pair (default: read off the expert weights)")
    _json_arg(c)


@command("profile", "expert FLOPs, experts per token and expert load, static vs converted", _profile_args)
def cmd_profile(args):
    from .run.profile import profile, print_profile

    rep = profile(args.model, args.data, flops_per_pair_override=args.flops_per_pair)
    print(json.dumps(rep, indent=2) if args.json else print_profile(rep))


def _build_engine_args(c):
    _model_arg(c, "a converted .onnx")
    _output_arg(c, "the engine (.plan) to write")
    c.add_argument("--fp16", action="store_true", help="allow float16 kernels")
    c.add_argument("--shape", action="append", metavar="NAME:MIN,OPT,MAX",
                   help="optimization profile of a dynamic input, dims like 1x16 (repeat per input)")
    c.add_argument("--workspace-mb", type=int, default=4096, help="TensorRT workspace limit in MiB (default 4096)")


@command("build-engine", "build a TensorRT engine with the DynamicRouter plugin", _build_engine_args)
def cmd_build_engine(args):
    from .deploy.tensorrt import build_engine, parse_shapes

    out = build_engine(args.model, args.output, fp16=args.fp16, shapes=parse_shapes(args.shape),
                       workspace_mb=args.workspace_mb)
    print(f"built TensorRT engine {out}")


def _triton_args(c):
    _model_arg(c, "a converted .onnx, or a GenAI model folder (--backend python)")
    _output_arg(c, "model repository directory")
    c.add_argument("--name", required=True, help="the model's name in the repository")
    c.add_argument("--backend", choices=("onnxruntime", "tensorrt", "python"), default="onnxruntime",
                   help="Triton backend (default onnxruntime; python: served by any tritonserver, "
                        "`moe-export serve` included)")
    c.add_argument("--plan", type=Path, help="tensorrt backend: a prebuilt engine (default: build one)")
    c.add_argument("--max-batch-size", type=int, default=8,
                   help="dynamic batching when every input/output has a dynamic leading dim and the graph "
                        "has no KV cache (0: off; default 8)")
    c.add_argument("--server-repository", default="/models",
                   help="onnxruntime backend: where the repository is mounted on the server, for the op "
                        "library's path (default /models, as in NVIDIA's container)")
    c.add_argument("--batch-delay-us", type=int, default=0,
                   help="how long Triton may hold a request to batch it with others (max_queue_delay; default 0)")
    c.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    c.add_argument("--threads", type=int, default=0,
                   help="python backend, graphs: onnxruntime intra-op threads per instance (default 0: all cores)")
    c.add_argument("--max-concurrent", type=int, default=4,
                   help="python backend, GenAI folders: generations run at once (default 4)")
    c.add_argument("--max-tokens", type=int, default=16,
                   help="python backend, GenAI folders: new tokens when a request gives no max_tokens (default 16)")


@command("triton", "write a Triton Inference Server model repository entry", _triton_args)
def cmd_triton(args):
    from .deploy.triton import serving_mode, triton_repository

    if min(args.instances, args.max_concurrent, args.max_tokens) < 1 or \
            min(args.max_batch_size, args.threads, args.batch_delay_us) < 0:
        raise UsageError("--instances, --max-concurrent and --max-tokens must be >= 1; --max-batch-size, "
                         "--threads and --batch-delay-us >= 0")
    src = Source(args.model)
    d = triton_repository(src, args.output, args.name, backend=args.backend, plan=args.plan,
                          max_batch_size=args.max_batch_size, server_repo_path=args.server_repository,
                          instances=args.instances, threads=args.threads, max_concurrent=args.max_concurrent,
                          max_tokens=args.max_tokens, delay_us=args.batch_delay_us)
    print(f"wrote Triton model {d} ({args.backend} backend; {serving_mode(src, args.max_batch_size)})")
    if args.backend == "python":
        print(f"serve it: moe-export serve {args.output}")


def _serve_args(c):
    c.add_argument("repository", type=Path, help="a model repository (moe-export triton --backend python)")
    c.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0: a free one)")
    c.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: a free one)")
    c.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002; 0: a free one)")
    c.add_argument("--env", type=Path, help="the serving environment: a virtual environment with nvidia-pytriton "
                   "(numpy<2), onnxruntime and onnxruntime-genai (default $MOE_EXPORT_SERVE_ENV, else this one)")
    c.add_argument("--log", type=Path, help="append the server's log to this file (default: a temporary one)")
    c.add_argument("--timeout", type=_positive, default=120.0, help="seconds to wait for the server to be ready")


@command("serve", "run a Triton Inference Server on a model repository (127.0.0.1)", _serve_args)
def cmd_serve(args):
    from .deploy.serve import serve

    for flag in ("http_port", "grpc_port", "metrics_port"):
        if not 0 <= getattr(args, flag) < 65536:
            raise UsageError(f"--{flag.replace('_', '-')} must be a port number (0: a free one)")
    serve(args.repository, args.http_port, args.grpc_port, args.metrics_port, args.env, args.log, args.timeout)


def _demo_args(c):
    c.add_argument("--workdir", default="demo_out", help="where the demo writes (default demo_out)")
    _json_arg(c)


@command("demo", "export a tiny Mixtral, convert it, and report parity and routing", _demo_args)
def cmd_demo(args):
    from .demo import run_demo

    run_demo(Path(args.workdir), json_out=args.json)


def build_parser():
    # --debug is accepted before or after the command: each parser knows it, and only an explicit
    # use sets it (SUPPRESS keeps a subcommand's default from overwriting the top level's).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and the exporters' own output")
    p = _Parser(prog="moe-export", description="Dynamic expert routing for MoE models in ONNX.", parents=[debug])
    p.add_argument("--version", action="version", version=f"moe-export {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, help, arguments, run in COMMANDS:
        c = sub.add_parser(name, help=help, description=help, parents=[debug])
        c.set_defaults(fn=run)
        arguments(c)
    return p


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so partial outputs are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help(sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)  # (parsers share the action: no set_defaults)
    if args.debug:
        os.environ["MOE_EXPORT_DEBUG"] = "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args.fn(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `moe-export ... | head`: the reader has what it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (KeyboardInterrupt, _Terminated) as e:
        if getattr(e, "output_committed", False):  # it came as the output was put in place (files.Output)
            sys.stderr.write("moe-export: interrupted after the output was written; it is complete\n")
            sys.exit(0)
        sys.stderr.write("moe-export: interrupted; nothing was written\n")
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)
    except (MoeExportError, OSError) as e:
        if args.debug:
            raise
        msg = str(e) if isinstance(e, MoeExportError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        sys.stderr.write(f"moe-export: error: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except Exception as e:  # a bug or an unforeseen input: still one line, with the kind of failure
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"moe-export: error: {type(e).__name__}: {first} (rerun with --debug for details)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
