"""The compiled ORT kernel against the numpy spec: every policy, family form and dtype, in both
builds of its row loop (AVX2 where the CPU has it, and the portable one)."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto

from helpers import router_model, session_of
from moe_export.op.spec import dynamic_router

try:
    from ml_dtypes import bfloat16
except ImportError:  # onnxruntime accepts bfloat16 arrays only through ml_dtypes
    bfloat16 = None

FORMS = {
    "softmax": dict(score_func="softmax", select="after_score"),
    "softmax_norm": dict(score_func="softmax", select="after_score", normalize=1),
    "before_score": dict(score_func="softmax", select="before_score"),
    "sigmoid_grouped": dict(score_func="sigmoid", select="after_score", normalize=1, scale=2.5),
    "sigmoid_before": dict(score_func="sigmoid", select="before_score", normalize=1),  # Kolibri: rank logits + bias
}
DTYPES = {"float32": (np.float32, TensorProto.FLOAT, 1e-6), "float16": (np.float16, TensorProto.FLOAT16, 1e-3)}
if bfloat16 is not None:
    DTYPES["bfloat16"] = (bfloat16, TensorProto.BFLOAT16, 1e-2)

ISAS = ["auto", "portable"]  # auto: the AVX2 build on CPUs that have AVX2
_SESSIONS = {}


def isa_session(model, isa, **opts):
    """A session whose DynamicRouter kernels use the `isa` build (chosen at session creation)."""
    return session_of(model, cpu_isa=isa, **opts)


def cached_session(attrs, onnx_type, bias, isa, sizes=False):
    key = (tuple(sorted(attrs.items())), onnx_type, bias, isa, sizes)
    if key not in _SESSIONS:
        _SESSIONS[key] = isa_session(router_model(attrs, onnx_type, bias, sizes=sizes), isa, intra_op_num_threads=2)
    return _SESSIONS[key]


def check(attrs, x, bias, dtype_name, isa="auto", sizes=None):
    np_t, onnx_t, tol = DTYPES[dtype_name]
    # The spec sees exactly the values the kernel saw (after rounding to the dtype).
    def rounded(a):
        return None if a is None else a.astype(np_t).astype(np.float32)
    xs, bs, ss = rounded(x), rounded(bias), rounded(sizes)
    io_t = np.float32 if dtype_name == "bfloat16" else np_t
    feeds = {name: v.astype(io_t) for name, v in (("logits", xs), ("bias", bs), ("sizes", ss)) if v is not None}
    w, i = cached_session(attrs, onnx_t, bias is not None, isa, sizes is not None).run(None, feeds)
    rw, ri, counts, amb = dynamic_router(xs, bs, ss, return_counts=True, **attrs)
    assert w.shape == rw.shape and i.shape == ri.shape and i.dtype == np.int64
    ok = ~amb.reshape(-1)
    I, RI = i.reshape(-1, i.shape[-1]), ri.reshape(-1, ri.shape[-1])
    assert np.array_equal(I[ok], RI[ok]), "indices differ from the spec"
    # The spec's weights as the output type holds them: a weight past float16's range is inf there
    # (normalizing over a top-k whose scores all underflow towards 0 gives such weights).
    W, RW = w.astype(np.float32).reshape(I.shape), rw.astype(io_t).astype(np.float32).reshape(I.shape)
    assert np.allclose(W[ok], RW[ok], atol=tol, rtol=tol)
    # Ambiguous tokens (a decision within rounding of the threshold) still route validly.
    E = attrs["num_experts"]
    assert ((I >= 0) & (I <= E)).all()
    kept = (I < E).sum(axis=1)
    assert (np.abs(kept[~ok] - counts.reshape(-1)[~ok]) <= 1).all()
    assert np.isfinite(W[np.isfinite(RW)]).all()


def ulp_neighbours(rng, shape):
    """A few values, each spread over its next 200 floats: logits that order only by their last
    bits, and scores that round to ties."""
    base = rng.choice(np.float32([0.75, -1.5, 3.0]), shape).view(np.int32)
    return (base + rng.integers(0, 200, shape).astype(np.int32)).view(np.float32).astype(np.float64)


KINDS = ("normal", "wide", "ties", "ulps", "adversarial")


def probe_sizes(rng, shape):
    """Log output sizes for policy probe: mostly normal, a few NaN, infinite or huge."""
    sizes = rng.standard_normal(shape) * 2
    odd = rng.random(shape) < 0.05
    sizes[odd] = rng.choice([np.nan, np.inf, -np.inf, 1e4, -1e4], odd.sum())
    return sizes


def probe_threshold(attrs, x, bias, sizes, quantile):
    """A threshold among the signals w_j * exp(size_j) of the static routing's weights, so that
    probe keeps some slots and drops others."""
    static = dict(attrs, policy="static", threshold=0.0)
    w, i = dynamic_router(x.astype(np.float32), None if bias is None else bias.astype(np.float32), **static)
    with np.errstate(over="ignore", invalid="ignore"):
        sig = w.astype(np.float64) / attrs.get("scale", 1.0) * np.exp(np.take_along_axis(sizes, i, axis=-1))
    sig = sig[np.isfinite(sig)]
    return float(np.float32(max(np.quantile(sig, quantile), 0.0))) if sig.size else quantile


@st.composite
def router_case(draw, kinds=KINDS, dtypes=tuple(sorted(DTYPES)), isas=ISAS):
    form = draw(st.sampled_from(sorted(FORMS)))
    E = draw(st.sampled_from([1, 2, 3, 8, 16, 60, 64, 128, 256, 512]))
    if form == "sigmoid_grouped":
        E = max(E, 4)
        E = E - E % 4
        n_group = draw(st.sampled_from([g for g in (1, 2, 4) if E % g == 0]))
        topk_group = draw(st.integers(1, n_group))
        gs = E // n_group
        extra = dict(n_group=n_group, topk_group=topk_group, group_score_topk=draw(st.integers(1, min(2, gs))))
    else:
        extra = {}
    k = draw(st.integers(1, min(E, 16)))
    policy = draw(st.sampled_from(["static", "top-p", "ratio", "entropy", "probe"]))
    max_e = draw(st.integers(1, min(E, 20) if policy != "probe" else k))
    min_e = draw(st.integers(1, max_e))
    thr = draw(st.floats(0.0, 0.99)) if policy != "static" else 0.0  # probe: a quantile of the signals
    renorm = draw(st.sampled_from([1.0, 1.0, 0.5, 0.0, float(np.float32(0.3))]))
    attrs = dict(num_experts=E, k=k, policy=policy, threshold=float(np.float32(thr)), min_experts=min_e,
                 max_experts=max_e, renormalize=renorm, **FORMS[form], **extra)
    tokens = draw(st.sampled_from([0, 1, 2, 7, 33, 300]))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((tokens, E))
    elif kind == "wide":
        x = rng.standard_normal((tokens, E)) * 30
    elif kind == "ties":
        x = rng.integers(-2, 3, (tokens, E)).astype(np.float64)
    elif kind == "ulps":
        x = ulp_neighbours(rng, (tokens, E))
    else:
        x = rng.choice([0.0, 1.0, -1.0, 1e30, -1e30, np.inf, -np.inf, np.nan, 88.5, -87.5, 1e-30,
                        1e-6, -3e-5],  # float16 subnormals
                       size=(tokens, E))
    # a correction bias ranks with every form (DeepSeek-V3 sigmoid, ERNIE softmax, Kolibri logits)
    bias = rng.standard_normal(E) * (0.1 if form == "sigmoid_grouped" else 1.0) if draw(st.booleans()) else None
    sizes = None
    if policy == "probe":
        sizes = probe_sizes(rng, x.shape)
        attrs["threshold"] = probe_threshold(attrs, x, bias, sizes, thr)
    dtype = draw(st.sampled_from(dtypes))
    return attrs, x, bias, dtype, draw(st.sampled_from(isas)), sizes


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(router_case())
def test_kernel_matches_spec(case):
    check(*case)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("policy", ["static", "top-p", "ratio", "entropy", "probe"])
def test_large_token_counts_use_thread_pool(dtype, policy, isa):
    attrs = dict(num_experts=64, k=8, policy=policy, threshold={"entropy": 0.3, "probe": 0.1}.get(policy, 0.5),
                 max_experts=8, normalize=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 64)) * 2
    check(attrs, x, None, dtype, isa, probe_sizes(rng, x.shape) if policy == "probe" else None)


@pytest.mark.parametrize("E, k", [(8, 2), (16, 4), (64, 8), (256, 8), (512, 16), (40, 6), (60, 4), (13, 8), (3, 2)])
@pytest.mark.parametrize("kind", ["normal", "ties", "few_values", "ulps"])
def test_builds_agree(E, k, kind):
    """The AVX2 row loop returns exactly what the portable one does (the same arithmetic in the
    same order), on rows with and without tied keys."""
    rng = np.random.default_rng(E * 7 + k)
    x = {"normal": rng.standard_normal((3000, E)) * 3, "ties": rng.integers(-3, 4, (3000, E)),
         "few_values": rng.choice([0.0, -0.0, 2.5, -np.inf], (3000, E)),
         "ulps": ulp_neighbours(rng, (3000, E))}[kind].astype(np.float32)
    for attrs in (dict(num_experts=E, k=k, normalize=1), dict(num_experts=E, k=k, select="before_score"),
                  dict(num_experts=E, k=k), dict(num_experts=E, k=k, policy="ratio", threshold=0.3, max_experts=min(E, 8)),
                  dict(num_experts=E, k=k, policy="top-p", threshold=0.6, max_experts=min(E, 2 * k)),
                  dict(num_experts=E, k=k, policy="top-p", threshold=0.6, max_experts=min(E, 8), select="before_score"),
                  dict(num_experts=E, k=k, policy="ratio", threshold=0.3, max_experts=min(E, 8), select="before_score",
                       renormalize=0.5),
                  dict(num_experts=E, k=k, policy="top-p", threshold=0.6, max_experts=min(E, 2 * k), normalize=1,
                       renormalize=0.0)):
        outs = [isa_session(router_model(attrs), isa).run(None, {"logits": x}) for isa in ISAS]
        assert np.array_equal(outs[0][1], outs[1][1])
        assert np.array_equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("E, k", [(16, 4), (64, 8), (64, 2)])
def test_score_ties_between_different_logits(E, k, isa):
    """Softmax -> TopK -> renormalize ranks on scores, and two logits one float apart often get
    the same score: those go in index order, where ranking on logits (which the kernel does when
    it is safe) would swap them. TopK -> Softmax ranks on the logits themselves."""
    rng = np.random.default_rng(E + k)
    x = rng.uniform(-4, -3, (256, E)).astype(np.float32)
    c = rng.uniform(-0.5, 0.5, 256).astype(np.float32)
    x[:, E - 1], x[:, 2], x[:, 9] = 1.0, c, np.nextafter(c, np.float32(np.inf))
    for attrs, second in ((dict(num_experts=E, k=k, normalize=1), 2), (dict(num_experts=E, k=k), 2),
                          (dict(num_experts=E, k=k, policy="top-p", threshold=0.9, max_experts=min(E, 8)), 2),
                          (dict(num_experts=E, k=k, select="before_score"), 9)):
        _, ri = dynamic_router(x, **attrs)
        assert (ri[:, 1] == second).mean() > 0.5  # the case this test is about
        check(attrs, x, None, "float32", isa)


@pytest.mark.parametrize("form", ["before_score", "softmax_norm", "sigmoid_grouped"])
def test_renormalize_gives_the_kept_their_share(form):
    """renormalize r: a kept expert's weight is its static weight (over the k) times
    (static total / kept total)^r, computed here from the static routing itself; r = 1 is the
    router configured with fewer experts (the default), and an unnormalized gate ignores r."""
    E, k = 16, 4
    extra = dict(n_group=4, topk_group=2) if form == "sigmoid_grouped" else {}
    base = dict(num_experts=E, k=k, **FORMS[form], **extra)
    x = (np.random.default_rng(3).standard_normal((400, E)) * 3).astype(np.float32)
    sw, si = dynamic_router(x, **base)
    for r in (1.0, 0.5, 0.0):
        attrs = dict(base, policy="ratio", threshold=0.4, max_experts=k, renormalize=r)
        w, i = dynamic_router(x, **attrs)
        kept = i < E
        assert 0 < kept.sum() < kept.size and np.array_equal(i[kept], si[kept])
        sk, sc = sw.sum(1), np.where(kept, sw, 0).sum(1)
        np.testing.assert_allclose(w[kept], (sw * ((sk / sc) ** r)[:, None])[kept], rtol=2e-6)
        check(attrs, x, None, "float32")
    loose = dict(num_experts=E, k=k, policy="ratio", threshold=0.4)  # weights the raw softmax
    assert np.array_equal(dynamic_router(x, **loose, renormalize=0.0)[0], dynamic_router(x, **loose)[0])


def test_avx2_build_is_in_the_library():
    """On an AVX2 CPU the x86-64 library carries the AVX2 build, so `auto` above tested it."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if os.uname().machine != "x86_64" or " avx2" not in flags or " f16c" not in flags:
        pytest.skip("not an x86-64 CPU with AVX2 and F16C")
    w, i = isa_session(router_model(dict(num_experts=64, k=8)), "avx2").run(
        None, {"logits": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)})
    assert i.shape == (5, 8)


