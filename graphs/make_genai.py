"""Regenerates graphs/genai/: tiny models built by the ONNX Runtime GenAI model builder, offline.

    python graphs/make_genai.py                 # every model below
    python graphs/make_genai.py --only gpt_oss  # one architecture, all its precisions

Each architecture is a tiny transformers config with seeded random weights, saved with
save_pretrained beside a small BPE tokenizer trained on the Python license text (a file every
Python install has), then built with `python -m onnxruntime_genai.models.builder` for each
precision / execution provider below; the builder writes the folder og.Model() loads
(model.onnx, its data, genai_config.json, tokenizer files). Needs the `genai` extra
(onnxruntime-genai, onnx-ir). GPT-OSS's int4 build reads the checkpoint's MXFP4 expert tensors, so
they are written into it from the random weights.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "genai"

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
              max_position_embeddings=256)
ARCHS = {
    # sliding window 16 < the generation tests' length: the window's cache path is exercised
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=8, num_experts_per_tok=2, intermediate_size=64,
                    num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "lfm2_moe": dict(model_type="lfm2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                     intermediate_size=64, num_hidden_layers=3, num_dense_layers=1,
                     layer_types=["full_attention", "conv", "full_attention"], initializer_range=0.2),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                        shared_expert_intermediate_size=64, num_hidden_layers=2,
                        layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default",
                                         "mrope_section": [1, 1, 0], "mrope_interleaved": True}),
}
BUILDS = {  # (precision, execution provider) per architecture
    "gpt_oss": [("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda"), ("fp16", "dml")],
    "lfm2_moe": [("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda")],
    "qwen3_5_moe": [("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda"), ("int4", "cuda")],
}


def tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def checkpoint(arch: str, out: Path, seed=0, router_logit_std=None, **sizes):
    """A random-weight checkpoint of `arch` in `out`; `sizes` override the tiny config's.
    `router_logit_std`: draw the routers so their logits have about this spread per token
    whatever the hidden size (None: weights of std 0.5, as the small reference graphs are made;
    at a published model's width that is a logit spread of 20-30, where the top-k's last weights
    underflow and the fused op's kernel skips them in the original already)."""
    import torch
    import transformers as tf

    spec = dict(ARCHS[arch]) | sizes
    model_type = spec.pop("model_type")
    torch.manual_seed(seed)
    if model_type == "qwen3_5_moe":  # the builder takes the vision-language model; a tiny vision tower
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64)
        cfg = tf.AutoConfig.for_model(model_type, text_config=COMMON | spec, vision_config=vision)
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    else:
        cfg = tf.AutoConfig.for_model(model_type, **(COMMON | spec))
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random routers are near uniform; trained ones spread their scores
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                # the router reads RMS-normalized hidden states: logit std = weight std x sqrt(hidden)
                p.normal_(0.0, 0.5 if router_logit_std is None else router_logit_std / p.shape[-1] ** 0.5)
    model.save_pretrained(out)
    tokenizer(out, (COMMON | spec)["vocab_size"])
    if arch == "gpt_oss":
        add_mxfp4(model, out)


def add_mxfp4(model, out: Path):
    """Writes the checkpoint's expert weights also as GPT-OSS's MXFP4 tensors (`*_blocks`: 32
    e2m1 codes per block, two per byte, low nibble first; `*_scales`: the block's power of two
    + 127), which the builder's int4 path reads."""
    import torch
    from safetensors.torch import load_file, save_file

    levels = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

    def quantize(w):  # [N, K] output-major -> blocks [N, K/32, 16], scales [N, K/32]
        g = w.float().reshape(*w.shape[:-1], -1, 32)
        amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
        x = g / torch.pow(2.0, exp)
        code = (x.abs().unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)
        blocks = code[..., 0::2] | (code[..., 1::2] << 4)
        return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8).contiguous()

    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 1, "one safetensors file expected in a tiny checkpoint"
    tensors = load_file(files[0])
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for name, w in (("gate_up_proj", ex.gate_up_proj), ("down_proj", ex.down_proj)):
            # one expert at a time: quantize() holds 8 copies of its input (deploy_cpu.py's shapes)
            b, s = zip(*(quantize(w[e].detach().transpose(-1, -2)) for e in range(w.shape[0])))
            tensors[f"model.layers.{i}.mlp.experts.{name}_blocks"] = torch.stack(b)
            tensors[f"model.layers.{i}.mlp.experts.{name}_scales"] = torch.stack(s)
    save_file(tensors, files[0], metadata={"format": "pt"})


def build(ckpt: Path, dst: Path, precision: str, ep: str):
    """Runs the GenAI model builder on a checkpoint."""
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(dst),
               "-p", precision, "-e", ep, "-c", cache]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"builder failed for {dst.name}:\n{r.stderr[-2000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(ARCHS), action="append")
    args = ap.parse_args()
    for arch in args.only or ARCHS:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / arch
            checkpoint(arch, ckpt)
            for precision, ep in BUILDS[arch]:
                dst = OUT / f"{arch}_{precision}_{ep}"
                shutil.rmtree(dst, ignore_errors=True)
                build(ckpt, dst, precision, ep)
                print(f"wrote {dst.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
