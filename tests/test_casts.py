"""Gates behind Casts: float16 graphs written by onnxconverter-common wrap TopK (which has no
float16 kernel in some runtimes) in Casts to float32 and back, for every gate form."""
import warnings

import numpy as np
import onnx
import pytest
from onnxconverter_common import float16

import moe_export
from helpers import GATE_GRAPHS, input_feeds
from moe_export.rules.base import find_gates
from moe_export.conversion import Policy, convert
from moe_export.run.validate import validate


def to_float16(src, dst, keep_io_types):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=keep_io_types)
    onnx.save(m, str(dst))
    return m


@pytest.mark.parametrize("keep_io_types", [True, False], ids=["fp32_io", "fp16_io"])
@pytest.mark.parametrize("graph", GATE_GRAPHS, ids=[p.stem for p in GATE_GRAPHS])
def test_float16_gate_is_the_same_gate(graph, keep_io_types, tmp_path):
    half = tmp_path / "half.onnx"
    m = to_float16(graph, half, keep_io_types)
    assert any(n.op_type == "Cast" for n in m.graph.node)
    (ref,), _ = find_gates(onnx.load(str(graph)))
    (got,), misses = find_gates(m)
    assert misses == []
    assert (got.family, got.attrs) == (ref.family, ref.attrs)
    out = tmp_path / "conv.onnx"
    convert(half, out, Policy("static"))
    rep = validate(half, out)
    assert rep["static_reproduces"], rep["outputs"]
    # Dynamic routing through the Casts: the same pairs as the float32 graph's router decides
    # (float16 logits rounding aside, which the spec reproduces exactly on the converted graph).
    dyn = tmp_path / "dyn.onnx"
    convert(half, dyn, Policy("top-p", 0.5))
    feeds = input_feeds(half)
    w, idx = moe_export.session(dyn).run(None, feeds)
    a = {k: v for k, v in ref.attrs.items()}
    logits = feeds[m.graph.input[0].name].astype(np.float16).astype(np.float32)
    bias = None
    if got.bias is not None:
        bias = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == got.bias)).astype(np.float32)
    sw, sidx = moe_export.dynamic_router(logits, bias, **a, policy="top-p", threshold=0.5, max_experts=a["k"])
    if got.topk.attribute and any(x.name == "sorted" and x.i == 0 for x in got.topk.attribute):
        order, sorder = np.argsort(idx, -1), np.argsort(sidx, -1)
        idx, sidx = np.take_along_axis(idx, order, -1), np.take_along_axis(sidx, sorder, -1)
        w, sw = np.take_along_axis(w, order, -1), np.take_along_axis(sw, sorder, -1)
    np.testing.assert_array_equal(idx, sidx)
    np.testing.assert_allclose(w.astype(np.float32), sw, atol=2e-3, rtol=5e-3)
