"""Regenerates the reference graphs in this folder, deterministically, with no downloads.

    python graphs/make_graphs.py            # transformers 5.x (batched_mm experts) + bare gates
    python graphs/make_graphs.py --legacy   # run under transformers 4.x: per-expert-loop graphs

Each model is a tiny config of its family, built with seeded random weights, saved with
save_pretrained, and exported by `moe_export.model.export` (the same path as `moe-export export`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                      head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                        moe_intermediate_size=32, first_k_dense_replace=0, n_shared_experts=1,
                        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0,
                         moe_num_shared_experts=0),
    "kolibri1": dict(num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=32, norm_topk_prob=True, head_dim=8, sliding_window=16),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, intermediate_size_mlp=64,
                        head_dim=8, interleave_moe_layer_step=1),
    "deepseek_v4": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8, q_lora_rank=16,
                        qk_rope_head_dim=8, o_lora_rank=16, o_groups=2, hc_sinkhorn_iters=3, index_n_heads=2,
                        index_head_dim=8, sliding_window=16, index_topk=2, mlp_layer_types=["hash_moe", "moe"],
                        layer_types=["heavily_compressed_attention"] * 2),
    "inkling_text": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                         sliding_window_size=16, rel_extent=16, initializer_range=0.2,
                         layer_types=["hybrid_sliding", "hybrid"], mlp_layer_types=["sparse", "sparse"]),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "mistral4": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=32,
                     first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, head_dim=16,
                     routed_scaling_factor=2.5, norm_topk_prob=True, num_key_value_heads=4),
}
# DeepSeek-V4's scores, sqrt(softplus(x)), compress the logits: a wider random gate spreads them
# as a trained router's are.
GATE_STD = {"deepseek_v4": 2.0}
LEGACY = ("mixtral", "qwen2_moe", "olmoe")  # the families transformers 4.46 has


def tiny_model(family, seed=0, **overrides):
    import torch
    import transformers as tf

    cfg = tf.AutoConfig.for_model(family, **(COMMON | FAMILIES[family] | overrides))
    torch.manual_seed(seed)
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    except ValueError:  # a causal LM the Auto mapping does not list (Mistral4)
        model = getattr(tf, type(cfg).__name__.replace("Config", "ForCausalLM"))(cfg)
    # Random routers are near uniform; a larger gate weight spreads the scores as trained ones are.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, GATE_STD.get(family, 0.5))
            if name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model.eval()


def export_family(family, out, exporter="dynamo", external_data=False, **overrides):
    from moe_export.model.export import export_checkpoint

    with tempfile.TemporaryDirectory() as ckpt:
        tiny_model(family, **overrides).save_pretrained(ckpt)
        export_checkpoint(ckpt, out, exporter=exporter, external_data=external_data)


def bare_gates(folder: Path):
    """Gating subgraphs alone: logits in, (weights, indices) out, as the exporters write them."""
    import torch

    class SoftmaxTopK(torch.nn.Module):
        def __init__(self, k, norm):
            super().__init__()
            self.k, self.norm = k, norm

        def forward(self, logits):
            p = torch.softmax(logits, dim=-1)
            w, i = torch.topk(p, self.k, dim=-1)
            if self.norm:
                w = w / w.sum(dim=-1, keepdim=True)
            return w, i

    class TopKSoftmax(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, logits):
            v, i = torch.topk(logits, self.k, dim=-1)
            return torch.softmax(v, dim=-1), i

    class GroupedSigmoid(torch.nn.Module):
        def __init__(self, E, k, G, kg, scale):
            super().__init__()
            self.E, self.k, self.G, self.kg, self.scale = E, k, G, kg, scale
            self.bias = torch.nn.Parameter(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.05)

        def forward(self, logits):
            s = logits.sigmoid()
            c = s + self.bias
            g = c.view(-1, self.G, self.E // self.G).topk(2, dim=-1)[0].sum(dim=-1)
            gi = torch.topk(g, k=self.kg, dim=-1, sorted=False)[1]
            gm = torch.zeros_like(g).scatter_(1, gi, 1)
            m = gm.unsqueeze(-1).expand(-1, self.G, self.E // self.G).reshape(-1, self.E)
            c = c.masked_fill(~m.bool(), float("-inf"))
            i = torch.topk(c, k=self.k, dim=-1, sorted=False)[1]
            w = s.gather(1, i)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return w * self.scale, i

    specs = {
        "gate_softmax_topk_e64k8": (SoftmaxTopK(8, True), 64),
        "gate_softmax_topk_e8k2_nonorm": (SoftmaxTopK(2, False), 8),
        "gate_topk_softmax_e32k4": (TopKSoftmax(4), 32),
        "gate_grouped_sigmoid_e64k8": (GroupedSigmoid(64, 8, 8, 4, 2.5), 64),
    }
    from torch.export import Dim
    for name, (mod, E) in specs.items():
        x = torch.randn(16, E)
        torch.onnx.export(mod.eval(), (x,), str(folder / f"{name}.onnx"), dynamo=True, opset_version=18,
                          input_names=["logits"], output_names=["weights", "indices"],
                          dynamic_shapes={"logits": {0: Dim("tokens")}}, external_data=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legacy", action="store_true", help="export per-expert-loop graphs (transformers 4.x)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", metavar="FAMILY", help="regenerate this family's graph alone")
    args = ap.parse_args()
    import transformers
    major = int(transformers.__version__.split(".")[0])
    if args.legacy != (major < 5):
        sys.exit(f"--legacy needs transformers 4.x, plain needs 5.x; this is {transformers.__version__}")
    # wide/: the same tiny models with one more expert per token, the reference for routers
    # converted with --max-experts k+1 (same seed and shapes, so the same weights).
    (args.out / "wide").mkdir(exist_ok=True)
    if args.only:
        export_family(args.only, args.out / f"{'legacy_' if args.legacy else ''}{args.only}.onnx")
    elif args.legacy:
        for fam in LEGACY:
            for exporter in ("torchscript", "dynamo"):
                export_family(fam, args.out / f"legacy_{fam}_{exporter}.onnx", exporter=exporter)
        export_family("mixtral", args.out / "wide" / "legacy_mixtral_dynamo_top3.onnx", num_experts_per_tok=3)
    else:
        for fam in FAMILIES:
            export_family(fam, args.out / f"{fam}.onnx")
        for fam in ("mixtral", "qwen2_moe"):
            export_family(fam, args.out / "wide" / f"{fam}_top3.onnx", num_experts_per_tok=3)
        bare_gates(args.out)
    print("wrote graphs to", args.out)


if __name__ == "__main__":
    main()
