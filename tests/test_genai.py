"""Models built by the ONNX Runtime GenAI model builder (graphs/genai/, made by
graphs/make_genai.py): fused MoE/QMoE ops and LFM2's in-graph selection, KV caches, int4; whole
folders converted and run through onnxruntime-genai itself."""
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

import moe_export
from helpers import GRAPHS, run_cli
from moe_export import genai
from moe_export.model.genai import generate

pytestmark = pytest.mark.genai



FOLDERS = sorted(p for p in (GRAPHS / "genai").iterdir() if genai.is_folder(p))
CPU = [p for p in FOLDERS if p.name.endswith("_cpu")]
FAMILY = {"gpt_oss": "fused_moe", "qwen3_5_moe": "fused_moe", "lfm2_moe": "sigmoid_topk"}
PROMPT = [[5, 17, 42, 99, 7, 3]]
LENGTH = 40  # past GPT-OSS's sliding window of 16


def family_of(folder):
    if folder.name.endswith("_dml"):  # DML builds decompose GPT-OSS's MoE: TopK of logits -> Softmax
        return "topk_softmax"
    return next(f for a, f in FAMILY.items() if folder.name.startswith(a))


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fixtures_cover_every_builder_form():
    names = {p.name for p in FOLDERS}
    for arch in FAMILY:
        assert {f"{arch}_fp32_cpu", f"{arch}_int4_cpu", f"{arch}_fp16_cuda"} <= names
    assert "gpt_oss_fp16_dml" in names


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_inspect_and_convert_every_build(folder, tmp_path):
    r = run_cli("inspect", folder, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["layers"]
    assert len(rows) == 2 and {x["family"] for x in rows} == {family_of(folder)}
    before = snapshot(folder)
    out = tmp_path / "dyn"
    # DML's decomposed experts gather k per token as exported: more than k is refused there
    wide = "2" if folder.name.endswith("_dml") else "3"
    r = run_cli("convert", folder, "-o", out, "--policy", "top-p", "--threshold", "0.5", "--max-experts", wide)
    assert r.returncode == 0, r.stderr
    assert snapshot(folder) == before
    dec = genai.decoder_file(out)
    if not folder.name.endswith("_dml"):  # ORT's CPU build lacks DML's fp16 SkipSimplifiedLayerNorm
        moe_export.session(dec, log_severity_level=3)  # (the builder's ops are ORT's: onnx.checker
        # knows neither the original nor this)
    cfg = json.loads((out / "genai_config.json").read_text())
    lib = cfg["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert "/" not in lib and (out / lib).is_file()
    assert {p.name for p in folder.iterdir()} <= {p.name for p in out.iterdir()}
    # fused ops now run up to 3 experts, and their weights are the original's, byte for byte
    m0, m1 = onnx.load(str(genai.decoder_file(folder))), onnx.load(str(dec))
    fused = [n for n in m1.graph.node if n.op_type in ("MoE", "QMoE")]
    assert all(next(a.i for a in n.attribute if a.name == "k") == int(wide) for n in fused)
    w0 = {t.name: t for t in m0.graph.initializer}
    for n in fused:
        for name in n.input[2:]:
            if name:
                assert onnx.numpy_helper.to_array(w0[name]).tobytes() == \
                    onnx.numpy_helper.to_array(next(t for t in m1.graph.initializer if t.name == name)).tobytes()


# CUDA builds run on ORT's CPU too, but LFM2's attention (q/k norms inside GroupQueryAttention)
RUNNABLE = CPU + [p for p in FOLDERS if p.name.endswith("_cuda") and not p.name.startswith("lfm2")]


@pytest.mark.parametrize("folder", RUNNABLE, ids=lambda p: p.name)
def test_static_reproduces_and_generates_the_same_tokens(folder, tmp_path):
    out = tmp_path / "static"
    assert run_cli("convert", folder, "-o", out).returncode == 0
    r = run_cli("validate", folder, out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["static_reproduces"], rep["outputs"]
    if folder in CPU:  # onnxruntime-genai here is the CPU build
        assert generate(out, PROMPT, LENGTH) == generate(folder, PROMPT, LENGTH)


@pytest.mark.parametrize("folder", [p for p in CPU if "fp32" in p.name], ids=lambda p: p.name)
def test_dynamic_policy_cuts_routes_and_still_generates(folder, tmp_path):
    out = tmp_path / "dyn"
    # ratio 0.95 drops 18-49% of pairs on these folders' random routers; on 16 tokens a
    # lower threshold sits too close to the bound
    assert run_cli("convert", folder, "-o", out, "--policy", "ratio", "--threshold", "0.95").returncode == 0
    rep = json.loads(run_cli("validate", folder, out, "--json").stdout)
    assert rep["routed_pairs"]["reduction"] > 0.1
    tokens = generate(out, PROMPT, LENGTH)
    assert len(tokens) == LENGTH and tokens[:6] == PROMPT[0]


def test_calibrate_and_profile_a_folder_on_token_ids(tmp_path):
    folder = GRAPHS / "genai" / "qwen3_5_moe_int4_cpu"
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(3, 500, (4, 24)))
    out = tmp_path / "cal"
    r = run_cli("calibrate", folder, "--data", ids, "--target-experts", "1.5", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)["layers"]
    assert all(abs(x["mean_experts"] - 1.5) < 0.15 for x in layers)
    r = run_cli("profile", out, "--data", ids, "--json")
    assert r.returncode == 0, r.stderr
    total = json.loads(r.stdout)["total"]
    assert total["pair_reduction"] == pytest.approx(0.25, abs=0.08)
    assert total["flops_reduction"] == pytest.approx(total["pair_reduction"])
    # one pair: 2 x (fc1 [2 x 64, 64] + fc2 [64, 64]) multiply-adds, from 4-bit weights unpacked
    assert total["expert_gflops_static"] == pytest.approx(total["pairs_static"] * 2 * (128 * 64 + 64 * 64) / 1e9)
    assert len(generate(out, PROMPT, LENGTH)) == LENGTH
    # a calibrated folder re-tuned in place of a fresh conversion
    r = run_cli("calibrate", out, "--data", ids, "--target-experts", "1.8", "-o", tmp_path / "cal2")
    assert r.returncode == 0, r.stderr


def test_bare_graph_in_a_folder_converts_as_a_file(tmp_path):
    folder = GRAPHS / "genai" / "gpt_oss_int4_cpu"
    out = tmp_path / "x.onnx"
    r = run_cli("convert", folder / "model.onnx", "-o", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("validate", folder / "model.onnx", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["static_reproduces"], r.stderr


def test_folder_outputs_are_refused_where_they_would_touch_the_input(tmp_path):
    folder = GRAPHS / "genai" / "gpt_oss_fp32_cpu"
    before = snapshot(folder)
    r = run_cli("convert", folder, "-o", folder / "sub")
    assert r.returncode == 1 and "inside the input folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "taken").mkdir()
    r = run_cli("convert", folder, "-o", tmp_path / "taken")
    assert r.returncode == 1 and "exists" in r.stderr
    r = run_cli("convert", tmp_path / "taken", "-o", tmp_path / "x")
    assert r.returncode == 1 and "genai_config.json" in r.stderr
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_folder_outputs_must_be_new_folders_in_existing_ones(tmp_path):
    folder = GRAPHS / "genai" / "gpt_oss_fp32_cpu"
    r = run_cli("convert", folder, "-o", tmp_path / "no" / "such" / "out")
    assert r.returncode == 1 and "output directory" in r.stderr and "does not exist" in r.stderr
    r = run_cli("calibrate", folder, "--data", tmp_path / "ids.npy", "--target-experts", "1.5", "-o", tmp_path / "x.onnx")
    assert r.returncode == 1 and "give a folder name" in r.stderr
    assert not any(tmp_path.iterdir())


def test_a_folder_with_its_own_ops_library_keeps_it_or_is_refused(tmp_path):
    """GenAI loads one custom ops library per session: the model's own is kept where the router
    needs none (--portable), else the conversion is refused (it was replaced by moe-export's)."""
    src = tmp_path / "src"
    shutil.copytree(GRAPHS / "genai" / "gpt_oss_fp32_cpu", src)
    (src / "mylib.so").write_bytes(b"the user's ops")
    cfg = json.loads((src / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = "mylib.so"
    (src / "genai_config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", src, "-o", tmp_path / "out", "--policy", "top-p", "--threshold", "0.5")
    assert r.returncode == 1 and "its own custom ops library mylib.so" in r.stderr and "--portable" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("convert", src, "-o", tmp_path / "port", "--portable", "--policy", "top-p", "--threshold", "0.5",
                "--per-expert-weights")
    assert r.returncode == 0, r.stderr
    assert "--per-expert-weights ignored" in r.stderr  # fused MoE ops keep their weights
    out_cfg = json.loads((tmp_path / "port" / "genai_config.json").read_text())
    assert out_cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == "mylib.so"
    assert (tmp_path / "port" / "mylib.so").read_bytes() == b"the user's ops"


def test_a_cached_prefix_with_several_tokens_needs_a_batch_of_one(tmp_path):
    """GroupQueryAttention's rule, and the model's context length, said in one line before
    anything runs (both were ORT's errors)."""
    folder = GRAPHS / "genai" / "gpt_oss_int4_cpu"
    out = tmp_path / "static"
    assert run_cli("convert", folder, "-o", out).returncode == 0
    r = run_cli("validate", folder, out, "--dim", "past_sequence_length=20")
    assert r.returncode == 1 and "only for a batch of one: add --dim batch_size=1" in r.stderr, r.stderr
    r = run_cli("validate", folder, out, "--dim", "past_sequence_length=20", "--dim", "batch_size=1")
    assert r.returncode == 0 and "reproduces the original: yes" in r.stdout, r.stdout + r.stderr
    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    np.save(tmp_path / "long.npy", np.zeros((1, context + 1), dtype=np.int64))
    r = run_cli("profile", out, "--data", tmp_path / "long.npy")
    assert r.returncode == 1 and f"exceed the model's context_length {context}" in r.stderr, r.stderr


def test_cache_feeds_follow_the_graph_and_its_config():
    from moe_export.model.graph import load_model
    from moe_export.run.runtime import cache_dims, make_feeds

    folder = GRAPHS / "genai" / "gpt_oss_fp32_cpu"
    m = load_model(genai.decoder_file(folder))
    assert cache_dims(m, folder) == {"past_sliding_length": 16, "kv_cache_dim": 16}
    assert cache_dims(m) == {"past_sliding_length": 16}  # the window from GroupQueryAttention alone
    f = make_feeds(m, base=folder, tokens=10)
    assert f["input_ids"].shape == (2, 10) and f["attention_mask"].shape == (2, 10)
    assert f["past_key_values.0.key"].shape == (2, 2, 16, 16) and not f["past_key_values.0.key"].any()
    f = make_feeds(m, dims={"past_sequence_length": 5}, base=folder, tokens=4, batch=1)  # a cached prefix
    assert f["attention_mask"].shape == (1, 9) and f["past_key_values.1.key"].shape == (1, 2, 5, 16)
    assert f["past_key_values.0.key"].shape == (1, 2, 16, 16)  # the window's cache keeps its capacity
    q = GRAPHS / "genai" / "qwen3_5_moe_fp32_cpu"
    f = make_feeds(load_model(genai.decoder_file(q)), base=q, tokens=5, batch=1)
    assert f["position_ids"].shape == (3, 1, 5) and (f["position_ids"][2, 0] == np.arange(5)).all()


def test_the_sample_script_runs_end_to_end(tmp_path):
    import subprocess
    import sys
    import sysconfig

    from helpers import ROOT

    text = f"{sysconfig.get_paths()['stdlib']}/LICENSE.txt"
    r = subprocess.run([sys.executable, ROOT / "samples" / "genai_dynamic.py", GRAPHS / "genai" / "lfm2_moe_int4_cpu",
                        text, tmp_path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "reproduces the original: True" in r.stdout and "calibrated 2 layers" in r.stdout
    assert genai.is_folder(tmp_path / "model.dynamic") and genai.is_folder(tmp_path / "model.static")


def test_a_portable_folder_needs_no_library(tmp_path):
    folder = GRAPHS / "genai" / "gpt_oss_int4_cpu"
    out = tmp_path / "portable"
    assert run_cli("convert", folder, "-o", out, "--portable", "--policy", "top-p", "--threshold", "0.5").returncode == 0
    cfg = json.loads((out / "genai_config.json").read_text())
    assert "custom_ops_library" not in cfg["model"]["decoder"]["session_options"]
    assert not list(out.glob("*.so"))
    rep = json.loads(run_cli("validate", folder, out, "--json").stdout)
    assert rep["routed_pairs"]["reduction"] > 0.2
    assert len(generate(out, PROMPT, LENGTH)) == LENGTH
