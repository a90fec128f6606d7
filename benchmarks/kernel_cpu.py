"""DynamicRouter CPU kernel vs the ONNX gating subgraph it replaces, side by side in one run.

    .venv/bin/python benchmarks/kernel_cpu.py [--tokens 16384] [--repeats 30] [--threads 1]

For each (E, k) the static gate Softmax -> TopK -> ReduceSum -> Div is exported from PyTorch-like
ONNX, converted by moe-export (static policy, so outputs are identical), and both sessions are timed
alternately on the same inputs; medians are reported, plus the logits read rate against a
single-core memory-read floor measured in the same run. Results: benchmarks/results/kernel_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import moe_export
from moe_export.rewrite import Policy, convert

HERE = Path(__file__).resolve().parent


def gate_graph(E, k, path):
    """The static gate as exporters write it (softmax, top-k, renormalize)."""
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", E])
    outs = [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["tokens", k]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["tokens", k])]
    inits = [helper.make_tensor("k", TensorProto.INT64, [1], [k]), helper.make_tensor("ax", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("TopK", ["p", "k"], ["v", "indices"], axis=-1),
             helper.make_node("ReduceSum", ["v", "ax"], ["s"], keepdims=1),
             helper.make_node("Div", ["v", "s"], ["weights"])]
    m = helper.make_model(helper.make_graph(nodes, "gate", [x], outs, inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))


def time_run(sess, feeds, out=None):
    t = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - t


def read_floor_gbps(mb=512, repeats=5):
    """Single-core streaming read rate: numpy summing a buffer far larger than the caches."""
    a = np.ones(mb * 1024 * 1024 // 4, dtype=np.float32)
    best = min(_timed(lambda: a.sum()) for _ in range(repeats))
    return a.nbytes / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "kernel_cpu.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    floor = read_floor_gbps()
    with tempfile.TemporaryDirectory() as d:
        for E, k in [(8, 2), (64, 8), (256, 8)]:
            g, c = Path(d) / f"gate{E}.onnx", Path(d) / f"gate{E}.dyn.onnx"
            gate_graph(E, k, g)
            convert(g, c, Policy("static"))
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            base = ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
            ours = moe_export.session(c, intra_op_num_threads=args.threads)
            x = rng.standard_normal((args.tokens, E)).astype(np.float32) * 2
            feeds = {"logits": x}
            rw, ri = base.run(None, feeds)
            w, i = ours.run(None, feeds)
            assert np.array_equal(i, ri) and np.allclose(w, rw, atol=1e-6)
            tb, to = [], []
            for _ in range(3):
                time_run(base, feeds), time_run(ours, feeds)
            for _ in range(args.repeats):  # alternate, so drift hits both sides alike
                tb.append(time_run(base, feeds))
                to.append(time_run(ours, feeds))
            mb, mo = statistics.median(tb), statistics.median(to)
            row = {"E": E, "k": k, "tokens": args.tokens, "threads": args.threads,
                   "subgraph_ms": mb * 1e3, "kernel_ms": mo * 1e3, "speedup": mb / mo,
                   "kernel_logits_gbps": x.nbytes / mo / 1e9, "subgraph_logits_gbps": x.nbytes / mb / 1e9,
                   "read_floor_ms": x.nbytes / (floor * 1e9) * 1e3}
            # dynamic policies cost about the same: report one for reference
            dyn = Path(d) / f"gate{E}.topp.onnx"
            convert(g, dyn, Policy("top-p", 0.6))
            sd = moe_export.session(dyn, intra_op_num_threads=args.threads)
            row["kernel_top_p_ms"] = statistics.median([time_run(sd, feeds) for _ in range(args.repeats)]) * 1e3
            rows.append(row)
            print(f"E={E:4d} k={k}: subgraph {row['subgraph_ms']:.3f} ms, kernel {row['kernel_ms']:.3f} ms "
                  f"({row['speedup']:.1f}x), top-p kernel {row['kernel_top_p_ms']:.3f} ms; logits read at "
                  f"{row['kernel_logits_gbps']:.1f} GB/s (floor {row['read_floor_ms']:.3f} ms at {floor:.1f} GB/s)")
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{ort.get_device()} onnxruntime {ort.__version__}", "read_floor_gbps": floor, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
