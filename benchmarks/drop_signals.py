"""Which per-token signal tells a droppable expert, and what should stand in for it, on the
trained models (PyTorch, at equal cuts).

    .venv/bin/python samples/train_moe.py mixtral8 --steps 4000    # and deepseek16, gptoss16
    .venv/bin/python benchmarks/drop_signals.py [--models mixtral8 deepseek16 gptoss16] [--cuts 0.35 0.40 0.45]
        # -> benchmarks/results/drop_signals.json

Issue 27 asks for 40% fewer routed pairs at <= +1% perplexity. The threshold policies' best within
+1% is -39.7% (mixtral8) and -38.4% (deepseek16) even chosen on the evaluation text
(BENCHMARKS.md). This measures, on quality.py's windows, how much a better drop signal or a
stand-in for the dropped expert could buy. Each model's experts module is wrapped: every slot's
expert runs on every token; in each layer a slot whose signal is under the layer's threshold
(the quantile, on the calibration windows, that cuts the given fraction of pairs; a token's
heaviest expert always stays) is dropped. Signals, for slot j of weight w_j, heaviest slot 1:

- ratio: w_j / w_1, the router's own (the ratio policy; top-p ranks the same way at k = 2);
- weight: w_j itself, compared across tokens;
- expert scale: w_j s(e_j) / (w_1 s(e_1)), s(e) the expert's mean output norm on the calibration
  windows (a per-expert constant an op could carry);
- probe: w_j exp(x P_e + b_e), a linear probe of the expert's output size: per expert, least
  squares of log |E_e(x)| on the expert input x over the calibration tokens routed to e (an
  [H, E] matrix, the router's own size: one more matmul per token, no expert FLOPs);
- contribution (oracle): |w_j E_j(x)| / |w_1 E_1(x)|, from the experts' actual outputs, which no
  router has: it bounds what a better choice of tokens could do;
- size (oracle): |w_j E_j(x)|, the same not relative to the token's heaviest expert.

What the dropped weight becomes: renormalize 1 (the kept experts share it, in proportion), 0 (it
is lost), or mean: 0 plus the dropped weight times the dropped expert's mean output on the
calibration windows (a per-expert vector: one add per dropped pair, no expert FLOPs).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CACHE, SEQ, slices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("ratio", "weight", "expert scale", "probe", "contribution (oracle)", "size (oracle)")
RIDGE = 1.0  # the probe's least-squares regularizer (inputs are RMS-normed hidden states)
RENORMALIZE = (1, 0, "mean")


class Drop:
    """Wraps an experts module forward(x, ids [T, k], weights [T, k]) -> the weighted sum."""

    def __init__(self, experts):
        self.forward_one = experts.forward
        self.signal, self.threshold, self.renormalize = None, -math.inf, 1
        self.scale = self.mean = None  # per expert: mean output norm, mean output
        self.probe = None              # per expert: (P [E, H], b [E]), log |E_e(x)| ~ x P_e + b_e
        self.record = None             # a list: each call's signal values of the droppable slots
        self.stats = None              # a list: each call's (input, ids, per-slot outputs)
        self.dropped = self.pairs = 0
        experts.forward = self.forward

    def forward(self, x, ids, w):
        ones = torch.ones_like(w[:, :1])
        outs = torch.stack([self.forward_one(x, ids[:, j:j + 1], ones) for j in range(ids.shape[1])], 1)
        if self.stats is not None:
            self.stats.append((x.clone(), ids.clone(), outs))
        if self.signal is None:
            return (w[..., None] * outs).sum(1)
        top = w.argmax(1, keepdim=True)
        sig = self.signal_of(x, w, ids, outs, top)
        heaviest = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)
        if self.record is not None:
            self.record.append(sig[~heaviest])
        drop = (sig < self.threshold) & ~heaviest
        self.dropped += int(drop.sum())
        self.pairs += drop.numel()
        kept = torch.where(drop, 0.0, w)
        if self.renormalize == 1:
            kept = kept * (w.sum(1, keepdim=True) / kept.sum(1, keepdim=True))
        y = (kept[..., None] * outs).sum(1)
        if self.renormalize == "mean":
            y = y + (torch.where(drop, w, 0.0)[..., None] * self.mean[ids]).sum(1)
        return y

    def signal_of(self, x, w, ids, outs, top):
        w1 = w.gather(1, top)
        if self.signal == "ratio":
            return w / w1
        if self.signal == "weight":
            return w
        if self.signal == "probe":
            P, b = self.probe
            return w * (torch.einsum("th,tkh->tk", x, P[ids]) + b[ids]).exp()
        if self.signal == "size (oracle)":
            return w * outs.norm(dim=-1)
        if self.signal == "expert scale":
            s = self.scale[ids]
            return (w * s) / (w1 * s.gather(1, top))
        c = w * outs.norm(dim=-1)
        return c / c.gather(1, top).clamp_min(1e-12)


def fit_probe(xs, ids, norms, E):
    """Per expert, ridge least squares of log |E_e(x)| on [x, 1] over the tokens routed to e: an
    [E, H] matrix and a bias, the size of the router's own weight (one more matmul per token)."""
    H = xs.shape[1]
    P, b = torch.zeros(E, H), torch.zeros(E)
    y = norms.clamp_min(1e-12).log().double()
    for e in range(E):
        m = ids == e
        X = torch.cat([xs[m], torch.ones(int(m.sum()), 1)], 1).double()
        sol = torch.linalg.solve(X.T @ X + RIDGE * torch.eye(H + 1, dtype=torch.float64), X.T @ y[m]).float()
        P[e], b[e] = sol[:H], sol[H]
    return P, b


