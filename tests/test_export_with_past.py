"""export --with-past: decoder graphs with a KV cache that generate token by token in ONNX
Runtime as the PyTorch model does, before and after conversion."""
import sys

import numpy as np
import onnx
import pytest

import moe_export
from helpers import GRAPHS, ROOT, run_cli
from moe_export.run.runtime import greedy, make_feeds

sys.path.insert(0, str(GRAPHS))
from make_graphs import tiny_model  # noqa: E402

pytestmark = pytest.mark.torch

WINDOW = 16  # GPT-OSS's sliding_window in graphs/make_graphs.py
NEW = 3 * WINDOW - 7 + 1  # after a 7-token prompt: past three windows


def torch_greedy(model, prompt, n):
    import torch

    seq = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq.numpy()


# Mixtral (plain attention), GPT-OSS (sliding window + sinks), DeepSeek-V3 (MLA: key and value
# head sizes differ; grouped sigmoid routing)
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_kv_cache_generation_matches_pytorch_and_survives_conversion(family, tmp_path):
    import transformers as tf

    ckpt = tmp_path / "ckpt"
    tiny_model(family).save_pretrained(ckpt)
    graph, static, top1 = tmp_path / "m.onnx", tmp_path / "s.onnx", tmp_path / "t.onnx"
    r = run_cli("export", ckpt, "-o", graph, "--with-past")
    assert r.returncode == 0, r.stderr
    prompt = np.random.default_rng(0).integers(3, 100, (2, 7))
    assert getattr(tiny_model(family).config, "sliding_window", None) in (None, WINDOW)
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="batched_mm").eval()
    want = torch_greedy(model, prompt, NEW)
    got = greedy(moe_export.session(graph, custom_ops=False), prompt, NEW)
    np.testing.assert_array_equal(got, want)
    if family == "gpt_oss":  # validate's default inputs: a cached prefix, then tokens past the window
        assert make_feeds(onnx.load(str(graph), load_external_data=False))["attention_mask"].shape[1] > WINDOW
    assert run_cli("convert", graph, "-o", static).returncode == 0
    np.testing.assert_array_equal(greedy(moe_export.session(static), prompt, NEW), want)
    # one expert per token: the PyTorch model with k=1, decoding through the cache
    assert run_cli("convert", graph, "-o", top1, "--policy", "top-p", "--threshold", "1e-6").returncode == 0
    k1 = tmp_path / "k1"
    tiny_model(family, num_experts_per_tok=1).save_pretrained(k1)
    want1 = torch_greedy(tf.AutoModelForCausalLM.from_pretrained(k1, experts_implementation="batched_mm").eval(),
                         prompt, NEW)
    np.testing.assert_array_equal(greedy(moe_export.session(top1), prompt, NEW), want1)


def test_the_generate_sample_runs(tmp_path):
    import subprocess

    ckpt = tmp_path / "ckpt"
    tiny_model("qwen3_moe").save_pretrained(ckpt)
    r = subprocess.run([sys.executable, ROOT / "samples" / "generate.py", ckpt, tmp_path / "w", "--tokens", "6"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("original") and lines[1].startswith("dynamic") and "fewer" in lines[2]
