"""The budget search against the number of calibration sequences, on a trained model.

    .venv/bin/python samples/train_moe.py gptoss16 --steps 4000
    .venv/bin/python benchmarks/budget_calib_size.py [--model gptoss16] [--sizes 20 30 60 96] [--budget 0.01]
        # -> benchmarks/results/budget_calib_size.json

For each size n: `calibrate --max-ppl-increase B` (top-p and ratio) on n calibration windows of
quality.py's slices, and `--target-experts` at 0.65 k per layer on the same windows; every
figure is measured on the same 200 evaluation windows (quality.py's, held out from the search).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, SEQ, evaluate, slices  # noqa: E402

from moe_export.run.budget import BudgetSearch, budget_policy  # noqa: E402
from moe_export.run.calibrate import calibrate  # noqa: E402
from moe_export.model.export import export_checkpoint  # noqa: E402
from moe_export.model.graph import load_model  # noqa: E402
from moe_export.conversion import Policy, convert  # noqa: E402
from moe_export.run.validate import routing_indices  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gptoss16")
    ap.add_argument("--sizes", nargs="+", type=int, default=[20, 30, 60, 96])
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--eval-seqs", type=int, default=200)
    ap.add_argument("--check", choices=("crossfit", "heldout"), default="crossfit",
                    help="the search's check (calibrate --check; until 2026-12-07 the held-out one alone)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "budget_calib_size.json")
    args = ap.parse_args()
    ckpt = CACHE / "models" / args.model
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"{ckpt} missing: run samples/train_moe.py {args.model} first")
    held = np.load(ckpt / "heldout.npy")
    seqs = held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original = work / "model.onnx"
        export_checkpoint(ckpt, original)
        model, k = load_model(original), routing_indices(load_model(original))[1][0]["k"]
        for n in args.sizes:
            calib, ev = slices(seqs, n, args.eval_seqs)
            base = evaluate(original, ev)

            def measure(what, policy):
                out = work / "out.onnx"
                convert(original, out, policy)
                r = evaluate(out, ev)
                row = {"calib_seqs": n, "method": what, "pair_reduction": 1 - r["pair_fraction"],
                       "ppl_increase": r["ppl"] / base["ppl"] - 1}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for p in ("top-p", "ratio"):
                measure(f"budget {p} +{100 * args.budget:g}%",
                        budget_policy(BudgetSearch(model, work, {"input_ids": calib}, p, check=args.check).run(args.budget)))
            layers = calibrate(original, {"input_ids": calib}, 0.65 * k, policy="top-p", mode="per-layer")
            measure(f"target top-p {0.65 * k:g} experts",
                    Policy("top-p", layers[0]["threshold"], per_layer={x["layer"]: x["threshold"] for x in layers}))
    args.out.write_text(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "benchmarks/budget_calib_size.py " + " ".join(sys.argv[1:]), "model": args.model,
        "budget": args.budget, "eval_seqs": args.eval_seqs, "check": args.check, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
