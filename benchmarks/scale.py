"""Converting a large MoE graph: 48 layers x 128 experts, 4 GiB of external weights.

    .venv/bin/python benchmarks/scale.py [--layers 48] [--experts 128] [--gib 4] [--dir DIR]

The weights live in one sparse file (no disk is spent on them). `moe-export convert` runs as a
child process twice: into the input's directory (the output shares the weights file: nothing is
copied) and into another one (the weights are copied into a file named after the output);
reported: wall time and peak RSS of each, the bytes copied, whether the copy is byte-identical
and that no file has a second link. Results: benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent


def external(name, dims, offset, length, location):
    t = onnx.TensorProto(name=name, dims=dims, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    return t


def make_graph(folder: Path, layers=48, experts=128, k=8, hidden=256, gib=4.0):
    """A batched_mm-style MoE stack (router, softmax/top-k/renormalize, gathered expert matmuls)."""
    per_layer = int(gib * (1 << 30)) // layers
    ffn = max(1, (per_layer // 4 - hidden * experts) // (2 * experts * hidden))
    location = "weights.bin"
    nodes, inits, offset = [], [], 0
    consts = [helper.make_tensor("k", TensorProto.INT64, [1], [k]), helper.make_tensor("ax", TensorProto.INT64, [1], [-1]),
              helper.make_tensor("flat", TensorProto.INT64, [1], [-1]), helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    h = "hidden"
    for i in range(layers):
        def w(name, dims):
            nonlocal offset
            n = 4
            for d in dims:
                n *= d
            inits.append(external(f"l{i}.{name}", dims, offset, n, location))
            offset += n
            return f"l{i}.{name}"
        router, up, down = w("router", [hidden, experts]), w("up", [experts, hidden, ffn]), w("down", [experts, ffn, hidden])
        p = f"l{i}/"
        nodes += [
            helper.make_node("MatMul", [h, router], [p + "logits"]),
            helper.make_node("Softmax", [p + "logits"], [p + "probs"], axis=-1),
            helper.make_node("TopK", [p + "probs", "k"], [p + "vals", p + "idx"], axis=-1),
            helper.make_node("ReduceSum", [p + "vals", "ax"], [p + "sum"], keepdims=1),
            helper.make_node("Div", [p + "vals", p + "sum"], [p + "w"]),
            helper.make_node("Reshape", [p + "idx", "flat"], [p + "ids"]),
            helper.make_node("Gather", [up, p + "ids"], [p + "up_w"], axis=0),
            helper.make_node("Gather", [down, p + "ids"], [p + "down_w"], axis=0),
            helper.make_node("Unsqueeze", [h, "one"], [p + "h3"]),
            helper.make_node("MatMul", [p + "h3", p + "up_w"], [p + "a"]),  # stands in for the expert MLP
            helper.make_node("MatMul", [p + "a", p + "down_w"], [p + "o"]),
            helper.make_node("ReduceSum", [p + "o", "one"], [p + "oh"], keepdims=0),
            helper.make_node("Mul", [p + "oh", p + "w"], [p + "ow"]),
            helper.make_node("Add", [h, p + "ow"], [p + "out"]),
        ]
        h = p + "out"
    graph = helper.make_graph(nodes, "moe_scale", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["t", hidden])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)], consts + inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with open(folder / location, "wb") as f:
        f.truncate(offset)  # sparse: the 4 GiB cost no disk
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx", offset


def sha256(path, chunk=64 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="moe_scale_"))
    src_dir, out_dir = root / "in", root / "out"
    src_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    model, nbytes = make_graph(src_dir, args.layers, args.experts, gib=args.gib)
    before = sha256(src_dir / "weights.bin")
    exe = Path(sys.executable).parent / "moe-export"

    def convert(out):
        """One conversion in a child process: (wall seconds, the child's peak RSS in MB)."""
        t = time.perf_counter()
        child = subprocess.Popen([str(exe), "convert", str(model), "-o", str(out), "--policy", "top-p",
                                  "--threshold", "0.6"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"convert failed: {err.decode().strip()}")
        return wall, usage.ru_maxrss / 1024

    # Same directory: the output references the input's weights file, nothing is copied.
    same_wall, same_rss = convert(src_dir / "model.dynamic.onnx")
    # Another directory: the weights are copied (in the kernel) into model.dynamic.onnx.data.
    wall, rss_mb = convert(out_dir / "model.dynamic.onnx")
    out_data = out_dir / "model.dynamic.onnx.data"
    identical = sha256(out_data) == before and sha256(src_dir / "weights.bin") == before
    routers = sum(n.op_type == "DynamicRouter" for n in onnx.load(str(out_dir / "model.dynamic.onnx"),
                                                                    load_external_data=False).graph.node)
    res = {"date": date.today().isoformat(), "layers": args.layers, "experts": args.experts,
           "external_bytes": nbytes, "routers": routers,
           "same_dir": {"convert_wall_s": same_wall, "peak_rss_mb": same_rss, "copied_bytes": 0},
           "other_dir": {"convert_wall_s": wall, "peak_rss_mb": rss_mb, "copied_bytes": out_data.stat().st_size,
                         "copy_gb_per_s": out_data.stat().st_size / 1e9 / wall},
           "external_data_identical": identical,
           "links": {"input": (src_dir / "weights.bin").stat().st_nlink, "output": out_data.stat().st_nlink},
           "note": "the input's weights file is sparse: the copy reads holes as zeros and writes every byte",
           "machine": f"{os.cpu_count()} cores"}
    print(json.dumps(res, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
