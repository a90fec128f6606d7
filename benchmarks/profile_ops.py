"""Where a prefill's time goes, original vs converted: onnxruntime's profiler over one run after a
warm-up, kernel time summed by op type. Uses deploy_cpu.py's builds (run it first).

    .venv/bin/python benchmarks/profile_ops.py [--shape gpt-oss-20b] [--precision fp32] [--batch 1]
        [--threads 1] [--tokens 128]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cpu import WORK, feeds_for  # noqa: E402

import moe_export  # noqa: E402


def profile(graph, feeds, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.register_custom_ops_library(moe_export.custom_op_library())
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "run")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up
    t = time.perf_counter()
    sess.run(None, feeds)
    wall = time.perf_counter() - t
    events = json.loads(Path(sess.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3
    return wall * 1e3, by_op


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt-oss-20b")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    prompt = np.load(WORK / f"{args.shape}_prompt.npy")
    for folder in (WORK / f"{args.shape}_{args.precision}", WORK / f"{args.shape}_{args.precision}.dynamic"):
        graph = folder / "model.onnx"
        feeds = feeds_for(folder, onnx.load(str(graph), load_external_data=False), args.batch, args.tokens, False)
        feeds["input_ids"] = prompt[:args.batch, :args.tokens].astype(feeds["input_ids"].dtype)
        wall, by_op = profile(graph, feeds, args.threads)
        top = ", ".join(f"{op} {ms:.0f}" for op, ms in by_op.most_common(7))
        print(f"{folder.name}: wall {wall:.0f} ms, kernels {sum(by_op.values()):.0f} ms: {top}", flush=True)


if __name__ == "__main__":
    main()
