"""The `moe-export` command line. Every failure is one line on stderr and a non-zero exit;
--debug shows the traceback."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import MoeExportError, __version__
from .spec import POLICIES


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
        raise argparse.ArgumentTypeError(f"threshold must be finite, got {v}")
    return x


def _add_policy_args(p):
    p.add_argument("--policy", choices=POLICIES, default="static", help="routing policy (default: static)")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="top-p: cumulative mass to reach; ratio: fraction of the top score; entropy: "
                        "normalized entropy below which tokens get min experts")
    p.add_argument("--min-experts", type=int, default=1, help="fewest experts per token (default 1)")
    p.add_argument("--max-experts", type=int, default=None, help="most experts per token (default: the graph's k)")


def _policy(args):
    from .rewrite import Policy

    if args.policy != "static" and args.threshold is None:
        raise MoeExportError(f"--policy {args.policy} needs --threshold")
    if args.max_experts is not None and args.max_experts < 1:
        raise MoeExportError(f"--max-experts must be >= 1, got {args.max_experts}")
    if args.min_experts < 1:
        raise MoeExportError(f"--min-experts must be >= 1, got {args.min_experts}")
    if args.max_experts is not None and args.min_experts > args.max_experts:
        raise MoeExportError(f"--min-experts ({args.min_experts}) exceeds --max-experts ({args.max_experts})")
    return Policy(args.policy, args.threshold or 0.0, args.min_experts, args.max_experts)


def _dims(items):
    out = {}
    for it in items or []:
        name, _, val = it.partition("=")
        if not val.isdigit() or int(val) < 0:
            raise MoeExportError(f"--dim wants NAME=SIZE, got {it!r}")
        out[name] = int(val)
    return out


def cmd_convert(args):
    from .rewrite import convert

    gates = convert(args.model, args.output, _policy(args), portable=args.portable,
                    group_experts=not args.no_group_experts)
    summary = {"output": str(args.output), "layers": len(gates), "policy": args.policy,
               "threshold": args.threshold, "portable": args.portable,
               "families": sorted({g.family for g in gates})}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"converted {len(gates)} MoE layer(s) ({', '.join(summary['families'])}) -> {args.output} "
              f"[policy {args.policy}{'' if args.threshold is None else f', threshold {args.threshold}'}"
              f"{', portable' if args.portable else ''}]")


def cmd_inspect(args):
    from .graph import load_model
    from .patterns import find_gates, no_gates_message
    from .rewrite import routers_metadata

    model = load_model(args.model)
    gates, misses = find_gates(model)
    meta = routers_metadata(model)
    rows = [g.describe() for g in gates]
    if args.json:
        print(json.dumps({"model": str(args.model), "layers": rows, "near_misses": misses,
                          "converted": meta}, indent=2))
        return
    if meta is not None:
        for r in meta["routers"]:
            a = r["attrs"]
            print(f"{r['layer']}: DynamicRouter E={a['num_experts']} k={a['k']} policy={a['policy']} "
                  f"threshold={a['threshold']} experts={a['min_experts']}..{a['max_experts']}")
        return
    if not rows:
        raise MoeExportError(no_gates_message(model, misses))
    for r in rows:
        extra = f" groups={r['topk_group']}/{r['n_group']}" if r["n_group"] > 1 else ""
        print(f"{r['layer']}: {r['form']}; E={r['num_experts']} k={r['k']} scoring={r['scoring']} "
              f"normalize={r['normalize']} scale={r['scale']:g}{extra} experts={r['experts']}")
    print(f"{len(rows)} MoE layer(s)")


def cmd_validate(args):
    from .validate import load_feeds, validate

    feeds = load_feeds(args.data) if args.data else None
    rep = validate(args.original, args.converted, feeds=feeds, atol=args.atol, rtol=args.rtol,
                   dims=_dims(args.dim), seed=args.seed, trt=args.trt)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for name, s in rep["outputs"].items():
            print(f"{name}: max_abs={s['max_abs']:.3g} mean_abs={s['mean_abs']:.3g} "
                  f"max_rel={s['max_rel']:.3g} mean_rel={s['mean_rel']:.3g} {'ok' if s['passed'] else 'DIFFERS'}")
        rp = rep["routed_pairs"]
        print(f"routed (token, expert) pairs: original {rp['original']}, converted {rp['converted']} "
              f"({100 * rp['reduction']:.1f}% fewer)")
        if rep["static_policy"]:
            print("static policy reproduces the original:", "yes" if rep["static_reproduces"] else "NO")
    if rep["static_policy"] and not rep["static_reproduces"]:
        sys.exit(1)


def cmd_export(args):
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, opset=args.opset, exporter=args.exporter,
                            external_data=not args.embed_weights)
    print(f"exported {args.checkpoint} -> {out}")


def cmd_calibrate(args):
    from .calibrate import calibrate_and_convert

    layers = calibrate_and_convert(args.model, args.data, args.output, args.target_experts, policy=args.policy,
                                   mode=args.mode, min_experts=args.min_experts, max_experts=args.max_experts,
                                   portable=args.portable)
    if args.json:
        print(json.dumps({"output": str(args.output), "policy": args.policy, "mode": args.mode,
                          "target_experts": args.target_experts, "layers": layers}, indent=2))
        return
    for r in layers:
        print(f"{r['layer']}: threshold {r['threshold']:.4f} -> {r['mean_experts']:.3f} experts/token (k={r['k']})")
    print(f"wrote {args.output}")


def cmd_profile(args):
    from .profile import profile, print_profile

    rep = profile(args.model, args.data, flops_per_pair_override=args.flops_per_pair)
    print(json.dumps(rep, indent=2) if args.json else print_profile(rep))


def cmd_build_engine(args):
    from .deploy import build_engine, parse_shapes

    out = build_engine(args.model, args.output, fp16=args.fp16, shapes=parse_shapes(args.shape),
                       workspace_mb=args.workspace_mb)
    print(f"built TensorRT engine {out}")


def cmd_triton(args):
    from .deploy import triton_repository

    d = triton_repository(args.model, args.output, args.name, backend=args.backend, plan=args.plan,
                          max_batch_size=args.max_batch_size, server_repo_path=args.server_repository,
                          instances=args.instances)
    print(f"wrote Triton model {d} ({args.backend} backend)")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(Path(args.workdir), json_out=args.json)


def build_parser():
    p = _Parser(prog="moe-export", description="Dynamic expert routing for MoE models in ONNX.")
    p.add_argument("--version", action="version", version=f"moe-export {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="replace static top-k gating with DynamicRouter")
    c.add_argument("model", type=Path)
    c.add_argument("-o", "--output", type=Path, required=True)
    _add_policy_args(c)
    c.add_argument("--portable", action="store_true",
                   help="express the router in standard ONNX ops (runs without the moe-export library)")
    c.add_argument("--no-group-experts", action="store_true",
                   help="keep batched expert sections as exported (by default they are regrouped by "
                        "expert so that dropped slots cost nothing)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_convert)

    i = sub.add_parser("inspect", help="list the MoE layers found")
    i.add_argument("model", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    v = sub.add_parser("validate", help="compare a converted graph with its original (polygraphy)")
    v.add_argument("original", type=Path)
    v.add_argument("converted", type=Path)
    v.add_argument("--data", type=Path, help=".npz of named inputs (default: random from the input specs)")
    v.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a symbolic input dimension")
    v.add_argument("--atol", type=float, default=1e-4)
    v.add_argument("--rtol", type=float, default=1e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--trt", action="store_true", help="also run the converted graph in TensorRT")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_validate)

    e = sub.add_parser("export", help="export a local transformers MoE checkpoint to ONNX")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    e.add_argument("--embed-weights", action="store_true", help="keep weights inside the .onnx file")
    e.set_defaults(fn=cmd_export)

    cal = sub.add_parser("calibrate", help="choose per-layer thresholds for a compute budget and convert")
    cal.add_argument("model", type=Path, help="the original (static top-k) model")
    cal.add_argument("--data", type=Path, required=True, help=".npy token ids [batch, seq] (or .npz of inputs)")
    cal.add_argument("--target-experts", type=float, required=True, help="mean experts per token to aim for")
    cal.add_argument("-o", "--output", type=Path, required=True)
    cal.add_argument("--policy", choices=[p for p in POLICIES if p != "static"], default="top-p")
    cal.add_argument("--mode", choices=("per-layer", "global"), default="per-layer",
                     help="a threshold per layer hitting the target in each, or one threshold for all")
    cal.add_argument("--min-experts", type=int, default=1)
    cal.add_argument("--max-experts", type=int, default=None)
    cal.add_argument("--portable", action="store_true")
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(fn=cmd_calibrate)

    pr = sub.add_parser("profile", help="expert FLOPs, experts per token and expert load, static vs converted")
    pr.add_argument("model", type=Path, help="a converted model")
    pr.add_argument("--data", type=Path, required=True, help=".npy token ids [batch, seq] (or .npz of inputs)")
    pr.add_argument("--flops-per-pair", type=float, default=None,
                    help="FLOPs of one (token, expert) pair (default: read off the expert weights)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_profile)

    b = sub.add_parser("build-engine", help="build a TensorRT engine with the DynamicRouter plugin")
    b.add_argument("model", type=Path)
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--fp16", action="store_true")
    b.add_argument("--shape", action="append", metavar="NAME:MIN,OPT,MAX",
                   help="optimization profile of a dynamic input, dims like 1x16 (repeat per input)")
    b.add_argument("--workspace-mb", type=int, default=4096)
    b.set_defaults(fn=cmd_build_engine)

    t = sub.add_parser("triton", help="write a Triton Inference Server model repository entry")
    t.add_argument("model", type=Path, help="a converted .onnx")
    t.add_argument("-o", "--output", type=Path, required=True, help="model repository directory")
    t.add_argument("--name", required=True)
    t.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    t.add_argument("--plan", type=Path, help="tensorrt backend: a prebuilt engine (default: build one)")
    t.add_argument("--max-batch-size", type=int, default=8,
                   help="Triton batching when every input/output has a dynamic leading dim (0: off)")
    t.add_argument("--server-repository", help="where the repository is mounted on the server "
                   "(for the op library path; default: the output's absolute path)")
    t.add_argument("--instances", type=int, default=1)
    t.set_defaults(fn=cmd_triton)

    d = sub.add_parser("demo", help="export a tiny Mixtral, convert it, and report parity and routing")
    d.add_argument("--workdir", default="demo_out")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        sys.stderr.write("moe-export: interrupted\n")
        sys.exit(130)
    except (MoeExportError, OSError) as e:
        if args.debug:
            raise
        msg = str(e) if isinstance(e, MoeExportError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        sys.stderr.write(f"moe-export: error: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        sys.exit(1)
    except Exception as e:  # a bug or an unforeseen input: still one line, with the kind of failure
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"moe-export: error: {type(e).__name__}: {first} (rerun with --debug for details)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
