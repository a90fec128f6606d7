"""Kolibri: TopK ranks the raw logits plus a correction bias; the weights are the sigmoid of the
chosen logits (GatherElements(logits, ids) -> Sigmoid), optionally renormalized and scaled. As
DynamicRouter attributes: score_func=sigmoid, select=before_score."""
from .base import Gate, Miss, Rule, experts_of, gathered, sigmoid_of, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 35


def match(ix, tk):
    ranked, cast_to = ix.source(tk.input[0])
    add = ix.producer.get(ranked)
    bias = None
    if add is not None and add.op_type == "Add":
        j = next((j for j in (0, 1) if gathered(ix, tk, ix.source(add.input[j])[0]) is not None), None)
        if j is None:
            raise Miss("the chosen weights are not gathered from an operand of the ranked sum")
        logits, bias = ix.source(add.input[j])[0], add.input[1 - j]
    else:
        logits = ranked
    ge = gathered(ix, tk, logits)
    if ge is None:
        raise Miss("the chosen logits are not gathered from what the TopK ranks")
    sig = ix.only_consumer(ix.through_casts(ge.output[0])[0])
    if sig is None or sigmoid_of(ix, sig.output[0]) is None:
        raise Miss("the gathered logits do not go to a Sigmoid alone")
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, logits, *([bias] if bias else []))
    w, normalize, scale, cast = weights_chain(ix, sig.output[0])
    return Gate("logit_sigmoid_topk", tk, logits, bias, w, tk.output[1],
                gate_defaults(E, k) | dict(score_func="sigmoid", select="before_score", normalize=normalize,
                                           scale=scale), cast_to=cast or cast_to)


RULE = Rule("logit_sigmoid_topk", "logits [+ bias] -> TopK -> GatherElements(logits) -> Sigmoid [-> x / sum] [-> x * scale]",
            "Kolibri", match)