def test_cpu_isa_is_checked_at_session_creation():
    with pytest.raises(Exception, match="MOE_EXPORT_CPU_ISA must be"):
        isa_session(router_model(dict(num_experts=8, k=2)), "sse9")


def test_leading_dims_are_kept():
    attrs = dict(num_experts=8, k=2)
    s = session_of(router_model(attrs, rank=3))
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    w, i = s.run(None, {"logits": x})
    assert w.shape == (3, 5, 2) and i.shape == (3, 5, 2)
    rw, ri = dynamic_router(x, **attrs)
    assert np.array_equal(i, ri)


def test_nan_and_inf_rows_are_defined():
    """NaN ranks last; +inf logits share the mass; an all -inf row is uniform."""
    attrs = dict(num_experts=4, k=2, normalize=1)
    s = session_of(router_model(attrs))
    x = np.array([[np.nan, 1.0, 2.0, 0.0], [np.inf, 0.0, np.inf, 1.0], [-np.inf] * 4, [np.nan] * 4], np.float32)
    w, i = s.run(None, {"logits": x})
    assert i[0].tolist() == [2, 1]
    assert i[1].tolist() == [0, 2] and np.allclose(w[1], [0.5, 0.5])
    assert i[2].tolist() == [0, 1] and np.allclose(w[2], [0.5, 0.5])
    assert i[3].tolist() == [0, 1] and np.isfinite(w[3]).all()


