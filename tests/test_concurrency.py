"""The kernel under concurrency: 8 threads sharing sessions, 1000 runs each."""
import threading

import numpy as np

import moe_export
from helpers import GATE_GRAPHS
from moe_export.conversion import Policy, convert


def test_eight_threads_share_sessions(tmp_path):
    graph = next(p for p in GATE_GRAPHS if "softmax_topk_e64k8" in p.name)
    out = tmp_path / "g.onnx"
    convert(graph, out, Policy("top-p", 0.5))
    shared = moe_export.session(out, intra_op_num_threads=2)
    rng = np.random.default_rng(0)
    # Inputs of several sizes, so some runs use the intra-op thread pool and some do not.
    inputs = [rng.standard_normal((n, 64)).astype(np.float32) * 2 for n in (1, 17, 300, 5000)]
    expected = [moe_export.session(out, intra_op_num_threads=1).run(None, {"logits": x}) for x in inputs]
    errors = []

    def worker(tid):
        own = moe_export.session(out) if tid % 2 else shared  # shared and per-thread sessions at once
        try:
            for j in range(1000):
                k = (tid + j) % len(inputs)
                w, i = own.run(None, {"logits": inputs[k]})
                if not (np.array_equal(i, expected[k][1]) and np.array_equal(w, expected[k][0])):
                    errors.append((tid, j))
                    return
        except Exception as e:  # surfaced below with the thread that hit it
            errors.append((tid, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
