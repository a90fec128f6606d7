"""Train a small MoE causal LM on real text that exists offline: the CPython standard library
sources installed with this Python (byte-level, vocab 256), with a held-out split by file.

    python samples/train_moe.py mixtral8   [--minutes 25 | --steps N]   # 8 experts, top-2 (Mixtral-style)
    python samples/train_moe.py qwen3moe32 [--minutes 25]   # 32 experts, top-4, renormalized (Qwen3-MoE-style)
    python samples/train_moe.py deepseek16 [--minutes 25]   # 16 experts in 4 groups, top-4 of the best 2 groups,
                                                            # sigmoid + correction bias, scaled 2.5 (DeepSeek-V3-style)
    python samples/train_moe.py gptoss16 [--minutes 25]     # 16 experts, top-4 of the logits, softmax over
                                                            # those 4 (GPT-OSS-style)

Seeded; uses the usual load-balancing auxiliary loss (deepseek16: DeepSeek-V3's auxiliary-loss-free
balancing instead, each step moving every expert's correction bias by 1e-3 against its load's
deviation from the mean, which is what the bias is for); saves with save_pretrained under
~/.cache/moe-export/models/NAME (outside the repo), plus held-out token arrays for evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "moe-export"
SEQ = 128


def corpus(max_bytes=24 << 20):
    """(train, heldout) byte arrays: every .py under the stdlib; one file in ten is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    total = 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        try:
            b = p.read_bytes()
        except OSError:
            continue
        (held if zlib.crc32(str(p.relative_to(root)).encode()) % 10 == 0 else train).append(b)
        total += len(b)
        if total > max_bytes:
            break
    join = lambda xs: np.frombuffer(b"\n".join(xs), dtype=np.uint8).astype(np.int64)
    return join(train), join(held), str(root)


def config(name):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, router_aux_loss_coef=0.02,
                  output_router_logits=True, tie_word_embeddings=True)
    if name == "mixtral8":
        return tf.MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, **common)
    if name == "qwen3moe32":
        return tf.Qwen3MoeConfig(moe_intermediate_size=64, intermediate_size=256, num_experts=32,
                                 num_experts_per_tok=4, norm_topk_prob=True, head_dim=32, **common)
    if name == "deepseek16":
        # MLA keeps one key/value head per query head (DeepSeek-V3 does; and torch.export fails
        # on its attention with fewer)
        common = {k: v for k, v in common.items() if k not in ("router_aux_loss_coef", "output_router_logits")}
        common["num_key_value_heads"] = common["num_attention_heads"]
        return tf.DeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=64,
                                   intermediate_size=256, n_shared_experts=1, first_k_dense_replace=0,
                                   kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                   v_head_dim=32, **common)
    if name == "gptoss16":
        # GPT-OSS's gate: top-4 of the 16 router logits, then a softmax over those 4 values
        return tf.GptOssConfig(intermediate_size=64, num_local_experts=16, num_experts_per_tok=4, head_dim=32,
                               sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
                               **common)
    raise SystemExit(f"unknown model {name}")


def bias_balancer(model, rate=1e-3):
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step, every router's correction
    bias moves by `rate` toward the experts chosen less than average. Returns the step function."""
    import torch

    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    counts = {}

    def hook(mod, _inp, out):
        idx = out[2]  # (logits, weights, indices)
        counts[mod] = counts.get(mod, 0) + torch.bincount(idx.detach().reshape(-1),
                                                           minlength=mod.e_score_correction_bias.numel())
    for r in routers:
        r.register_forward_hook(hook)

    def step():
        with torch.no_grad():
            for r, c in counts.items():
                r.e_score_correction_bias += rate * torch.sign(c.float().mean() - c.float())
        counts.clear()
    return step


def main():
    import torch
    import transformers as tf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=["mixtral8", "qwen3moe32", "deepseek16", "gptoss16"])
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--steps", type=int, default=None,
                    help="train this many steps instead of --minutes (the same model on any machine)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tf.utils.logging.set_verbosity_error()
    train, held, root = corpus()
    out = CACHE / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    model = tf.AutoModelForCausalLM.from_config(config(args.name))
    balance = bias_balancer(model) if args.name == "deepseek16" else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    t0, step, log = time.time(), 0, []
    budget = args.minutes * 60
    model.train()

    def progress():  # the fraction of training done: by steps when given, else by the clock
        return step / args.steps if args.steps else (time.time() - t0) / budget
    while progress() < 1:
        starts = rng.integers(0, len(train) - SEQ - 1, args.batch)
        ids = torch.from_numpy(np.stack([train[s:s + SEQ] for s in starts]))
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress())))
        for g in opt.param_groups:
            g["lr"] = lr
        outp = model(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if balance is not None:
            balance()
        if step % 50 == 0:
            aux = float(outp.aux_loss) if getattr(outp, "aux_loss", None) is not None else float("nan")
            log.append({"step": step, "loss": float(outp.loss), "aux": aux, "s": time.time() - t0})
            print(json.dumps(log[-1]), flush=True)
        step += 1
    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(out)
    np.save(out / "heldout.npy", held)
    with torch.no_grad():  # held-out perplexity in PyTorch, for reference (the curve uses ONNX)
        n = min(64, (len(held) - 1) // SEQ)
        ids = torch.from_numpy(held[: n * SEQ].reshape(n, SEQ))
        nll = float(model(input_ids=ids, labels=ids).loss)
    (out / "train_log.json").write_text(json.dumps({"corpus": root, "train_bytes": int(len(train)),
                                                    "heldout_bytes": int(len(held)), "steps": step,
                                                    "torch_heldout_ppl": math.exp(nll), "log": log}, indent=1))
    print(f"saved {out}: {step} steps, held-out ppl {math.exp(nll):.3f} (byte-level; chance = 256)")


if __name__ == "__main__":
    main()
