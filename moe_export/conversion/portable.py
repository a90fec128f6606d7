"""The DynamicRouter op in standard ONNX ops (opset >= 13): `convert --portable`, for runtimes
without the moe-export library."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..model.graph import NodeBuilder
from ..op.spec import RouterAttrs


def portable_router(b: NodeBuilder, a: RouterAttrs, logits: str, bias: str | None, float_type: int,
                    sizes: str | None = None):
    """DynamicRouter in standard ONNX ops (opset >= 13), following spec.dynamic_router step by step.
    sizes: the log predicted output sizes [..., E], read by policy probe (required there)."""
    E, W = a.num_experts, a.width
    f32 = lambda v: b.const(np.float32(v))
    i64 = b.i64
    x = b.op("Cast", [logits], to=TensorProto.FLOAT) if float_type != TensorProto.FLOAT else logits
    lead = b.op("Slice", [b.op("Shape", [x]), i64([0]), i64([-1])])
    x = b.op("Reshape", [x, i64([-1, E])])
    s = b.op("Softmax", [x], axis=-1) if a.score_func == "softmax" else b.op("Sigmoid", [x])
    key = x if a.select == "before_score" else s
    if bias:
        bf = b.op("Cast", [bias], to=TensorProto.FLOAT)
        key = b.op("Add", [key, bf])
    valid = None
    if a.n_group > 1:
        G, gs = a.n_group, E // a.n_group
        gv = b.op("TopK", [b.op("Reshape", [key, i64([-1, G, gs])]), i64([a.group_score_topk])], n_out=2)[0]
        gsc = b.op("ReduceSum", [gv, i64([-1])], keepdims=0)
        gidx = b.op("TopK", [gsc, i64([a.topk_group])], n_out=2)[1]
        zeros = b.op("Mul", [gsc, f32(0.0)])
        ones = b.op("Add", [b.op("Mul", [b.op("Cast", [gidx], to=TensorProto.FLOAT), f32(0.0)]), f32(1.0)])
        gmask = b.op("ScatterElements", [zeros, gidx, ones], axis=1)
        gm3 = b.op("Expand", [b.op("Unsqueeze", [gmask, i64([-1])]), i64([1, 1, gs])])
        valid = b.op("Greater", [b.op("Reshape", [gm3, i64([-1, E])]), f32(0.5)])
        key = b.op("Where", [valid, key, f32(-np.inf)])
    vals, idx = b.op("TopK", [key, i64([W])], n_out=2, axis=-1, largest=1, sorted=1)
    slot = b.op("Unsqueeze", [i64(list(range(W))), i64([0])])
    softmax_kept = a.select == "before_score" and a.score_func == "softmax"
    if a.policy == "static":
        keep = b.op("Less", [slot, i64(a.k)])
    elif a.policy == "probe":  # W = k (max_experts <= k): every slot is one of the static k
        if sizes is None:
            raise ValueError("policy probe needs the sizes input")
        # the static weights (spec.static_weights) times the predicted sizes
        v = b.op("GatherElements", [x if softmax_kept else s, idx], axis=1)
        if softmax_kept:
            ws = b.op("Softmax", [v], axis=-1)
        elif a.normalize:
            tot = b.op("ReduceSum", [v, i64([-1])], keepdims=1)
            pos = b.op("Greater", [tot, f32(0.0)])
            ws = b.op("Where", [pos, b.op("Div", [v, b.op("Where", [pos, tot, f32(1.0)])]), f32(0.0)])
        else:
            ws = v
        z = b.op("Cast", [sizes], to=TensorProto.FLOAT) if float_type != TensorProto.FLOAT else sizes
        z = b.op("Reshape", [z, i64([-1, E])])
        z = b.op("Where", [b.op("IsNaN", [z]), f32(-np.inf), z])
        sig = b.op("Mul", [ws, b.op("Exp", [b.op("GatherElements", [z, idx], axis=1)])])
        kept = b.op("Or", [b.op("Less", [slot, i64(a.min_experts)]),
                           b.op("And", [b.op("Less", [slot, i64(a.max_experts)]),
                                        b.op("GreaterOrEqual", [sig, f32(a.threshold)])])])
        # a later slot can be kept past a dropped one: a stable partition (TopK breaks ties by
        # the lower index, so each part stays in rank order) makes the kept a prefix as below
        perm = b.op("TopK", [b.op("Cast", [kept], to=TensorProto.FLOAT), i64([W])], n_out=2, axis=-1,
                    largest=1, sorted=1)[1]
        idx, vals = (b.op("GatherElements", [t, perm], axis=1) for t in (idx, vals))
        cnt = b.op("ReduceSum", [b.op("Cast", [kept], to=TensorProto.INT64), i64([-1])], keepdims=1)
        keep = b.op("Less", [slot, cnt])
    else:
        if a.score_func == "softmax":
            q = b.op("Softmax", [b.op("Where", [valid, x, f32(-np.inf)])], axis=-1) if valid else s
        else:
            sv = b.op("Where", [valid, s, f32(0.0)]) if valid else s
            q = b.op("Div", [sv, b.op("ReduceSum", [sv, i64([-1])], keepdims=1)])
        qs = b.op("GatherElements", [q, idx], axis=1)
        M = a.max_experts
        n_valid = a.topk_group * (E // a.n_group)
        if a.policy == "top-p":
            cum = b.op("CumSum", [qs, i64(1)])
            below = b.op("Cast", [b.op("Less", [b.op("Slice", [cum, i64([0]), i64([M - 1]), i64([1])]),
                                                f32(a.threshold)])], to=TensorProto.FLOAT)
            cnt = b.op("Add", [b.op("ReduceSum", [below, i64([-1])], keepdims=1), f32(1.0)])
        elif a.policy == "ratio":
            ref = b.op("Mul", [b.op("Slice", [qs, i64([0]), i64([1]), i64([1])]), f32(a.threshold)])
            ge = b.op("Cast", [b.op("GreaterOrEqual", [b.op("Slice", [qs, i64([1]), i64([M]), i64([1])]), ref])],
                      to=TensorProto.FLOAT)
            cnt = b.op("Add", [b.op("ReduceSum", [ge, i64([-1])], keepdims=1), f32(1.0)])
        else:
            pos = b.op("Greater", [q, f32(0.0)])
            safe = b.op("Where", [pos, q, f32(1.0)])
            H = b.op("Neg", [b.op("ReduceSum", [b.op("Mul", [safe, b.op("Log", [safe])]), i64([-1])], keepdims=1)])
            hn = b.op("Div", [H, f32(np.log(n_valid) if n_valid > 1 else np.inf)])
            frac = b.op("Clip", [b.op("Div", [b.op("Sub", [hn, f32(a.threshold)]), f32(1.0 - a.threshold)]),
                                 f32(0.0), f32(1.0)])
            raw = b.op("Mul", [frac, f32(a.max_experts - a.min_experts)])
            cnt = b.op("Add", [b.op("Floor", [b.op("Add", [raw, f32(0.5)])]), f32(a.min_experts)])
        hi = min(a.max_experts, n_valid)
        cnt = b.op("Cast", [b.op("Clip", [cnt, f32(min(a.min_experts, hi)), f32(hi)])], to=TensorProto.INT64)
        keep = b.op("Less", [slot, cnt])
    # With renormalize < 1 the values are normalized over the static k (or the kept, where more
    # are kept) and the kept take (sk / sc)^renormalize of it (spec._part_factor); rows keeping
    # k are the same either way.
    part = a.policy != "static" and a.renormalize != 1.0 and a.sums_to_one
    over = b.op("Less", [slot, b.op("Max", [cnt, i64(a.k)])]) if part else keep
    if softmax_kept:
        # the ranked values carry the bias, the weights are the unbiased logits' softmax
        kept = b.op("GatherElements", [x, idx], axis=1) if bias else vals
        w = b.op("Softmax", [b.op("Where", [over, kept, f32(-np.inf)])], axis=-1)
    else:
        w = b.op("Where", [over, b.op("GatherElements", [s, idx], axis=1), f32(0.0)])
        if a.normalize and not part:
            tot = b.op("ReduceSum", [w, i64([-1])], keepdims=1)
            w = b.op("Div", [w, b.op("Where", [b.op("Greater", [tot, f32(0.0)]), tot, f32(1.0)])])
    if part:
        total = lambda m: b.op("ReduceSum", [b.op("Where", [m, w, f32(0.0)]), i64([-1])], keepdims=1)
        sk, sc = total(b.op("Less", [slot, i64(a.k)])), total(keep)
        ok = b.op("And", [b.op("Greater", [sk, f32(0.0)]), b.op("Greater", [sc, f32(0.0)])])
        one = lambda v: b.op("Where", [ok, v, f32(1.0)])
        f = b.op("Div", [b.op("Pow", [b.op("Div", [sk, one(sc)]), f32(a.renormalize)]), one(sk)])
        w = b.op("Mul", [w, b.op("Where", [ok, f, f32(0.0)])])
    w = b.op("Where", [keep, b.op("Mul", [w, f32(a.scale)]), f32(0.0)])
    idx = b.op("Where", [keep, idx, i64(E)])
    out_shape = b.op("Concat", [lead, i64([W])], axis=0)
    w = b.op("Reshape", [w, out_shape])
    if float_type != TensorProto.FLOAT:
        w = b.op("Cast", [w], to=float_type)
    return w, b.op("Reshape", [idx, out_shape])
