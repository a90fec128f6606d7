"""Mutated real graphs through `inspect` and `convert`: no crash, no traceback, no partial file."""
import io
import random
from contextlib import redirect_stderr, redirect_stdout

import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import FAMILY_GRAPHS, GATE_GRAPHS
from moe_export.cli import main

SEEDS = [p for p in GATE_GRAPHS] + [p for p in FAMILY_GRAPHS if p.stem in ("mixtral", "deepseek_v3", "gpt_oss")]
MODELS = {p.name: onnx.load(str(p)) for p in SEEDS}
BYTES = {p.name: p.read_bytes() for p in SEEDS}
OPS = ["TopK", "Softmax", "Sigmoid", "Add", "Div", "ReduceSum", "Mul", "Where", "Reshape", "GatherElements", "Cast"]


def mutate(rng: random.Random, name: str) -> bytes:
    kind = rng.choice(["bytes", "graph", "graph", "graph"])
    if kind == "bytes":
        b = bytearray(BYTES[name])
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(b))
            b[pos] = rng.randrange(256)
        return bytes(b[: rng.randint(len(b) // 2, len(b))] if rng.random() < 0.2 else b)
    m = onnx.ModelProto()
    m.CopyFrom(MODELS[name])
    g = m.graph
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["drop_node", "op_type", "attr", "input", "drop_init", "const"])
        nodes = [n for n in g.node if n.op_type in OPS] or list(g.node)
        if not nodes:
            break
        n = rng.choice(nodes)
        if op == "drop_node":
            g.node.remove(n)
        elif op == "op_type":
            n.op_type = rng.choice(OPS)
        elif op == "attr" and n.attribute:
            a = rng.choice(n.attribute)
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([-2, -1, 0, 1, 2, 10**9])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([float("nan"), -1.0, 0.0, 1e30])
        elif op == "input" and n.input:
            n.input[rng.randrange(len(n.input))] = rng.choice([t for x in g.node for t in x.output] + ["", "nope"])
        elif op == "drop_init" and g.initializer:
            g.initializer.remove(rng.choice(g.initializer))
        elif op == "const":
            for t in g.initializer:
                if t.dims == [1] or not t.dims:
                    t.CopyFrom(onnx.numpy_helper.from_array(
                        onnx.numpy_helper.to_array(t) * rng.choice([-1, 0, 3, 1000]), t.name))
                    break
    return m.SerializeToString()


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code or 0
    return code, err.getvalue()


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(sorted(MODELS)),
       policy=st.sampled_from([[], ["--policy", "top-p", "--threshold", "0.3"], ["--portable"]]))
def test_fuzz_inspect_and_convert(tmp_path_factory, seed, which, policy):
    d = tmp_path_factory.mktemp("fuzz", numbered=True)
    src = d / "m.onnx"
    src.write_bytes(mutate(random.Random(seed), which))
    before = src.read_bytes()
    for argv in (["inspect", src], ["convert", src, "-o", d / "out.onnx", *policy]):
        code, err = run(argv)
        assert code in (0, 1), (argv, code, err)
        assert "Traceback" not in err
        if code:
            assert len(err.strip().splitlines()) == 1 and err.startswith("moe-export: error:"), err
    if code:
        assert not (d / "out.onnx").exists()
    assert sorted(p.name for p in d.iterdir()) in (["m.onnx"], ["m.onnx", "out.onnx"])
    assert src.read_bytes() == before
