"""Export a local transformers MoE checkpoint to ONNX (no hub access)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from . import MoeExportError
from .graph import load_model, write_model_atomic

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def _transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise MoeExportError("export needs torch and transformers: pip install 'moe-export[export]'") from None
    return transformers


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
        model_type = json.loads((ckpt / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise MoeExportError(f"{ckpt}/config.json is not a JSON object") from None
    if model_type not in SUPPORTED:
        raise MoeExportError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")
    try:
        tf.AutoConfig.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as e:
        raise MoeExportError(f"{ckpt}: cannot read config.json ({str(e).splitlines()[0]})") from None
    kw = {"local_files_only": True}
    if int(tf.__version__.split(".")[0]) >= 5:
        # The default grouped_mm and eager expert implementations do not export (shared/BUILDING.md).
        kw["experts_implementation"] = "batched_mm"
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), **kw).eval()
    except Exception as e:
        raise MoeExportError(f"{ckpt}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model


def export_model(model, out, *, opset=18, exporter="dynamo", external_data=True, example_tokens=8):
    """Exports `model` (a transformers causal LM) to `out` with dynamic batch and sequence axes."""
    import torch

    out = Path(out)
    if not out.parent.is_dir():
        raise MoeExportError(f"output directory {out.parent} does not exist")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, example_tokens), generator=torch.Generator().manual_seed(0))
    wrapper = _LogitsOnly(model)
    _quiet_exporter()
    # Export into a scratch folder beside the output so the final move is a rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = tmp / out.name
        with torch.no_grad():
            if exporter == "dynamo":
                from torch.export import Dim
                torch.onnx.export(wrapper, (ids,), str(staged), dynamo=True, opset_version=opset,
                                  input_names=["input_ids"], output_names=["logits"],
                                  dynamic_shapes={"input_ids": {0: Dim("batch"), 1: Dim("seq")}},
                                  external_data=external_data, verbose=False)
            elif exporter == "torchscript":
                torch.onnx.export(wrapper, (ids,), str(staged), dynamo=False, opset_version=min(opset, 17),
                                  input_names=["input_ids"], output_names=["logits"],
                                  dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                "logits": {0: "batch", 1: "seq"}})
            else:
                raise MoeExportError(f"unknown exporter {exporter!r} (dynamo or torchscript)")
        model_proto = load_model(staged)
        if not external_data:
            import onnx
            model_proto = onnx.load(str(staged))  # small models: embed the weights in one file
        write_model_atomic(model_proto, out, tmp)
    except MoeExportError:
        raise
    except Exception as e:
        raise MoeExportError(f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    return export_model(load_checkpoint(ckpt_dir), out, **kw)