@torch.no_grad()
def nll(model, seqs, batch=32):
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        ids = torch.as_tensor(seqs[i:i + batch], dtype=torch.long)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def trained(name, calib_seqs, eval_seqs):
    """(model, experts, k, calibration windows, evaluation windows) of a samples/train_moe.py model."""
    import transformers as tf

    ckpt = CACHE / "models" / name
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"{ckpt} missing: run samples/train_moe.py {name} first")
    model = tf.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    cfg = model.config
    E, k = getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts, cfg.num_experts_per_tok
    held = np.load(ckpt / "heldout.npy")
    return (model, E, k, *slices(held[: (len(held) // SEQ) * SEQ].reshape(-1, SEQ), calib_seqs, eval_seqs))


def save(out, a, results):
    """Writes the models' results with the run's settings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=str(date.today()), machine=f"{platform.machine()} build VM",
                                   calib_seqs=a.calib_seqs, eval_seqs=a.eval_seqs, models=results), indent=1) + "\n")


def run(name, cuts, calib_seqs, eval_seqs):
    model, E, k, calib, ev = trained(name, calib_seqs, eval_seqs)
    drops = [Drop(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    base = nll(model, ev)
    for d in drops:  # each expert's mean output where it is routed, on the calibration text
        d.stats = []
    nll(model, calib)
    for d in drops:
        ids = torch.cat([s[1] for s in d.stats]).reshape(-1)
        outs = torch.cat([s[2] for s in d.stats]).reshape(len(ids), -1)
        xs = torch.cat([s[0] for s in d.stats]).repeat_interleave(k, 0)  # each slot's expert input
        n = torch.bincount(ids, minlength=E).clamp_min(1)[:, None]
        d.mean = torch.zeros(E, outs.shape[1]).index_add_(0, ids, outs) / n
        d.scale = (torch.zeros(E).index_add_(0, ids, outs.norm(dim=-1)) / n[:, 0]).clamp_min(1e-12)
        d.probe = fit_probe(xs, ids, outs.norm(dim=-1), E)
        d.stats = None
    rows = []
    for signal in SIGNALS:
        for d in drops:
            d.signal, d.threshold, d.record = signal, -math.inf, []
        nll(model, calib)
        values = [torch.cat(d.record) for d in drops]
        for d in drops:
            d.record = None
        for cut in cuts:  # of the k - 1 droppable slots, the fraction that cuts `cut` of all pairs
            for d, v in zip(drops, values):
                d.threshold = torch.quantile(v, min(1.0, cut * k / (k - 1))).item()
            for renorm in RENORMALIZE:
                for d in drops:
                    d.renormalize, d.dropped, d.pairs = renorm, 0, 0
                ppl = nll(model, ev)
                pairs = sum(d.dropped for d in drops) / sum(d.pairs for d in drops)
                rows.append(dict(signal=signal, target_cut=cut, renormalize=renorm, pair_reduction=pairs,
                                 ppl_increase=math.exp(ppl - base) - 1))
                print(f"{name} {signal:22s} cut {cut:.2f} renormalize {renorm!s:4}: pairs -{100 * pairs:.1f}% "
                      f"ppl {100 * rows[-1]['ppl_increase']:+.2f}%", flush=True)
    return dict(model=name, experts=E, k=k, static_ppl=math.exp(base), rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixtral8", "deepseek16", "gptoss16"])
    ap.add_argument("--cuts", type=float, nargs="+", default=[0.35, 0.40, 0.45], help="fractions of pairs cut")
    ap.add_argument("--calib-seqs", type=int, default=96)
    ap.add_argument("--eval-seqs", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drop_signals.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    save(a.out, a, [run(m, a.cuts, a.calib_seqs, a.eval_seqs) for m in a.models])


if __name__ == "__main__":
    main()
