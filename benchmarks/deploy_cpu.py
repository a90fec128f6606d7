"""Converted vs original at the MoE layer shapes of published models: load time and memory,
prefill and decode speed, by batch and threads.

    .venv/bin/python benchmarks/deploy_cpu.py [--shapes gpt-oss-20b qwen3.5-35b-a3b] [--precisions int4]
        [--prefill 128] [--torch-prefill 16] [--decode 16] [--repeats 3]   # -> benchmarks/results/deploy_cpu.json
    ORT_QMOE_CPU_QNBIT_GEMM=int8 .venv/bin/python benchmarks/deploy_cpu.py --precisions int4   # rows of QMoE's int8 compute

Each shape is a random-weight checkpoint with the layer shapes of a published model (its hidden
size, experts, top-k, expert intermediate size, attention heads), as few layers as memory needs
and a small vocabulary (so the LM head does not swamp two layers), routers drawn with the logit
spread of trained ones (ROUTER_LOGIT_STD). It is built by the ONNX Runtime GenAI model builder (fused MoE / QMoE ops;
both architectures are ones it supports), cached under build/deploy_bench/, and calibrated with
`moe-export calibrate FOLDER --target-experts k x (1 - cut)` on token ids of real text (the
Python license through the model's tokenizer) to cut about 35% of the routed pairs.

Qwen3-30B-A3B, which the builder refuses, is built by transformers instead (one layer, fp32) and
exported by `moe-export export --with-past` (batched_mm experts: the conversion's regrouped Scan is
what is timed there); its prefill is `--torch-prefill` tokens, since the original gathers a 6.3 MB
weight slab per (token, slot) and matrix, and its calibration text is the license's bytes.

Timing runs the decoder graph in onnxruntime sessions, original and converted side by side in one
process, alternating `--repeats` times, as a generation of the prompt rows' own text: prefill =
one run of [batch, prefill] tokens from an empty cache; decode = the `--decode` steps after it,
each the rows' next token on the cache the last step returned. Load time and peak RSS of session
creation are measured in a fresh child process per graph (default session options but the
thread count). Each phase's ideal speedup is the FLOP split's, as in genai_cpu.py (experts'
share f of the FLOPs at the mean context, cut r: 1 / (1 - f r)), with r the pair cut that
`moe-export profile` measures on the tokens that phase ran: a batch of one is one row.
The torch shapes also time the same routing converted with `--per-expert-weights` (per_expert_*).
"""
from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(ROOT / "benchmarks"))
WORK = ROOT / "build" / "deploy_bench"
# The routers' logit spread per token. Trained routers measure 1.5-3.8 (samples/train_moe.py's
# models); the default draw of make_genai.py (weights of std 0.5) gives 20-30 at these widths,
# where about a quarter of the original's top-k weights are below 1e-8 and onnxruntime's QMoE
# skips them: the original then computes fewer pairs than the pair count says.
ROUTER_LOGIT_STD = 3.0
FUSED = ("MoE", "QMoE")  # the builder's fused expert ops (com.microsoft)

# Layer shapes of published models (config.json of each), two layers each (one of each attention kind).
SHAPES = {
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                                    num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                    vocab_size=512, max_position_embeddings=4096)),
    "qwen3.5-35b-a3b": ("qwen3_5_moe", dict(hidden_size=2048, num_experts=256, num_experts_per_tok=8,
                                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                            num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                                            num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                            linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                                            linear_num_value_heads=32, vocab_size=512, max_position_embeddings=4096,
                                            rope_parameters={"rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                                             "rope_type": "default", "mrope_section": [11, 11, 10],
                                                             "mrope_interleaved": True})),
}
# Built by transformers and exported by `moe-export export --with-past` (batched_mm experts: the
# regrouped Scan form is what is timed): fp32, one layer, short prefills, since the original
# gathers a 6.3 MB weight slab per (token, slot) and matrix at this shape.
TORCH_SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_hidden_layers=1, vocab_size=512, norm_topk_prob=True, decoder_sparse_step=1,
                          max_position_embeddings=4096),
}

