"""End to end, as a user would script it: export a checkpoint, convert it with a dynamic policy,
check parity and savings, and write a Triton model repository.

    python samples/convert_validate_deploy.py CHECKPOINT_DIR WORKDIR [--threshold 0.6]

CHECKPOINT_DIR is a local transformers MoE checkpoint (save_pretrained); no hub access needed.
WORKDIR must be new or empty: moe-export never replaces a model another one shares data with.
"""
import argparse
import json
from pathlib import Path

import numpy as np

import moe_export
from moe_export.deploy.triton import triton_repository
from moe_export.model.export import export_checkpoint
from moe_export.conversion import Policy, convert
from moe_export.run.validate import validate

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint", type=Path)
ap.add_argument("workdir", type=Path)
ap.add_argument("--threshold", type=float, default=0.6)
args = ap.parse_args()
if args.workdir.exists() and any(args.workdir.iterdir()):
    raise SystemExit(f"{args.workdir} is not empty; give a new WORKDIR")
args.workdir.mkdir(parents=True, exist_ok=True)

original = export_checkpoint(args.checkpoint, args.workdir / "model.onnx")
static = args.workdir / "model.static.onnx"
dynamic = args.workdir / "model.dynamic.onnx"
convert(original, static, Policy("static"))
gates = convert(original, dynamic, Policy("top-p", args.threshold))
print(f"{len(gates)} MoE layers:", sorted({g.family for g in gates}))

rep = validate(original, static, dims={"batch": 2, "seq": 64})
assert rep["static_reproduces"], "static conversion must reproduce the original"
rep = validate(original, dynamic, dims={"batch": 2, "seq": 64})
print(json.dumps({"routed_pairs": rep["routed_pairs"], "logits": rep["outputs"]["logits"]}, indent=2))

sess = moe_export.session(dynamic, intra_op_num_threads=2)
ids = np.random.default_rng(0).integers(0, 100, (1, 16)).astype(np.int64)
print("logits", sess.run(None, {"input_ids": ids})[0].shape)

print("triton:", triton_repository(dynamic, args.workdir / "model_repository", "moe_dynamic"))
