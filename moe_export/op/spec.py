"""Executable specification of the ``moe_export::DynamicRouter`` op (numpy).

The compiled CPU kernel, the CUDA kernel and the portable ONNX expansion are all
tested against :func:`dynamic_router`. The arithmetic mirrors
``plugins/core/router_core.h`` step for step (float32 throughout, the same exp
polynomial, the same tie-breaking), so that implementations agree bit for bit
on the selection except where a policy decision sits within rounding of its
boundary; :func:`dynamic_router` reports those tokens as ``ambiguous``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, make_dataclass
import math

import numpy as np

from .schema import ATTRIBUTES, CHOICES, MAX_EXPERTS_LIMIT, SpecError  # the op's one declaration

POLICIES = CHOICES["policy"]
SCORE_FUNCS = CHOICES["score_func"]
SELECTS = CHOICES["select"]
# Integer codes shared with router_core.h (generated into router_attrs.h from the same table).
POLICY_CODE = {p: i for i, p in enumerate(POLICIES)}
SCORE_CODE = {s: i for i, s in enumerate(SCORE_FUNCS)}
SELECT_CODE = {s: i for i, s in enumerate(SELECTS)}
LANES = 8  # router_core.h's kLanes: how its sums are ordered
# Decisions closer than this (relative) to a policy boundary may differ between
# implementations that sum in another order (the CUDA warp path; the CPU kernel sums as _lane_sum).
DECISION_EPS = 1e-5


def check_threshold(policy: str, threshold) -> None:
    """The range of a policy's threshold (SpecError outside it)."""
    t = float(threshold)
    if not math.isfinite(t):
        raise SpecError(f"threshold must be finite, got {threshold}")
    if policy in ("top-p", "ratio") and not (0.0 <= t <= 1.0):
        raise SpecError(f"threshold for policy {policy} must be in [0, 1], got {t}")
    if policy == "entropy" and not (0.0 <= t < 1.0):
        raise SpecError(f"threshold for policy entropy must be in [0, 1), got {t}")
    if policy == "probe" and t < 0.0:
        raise SpecError(f"threshold for policy probe must be >= 0, got {t}")


