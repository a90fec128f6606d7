"""convert --per-expert-weights: each regrouped expert's MatMuls read an initializer of their own,
so weight-only quantizers (ONNX Runtime's MatMulNBitsQuantizer) quantize the experts."""
import hashlib

import numpy as np
import onnx
import pytest

import moe_export
from helpers import GRAPHS, run_cli


def quantized_experts(path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
    q.process()
    m = q.model.model
    return m, sum(n.op_type == "MatMulNBits" and n.name.startswith("moe_export/experts") for n in m.graph.node)


@pytest.fixture(scope="module")
def exported(exported):
    return exported("mixtral")


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_experts_become_quantizable_and_stay_exact(exported, tmp_path):
    plain, own = tmp_path / "plain.onnx", tmp_path / "own.onnx"
    before = digest(exported.parent)
    assert run_cli("convert", exported, "-o", plain).returncode == 0
    r = run_cli("convert", exported, "-o", own, "--per-expert-weights")
    assert r.returncode == 0 and "own.onnx.experts.data" in r.stdout, r.stderr
    assert digest(exported.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.onnx", "own.onnx.experts.data", "plain.onnx",
                                                         "plain.onnx.data"]
    rep = run_cli("validate", exported, own, "--json")
    assert rep.returncode == 0 and '"static_reproduces": true' in rep.stdout
    assert quantized_experts(plain)[1] == 0
    qm, n = quantized_experts(own)
    assert n == 2 * 8 * 2  # 2 layers x 8 experts x (gate_up, down)
    ids = np.random.default_rng(0).integers(0, 128, (2, 16))
    fp32 = moe_export.session(own).run(None, {"input_ids": ids})[0]
    int4 = moe_export.session(qm).run(None, {"input_ids": ids})[0]
    assert np.abs(int4 - fp32).max() < 0.25 * np.abs(fp32).max()  # 4-bit weights: close, not equal


def test_dynamic_policy_with_own_weights_equals_shared_ones(exported, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out, extra in ((a, []), (b, ["--per-expert-weights"])):
        assert run_cli("convert", exported, "-o", out, "--policy", "top-p", "--threshold", "0.5", *extra).returncode == 0
    ids = np.random.default_rng(1).integers(0, 128, (3, 12))
    # the same routing and weights; the GEMMs differ (a one-row expert is a matrix-vector product
    # in the default form), so sums differ in their last bits only
    np.testing.assert_allclose(moe_export.session(a).run(None, {"input_ids": ids})[0],
                               moe_export.session(b).run(None, {"input_ids": ids})[0], rtol=1e-5, atol=1e-6)


def test_embedded_weights_are_sliced_in_memory(tmp_path):
    out = tmp_path / "q.onnx"
    r = run_cli("convert", GRAPHS / "qwen3_moe.onnx", "-o", out, "--per-expert-weights")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "q.onnx.experts.data").exists() or (tmp_path / "q.onnx.experts.data").stat().st_size
    assert quantized_experts(out)[1] > 0
    rep = run_cli("validate", GRAPHS / "qwen3_moe.onnx", out, "--json")
    assert '"static_reproduces": true' in rep.stdout


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_own_weights_give_the_default_forms_outputs(family, tmp_path):
    """Every batched family graph with a table read by more than its MatMul (GPT-OSS's expert
    biases are added after the GEMMs) converts both ways, to the same outputs."""
    from helpers import input_feeds
    from moe_export.conversion import Policy, convert

    graph = GRAPHS / f"{family}.onnx"
    feeds = input_feeds(graph, tokens=12)
    outs = []
    for name, own in (("shared", False), ("own", True)):
        convert(graph, tmp_path / f"{name}.onnx", Policy("top-p", 0.5), per_expert_weights=own)
        outs.append(moe_export.session(tmp_path / f"{name}.onnx").run(None, feeds)[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_needs_regrouping(exported, tmp_path):
    r = run_cli("convert", exported, "-o", tmp_path / "x.onnx", "--per-expert-weights", "--no-group-experts")
    assert r.returncode == 2 and "--no-group-experts" in r.stderr and not (tmp_path / "x.onnx").exists()
