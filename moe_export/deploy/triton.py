"""Triton Inference Server model repositories for converted graphs and ONNX Runtime GenAI
folders. Backends: onnxruntime and tensorrt (NVIDIA's server containers),
python (any tritonserver, the pip wheel's included: model.py from triton_models/ beside the model,
needing only numpy and onnxruntime or onnxruntime-genai in the server's Python)."""
from __future__ import annotations

import json
from pathlib import Path

from onnx import TensorProto

from ..errors import MoeExportError, UsageError
from ..native import custom_op_library, trt_plugin_library
from ..model import genai
from ..model.files import Output
from ..model.source import Source
from ..run.runtime import is_cache, graph_inputs, token_bounds
from ..op.schema import DOMAIN
from .tensorrt import build_engine

BACKENDS = ("onnxruntime", "tensorrt", "python")
MODELS = Path(__file__).parent / "triton_models"

_TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                 TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
                 TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL"}


def _io_config(model, max_batch):
    """Triton input/output stanzas from the graph; with batching, the leading dim is Triton's."""
    vals = [(v, "input") for v in graph_inputs(model)] + [(v, "output") for v in model.graph.output]
    stanzas = {"input": [], "output": []}
    for v, kind in vals:
        tt = v.type.tensor_type
        if tt.elem_type not in _TRITON_TYPES:
            raise MoeExportError(f"{kind} {v.name!r}: element type {tt.elem_type} has no Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if max_batch:
            dims = dims[1:]
        stanzas[kind].append(_stanza(v.name, _TRITON_TYPES[tt.elem_type], dims))
    return stanzas


def _unbatchable(model) -> str | None:
    """Why Triton must not batch the graph, or None: it may when every input and output has a
    dynamic leading (batch) dimension and the graph keeps no state between requests (a KV-cache
    decoder's past is the client's, and requests at different past lengths cannot be stacked)."""
    if any(is_cache(i.name, i.type.tensor_type) for i in graph_inputs(model)):
        return "a KV-cache decoder, its state is in each request's inputs"
    vals = graph_inputs(model) + list(model.graph.output)
    def lead_dynamic(v):
        dims = v.type.tensor_type.shape.dim
        return len(dims) >= 2 and not dims[0].HasField("dim_value")
    if not vals or not all(lead_dynamic(v) for v in vals):
        return "not every input and output has a dynamic leading dimension"
    return None


def serving_mode(model_path, max_batch_size) -> str:
    """How the repository entry for the model (a path or a Source) serves requests, in words."""
    src = Source.of(model_path)
    if src.is_folder:
        return "text generation, decoupled: /generate and /generate_stream"
    if not max_batch_size:
        return "no dynamic batching: --max-batch-size 0"
    why = _unbatchable(src.model)
    return f"no dynamic batching: {why}" if why else f"dynamic batching up to {max_batch_size}"


def _stanza(name, dtype, dims, optional=False):
    return (f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n'
            + ("    optional: true\n" if optional else "") + "  }")


def _config(name, backend_line, max_batch, stanzas, instances, kind, extra=(), delay_us=0):
    lines = [f'name: "{name}"', backend_line, f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(stanzas["input"]) + "\n]",
             "output [\n" + ",\n".join(stanzas["output"]) + "\n]"]
    if max_batch:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}" if delay_us
                     else "dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    kind: {kind}\n    count: {instances}\n  }}\n]")
    return ("\n".join(lines + list(extra)) + "\n").encode()


def _python_graph(out, stage, model, onnx_path, name, max_batch, instances, threads, delay_us):
    """model.py serving the graph with onnxruntime, what it must check of requests in moe_export.json."""
    out.model(model, stage / "1" / "model.onnx", Path(onnx_path).parent)
    lib = Path(custom_op_library())
    needs_lib = any(o.domain == DOMAIN for o in model.opset_import)
    if needs_lib:
        out.copy(lib, stage / lib.name)
    vocab = token_bounds(model)
    inputs = [{"name": i.name, "cache": is_cache(i.name, i.type.tensor_type), "vocab": vocab.get(i.name),
               "dims": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]}
              for i in graph_inputs(model)]
    meta = {"max_batch_size": max_batch, "inputs": inputs, "op_library": lib.name if needs_lib else None,
            "intra_op_threads": threads}
    out.file(stage / "moe_export.json", (json.dumps(meta, indent=1) + "\n").encode())
    out.copy(MODELS / "graph_model.py", stage / "1" / "model.py")
    return _config(name, 'backend: "python"', max_batch, _io_config(model, max_batch), instances, "KIND_CPU",
                   delay_us=delay_us)


