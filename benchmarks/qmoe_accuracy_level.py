"""What QMoE's `accuracy_level` attribute does on deploy_cpu.py's GenAI int4 build (run it first):
the GenAI builder (0.18) sets accuracy_level 4 on its MatMulNBits nodes for CPU but not on QMoE.
A copy of the decoder graph with accuracy_level 4 on every QMoE node is written beside the original
(sharing its data file), and both are timed on one prefill of the prompt text, alternating
(medians), their session load measured in fresh processes (deploy_cpu.load_cost), and their
logits compared. moe-export itself leaves the attribute as the builder wrote it.

    .venv/bin/python benchmarks/qmoe_accuracy_level.py [--shape gpt-oss-20b] [--tokens 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_cpu import WORK, feeds_for, load_cost  # noqa: E402

import moe_export  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt-oss-20b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    folder = WORK / f"{args.shape}_int4"
    original = folder / "model.onnx"
    if not original.is_file():
        raise SystemExit(f"no {original}: run benchmarks/deploy_cpu.py --shapes {args.shape} first")
    model = onnx.load(str(original), load_external_data=False)
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    for n in qmoe:
        kept = [a for a in n.attribute if a.name != "accuracy_level"]
        del n.attribute[:]
        n.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", 4)])
    variant = folder / "model.accuracy_level_4.onnx"
    onnx.save(model, str(variant))
    try:
        graphs = {"as built": original, "accuracy_level 4": variant}
        load = load_cost(graphs, args.threads)
        prompt = np.load(WORK / f"{args.shape}_prompt.npy")
        feeds = feeds_for(folder, model, 1, args.tokens, False)
        feeds["input_ids"] = prompt[:1, :args.tokens].astype(feeds["input_ids"].dtype)
        sessions = {n: moe_export.session(g, intra_op_num_threads=args.threads) for n, g in graphs.items()}
        logits = {n: s.run(None, feeds)[0] for n, s in sessions.items()}
        times = {n: [] for n in sessions}
        for _ in range(args.repeats):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[n].append(1e3 * (time.perf_counter() - t))
        for n in graphs:
            print(f"{n:17s} prefill {statistics.median(times[n]):.1f} ms; load {load[n]['load_s']:.2f} s, "
                  f"peak RSS {load[n]['load_rss_gb']:.2f} GB")
        diff = np.abs(logits["as built"] - logits["accuracy_level 4"]).max()
        print(f"{len(qmoe)} QMoE node(s); {args.tokens} tokens, {args.threads} thread(s); max |logits difference| {diff:.3g}")
    finally:
        variant.unlink()


if __name__ == "__main__":
    main()
