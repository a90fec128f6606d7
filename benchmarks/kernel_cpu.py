"""DynamicRouter CPU kernel vs the ONNX gating subgraph it replaces, side by side in one run.

    .venv/bin/python benchmarks/kernel_cpu.py [--tokens 16384] [--repeats 30] [--threads 1]

For each (E, k) and both gate forms, Softmax -> TopK -> ReduceSum -> Div (Mixtral, Qwen3-MoE)
and TopK -> Softmax (GPT-OSS), the static gate is written as exporters write it, converted by
moe-export (static policy, so outputs are identical), and both sessions are timed
alternately on the same inputs; medians are reported, plus the logits read rate against a
single-core memory-read floor measured in the same run, and what a session run with the same
inputs and outputs costs when it does almost nothing (Slice and Cast): no kernel gets below it.
The kernel's portable build (MOE_EXPORT_CPU_ISA=portable, what a CPU without AVX2 runs) is timed
in the same rotation.
Results: benchmarks/results/kernel_cpu.json.
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
from moe_export.conversion import Policy, convert

HERE = Path(__file__).resolve().parent


GATES = {
    "softmax-topk-norm": "Softmax -> TopK -> ReduceSum -> Div",
    "topk-softmax": "TopK -> Softmax",
}


def gate_graph(E, k, path, gate="softmax-topk-norm"):
    """A static gate as exporters write it: one of GATES."""
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", E])
    outs = [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["tokens", k]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["tokens", k])]
    inits = [helper.make_tensor("k", TensorProto.INT64, [1], [k])]
    if gate == "softmax-topk-norm":
        inits.append(helper.make_tensor("ax", TensorProto.INT64, [1], [-1]))
        nodes = [helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
                 helper.make_node("TopK", ["p", "k"], ["v", "indices"], axis=-1),
                 helper.make_node("ReduceSum", ["v", "ax"], ["s"], keepdims=1),
                 helper.make_node("Div", ["v", "s"], ["weights"])]
    else:
        nodes = [helper.make_node("TopK", ["logits", "k"], ["v", "indices"], axis=-1),
                 helper.make_node("Softmax", ["v"], ["weights"], axis=-1)]
    m = helper.make_model(helper.make_graph(nodes, "gate", [x], outs, inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))


def floor_graph(E, k, path):
    """Same inputs and outputs as the gate, almost no work: what a session run costs at all."""
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["tokens", E])
    outs = [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["tokens", k]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["tokens", k])]
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("b", 0), ("e", k), ("a", 1))]
    nodes = [helper.make_node("Slice", ["logits", "b", "e", "a"], ["weights"]),
             helper.make_node("Cast", ["weights"], ["indices"], to=TensorProto.INT64)]
    m = helper.make_model(helper.make_graph(nodes, "floor", [x], outs, inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))


def time_run(sess, feeds):
    t = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - t


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        for gate, E, k in [(name, E, k) for name in GATES for E, k in [(8, 2), (64, 8), (256, 8)]]:
            g, c = Path(d) / f"{gate}{E}.onnx", Path(d) / f"{gate}{E}.dyn.onnx"
            gate_graph(E, k, g, gate)
            convert(g, c, Policy("static"))
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            base = ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
            ours = moe_export.session(c, intra_op_num_threads=args.threads)
            x = rng.standard_normal((args.tokens, E)).astype(np.float32) * 2
            feeds = {"logits": x}
            rw, ri = base.run(None, feeds)
            port = moe_export.session(c, cpu_isa="portable", intra_op_num_threads=args.threads)
            floor_graph(E, k, Path(d) / "floor.onnx")
            null = ort.InferenceSession(str(Path(d) / "floor.onnx"), so, providers=["CPUExecutionProvider"])
            for sess in (ours, port):
                w, i = sess.run(None, feeds)
                assert np.array_equal(i, ri) and np.allclose(w, rw, atol=1e-6)
            tb, to, tp, tn = [], [], [], []
            for _ in range(3):
                time_run(base, feeds), time_run(ours, feeds), time_run(port, feeds), time_run(null, feeds)
            for _ in range(args.repeats):  # alternate, so drift hits all sides alike
                tb.append(time_run(base, feeds))
                to.append(time_run(ours, feeds))
                tp.append(time_run(port, feeds))
                tn.append(time_run(null, feeds))
            mb, mo, mp = statistics.median(tb), statistics.median(to), statistics.median(tp)
            row = {"gate": GATES[gate], "E": E, "k": k, "tokens": args.tokens, "threads": args.threads,
                   "subgraph_ms": mb * 1e3, "kernel_ms": mo * 1e3, "speedup": mb / mo,
                   "kernel_portable_ms": mp * 1e3, "speedup_portable": mb / mp,
                   "kernel_logits_gbps": x.nbytes / mo / 1e9, "subgraph_logits_gbps": x.nbytes / mb / 1e9,
                   "read_floor_ms": x.nbytes / (floor * 1e9) * 1e3,
                   "session_floor_ms": statistics.median(tn) * 1e3}
            # dynamic policies cost about the same: report one for reference
            dyn = Path(d) / f"{gate}{E}.topp.onnx"
            convert(g, dyn, Policy("top-p", 0.6))
            sd = moe_export.session(dyn, intra_op_num_threads=args.threads)
            row["kernel_top_p_ms"] = statistics.median([time_run(sd, feeds) for _ in range(args.repeats)]) * 1e3
            rows.append(row)
            print(f"{GATES[gate]}, E={E:4d} k={k}: subgraph {row['subgraph_ms']:.3f} ms, kernel {row['kernel_ms']:.3f} ms "
                  f"({row['speedup']:.1f}x; portable build {row['kernel_portable_ms']:.3f} ms), "
                  f"top-p kernel {row['kernel_top_p_ms']:.3f} ms; logits read at "
                  f"{row['kernel_logits_gbps']:.1f} GB/s (floor {row['read_floor_ms']:.3f} ms at {floor:.1f} GB/s); "
                  f"a session run that only slices and casts: {row['session_floor_ms']:.3f} ms")
    result = {"date": date.today().isoformat(), "machine": f"{cpu_model()}, "
              f"{ort.get_device()} onnxruntime {ort.__version__}", "read_floor_gbps": floor, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
