"""What policy probe costs: the probe's fit at calibration, and the forward time of a probe-routed
model against a ratio-routed one cutting as many pairs (the probe adds one router-sized MatMul
per layer), on the trained models.

    .venv/bin/python samples/train_moe.py mixtral8 --steps 4000      # and deepseek16
    .venv/bin/python benchmarks/probe_cost.py [--models mixtral8 deepseek16] [--fraction 0.6]
        # -> benchmarks/results/probe_cost.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, SEQ, slices  # noqa: E402

from moe_export.conversion import Policy, convert  # noqa: E402
from moe_export.conversion.record import Routing  # noqa: E402
from moe_export.model.export import export_checkpoint  # noqa: E402
from moe_export.model.graph import load_model  # noqa: E402
from moe_export.run.calibrate import calibrate  # noqa: E402
from moe_export.run.probe import fit_probes  # noqa: E402
from moe_export.run.runtime import session_from_proto  # noqa: E402
from moe_export.run.stats import static_copy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral8", "deepseek16"])
    ap.add_argument("--fraction", type=float, default=0.6, help="experts per token, as a fraction of k")
    ap.add_argument("--calib-seqs", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "probe_cost.json")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        held = np.load(CACHE / "models" / name / "heldout.npy")
        calib, ev = slices(held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ), args.calib_seqs, 256)
        with tempfile.TemporaryDirectory() as d:
            work = Path(d)
            original = work / "model.onnx"
            export_checkpoint(CACHE / "models" / name, original)
            model = load_model(original)
            static = static_copy(model)
            t0 = time.perf_counter()
            fit_probes(static, work, {"input_ids": calib})
            fit_s = time.perf_counter() - t0
            k = Routing.read(static).routers[0].k
            paths, means = {}, {}
            for policy in ("ratio", "probe"):
                layers = calibrate(model, {"input_ids": calib}, args.fraction * k, policy, base_dir=work)
                probes = {x["layer"]: x.pop("probe") for x in layers if "probe" in x} or None
                paths[policy] = work / f"{policy}.onnx"
                convert(original, paths[policy], Policy(policy, layers[0]["threshold"],
                                                        per_layer={x["layer"]: x["threshold"] for x in layers},
                                                        probes=probes))
                means[policy] = float(np.mean([x["mean_experts"] for x in layers]))
            sessions = {p: session_from_proto(load_model(path), work) for p, path in paths.items()}
            feeds = {"input_ids": ev[:16]}
            times = {p: [] for p in sessions}
            for _ in range(args.rounds):  # interleaved, so the machine's drift hits both alike
                for p, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    times[p].append(time.perf_counter() - t0)
            med = {p: float(np.median(v)) * 1e3 for p, v in times.items()}
            rows.append({"model": name, "k": k, "calib_tokens": int(calib.size), "probe_fit_s": fit_s,
                         "mean_experts": means, "forward_ms_16x128": med, "probe_over_ratio": med["probe"] / med["ratio"]})
            print(f"{name}: probe fit {fit_s:.1f} s on {calib.size} tokens; forward 16x128: ratio {med['ratio']:.1f} ms, "
                  f"probe {med['probe']:.1f} ms ({med['probe'] / med['ratio']:.3f}x) at {means}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": date.today().isoformat(), "machine": f"2-core x86-64 build VM, "
                                    f"{platform.processor() or platform.machine()}", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