# Peak RSS as VmHWM, this process image's own: ru_maxrss survives exec, so a child of a parent that
# just ran the builder would report the parent's peak.
LOAD_CHILD = r"""
import json, re, sys, time
import moe_export
t = time.perf_counter()
moe_export.session(sys.argv[1], intra_op_num_threads=int(sys.argv[2]))
hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())
print(json.dumps({"load_s": time.perf_counter() - t, "load_rss_gb": int(hwm.group(1)) / 2**20}))
"""


def build(shape, precision):
    from make_genai import build as builder, checkpoint

    arch, sizes = SHAPES[shape]
    ckpt = WORK / f"{shape}_checkpoint"
    if not (ckpt / "config.json").is_file():
        checkpoint(arch, ckpt, router_logit_std=ROUTER_LOGIT_STD, **sizes)
    dst = WORK / f"{shape}_{precision}"
    if not (dst / "genai_config.json").is_file():
        builder(ckpt, dst, precision, "cpu")
    return dst


def underflow_share(folder, prompt, floor=1e-8):
    """The share of the original's top-k route weights below `floor` on `prompt` (every fused op):
    routes the fused CPU kernels skip by themselves, which a cut of routed pairs cannot save again."""
    import onnx

    from moe_export.run.runtime import expose, session_from_proto

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n for n in model.graph.node if n.op_type in FUSED]
    probe = expose(model, [n.input[1] for n in ops], "underflow.")
    feeds = feeds_for(folder, model, 1, prompt.shape[1], False)
    feeds["input_ids"] = prompt[:1].astype(feeds["input_ids"].dtype)
    logits = session_from_proto(probe, folder, custom_ops=False).run([f"underflow.{i}" for i in range(len(ops))], feeds)
    low = total = 0
    for n, lg in zip(ops, logits):
        k = next(a.i for a in n.attribute if a.name == "k")
        top = -np.sort(-lg.reshape(-1, lg.shape[-1]), axis=1)[:, :k].astype(np.float64)
        w = np.exp(top - top[:, :1])
        w /= w.sum(1, keepdims=True)
        low, total = low + int((w < floor).sum()), total + w.size
    return low / total


def build_torch(shape):
    """A random-weight checkpoint of the shape (routers drawn as make_genai.py's default: the
    export computes every routed pair whatever its weight), exported with its KV cache."""
    import torch
    import transformers as tf

    graph = WORK / f"{shape}_fp32" / "model.onnx"
    if graph.is_file():
        return graph
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**TORCH_SHAPES[shape]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    ckpt = WORK / f"{shape}_checkpoint"
    model.save_pretrained(ckpt)
    del model
    graph.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "moe-export"), "export", ckpt, "-o", graph, "--with-past"],
                   check=True)
    return graph


def torch_flop_fraction(cfg, context):
    """The experts' share of a token's FLOPs, from the config (as flop_split reads a GenAI graph)."""
    H, hd, L = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    experts = L * cfg["num_experts_per_tok"] * 2 * 3 * H * cfg["moe_intermediate_size"]
    attn = L * 2 * (2 * H * cfg["num_attention_heads"] * hd + 2 * H * cfg["num_key_value_heads"] * hd)
    other = attn + L * 2 * H * cfg["num_experts"] + 2 * H * cfg["vocab_size"] + \
        L * 2 * 2 * cfg["num_attention_heads"] * hd * context
    return experts / (experts + other)


def load_cost(graphs, threads, turns=5):
    """Medians of session creation in fresh processes, the graphs taking turns."""
    rows = {n: [] for n in graphs}
    for _ in range(turns):
        for name, graph in graphs.items():
            r = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(graph), str(threads)],
                               capture_output=True, text=True, check=True)
            rows[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}


def feeds_for(folder, model, batch, prefill, decode_step):
    from moe_export.run.runtime import make_feeds

    rng = np.random.default_rng(batch)
    if decode_step:
        f = make_feeds(model, dims={"batch_size": batch}, tokens=1, batch=batch, past=prefill, base=folder)
    else:
        f = make_feeds(model, dims={"batch_size": batch}, tokens=prefill, batch=batch, past=0, base=folder)
    f["input_ids"] = rng.integers(3, 512, f["input_ids"].shape).astype(f["input_ids"].dtype)
    return f


