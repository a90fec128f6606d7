"""Which way round the regrouped section's Gemm reads an expert's matrix, by rows: the matrix as
the left operand, (W x^T)^T, or as the right one, x W^T. Neither is a constant (a Scan slice), so
onnxruntime packs nothing at load; what differs is how MLAS runs the product.

    .venv/bin/python benchmarks/gemm_orientation.py [--threads 1 2] [--rows 1 2 3 4 8]

One 2048 x 1536 fp32 matrix per call (Qwen3-30B-A3B's gate/up projection), 16 different ones in
turn so none stays in cache; medians of 5 rounds, both forms alternating. Prints ms per call.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

A, B = 1536, 2048


def model(left: bool) -> bytes:
    if left:
        nodes = [helper.make_node("Gemm", ["W", "x", "zero"], ["g"], transB=1),
                 helper.make_node("Transpose", ["g"], ["y"], perm=[1, 0])]
    else:
        nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "orientation",
        [helper.make_tensor_value_info("W", TensorProto.FLOAT, [A, B]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", B])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")] if left else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((A, B), dtype=np.float32) for _ in range(16)]
    for threads in args.threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(model(name == "left"), so, providers=["CPUExecutionProvider"])
                    for name in ("left", "right")}
        for n in args.rows:
            x = rng.standard_normal((n, B), dtype=np.float32)
            times = {name: [] for name in sessions}
            for _ in range(5):
                for name, sess in sessions.items():
                    t = time.perf_counter()
                    for w in mats:
                        sess.run(None, {"W": w, "x": x})
                    times[name].append((time.perf_counter() - t) / len(mats) * 1e3)
            med = {name: sorted(v)[2] for name, v in times.items()}
            print(f"threads {threads} rows {n}: left {med['left']:.3f} ms, right {med['right']:.3f} ms")


if __name__ == "__main__":
    main()
