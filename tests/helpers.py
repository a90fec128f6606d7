"""What the tests share: the reference graphs, running the installed command, tiny graphs for the
gate rules (G), graphs of one DynamicRouter node, and the benchmark scripts whose public
functions some tests run (benchmarks/ is not a package)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import moe_export
from moe_export.conversion import Policy, rewrite_model
from moe_export.rules.base import explain
from moe_export.run.validate import TOLERANCE, computes_in_half

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "graphs"
FAMILY_GRAPHS = sorted(p for p in GRAPHS.glob("*.onnx") if not p.name.startswith("gate_"))
GATE_GRAPHS = sorted(GRAPHS.glob("gate_*.onnx"))
ALL_GRAPHS = FAMILY_GRAPHS + GATE_GRAPHS

_DT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def router_model(attrs, dtype=TensorProto.FLOAT, bias=False, rank=2, sizes=False):
    """A graph holding one DynamicRouter node (logits [, bias] [, sizes] -> weights, indices;
    sizes without bias leaves input 1 empty). bfloat16 is fed and fetched as float32 through Cast
    nodes (numpy has no bfloat16 that onnxruntime's Python binding accepts)."""
    E = attrs["num_experts"]
    dims = ["n", E] if rank == 2 else ["b", "s", E][-rank:]
    io = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    ins = [helper.make_tensor_value_info("logits", io, dims)]
    if bias:
        ins.append(helper.make_tensor_value_info("bias", io, [E]))
    if sizes:
        ins.append(helper.make_tensor_value_info("sizes", io, dims))
    nodes, names = [], [i.name for i in ins]
    if io != dtype:
        nodes = [helper.make_node("Cast", [n], [n + "_c"], to=dtype) for n in names]
        names = [n + "_c" for n in names]
    if sizes and not bias:
        names.insert(1, "")
    w = "weights" if io == dtype else "weights_c"
    nodes.append(helper.make_node("DynamicRouter", names, [w, "indices"], domain="moe_export", **attrs))
    if io != dtype:
        nodes.append(helper.make_node("Cast", [w], ["weights"], to=io))
    outs = [helper.make_tensor_value_info("weights", io, None), helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    m = helper.make_model(helper.make_graph(nodes, "router", ins, outs),
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moe_export", 1)])
    m.ir_version = 9
    return m


def session_of(model, **opts):
    return moe_export.session(model, **opts)


def run_cli(*args, cwd=None):
    """Runs the installed `moe-export` command as a user would."""
    exe = Path(sys.executable).parent / "moe-export"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def input_feeds(path, tokens=16, seed=0):
    from moe_export.run.runtime import make_feeds
    return make_feeds(onnx.load(str(path), load_external_data=False), dims={}, seed=seed, tokens=tokens)


def assert_top1_is_the_k1_model(family, tmp_path, **k1):
    """Top-p with a tiny threshold keeps one expert per token: the converted reference graph of
    `family` computes what the same PyTorch model (same seed, same weights) computes with the
    config overrides `k1` that make it route to one expert, and not what the k-expert model does."""
    import sys

    import torch

    from moe_export.conversion import convert
    from moe_export.model.export import load_checkpoint

    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    out = tmp_path / "top1.onnx"
    convert(GRAPHS / f"{family}.onnx", out, Policy("top-p", 1e-6))
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    got = session_of(out).run(None, {"input_ids": ids})[0]
    tiny_model(family, **k1).save_pretrained(tmp_path / "k1")
    model = load_checkpoint(tmp_path / "k1")  # as moe-export export loads it (batched experts)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        k = tiny_model(family)(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert np.abs(got - k).max() > 1e-3


def benchmark(name):
    """The module benchmarks/NAME.py, for a test that runs what the benchmark measures."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- tiny gate graphs for the rule tests -------------------------------------------------------
E, K = 8, 2


class G:
    """A tiny graph: logits [n, E] in, weights and indices out."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype=np.int64):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, **kw):
        self.n += 1
        outs = [f"{op_type.lower()}{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}{self.n}", **kw))
        return outs if n_out > 1 else outs[0]

    def cast(self, x, to):
        return self.op("Cast", [x], to=to)

    def topk(self, x, k=K, **kw):
        return self.op("TopK", [x, self.const([k])], n_out=2, axis=-1, **kw)

    def model(self, weights, indices, extra_inputs=()):
        g = helper.make_graph(self.nodes, "gate", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", E]),
                                                   *extra_inputs],
                              [helper.make_tensor_value_info(weights, TensorProto.FLOAT, None),
                               helper.make_tensor_value_info(indices, TensorProto.INT64, None)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 9
        return m


def normalize(g, w, eps=None, guard="Add"):
    """x / sum(x), the sum guarded against 0 by `guard` (Add eps, Clip(min=eps), Max(eps))."""
    s = g.op("ReduceSum", [w, g.const([-1])], keepdims=1)
    if eps is not None:
        s = g.op(guard, [s, g.const(eps, np.float32)])
    return g.op("Div", [w, s])


def only_row(m):
    rows = explain(m)
    return rows[-1]  # the TopK that selects experts is the last one (groups come first)


def check_parity(m, tmp_path):
    """The rewritten graph, static, reproduces the original in ONNX Runtime."""
    import onnxruntime as ort

    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    conv = onnx.ModelProto()
    conv.CopyFrom(m)
    rewrite_model(conv, Policy("static"))
    x = np.random.default_rng(0).standard_normal((64, E)).astype(np.float32)
    (w0, i0), (w1, i1) = ref.run(None, {"logits": x}), moe_export.session(conv).run(None, {"logits": x})
    o0, o1 = np.argsort(i0, -1), np.argsort(i1, -1)  # slot order may be unspecified (sorted=0)
    np.testing.assert_array_equal(np.take_along_axis(i0, o0, -1), np.take_along_axis(i1, o1, -1))
    # A graph that rounds scores through float16 differs from the router by that rounding.
    atol, rtol = TOLERANCE["half"] if computes_in_half(m) else (1e-6, 1e-6)
    np.testing.assert_allclose(np.take_along_axis(w1, o1, -1), np.take_along_axis(w0, o0, -1), atol=atol, rtol=rtol)
