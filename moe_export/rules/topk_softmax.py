"""TopK of the raw logits, then a Softmax over the k values (the weights); optionally scaled."""
from .base import Gate, Miss, Rule, experts_of, last_axis, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 20


def match(ix, tk):
    vals, to = ix.through_casts(tk.output[0])
    sm = ix.only_consumer(vals, "Softmax")
    if sm is None:
        raise Miss("the TopK values do not go to a Softmax alone")
    if not last_axis(sm, ix, vals):
        raise Miss("the Softmax of the TopK values is not over the last axis")
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, tk.input[0])
    w, _, scale, cast = weights_chain(ix, sm.output[0])
    return Gate("topk_softmax", tk, tk.input[0], None, w, tk.output[1],
                gate_defaults(E, k) | dict(select="before_score", scale=scale), cast_to=cast or to)


RULE = Rule("topk_softmax", "TopK on logits -> Softmax of the values [-> x * scale]", "GPT-OSS", match)
