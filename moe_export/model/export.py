"""Export a local transformers MoE checkpoint to ONNX (no hub access)."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoeExportError
from .files import Output, Spinner
from .graph import load_model, opset_version
from ..run.runtime import SLIDING_WINDOW



def _declares_experts(cfg: dict) -> bool:
    """Mixture-of-Experts configs name an expert count (num_experts, num_local_experts,
    n_routed_experts, moe_num_experts, ...), possibly in a sub-config (text_config)."""
    for k, v in cfg.items():
        if isinstance(v, dict) and _declares_experts(v):
            return True
        if "expert" in str(k) and not isinstance(v, bool) and isinstance(v, int) and v > 1:
            return True
    return False


def _transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise MoeExportError("export needs torch and transformers: pip install 'moe-export[export]'") from None
    return transformers


def _with_past(model):
    """(wrapper, example inputs, input names, output names, dynamic shapes) for a decoder graph
    with a KV cache: input_ids, attention_mask, position_ids and past_key_values.N.key/value in;
    logits and present.N.key/value out. The cache layout (per-layer key / value shapes) is read
    off one forward pass, so MLA's differing key and value head sizes come out right."""
    import torch
    from torch.export import Dim
    from transformers import DynamicCache

    cfg = model.config
    probe = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad():
        cache = model(input_ids=probe, use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(not (hasattr(c, "keys") and hasattr(c, "values")) or c.keys is None for c in layers):
        raise MoeExportError(f"export --with-past: {cfg.model_type}'s cache is not one key/value pair per layer "
                             "(recurrent or convolution state); export it without --with-past")
    L = len(layers)

    class WithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            # Every layer keeps its whole cache, sliding ones too (their window is applied by the
            # attention mask): a sliding layer's own cache stops growing at window - 1 while
            # all layers share one past_sequence_length, so the graph broke once past the window.
            cache = DynamicCache()
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    B, S, P = 2, 5, 3
    past = tuple(torch.zeros((B, *t.shape[1:2], P, *t.shape[3:]), dtype=t.dtype)
                 for c in layers for t in (c.keys, c.values))
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones((B, P + S), dtype=torch.long), torch.arange(P, P + S).repeat(B, 1), past)
    b, s, pl = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    shapes = ({0: b, 1: s}, {0: b, 1: Dim("total_sequence_length")}, {0: b, 1: s}, tuple({0: b, 2: pl} for _ in past))
    kv = [f"{i}.{n}" for i in range(L) for n in ("key", "value")]
    return (WithPast(model), args, ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{x}" for x in kv],
            ["logits"] + [f"present.{x}" for x in kv], shapes)


