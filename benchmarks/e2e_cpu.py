"""End-to-end CPU speed in ONNX Runtime: a Mixtral-shaped model's original graph, its converted
graph at the <=1%-perplexity policy, and ONNX Runtime's fused com.microsoft.MoE on the same weights.

    # 1. export, under transformers 4.x (the per-expert-loop graphs; see below for why):
    python -m venv /tmp/venv4x && /tmp/venv4x/bin/pip install torch==2.13.0 transformers==4.46.3 onnx
    /tmp/venv4x/bin/python benchmarks/e2e_cpu.py export
    # 2. convert, calibrate and time, in the project's venv:
    .venv/bin/python benchmarks/e2e_cpu.py run
    # int4 (weight-only MatMulNBits) too: both graphs quantized, timed beside the fp32 ones
    .venv/bin/python benchmarks/e2e_cpu.py run --int4 --out benchmarks/results/e2e_cpu_int4.json
    # decode through the KV cache (a transformers 5.x --with-past export of the same model shape)
    .venv/bin/python benchmarks/e2e_cpu.py decode

The original is the transformers 4.x export (one MatMul chain per expert over the tokens routed
to it): the 5.x `batched_mm` export gathers a [hidden, intermediate] weight slab per (token, slot)
and needs about 45 GB at 512 tokens for this model, so it cannot be the baseline here. The ORT
MoE graph is the same export with each sparse-MoE block replaced by one com.microsoft.MoE node
(interleaved SwiGLU weights built from the same expert tensors); its outputs are checked
against the original before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path.home() / ".cache" / "moe-export" / "e2e"
DIMS = dict(vocab_size=256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
            num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=4096)
TOKENS = (1, 16, 128, 512, 2048)
THREADS = (1, 2)


# ---------------------------------------------------------------- export (transformers 4.x)

def export(work: Path, dims: dict):
    import torch
    import transformers as tf

    assert int(tf.__version__.split(".")[0]) < 5, "export needs transformers 4.x (per-expert-loop experts)"
    from transformers.models.mixtral import modeling_mixtral as mm

    from moe_export.model.export import _LogitsOnly

    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**dims)).eval()
    k = dims["num_experts_per_tok"]

    class OrtMoE(torch.autograd.Function):
        """Traces as one com.microsoft.MoE node; computes the same thing in PyTorch meanwhile."""

        @staticmethod
        def forward(ctx, x, logits, fc1, fc1_bias, fc2, fc2_bias):
            w, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            y = torch.zeros_like(x)
            for e in range(fc1.shape[0]):
                rows, slot = torch.where(idx == e)
                h = x[rows] @ fc1[e].T + fc1_bias[e]
                a = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
                y.index_add_(0, rows, (a @ fc2[e].T + fc2_bias[e]) * w[rows, slot, None])
            return y

        @staticmethod
        def symbolic(g, x, logits, fc1, fc1_bias, fc2, fc2_bias):
            return g.op("com.microsoft::MoE", x, logits, fc1, fc1_bias, fc2, fc2_bias, k_i=k,
                        activation_type_s="swiglu", swiglu_fusion_i=1, normalize_routing_weights_i=1,
                        activation_alpha_f=1.0, activation_beta_f=0.0)

    def fused_forward(self, hidden):
        b, s, h = hidden.shape
        x = hidden.view(-1, h)
        logits = self.gate(x)
        y = OrtMoE.apply(x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias)
        return y.view(b, s, h), logits

    ids = torch.randint(0, dims["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    work.mkdir(parents=True, exist_ok=True)

    def save(path, **kw):
        with torch.no_grad():
            torch.onnx.export(_LogitsOnly(model), (ids,), str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                              **kw)
        print("wrote", path)

    save(work / "original.onnx")
    for layer in model.model.layers:
        blk = layer.block_sparse_moe
        with torch.no_grad():
            # Interleaved SwiGLU rows (gate_0, up_0, gate_1, ...): ORT's CPU MoE takes only this.
            blk.fc1 = torch.nn.Parameter(torch.stack(
                [torch.stack([e.w1.weight, e.w3.weight], 1).reshape(-1, dims["hidden_size"]) for e in blk.experts]))
            blk.fc2 = torch.nn.Parameter(torch.stack([e.w2.weight for e in blk.experts]))
            blk.fc1_bias = torch.nn.Parameter(torch.zeros(blk.fc1.shape[:2]))
            blk.fc2_bias = torch.nn.Parameter(torch.zeros(blk.fc2.shape[:2]))
            del blk.experts
        blk.forward = fused_forward.__get__(blk, mm.MixtralSparseMoeBlock)
    save(work / "ort_moe.onnx", custom_opsets={"com.microsoft": 1})
    (work / "dims.json").write_text(json.dumps(dims))


# ---------------------------------------------------------------- run (project venv)

def _session(path, threads, custom_ops):
    import onnxruntime as ort
    from moe_export import custom_op_library

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if custom_ops:
        so.register_custom_ops_library(custom_op_library())
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _time(sessions: dict, feeds, min_runs=3, max_runs=15, budget_s=20.0):
    """Median ms per graph; the graphs take turns run by run so drift hits them alike. Run i
    uses feeds[i % len(feeds)]: a single decode token may happen to keep one expert or two, so
    decode is timed over several tokens."""
    for s in sessions.values():
        s.run(None, feeds[0])  # warm-up
    times = {n: [] for n in sessions}
    start = time.perf_counter()
    while True:
        feed = feeds[len(next(iter(times.values()))) % len(feeds)]
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[n].append((time.perf_counter() - t) * 1e3)
        runs = len(next(iter(times.values())))
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() - start > budget_s):
            return {n: statistics.median(v) for n, v in times.items()}, runs


def _target_from_quality(model="mixtral8"):
    q = ROOT / "benchmarks" / "results" / "quality.json"
    if not q.is_file():
        return None
    for m in json.loads(q.read_text())["models"]:
        if m["model"] == model and m["best_at_1pct"]:
            return m["best_at_1pct"]
    return None


def _int4(src: Path, dst: Path) -> int:
    """Weight-only int4 (ONNX Runtime's MatMulNBitsQuantizer, blocks of 32, symmetric): the model a
    user deploys int4 on CPU. Returns how many MatMuls it quantized."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one line per node otherwise
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    return sum(n.op_type == "MatMulNBits" for n in q.model.model.graph.node)


def run(work: Path, out: Path, policy=None, reduction=None, tokens=TOKENS, threads=THREADS, budget_s=20.0,
        int4=False):
    from moe_export.run.calibrate import calibrate
    from moe_export.model.graph import load_model
    from moe_export.conversion import Policy, convert
    from moe_export.run.runtime import session_from_proto
    from moe_export.run.validate import routing_indices, with_routing_outputs

    dims = json.loads((work / "dims.json").read_text())
    original, fused, converted = work / "original.onnx", work / "ort_moe.onnx", work / "converted.onnx"
    source = "command line"
    if policy is None or reduction is None:
        best = _target_from_quality()
        if best is None:
            raise SystemExit("no quality result: pass --policy and --reduction, or run benchmarks/quality.py")
        policy = policy or best["policy"].split()[0]
        reduction = reduction if reduction is not None else best["pair_reduction"]
        source = f"benchmarks/results/quality.json, mixtral8 best at <=1% ppl ({best['policy']})"
    k, E = dims["num_experts_per_tok"], dims["num_local_experts"]
    rng = np.random.default_rng(0)
    calib = rng.integers(0, dims["vocab_size"], (8, 256), dtype=np.int64)
    layers = calibrate(original, {"input_ids": calib}, k * (1 - reduction), policy=policy, mode="per-layer")
    pol = Policy(policy, layers[0]["threshold"], per_layer={x["layer"]: x["threshold"] for x in layers})
    convert(original, converted, pol)
    quantized = {}
    if int4:
        # The converted graph with each expert's matrices as initializers of their own, so the
        # quantizer finds them (the shared-table conversion hides them behind a Gather).
        convert(original, work / "converted_pe.onnx", pol, per_expert_weights=True)
        quantized = {"original_int4": _int4(original, work / "original_int4.onnx"),
                     "converted_int4": _int4(work / "converted_pe.onnx", work / "converted_int4.onnx")}
        print(f"int4 MatMulNBits: {quantized}")

    # Realized reduction on fresh tokens, and parity of the ORT MoE graph with the original.
    probe = {"input_ids": rng.integers(0, dims["vocab_size"], (1, 512), dtype=np.int64)}
    cm = load_model(converted)
    names, _ = routing_indices(cm)
    outs = session_from_proto(with_routing_outputs(cm, names), work, intra_op_num_threads=2).run(None, probe)
    pairs = sum(int((o < E).sum()) for o in outs[1:])
    realized = 1 - pairs / (probe["input_ids"].size * k * len(names))
    ref = _session(original, 2, False).run(None, probe)[0]
    fused_err = float(np.abs(_session(fused, 2, False).run(None, probe)[0] - ref).max())
    print(f"policy {policy}, per-layer thresholds {[round(x['threshold'], 4) for x in layers]}: "
          f"pairs -{100 * realized:.1f}% on 512 fresh tokens (target -{100 * reduction:.1f}%); "
          f"ORT MoE vs original max |diff| {fused_err:.2e}")

    sweep = []
    for t in threads:
        sessions = {"original": _session(original, t, False), "converted": _session(converted, t, True),
                    "ort_moe": _session(fused, t, False)}
        if int4:
            sessions |= {"original_int4": _session(work / "original_int4.onnx", t, False),
                         "converted_int4": _session(work / "converted_int4.onnx", t, True)}
        for n in tokens:
            feeds = [{"input_ids": rng.integers(0, dims["vocab_size"], (1, n), dtype=np.int64)}
                     for _ in range(16 if n == 1 else 1)]
            med, runs = _time(sessions, feeds, max_runs=48 if n == 1 else 15, budget_s=budget_s)
            row = {"threads": t, "tokens": n, "runs": runs, "baseline_ms": med["original"],
                   "converted_ms": med["converted"], "ort_moe_ms": med["ort_moe"],
                   "speedup": med["original"] / med["converted"], "speedup_vs_ort_moe": med["ort_moe"] / med["converted"]}
            if int4:
                row |= {"original_int4_ms": med["original_int4"], "converted_int4_ms": med["converted_int4"],
                        "speedup_int4": med["original_int4"] / med["converted_int4"]}
            sweep.append(row)
            print(f"threads {t} tokens {n:5d}: original {row['baseline_ms']:9.2f} ms, converted "
                  f"{row['converted_ms']:9.2f} ms ({row['speedup']:.2f}x), ORT MoE {row['ort_moe_ms']:9.2f} ms "
                  f"(converted {row['speedup_vs_ort_moe']:.2f}x of it), {runs} runs each")
            if int4:
                print(f"    int4: original {row['original_int4_ms']:9.2f} ms, converted {row['converted_int4_ms']:9.2f} ms "
                      f"({row['speedup_int4']:.2f}x)")
        del sessions
    head = next((r for r in sweep if r["tokens"] == 512 and r["threads"] == 1), sweep[0])
    result = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} build VM",
              "dims": dims, "policy": policy, "policy_source": source, "target_pair_reduction": reduction,
              "pair_reduction": realized, "thresholds": [x["threshold"] for x in layers],
              "ort_moe_max_abs_diff": fused_err,
              "tokens": head["tokens"], "threads": head["threads"], "speedup": head["speedup"],
              "baseline_ms": head["baseline_ms"], "converted_ms": head["converted_ms"],
              "ort_moe_ms": head["ort_moe_ms"], "int4_matmuls": quantized, "sweep": sweep}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"512 tokens, 1 thread: {head['speedup']:.2f}x over the original; wrote {out}")


