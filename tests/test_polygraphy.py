"""`polygraphy run ... --moe-onnxrt`: polygraphy's own CLI runs converted graphs through the runner
this package registers (entry point polygraphy.run.plugins), the standard way parity is checked."""
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from helpers import FAMILY_GRAPHS, run_cli

MIXTRAL = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


def polygraphy(*args, cwd):
    return subprocess.run([str(POLYGRAPHY), "run", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The original's inputs and outputs, saved by polygraphy's stock onnxrt runner."""
    d = tmp_path_factory.mktemp("poly")
    r = polygraphy(MIXTRAL, "--onnxrt", "--save-inputs", "in.json", "--save-outputs", "out.json", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d


def test_runner_is_listed():
    r = subprocess.run([str(POLYGRAPHY), "run", "--help"], capture_output=True, text=True)
    assert "--moe-onnxrt" in r.stdout


@pytest.mark.parametrize("policy, passes", [(["--policy", "static"], True),
                                            (["--policy", "top-p", "--threshold", "0.5"], False)])
def test_converted_against_saved_outputs(saved, policy, passes):
    conv = saved / f"conv_{policy[1]}.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv, *policy).returncode == 0
    plain = polygraphy(conv, "--onnxrt", cwd=saved)  # polygraphy's own runner cannot load the op
    assert plain.returncode != 0 and "DynamicRouter" in plain.stdout + plain.stderr
    r = polygraphy(conv, "--moe-onnxrt", "--load-inputs", "in.json", "--load-outputs", "out.json", cwd=saved)
    assert (r.returncode == 0) == passes, r.stdout[-3000:] + r.stderr[-2000:]
    assert ("PASSED" if passes else "FAILED") in r.stdout + r.stderr


def test_two_runners_one_command(saved):
    """--onnxrt and --moe-onnxrt side by side on one portable conversion (standard ops only), with
    onnxrt's session flags applied to both."""
    conv = saved / "portable.onnx"
    assert run_cli("convert", MIXTRAL, "-o", conv, "--portable", "--policy", "top-p", "--threshold", "0.5").returncode == 0
    r = polygraphy(conv, "--onnxrt", "--moe-onnxrt", "--providers", "cpu",
                   "--graph-optimization-level", "ORT_DISABLE_ALL", cwd=saved)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "vs. moe-onnxrt" in out and "PASSED" in out, out[-3000:]


def test_external_data_and_marked_outputs(saved):
    """A modified model (--onnx-outputs mark all) reaches the session as bytes: its external
    data is found beside the model file."""
    d = saved / "ext"
    d.mkdir()
    conv = d / "conv.onnx"
    assert run_cli("convert", MIXTRAL, "-o", saved / "tmp.onnx").returncode == 0
    onnx.save(onnx.load(str(saved / "tmp.onnx")), str(conv), save_as_external_data=True,
              location="conv.onnx.data", size_threshold=0)
    r = polygraphy(conv, "--moe-onnxrt", "--onnx-outputs", "mark", "all", "--save-outputs", "all.json", cwd=saved)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    from polygraphy.comparator import RunResults
    outs = RunResults.load(str(saved / "all.json"))[0][1][0]
    assert len(outs) > 10 and "logits" in outs


def test_generated_script_runs(saved):
    conv = saved / "conv_static.onnx"
    if not conv.exists():
        assert run_cli("convert", MIXTRAL, "-o", conv).returncode == 0
    r = polygraphy(conv, "--moe-onnxrt", "--gen-script", "gen.py", cwd=saved)
    assert r.returncode == 0
    assert "SessionWithMoeOps" in (saved / "gen.py").read_text()
    ran = subprocess.run([sys.executable, "gen.py"], capture_output=True, text=True, cwd=saved)
    assert ran.returncode == 0, ran.stderr[-2000:]