class _LogitsOnly:
    """Wraps a causal LM so the exported graph takes input_ids and returns logits only."""

    def __new__(cls, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                return self.m(input_ids=input_ids, use_cache=False).logits

        return Wrapper(model)


def load_checkpoint(ckpt_dir):
    tf = _transformers()
    _quiet_exporter()
    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file():
        raise MoeExportError(f"{ckpt}: not a transformers checkpoint directory (no config.json)")
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
        model_type = cfg.get("model_type")
    except (ValueError, AttributeError):
        raise MoeExportError(f"{ckpt}/config.json is not a JSON object") from None
    if not _declares_experts(cfg):
        raise MoeExportError(f"unsupported architecture {model_type!r}: its config declares no experts "
                             "(moe-export works on Mixture-of-Experts models)")
    try:
        tf.AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as e:
        raise MoeExportError(f"{ckpt}: cannot read config.json ({str(e).splitlines()[0]})") from None
    kw = {"local_files_only": True}
    if int(tf.__version__.split(".")[0]) >= 5:
        # The default grouped_mm and eager expert implementations do not export (shared/BUILDING.md).
        kw["experts_implementation"] = "batched_mm"
    # A causal LM the Auto mapping does not list (Mistral4, ...) loads through the class its
    # checkpoint names.
    named = [getattr(tf, a) for a in cfg.get("architectures") or [] if a.endswith("ForCausalLM") and hasattr(tf, a)]
    try:
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), **kw)
        except ValueError:
            if not named:
                raise
            model = named[0].from_pretrained(str(ckpt), **kw)
    except Exception as e:
        raise MoeExportError(f"{ckpt}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.eval()


def export_model(model, out, *, opset=18, exporter="dynamo", external_data=True, example_tokens=8, protect=(),
                 with_past=False):
    """Exports `model` (a transformers causal LM) to `out` with dynamic batch and sequence axes.
    `protect`: files no output may replace (the checkpoint's). with_past: a decoder graph with a
    KV cache (see _with_past), for generation token by token."""
    import torch

    out = Path(out)
    if exporter not in ("dynamo", "torchscript"):
        raise MoeExportError(f"unknown exporter {exporter!r} (dynamo or torchscript)")
    if with_past and exporter != "dynamo":
        raise MoeExportError("export --with-past uses the dynamo exporter")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, example_tokens), generator=torch.Generator().manual_seed(0))
    wrapper = _LogitsOnly(model)
    _quiet_exporter()
    with Output(protected=protect) as o:
        o.check_model_path(out)
        # Export into a scratch folder beside the output so the final move is a rename.
        staged = o.temp_dir(out.parent, f".{out.name}.") / out.name
        try:
            with torch.no_grad(), Spinner(f"exporting with torch.onnx ({exporter})"), _real_rotary(model), \
                    _batched_experts(model), _stdout_to_stderr_log() as log:
                if with_past:
                    wrapped, args, names, outs, shapes = _with_past(model)
                    torch.onnx.export(wrapped, args, str(staged), dynamo=True, opset_version=opset,
                                      input_names=names, output_names=outs, dynamic_shapes=shapes,
                                      external_data=external_data, verbose=False)
                elif exporter == "dynamo":
                    from torch.export import Dim
                    torch.onnx.export(wrapper, (ids,), str(staged), dynamo=True, opset_version=opset,
                                      input_names=["input_ids"], output_names=["logits"],
                                      dynamic_shapes={"input_ids": {0: Dim("batch"), 1: Dim("seq")}},
                                      external_data=external_data, verbose=False)
                else:
                    torch.onnx.export(wrapper, (ids,), str(staged), dynamo=False, opset_version=min(opset, 17),
                                      input_names=["input_ids"], output_names=["logits"],
                                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                    "logits": {0: "batch", 1: "seq"}})
        except MoeExportError:
            raise
        except Exception as e:
            raise MoeExportError(_export_failure(e, exporter, log)) from None
        model_proto = load_model(staged)
        wrote = opset_version(model_proto)
        if exporter == "dynamo" and wrote != opset:  # torch's version converter falls back silently
            raise MoeExportError(f"--opset {opset}: torch.onnx wrote opset {wrote} instead (its version converter "
                                 f"does not reach {opset}); choose a lower one")
        fixed = _fixed_axes(model_proto)
        if fixed:
            raise MoeExportError(
                f"the exporter could not keep {fixed} dynamic: {model.config.model_type}'s code specializes it "
                "(torch.export reports constraint violations; e.g. chunked linear attention padding to a chunk "
                "size), and a graph that only runs at the example size is not written")
        if not external_data:
            import onnx
            model_proto = onnx.load(str(staged))  # small models: embed the weights in one file
        window = sliding_window(model.config)
        if with_past and window:  # so validate's default inputs go past it
            model_proto.metadata_props.add(key=SLIDING_WINDOW, value=str(window))
        o.model(model_proto, out, staged.parent, owned=True)
    return out


