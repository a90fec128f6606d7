"""Does onnxruntime's fused MoE / QMoE CPU kernel get faster when routes are dropped? The op alone,
cut out of deploy_cpu.py's builds (one layer's node and its weights), timed on random hidden
states under three routings of the same tokens:

- static: the router's top-k, every pair computed;
- dropped: the same tokens with a fraction of their (token, slot) pairs dropped as moe-export's
  converted graphs feed the op: the kept experts' logits, the lowest float / 2 at every other
  expert (weight exactly 0; each token keeps >= 1);
- fewer tokens: static top-k on as many tokens as leave the dropped routing's pair count.

If the kernel's cost followed its routed pairs, "dropped" would time like "fewer tokens".

    .venv/bin/python benchmarks/fused_op.py [--shape gpt-oss-20b] [--precision int4] [--tokens 16 128 512]
        [--drop 0.35] [--threads 1] [--repeats 5]
    ORT_QMOE_CPU_QNBIT_GEMM=int8 .venv/bin/python benchmarks/fused_op.py ...   # QMoE's int8-compute path
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cpu import FUSED, WORK  # noqa: E402

LOW = np.finfo(np.float32).min / 2  # what converted graphs feed the op at an expert not kept


def op_alone(graph: Path) -> tuple[onnx.ModelProto, int, int]:
    """The first fused MoE node of `graph` with its initializers, as a graph of its own taking
    `hidden` [T, H] and `router_probs` [T, E]."""
    model = onnx.load(str(graph))
    node = next(n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in FUSED)
    inits = {i.name: i for i in model.graph.initializer}
    E = inits[node.input[2]].dims[0]
    H = inits[node.input[5]].dims[1]  # fc2: [E, H, I] (MoE), [E, H, I / 2] (QMoE 4-bit)
    op = onnx.NodeProto()
    op.CopyFrom(node)
    op.input[0], op.input[1] = "hidden", "router_probs"
    f32 = onnx.TensorProto.FLOAT
    g = helper.make_graph([op], "fused_op", [helper.make_tensor_value_info("hidden", f32, ["T", H]),
                                             helper.make_tensor_value_info("router_probs", f32, ["T", E])],
                          [helper.make_tensor_value_info(op.output[0], f32, None)],
                          [inits[n] for n in op.input if n in inits])
    return helper.make_model(g, opset_imports=list(model.opset_import)), E, H


def routings(T, E, k, drop, rng):
    """(static logits, dropped logits, tokens of equal pairs) for T tokens."""
    logits = rng.normal(0, 2, (T, E)).astype(np.float32)
    top = np.argsort(-logits, axis=1)[:, :k]
    # drop `drop` of the pairs, never a token's best expert; every expert not kept gets the lowest
    # value (not only the dropped top-k ones: the op's own top-k would take the next best instead)
    keep = np.ones((T, k), bool)
    slots = rng.permutation(T * (k - 1))[: int(round(drop * T * k))]
    keep[slots // (k - 1), 1 + slots % (k - 1)] = False
    dropped = np.full_like(logits, LOW)
    rows = np.nonzero(keep)[0]
    dropped[rows, top[keep]] = logits[rows, top[keep]]
    return logits, dropped, max(1, int(round(T * (1 - len(slots) / (T * k)))))


def timed(sess, feeds, repeats):
    sess.run(None, feeds)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt-oss-20b")
    ap.add_argument("--precision", default="int4", choices=["fp32", "int4"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 512])
    ap.add_argument("--drop", type=float, default=0.35)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, help="append the rows to this JSON file")
    args = ap.parse_args()
    model, E, H = op_alone(WORK / f"{args.shape}_{args.precision}" / "model.onnx")
    k = next(a.i for a in model.graph.node[0].attribute if a.name == "k")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    with tempfile.TemporaryDirectory() as tmp:  # the fp32 op's weights pass protobuf's 2 GB
        onnx.save(model, f"{tmp}/op.onnx", save_as_external_data=True)
        sess = ort.InferenceSession(f"{tmp}/op.onnx", so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    compute = os.environ.get("ORT_QMOE_CPU_QNBIT_GEMM", "default")
    rows = []
    for T in args.tokens:
        static, dropped, fewer = routings(T, E, k, args.drop, rng)
        hidden = rng.normal(0, 1, (T, H)).astype(np.float32)
        times = {}
        # alternate the three, so drift on a shared machine hits each alike
        for _ in range(3):
            for name, feeds in (("static", {"hidden": hidden, "router_probs": static}),
                                ("dropped", {"hidden": hidden, "router_probs": dropped}),
                                ("fewer_tokens", {"hidden": hidden[:fewer], "router_probs": static[:fewer]})):
                times.setdefault(name, []).append(timed(sess, feeds, args.repeats))
        ms = {n: statistics.median(v) for n, v in times.items()}
        def touched(lg):
            top = np.argsort(-lg, axis=1)[:, :k]
            return len(np.unique(top[np.take_along_axis(lg, top, 1) > LOW]))
        row = {"shape": args.shape, "precision": args.precision, "op": model.graph.node[0].op_type,
               "qmoe_cpu_qnbit_gemm": compute, "threads": args.threads, "tokens": T, "k": k, "experts": E,
               "pair_drop": args.drop, "experts_touched_static": touched(static),
               "experts_touched_dropped": touched(dropped), "fewer_tokens": fewer,
               **{f"{n}_ms": v for n, v in ms.items()},
               "dropped_vs_static": ms["dropped"] / ms["static"], "fewer_vs_static": ms["fewer_tokens"] / ms["static"]}
        rows.append(row)
        print(f"{args.precision} {row['op']} (QNBIT_GEMM={compute}) T={T}: static {ms['static']:.2f} ms, "
              f"dropped {100 * args.drop:.0f}% of pairs {ms['dropped']:.2f} ms ({row['dropped_vs_static']:.2f}x), "
              f"{fewer} tokens static {ms['fewer_tokens']:.2f} ms ({row['fewer_vs_static']:.2f}x); experts touched "
              f"{row['experts_touched_static']} -> {row['experts_touched_dropped']}", flush=True)
    if args.out:
        old = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
        args.out.write_text(json.dumps({"date": date.today().isoformat(), "results": old + rows}, indent=1))


if __name__ == "__main__":
    main()
