"""Softmax scores with a correction bias added for ranking only (ERNIE 4.5 MoE, ZAYA,
LongCat-Flash): TopK ranks softmax + bias, the weights are the unbiased probabilities gathered at
the chosen experts, optionally renormalized and scaled."""
from .base import Gate, Miss, NearMiss, Rule, experts_of, gathered, last_axis, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 40


def match(ix, tk):
    add = ix.source_node(tk.input[0], "Add")
    # LongCat-Flash views the scores as [-1, E] before the bias: the view is re-applied to the logits
    behind = [ix.behind_views(i) for i in add.input] if add is not None else []
    j = next((j for j, (t, _) in enumerate(behind) if ix.producer.get(t) is not None
              and ix.producer[t].op_type == "Softmax"), None)
    if j is None:
        raise Miss("TopK does not rank Softmax scores plus a bias")
    sm, views, bias = ix.producer[behind[j][0]], behind[j][1], add.input[1 - j]
    if not last_axis(sm, ix, sm.input[0]):
        raise Miss("the Softmax is not over the experts (last) axis")
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, sm.output[0], sm.input[0])
    ge = gathered(ix, tk, sm.output[0])
    if ge is None:
        raise NearMiss(f"softmax+bias gate {tk.name!r}: weights are not gathered from the softmax scores")
    w, normalize, scale, cast = weights_chain(ix, ge.output[0])
    return Gate("softmax_bias_topk", tk, sm.input[0], bias, w, tk.output[1],
                gate_defaults(E, k) | dict(normalize=normalize, scale=scale),
                cast_to=cast or ix.source(ge.input[0])[1], logits_views=tuple(views))


RULE = Rule("softmax_bias_topk", "Softmax + bias -> TopK; GatherElements(Softmax) [-> x / sum] [-> x * scale]",
            "ERNIE-4.5-MoE", match)
