"""Inkling: sigmoid scores over the routed and the shared experts' logits; the routed part plus a
correction bias ranks; the chosen routed logits, with the shared ones, are weighed by the graph
through log-sigmoids normalized by their log-sum-exp (the shared experts' weights depend on the
choice too). The router only selects (sigmoid scores + bias, as DeepSeek-V3's); a dropped slot
gathers a logit of -inf, whose sigmoid is 0: it weighs nothing and leaves the normalization."""
from .base import Gate, Miss, Rule, experts_of, sigmoid_of, topk_k
from ..op.schema import gate_defaults

ORDER = 38


def _routed_weights(ix, t, k, depth=12):
    """The slice [..., :k] of the graph's normalized weights, which the routed experts take (the
    rest are the shared experts'), searched downstream of `t`; None if there is none."""
    frontier = [t]
    for _ in range(depth):
        nxt = []
        for u in frontier:
            for c in ix.consumers_of(u):
                starts, ends = (ix.const(c.input[i]) if len(c.input) > i else None for i in (1, 2))
                if c.op_type == "Slice" and starts is not None and ends is not None \
                        and starts.reshape(-1).tolist() == [0] and ends.reshape(-1).tolist() == [k]:
                    return c.output[0]
                nxt.extend(c.output)
        frontier = nxt
    return None


def match(ix, tk):
    path = ix.path_up(tk.input[0], ["Add", "Slice"])
    if path is None:
        raise Miss("TopK does not rank a slice of the scores plus a bias")
    add, sl = path
    x = sigmoid_of(ix, ix.source(sl.input[0])[0])
    if x is None:
        raise Miss("the sliced scores are not a Sigmoid")
    bias = next(i for i in add.input if ix.source(i)[0] != sl.output[0])
    same_slice = lambda n: n.op_type == "Slice" and ix.source(n.input[0])[0] == x and n.input[1:] == sl.input[1:]
    ge = next((c for c in ix.consumers_of(tk.output[1]) if c.op_type == "GatherElements"
               and (p := ix.source_node(c.input[0])) is not None and same_slice(p)), None)
    if ge is None:
        raise Miss("the chosen experts' logits are not gathered from the same slice of the logits")
    if ix.consumers_of(tk.output[0]) or tk.output[0] in ix.graph_outputs:
        raise Miss("the TopK values are used (the router would have to compute them)")
    nxt = ix.only_consumer(ge.output[0])
    if nxt is not None and nxt.op_type == "Concat":  # the shared experts' logits join
        nxt = ix.only_consumer(nxt.output[0])
    if nxt is None or nxt.op_type != "Sigmoid":
        raise Miss("the gathered logits do not go to a Sigmoid (a dropped slot's -inf would weigh)")
    E, k = experts_of(ix, tk, bias), topk_k(ix, tk)
    w = _routed_weights(ix, nxt.output[0], k) or tk.output[0]  # the experts' regrouping reads them
    return Gate("lse_sigmoid_topk", tk, x, bias, w, tk.output[1],
                gate_defaults(E, k) | dict(score_func="sigmoid"), logits_views=(sl,),
                gathers={ge.input[0]: float("-inf")})


RULE = Rule("lse_sigmoid_topk", "Sigmoid(logits)[:E] + bias -> TopK; GatherElements(logits[:E]) [-> Concat(shared)] -> "
            "Sigmoid -> the graph's log-sum-exp weighting", "Inkling", match)