def decode(work: Path, out: Path, past_len=64, steps=16, budget_s=20.0):
    """Decode with the KV cache: the same Mixtral-shaped model exported by `moe-export export
    --with-past` (transformers 5.x, batched_mm experts: at one token per step they gather two
    weight slabs, the natural decode form), its conversion at the quality policy (calibrated on
    prefills), and one-token steps after a cached prefix of `past_len` tokens, timed in turns.
    Prefills are kept short: that export gathers a 14 MB weight slab per (token, slot) and matrix."""
    import torch
    import transformers as tf

    from moe_export.run.calibrate import calibrate
    from moe_export.model.export import export_model
    from moe_export.conversion import Policy, convert
    from moe_export.run.runtime import load_inputs

    dims = dict(DIMS)
    original, converted = work / "past_original.onnx", work / "past_converted.onnx"
    if not original.is_file():
        torch.manual_seed(0)
        model = tf.MixtralForCausalLM._from_config(tf.MixtralConfig(**dims), experts_implementation="batched_mm")
        export_model(model.eval(), original, with_past=True)
    best = _target_from_quality()
    policy, reduction = best["policy"].split()[0], best["pair_reduction"]
    rng = np.random.default_rng(0)
    np.save(work / "calib.npy", rng.integers(0, dims["vocab_size"], (2, 16), dtype=np.int64))
    import onnx
    proto = onnx.load(str(original), load_external_data=False)
    layers = calibrate(original, load_inputs(work / "calib.npy", proto), dims["num_experts_per_tok"] *
                       (1 - reduction), policy=policy, mode="per-layer")
    convert(original, converted, Policy(policy, layers[0]["threshold"],
                                        per_layer={x["layer"]: x["threshold"] for x in layers}))
    # static: the regrouped experts alone (no slot dropped), to tell their gain from routing's
    convert(original, work / "past_static.onnx", Policy("static"))
    sessions = {"original": _session(original, 1, False), "converted": _session(converted, 1, True),
                "static": _session(work / "past_static.onnx", 1, True)}
    np.save(work / "prefix.npy", rng.integers(0, dims["vocab_size"], (1, past_len), dtype=np.int64))
    pre = sessions["original"].run(None, load_inputs(work / "prefix.npy", proto))
    names = [o.name for o in sessions["original"].get_outputs()]
    past = {"past_key_values." + n[len("present."):]: v for n, v in zip(names, pre) if n.startswith("present.")}
    feeds = [{"input_ids": rng.integers(0, dims["vocab_size"], (1, 1), dtype=np.int64),
              "attention_mask": np.ones((1, past_len + 1), np.int64),
              "position_ids": np.array([[past_len]], np.int64), **past} for _ in range(steps)]
    med, runs = _time(sessions, feeds, max_runs=64, budget_s=budget_s)
    result = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} build VM",
              "dims": dims, "policy": policy, "target_pair_reduction": reduction, "past_len": past_len,
              "threads": 1, "runs": runs, "original_ms": med["original"], "converted_ms": med["converted"],
              "static_converted_ms": med["static"], "speedup": med["original"] / med["converted"],
              "speedup_static": med["original"] / med["static"]}
    out.write_text(json.dumps(result, indent=1))
    print(f"decode after {past_len} cached tokens, 1 thread: original {med['original']:.2f} ms, converted "
          f"{med['converted']:.2f} ms ({result['speedup']:.2f}x; converted static {med['static']:.2f} ms, "
          f"{result['speedup_static']:.2f}x), {runs} runs each; wrote {out}")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, t in zip(axes, sorted({r["threads"] for r in result["sweep"]})):
        rows = [r for r in result["sweep"] if r["threads"] == t]
        n = [r["tokens"] for r in rows]
        ax.plot(n, [r["speedup"] for r in rows], "o-", label="converted vs original")
        ax.plot(n, [r["baseline_ms"] / r["ort_moe_ms"] for r in rows], "s--",
                label="ORT com.microsoft.MoE (static) vs original")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens per call")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
    axes[0].set_ylabel("speedup over the original graph")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Mixtral-shaped (h{result['dims']['hidden_size']}, i{result['dims']['intermediate_size']}, "
                 f"8e top-2, {result['dims']['num_hidden_layers']} layers), {result['policy']} at "
                 f"-{100 * result['pair_reduction']:.0f}% pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--work", type=Path, default=WORK)
    e.add_argument("--small", action="store_true", help="tiny dimensions, to check the pipeline quickly")
    r = sub.add_parser("run")
    r.add_argument("--work", type=Path, default=WORK)
    r.add_argument("--policy", choices=["top-p", "ratio", "entropy"])
    r.add_argument("--reduction", type=float, help="pair reduction to calibrate to (default: quality.json)")
    r.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    r.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    r.add_argument("--budget-s", type=float, default=20.0, help="time per configuration, at least 3 runs")
    r.add_argument("--int4", action="store_true", help="also time both graphs quantized to int4 (MatMulNBits)")
    r.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e_cpu.json")
    d = sub.add_parser("decode", help="one-token steps through the KV cache (transformers 5.x --with-past export)")
    d.add_argument("--work", type=Path, default=WORK)
    d.add_argument("--past", type=int, default=64, help="cached tokens before each step")
    d.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e_cpu_decode.json")
    a = ap.parse_args()
    if a.cmd == "export":
        dims = dict(DIMS, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) \
            if a.small else DIMS
        export(a.work, dims)
    elif a.cmd == "decode":
        decode(a.work, a.out, a.past)
    else:
        run(a.work, a.out, a.policy, a.reduction, a.tokens, a.threads, a.budget_s, a.int4)


if __name__ == "__main__":
    main()
