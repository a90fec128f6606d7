"""Long prefills on deploy_cpu.py's torch-shape build: the default conversion beside its
`--per-expert-weights` twin (run deploy_cpu.py --shapes qwen3-30b-a3b first). The original is left
out: it gathers a 6.3 MB weight slab per (token, slot) and matrix, seconds per call at these lengths.

    .venv/bin/python benchmarks/long_prefill.py [--tokens 64 512] [--threads 2] [--repeats 5]

One prefill of [1, tokens] token ids from an empty cache per run, the two graphs alternating,
medians in ms.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cpu import WORK, feeds_for  # noqa: E402

import moe_export  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    graphs = {name: WORK / f"{args.shape}_fp32.{name}.onnx" for name in ("dynamic", "per_expert")}
    missing = [str(g) for g in graphs.values() if not g.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run benchmarks/deploy_cpu.py --shapes {args.shape} first")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.register_custom_ops_library(moe_export.custom_op_library())
    sessions = {n: ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"]) for n, g in graphs.items()}
    model = onnx.load(str(graphs["dynamic"]), load_external_data=False)
    for tokens in args.tokens:
        feeds = feeds_for(WORK, model, 1, tokens, False)
        times = {n: [] for n in sessions}
        for s in sessions.values():
            s.run(None, feeds)  # warm-up
        for _ in range(args.repeats):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[n].append(1e3 * (time.perf_counter() - t))
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"{tokens} tokens, {args.threads} threads: default {med['dynamic']:.1f} ms, "
              f"--per-expert-weights {med['per_expert']:.1f} ms")


if __name__ == "__main__":
    main()
