"""Load time and peak memory of a converted model beside its original, and what calibration costs.

    .venv/bin/python benchmarks/load_cpu.py [--layers 8] [--out benchmarks/results/load_cpu.json]

A Qwen3-MoE-shaped model with random weights (hidden 512, 32 experts top-4, expert intermediate
512, vocab 32000: 962 MB of fp32 weights at 8 layers) is exported by `moe-export export`
(transformers 5.x, batched_mm experts) and converted at the static policy three ways: the
default, --per-expert-weights and --no-group-experts. Each graph is loaded in a fresh child process
(onnxruntime session, default options, one per graph, in turns) for its load time and peak RSS, and
timed on one token and on a 128-token sequence, side by side. Then `moe-export calibrate
--target-experts 2` on [32, 128] token ids, original and static conversion, in child processes
(peak RSS of the child). The export is cached in ~/.cache/moe-export/load.

    .venv/bin/python benchmarks/load_cpu.py --deep   # -> benchmarks/results/load_cpu_deep.json

The same at depth, where what a layer adds to the graph outweighs the weights (which onnxruntime
maps without reading): 48 layers of 128 experts top-8, hidden 128, expert intermediate 64; the
original and the default conversion only, no calibration.

    .venv/bin/python benchmarks/load_cpu.py --probe  # -> benchmarks/results/load_cpu_probe.json

Policy probe at this size: `calibrate --policy probe --target-experts 2` on the original (its fit
reads every expert's output out of the graph), beside top-p, and the probe-routed graph loaded and
timed beside the original and the static conversion.

    .venv/bin/python benchmarks/load_cpu.py --probe --stand-in 4    # -> benchmarks/results/load_cpu_stand_in.json

The same, with also `calibrate --policy probe --stand-in 4 --target-experts 2`, its graph timed
beside the others (the stand-in computed for the dropped pairs), and in one process against
itself with the stand-ins removed (the same routing: the stand-in's own cost).

    .venv/bin/python benchmarks/load_cpu.py --probe --probe-baseline /tmp/old   # a checkout of an earlier commit

The same, with the probe's calibration also run by the moe-export source in /tmp/old (its native
libraries copied into /tmp/old/moe_export/lib), in turns with this one (--turns each): what a
change to the probe's read-out does to its time and memory, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path.home() / ".cache" / "moe-export" / "load"
EXE = Path(sys.executable).parent / "moe-export"

# Peak RSS: ru_maxrss survives exec (a child reports at least its parent's peak at the fork), so a
# measured child reads VmHWM, its own image's, and a command is run under a small relay whose
# child's ru_maxrss is the command's alone.
CHILD = r"""
import json, re, sys, time
import numpy as np
import moe_export
path, reps = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
sess = moe_export.session(path)
load = time.perf_counter() - t
hwm = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 2**20
out = {"load_s": load, "load_rss_gb": hwm()}
rng = np.random.default_rng(0)
for name, shape in (("one_token_ms", (1, 1)), ("seq128_ms", (1, 128))):
    ids = rng.integers(0, 32000, shape).astype(np.int64)
    sess.run(None, {"input_ids": ids})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"input_ids": ids})
        ts.append(time.perf_counter() - t)
    out[name] = 1e3 * sorted(ts)[len(ts) // 2]
out["run_rss_gb"] = hwm()
print(json.dumps(out))
"""
RELAY = r"""
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


SIZES = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4)
DEEP = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=128, num_experts_per_tok=8)


def build(work: Path, layers: int, sizes=SIZES) -> Path:
    import torch
    import transformers as tf

    tag = f"{layers}l" + ("_deep" if sizes is DEEP else "")
    graph = work / f"qwen3moe_{tag}" / "model.onnx"
    if graph.is_file():
        return graph
    cfg = tf.Qwen3MoeConfig(vocab_size=32000, num_hidden_layers=layers, decoder_sparse_step=1, norm_topk_prob=True,
                            **sizes)
    torch.manual_seed(0)
    ckpt = work / f"ckpt_{tag}"
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    graph.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([EXE, "export", ckpt, "-o", graph], check=True)
    return graph


