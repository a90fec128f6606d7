"""An ONNX Runtime GenAI model made dynamic, as a user would script it: calibrate on text to a
compute budget, check the static conversion, and generate with both folders.

    python samples/genai_dynamic.py MODEL_DIR TEXT_FILE WORKDIR [--cut 0.35] [--prompt "..."]

MODEL_DIR is a folder written by the GenAI model builder (genai_config.json, model.onnx,
tokenizer); TEXT_FILE any plain text to calibrate on (tokenized with the model's tokenizer).
WORKDIR gets model.static/ and model.dynamic/, both folders og.Model() loads.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from moe_export.run.calibrate import calibrate_and_convert
from moe_export.model.genai import generate
from moe_export.model.graph import load_model
from moe_export.conversion import Policy, convert_model, routers_metadata
from moe_export.run.validate import validate

ap = argparse.ArgumentParser()
ap.add_argument("model", type=Path)
ap.add_argument("text", type=Path)
ap.add_argument("workdir", type=Path)
ap.add_argument("--cut", type=float, default=0.35, help="fraction of routed (token, expert) pairs to drop")
ap.add_argument("--prompt", default="Permission is hereby granted")
args = ap.parse_args()
args.workdir.mkdir(parents=True, exist_ok=True)

tokenizer = og.Tokenizer(og.Model(str(args.model)))
ids = np.asarray(tokenizer.encode(args.text.read_text()), dtype=np.int64)
seq = 128
calib = args.workdir / "calib.npy"
np.save(calib, ids[: seq * (len(ids) // seq)].reshape(-1, seq)[:16])

static, dynamic = args.workdir / "model.static", args.workdir / "model.dynamic"
for d in (static, dynamic):
    if d.exists():
        raise SystemExit(f"{d} exists; choose an empty WORKDIR")
convert_model(args.model, static, Policy("static"))
report = validate(args.model / "model.onnx", static / "model.onnx")
print("static conversion reproduces the original:", report["static_reproduces"])

k = routers_metadata(load_model(static / "model.onnx"))["routers"][0]["attrs"]["k"]
layers, warnings, _, _ = calibrate_and_convert(args.model, calib, dynamic, target=k * (1 - args.cut))
print(f"calibrated {len(layers)} layers to {k * (1 - args.cut):.2f} experts/token (static: {k})")
for w in warnings:
    print("warning:", w)

prompt = np.asarray(tokenizer.encode(args.prompt), dtype=np.int32)[None]
for name, folder in (("original", args.model), ("dynamic", dynamic)):
    t = time.perf_counter()
    tokens = generate(folder, prompt, max_length=prompt.shape[1] + 64)
    print(f"{name:9s} {time.perf_counter() - t:6.2f} s: {tokenizer.decode(tokens)!r}")
