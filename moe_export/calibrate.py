"""Per-layer thresholds from router statistics on calibration data, to hit a compute budget."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from . import MoeExportError
from .graph import load_model
from .patterns import find_gates
from .rewrite import Policy, convert, router_attrs
from .spec import policy_counts, policy_view
from .validate import run_exposed


def load_data(path, model):
    """Calibration inputs: an .npz of named arrays, or an .npy for the model's single input
    (token ids [batch, seq] or router logits [tokens, E])."""
    p = Path(path)
    if not p.is_file():
        raise MoeExportError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:
        raise MoeExportError(f"{p}: cannot read ({type(e).__name__}); expected .npy or .npz") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        return {k: data[k] for k in data.files}
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise MoeExportError(f"the model has {len(inputs)} inputs; pass an .npz with one array per input")
    elem = inputs[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    if data.ndim == 1 and np.issubdtype(dtype, np.integer):
        data = data[None, :]
    return {inputs[0].name: data.astype(dtype)}


def router_logits(model_path, feeds, batch=16):
    """Runs the original graph with each gate's logits (and bias) exposed; returns the gates and
    per-gate ([tokens, E] logits, bias or None)."""
    model = load_model(model_path)
    gates, _ = find_gates(model)
    if not gates:
        raise MoeExportError("no MoE gating found to calibrate")
    tensors = [t for g in gates for t in (g.logits, g.bias) if t is not None]
    got = dict(zip(tensors, run_exposed(model, Path(model_path).parent, tensors, feeds, batch, custom_ops=False)))
    out = []
    for g in gates:
        E = g.attrs["num_experts"]
        logits = np.concatenate([c.reshape(-1, E) for c in got[g.logits]]).astype(np.float32)
        bias = got[g.bias][0].reshape(E).astype(np.float32) if g.bias else None
        out.append((logits, bias))
    return gates, out


def _solve(mean_count, target, increasing, lo=0.0, hi=1.0, iters=40):
    """Threshold whose mean expert count is closest to `target` (counts move monotonically)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        c = mean_count(mid)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (mid, c)
        if (c < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def calibrate(model_path, feeds, target, policy="top-p", mode="per-layer", min_experts=1, max_experts=None):
    """Thresholds (per layer, or one global) that give `target` experts per token on the data."""
    if policy == "static":
        raise MoeExportError("calibration needs a dynamic policy (top-p, ratio or entropy)")
    if mode not in ("per-layer", "global"):
        raise MoeExportError(f"unknown mode {mode!r} (per-layer or global)")
    gates, data = router_logits(model_path, feeds)
    pol = Policy(policy, 0.5, min_experts, max_experts)
    views, attrs = [], []
    for g, (logits, bias) in zip(gates, data):
        a = router_attrs(g, pol)
        if not (a.min_experts <= target <= a.max_experts):
            raise MoeExportError(f"--target-experts {target} outside [{a.min_experts}, {a.max_experts}] at {g.name}")
        views.append(policy_view(logits, bias, **{k: v for k, v in a.__dict__.items() if k != "extra"}))
        attrs.append(a)
    increasing = policy == "top-p"  # more mass wanted -> more experts; ratio/entropy go the other way
    hi = 1.0 if policy != "entropy" else 0.999

    def mean(i, t):
        attrs[i].threshold = float(t)
        return float(policy_counts(attrs[i], views[i])[0].mean())

    if mode == "per-layer":
        chosen = [_solve(lambda t, i=i: mean(i, t), target, increasing, hi=hi) for i in range(len(gates))]
    else:
        t, _ = _solve(lambda t: np.mean([mean(i, t) for i in range(len(gates))]), target, increasing, hi=hi)
        chosen = [(t, mean(i, t)) for i in range(len(gates))]
    return [{"layer": g.name, "threshold": t, "mean_experts": c, "k": g.attrs["k"]}
            for g, (t, c) in zip(gates, chosen)]


def calibrate_and_convert(model_path, data_path, out, target, policy="top-p", mode="per-layer",
                          min_experts=1, max_experts=None, portable=False):
    feeds = load_data(data_path, load_model(model_path))
    layers = calibrate(model_path, feeds, target, policy, mode, min_experts, max_experts)
    pol = Policy(policy, layers[0]["threshold"], min_experts, max_experts,
                 per_layer={r["layer"]: r["threshold"] for r in layers})
    convert(model_path, out, pol, portable=portable)
    return layers