@pytest.mark.parametrize("attrs, message", [
    (dict(num_experts=8, k=9), "k must be"),
    (dict(num_experts=8, k=2, policy="top-q"), "unknown policy"),
    (dict(num_experts=8, k=2, policy="top-p", threshold=1.5), "threshold"),
    (dict(num_experts=8, k=2, policy="top-p", threshold=float("nan")), "threshold"),
    (dict(num_experts=8, k=2, min_experts=3, max_experts=2), "min_experts"),
    (dict(num_experts=8, k=2, n_group=3), "n_group"),
    (dict(num_experts=0, k=1), "num_experts"),
    (dict(num_experts=8, k=2, score_func="tanh"), "score_func"),
    (dict(num_experts=8, k=2, policy="probe", threshold=-0.5), "threshold must be >= 0 for probe"),
    (dict(num_experts=8, k=2, policy="probe", max_experts=3), "max_experts must be <= k for probe"),
    (dict(num_experts=8, k=2, policy="probe"), "policy probe needs the sizes input"),  # no sizes input
])
def test_bad_attributes_fail_at_session_creation(attrs, message):
    with pytest.raises(Exception, match=message):
        session_of(router_model(attrs))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bias", [False, True])
def test_probe_keeps_a_later_slot_and_drops_an_earlier(bias, isa):
    """Probe decides slot by slot: the second-ranked expert, predicted to add little, is dropped
    while the third is kept; the kept come first, in ranking order."""
    attrs = dict(num_experts=4, k=3, policy="probe", threshold=0.2, normalize=1)
    x = np.float32([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    sizes = np.float32([[0.0, -10.0, 2.0, 0.0], [0.0, 2.0, -10.0, 0.0]])
    b = np.zeros(4, np.float32) if bias else None
    w, i = isa_session(router_model(attrs, bias=bias, sizes=True), isa).run(
        None, {"logits": x, "sizes": sizes, **({"bias": b} if bias else {})})
    assert i.tolist() == [[0, 2, 4], [3, 1, 4]]
    rw, ri = dynamic_router(x, b, sizes, **attrs)
    assert np.array_equal(i, ri) and np.array_equal(w, rw)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)  # renormalize=1: the kept take it all


def test_probe_sizes_must_have_the_logits_shape():
    s = session_of(router_model(dict(num_experts=8, k=2, policy="probe"), sizes=True))
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(Exception, match="sizes must have the logits' shape"):
        s.run(None, {"logits": x, "sizes": np.zeros((3, 8), np.float32)})


def test_wrong_logits_width_is_an_error_not_a_crash():
    m = router_model(dict(num_experts=8, k=2))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "e"  # let the 7 reach the kernel
    s = session_of(m)
    with pytest.raises(Exception, match="num_experts"):
        s.run(None, {"logits": np.zeros((4, 7), np.float32)})
