"""A fused ``com.microsoft.MoE`` / ``QMoE`` op (ONNX Runtime GenAI's model builder, ORT's
transformers optimizer, Olive) whose ``router_probs`` carry the raw router logits [T, E]. The
op takes a float32 softmax over the E experts, the top k of it, renormalized over the k when
``normalize_routing_weights=1``, and runs only those experts: its CPU kernels skip a route whose
weight is exactly 0.

The router decides instead (``wire``): the op receives, per token, the original logits at the
experts the router kept and the lowest value of the type elsewhere. Its softmax then weighs
every dropped expert exactly 0 (the exponential underflows), so they are skipped, and the kept
experts get the original probabilities renormalized over the kept set, which with nothing
dropped are the original's. The op's output is then multiplied by the sum of the router's
weights: for an op that does not renormalize they are the kept probabilities, which that sum
restores; for one that does, it is the share of the static weight the router gives the kept
(`renormalize` < 1; 1 where nothing was dropped, or all of it is given back).
When the router keeps more than k, the op's k is raised to the router's width.
"""
import numpy as np
from onnx import TensorProto

from ..model.graph import NodeBuilder, attr
from .base import FUSED_DOMAIN, Gate, Miss, NearMiss, Rule, Wiring, is_fused
from ..op.schema import gate_defaults

ORDER = 60

# Input slots of the expert weights (fc1, fc2, fc3) and of QMoE's separate mixing weights.
_WEIGHTS = {"MoE": (2, 4, 6), "QMoE": (2, 5, 8)}
_ROUTER_WEIGHTS = 14


def match(ix, node):
    if not is_fused(node):
        raise Miss(f"not a {FUSED_DOMAIN} MoE op")
    probs = node.input[1]
    src, _ = ix.behind_views(probs)
    p = ix.producer.get(src)
    if p is not None and p.op_type == "ScatterElements":
        raise Miss("its router_probs are an in-graph selection (a scatter); the TopK before it is the gate")
    if attr(node, "use_sparse_mixer", 0):
        raise NearMiss(f"{node.name}: use_sparse_mixer=1 (PhiMoE's sparse mixer on CUDA) is not a softmax top-k; "
                       "moe-export does not convert it")
    if node.op_type == "QMoE" and len(node.input) > _ROUTER_WEIGHTS and node.input[_ROUTER_WEIGHTS]:
        raise NearMiss(f"{node.name}: router_weights given (selection and mixing from different tensors); "
                       "moe-export does not convert that form yet")
    w1 = ix.initializers.get(node.input[2])
    if w1 is None or len(w1.dims) != 3:
        raise NearMiss(f"{node.name}: the fc1 expert weights are not a constant [E, N, K] tensor")
    E, k = int(w1.dims[0]), int(attr(node, "k", 1))
    attrs = gate_defaults(E, k) | dict(normalize=int(bool(attr(node, "normalize_routing_weights", 0))))
    return Gate("fused_moe", node, probs, None, None, None, attrs)


def flops_per_pair(ix, node):
    """2 x the multiply-adds of one (token, expert) pair: the fc weights' N x K, unpacked."""
    bits = attr(node, "expert_weight_bits", 8) if node.op_type == "QMoE" else None
    total = 0
    for slot in _WEIGHTS[node.op_type]:
        w = ix.initializers.get(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
        if w is None:
            continue
        packed = bits is not None and w.data_type == TensorProto.UINT8
        total += int(np.prod(w.dims[1:])) * (8 // bits if packed else 1)
    return 2.0 * total


def _lowest(elem_type):
    return {TensorProto.FLOAT16: np.finfo(np.float16).min}.get(elem_type, np.finfo(np.float32).min) / 2


def feed(w: Wiring) -> str:
    surgery, b, ix, a, weights, indices = w.surgery, w.builder, w.ix, w.attrs, w.weights, w.indices
    node, E, logits = w.gate.topk, a.num_experts, w.gate.logits
    ftype = ix.elem_type(logits) or TensorProto.FLOAT
    i64 = b.i64
    last = i64([-1])
    low = b.const(np.array(_lowest(ftype), dtype=np.float32))
    if ftype != TensorProto.FLOAT:
        low = b.op("Cast", [low], to=ftype)
    kept = b.op("GatherElements", [logits, b.op("Min", [indices, b.const(np.int64(E - 1))])], axis=-1)
    full = b.op("Expand", [low, b.op("Shape", [logits])])
    # A scratch column E takes the dropped slots' writes and is sliced off.
    wide = b.op("Concat", [full, b.op("Slice", [full, i64([0]), i64([1]), last])], axis=-1)
    scattered = b.op("ScatterElements", [wide, indices, kept], axis=-1)
    probs = b.op("Slice", [scattered, i64([0]), i64([E]), last], hint="router_probs")
    surgery.rewire(logits, logits, exceptions={node.name: probs})
    if a.width > attr(node, "k", 1):
        next(x for x in node.attribute if x.name == "k").i = a.width
    post = NodeBuilder(f"{b.prefix}/rescale")
    out = node.output[0]
    total = post.op("ReduceSum", [weights, post.const(np.array([-1], dtype=np.int64))], keepdims=1)
    lead = post.op("Slice", [post.op("Shape", [out]), post.const(np.array([0], dtype=np.int64)),
                             post.const(np.array([-1], dtype=np.int64))])
    shape = post.op("Concat", [lead, post.const(np.array([1], dtype=np.int64))], axis=0)
    # router_probs and the op's output share one type (the op's T), and so the weights do
    scale = post.op("Reshape", [total, shape])
    surgery.rewire(out, post.op("Mul", [out, scale], hint="rescaled"))
    surgery.insert(post, after=node.name)
    return weights


RULE = Rule("fused_moe", f"{FUSED_DOMAIN} MoE/QMoE (router_probs = logits; softmax -> top-k inside)",
            "ORT GenAI builder: GPT-OSS, Qwen3.5-MoE, Gemma4; ORT transformers optimizer", match,
            anchors=("MoE", "QMoE"), wire=feed, fused=True)
