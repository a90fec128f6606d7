"""Every Mixture-of-Experts causal-LM family in the installed transformers, as a new user meets it.

    .venv/bin/python benchmarks/families.py [--only mixtral zaya ...] [-j 2]

For each family: a tiny random config derived from its defaults (sizes shrunk, the same expert
structure), seeded weights with routers spread as trained ones are, then the steps a user runs:
`moe-export export` (dynamo), `convert --policy static` (must reproduce the export: max |diff| of
the logits in ONNX Runtime), and `convert --policy top-p --threshold 1e-6`, one expert per token,
which must compute what the same PyTorch model computes with its config routing to one expert
(and not what the k-expert model computes). A family that cannot get through a step records the
step and the one-line reason moe-export gave. Writes benchmarks/results/families.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TINY = dict(vocab_size=128, unpadded_vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16, first_k_dense_replace=0, moe_layer_start_index=0,
            decoder_sparse_step=1, n_group=4, topk_group=2, n_shared_experts=1, sliding_window=16,
            o_lora_rank=16, index_n_heads=2, index_head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
            swa_head_dim=8, sliding_window_size=16, rel_extent=16)
# Config keys that hold the number of experts per token (other counts with "expert" in the name
# are expert counts or sizes).
K_KEY = re.compile(r"(experts_per_tok|^moe_k$|^(moe_)?top_?k$|selected_experts)")
# What the derived config cannot guess: sizes that must divide each other, families whose defaults
# are not a causal LM one can build.
OVERRIDES = {
    "dots3_note_text": dict(num_key_value_heads=4),
    "mistral4": dict(head_dim=16),
    "flint": dict(mlp_only_layers=[]),
    "doge": dict(is_moe=True, num_experts=64, num_experts_per_tok=4),  # product-key experts: 8 x 8 keys
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["conv", "full_attention"]),
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=64),
    "zaya": dict(num_experts_per_tok=1),  # transformers' ZAYA supports one expert per token only
    # DBRX's attention clamps with clip_qkv (8 in the released config; None fails in transformers)
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                 attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0), ffn_config=dict(hidden_size=32, ffn_hidden_size=32,
                                                                 moe_num_experts=8, moe_top_k=2)),
}


def _shrink(d: dict) -> dict:
    n_layers = d.get("num_hidden_layers")
    for k, v in list(d.items()):
        if isinstance(v, dict) and "hidden_size" in v:
            _shrink(v)
        elif isinstance(v, bool) or not (v is None or isinstance(v, (int, list, dict))):
            continue
        elif k in TINY and isinstance(v, int):
            d[k] = TINY[k]
        elif k == "head_dim" and v is None:
            d[k] = TINY[k]
        elif k.endswith("token_id") and isinstance(v, int) and v >= TINY["vocab_size"]:
            d[k] = 0
        elif k == "num_experts_per_tok" and v is None:
            d[k] = 2
        elif isinstance(v, int) and K_KEY.search(k):
            d[k] = 2
        elif isinstance(v, int) and "expert" in k:
            if "group" in k:
                d[k] = 4
            elif "shared" in k and "size" not in k:
                d[k] = min(v, 1)
            elif "size" in k or "dim" in k:
                d[k] = 32
            elif v > 1:
                d[k] = 8
        elif isinstance(v, list) and n_layers and len(v) == n_layers > 2:
            d[k] = [v[0], v[-1]]  # per-layer lists: the first layers are often dense, the last sparse
        elif k == "per_layer_config" and isinstance(v, dict):
            d[k] = {}
    if d.get("kv_lora_rank") and d.get("num_key_value_heads"):  # MLA: one latent per head
        d["num_key_value_heads"] = d["num_attention_heads"]
    return d


def _merge(d: dict, over: dict) -> dict:
    for k, v in over.items():
        d[k] = _merge(dict(d.get(k) or {}), v) if isinstance(v, dict) else v
    return d


def k_keys(d: dict, path=()):
    """Paths of the experts-per-token entries in a config dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from k_keys(v, path + (k,))
        elif isinstance(v, int) and not isinstance(v, bool) and K_KEY.search(k):
            yield path + (k,)


