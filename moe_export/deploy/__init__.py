"""Deployment: TensorRT engines (tensorrt.py), Triton model repositories (triton.py) and a Triton
server to run them (serve.py), and polygraphy's runner for converted graphs (polygraphy_plugin.py)."""

_NAMES = {"build_engine": "tensorrt", "parse_shapes": "tensorrt", "triton_repository": "triton",
          "serving_mode": "triton", "serve": "serve", "Server": "serve"}


def __getattr__(name):  # imported on first use: TensorRT and Triton are optional
    if name not in _NAMES:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
