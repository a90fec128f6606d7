"""Graphs exported by optimum-onnx (text-generation-with-past, TorchScript exporter; made by
graphs/make_optimum.py under transformers 4.57): converted, they compute what the PyTorch model
that made them computes, static and routed to one expert, and they still generate through the
KV cache."""
import numpy as np
import onnx
import pytest

import moe_export
from helpers import GRAPHS, run_cli
from moe_export.conversion import Policy, convert
from moe_export.run.runtime import greedy, load_inputs

OPTIMUM = sorted((GRAPHS / "optimum").glob("*.onnx"))


def prefill(graph, tmp_path):
    ref = np.load(graph.with_suffix(".npz"))
    np.save(tmp_path / "ids.npy", ref["input_ids"])
    return load_inputs(tmp_path / "ids.npy", onnx.load(str(graph), load_external_data=False)), ref


# optimum has no patcher for DeepSeek-V3's per-expert loop: TorchScript traces the loop over the
# experts its example input happened to hit, so that graph itself differs from the PyTorch model
# (by 0.018 on these logits). Converted static, it reproduces that graph; routed to one expert it
# cannot be the k=1 model.
FAITHFUL = [p for p in OPTIMUM if p.stem != "deepseek_v3"]


def test_the_fixtures_are_there():  # the tests below are parametrized over them
    assert {p.stem for p in OPTIMUM} == {"gpt_oss", "qwen3_moe", "deepseek_v3"}


@pytest.mark.parametrize("graph", OPTIMUM, ids=[p.stem for p in OPTIMUM])
def test_static_reproduces_the_export(graph, tmp_path):
    import onnxruntime as ort
    feeds, _ = prefill(graph, tmp_path)
    convert(graph, tmp_path / "static.onnx", Policy("static"))
    want = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(moe_export.session(str(tmp_path / "static.onnx")).run(["logits"], feeds)[0], want,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("graph", FAITHFUL, ids=[p.stem for p in FAITHFUL])
def test_static_and_one_expert_routing_match_pytorch(graph, tmp_path):
    feeds, ref = prefill(graph, tmp_path)
    for policy, want in ((Policy("static"), ref["logits"]), (Policy("top-p", 1e-6), ref["logits_k1"])):
        out = tmp_path / f"{policy.policy}.onnx"
        convert(graph, out, policy)
        got = moe_export.session(str(out)).run(["logits"], feeds)[0]
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
    assert np.abs(ref["logits"] - ref["logits_k1"]).max() > 1e-3  # one expert is another model


@pytest.mark.parametrize("graph", OPTIMUM, ids=[p.stem for p in OPTIMUM])
def test_validate_feeds_the_cache_consistently_and_generation_goes_on(graph, tmp_path):
    out = tmp_path / "dyn.onnx"
    assert run_cli("convert", graph, "-o", out, "--policy", "top-p", "--threshold", "0.5").returncode == 0
    v = run_cli("validate", graph, out)  # no --dim: past inputs are fed consistently by default
    assert v.returncode == 0, v.stderr
    assert "routed (token, expert) pairs" in v.stdout
    static = tmp_path / "static.onnx"
    convert(graph, static, Policy("static"))
    prompt = np.load(graph.with_suffix(".npz"))["input_ids"][:, :5]
    import onnxruntime as ort
    orig = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(greedy(moe_export.session(str(static)), prompt, 6), greedy(orig, prompt, 6))
    assert greedy(moe_export.session(str(out)), prompt, 6).shape == (2, 11)
