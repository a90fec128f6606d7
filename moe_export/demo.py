"""The built-in main job: export a tiny Mixtral, convert it, compare both graphs in ONNX Runtime."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import MoeExportError


def tiny_mixtral(seed=0, experts=8, k=2):
    import torch
    import transformers as tf

    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=k, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # spread the random router's scores, as a trained router's are
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def run_demo(workdir: Path, json_out=False):
    from .model.export import _quiet_exporter, export_checkpoint
    from .conversion import Policy, convert
    from .run.stats import fewer
    from .run.validate import validate

    _quiet_exporter()
    workdir.mkdir(parents=True, exist_ok=True)
    original = workdir / "tiny_mixtral.onnx"
    with tempfile.TemporaryDirectory() as ckpt:
        tiny_mixtral().save_pretrained(ckpt)
        export_checkpoint(ckpt, original)
    runs = {}
    for label, pol in (("static", Policy("static")), ("top-p 0.6", Policy("top-p", 0.6))):
        out = workdir / f"tiny_mixtral.{label.split()[0]}.onnx"
        convert(original, out, pol)
        runs[label] = validate(original, out, dims={"batch": 2, "seq": 64})
    if json_out:
        print(json.dumps(runs, indent=2))
        return
    print(f"exported {original} (tiny Mixtral: 2 layers, 8 experts, top-2)")
    for label, rep in runs.items():
        (name, s), = rep["outputs"].items()
        rp = rep["routed_pairs"]
        line = (f"[{label}] {name}: max_abs={s['max_abs']:.2e} mean_abs={s['mean_abs']:.2e}; routed pairs "
                f"{rp['original']} -> {rp['converted']} ({fewer(rp['reduction'])})")
        if rep["static_policy"]:
            line += f"; reproduces original: {'yes' if rep['static_reproduces'] else 'NO'}"
        print(line)
    if not runs["static"]["static_reproduces"]:
        raise MoeExportError("static conversion does not reproduce the original")
