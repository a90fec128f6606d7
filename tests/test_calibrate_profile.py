"""calibrate hits a compute budget on its data; profile reports FLOPs and load side by side."""
import json

import numpy as np
import onnx
import pytest

from helpers import FAMILY_GRAPHS, run_cli
from moe_export.conversion import routers_metadata


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(p, np.random.default_rng(0).integers(0, 128, (8, 32)).astype(np.int64))
    return p


@pytest.mark.parametrize("family, target", [("qwen3_moe", 2.5), ("deepseek_v3", 2.0), ("mixtral", 1.5)])
@pytest.mark.parametrize("policy", ["top-p", "ratio", "entropy"])
@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_calibrate_hits_target(family, target, policy, mode, tokens, tmp_path):
    graph = next(p for p in FAMILY_GRAPHS if p.stem == family)
    out = tmp_path / "cal.onnx"
    r = run_cli("calibrate", graph, "--data", tokens, "--target-experts", target, "-o", out,
                "--policy", policy, "--mode", mode, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    layers = summary["layers"]
    overall = np.mean([x["mean_experts"] for x in layers])
    assert abs(overall - target) < 0.35, layers
    meta = routers_metadata(onnx.load(str(out), load_external_data=False))
    assert [m["attrs"]["threshold"] for m in meta["routers"]] == pytest.approx([x["threshold"] for x in layers])
    if mode == "global":  # one threshold: the layers spread around the target, their mean is on it
        assert len({round(x["threshold"], 6) for x in layers}) == 1
        assert not summary["warnings"], summary["warnings"]
    # the converted graph, run on the same data, routes what calibration predicted
    rep = json.loads(run_cli("profile", out, "--data", tokens, "--json").stdout)
    for x, p in zip(layers, rep["layers"]):
        assert p["mean_experts"] == pytest.approx(x["mean_experts"], abs=0.05)


def test_profile_reports_flops_and_load(tokens, tmp_path):
    graph = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
    out = tmp_path / "m.onnx"
    assert run_cli("convert", graph, "-o", out, "--policy", "top-p", "--threshold", "0.5").returncode == 0
    r = run_cli("profile", out, "--data", tokens, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    # tiny Mixtral: hidden 32, intermediate 64, gated MLP -> 3 * 32 * 64 params per expert
    x = rep["layers"][0]
    assert x["pairs_static"] == 8 * 32 * 2 and sum(x["load_static"]) == x["pairs_static"]
    assert x["expert_gflops_static"] == pytest.approx(x["pairs_static"] * 2 * 3 * 32 * 64 / 1e9)
    assert x["pairs"] < x["pairs_static"] and sum(x["load"]) == x["pairs"]
    assert sum(x["experts_per_token_hist"]) == 8 * 32
    assert 0 < rep["total"]["flops_reduction"] < 1
    text = run_cli("profile", out, "--data", tokens)
    assert text.returncode == 0 and "fewer" in text.stdout


def test_calibrate_rejects_bad_requests(tokens, tmp_path):
    graph = next(p for p in FAMILY_GRAPHS if p.stem == "mixtral")
    for args, msg in ((["--target-experts", "5"], "outside"), (["--target-experts", "1.5", "--policy", "static"], "invalid choice")):
        r = run_cli("calibrate", graph, "--data", tokens, "-o", tmp_path / "o.onnx", *args)
        assert r.returncode != 0 and msg in r.stderr and not (tmp_path / "o.onnx").exists()
    r = run_cli("profile", graph, "--data", tokens)
    assert r.returncode == 1 and "not written by moe-export" in r.stderr
