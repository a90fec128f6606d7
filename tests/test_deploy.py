"""Triton model repositories for both backends, parsed as ModelConfig; TensorRT absent: clear error."""
import ctypes
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

import moe_export
from helpers import FAMILY_GRAPHS, GATE_GRAPHS, run_cli

from tritonclient.grpc import model_config_pb2  # installed by scripts/setup.sh: a missing one fails

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def converted(tmp_path):
    out = tmp_path / "m.onnx"
    assert run_cli("convert", MIXTRAL, "-o", out, "--policy", "top-p", "--threshold", "0.6").returncode == 0
    return out


def test_onnxruntime_repository(converted, tmp_path):
    repo = tmp_path / "models"
    r = run_cli("triton", converted, "-o", repo, "--name", "mixtral_dyn", "--server-repository", "/models")
    assert r.returncode == 0, r.stderr
    cfg = parse(repo / "mixtral_dyn" / "config.pbtxt")
    assert cfg.name == "mixtral_dyn" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")  # the export's batch axis is dynamic
    assert [i.name for i in cfg.input] == ["input_ids"] and cfg.input[0].data_type == model_config_pb2.TYPE_INT64
    assert list(cfg.input[0].dims) == [-1] and list(cfg.output[0].dims) == [-1, 128]
    assert [o.name for o in cfg.output] == ["logits"] and cfg.output[0].data_type == model_config_pb2.TYPE_FP32
    assert list(cfg.model_operations.op_library_filename) == ["/models/mixtral_dyn/libmoe_export_ort.so"]
    lib = repo / "mixtral_dyn" / "libmoe_export_ort.so"
    assert lib.is_file()
    ctypes.CDLL(str(lib))  # a real shared library, loadable
    sess = moe_export.session(repo / "mixtral_dyn" / "1" / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 128, (2, 8)).astype(np.int64)
    assert np.isfinite(sess.run(None, {"input_ids": ids})[0]).all()


def test_batching_follows_the_graph(tmp_path):
    gate = next(p for p in GATE_GRAPHS if "e64k8" in p.name and "softmax" in p.name)
    conv = tmp_path / "g.onnx"
    assert run_cli("convert", gate, "-o", conv).returncode == 0
    repo = tmp_path / "models"
    assert run_cli("triton", conv, "-o", repo, "--name", "gate", "--max-batch-size", "64").returncode == 0
    cfg = parse(repo / "gate" / "config.pbtxt")
    assert cfg.max_batch_size == 64 and cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [64] and list(cfg.output[1].dims) == [8]


def test_tensorrt_repository(converted, tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"serialized engine stand-in: the config is derived from the ONNX graph")
    repo = tmp_path / "models"
    r = run_cli("triton", converted, "-o", repo, "--name", "m", "--backend", "tensorrt", "--plan", plan)
    assert r.returncode == 0, r.stderr
    cfg = parse(repo / "m" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (repo / "m" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert (repo / "m" / "libmoe_export_trt.so").is_file() and "plugins=" in (repo / "m" / "README.md").read_text()


def test_existing_model_directory_is_not_overwritten(converted, tmp_path):
    repo = tmp_path / "models"
    (repo / "m").mkdir(parents=True)
    r = run_cli("triton", converted, "-o", repo, "--name", "m")
    assert r.returncode == 1 and "exists" in r.stderr and list((repo / "m").iterdir()) == []


def test_tensorrt_missing_is_one_line(converted, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = run_cli("build-engine", converted, "-o", tmp_path / "m.plan", "--shape", "input_ids:1x1,1x64,1x512")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "TensorRT is not installed" in r.stderr
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="the TensorRT plugin is built only where nvcc is present")
def test_plugin_library_exports_get_creators():
    lib = moe_export.trt_plugin_library()
    import subprocess
    syms = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True).stdout
    assert " T getCreators" in syms


def test_onnxruntime_repository_names_no_path_of_this_machine(converted, tmp_path):
    """Without --server-repository the library is named where NVIDIA's container mounts the repository."""
    repo = tmp_path / "models"
    assert run_cli("triton", converted, "-o", repo, "--name", "m").returncode == 0
    cfg = parse(repo / "m" / "config.pbtxt")
    assert list(cfg.model_operations.op_library_filename) == ["/models/m/libmoe_export_ort.so"]
    assert str(tmp_path) not in (repo / "m" / "config.pbtxt").read_text()
