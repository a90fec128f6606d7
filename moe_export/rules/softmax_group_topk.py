"""DeepSeek-V3's group-limited selection over softmax scores (Mistral 4): no bias, the experts
outside the best topk_group groups masked to 0 (the scores are positive, so that equals -inf),
TopK, the weights gathered from the scores, optionally renormalized and scaled."""
from .base import Gate, Miss, NearMiss, Rule, experts_of, gathered, last_axis, topk_k, weights_chain
from ..op.schema import gate_defaults
from .sigmoid_topk import group_params

ORDER = 50


def match(ix, tk):
    path = ix.path_up(tk.input[0], ["Where", "Softmax"])
    if path is None:
        raise Miss("TopK does not rank group-masked Softmax scores")
    where, sm = path
    fill = [i for i in where.input[1:] if ix.source(i)[0] != sm.output[0]]
    value = ix.const(ix.source(fill[0])[0]) if len(fill) == 1 else None
    if value is None or value.size != 1 or float(value.reshape(())) > 0:
        raise Miss("the masked experts are not filled with a constant at or below every score (0 or -inf)")
    if not last_axis(sm, ix, sm.input[0]):
        raise Miss("the Softmax is not over the experts (last) axis")
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, sm.output[0], sm.input[0])
    ge = gathered(ix, tk, sm.output[0])
    if ge is None:
        raise NearMiss(f"grouped softmax gate {tk.name!r}: weights are not gathered from the softmax scores")
    w, normalize, scale, cast = weights_chain(ix, ge.output[0])
    return Gate("softmax_group_topk", tk, sm.input[0], None, w, tk.output[1],
                gate_defaults(E, k) | group_params(ix, sm.output[0], E) | dict(normalize=normalize, scale=scale),
                cast_to=cast or ix.source(ge.input[0])[1])


RULE = Rule("softmax_group_topk", "Softmax -> group mask (Where) -> TopK -> GatherElements(Softmax) [-> x / sum] [-> x * scale]",
            "Mistral 4", match)
