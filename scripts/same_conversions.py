"""Whether two checkouts of moe-export convert and calibrate alike: for a refactoring that must not
change behaviour. Each checkout's Python runs in its own process (the compiled library is the
installed one) over the reference graphs in graphs/: the rewritten graphs (five conversions each,
compared byte for byte), re-set policies, target calibration and a budget search.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python scripts/same_conversions.py /tmp/before .
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"

# Runs inside one checkout; uses only the API both layouts import (the 0.1 module paths).
PROBE = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np, onnx
from moe_export.rewrite import Policy, rewrite_model, set_policy
from moe_export.calibrate import calibrate
from moe_export.budget import BudgetSearch
from moe_export.runtime import make_feeds

G = Path(sys.argv[1])
digest = lambda m: hashlib.sha256(m.SerializeToString()).hexdigest()
load = lambda p: onnx.load(str(p), load_external_data=False)
out = {}
for g in sorted(G.rglob("*.onnx")):
    for name, pol, kw in [("static", Policy("static"), {}), ("top-p", Policy("top-p", 0.5), {}),
                          ("ratio, as exported", Policy("ratio", 0.3), {"group_experts": False}),
                          ("entropy, portable", Policy("entropy", 0.5), {"portable": True}),
                          ("per-expert weights", Policy("top-p", 0.7), {"per_expert_weights": True})]:
        try:
            out[f"{g.relative_to(G)}: {name}"] = digest(rewrite_model(load(g), pol, **kw)[0])
        except Exception as e:
            out[f"{g.relative_to(G)}: {name}"] = f"{type(e).__name__}: {e}"
for g in ["mixtral.onnx", "deepseek_v3.onnx", "qwen3_moe.onnx", "gate_softmax_topk_e64k8.onnx"]:
    feeds = make_feeds(load(G / g), dims={}, seed=0, tokens=32)
    for mode in ("per-layer", "global"):
        for pol in ("top-p", "ratio", "entropy"):
            out[f"{g}: calibrate {mode} {pol}"] = [(r["layer"], r["threshold"], r["mean_experts"])
                                                   for r in calibrate(G / g, feeds, 1.5, pol, mode)]
    m, _ = rewrite_model(load(G / g), Policy("static"))
    out[f"{g}: repolicy"] = digest(set_policy(m, Policy("ratio", 0.4)))
ids = np.random.default_rng(0).integers(0, 128, (8, 16))
rep = BudgetSearch(load(G / "mixtral.onnx"), G, {"input_ids": ids}, "top-p").run(0.05)
out["mixtral.onnx: budget search"] = json.loads(json.dumps(rep, default=lambda o: getattr(o, "tolist", lambda: str(o))()))
print(json.dumps(out))
"""


def probe(tree):
    r = subprocess.run([sys.executable, "-c", PROBE, str(GRAPHS)], capture_output=True, text=True,
                       cwd=tree, env={**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        sys.exit(f"{tree}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    a, b = (probe(t) for t in sys.argv[1:3])
    differ = [k for k in a if a[k] != b.get(k)] + [k for k in b if k not in a]
    for k in differ:
        print(f"differs: {k}")
    print(f"{len(a) - len(differ)} of {len(a)} results identical "
          f"({hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()[:12]})")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