def families():
    """(model_type, config class, causal-LM class name) of every MoE family: a config that declares
    experts and a ForCausalLM class; a multimodal wrapper counts once, as its text model."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moe_export.model.export import _declares_experts

    for mt, cname in CONFIG_MAPPING_NAMES.items():
        lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or cname.replace("Config", "ForCausalLM")
        if not hasattr(tf, lm):
            continue
        try:
            d = getattr(tf, cname)().to_dict()
        except Exception:
            continue
        text = (d.get("text_config") or {}).get("model_type")
        if text in CONFIG_MAPPING_NAMES and text != mt:
            continue
        if _declares_experts(d):
            yield mt, cname, lm


def tiny_model(mt, cname, lm, k=None):
    import torch
    import transformers as tf

    d = _merge(_shrink(getattr(tf, cname)().to_dict()), OVERRIDES.get(mt, {}))
    if k is not None:
        for path in list(k_keys(d)):
            _get(d, path[:-1])[path[-1]] = k
    cfg = getattr(tf, cname).from_dict(d)
    cfg.architectures = [lm]
    torch.manual_seed(0)
    model = getattr(tf, lm)._from_config(cfg)
    with torch.no_grad():  # random routers are near uniform; trained ones are not
        for name, p in model.named_parameters():
            if re.search(r"(gate|router)(\.linear)?\.weight$", name):
                p.normal_(0.0, 0.5)
    return model.eval()


def run_family(family):
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from moe_export import MoeExportError
    from moe_export.model.export import _batched_experts, _quiet_exporter, export_checkpoint
    from moe_export.conversion import Policy, convert
    from moe_export.run.runtime import session

    _quiet_exporter()
    mt, cname, lm = family
    row = {"family": mt}
    step = "build"
    t0 = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = tiny_model(*family)
            d = model.config.to_dict()
            row["k"] = next((_get(d, p) for p in k_keys(d)), None)
            model.save_pretrained(tmp / "ckpt")
            step = "export"
            export_checkpoint(tmp / "ckpt", tmp / "m.onnx", external_data=False)
            ids = np.random.default_rng(0).integers(0, 128, (2, 12))
            feeds = {"input_ids": ids}
            base = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            step = "convert"
            convert(tmp / "m.onnx", tmp / "static.onnx", Policy("static"))
            row["routers"] = sum(n.op_type == "DynamicRouter" for n in onnx.load(str(tmp / "static.onnx")).graph.node)
            row["static_max_diff"] = float(np.abs(session(str(tmp / "static.onnx")).run(None, feeds)[0] - base).max())
            step = "top-p"
            convert(tmp / "m.onnx", tmp / "top1.onnx", Policy("top-p", 1e-6))
            got = session(str(tmp / "top1.onnx")).run(None, feeds)[0]
            k1 = load_checkpoint_k1(family, tmp)
            # The looped experts the exporter cannot take fail in eager mode too at k=1 (LongCat's
            # squeeze); the batched form export uses computes the same numbers.
            with torch.no_grad(), _batched_experts(k1), _one_pick(mt):
                want = k1(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()
            row["top1_vs_k1_model"] = float(np.abs(got - want).max())
            row["top1_vs_k_model"] = float(np.abs(got - base).max())
            ok = row["static_max_diff"] < 1e-4 and row["top1_vs_k1_model"] < 1e-4
            row["status"] = "ok" if ok else "wrong"
    except MoeExportError as e:
        row.update(status=f"fails at {step}", reason=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001  (the sweep reports, whatever broke)
        row.update(status=f"fails at {step}", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    row["seconds"] = round(time.time() - t0, 1)
    return row


@contextmanager
def _one_pick(mt):
    """PhiMoE's sparse mixer always picks two experts, whatever the config says: routed to one,
    it is the same model weighing its first pick alone."""
    if mt != "phimoe":
        yield
        return
    import torch
    import transformers.models.phimoe.modeling_phimoe as phimoe

    mixer = phimoe.sparsemixer
    phimoe.sparsemixer = lambda *a, **kw: (lambda w, sel: (w * torch.tensor([1.0, 0.0]), sel))(*mixer(*a, **kw))
    try:
        yield
    finally:
        phimoe.sparsemixer = mixer


def _get(d, path):
    for p in path:
        d = d[p]
    return d


def load_checkpoint_k1(family, tmp):
    """The same weights with the config routing one expert per token, loaded as moe-export export
    loads a checkpoint (batched experts)."""
    from moe_export.model.export import load_checkpoint

    tiny_model(*family, k=1).save_pretrained(tmp / "k1")
    return load_checkpoint(tmp / "k1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types (default: every MoE family)")
    ap.add_argument("-j", type=int, default=2, help="families at a time (each in its own process)")
    args = ap.parse_args()
    import transformers
    import torch

    fams = [f for f in families() if not args.only or f[0] in args.only]
    rows = []
    with mp.get_context("spawn").Pool(args.j, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_family, fams):
            print(f"{row['family']:24s} {row['status']:18s} {row.get('reason', '')[:100]}", flush=True)
            rows.append(row)
    rows.sort(key=lambda r: r["family"])
    out = HERE / "results" / "families.json"
    prev = json.loads(out.read_text()) if out.exists() and args.only else {"families": []}
    keep = [r for r in prev["families"] if r["family"] not in {r["family"] for r in rows}]
    result = {"date": date.today().isoformat(), "transformers": transformers.__version__, "torch": torch.__version__,
              "command": "python benchmarks/families.py", "families": sorted(keep + rows, key=lambda r: r["family"])}
    counts = {}
    for r in result["families"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    result["summary"] = counts
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