def sliding_window(config) -> int | None:
    """The attention window of a config with sliding-window layers, else None."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and not any("sliding" in str(t) for t in types)):
        return None
    return int(window)


def _fixed_axes(model_proto) -> str:
    """The axes asked to be dynamic that came out as fixed sizes: when torch.export fails on a
    dynamic axis, torch.onnx falls back to capturing the example shapes and says nothing."""
    fixed = []
    for i in model_proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        axes = (0, 2) if i.name.startswith("past_key_values.") else range(len(dims))
        fixed += [f"{i.name} axis {a} (= {dims[a].dim_value})" for a in axes
                  if a < len(dims) and dims[a].HasField("dim_value")]
    return ", ".join(fixed)


# Families whose rotary embedding multiplies complex numbers (torch.polar, view_as_complex), which
# the ONNX exporter cannot convert: while exporting, the rotary yields (cos, sin) pairs and the
# rotation is done in real arithmetic (the same numbers). Value: how each broadcasts the
# frequencies [batch, seq, dim/2] against the queries and keys.
_COMPLEX_ROTARY = {
    "transformers.models.deepseek_v2.modeling_deepseek_v2": ("DeepseekV2RotaryEmbedding", lambda f: f.unsqueeze(1)),
    "transformers.models.llama4.modeling_llama4": ("Llama4TextRotaryEmbedding", lambda f: f[:, :, None]),
}


@contextmanager
def _real_rotary(model):
    import importlib

    import torch

    patched = []
    for name, (cls_name, spread) in _COMPLEX_ROTARY.items():
        if not any(type(m).__module__ == name for m in model.modules()):
            continue
        mod = importlib.import_module(name)
        cls = getattr(mod, cls_name)

        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

        def apply(xq, xk, pairs, spread=spread):
            c, s = spread(pairs[..., 0]), spread(pairs[..., 1])

            def rotate(x):
                re, im = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
                return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(3).type_as(x)
            return rotate(xq), rotate(xk)

        patched.append((cls, "forward", cls.forward))
        patched.append((mod, "apply_rotary_emb", mod.apply_rotary_emb))
        cls.forward, mod.apply_rotary_emb = forward, apply
    try:
        yield
    finally:
        for owner, attr_name, old in patched:
            setattr(owner, attr_name, old)


def _dbrx_experts(self, hidden_states, top_k_index, top_k_weights):
    x = hidden_states.reshape(-1, self.hidden_size)
    shape = (-1, self.ffn_hidden_size, self.hidden_size)
    w1, v1, w2 = (p.view(shape)[top_k_index] for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))  # [T, k, I, H]
    xi = x[:, None, :, None]
    h = self.mlp.activation_fn((w1 @ xi).squeeze(-1)) * (v1 @ xi).squeeze(-1)
    out = (h[..., None, :] @ w2).squeeze(-2)
    return (out * top_k_weights[..., None]).sum(1).view(hidden_states.shape[0], -1, self.hidden_size)


def _longcat_experts(self, hidden_states, top_k_index, top_k_weights):
    import torch
    routed = top_k_index < self.num_routed_experts  # the rest are zero-compute (identity) experts
    idx = torch.where(routed, top_k_index, 0)
    xi = hidden_states[:, None, :, None]
    gate, up = (self.gate_up_proj[idx] @ xi).squeeze(-1).chunk(2, dim=-1)
    out = (self.down_proj[idx] @ (self.act_fn(gate) * up)[..., None]).squeeze(-1)
    out = torch.where(routed[..., None], out, hidden_states[:, None, :])
    return (out * top_k_weights[..., None]).sum(1).to(hidden_states.dtype)


# Families whose experts run a data-dependent loop over the experts hit (`.item()`, `nonzero`)
# and take no `experts_implementation`: while exporting, every (token, slot) gathers its expert's
# matrices, as transformers' batched_mm does (the same numbers).
_LOOPED_EXPERTS = {
    "transformers.models.dbrx.modeling_dbrx": ("DbrxExperts", _dbrx_experts),
    "transformers.models.longcat_flash.modeling_longcat_flash": ("LongcatFlashExperts", _longcat_experts),
}


@contextmanager
def _batched_experts(model):
    patched = []
    for m in model.modules():
        entry = _LOOPED_EXPERTS.get(type(m).__module__)
        if entry and type(m).__name__ == entry[0] and not any(c is type(m) for c, _ in patched):
            patched.append((type(m), type(m).forward))
            type(m).forward = entry[1]
    try:
        yield
    finally:
        for cls, fwd in patched:
            cls.forward = fwd


def _export_failure(e, exporter, log) -> str:
    import re

    first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[0]) if str(e).strip() else ""
    cause = e.__cause__ or e.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause).strip():  # the exporters' own first line says only which step failed
        first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    if exporter == "torchscript":
        # The TorchScript exporter cannot trace transformers 5.x models (their masks and expert
        # dispatch are written for torch.export) and dumps the whole TorchScript IR when it fails.
        return ("the torchscript exporter cannot export this model (transformers "
                f"{_transformers().__version__}); use --exporter dynamo ({type(e).__name__}: {first[:200]})")
    return f"export failed: {type(e).__name__}: {first[:300]}"


@contextmanager
def _stdout_to_stderr_log():
    """Captures what the exporters print on file descriptors 1 and 2 (TorchScript IR dumps,
    C++ warnings); shown only with --debug. Yields the file it went to."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+b") as log:
        if os.environ.get("MOE_EXPORT_DEBUG"):
            yield log
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield log
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _quiet_exporter():
    """The exporters warn at length about things that do not concern the user (torchvision ops,
    deprecations); moe-export reports its own outcome."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def export_checkpoint(ckpt_dir, out, **kw):
    ckpt_files = [p for p in Path(ckpt_dir).iterdir() if p.is_file()] if Path(ckpt_dir).is_dir() else []
    Output(protected=ckpt_files).check_model_path(Path(out))  # before loading the weights
    return export_model(load_checkpoint(ckpt_dir), out, protect=ckpt_files, **kw)
