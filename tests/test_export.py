"""`moe-export export` on a real checkpoint, then conversion with external weights."""
import hashlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import moe_export
from helpers import GRAPHS, run_cli

sys.path.insert(0, str(GRAPHS))  # make_graphs: the families' tiny configs

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def exported(exported):
    return exported("qwen3_moe")


def test_export_writes_external_data_and_dynamic_axes(exported):
    m = onnx.load(str(exported), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert (exported.parent / "model.onnx.data").is_file()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims), "batch and sequence axes must be dynamic"
    r = run_cli("inspect", exported)
    assert r.returncode == 0 and "2 MoE layer(s)" in r.stdout and "E=16 k=4" in r.stdout


def test_convert_to_another_directory_keeps_weights_valid(exported, tmp_path):
    data = exported.parent / "model.onnx.data"
    before = hashlib.sha256(data.read_bytes()).hexdigest()
    out = tmp_path / "sub" / "model.dynamic.onnx"
    out.parent.mkdir()
    r = run_cli("convert", exported, "-o", out, "--policy", "static")
    assert r.returncode == 0, r.stderr
    # Copied (never hard-linked) into one data file named after the output.
    copied = out.parent / "model.dynamic.onnx.data"
    assert copied.is_file() and copied.stat().st_nlink == 1 and data.stat().st_nlink == 1
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == before
    assert hashlib.sha256(data.read_bytes()).hexdigest() == before
    ref = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    conv = moe_export.session(out)
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (2, 7), (3, 33)]:
        ids = rng.integers(0, 128, (batch, seq)).astype(np.int64)
        np.testing.assert_allclose(conv.run(None, {"input_ids": ids})[0], ref.run(None, {"input_ids": ids})[0],
                                   atol=1e-4, rtol=1e-4)


def test_convert_in_same_directory_shares_the_weights(exported):
    out = exported.parent / "model.top-p.onnx"
    r = run_cli("convert", exported, "-o", out, "--policy", "top-p", "--threshold", "0.3")
    assert r.returncode == 0, r.stderr
    m = onnx.load(str(out), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"model.onnx.data"}
    ids = np.random.default_rng(1).integers(0, 128, (2, 16)).astype(np.int64)
    assert np.isfinite(moe_export.session(out).run(None, {"input_ids": ids})[0]).all()


COMPLEX_ROTARY = {  # families whose rotary multiplies complex numbers, which ONNX cannot hold
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, num_key_value_heads=4),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=64,
                        head_dim=8, interleave_moe_layer_step=1),
}


@pytest.mark.parametrize("family", sorted(COMPLEX_ROTARY))
def test_complex_rotary_families_export(family, tmp_path):
    """Exported with a real-valued rotary (the same numbers): ONNX logits equal PyTorch's."""
    import torch
    import transformers as tf

    from make_graphs import COMMON

    cfg = tf.AutoConfig.for_model(family, **(COMMON | COMPLEX_ROTARY[family]))
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    r = run_cli("export", tmp_path / "ckpt", "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    from moe_export.model.export import load_checkpoint
    model = load_checkpoint(tmp_path / "ckpt")
    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as dsv2  # patched only while exporting
    assert dsv2.apply_rotary_emb.__module__ == dsv2.__name__
    if family == "deepseek_v2":
        assert run_cli("convert", tmp_path / "m.onnx", "-o", tmp_path / "c.onnx").returncode == 0
        v = run_cli("validate", tmp_path / "m.onnx", tmp_path / "c.onnx")
        assert v.returncode == 0 and "reproduces the original: yes" in v.stdout


def test_a_sequence_axis_the_exporter_fixes_is_an_error_not_a_graph(tmp_path):
    """Qwen3-Next's chunked linear attention pads the sequence to 64-token chunks; torch.export
    cannot keep that axis dynamic and torch.onnx silently captures the example length instead. A
    graph that runs at 8 tokens only is not what `export` promises: one line, nothing written."""
    import torch
    import transformers as tf

    from make_graphs import COMMON

    cfg = tf.AutoConfig.for_model("qwen3_next", **(COMMON | dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])))
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    r = run_cli("export", tmp_path / "ckpt", "-o", tmp_path / "m.onnx")
    assert r.returncode == 1
    assert "could not keep input_ids axis 1 (= 8) dynamic" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
