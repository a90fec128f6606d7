"""How much of a dropped expert's weight the kept ones should take (`--renormalize`), measured
through the converted ONNX graphs of the trained models (samples/train_moe.py) in ONNX Runtime:
one ratio threshold for every layer, renormalize 1 (the model configured with fewer experts),
0.5 and 0 (the kept keep their static weights), same routing decisions, perplexity on the
evaluation sequences of benchmarks/quality.py.

    .venv/bin/python benchmarks/renormalize.py [--models mixtral8 deepseek16] [--thresholds 0.25 0.35 0.5 0.7]

Writes benchmarks/results/renormalize.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

from quality import CACHE, HERE, SEQ, evaluate, slices
from moe_export.model.export import export_checkpoint
from moe_export.conversion import Policy, convert

RENORMALIZE = (1.0, 0.5, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral8", "deepseek16"])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.25, 0.35, 0.5, 0.7])
    ap.add_argument("--eval-seqs", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=96, help="skipped, as benchmarks/quality.py does")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "renormalize.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            ckpt = CACHE / "models" / name
            if not (ckpt / "config.json").is_file():
                raise SystemExit(f"{ckpt} missing: run samples/train_moe.py {name} first")
            held = np.load(ckpt / "heldout.npy")
            _, ev = slices(held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ), args.calib_seqs, args.eval_seqs)
            original = Path(d) / f"{name}.onnx"
            export_checkpoint(ckpt, original)
            base = evaluate(original, ev)["ppl"]
            for t in args.thresholds:
                for r in RENORMALIZE:
                    out = Path(d) / f"{name}.{t}.{r}.onnx"
                    convert(original, out, Policy("ratio", t, renormalize=r))
                    got = evaluate(out, ev)
                    rows.append({"model": name, "threshold": t, "renormalize": r,
                                 "pair_reduction": 1 - got["pair_fraction"], "ppl_increase": got["ppl"] / base - 1})
                    print(f"{name} ratio {t} renormalize {r:g}: pairs -{100 * rows[-1]['pair_reduction']:.1f}%, "
                          f"ppl +{100 * rows[-1]['ppl_increase']:.2f}%", flush=True)
    args.out.write_text(json.dumps({"date": date.today().isoformat(), "machine": "2-core x86-64 build VM",
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
