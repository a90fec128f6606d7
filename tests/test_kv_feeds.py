"""validate feeds decoder graphs with a KV cache consistently by default: past inputs, the mask
over past + new tokens, and positions that continue the prefix."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run_cli
from moe_export.run.runtime import make_feeds

H, E, HEADS, D, VOCAB, POS = 8, 8, 2, 4, 64, 64


def kv_graph(path):
    """An optimum-style decoder layer: the router over token + position embeddings, and a KV
    concat whose length must equal the attention mask's ("past_sequence_length + sequence_length")."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("tok", (VOCAB, H)), ("pos", (POS, H)), ("router", (H, E)))]
    inits += [numpy_helper.from_array(np.asarray(v, dtype=np.int64), n) for n, v in
              (("k", [2]), ("heads", [0, 0, HEADS, D]), ("sum_axes", [1, 3]), ("last", [-1]))]
    n = helper.make_node
    nodes = [
        n("Gather", ["tok", "input_ids"], ["t"]), n("Gather", ["pos", "position_ids"], ["p"]),
        n("Add", ["t", "p"], ["x"]), n("MatMul", ["x", "router"], ["logits"]),
        n("Softmax", ["logits"], ["probs"], axis=-1), n("TopK", ["probs", "k"], ["w", "ids"], axis=-1),
        n("ReduceSum", ["w", "last"], ["s"], keepdims=1), n("Div", ["w", "s"], ["weights"]),
        n("Reshape", ["x", "heads"], ["x4"]), n("Transpose", ["x4"], ["new_key"], perm=[0, 2, 1, 3]),
        n("Concat", ["past_key_values.0.key", "new_key"], ["present.0.key"], axis=2),
        n("ReduceSum", ["present.0.key", "sum_axes"], ["per_position"], keepdims=0),
        n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("Mul", ["per_position", "mask_f"], ["masked"]),
    ]
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                         ["batch_size", "past_sequence_length + sequence_length"]),
           helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
           helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                         ["batch_size", HEADS, "past_sequence_length", D])]
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("weights", "masked", "present.0.key")]
    m = helper.make_model(helper.make_graph(nodes, "decoder", ins, outs, inits),
                          opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, str(path))
    return m


def test_feeds_are_consistent(tmp_path):
    m = kv_graph(tmp_path / "m.onnx")
    f = make_feeds(m, tokens=6, batch=3)
    past = f["past_key_values.0.key"].shape[2]
    assert f["input_ids"].shape == (3, 6) and past == 3
    assert f["attention_mask"].shape == (3, past + 6) and (f["attention_mask"] == 1).all()
    np.testing.assert_array_equal(f["position_ids"], np.broadcast_to(np.arange(past, past + 6), (3, 6)))
    f = make_feeds(m, dims={"past_sequence_length": 0, "sequence_length": 5})
    assert f["attention_mask"].shape[1] == 5 and f["past_key_values.0.key"].shape[2] == 0
    np.testing.assert_array_equal(f["position_ids"][0], np.arange(5))


def test_validate_runs_a_kv_cache_graph_without_dims(tmp_path):
    kv_graph(tmp_path / "m.onnx")
    out = tmp_path / "c.onnx"
    assert run_cli("convert", tmp_path / "m.onnx", "-o", out, "--policy", "top-p", "--threshold", "0.5").returncode == 0
    r = run_cli("validate", tmp_path / "m.onnx", out)
    assert r.returncode == 0 and "routed (token, expert) pairs" in r.stdout, r.stderr
    assert run_cli("convert", tmp_path / "m.onnx", "-o", tmp_path / "s.onnx").returncode == 0
    r = run_cli("validate", tmp_path / "m.onnx", tmp_path / "s.onnx", "--dim", "past_sequence_length=0")
    assert r.returncode == 0 and "reproduces the original: yes" in r.stdout, r.stderr


def test_calibrate_and_profile_a_kv_cache_graph_on_token_ids(tmp_path):
    kv_graph(tmp_path / "m.onnx")
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, VOCAB, (4, 12)))
    out = tmp_path / "cal.onnx"
    r = run_cli("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "ids.npy", "--target-experts", "1.5", "-o", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("profile", out, "--data", tmp_path / "ids.npy", "--json")
    assert r.returncode == 0, r.stderr
    import json
    layer = json.loads(r.stdout)["layers"][0]
    assert layer["tokens"] == 4 * 12 and abs(layer["mean_experts"] - 1.5) < 0.3
