"""Original and converted models served side by side by one real Triton Inference Server
(`moe-export serve`, Python backend) on this CPU machine, under a bounded client load.

    .venv/bin/python benchmarks/triton_cpu.py [--requests 48] [--seconds 20] [--tokens 16]
        [--gen-tokens 32]   # -> benchmarks/results/triton_cpu.json

Graphs: the 8-layer Qwen3-MoE export of load_cpu.py (hidden 512, 32 experts top-4, 0.96 GB fp32)
and its calibrated conversion (--target-experts 2.6, about 35% fewer routed pairs), each with
dynamic batching (up to 8, no queue delay) and without: four models in one repository. Each
request is [1, --tokens] token ids of real text; at concurrency 1, 4 and 8, client threads
(gRPC, one client each) send requests back to back until --requests are answered or --seconds
pass. Reported: requests/s, p50/p99 latency.

Generation: the GPT-OSS-20B-shaped int4 GenAI folder of deploy_cpu.py and its calibrated
conversion, served as text generation; 1 and 4 concurrent HTTP /generate_stream requests of
--gen-tokens tokens each (ignore_eos, greedy). Reported: time to first token, tokens/s over all
streams. One server runs all six models; each model's instance uses --threads onnxruntime threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "graphs"))
sys.path.insert(0, str(ROOT / "benchmarks"))
WORK = ROOT / "build" / "triton_bench"


def load(client_for, name, make_request, concurrency, requests, seconds):
    """Back-to-back requests from `concurrency` threads until `requests` are answered or time is up."""
    lat, lock, stop_at = [], threading.Lock(), time.monotonic() + seconds

    def worker():
        client = client_for()
        while time.monotonic() < stop_at:
            with lock:
                if len(lat) >= requests:
                    return
            t = time.perf_counter()
            make_request(client, name)
            with lock:
                lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "wall_s": wall, "requests_per_s": len(lat) / wall,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99))}


def stream(http, name, prompt, tokens):
    """One /generate_stream request: (seconds to the first event, seconds to the end)."""
    body = json.dumps({"text_input": prompt, "stream": True, "max_tokens": tokens, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{http}/v2/models/{name}/generate_stream", data=body, method="POST")
    t, first = time.perf_counter(), None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data:"):
                if b'"error"' in line:
                    raise SystemExit(f"{name}: {line.decode().strip()}")
                first = first or time.perf_counter() - t
    return first, time.perf_counter() - t


def main():
    import tritonclient.grpc as grpcclient

    from deploy_cpu import build as build_genai
    from genai_cpu import cli, text_ids
    from load_cpu import build as build_graph
    from moe_export.deploy.serve import Server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="requests per (model, concurrency), at most")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per (model, concurrency), at most")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per graph request")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generation")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads per model instance")
    ap.add_argument("--env", help="the serving environment (default .venv-serve)", default=str(ROOT / ".venv-serve"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "triton_cpu.json")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)

    graph = build_graph(Path.home() / ".cache" / "moe-export" / "load", 8)
    text = np.frombuffer((Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_bytes(), np.uint8)
    ids = text[: 64 * (text.size // 64)].astype(np.int64).reshape(-1, 64)  # bytes: real text, in vocabulary
    calib = WORK / "graph_calib.npy"
    np.save(calib, ids[:32])
    conv = WORK / "qwen3moe_8l.dynamic.onnx"
    if not conv.is_file():
        cli("calibrate", graph, "--data", calib, "--target-experts", 2.6, "-o", conv)
    folder = build_genai("gpt-oss-20b", "int4")
    gen_conv = folder.with_name(folder.name + ".dynamic")
    if not gen_conv.exists():
        gen_calib = WORK / "gen_calib.npy"
        np.save(gen_calib, text_ids(folder, 128)[8:24])
        cli("calibrate", folder, "--data", gen_calib, "--target-experts", 2.6, "-o", gen_conv)

    repo = WORK / "repo"
    if repo.exists():
        import shutil
        shutil.rmtree(repo)
    models = {}
    for source, kind in ((graph, "original"), (conv, "converted")):
        for batch in (8, 0):
            name = f"{kind}_{'batched' if batch else 'unbatched'}"
            cli("triton", source, "-o", repo, "--name", name, "--backend", "python", "--max-batch-size", batch,
                "--threads", args.threads)
            models[name] = (kind, bool(batch))
    for source, name in ((folder, "generate_original"), (gen_conv, "generate_converted")):
        cli("triton", source, "-o", repo, "--name", name, "--backend", "python", "--max-concurrent", 4)
    pairs = json.loads(cli("profile", conv, "--data", calib, "--json"))["total"]["pair_reduction"]

    rows, t_start = [], time.perf_counter()
    server = Server(repo, env=args.env)
    t = time.perf_counter()
    server.start(timeout=600)
    ready_s = time.perf_counter() - t
    try:
        prompts = ids[100:164, :args.tokens]

        def infer(client, name, at=[0]):
            x = grpcclient.InferInput("input_ids", [1, args.tokens], "INT64")
            at[0] = (at[0] + 1) % len(prompts)
            x.set_data_from_numpy(prompts[at[0]][None])
            client.infer(name, [x])
        for concurrency in (1, 4, 8):
            for name, (kind, batched) in models.items():
                infer(grpcclient.InferenceServerClient(server.grpc_url), name)  # warm
                r = load(lambda: grpcclient.InferenceServerClient(server.grpc_url), name, infer, concurrency,
                         args.requests, args.seconds)
                rows.append({"kind": "graph", "model": kind, "dynamic_batching": batched, "concurrency": concurrency,
                             "tokens_per_request": args.tokens, **r})
                print(f"graph {kind:9s} batching {'on ' if batched else 'off'} concurrency {concurrency}: "
                      f"{r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms "
                      f"({r['requests']} requests)", flush=True)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        gen_prompts = [tok.decode(list(map(int, p))) for p in text_ids(folder, 32)[30:34]]
        for streams in (1, 4):
            for name in ("generate_original", "generate_converted"):
                stream(server.http_url, name, gen_prompts[0], 4)  # warm
                res, lock = [], threading.Lock()

                def one(i, name=name):
                    r = stream(server.http_url, name, gen_prompts[i], args.gen_tokens)
                    with lock:
                        res.append(r)
                t = time.perf_counter()
                ths = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                wall = time.perf_counter() - t
                row = {"kind": "generate", "model": name.split("_")[1], "streams": streams,
                       "new_tokens": args.gen_tokens, "tokens_per_s": streams * args.gen_tokens / wall,
                       "ttft_ms": 1e3 * statistics.median(r[0] for r in res), "wall_s": wall}
                rows.append(row)
                print(f"generate {row['model']:9s} streams {streams}: {row['tokens_per_s']:.1f} tokens/s, "
                      f"time to first token {row['ttft_ms']:.0f} ms", flush=True)
    finally:
        server.stop()
    ratios = {}
    for r in rows:
        if r["model"] == "converted":
            key = (r["kind"], r.get("dynamic_batching"), r.get("concurrency", r.get("streams")))
            o = next(x for x in rows if x["model"] == "original" and
                     (x["kind"], x.get("dynamic_batching"), x.get("concurrency", x.get("streams"))) == key)
            metric = "requests_per_s" if r["kind"] == "graph" else "tokens_per_s"
            ratios[f"{key[0]} batching={key[1]} at {key[2]}" if key[0] == "graph" else f"generate at {key[2]} streams"] = \
                r[metric] / o[metric]
    out = {"date": date.today().isoformat(),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "command": "benchmarks/triton_cpu.py " + " ".join(sys.argv[1:]),
           "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0), Python backend, 1 instance per model",
           "graph_pair_reduction": pairs, "server_ready_s": ready_s, "total_s": time.perf_counter() - t_start,
           "throughput_ratio_converted_over_original": ratios, "results": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
