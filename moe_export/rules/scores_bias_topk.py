"""Scores of any form plus a correction bias rank; the graph weighs the chosen experts by the
unbiased scores it gathers, summed or scaled (DeepSeek-V4: Sqrt(Softplus(x)), x above a
threshold taken as is). The router only selects (select=before_score on the scores and the
bias: the same ranking; its policies read the softmax of the scores); the graph's own weighting
stays, and a dropped slot gathers 0, so it weighs nothing and adds nothing to a sum."""
from .base import Gate, Miss, Rule, experts_of, gathered, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 90  # after every rule that computes the weights in the router

# Readers of the gathered scores for which a 0 would not mean "weighs nothing".
_NONLINEAR = {"Softmax", "LogSoftmax", "Exp", "Sigmoid", "Log", "Softplus", "Neg", "Sub", "Pow", "Reciprocal"}


def match(ix, tk):
    add = ix.source_node(tk.input[0], "Add")
    if add is None:
        raise Miss("TopK does not rank scores plus a bias")
    j = next((j for j in (0, 1) if gathered(ix, tk, ix.source(add.input[j])[0]) is not None), None)
    if j is None:
        raise Miss("the weights are not gathered from an operand of the ranked sum")
    scores, bias = ix.source(add.input[j])[0], add.input[1 - j]
    if ix.consumers_of(tk.output[0]) or tk.output[0] in ix.graph_outputs:
        raise Miss("the TopK values are used (the router would have to compute them)")
    ge = gathered(ix, tk, scores)
    if any(c.op_type in _NONLINEAR for c in ix.consumers_of(ix.through_casts(ge.output[0])[0])):
        raise Miss("the gathered scores go through a non-linear function (a dropped slot's 0 would weigh)")
    E = experts_of(ix, tk, bias, scores)
    w, normalize, scale, _ = weights_chain(ix, ge.output[0])
    return Gate("scores_bias_topk", tk, scores, bias, w, tk.output[1],
                gate_defaults(E, topk_k(ix, tk)) | dict(select="before_score", normalize=normalize, scale=scale),
                gathers={scores: 0.0})


RULE = Rule("scores_bias_topk", "scores + bias -> TopK; GatherElements(scores) -> the graph's sums and scaling",
            "DeepSeek-V4", match)