def child(args) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of a child process."""
    with tempfile.NamedTemporaryFile() as f:
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", RELAY, f.name, *map(str, args)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t
        if run.returncode:
            raise SystemExit(f"{args[1]} failed: {run.stderr.decode()[-500:]}")
        return wall, int(Path(f.name).read_text()) / 2**20


def stand_in_ab(graph: Path, rounds=(200, 40)) -> dict:
    """The stand-in's own cost: `graph` timed against itself with its stand-ins removed (the same
    routing), in one process, the two alternating; medians in ms at 1 and 128 tokens."""
    import numpy as np
    import onnx

    import moe_export
    from moe_export.conversion import Policy, repolicy
    from moe_export.conversion.record import Routing

    routers = Routing.read(onnx.load(str(graph), load_external_data=False)).routers
    bare = graph.parent / "ab_without_stand_ins.onnx"
    bare.unlink(missing_ok=True)
    repolicy(graph, bare, Policy("static", 0.0, per_layer={r.layer: (r.attrs.policy, r.attrs.threshold, 0.0)
                                                          for r in routers}, stand_ins={}))
    sessions = {"with": moe_export.session(str(graph)), "without": moe_export.session(str(bare))}
    rng, out = np.random.default_rng(0), {}
    for tokens, n in zip((1, 128), rounds):
        ids = rng.integers(0, 32000, (1, tokens))
        times = {k: [] for k in sessions}
        for _ in range(n):
            for k, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, {"input_ids": ids})
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        out[f"{tokens}_tokens_ms"] = med | {"with_over_without": med["with"] / med["without"]}
    bare.unlink()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3, help="load each graph this many times, in turns")
    ap.add_argument("--deep", action="store_true", help="48 layers of 128 small experts: load at depth")
    ap.add_argument("--probe", action="store_true", help="policy probe's calibration and graph at this size")
    ap.add_argument("--probe-baseline", type=Path, metavar="SRC",
                    help="with --probe: an earlier moe-export source tree whose probe calibration runs in turns with this one")
    ap.add_argument("--stand-in", type=int, metavar="RANK",
                    help="with --probe: also calibrate probe with a stand-in of this rank, and time its graph")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.deep:
        a.layers = 48
    a.out = a.out or ROOT / "benchmarks" / "results" / ("load_cpu_deep.json" if a.deep else
                                                        "load_cpu_stand_in.json" if a.probe and a.stand_in is not None
                                                        else "load_cpu_probe.json" if a.probe else "load_cpu.json")
    graph = build(WORK, a.layers, DEEP if a.deep else SIZES)
    forms = {"original": None, "default": []}
    if not (a.deep or a.probe):  # (--per-expert-weights would unroll all 48 x 128 experts; not what --deep is for)
        forms.update(per_expert_weights=["--per-expert-weights"], no_group_experts=["--no-group-experts"])
    paths = {"original": graph}
    convert_s = {}
    for name, flags in forms.items():
        if flags is None:
            continue
        paths[name] = graph.parent / f"static_{name}.onnx"
        paths[name].unlink(missing_ok=True)
        for extra in graph.parent.glob(f"static_{name}.onnx.*"):
            extra.unlink()
        convert_s[name] = child([EXE, "convert", graph, "-o", paths[name], *flags])
    import numpy as np
    ids = WORK / "calib_32x128.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 32000, (32, 128)))
    calib = {}
    runs_of = [] if a.deep else [("original", "top-p", []), ("default", "top-p", [])] + \
        [("original", "probe", [])] * a.probe + \
        [("original", "probe", ["--stand-in", str(a.stand_in)])] * (a.probe and a.stand_in is not None)
    for name, policy, more in runs_of:
        key = name if policy == "top-p" else f"{name}, {policy}" + (f", stand-in rank {a.stand_in}" if more else "")
        out = graph.parent / f"cal_{name}_{policy}{'_stand_in' * bool(more)}.onnx"
        out.unlink(missing_ok=True)
        calib[key] = dict(zip(("s", "rss_gb"), child([EXE, "calibrate", paths[name], "--data", ids, "--policy", policy,
                                                       "--target-experts", "2", "-o", out, *more])))
        if policy == "probe":
            paths["calibrated, probe" + (f" + stand-in rank {a.stand_in}" if more else "")] = out
    if a.probe and a.probe_baseline:
        old = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(a.probe_baseline.resolve())!r}); "
               "sys.argv[0] = 'moe-export'; from moe_export.cli import main; main()"]
        turns = {"this": [], "baseline": []}
        for _ in range(a.turns):
            for who, exe in (("this", [EXE]), ("baseline", old)):
                out = graph.parent / f"cal_probe_{who}.onnx"
                out.unlink(missing_ok=True)
                turns[who].append(child([*exe, "calibrate", paths["original"], "--data", ids, "--policy", "probe",
                                         "--target-experts", "2", "-o", out]))
        for who, rs in turns.items():
            calib[f"original, probe, {who} (median of {a.turns})"] = {
                "s": statistics.median(r[0] for r in rs), "rss_gb": statistics.median(r[1] for r in rs),
                "s_each": [r[0] for r in rs]}
        import onnx
        from moe_export.conversion import routers_metadata
        th = {who: np.array([r["attrs"]["threshold"] for r in routers_metadata(onnx.load(
            str(graph.parent / f"cal_probe_{who}.onnx"), load_external_data=False))["routers"]]) for who in turns}
        calib["probe thresholds, this vs baseline: max relative difference"] = float(
            np.max(np.abs(th["this"] - th["baseline"]) / np.abs(th["baseline"])))
    runs = {name: [] for name in paths}
    for _ in range(a.turns):
        for name, p in paths.items():
            r = subprocess.run([sys.executable, "-c", CHILD, str(p), "5"], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        row = {"graph": name, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
        if name in convert_s:
            row["convert_s"], row["convert_rss_gb"] = convert_s[name]
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["load_vs_original"] = row["load_s"] / base["load_s"]
        row["load_rss_vs_original"] = row["load_rss_gb"] / base["load_rss_gb"]
    ab = {}
    if a.probe and a.stand_in is not None:
        ab = stand_in_ab(paths[f"calibrated, probe + stand-in rank {a.stand_in}"])
        for k, v in ab.items():
            print(f"stand-in on / off, same routing, {k}: {v['with']:.2f} / {v['without']:.2f} ms "
                  f"({v['with_over_without']:.3f}x)")
    result = {"date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} build VM",
              "onnxruntime": __import__("onnxruntime").__version__, "layers": a.layers,
              "sizes": DEEP if a.deep else SIZES,
              "weights_gb": sum(f.stat().st_size for f in graph.parent.glob("model.onnx*")) / 2**30,
              "turns": a.turns, "rows": rows, "calibrate_32x128": calib} | ({"stand_in_on_off": ab} if ab else {})
    a.out.write_text(json.dumps(result, indent=1))
    for row in rows:
        print(f"{row['graph']:20s} load {row['load_s']:.2f} s ({row['load_vs_original']:.2f}x) "
              f"RSS {row['load_rss_gb']:.2f} GB ({row['load_rss_vs_original']:.2f}x); one token "
              f"{row['one_token_ms']:.1f} ms, 128 tokens {row['seq128_ms']:.1f} ms; run RSS {row['run_rss_gb']:.2f} GB")
    for name, c in calib.items():
        print(f"calibrate {name}: {c['s']:.1f} s, peak RSS {c['rss_gb']:.2f} GB" if isinstance(c, dict) else f"{name}: {c:.2g}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
