import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT / "graphs"
FAMILY_GRAPHS = sorted(p for p in GRAPHS.glob("*.onnx") if not p.name.startswith("gate_"))
GATE_GRAPHS = sorted(GRAPHS.glob("gate_*.onnx"))
ALL_GRAPHS = FAMILY_GRAPHS + GATE_GRAPHS

_DT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


def router_model(attrs, dtype=TensorProto.FLOAT, bias=False, rank=2):
    """A graph holding one DynamicRouter node (logits [, bias] -> weights, indices).
    bfloat16 is fed and fetched as float32 through Cast nodes (numpy has no bfloat16 that
    onnxruntime's Python binding accepts)."""
    E = attrs["num_experts"]
    dims = ["n", E] if rank == 2 else ["b", "s", E][-rank:]
    io = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    ins = [helper.make_tensor_value_info("logits", io, dims)]
    if bias:
        ins.append(helper.make_tensor_value_info("bias", io, [E]))
    nodes, names = [], [i.name for i in ins]
    if io != dtype:
        nodes = [helper.make_node("Cast", [n], [n + "_c"], to=dtype) for n in names]
        names = [n + "_c" for n in names]
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
    import moe_export

    return moe_export.session(model, **opts)


def run_cli(*args, cwd=None):
    """Runs the installed `moe-export` command as a user would."""
    exe = Path(sys.executable).parent / "moe-export"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def input_feeds(path, tokens=16, seed=0):
    from moe_export.runtime import make_feeds
    return make_feeds(onnx.load(str(path), load_external_data=False), dims={}, seed=seed, tokens=tokens)


@pytest.fixture(scope="session")
def ort_ref():
    import onnxruntime as ort

    def run(path, feeds):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    return run


def assert_top1_is_the_k1_model(family, tmp_path, **k1):
    """Top-p with a tiny threshold keeps one expert per token: the converted reference graph of
    `family` computes what the same PyTorch model (same seed, same weights) computes with the
    config overrides `k1` that make it route to one expert, and not what the k-expert model does."""
    import sys

    import torch

    from moe_export.export import load_checkpoint
    from moe_export.rewrite import Policy, convert

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
