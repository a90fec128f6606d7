"""A real Triton Inference Server (tritonserver 2.51 from the nvidia-pytriton wheel, Python
backend) started by `moe-export serve` on 127.0.0.1: graphs over HTTP and gRPC equal a local
onnxruntime run, bad requests get 400 while their neighbours are served, a GenAI folder generates
what onnxruntime-genai generates locally, and stopping leaves no stub or shared memory behind.
Every server here is bounded: requests are few and each wait has a timeout."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import GRAPHS, ROOT, run_cli, session_of

import tritonclient.grpc as grpcclient  # installed by scripts/setup.sh: a missing one fails
import tritonclient.http as httpclient

pytestmark = pytest.mark.server
ENV = Path(os.environ.get("MOE_EXPORT_SERVE_ENV", ROOT / ".venv-serve"))
MIXTRAL = GRAPHS / "mixtral.onnx"
QWEN_PAST = GRAPHS / "optimum" / "qwen3_moe.onnx"  # a KV-cache decoder: stateful, never batched
GENAI = GRAPHS / "genai" / "gpt_oss_fp32_cpu"  # its tokenizer loads in onnxruntime-genai 0.18
PROMPTS = ["Hello world", "The quick brown fox jumps", "1 2 3 4 5 6 7", "Triton serves"]


def start(repo, *extra, timeout=120):
    """`moe-export serve REPO` on free ports; returns the process and its HTTP and gRPC addresses."""
    exe = Path(sys.executable).parent / "moe-export"
    proc = subprocess.Popen([str(exe), "serve", str(repo), "--env", str(ENV), "--http-port", "0", "--grpc-port", "0",
                             "--metrics-port", "0", *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            text = "".join(lines)
            http = re.search(r"HTTP\s+http://(127\.0\.0\.1:\d+)", text).group(1)
            grpc = re.search(r"gRPC\s+(127\.0\.0\.1:\d+)", text).group(1)
            return proc, http, grpc
    proc.kill()
    raise AssertionError("server did not start: " + "".join(lines) + proc.stderr.read())


def stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    return proc.wait(60)


def post(http, path, body):
    req = urllib.request.Request(f"http://{http}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stubs():
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmd(p).startswith("triton_python_backend_stub")]


def _cmd(p):
    try:
        return (p / "cmdline").read_bytes().split(b"\0")[0].decode().rsplit("/", 1)[-1]
    except OSError:
        return ""


def local_greedy(folder, text, new):
    import onnxruntime_genai as og

    from moe_export.model.genai import generate
    tok = og.Tokenizer(og.Model(str(folder)))
    ids = tok.encode(text)
    out = generate(folder, ids.reshape(1, -1), max_length=max(len(ids) + new, 48))[len(ids):len(ids) + new]
    stream = tok.create_stream()
    return tok.decode(np.asarray(out, dtype=np.int32)), "".join(stream.decode(t) for t in out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    conv, past, folder = d / "mixtral.dyn.onnx", d / "qwen.dyn.onnx", d / "gpt_oss_static"
    assert run_cli("convert", MIXTRAL, "-o", conv, "--policy", "top-p", "--threshold", "0.6").returncode == 0
    assert run_cli("convert", QWEN_PAST, "-o", past, "--policy", "top-p", "--threshold", "0.6").returncode == 0
    assert run_cli("convert", GENAI, "-o", folder).returncode == 0
    repo = d / "repo"
    for model, name, extra in [(MIXTRAL, "original", ()), (conv, "converted", ("--batch-delay-us", "300000")),
                               (past, "decoder", ()), (folder, "generate", ())]:
        r = run_cli("triton", model, "-o", repo, "--name", name, "--backend", "python", "--threads", "1", *extra)
        assert r.returncode == 0, r.stderr
    proc, http, grpc = start(repo)
    yield {"proc": proc, "http": http, "grpc": grpc, "repo": repo, "conv": conv, "past": past, "folder": folder}
    stop(proc)


def test_repository_is_self_contained(served):
    repo = served["repo"]
    text = "".join(p.read_text(errors="replace") for p in repo.rglob("*") if p.suffix in (".pbtxt", ".py", ".json"))
    assert str(ROOT) not in text and "/tmp" not in text  # no path of this machine
    assert "moe_export" not in (repo / "converted" / "1" / "model.py").read_text().replace("moe_export.json", "")
    assert (repo / "converted" / "libmoe_export_ort.so").is_file()
    assert (repo / "generate" / "1" / "model" / "libmoe_export_ort.so").is_file()
    cfg = lambda n: (repo / n / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in cfg("converted") and "dynamic_batching" in cfg("converted")
    assert "max_batch_size: 0" in cfg("decoder") and "dynamic_batching" not in cfg("decoder")
    assert "decoupled: true" in cfg("generate")


@pytest.mark.parametrize("name", ["original", "converted"])
def test_http_and_grpc_equal_local_onnxruntime(served, name):
    path = MIXTRAL if name == "original" else served["conv"]
    ids = np.random.default_rng(1).integers(0, 128, (2, 9)).astype(np.int64)
    want = session_of(path).run(None, {"input_ids": ids})[0]
    h = httpclient.InferenceServerClient(served["http"])
    x = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    x.set_data_from_numpy(ids)
    got_http = h.infer(name, [x]).as_numpy("logits")
    g = grpcclient.InferenceServerClient(served["grpc"])
    y = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    y.set_data_from_numpy(ids)
    got_grpc = g.infer(name, [y]).as_numpy("logits")
    np.testing.assert_array_equal(got_http, want)
    np.testing.assert_array_equal(got_grpc, want)


def test_one_bad_request_does_not_fail_its_batch(served):
    """The converted model holds requests 300 ms to batch them: four arrive together, one with a
    token id past the vocabulary; it alone gets 400 and the others their logits."""
    rng = np.random.default_rng(2)
    batch = [rng.integers(0, 128, (1, 7)) for _ in range(4)]
    batch[2][0, 3] = 128
    sess = session_of(served["conv"])
    before = _batches(served["http"])

    def one(ids):
        return post(served["http"], "/v2/models/converted/infer",
                    {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",
                                 "data": ids.reshape(-1).tolist()}]})
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, batch))
    assert answers[2][0] == 400 and "token ids must be in [0, 128)" in answers[2][1]
    for ids, (code, body) in zip(batch, answers):
        if ids.max() < 128:
            assert code == 200, body
            got = np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(1, 7, 128)
            np.testing.assert_allclose(got, sess.run(None, {"input_ids": ids})[0], rtol=1e-5, atol=1e-5)
    assert _batches(served["http"]) - before == {4: 1}  # one model execution held all four


def _batches(http):
    with urllib.request.urlopen(f"http://{http}/v2/models/converted/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]["batch_stats"]
    from collections import Counter
    return Counter({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats})


@pytest.mark.parametrize("body,message", [
    ({"shape": [1, 3], "data": [1, -5, 2]}, "token ids must be in [0, 128); input 'input_ids' holds -5"),
    ({"shape": [1, 3], "data": [1, 500, 2]}, "holds 500"),
    ({"shape": [1, 0], "data": []}, "input 'input_ids' is empty"),
    ({"shape": [1, 3], "data": [1, 2, 3], "datatype": "FP32"}, "FP32"),
    ({"shape": [3], "data": [1, 2, 3]}, "shape"),
])
def test_bad_graph_requests_get_400_and_the_server_keeps_serving(served, body, message):
    req = {"name": "input_ids", "datatype": "INT64", **body}
    code, text = post(served["http"], "/v2/models/converted/infer", {"inputs": [req]})
    assert code == 400 and message in text, text
    ok = {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}
    assert post(served["http"], "/v2/models/converted/infer", {"inputs": [ok]})[0] == 200


def _decoder_inputs(past_len=0, seq=5, mask_extra=0):
    model = onnx.load(str(QWEN_PAST), load_external_data=False)
    rng = np.random.default_rng(3)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 100, (1, seq))
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past_len + seq + mask_extra), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past_len, past_len + seq)[None]
        else:
            feeds[i.name] = np.zeros((1, dims[1], past_len, dims[3]), np.float32)
    return feeds


def test_kv_cache_decoder_is_served_one_request_at_a_time(served):
    feeds = _decoder_inputs()
    want = session_of(served["past"]).run(["logits"], feeds)[0]
    g = grpcclient.InferenceServerClient(served["grpc"])
    ins = []
    for k, v in feeds.items():
        x = grpcclient.InferInput(k, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
        x.set_data_from_numpy(v)
        ins.append(x)
    np.testing.assert_array_equal(g.infer("decoder", ins).as_numpy("logits"), want)
    bad = _decoder_inputs(seq=5)
    bad["position_ids"] = bad["position_ids"][:, :4]
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64" if v.dtype == np.int64 else "FP32",
                        "data": v.reshape(-1).tolist()} for k, v in bad.items()]}
    code, text = post(served["http"], "/v2/models/decoder/infer", body)
    assert code == 400 and "dimension 1 (sequence_length) is 5 in 'input_ids'" in text, text


def test_generate_and_generate_stream_equal_local_greedy(served):
    whole, streamed = local_greedy(served["folder"], PROMPTS[0], 12)
    code, text = post(served["http"], "/v2/models/generate/generate",
                      {"text_input": PROMPTS[0], "parameters": {"max_tokens": 12, "temperature": 0}})
    assert code == 200, text
    assert json.loads(text)["text_output"] == PROMPTS[0] + whole
    code, text = post(served["http"], "/v2/models/generate/generate",
                      {"text_input": PROMPTS[0], "max_tokens": 12, "exclude_input_in_output": True})
    assert json.loads(text)["text_output"] == whole
    code, text = post(served["http"], "/v2/models/generate/generate_stream",
                      {"text_input": PROMPTS[0], "stream": True, "max_tokens": 12})
    events = [json.loads(ln[5:]) for ln in text.splitlines() if ln.startswith("data:")]
    assert code == 200 and len(events) > 1
    assert "".join(e["text_output"] for e in events) == streamed


def test_concurrent_generations_each_equal_local_greedy(served):
    def one(p):
        return post(served["http"], "/v2/models/generate/generate", {"text_input": p, "max_tokens": 10})
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(one, PROMPTS))
    for p, (code, text) in zip(PROMPTS, answers):
        assert code == 200, text
        assert json.loads(text)["text_output"] == p + local_greedy(served["folder"], p, 10)[0]


@pytest.mark.parametrize("body,message", [
    ({"text_input": ""}, "text_input is empty"),
    ({"text_input": "hi", "max_token": 3}, "unknown setting 'max_token'"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"text_input": "hi", "max_tokens": 100000}, "exceeds the model's context of 256"),
    ({"text_input": "hi", "temperature": "warm"}, "is not a float"),
])
def test_bad_generate_requests_get_400(served, body, message):
    code, text = post(served["http"], "/v2/models/generate/generate", body)
    assert code == 400 and message in text, text
    assert post(served["http"], "/v2/models/generate/generate", {"text_input": "hi", "max_tokens": 2})[0] == 200


def test_sigkill_then_restart_serves_again_and_sigterm_leaves_nothing(served, tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("triton", served["conv"], "-o", repo, "--name", "m", "--backend", "python").returncode == 0
    proc, http, _ = start(repo)
    server = next(p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmd(p) == "tritonserver"
                  and str(repo) in (p / "cmdline").read_bytes().decode(errors="replace"))
    os.kill(int(server.name), signal.SIGKILL)
    assert proc.wait(60) == 1 and "exited" in proc.stderr.read()
    port = int(http.rsplit(":", 1)[1])
    before = set(stubs())
    proc, http, _ = start(repo, "--http-port", port)  # the same port again
    ok = {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}
    assert post(http, "/v2/models/m/infer", {"inputs": [ok]})[0] == 200
    prefix = f"moe_export_triton_{proc.pid}_"
    assert any(f.name.startswith(prefix) for f in Path("/dev/shm").iterdir())
    assert stop(proc) == 0
    assert set(stubs()) <= before  # its stubs are gone
    assert not [f for f in Path("/dev/shm").iterdir() if f.name.startswith(prefix)]


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    r = run_cli("serve", tmp_path, "--env", ENV)
    assert r.returncode == 2 and "not a Triton model repository" in r.stderr
    assert run_cli("triton", MIXTRAL, "-o", tmp_path / "repo", "--name", "m", "--backend", "python").returncode == 0
    r = run_cli("serve", tmp_path / "repo", "--env", tmp_path)
    assert r.returncode == 2 and "not a Python virtual environment" in r.stderr
    r = run_cli("serve", tmp_path / "repo", "--env", ROOT / ".venv")
    assert r.returncode == 1 and "has no Triton server" in r.stderr and "pip install nvidia-pytriton" in r.stderr
    # an environment with the server but numpy 2, whose stubs would hand the models garbage
    env = tmp_path / "env"
    site = env / "lib" / "python3.11" / "site-packages"
    (site / "pytriton" / "tritonserver" / "bin").mkdir(parents=True)
    (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").write_bytes(b"")
    (site / "numpy-2.1.0.dist-info").mkdir()
    (env / "bin").mkdir()
    (env / "bin" / "python3").symlink_to(sys.executable)
    r = run_cli("serve", tmp_path / "repo", "--env", env)
    assert r.returncode == 1 and "needs numpy < 2" in r.stderr
    r = run_cli("triton", GENAI, "-o", tmp_path / "repo", "--name", "g")
    assert r.returncode == 2 and "--backend python" in r.stderr