def _python_genai(out, stage, folder, name, instances, max_concurrent, max_tokens):
    """model.py generating text with onnxruntime-genai from a copy of the folder (its DynamicRouter
    library inside), behind the tensor names of Triton's vLLM backend."""
    cfg = genai.read_config(folder)
    context = cfg["model"].get("context_length") or cfg.get("search", {}).get("max_length")
    if not context:
        raise MoeExportError(f"{folder / genai.CONFIG}: no model.context_length or search.max_length")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            r = f.relative_to(folder)
            out.copy(f, out.mkdir((stage / "1" / "model" / r).parent) / r.name)
    window = (cfg["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0
    meta = {"context_length": int(context), "max_concurrent": max_concurrent, "default_max_tokens": max_tokens,
            "min_length": int(window) + 1 if window else 0}  # onnxruntime-genai's cache must hold a window
    out.file(stage / "moe_export.json", (json.dumps(meta, indent=1) + "\n").encode())
    out.copy(MODELS / "genai_model.py", stage / "1" / "model.py")
    stanzas = {"input": [_stanza("text_input", "TYPE_STRING", [1]),
                         _stanza("stream", "TYPE_BOOL", [1], optional=True),
                         _stanza("sampling_parameters", "TYPE_STRING", [1], optional=True),
                         _stanza("exclude_input_in_output", "TYPE_BOOL", [1], optional=True)],
               "output": [_stanza("text_output", "TYPE_STRING", [-1])]}
    return _config(name, 'backend: "python"', 0, stanzas, instances, "KIND_CPU",
                   ["model_transaction_policy {\n  decoupled: true\n}"])


def triton_repository(model_path, repo, name, backend="onnxruntime", plan=None, max_batch_size=8,
                      server_repo_path="/models", instances=1, kind="KIND_CPU", threads=0, max_concurrent=4,
                      max_tokens=16, delay_us=0):
    """Writes the model NAME into the repository `repo`: config.pbtxt, version 1 and what the
    backend loads beside it (the custom-op library, the TensorRT plugin, model.py). `model_path`
    is a converted .onnx, or a GenAI model folder (python backend). `server_repo_path` is where
    the repository sits on the server, for the one backend that needs an absolute library path
    (onnxruntime's op_library_filename)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"invalid model name {name!r}")
    src = Source.of(model_path)
    folder = src.is_folder
    if folder and backend != "python":
        raise UsageError(f"{src} is an ONNX Runtime GenAI folder: serve it with --backend python "
                         "(text generation); Triton's onnxruntime and tensorrt backends run one graph call per request")
    source, model = src.graph, src.model
    repo = Path(repo)
    if not repo.parent.is_dir():
        raise MoeExportError(f"directory {repo.parent} does not exist")
    if plan is not None and not Path(plan).is_file():
        raise MoeExportError(f"{plan}: no such engine file")
    max_batch = max_batch_size if (max_batch_size and _unbatchable(model) is None) else 0
    server_dir = Path(server_repo_path) / name
    final = repo / name
    with Output(protected=src.files()) as out:
        stage = out.directory(final)  # the model appears in the repository whole, or not at all
        (stage / "1").mkdir()
        if backend == "python" and folder:
            config = _python_genai(out, stage, src.path, name, instances, max_concurrent, max_tokens)
        elif backend == "python":
            config = _python_graph(out, stage, model, source, name, max_batch, instances, threads, delay_us)
        elif backend == "onnxruntime":
            out.model(model, stage / "1" / "model.onnx", source.parent)
            lib = Path(custom_op_library())
            out.copy(lib, stage / lib.name)
            # the ORT backend registers this library in every session it creates for the model
            config = _config(name, 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"', max_batch,
                             _io_config(model, max_batch), instances, kind,
                             [f'model_operations {{\n  op_library_filename: "{server_dir / lib.name}"\n}}'],
                             delay_us=delay_us)
        else:
            if plan is None:
                build_engine(source, stage / "1" / "model.plan")
            else:
                out.copy(plan, stage / "1" / "model.plan")
            lib = Path(trt_plugin_library())
            out.copy(lib, stage / lib.name)
            cuda_lib = Path(lib).with_name("libmoe_export_cuda.so")  # the plugin's kernel, found via $ORIGIN
            if cuda_lib.is_file():
                out.copy(cuda_lib, stage / cuda_lib.name)
            config = _config(name, 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"', max_batch,
                             _io_config(model, max_batch), instances, "KIND_GPU", delay_us=delay_us)
            out.file(stage / "README.md", (
                f"TensorRT loads the DynamicRouter plugin from {lib.name} in this directory. Start the server with\n"
                f"    tritonserver --model-repository=... --backend-config=tensorrt,plugins=\"{server_dir / lib.name}\"\n"
                f"or with LD_PRELOAD={server_dir / lib.name}. The engine was built for one GPU model and\n"
                "TensorRT version: rebuild it (moe-export build-engine) for another.\n").encode())
        out.file(stage / "config.pbtxt", config)
    return final
