"""Bad input: one line on stderr, non-zero exit, no traceback, no output file, input unchanged."""
import hashlib
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import FAMILY_GRAPHS, run_cli

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")


def digest(path):
    if path.is_dir():
        return "dir"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(result, out_dir, expect=None):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("moe-export: error:")
    if expect:
        assert expect in lines[0], lines[0]
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(("out", ".out"))]
    assert leftovers == [], leftovers


def no_moe_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "plain", [x], [y], [w])
    onnx.save(helper.make_model(g), str(path))


def dynamic_k_model(path):
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info("w", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    nodes = [helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("TopK", ["p", "k"], ["w", "i"], axis=-1)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x, k], outs),
                                opset_imports=[helper.make_opsetid("", 18)]), str(path))


CASES = {
    "empty": (lambda d: (d / "m.onnx").write_bytes(b""), "empty file"),
    "random_bytes": (lambda d: (d / "m.onnx").write_bytes(os.urandom(4096)), "not a valid ONNX model"),
    "truncated": (lambda d: (d / "m.onnx").write_bytes(MIXTRAL.read_bytes()[:50000]), "not a valid ONNX model"),
    "directory": (lambda d: (d / "m.onnx").mkdir(), "is a directory"),
    "no_moe": (lambda d: no_moe_model(d / "m.onnx"), "no MoE gating found"),
    "non_constant_k": (lambda d: dynamic_k_model(d / "m.onnx"), "non-constant k"),
    "missing_file": (lambda d: None, "no such file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_bad_models(case, command, tmp_path):
    make, expect = CASES[case]
    make(tmp_path)
    src = tmp_path / "m.onnx"
    before = digest(src) if src.exists() else None
    args = [command, src] + (["-o", tmp_path / "out.onnx"] if command == "convert" else [])
    assert_clean_failure(run_cli(*args), tmp_path, expect)
    assert (digest(src) if src.exists() else None) == before


def test_missing_external_data(tmp_path):
    m = onnx.load(str(MIXTRAL))
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()
    for args in (["convert", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx"], ["inspect", tmp_path / "m.onnx"]):
        assert_clean_failure(run_cli(*args), tmp_path, "missing external data")


@pytest.mark.parametrize("args, expect", [
    (["--policy", "top-p", "--threshold", "nan"], "finite"),
    (["--policy", "top-p", "--threshold", "1.5"], "threshold"),
    (["--policy", "top-p", "--threshold", "-0.1"], "threshold"),
    (["--policy", "entropy", "--threshold", "1.0"], "threshold"),
    (["--policy", "top-p"], "needs --threshold"),
    (["--policy", "top-p", "--threshold", "0.5", "--min-experts", "3", "--max-experts", "2"], "exceeds"),
    (["--policy", "top-p", "--threshold", "0.5", "--max-experts", "0"], "max-experts"),
    (["--policy", "top-p", "--threshold", "0.5", "--min-experts", "0"], "min-experts"),
    (["--policy", "top-q", "--threshold", "0.5"], "invalid choice"),
    (["--policy", "top-p", "--threshold", "abc"], "not a number"),
])
def test_invalid_policy_arguments(args, expect, tmp_path):
    """All usage errors: exit 2, whatever layer of the tool finds them."""
    before = digest(MIXTRAL)
    r = run_cli("convert", MIXTRAL, "-o", tmp_path / "out.onnx", *args)
    assert_clean_failure(r, tmp_path, expect)
    assert r.returncode == 2
    assert digest(MIXTRAL) == before


@pytest.mark.parametrize("args, expect", [
    (["profile", "M", "--data", "D", "--flops-per-pair", "0"], "must be > 0"),
    (["profile", "M", "--data", "D", "--flops-per-pair", "inf"], "finite"),
    (["validate", "M", "M", "--seed", "-1"], "must be >= 0"),
    (["validate", "M", "M", "--dim", "seq=2", "--dim", "seq=3"], "given twice"),
    (["serve", "M", "--timeout", "-5"], "must be > 0"),
    (["export", "M", "-o", "OUT", "--opset", "17"], "opsets 18 to"),
    (["export", "M", "-o", "OUT", "--exporter", "torchscript", "--opset", "18"], "opsets 7 to 17"),
])
def test_out_of_range_flags_are_usage_errors(args, expect, tmp_path):
    """Found before any file is read: exit 2, one line (before, some ran and printed nonsense)."""
    args = [tmp_path / "out.onnx" if a == "OUT" else MIXTRAL if a == "M" else tmp_path / "d.npy" if a == "D" else a
            for a in args]
    r = run_cli(*args)
    assert_clean_failure(r, tmp_path, expect)
    assert r.returncode == 2


def test_output_directory_missing(tmp_path):
    r = run_cli("convert", MIXTRAL, "-o", tmp_path / "nope" / "out.onnx")
    assert_clean_failure(r, tmp_path, "does not exist")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "file").write_text("")
    assert_clean_failure(run_cli("convert", MIXTRAL, "-o", tmp_path / "file" / "out.onnx"), tmp_path,
                         "is not a directory")


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(MIXTRAL, src)
    before = digest(src)
    assert_clean_failure(run_cli("convert", src, "-o", src), tmp_path, "never modifies its input")
    assert_clean_failure(run_cli("convert", src, "-o", tmp_path / "." / "m.onnx"), tmp_path)
    assert digest(src) == before


def test_validate_bad_inputs(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    assert_clean_failure(run_cli("validate", MIXTRAL, tmp_path / "bad.onnx"), tmp_path, "not a valid ONNX model")
    # A graph moe-export did not write has no routers to compare.
    assert_clean_failure(run_cli("validate", MIXTRAL, MIXTRAL), tmp_path, "not written by moe-export")
    # Nor is a conversion of another model the converted graph of this one.
    other = next(p for p in FAMILY_GRAPHS if p.stem == "qwen3_moe")
    assert run_cli("convert", other, "-o", tmp_path / "other.onnx").returncode == 0
    assert_clean_failure(run_cli("validate", MIXTRAL, tmp_path / "other.onnx"), tmp_path, "is not a conversion of")
    (tmp_path / "feeds.npz").write_bytes(b"nope")
    out = tmp_path / "conv.onnx"
    assert run_cli("convert", MIXTRAL, "-o", out).returncode == 0
    assert_clean_failure(run_cli("validate", MIXTRAL, out, "--data", tmp_path / "feeds.npz"), tmp_path, "cannot read inputs")


def test_bad_cpu_isa_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "conv.onnx"
    assert run_cli("convert", MIXTRAL, "-o", out).returncode == 0
    monkeypatch.setenv("MOE_EXPORT_CPU_ISA", "sse9")  # run_cli passes the environment on
    assert_clean_failure(run_cli("validate", MIXTRAL, out), tmp_path, "MOE_EXPORT_CPU_ISA must be")


def test_debug_flag_shows_traceback(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    r = run_cli("--debug", "inspect", tmp_path / "m.onnx")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.torch
def test_export_rejects_bad_checkpoints(tmp_path):
    assert_clean_failure(run_cli("export", tmp_path, "-o", tmp_path / "out.onnx"), tmp_path, "no config.json")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    assert_clean_failure(run_cli("export", tmp_path, "-o", tmp_path / "out.onnx"), tmp_path, "unsupported architecture")
