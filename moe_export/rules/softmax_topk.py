"""Softmax over the experts, then TopK of the probabilities; optionally renormalized over the k
(x / sum(x) [+ eps]) and scaled."""
from .base import Gate, Miss, Rule, experts_of, last_axis, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 10


def match(ix, tk):
    path = ix.path_up(tk.input[0], ["Softmax"])
    if path is None:
        raise Miss("TopK does not rank Softmax scores")
    (sm,) = path
    if not last_axis(sm, ix, sm.input[0]):
        raise Miss("the Softmax is not over the experts (last) axis")
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, sm.output[0], sm.input[0])
    w, normalize, scale, cast = weights_chain(ix, tk.output[0])
    return Gate("softmax_topk", tk, sm.input[0], None, w, tk.output[1],
                gate_defaults(E, k) | dict(normalize=normalize, scale=scale),
                cast_to=cast or ix.source(tk.input[0])[1])


RULE = Rule("softmax_topk", "Softmax -> TopK [-> x / sum(x)] [-> x * scale]",
            "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE", match)
