"""TensorRT engines of converted graphs, with the DynamicRouter plugin loaded."""
from __future__ import annotations

from pathlib import Path

from ..errors import MoeExportError
from ..native import trt_plugin_library
from ..model.files import Output, model_files
from ..model.graph import load_model


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