class _Rules:
    """What RouterAttrs knows beyond its fields (which come from schema.ATTRIBUTES)."""

    def resolved(self) -> "RouterAttrs":
        a = RouterAttrs(**asdict(self))
        for attr in ATTRIBUTES:
            if attr.zero_means and getattr(a, attr.name) == 0:
                setattr(a, attr.name, getattr(a, attr.zero_means))
        a.validate()
        return a

    @property
    def sums_to_one(self) -> bool:
        """Whether the kept weights are normalized to sum to 1 (a softmax over the kept logits, or
        `normalize`): only then has a dropped expert a share for the kept to take (`renormalize`)."""
        return (self.select == "before_score" and self.score_func == "softmax") or bool(self.normalize)

    @property
    def drops(self) -> bool:
        """Whether a slot can be left empty (id = num_experts): under any dynamic policy, and
        static in a router wider than k."""
        return not (self.policy == "static" and self.width == self.k)

    @property
    def width(self) -> int:
        """Output slots: max(k, max_experts), so a cap below k keeps the graph's k-wide shapes."""
        return max(self.k, self.max_experts)

    def validate(self) -> None:
        E = self.num_experts
        def bad(msg):
            raise SpecError(msg)
        if not (1 <= E <= MAX_EXPERTS_LIMIT):
            bad(f"num_experts must be in [1, {MAX_EXPERTS_LIMIT}], got {E}")
        if not (1 <= self.k <= E):
            bad(f"k must be in [1, num_experts={E}], got {self.k}")
        if self.policy not in POLICIES:
            bad(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.score_func not in SCORE_FUNCS:
            bad(f"unknown score_func {self.score_func!r}")
        if self.select not in SELECTS:
            bad(f"unknown select {self.select!r}")
        check_threshold(self.policy, self.threshold)
        if not (1 <= self.max_experts <= E):
            bad(f"max_experts must be in [1, num_experts={E}], got {self.max_experts}")
        if self.policy == "probe" and self.max_experts > self.k:
            bad(f"max_experts must be <= k={self.k} for policy probe, got {self.max_experts}")
        if not (1 <= self.min_experts <= self.max_experts):
            bad(f"min_experts must be in [1, max_experts={self.max_experts}], got {self.min_experts}")
        if not (0.0 <= float(self.renormalize) <= 1.0):
            bad(f"renormalize must be in [0, 1], got {self.renormalize}")
        if not math.isfinite(float(self.scale)):
            bad("scale must be finite")
        if self.n_group < 1 or E % self.n_group:
            bad(f"n_group ({self.n_group}) must divide num_experts ({E})")
        if not (1 <= self.topk_group <= self.n_group):
            bad(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.n_group > 1 and not (1 <= self.group_score_topk <= E // self.n_group):
            bad(f"group_score_topk must be in [1, experts per group={E // self.n_group}]")


_PY = {"int": int, "float": float, "string": str}
# Attributes of one DynamicRouter node (names match the ONNX attributes); required ones first.
RouterAttrs = make_dataclass(
    "RouterAttrs",
    [(a.name, _PY[a.type]) for a in ATTRIBUTES if a.default is None]
    + [(a.name, _PY[a.type], field(default=a.default)) for a in ATTRIBUTES if a.default is not None],
    bases=(_Rules,))
RouterAttrs.__module__ = __name__


# --- float32 arithmetic shared with router_core.h -------------------------------------------
_F = np.float32


def exp32(x: np.ndarray) -> np.ndarray:
    """Cephes-style expf, evaluated in float32 in exactly the kernel's operation order."""
    x = np.asarray(x, dtype=_F)
    with np.errstate(invalid="ignore", over="ignore"):
        xc = np.clip(x, _F(-87.0), _F(88.0))
        fx = np.floor(xc * _F(1.44269504088896341) + _F(0.5)).astype(_F)
        r = xc - fx * _F(0.693359375)
        r = r - fx * _F(-2.12194440e-4)
        y = _F(1.9875691500e-4)
        y = y * r + _F(1.3981999507e-3)
        y = y * r + _F(8.3334519073e-3)
        y = y * r + _F(4.1665795894e-2)
        y = y * r + _F(1.6666665459e-1)
        y = y * r + _F(5.0000001201e-1)
        y = y * (r * r) + r + _F(1.0)
        pow2 = ((fx.astype(np.int32) + 127) << 23).view(_F)
        y = (y * pow2).astype(_F)
        y = np.where(x < _F(-87.0), _F(0.0), y)
        y = np.where(x > _F(88.0), _F(np.inf), y)
    return y.astype(_F)


def _sanitize(x: np.ndarray) -> np.ndarray:
    # NaN logits never win a slot: they rank as -inf.
    return np.where(np.isnan(x), _F(-np.inf), x).astype(_F)


def _softmax_rows(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Row softmax over `valid` entries. Entries equal to the row max contribute exp(0)=1,
    so +inf logits share the mass and an all -inf row is uniform."""
    if valid is not None:
        x = np.where(valid, x, _F(-np.inf))
    m = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # inf - inf where x == m is replaced right away
        d = np.where(x == m, _F(0.0), (x - m).astype(_F))
    e = exp32(d)
    if valid is not None:
        e = np.where(valid, e, _F(0.0))
    s = _lane_sum(e)
    return (e * (_F(1.0) / s)[..., None]).astype(_F)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (_F(1.0) / (_F(1.0) + exp32(-x))).astype(_F)


def _lane_sum(a: np.ndarray) -> np.ndarray:
    """Float32 sum along the last axis in router_core.h's order (lane_sum there): element i into
    partial sum i % LANES, each left to right, then the partial sums left to right. The same
    order gives the same roundings, so scores that tie in the kernel tie here."""
    a = a.astype(_F)
    pad = (-a.shape[-1]) % LANES
    if pad or a.shape[-1] == 0:  # + 0 leaves every partial sum as it is
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad or LANES,), _F)], axis=-1)
    lanes = np.cumsum(a.reshape(*a.shape[:-1], a.shape[-1] // LANES, LANES), axis=-2, dtype=_F)[..., -1, :]
    return np.cumsum(lanes, axis=-1, dtype=_F)[..., -1]


def _stable_desc_order(v: np.ndarray) -> np.ndarray:
    # Descending by value, ties by lower expert index: ONNX TopK's order.
    return np.argsort(-v, axis=-1, kind="stable")


def dynamic_router(logits, bias=None, sizes=None, *, return_counts=False, **attrs):
    """Reference DynamicRouter. Returns (weights, indices[, counts, ambiguous]).

    logits: [..., E] float32/float16/bfloat16-as-float32; bias: [E] or None; sizes: [..., E]
    (the log of each expert's predicted output size), read by policy probe only.
    """
    a = RouterAttrs(**attrs).resolved()
    if a.policy == "probe" and sizes is None:
        raise SpecError("policy probe needs the sizes input")
    with np.errstate(over="ignore", invalid="ignore"):
        return _route(a, logits, bias, sizes, return_counts)


@dataclass
class PolicyView:
    """What the count policies read, per token: the routing distribution in ranking order over
    the first max_experts candidates (`qs`), the normalized entropy (`hn`) and the number of
    eligible experts. Calibration evaluates many thresholds on one view."""
    qs: np.ndarray
    hn: np.ndarray
    n_valid: np.ndarray


def _rank(a, x, b):
    """Scores, eligibility, ranking order (top `width`), and which tokens' kept groups were
    decided within rounding; steps 1, 2 and 5 of the spec."""
    T, E = x.shape
    near = np.zeros(T, dtype=bool)
    if a.score_func == "softmax":
        s = _softmax_rows(x)
        key = x.copy() if a.select == "before_score" else s.copy()
    else:
        s = _sigmoid(x)
        key = x.copy() if a.select == "before_score" else s.copy()
    if b is not None:
        key = _sanitize((key + b).astype(_F))
    # group-limited selection (DeepSeek-V3): keep the best topk_group groups.
    valid = np.ones((T, E), dtype=bool)
    if a.n_group > 1:
        G, gs = a.n_group, E // a.n_group
        kg = np.sort(key.reshape(T, G, gs), axis=-1)[..., ::-1][..., : a.group_score_topk]
        gscore = _sanitize(_lane_sum(kg))
        gfull = _stable_desc_order(gscore)
        gorder = gfull[:, : a.topk_group]
        if a.topk_group < G:
            # Group sums that are equal in exact arithmetic (sigmoid(-2) + sigmoid(2) =
            # sigmoid(-1) + sigmoid(1)) round apart differently in an expansion that sums in
            # other ops (portable.py). Exact float ties stay decided, so that the kernels'
            # tie-breaking is tested: they are mostly groups holding the same scores, which every
            # implementation sums alike.
            ranked = np.take_along_axis(gscore, gfull, axis=1)
            gap = ranked[:, a.topk_group - 1] - ranked[:, a.topk_group]
            near = (gap > 0) & (gap <= DECISION_EPS * np.maximum(np.abs(ranked[:, a.topk_group - 1]), 1e-30))
        gvalid = np.zeros((T, G), dtype=bool)
        np.put_along_axis(gvalid, gorder, True, axis=1)
        valid = np.repeat(gvalid, gs, axis=1)
        key = np.where(valid, key, _F(-np.inf))
    return s, valid, _stable_desc_order(key)[:, : a.width], near


def _policy_view(a, x, s, valid, order) -> PolicyView:
    n_valid = valid.sum(axis=1)
    if a.score_func == "softmax":
        q = _softmax_rows(x, valid if a.n_group > 1 else None)
    else:
        sv = np.where(valid, s, _F(0.0))
        tot = _lane_sum(sv)
        q = np.where(tot[:, None] > 0, sv * (_F(1.0) / np.where(tot > 0, tot, 1))[:, None],
                     np.where(valid, _F(1.0) / n_valid[:, None].astype(_F), _F(0.0))).astype(_F)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)).astype(_F), _F(0.0))
    H = -_lane_sum(plogp.astype(_F))
    hn = np.where(n_valid > 1, H / np.log(np.maximum(n_valid, 2)).astype(_F), _F(0.0)).astype(_F)
    return PolicyView(np.take_along_axis(q, order[:, : a.max_experts], axis=1), hn, n_valid)


def policy_counts(a: RouterAttrs, v: PolicyView):
    """Experts per token under policy a (step 6), and which decisions sit on a boundary."""
    T = v.qs.shape[0]
    if a.policy == "static":
        return np.full(T, a.k, dtype=np.int64), np.zeros(T, dtype=bool)
    qs, t = v.qs[:, : a.max_experts], _F(a.threshold)
    if a.policy == "top-p":
        cum = np.cumsum(qs, axis=1, dtype=_F)
        counts = 1 + (cum[:, :-1] < t).sum(axis=1)
        ambiguous = (np.abs(cum - t) <= DECISION_EPS).any(axis=1)
    elif a.policy == "ratio":
        ref = (qs[:, :1] * t).astype(_F)
        counts = 1 + (qs[:, 1:] >= ref).sum(axis=1)
        ambiguous = (np.abs(qs[:, 1:] - ref) <= DECISION_EPS * np.maximum(qs[:, :1], 1e-30)).any(axis=1)
    else:  # entropy
        frac = np.clip((v.hn - t) / _F(1.0 - t), 0.0, 1.0).astype(_F)
        span = _F(a.max_experts - a.min_experts)
        raw = frac * span
        counts = a.min_experts + np.floor(raw + _F(0.5)).astype(np.int64)
        ambiguous = np.abs(raw + _F(0.5) - np.round(raw + _F(0.5))) <= DECISION_EPS * (1 + span)
    counts = np.clip(counts, a.min_experts, a.max_experts)
    return np.minimum(counts, np.maximum(v.n_valid, 1)).astype(np.int64), ambiguous


def _chosen(a, x, s, order):
    """The values the weights are made of, in ranking order: the logits (softmax before_score,
    a softmax over the kept follows) or the scores."""
    return np.take_along_axis(x if a.select == "before_score" and a.score_func == "softmax" else s, order, axis=1)


def static_weights(a, v):
    """The static routing's weights of the first k ranked experts from their values v (_chosen),
    before `scale`: what each would weigh with k kept."""
    v = v[:, : a.k]
    if a.select == "before_score" and a.score_func == "softmax":
        return _softmax_rows(v)
    if a.normalize:
        tot = _lane_sum(v)
        return np.where(tot[:, None] > 0, v * (_F(1.0) / np.where(tot > 0, tot, 1))[:, None], _F(0.0)).astype(_F)
    return v


def probe_signal(a, x, s, order, sizes):
    """Policy probe's signal at each of the first k ranked experts: static weight times predicted
    output size, w_j * exp(sizes_j), an estimate of |w_j E_j(x)|, what dropping slot j takes away."""
    z = exp32(_sanitize(np.take_along_axis(sizes, order[:, : a.k], axis=1)))
    return (static_weights(a, _chosen(a, x, s, order)) * z).astype(_F)


def probe_keep(a, sig):
    """Which of the first k slots policy probe keeps (the first min_experts always, else up to
    max_experts those whose signal reaches the threshold), and which decisions sit on it."""
    j = np.arange(sig.shape[1])[None, :]
    t = _F(a.threshold)
    keep = (j < a.min_experts) | ((j < a.max_experts) & (sig >= t))
    near = np.isfinite(sig) & (np.abs(sig - t) <= DECISION_EPS * np.maximum(np.maximum(sig, t), _F(1e-30)))
    return keep, (near & (j >= a.min_experts) & (j < a.max_experts)).any(axis=1)


def _probe(a, x, s, order, sizes):
    """Counts and the ranking with the kept slots first (a stable partition of the first k: a
    dropped slot can precede a kept one), and the ambiguous tokens."""
    keep, ambiguous = probe_keep(a, probe_signal(a, x, s, order, sizes))
    perm = np.argsort(~keep, axis=1, kind="stable")
    order = np.concatenate([np.take_along_axis(order[:, : a.k], perm, axis=1), order[:, a.k:]], axis=1)
    return keep.sum(axis=1).astype(np.int64), order, ambiguous


def _part_factor(a, w, keep):
    """With the static k's total sk and the kept experts' total sc of the values w, the factor
    (sk / sc)^renormalize / sk: the kept get their static weights times (sk / sc)^renormalize."""
    sk = _lane_sum(np.where(np.arange(w.shape[1]) < a.k, w, _F(0.0)))
    sc = _lane_sum(np.where(keep, w, _F(0.0)))
    ok = (sk > 0) & (sc > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (np.power(sk / np.where(ok, sc, 1), _F(a.renormalize)).astype(_F) / np.where(ok, sk, 1)).astype(_F)
    return np.where(ok, f, _F(0.0))


def _prepare(a, logits, bias):
    x0 = np.asarray(logits)
    E = a.num_experts
    if x0.shape[-1:] != (E,):
        raise SpecError(f"logits last dimension must be num_experts={E}, got shape {x0.shape}")
    x = _sanitize(x0.reshape(-1, E).astype(_F))
    b = None if bias is None else _sanitize(np.asarray(bias, dtype=_F).reshape(E))
    return x0, x, b


def policy_view(logits, bias=None, **attrs) -> PolicyView:
    """The PolicyView of some router logits (for calibration)."""
    a = RouterAttrs(**attrs).resolved()
    with np.errstate(over="ignore", invalid="ignore"):
        _, x, b = _prepare(a, logits, bias)
        s, valid, order, _ = _rank(a, x, b)
        return _policy_view(a, x, s, valid, order)


def probe_signals(logits, bias=None, sizes=None, **attrs) -> np.ndarray:
    """Policy probe's signal [tokens, k] at each of the first k ranked experts (for calibration)."""
    a = RouterAttrs(**attrs).resolved()
    with np.errstate(over="ignore", invalid="ignore"):
        _, x, b = _prepare(a, logits, bias)
        s, _, order, _ = _rank(a, x, b)
        return probe_signal(a, x, s, order, np.asarray(sizes, dtype=_F).reshape(-1, a.num_experts))


def _route(a, logits, bias, sizes, return_counts):
    x0, x, b = _prepare(a, logits, bias)
    out_dtype = x0.dtype if x0.dtype in (np.float16, np.float32) else np.float32
    E, K = a.num_experts, a.width
    lead = x0.shape[:-1]
    s, valid, order, near = _rank(a, x, b)
    if a.policy == "static":
        counts, ambiguous = policy_counts(a, PolicyView(np.zeros((x.shape[0], 0), _F), None, None))
    elif a.policy == "probe":
        sz = np.asarray(sizes)
        if sz.shape != x0.shape:
            raise SpecError(f"sizes must have the logits' shape {x0.shape}, got {sz.shape}")
        counts, order, ambiguous = _probe(a, x, s, order, sz.reshape(-1, E).astype(_F))
    else:
        counts, ambiguous = policy_counts(a, _policy_view(a, x, s, valid, order))
    ambiguous = ambiguous | near

    # 4. weights of the kept experts; dropped slots are (index=E, weight=0).
    slot = np.arange(K)[None, :]
    keep = slot < counts[:, None]
    softmax_kept = a.select == "before_score" and a.score_func == "softmax"
    # rows whose kept experts take only part of the dropped ones' weight: their values are
    # normalized over the static k first (and over the kept where more are kept)
    part = ((counts != a.k) & (_F(a.renormalize) != _F(1.0)) & a.sums_to_one)[:, None]
    over = np.where(part, slot < np.maximum(counts, a.k)[:, None], keep)
    if softmax_kept:
        w = _softmax_rows(_chosen(a, x, s, order), over)
    else:
        w = np.where(over, _chosen(a, x, s, order), _F(0.0)).astype(_F)
        if a.normalize:
            tot = _lane_sum(np.where(part, _F(0.0), w))
            w = np.where(tot[:, None] > 0, w * (_F(1.0) / np.where(tot > 0, tot, 1))[:, None], w)
    if part.any():
        w = np.where(part, w * _part_factor(a, w, keep)[:, None], w).astype(_F)
    w = np.where(keep, (w * _F(a.scale)).astype(_F), _F(0.0))
    idx = np.where(keep, order, E).astype(np.int64)
    w = w.astype(out_dtype).reshape(*lead, K)
    idx = idx.reshape(*lead, K)
    if return_counts:
        return w, idx, counts.reshape(lead), ambiguous.reshape(lead)
    return w, idx