def generation(folder, model, batch, prefill, steps, prompt):
    """What a generation of the prompt rows feeds: the prefill (their first `prefill` tokens, an
    empty cache) and, per decode step j, what does not come from the previous step: the row's
    next token (the text's own, so the routers see real text, as a trained model's generation
    would give them), the attention mask and positions after prefill + j cached tokens."""
    pre = feeds_for(folder, model, batch, prefill, False)
    pre["input_ids"] = prompt[:batch, :prefill].astype(pre["input_ids"].dtype)
    fixed = []
    for j in range(steps):
        f = feeds_for(folder, model, batch, prefill + j, True)
        f = {n: v for n, v in f.items() if not n.startswith("past")}
        f["input_ids"] = prompt[:batch, prefill + j:prefill + j + 1].astype(f["input_ids"].dtype)
        fixed.append(f)
    return pre, fixed


def generate(sess, pre, fixed):
    """A timed generation: the prefill, then one token per sequence per step, each step's
    present.* fed back as its cache (for the cache inputs the step's feeds do not hold), so every
    step decodes on a longer cache, as a deployment does. Returns (prefill s, decode s per step)."""
    from moe_export.run.runtime import present_of

    names = [o.name for o in sess.get_outputs()]
    pasts = [i.name for i in sess.get_inputs() if i.name.startswith("past")]
    missing = [p for p in pasts if present_of(p) not in names]
    if missing:
        raise SystemExit(f"no present output for {missing}")
    t0 = time.perf_counter()
    outs = dict(zip(names, sess.run(None, pre)))
    t1 = time.perf_counter()
    for f in fixed:
        outs = dict(zip(names, sess.run(None, {**{p: outs[present_of(p)] for p in pasts}, **f})))
    return t1 - t0, (time.perf_counter() - t1) / len(fixed)


def time_pair(graphs, batch, threads, prefill, decode, repeats, prompt):
    """Medians of prefill and per-step decode seconds, the graphs alternating."""
    import moe_export
    from moe_export.model.graph import load_model

    sess, feeds = {}, {}
    for name, graph in graphs.items():
        sess[name] = moe_export.session(graph, intra_op_num_threads=threads, inter_op_num_threads=1)
        feeds[name] = generation(graph.parent, load_model(graph), batch, prefill, decode, prompt)
    times = {n: ([], []) for n in graphs}
    for r in range(repeats + 1):  # the first round warms up (arenas, prepacked weights)
        for name, s in sess.items():
            got = generate(s, *feeds[name])
            if r:
                for kept, t in zip(times[name], got):
                    kept.append(t)
    return {n: (statistics.median(p), statistics.median(d)) for n, (p, d) in times.items()}


def pair_counts(graph, ids):
    """(routed pairs, static pairs) of `graph` over the token ids [batch, n] (`moe-export profile`)."""
    from genai_cpu import cli

    path = WORK / "pairs.npy"
    np.save(path, ids)
    total = json.loads(cli("profile", graph, "--data", path, "--json"))["total"]
    return total["pairs"], total["pairs_static"]


def cuts(graph, rows, prefill):
    """The pair cut of the prefill (the rows' first `prefill` tokens) and of the decode steps (the
    rest). A decode step routes its token as a prefill of the whole row routes that position
    (causal attention), so the decode's pairs are the whole rows' minus the prefill's."""
    p, ps = pair_counts(graph, rows[:, :prefill])
    a, a_s = pair_counts(graph, rows)
    return 1 - p / ps, 1 - (a - p) / (a_s - ps)


