"""TensorRT engines and Triton Inference Server model repositories for converted graphs."""
from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from . import MoeExportError, custom_op_library, trt_plugin_library
from .files import Output, model_files
from .graph import load_model
from .runtime import graph_inputs

_TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                 TensorProto.DOUBLE: "TYPE_FP64", TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32",
                 TensorProto.INT8: "TYPE_INT8", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL"}


def parse_shapes(items):
    """--shape NAME:MIN,OPT,MAX with dims like 1x16 -> {name: (min, opt, max)}."""
    out = {}
    for it in items or []:
        name, _, spec = it.rpartition(":")
        parts = spec.split(",")
        try:
            dims = [tuple(int(d) for d in p.split("x")) for p in parts]
        except ValueError:
            dims = []
        if not name or len(dims) != 3 or len({len(d) for d in dims}) != 1 or any(v < 0 for d in dims for v in d):
            raise MoeExportError(f"--shape wants NAME:MIN,OPT,MAX with dims like 1x16, got {it!r}")
        out[name] = tuple(dims)
    return out


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MoeExportError("TensorRT is not installed: install it from NVIDIA (pip install tensorrt with "
                             "NVIDIA's package index, or the TensorRT tarball) on a machine with an NVIDIA GPU") from None
    return trt


def build_engine(onnx_path, out, fp16=False, shapes=None, workspace_mb=4096):
    """Builds a TensorRT engine with the DynamicRouter plugin loaded (polygraphy's loaders)."""
    out = Path(out)
    with Output(protected=model_files(onnx_path)) as staged:
        staged.check_model_path(out)
        trt = _tensorrt()
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

        model = load_model(onnx_path)  # one-line errors for bad files before TensorRT sees them
        trt.get_plugin_registry().load_library(trt_plugin_library())
        profile = Profile()
        for name, (lo, opt, hi) in (shapes or {}).items():
            profile.add(name, min=lo, opt=opt, max=hi)
        missing = [i.name for i in model.graph.input
                   if any(d.dim_param or not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
                   and i.name not in (shapes or {})]
        if missing:
            raise MoeExportError(f"dynamic inputs need --shape NAME:MIN,OPT,MAX: {', '.join(missing)}")
        config = CreateConfig(fp16=fp16, profiles=[profile] if shapes else None,
                              memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20})
        try:
            SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config), str(staged.temp(out)))()
        except MoeExportError:
            raise
        except Exception as e:
            raise MoeExportError(f"TensorRT could not build the engine: {str(e).splitlines()[0]}") from None
    return out


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
        stanzas[kind].append(f'  {{\n    name: "{v.name}"\n    data_type: {_TRITON_TYPES[tt.elem_type]}\n'
                             f'    dims: [ {", ".join(map(str, dims)) or ""} ]\n  }}')
    return stanzas


def _batchable(model):
    """Triton may batch when every input and output has a dynamic leading (batch) dimension."""
    vals = graph_inputs(model) + list(model.graph.output)
    def lead_dynamic(v):
        dims = v.type.tensor_type.shape.dim
        return len(dims) >= 2 and not dims[0].HasField("dim_value")
    return bool(vals) and all(lead_dynamic(v) for v in vals)


def triton_repository(onnx_path, repo, name, backend="onnxruntime", plan=None, max_batch_size=8,
                      server_repo_path=None, instances=1, kind="KIND_CPU"):
    """Writes repo/NAME/config.pbtxt and repo/NAME/1/model.onnx (+ external data) or model.plan,
    with the custom-op library or TensorRT plugin beside them."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise MoeExportError(f"unknown backend {backend!r} (onnxruntime or tensorrt)")
    if not name or "/" in name or name in (".", ".."):
        raise MoeExportError(f"invalid model name {name!r}")
    model = load_model(onnx_path)
    repo = Path(repo)
    if not repo.parent.is_dir():
        raise MoeExportError(f"directory {repo.parent} does not exist")
    if plan is not None and not Path(plan).is_file():
        raise MoeExportError(f"{plan}: no such engine file")
    max_batch = max_batch_size if (max_batch_size and _batchable(model)) else 0
    stanzas = _io_config(model, max_batch)
    server_dir = Path(server_repo_path or repo.resolve()) / name
    final = repo / name
    with Output(protected=model_files(onnx_path)) as out:
        stage = out.directory(final)  # the model appears in the repository whole, or not at all
        (stage / "1").mkdir()
        lines = [f'name: "{name}"']
        if backend == "onnxruntime":
            out.model(model, stage / "1" / "model.onnx", Path(onnx_path).parent)
            lib = Path(custom_op_library())
            out.copy(lib, stage / lib.name)
            lines += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
        else:
            if plan is None:
                build_engine(onnx_path, stage / "1" / "model.plan")
            else:
                out.copy(plan, stage / "1" / "model.plan")
            lib = Path(trt_plugin_library())
            out.copy(lib, stage / lib.name)
            cuda_lib = Path(lib).with_name("libmoe_export_cuda.so")  # the plugin's kernel, found via $ORIGIN
            if cuda_lib.is_file():
                out.copy(cuda_lib, stage / cuda_lib.name)
            lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
            kind = "KIND_GPU"
        lines.append(f"max_batch_size: {max_batch}")
        lines.append("input [\n" + ",\n".join(stanzas["input"]) + "\n]")
        lines.append("output [\n" + ",\n".join(stanzas["output"]) + "\n]")
        if max_batch:
            lines.append("dynamic_batching { }")
        lines.append(f"instance_group [\n  {{\n    kind: {kind}\n    count: {instances}\n  }}\n]")
        if backend == "onnxruntime":
            # The ORT backend registers this library in every session it creates for the model.
            lines.append(f'model_operations {{\n  op_library_filename: "{server_dir / lib.name}"\n}}')
        out.file(stage / "config.pbtxt", ("\n".join(lines) + "\n").encode())
        if backend == "tensorrt":
            out.file(stage / "README.md", (
                f"TensorRT loads the DynamicRouter plugin from {lib.name} in this directory. Start the server with\n"
                f"    tritonserver --model-repository=... --backend-config=tensorrt,plugins=\"{server_dir / lib.name}\"\n"
                f"or with LD_PRELOAD={server_dir / lib.name}. The engine was built for one GPU model and\n"
                "TensorRT version: rebuild it (moe-export build-engine) for another.\n").encode())
    return final
