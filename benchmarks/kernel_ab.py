"""Two builds of the DynamicRouter ORT library on the same converted gates, runs alternating in
one process: for reviewing a change to the kernel or its attribute handling.

    .venv/bin/python benchmarks/kernel_ab.py --before OLD/libmoe_export_ort.so [--after LIB] [--repeats 60]

--after defaults to the installed library. Build the other from any commit with
`cmake -S plugins -B /tmp/old -DMOE_EXPORT_CUDA=OFF && cmake --build /tmp/old` in a checkout of it.
Outputs are asserted identical; medians and after/before per gate are printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import moe_export
from kernel_cpu import GATES, gate_graph, time_run
from moe_export.conversion import Policy, convert


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    libs = {"before": str(args.before), "after": str(args.after or moe_export.custom_op_library())}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for gate in GATES:
            for E, k in ((8, 2), (64, 8), (256, 8)):
                g, c = Path(d) / f"{gate}{E}.onnx", Path(d) / f"{gate}{E}.dyn.onnx"
                gate_graph(E, k, g, gate)
                convert(g, c, Policy("static"))
                sess = {}
                for name, lib in libs.items():
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = 1
                    so.register_custom_ops_library(lib)
                    sess[name] = ort.InferenceSession(str(c), so, providers=["CPUExecutionProvider"])
                feeds = {"logits": rng.standard_normal((args.tokens, E)).astype(np.float32) * 2}
                a, b = sess["before"].run(None, feeds), sess["after"].run(None, feeds)
                assert all(np.array_equal(x, y) for x, y in zip(a, b)), "the two builds route differently"
                t = {n: [] for n in sess}
                for _ in range(args.repeats):
                    for n in sess:
                        t[n].append(time_run(sess[n], feeds))
                m = {n: statistics.median(v) * 1e3 for n, v in t.items()}
                print(f"{gate:18s} E={E:3d} k={k}: before {m['before']:.3f} ms, after {m['after']:.3f} ms, "
                      f"after/before {m['after'] / m['before']:.3f}")


if __name__ == "__main__":
    main()
