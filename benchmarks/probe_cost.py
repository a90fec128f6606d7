"""What policy probe costs: the probe's fit at calibration, and what computing the probe adds to
a converted model (its file, its session's load, its forward time), routing unchanged: the
static conversion against the same with the probes attached, on the trained models.

    .venv/bin/python samples/train_moe.py mixtral8 --steps 4000      # and deepseek16
    .venv/bin/python benchmarks/probe_cost.py [--models mixtral8 deepseek16]
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

from moe_export.conversion import Policy, convert, repolicy  # noqa: E402
from moe_export.model.export import export_checkpoint  # noqa: E402
from moe_export.model.graph import load_model  # noqa: E402
from moe_export.model.source import Source  # noqa: E402
from moe_export.run.probe import fit_probes  # noqa: E402
from moe_export.run.runtime import session_from_proto  # noqa: E402
from moe_export.run.stats import static_copy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mixtral8", "deepseek16"])
    ap.add_argument("--calib-seqs", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=60)
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
            probes = fit_probes(static, work, {"input_ids": calib})[0]
            fit_s = time.perf_counter() - t0
            paths = {"static": work / "static.onnx", "static + probe": work / "probe.onnx"}
            convert(original, paths["static"], Policy("static"))
            repolicy(paths["static"], paths["static + probe"], Policy("static", probes=probes))
            sessions, load_ms = {}, {}
            for p, path in paths.items():
                t0 = time.perf_counter()
                sessions[p] = session_from_proto(load_model(path), work)
                load_ms[p] = (time.perf_counter() - t0) * 1e3
            feeds = {"input_ids": ev[:16]}
            times = {p: [] for p in sessions}
            for _ in range(args.rounds):  # interleaved, so the machine's drift hits both alike
                for p, sess in sessions.items():
                    t0 = time.perf_counter()
                    sess.run(None, feeds)
                    times[p].append(time.perf_counter() - t0)
            med = {p: float(np.median(v)) * 1e3 for p, v in times.items()}
            size = {p: sum(f.stat().st_size for f in Source.of(path).files()) for p, path in paths.items()}
            rows.append({"model": name, "calib_tokens": int(calib.size), "probe_fit_s": fit_s, "file_bytes": size,
                         "session_load_ms": load_ms, "forward_ms_16x128": med,
                         "probe_over_static": med["static + probe"] / med["static"]})
            print(f"{name}: probe fit {fit_s:.1f} s on {calib.size} tokens; file {size['static']} -> "
                  f"{size['static + probe']} bytes; forward 16x128: {med['static']:.1f} -> {med['static + probe']:.1f} ms "
                  f"({med['static + probe'] / med['static']:.3f}x)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": date.today().isoformat(), "machine": f"2-core x86-64 build VM, "
                                    f"{platform.processor() or platform.machine()}", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
