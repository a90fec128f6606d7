"""Greedy generation with the KV cache through ONNX Runtime: an exported decoder graph and its
dynamic-routing conversion, side by side.

    python samples/generate.py CHECKPOINT_DIR WORKDIR [--threshold 0.5] [--tokens 32]

CHECKPOINT_DIR is a local transformers MoE checkpoint; WORKDIR gets model.onnx (exported with
--with-past) and model.dynamic.onnx (top-p at the threshold). Prints both continuations, their
speed and how many routed pairs the dynamic one saved on the generated text.
"""
import argparse
import pathlib
import time

import numpy as np

import moe_export
from moe_export.model.export import export_checkpoint
from moe_export.conversion import Policy, convert
from moe_export.run.runtime import greedy
from moe_export.run.validate import validate

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("workdir")
ap.add_argument("--threshold", type=float, default=0.5)
ap.add_argument("--tokens", type=int, default=32)
args = ap.parse_args()

work = pathlib.Path(args.workdir)
work.mkdir(parents=True, exist_ok=True)
original, dynamic = work / "model.onnx", work / "model.dynamic.onnx"
if not original.exists():
    export_checkpoint(args.checkpoint, original, with_past=True)
if not dynamic.exists():
    convert(original, dynamic, Policy("top-p", args.threshold))
prompt = np.random.default_rng(0).integers(3, 100, (1, 8))
for name, path in (("original", original), ("dynamic", dynamic)):
    sess = moe_export.session(path, intra_op_num_threads=1)
    t = time.perf_counter()
    out = greedy(sess, prompt, args.tokens)
    dt = time.perf_counter() - t
    print(f"{name:9s} {args.tokens / dt:7.1f} tokens/s: {out[0, prompt.shape[1]:].tolist()}")
rep = validate(original, dynamic)
print(f"routed pairs on a random prefill: {100 * rep['routed_pairs']['reduction']:.1f}% fewer")
