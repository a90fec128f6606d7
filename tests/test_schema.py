"""The DynamicRouter op is declared once (moe_export/op/schema.py); every copy derives from it."""
import ctypes
import subprocess
from dataclasses import MISSING, fields

import numpy as np
import onnx
import pytest

import moe_export  # registers the op's OpSchema
from helpers import GATE_GRAPHS, GRAPHS, ROOT
from moe_export.op import schema
from moe_export.conversion import Policy, convert
from moe_export.op.spec import RouterAttrs


def test_generated_header_and_docs_are_current():
    assert schema.HEADER.read_text() == schema.header(), "run scripts/gen_schema.py"
    assert schema.DOC.read_text() == schema.doc_with_table(schema.DOC.read_text()), "run scripts/gen_schema.py"


def test_router_attrs_are_the_table():
    got = [(f.name, None if f.default is MISSING else f.default) for f in fields(RouterAttrs)]
    want = [(a.name, a.default) for a in schema.ATTRIBUTES]
    assert sorted(got, key=str) == sorted(want, key=str)


def test_c_layout_matches_the_ctypes_mirror(tmp_path):
    """Compiles the generated header and prints moe::Params' field offsets and defaults."""
    src = tmp_path / "layout.cc"
    src.write_text('#include <cstdio>\n#include <cstddef>\n#include "router_attrs.h"\nint main() {\n'
                   '  moe::Params d = moe::default_params();\n'
                   '#define P(name, type, dflt, names, n) std::printf("%s %zu %g\\n", #name, offsetof(moe::Params, name), (double)d.name);\n'
                   '  MOE_ROUTER_ATTRS(P)\n  std::printf("size %zu 0\\n", sizeof(moe::Params));\n}\n')
    exe = tmp_path / "layout"
    subprocess.run(["g++", "-std=c++17", "-I", str(ROOT / "plugins" / "core"), str(src), "-o", str(exe)], check=True)
    rows = [line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()]
    c = {name: (int(off), float(d)) for name, off, d in rows}
    assert c.pop("size")[0] == ctypes.sizeof(schema.CParams)
    assert list(c) == [a.name for a in schema.ATTRIBUTES]
    for a in schema.ATTRIBUTES:
        assert c[a.name][0] == getattr(schema.CParams, a.name).offset
        want = -1 if a.default is None else a.choices.index(a.default) if a.choices else a.default
        assert c[a.name][1] == pytest.approx(want)


def test_onnx_knows_the_op():
    s = onnx.defs.get_schema("DynamicRouter", 1, "moe_export")
    assert sorted(s.attributes) == sorted(a.name for a in schema.ATTRIBUTES)
    assert [a.name for a in schema.ATTRIBUTES if s.attributes[a.name].required] == ["num_experts", "k"]


@pytest.mark.parametrize("graph, max_experts, width", [
    (GRAPHS / "mixtral.onnx", None, 2),
    (GRAPHS / "wide" / "mixtral_top3.onnx", 5, 5),
    (next(p for p in GATE_GRAPHS if "grouped" in p.stem), None, 8),
])
def test_checker_and_strict_shape_inference_accept_converted_models(graph, max_experts, width, tmp_path):
    out = tmp_path / "m.onnx"
    convert(graph, out, Policy("top-p", 0.5, 1, max_experts))
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    vi = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    routers = [n for n in inferred.graph.node if n.op_type == "DynamicRouter"]
    assert routers
    for n in routers:
        w, idx = (vi[o].type.tensor_type for o in n.output)
        logits = vi.get(n.input[0]) or next(i for i in inferred.graph.input if i.name == n.input[0])
        assert w.elem_type == logits.type.tensor_type.elem_type and idx.elem_type == onnx.TensorProto.INT64
        assert w.shape.dim[-1].dim_value == width and idx.shape.dim[-1].dim_value == width
        assert len(w.shape.dim) == len(logits.type.tensor_type.shape.dim)


def test_kernel_defaults_are_the_tables():
    """A node with only the required attributes routes as the table's defaults say."""
    from helpers import router_model

    logits = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w, idx = moe_export.session(router_model({"num_experts": 8, "k": 2})).run(None, {"logits": logits})
    sw, sidx = moe_export.dynamic_router(logits, num_experts=8, k=2)
    np.testing.assert_array_equal(idx, sidx)
    np.testing.assert_allclose(w, sw, rtol=1e-6)
