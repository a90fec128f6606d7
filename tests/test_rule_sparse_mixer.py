"""The sparse_mixer rule (PhiMoE): two ArgMax picks, the second with the first scattered out,
each weighed by its own jitter-masked softmax. The router picks the ids; the graph's weights
stay, zeroed where a slot is dropped."""
import numpy as np
import pytest
from onnx import TensorProto, helper

from helpers import GRAPHS, session_of
from moe_export.rules.base import explain
from moe_export.conversion import Policy, convert


@pytest.mark.torch
def test_one_expert_routing_is_the_model_weighing_its_first_pick_alone(tmp_path, monkeypatch):
    """PhiMoE has no k=1 configuration (the sparse mixer always picks two): the reference is the
    same PyTorch model with the second pick's weight set to 0."""
    import sys

    import torch
    import transformers.models.phimoe.modeling_phimoe as phimoe

    sys.path.insert(0, str(GRAPHS))
    from make_graphs import tiny_model

    from moe_export.model.export import load_checkpoint

    out = tmp_path / "top1.onnx"
    convert(GRAPHS / "phimoe.onnx", out, Policy("top-p", 1e-6))
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    got = session_of(out).run(None, {"input_ids": ids})[0]
    tiny_model("phimoe").save_pretrained(tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        k2 = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        mixer = phimoe.sparsemixer

        def first_pick_only(*a, **kw):
            w, sel = mixer(*a, **kw)
            return w * torch.tensor([1.0, 0.0]), sel
        monkeypatch.setattr(phimoe, "sparsemixer", first_pick_only)
        want = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert np.abs(got - k2).max() > 1e-3


def test_an_argmax_alone_is_not_a_sparse_mixer():
    node = helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=1, name="am")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, None)])
    row = explain(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))[0]
    assert row["gate"] is None and "sparse_mixer" in row["why_not"]


@pytest.mark.parametrize("portable", [False, True])
def test_more_experts_than_its_two_picks_are_refused(tmp_path, portable):
    """The graph weighs its own two picks: a wider router would leave the weights 2 wide and the
    ids 3 wide (written, it failed in onnxruntime), so it is refused, nothing written."""
    from moe_export import MoeExportError

    out = tmp_path / "wide.onnx"
    with pytest.raises(MoeExportError, match="sparse_mixer gate weighs its own 2 picks"):
        convert(GRAPHS / "phimoe.onnx", out, Policy("top-p", 0.6, max_experts=3), portable=portable)
    assert not list(tmp_path.iterdir())
