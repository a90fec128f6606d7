"""Fitting the stand-ins of conversion/stand_in.py on the experts' outputs read out of the graph
(run/probe.py's read-out): per expert e, over the (token, slot) pairs the static routing sends to
it, ridge least squares of its output on its input, cut to rank r on the fitted values (reduced-
rank regression), plus the mean: S_e(x) = c_e + x G_e V_e. Solved in the smaller of the two
forms, so an expert with fewer tokens than H costs their count cubed, not H's."""
from __future__ import annotations

import numpy as np

RIDGE = 1.0     # in units of the inputs' mean square, as the probe's fit
MIN_TOKENS = 8  # an expert routed fewer tokens than this gets its mean output alone


def fit_stand_in(x, ids, outs, num_experts, rank):
    """(c [E, H], G [E, H, r], V [E, r, H]) from router inputs x [N, H], static ids [N, k] and each
    slot's expert output outs [N, k, H]; a rank above H is H's."""
    H = x.shape[1]
    rank = min(rank, H)
    c = np.zeros((num_experts, H), np.float32)
    G, V = np.zeros((num_experts, H, rank), np.float32), np.zeros((num_experts, rank, H), np.float32)
    ridge = RIDGE * max(float(np.mean(np.square(x, dtype=np.float64))), 1e-12)
    for e in range(num_experts):
        tok, slot = np.nonzero(ids == e)
        if not len(tok):
            continue
        X, Y = x[tok].astype(np.float64), outs[tok, slot].astype(np.float64)
        mx, my = X.mean(axis=0), Y.mean(axis=0)
        c[e] = my
        if not rank or len(tok) < MIN_TOKENS:
            continue
        X, Y = X - mx, Y - my
        if len(tok) >= H:
            B = np.linalg.solve(X.T @ X + ridge * np.eye(H), X.T @ Y)
            fitted = X @ B
        else:  # B = X^T alpha, never formed: [H, H] where the tokens are fewer
            alpha = np.linalg.solve(X @ X.T + ridge * np.eye(len(tok)), Y)
            fitted = (X @ X.T) @ alpha
        Vr = _top_right_vectors(fitted, rank)
        Gr = B @ Vr.T if len(tok) >= H else X.T @ (alpha @ Vr.T)
        G[e, :, :len(Vr)], V[e, :len(Vr)] = Gr, Vr
        c[e] = my - (mx @ Gr) @ Vr
    return c, G, V


def _top_right_vectors(F, rank):
    """The top `rank` right singular vectors of F [n, H] as rows [r', H] (r' <= rank: those of a
    non-zero singular value), from the eigenvectors of its Gram matrix on the smaller side: the
    same subspace as an SVD's at half its cost."""
    if F.shape[0] < F.shape[1]:
        w, U = np.linalg.eigh(F @ F.T)
        w, U = w[::-1][:rank], U[:, ::-1][:, :rank]
        keep = w > max(float(w[0]), 0.0) * 1e-12
        return (U[:, keep].T @ F) / np.sqrt(w[keep])[:, None]
    w, V = np.linalg.eigh(F.T @ F)
    w, V = w[::-1][:rank], V[:, ::-1][:, :rank]
    return V[:, w > max(float(w[0]), 0.0) * 1e-12].T


def stand_in_at(x, ids, stand_in):
    """S_e(x) [N, k, H] at each slot's expert (ids [N, k]; an id out of range: zeros)."""
    c, G, V = stand_in
    out = np.zeros(ids.shape + (c.shape[1],), np.float32)
    for e in range(len(c)):
        tok, slot = np.nonzero(ids == e)
        out[tok, slot] = c[e] + (x[tok] @ G[e]) @ V[e]
    return out
