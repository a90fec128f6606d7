"""How much a stand-in fitted on the calibration text under-states a drop's cost on that text:
the reason the budget search's check cross-fits the stand-ins, probes and thresholds (budget.py).

    .venv/bin/python samples/train_moe.py deepseek16 --steps 4000    # and mixtral8, gptoss16
    .venv/bin/python benchmarks/fit_leak.py [--models deepseek16] [--fraction 0.55]
        # -> benchmarks/results/fit_leak.json

quality.py's 96 calibration windows (in the order of the text they come from) are split in
halves A and B, two ways: alternate windows, and the first and the second 48 (a file's windows
then fall in one half). A rank-4 stand-in is fitted on each half (run/stand_in.py, the read-out
of the converted graph), and one uniform routing (top-p, every layer at `fraction` of k, the
thresholds solved on all 96, renormalize 0) is run with each: on the half the stand-in was
fitted on, on the other half, and on the 256 evaluation windows. Without a stand-in, at
renormalize 0 and 1, for reference.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, SEQ, slices  # noqa: E402

from moe_export.conversion.record import Routing  # noqa: E402
from moe_export.conversion.stand_in import attach_stand_ins  # noqa: E402
from moe_export.model.export import export_checkpoint  # noqa: E402
from moe_export.model.graph import load_model  # noqa: E402
from moe_export.run.budget import Evaluator, _thresholds  # noqa: E402
from moe_export.run.probe import fit_probes  # noqa: E402
from moe_export.run.runtime import take_rows  # noqa: E402
from moe_export.run.stats import router_logits, static_copy  # noqa: E402


def measure(name, fraction, work):
    ckpt = CACHE / "models" / name
    held = np.load(ckpt / "heldout.npy")
    calib, ev = slices(held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ), 96, 256)
    export_checkpoint(ckpt, work / f"{name}.onnx")
    m = static_copy(load_model(work / f"{name}.onnx"))
    feeds = {"input_ids": np.concatenate([calib, ev])}
    routing = {}
    for r, (lg, b, sz) in zip(Routing.read(m).routers, router_logits(m, work, take_rows(m, feeds, np.arange(96)))):
        routing[r.layer] = ("top-p", dict(_thresholds(r, "top-p", lg, b, 1, None, sz))[fraction], 0.0)
    every, out = np.arange(len(feeds["input_ids"])), {}

    def increases(g, parts, rn=0.0):
        e = Evaluator(g, work, feeds)
        d = e.run({l: (p, t, rn) for l, (p, t, _) in routing.items()}, every)[0] - e.run({}, every)[0]
        return {part: float(np.expm1(d[rows].mean())) for part, rows in parts.items()}
    evaluation = np.arange(96, 96 + len(ev))
    for split, (A, B) in {"alternate": (np.arange(0, 96, 2), np.arange(1, 96, 2)),
                          "first and second 48": (np.arange(48), np.arange(48, 96))}.items():
        parts, got = {"A": A, "B": B, "eval": evaluation}, {}
        for half, (_, stand_ins) in zip("AB", fit_probes(m, work, feeds, False, 4, [A, B])):
            g = static_copy(m)
            attach_stand_ins(g, stand_ins)
            got[half] = increases(g, parts)
        out[split] = {"stand-in fitted on A": got["A"], "stand-in fitted on B": got["B"],
                      "on its own half": (got["A"]["A"] + got["B"]["B"]) / 2,
                      "on the other half": (got["A"]["B"] + got["B"]["A"]) / 2,
                      "on the evaluation windows": (got["A"]["eval"] + got["B"]["eval"]) / 2}
    for rn in (0.0, 1.0):
        out[f"no stand-in, renormalize {rn:g}"] = increases(m, {"calibration": np.arange(96), "eval": evaluation}, rn)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deepseek16"])
    ap.add_argument("--fraction", type=float, default=0.55, help="every layer at this fraction of k")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fit_leak.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        got = {m: measure(m, args.fraction, Path(d)) for m in args.models}
    for m, rows in got.items():
        for k, v in rows.items():
            print(m, k, json.dumps(v))
    args.out.write_text(json.dumps({"date": date.today().isoformat(), "machine": f"{platform.machine()} build VM",
                                    "fraction": args.fraction, "models": got}, indent=1))


if __name__ == "__main__":
    main()
