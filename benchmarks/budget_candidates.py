"""What the budget search's check says of each uniform routing on a trained model's calibration
windows: why the search returns what it returns.

    .venv/bin/python samples/train_moe.py deepseek16 --steps 4000
    .venv/bin/python benchmarks/budget_candidates.py --model deepseek16 [--budget 0.01]
        # -> benchmarks/results/budget_candidates_deepseek16.json

The search (policy auto) on quality.py's 96 calibration windows, then, for every uniform routing
(every layer at one fraction of k, one policy, one renormalize value), its increase on the
fitting sequences and on the checked ones (`--check`: cross-fitted, or the held-out part), the
bound the check uses (+0.5 standard errors) and whether it passes, beside the routing the search
returned. (Until 2026-12-07 the search had the held-out check alone: `--check heldout`.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, SEQ, slices  # noqa: E402

from moe_export.model.export import export_checkpoint
from moe_export.model.graph import load_model
from moe_export.run.budget import BudgetSearch, _upper

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek16")
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--calib-seqs", type=int, default=96)
    ap.add_argument("--check", choices=("crossfit", "heldout"), default="crossfit")
    a = ap.parse_args()
    ckpt = CACHE / "models" / a.model
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"{ckpt} missing: run samples/train_moe.py {a.model} first")
    held = np.load(ckpt / "heldout.npy")
    calib, _ = slices(held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ), a.calib_seqs, 256)
    with tempfile.TemporaryDirectory() as d:
        export_checkpoint(ckpt, Path(d) / "model.onnx")
        search = BudgetSearch(load_model(Path(d) / "model.onnx"), Path(d), {"input_ids": calib}, "auto",
                              check=a.check)
        report = search.run(a.budget)
        budget, fit_rows = math.log1p(a.budget), search.fit
        rows = []
        for (policy, fraction, renormalize), routing in sorted(search.uniform.items()):
            passes, d, pairs, seen, _ = search._judge(routing, budget, 0.5)
            rows.append(dict(policy=policy, fraction_of_k=fraction, renormalize=renormalize,
                             pair_reduction=float(1 - pairs[fit_rows].sum() / search.base_pairs[fit_rows].sum()),
                             fit_increase=math.expm1(d[fit_rows].mean()), heldout_increase=math.expm1(seen.mean()),
                             heldout_upper=math.expm1(_upper(seen, 0.5)), passes=bool(passes)))
            r = rows[-1]
            print(f"{policy:8s} {fraction:.2f} of k, renormalize {renormalize:g}: pairs -{100 * r['pair_reduction']:.1f}%, "
                  f"fitting {100 * r['fit_increase']:+.2f}%, checked {100 * r['heldout_increase']:+.2f}% "
                  f"(bound {100 * r['heldout_upper']:+.2f}%){'  passes' if r['passes'] else ''}")
    chosen = dict(pair_reduction=report["fit"]["pair_reduction"], fit_increase=report["fit"]["ppl_increase"],
                  heldout_increase=report["heldout"]["ppl_increase"], routing=report["routing"])
    print("the search returns: pairs -{:.1f}% (fitting part)".format(100 * chosen["pair_reduction"]))
    out = ROOT / "benchmarks" / "results" / f"budget_candidates_{a.model}.json"
    out.write_text(json.dumps(dict(date=str(date.today()), model=a.model, budget=a.budget, calib_seqs=a.calib_seqs,
                                   check=a.check,
                                   chosen=chosen, uniform=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