def per_expert_twin(original, converted):
    """The calibrated routing converted again with `--per-expert-weights`: each expert's MatMuls
    read initializers of their own, which onnxruntime prepacks at load (faster GEMMs, for a
    second copy of the weights in memory), instead of the default form's in-place slices."""
    from genai_cpu import cli

    twin = WORK / f"{original.parent.name}.per_expert.onnx"
    if not twin.exists():
        routers = json.loads(cli("inspect", converted, "--json"))["converted"]["routers"]
        attrs = {tuple(r["attrs"][a] for a in ("policy", "threshold", "min_experts", "max_experts")) for r in routers}
        if len(attrs) != 1:
            raise SystemExit(f"{converted}: layers calibrated apart; one --threshold cannot repeat them")
        policy, threshold, low, high = attrs.pop()
        cli("convert", original, "--policy", policy, "--threshold", threshold, "--min-experts", low,
            "--max-experts", high, "--per-expert-weights", "-o", twin)
    return twin


def main():
    from genai_cpu import cli, flop_split, text_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES) + list(TORCH_SHAPES),
                    choices=list(SHAPES) + list(TORCH_SHAPES))
    ap.add_argument("--precisions", nargs="+", default=["int4"], choices=["fp32", "int4"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--torch-prefill", type=int, default=16,
                    help="prefill tokens for the torch exports (their original gathers weights per token)")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cut", type=float, default=0.35, help="the fraction of routed pairs to calibrate away")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy_cpu.json")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    todo = [(s, p) for s in args.shapes if s in SHAPES for p in args.precisions] + \
        [(s, "fp32") for s in args.shapes if s in TORCH_SHAPES]
    # QMoE's compute path, onnxruntime's switch (int8: activations quantized, weights prepacked)
    compute = os.environ.get("ORT_QMOE_CPU_QNBIT_GEMM", "default")
    # rows of other (shape, precision, compute) already in --out stay: one can be rerun alone
    old = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    rows = [r for r in old if (r["shape"], r["precision"]) not in todo or r.get("qmoe_compute", "default") != compute]
    for shape, precision in todo:
        t = time.perf_counter()
        if shape in SHAPES:
            arch, sizes = SHAPES[shape]
            original = build(shape, precision) / "model.onnx"
            stream = text_ids(original.parent, 1).ravel()
        else:
            arch, sizes = "qwen3_moe (torch export)", TORCH_SHAPES[shape]
            original = build_torch(shape)
            # bytes: real text in a 512-token vocabulary
            stream = np.frombuffer((Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_bytes(), np.uint8)
        build_s = time.perf_counter() - t
        prefill = args.prefill if shape in SHAPES else args.torch_prefill
        k = sizes["num_experts_per_tok"]
        calib, prompt_file = WORK / f"{shape}_calib.npy", WORK / f"{shape}_prompt.npy"
        # the prompt rows (prefill + decode tokens each), then 16 sequences of other text to calibrate on
        n = max(args.batches) * (prefill + args.decode)
        prompt = stream[:n].astype(np.int64).reshape(max(args.batches), -1)
        np.save(calib, stream[n:n + 16 * prefill].astype(np.int64).reshape(16, prefill))
        np.save(prompt_file, prompt)
        # what the commands take: a GenAI folder, or the graph itself
        source, out = ((original.parent, WORK / f"{shape}_{precision}.dynamic") if shape in SHAPES else
                       (original, WORK / f"{shape}_{precision}.dynamic.onnx"))
        convert_s = None
        if not out.exists():
            t = time.perf_counter()
            cli("calibrate", source, "--data", calib, "--target-experts", round(k * (1 - args.cut), 3), "-o", out)
            convert_s = time.perf_counter() - t
        conv = out / "model.onnx" if out.is_dir() else out
        if shape in SHAPES:
            E_f, R_f = flop_split(original.parent, context=prefill + args.decode / 2)
            f = E_f / (E_f + R_f)
        else:
            f = torch_flop_fraction(sizes, prefill + args.decode / 2)
        underflow = underflow_share(original.parent, prompt[:, :prefill]) if shape in SHAPES else None
        graphs = {"original": original, "converted": conv}
        if shape in TORCH_SHAPES:
            graphs["per_expert"] = per_expert_twin(original, out)
        # each phase's ideal from the pairs cut in the tokens it ran (a batch of one: one row);
        # the routing of given tokens does not depend on the thread count
        phase_cuts = {batch: cuts(out, prompt[:batch], prefill) for batch in args.batches}
        for threads in args.threads:
            load = load_cost(graphs, threads)
            for batch in args.batches:
                med = time_pair(graphs, batch, threads, prefill, args.decode, args.repeats, prompt)
                cut, decode_cut = phase_cuts[batch]
                ideal, decode_ideal = 1 / (1 - f * cut), 1 / (1 - f * decode_cut)
                row = {"shape": shape, "architecture": arch, "precision": precision, "qmoe_compute": compute,
                       "batch": batch,
                       "prefill_tokens": prefill,
                       "threads": threads, "pair_reduction": cut, "expert_flop_fraction": f,
                       "ideal_speedup": ideal, "decode_pair_reduction": decode_cut, "decode_ideal_speedup": decode_ideal,
                       "router_logit_std": ROUTER_LOGIT_STD if shape in SHAPES else None,
                       "original_topk_weights_below_1e-8": underflow,
                       "prefill_speedup": med["original"][0] / med["converted"][0],
                       "decode_speedup": med["original"][1] / med["converted"][1],
                       "prefill_s": {n: m[0] for n, m in med.items()},
                       "decode_ms_per_step": {n: 1e3 * m[1] for n, m in med.items()},
                       "original_load_s": load["original"]["load_s"],
                       "converted_load_s": load["converted"]["load_s"],
                       "original_load_rss_gb": load["original"]["load_rss_gb"],
                       "converted_load_rss_gb": load["converted"]["load_rss_gb"],
                       **({"per_expert_prefill_speedup": med["original"][0] / med["per_expert"][0],
                           "per_expert_decode_speedup": med["original"][1] / med["per_expert"][1],
                           "per_expert_load_s": load["per_expert"]["load_s"],
                           "per_expert_load_rss_gb": load["per_expert"]["load_rss_gb"]} if "per_expert" in med else {}),
                       "build_s": build_s, "calibrate_s": convert_s, "date": date.today().isoformat(),
                       "command": "benchmarks/deploy_cpu.py " + " ".join(sys.argv[1:])}
                for phase, best in (("prefill", ideal), ("decode", decode_ideal)):
                    row[f"{phase}_of_ideal"] = row[f"{phase}_speedup"] / best
                    # of the gain: 0 when nothing is saved
                    row[f"{phase}_gain_of_ideal"] = (row[f"{phase}_speedup"] - 1) / (best - 1) if best > 1 else None
                rows.append(row)
                print(f"{shape} {precision} ({compute}) batch {batch} threads {threads}: prefill pairs -{100 * cut:.1f}% "
                      f"ideal x{ideal:.3f}, got x{row['prefill_speedup']:.3f} ({100 * row['prefill_of_ideal']:.0f}%); "
                      f"decode pairs -{100 * decode_cut:.1f}% ideal x{decode_ideal:.3f}, got "
                      f"x{row['decode_speedup']:.3f} ({100 * row['decode_of_ideal']:.0f}%); load "
                      f"{row['original_load_s']:.2f} -> {row['converted_load_s']:.2f} s, "
                      f"{row['original_load_rss_gb']:.2f} -> {row['converted_load_rss_gb']:.2f} GB", flush=True)
                args.out.write_text(json.dumps(result(args, rows), indent=1) + "\n")
    print(f"wrote {args.out}")


def result(args, rows):
    return {"date": date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "onnxruntime": __import__("onnxruntime").__version__,
            "command": "benchmarks/deploy_cpu.py " + " ".join(sys.argv[1:]),
            "shapes": {s: SHAPES[s][1] if s in SHAPES else TORCH_SHAPES[s] for s in {r["shape"] for r in rows}},
            "prefill_tokens": args.prefill, "torch_prefill_tokens": args.torch_prefill,
            "decode_steps": args.decode, "repeats": args.repeats, "results": rows}


if __name__ == "__main__":
    main()
