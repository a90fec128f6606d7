"""Where a prefill's (or a decode step's) time goes, original vs converted: onnxruntime's profiler
over one run after a warm-up, kernel time summed by op type. Uses deploy_cpu.py's builds (run it first).

    .venv/bin/python benchmarks/profile_ops.py [--shape gpt-oss-20b] [--precision fp32] [--batch 1]
        [--threads 1] [--tokens 128] [--phase prefill|decode]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cpu import WORK, feeds_for, generate, generation  # noqa: E402

import moe_export  # noqa: E402


def profile(graph, first, steps, threads):
    """(wall ms, {op type: kernel ms}) per run, averaged over the feeds `steps`. `first` runs
    before them: a warm-up, or the prefill whose cache the steps extend (deploy_cpu.generate)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.register_custom_ops_library(moe_export.custom_op_library())
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "run")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    wall = generate(sess, first, steps)[1]
    events = json.loads(Path(sess.end_profiling()).read_text())
    timed = [e for e in events if e.get("name") == "model_run"][-len(steps):]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in timed):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / len(steps)
    return wall * 1e3, by_op


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt-oss-20b")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="prompt tokens (decode: the cache's length)")
    ap.add_argument("--phase", choices=["prefill", "decode"], default="prefill",
                    help="decode: 16 steps of one token per sequence, generating the prompt rows' text "
                         "on the cache of a --tokens prefill (as deploy_cpu.py's decode)")
    args = ap.parse_args()
    prompt = np.load(WORK / f"{args.shape}_prompt.npy")
    stem = WORK / f"{args.shape}_{args.precision}"
    # the original, its conversion (a GenAI folder, or a graph for the torch shapes) and, for those,
    # the same routing with per-expert weight initializers (deploy_cpu.per_expert_twin)
    graphs = [stem / "model.onnx"] + [g for g in (stem.with_name(stem.name + ".dynamic") / "model.onnx",
                                                  stem.with_name(stem.name + ".dynamic.onnx"),
                                                  stem.with_name(stem.name + ".per_expert.onnx")) if g.is_file()]
    if args.batch > prompt.shape[0] or args.tokens + 16 > prompt.shape[1]:
        raise SystemExit(f"deploy_cpu.py's prompt rows are {prompt.shape}: --batch <= {prompt.shape[0]}, "
                         f"--tokens <= {prompt.shape[1] - 16}")
    for graph in graphs:
        folder, model = graph.parent, onnx.load(str(graph), load_external_data=False)
        if args.phase == "decode":
            first, steps = generation(folder, model, args.batch, args.tokens, 16, prompt)
        else:
            feeds = feeds_for(folder, model, args.batch, args.tokens, False)
            first = dict(feeds, input_ids=prompt[:args.batch, :args.tokens].astype(feeds["input_ids"].dtype))
            steps = [first]
        wall, by_op = profile(graph, first, steps, args.threads)
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in by_op.most_common(7))
        print(f"{graph.relative_to(WORK)}: wall {wall:.1f} ms, kernels {sum(by_op.values()):.1f} ms: {top}", flush=True)


if __name__ == "__main__":
    main()
