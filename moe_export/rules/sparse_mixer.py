"""PhiMoE's sparse mixer: no TopK; the first expert is the ArgMax of the logits, the second the
ArgMax of the logits with the first set to -inf; each one's weight is its softmax over the
experts within a jitter band of it (masked with Where). The router picks the ids (the same two,
ranked on the logits; its policies read their softmax); the graph's own weights stay, zeroed
at the slots the router drops, and a dropped slot's id is E as everywhere else."""
import numpy as np

from ..model.graph import NodeBuilder
from .base import Gate, Miss, Rule, Wiring, experts_of
from ..op.schema import gate_defaults

ORDER = 80


def _after_first(ix, am2, logits, first):
    """Whether am2 ranks the logits with the `first` choice scattered out."""
    sc = ix.source_node(am2.input[0])
    return sc is not None and sc.op_type == "ScatterElements" and ix.source(sc.input[0])[0] == logits \
        and sc.input[1] == first


def match(ix, am1):
    logits = ix.source(am1.input[0])[0]
    first = am1.output[0]
    ids = next((c for c in ix.consumers_of(first) if c.op_type == "Concat" and len(c.input) == 2
                and c.input[0] == first and (p := ix.producer.get(c.input[1])) is not None
                and p.op_type == "ArgMax" and _after_first(ix, p, logits, first)), None)
    if ids is None:
        raise Miss("not the first of two ArgMax picks, the second over the logits with the first scattered out")
    second = ids.input[1]
    picked = lambda t, i: (p := ix.producer.get(t)) is not None and p.op_type == "GatherElements" and p.input[1] == i
    weights = next((c for g in ix.consumers_of(first) if g.op_type == "GatherElements"
                    for c in ix.consumers_of(g.output[0]) if c.op_type == "Concat" and len(c.input) == 2
                    and picked(c.input[0], first) and picked(c.input[1], second)), None)
    if weights is None:
        raise Miss("the two picks' weights are not gathered at them and concatenated")
    E = experts_of(ix, am1, logits)
    return Gate("sparse_mixer", am1, logits, None, weights.output[0], ids.output[0],
                gate_defaults(E, 2) | dict(select="before_score", normalize=0))


def masked_weights(w: Wiring) -> str:
    """The router picks the ids; the graph's own weights stay (each pick's weight does not depend
    on the other's), zeroed where the router drops a slot."""
    post, weights = NodeBuilder(f"{w.builder.prefix}/mask"), w.gate.weights
    dropped = post.op("Equal", [w.indices, post.const(np.int64(w.attrs.num_experts))])
    ftype = w.ix.elem_type(weights)  # (a constant, where the type is known, is nothing left to fold at load)
    zero = post.zero(ftype) if ftype else post.op("CastLike", [post.const(np.float32(0)), weights])
    masked = post.op("Where", [dropped, zero, weights], hint="masked_weights")
    w.surgery.rewire(weights, masked)
    w.surgery.insert(post, after=w.ix.producer[weights].name)
    return masked


RULE = Rule("sparse_mixer", "ArgMax(logits), ArgMax(logits with it scattered out) -> Concat ids; "
            "GatherElements of each pick's jitter-masked softmax -> Concat weights", "PhiMoE", match,
            anchors=("ArgMax",), wire=masked_weights, wider=False)
