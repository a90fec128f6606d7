"""What a cheap stand-in for each dropped expert buys, on the trained models (PyTorch, uniform cuts),
and what it would cost in expert FLOPs.

    .venv/bin/python samples/train_moe.py mixtral8 --steps 4000    # and deepseek16, gptoss16
    .venv/bin/python benchmarks/stand_in.py [--models mixtral8 deepseek16 gptoss16] [--ranks 1 2 4 16]
        # -> benchmarks/results/stand_in.json

Policy probe (BENCHMARKS.md) drops the slots whose predicted contribution w_j |E_j(x)| is small,
and the dropped weight is lost (renormalize 0) or given to the kept experts. Either way the
dropped expert's output is replaced by nothing. Here it is replaced by a linear stand-in fitted
on the calibration windows, per expert e:

    S_e(x) = m_e + (x - mu_e) A_e,  A_e of rank r

(m_e, mu_e: the mean output and input over the tokens routed to e; A_e: ridge least squares of
the output on the input, reduced to rank r on its fitted values). rank 0 is the mean output
alone (drop_signals.py's "mean"). Each layer's output is then sum_kept w_j E_j(x) +
sum_dropped w_j S_j(x). With a stand-in, what a drop costs is the size of the expert's output
that the stand-in misses, so the probe is fitted on log |E_e(x) - S_e(x)| instead of log |E_e(x)|.
Method as drop_signals.py: in each layer the slots of lowest signal drop (a token's heaviest
expert always stays), the threshold being the signal's quantile on the 96 calibration windows
for the given cut; perplexity on the 256 evaluation windows.

Cost, in multiply-adds per token against the static routing's expert MACs (k x 3 H I):
- per_pair: the stand-in computed only for the dropped pairs (2 r H each, plus the mean's H),
  as a fused kernel would;
- dense: for every expert on every token and masked (2 E r H + E H), as plain ONNX ops can.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drop_signals import Drop, nll, save, trained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RIDGE = 1.0  # in units of the inputs' mean square, as the product's probe fit (moe_export/run/probe.py)
MIN_TOKENS = 8


class StandIn(Drop):
    """Drop with the probe signal and an optional stand-in for each dropped pair (renormalize 0)."""

    def __init__(self, experts):
        super().__init__(experts)
        self.standin = None  # (m [E, H], mu [E, H], A [E, H, H]) or None: the dropped output lost

    def forward(self, x, ids, w):
        ones = torch.ones_like(w[:, :1])
        outs = torch.stack([self.forward_one(x, ids[:, j:j + 1], ones) for j in range(ids.shape[1])], 1)
        if self.stats is not None:
            self.stats.append((x.clone(), ids.clone(), outs))
        if self.signal is None or self.stats is not None:
            return (w[..., None] * outs).sum(1)
        P, b = self.probe
        sig = w * (torch.einsum("th,tkh->tk", x, P[ids]) + b[ids]).exp()
        heaviest = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.argmax(1, keepdim=True), True)
        if self.record is not None:
            self.record.append(sig[~heaviest])
        drop = (sig < self.threshold) & ~heaviest
        self.dropped += int(drop.sum())
        self.pairs += drop.numel()
        y = (torch.where(drop, 0.0, w)[..., None] * outs).sum(1)
        if self.standin is not None:
            m, mu, A = self.standin
            s = m[ids] + torch.einsum("tkh,tkhg->tkg", x[:, None] - mu[ids], A[ids])
            y = y + (torch.where(drop, w, 0.0)[..., None] * s).sum(1)
        return y


def _ridge(X, Y):
    """(mean of X, B): ridge least squares of Y - mean(Y) on X - mean(X)."""
    mx = X.mean(0)
    Xc = X - mx
    lam = RIDGE * float((Xc ** 2).mean())
    return mx, torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ (Y - Y.mean(0)))


def fit(xs, ids, outs, E, rank):
    """The probe (P [E, H], b [E]) of log |E_e(x) - S_e(x)| and the stand-in (None where rank is
    None: nothing stands in, the probe is of log |E_e(x)|)."""
    H = xs.shape[1]
    P, b = torch.zeros(E, H), torch.full((E,), -30.0)
    m, mu, A = torch.zeros(E, H), torch.zeros(E, H), torch.zeros(E, H, H)
    for e in range(E):
        sel = ids == e
        X, Y = xs[sel], outs[sel]
        if len(X) < MIN_TOKENS:
            continue
        res = Y
        if rank is not None:
            m[e] = Y.mean(0).float()
            res = Y - Y.mean(0)
            if rank:
                mu_e, B = _ridge(X, Y)
                _, _, Vt = torch.linalg.svd((X - mu_e) @ B, full_matrices=False)
                A_e = B @ Vt[:rank].T @ Vt[:rank]
                mu[e], A[e] = mu_e.float(), A_e.float()
                res = res - (X - mu_e) @ A_e
        logn = res.norm(dim=-1).clamp_min(1e-12).log()
        mx, p = _ridge(X, logn[:, None])
        P[e], b[e] = p[:, 0].float(), float(logn.mean() - mx @ p[:, 0])
    return (P, b), (None if rank is None else (m, mu, A))


def run(name, ranks, cuts, calib_seqs, eval_seqs):
    model, E, k, calib, ev = trained(name, calib_seqs, eval_seqs)
    H = model.config.hidden_size
    inter = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
    drops = [StandIn(layer.mlp.experts) for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    base = nll(model, ev)
    for d in drops:
        d.stats = []
    nll(model, calib)
    data = []
    for d in drops:
        ids = torch.cat([s[1] for s in d.stats]).reshape(-1)
        outs = torch.cat([s[2] for s in d.stats]).reshape(len(ids), -1).double()
        data.append((torch.cat([s[0] for s in d.stats]).repeat_interleave(k, 0).double(), ids, outs))
        d.stats = None
    static_macs = k * 3 * H * inter
    rows = []
    for rank in [None] + list(ranks):
        for d, (xs, ids, outs) in zip(drops, data):
            d.probe, d.standin = fit(xs, ids, outs, E, rank)
            d.signal, d.threshold, d.record = "probe", -math.inf, []
        nll(model, calib)
        values = [torch.cat(d.record) for d in drops]
        for d in drops:
            d.record = None
        for cut in cuts:
            for d, v in zip(drops, values):
                d.threshold = torch.quantile(v, min(1.0, cut * k / (k - 1))).item()
                d.dropped = d.pairs = 0
            ppl = nll(model, ev)
            pairs = sum(d.dropped for d in drops) / sum(d.pairs for d in drops)
            r = rank or 0
            per_pair = 0.0 if rank is None else pairs * k * (2 * r * H + H) / static_macs
            dense = 0.0 if rank is None else (2 * E * r * H + E * H) / static_macs
            rows.append(dict(stand_in="none" if rank is None else f"rank {rank}", rank=rank, target_cut=cut,
                             pair_reduction=pairs, ppl_increase=math.exp(ppl - base) - 1,
                             cost_per_pair=per_pair, cost_dense=dense))
            print(f"{name} stand-in {rows[-1]['stand_in']:7s} cut {cut:.2f}: pairs -{100 * pairs:.1f}% ppl "
                  f"{100 * rows[-1]['ppl_increase']:+.2f}%  cost +{100 * per_pair:.1f}% per pair / "
                  f"+{100 * dense:.1f}% dense", flush=True)
    return dict(model=name, experts=E, k=k, hidden=H, expert_intermediate=inter, static_ppl=math.exp(base), rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixtral8", "deepseek16", "gptoss16"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 1, 2, 4, 16], help="stand-in ranks (0: the mean)")
    ap.add_argument("--cuts", type=float, nargs="+", default=[0.40, 0.45, 0.50], help="fractions of pairs cut")
    ap.add_argument("--calib-seqs", type=int, default=96)
    ap.add_argument("--eval-seqs", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stand_in.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    save(a.out, a, [run(m, a.ranks, a.cuts, a.calib_seqs, a.eval_seqs) for m in a.models])


if __name__ == "__main__":
    main()
