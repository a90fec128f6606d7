"""Regenerates graphs/optimum/: decoder graphs with a KV cache as optimum-onnx exports them
(TorchScript exporter, task text-generation-with-past), for the MoE families optimum supports.

optimum-onnx needs transformers 4.57, which conflicts with moe-export's transformers 5.x, so run
this in a throwaway venv (no downloads beyond PyPI; the models are tiny random configs):

    python -m venv /tmp/venv-optimum
    /tmp/venv-optimum/bin/pip install torch==2.13.0 "transformers==4.57.*" optimum-onnx onnx onnxruntime
    /tmp/venv-optimum/bin/python graphs/make_optimum.py

Each graph keeps its weights inside (small) and comes with the PyTorch logits of a fixed prompt
(<family>.npz: input_ids, logits, and the logits of the same model routed to one expert), so
tests under transformers 5.x check conversions against the model that made the graph.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt_oss": (dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                     layer_types=["sliding_attention", "full_attention"]), "num_experts_per_tok"),
    "deepseek_v3": (dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                         moe_intermediate_size=32, first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16,
                         q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4), "num_experts_per_tok"),
    "qwen3_moe": (dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                       head_dim=8), "num_experts_per_tok"),
}


def tiny(family, **over):
    import torch
    import transformers as tf

    cfg = tf.AutoConfig.for_model(family, **(COMMON | FAMILIES[family][0] | over))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random routers are near uniform; trained ones are not
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.eval()


def logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def main():
    import onnx
    import transformers
    from optimum.exporters.onnx import main_export

    out = HERE / "optimum"
    out.mkdir(exist_ok=True)
    ids = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 12))
    for family, (_, k_key) in FAMILIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            model = tiny(family)
            model.save_pretrained(tmp + "/ckpt")
            main_export(tmp + "/ckpt", tmp + "/onnx", task="text-generation-with-past", opset=18,
                        no_post_process=True, do_validation=False)
            m = onnx.load(tmp + "/onnx/model.onnx")
            m.doc_string = f"optimum-onnx export of a tiny random {family} (transformers {transformers.__version__})"
            onnx.save(m, out / f"{family}.onnx")
            np.savez(out / f"{family}.npz", input_ids=ids, logits=logits(model, ids),
                     logits_k1=logits(tiny(family, **{k_key: 1}), ids))
        print("wrote", out / f"{family}.onnx", file=sys.stderr)


if __name__ == "__main__":
    main()
