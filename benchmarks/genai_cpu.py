"""A GenAI-builder model, original vs converted, generating through onnxruntime-genai on one thread.

    .venv/bin/python benchmarks/genai_cpu.py [--precisions fp32 int4] [--prefill 512] [--decode 128]

Builds (once, cached under build/genai_bench/) a GPT-OSS-shaped checkpoint with random weights
(hidden 1024, 32 experts, top-4, 4 layers) and runs the ONNX Runtime GenAI model builder on it for
each precision. Each folder is calibrated with `moe-export calibrate` on token ids of real text
(the Python license, through the model's tokenizer) to cut about 35% of the routed pairs, then
original and converted generate alternately, `--repeats` times each, from the same prompt:
prefill is the time of append_tokens(prompt), decode of `--decode` generate_next_token calls.
The pair cut is measured by `moe-export profile` on the prompt and generated tokens.

The ideal speedup is what the FLOP split allows: per token, the expert FLOPs E_f = k x 2 x (the
fused op's fc1 + fc2 multiply-adds, read off its weights), and the rest R_f = 2 x (every other
weight's multiply-adds: MatMul / MatMulNBits / Gather-free projections, the LM head) + attention
(2 x 2 x heads x head_dim x the mean context per layer). With f = E_f / (E_f + R_f) and a pair cut
r, ideal = 1 / (1 - f r). Writes benchmarks/results/genai_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "graphs"))
WORK = ROOT / "build" / "genai_bench"
SHAPE = dict(hidden_size=1024, intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4,
             num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64, sliding_window=128,
             layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=2048)


def cli(*args):
    r = subprocess.run([str(Path(sys.executable).parent / "moe-export"), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"moe-export {args[0]} failed: {r.stderr.strip()}")
    return r.stdout


def build_models(precisions):
    from make_genai import build, checkpoint

    ckpt = WORK / "checkpoint"
    if not (ckpt / "config.json").is_file():
        checkpoint("gpt_oss", ckpt, **SHAPE)
    out = {}
    for p in precisions:
        dst = WORK / f"gpt_oss_{p}"
        if not (dst / "genai_config.json").is_file():
            build(ckpt, dst, p, "cpu")
        out[p] = dst
    return out


def text_ids(folder, n):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    ids = np.asarray(tok.encode(text).ids, dtype=np.int64)
    return ids[: n * (len(ids) // n)].reshape(-1, n)


def flop_split(folder, context):
    """(expert FLOPs, other FLOPs) per token, from the decoder graph's weights (see the docstring)."""
    from moe_export.model.graph import GraphIndex, load_model
    from moe_export.rules.fused_moe import flops_per_pair

    m = load_model(folder / "model.onnx")
    ix = GraphIndex(m.graph)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    expert = other = 0.0
    for n in m.graph.node:
        if n.op_type in ("MoE", "QMoE"):
            expert += next(a.i for a in n.attribute if a.name == "k") * flops_per_pair(ix, n)
        elif n.op_type == "MatMul" and n.input[1] in ix.initializers:
            other += 2 * np.prod(ix.initializers[n.input[1]].dims)
        elif n.op_type == "MatMulNBits":
            other += 2 * next(a.i for a in n.attribute if a.name == "K") * next(a.i for a in n.attribute if a.name == "N")
    other += cfg["num_hidden_layers"] * 2 * 2 * cfg["num_attention_heads"] * cfg["head_size"] * context
    return expert, other


def time_generation(folder, prompt, decode, threads=1):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def once():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt.size + decode, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32).reshape(1, -1))
        t1 = time.perf_counter()
        for _ in range(decode):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.asarray(gen.get_sequence(0))
    once()  # warm-up: session arenas, prepacked weights
    return once


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4"], choices=["fp32", "int4"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cut", type=float, default=0.35, help="the fraction of routed pairs to calibrate away")
    args = ap.parse_args()
    folders = build_models(args.precisions)
    results = []
    for precision, folder in folders.items():
        calib, prompt_file = WORK / "calib.npy", WORK / "prompt.npy"
        ids = text_ids(folder, args.prefill)
        np.save(calib, ids[1:9, :128])  # calibration text is not the prompt
        prompt = ids[0]
        conv = WORK / f"gpt_oss_{precision}.dynamic"
        if not (conv / "genai_config.json").is_file():
            k = SHAPE["num_experts_per_tok"]
            cli("calibrate", folder, "--data", calib, "--target-experts", round(k * (1 - args.cut), 3), "-o", conv)
        runs = {"original": time_generation(folder, prompt, args.decode),
                "converted": time_generation(conv, prompt, args.decode)}
        times = {name: [] for name in runs}
        seqs = {}
        for _ in range(args.repeats):  # alternating, so drift hits both alike
            for name, once in runs.items():
                pre, dec, seqs[name] = once()
                times[name].append((pre, dec))
        np.save(prompt_file, seqs["converted"][None])
        prof = json.loads(cli("profile", conv, "--data", prompt_file, "--json"))["total"]
        r = prof["pair_reduction"]
        E_f, R_f = flop_split(folder, context=(args.prefill + args.decode) / 2)
        f = E_f / (E_f + R_f)
        med = {n: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for n, ts in times.items()}
        row = {
            "precision": precision, "pair_reduction": r, "expert_flop_fraction": f, "ideal_speedup": 1 / (1 - f * r),
            "prefill_speedup": med["original"][0] / med["converted"][0],
            "decode_speedup": med["original"][1] / med["converted"][1],
            "original_tokens_per_s": args.decode / med["original"][1],
            "converted_tokens_per_s": args.decode / med["converted"][1],
            "original_prefill_tokens_per_s": args.prefill / med["original"][0],
            "converted_prefill_tokens_per_s": args.prefill / med["converted"][0],
            "prefill_s": {n: m[0] for n, m in med.items()}, "decode_s": {n: m[1] for n, m in med.items()},
            "same_tokens": bool(np.array_equal(seqs["original"], seqs["converted"])),
        }
        row["prefill_of_ideal"] = row["prefill_speedup"] / row["ideal_speedup"]
        results.append(row)
        print(f"{precision}: pairs -{100 * r:.1f}%  expert FLOP share {100 * f:.1f}%  ideal x{row['ideal_speedup']:.3f}  "
              f"prefill x{row['prefill_speedup']:.3f} ({100 * row['prefill_of_ideal']:.0f}% of ideal)  "
              f"decode x{row['decode_speedup']:.3f} ({row['original_tokens_per_s']:.1f} -> "
              f"{row['converted_tokens_per_s']:.1f} tokens/s)")
    out = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{__import__('os').cpu_count()} cores", "threads": 1, "model": "GPT-OSS-shaped, random weights: " +
           json.dumps(SHAPE), "prefill_tokens": args.prefill, "decode_tokens": args.decode, "repeats": args.repeats,
           "command": "benchmarks/genai_cpu.py " + " ".join(sys.argv[1:]), "results": results}
    path = ROOT / "benchmarks" / "results" / "genai_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
