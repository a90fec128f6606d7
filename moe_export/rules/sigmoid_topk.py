"""Sigmoid scores, an optional correction bias added for ranking, an optional group limit
(DeepSeek-V3: the best topk_group of n_group expert groups, by the sum of each group's best
keys, masked with Where), TopK, the weights gathered from the unbiased scores, optionally
renormalized and scaled."""
from .base import Gate, Miss, NearMiss, Rule, experts_of, gathered, sigmoid_of, topk_k, weights_chain
from ..op.schema import gate_defaults

ORDER = 30


def group_params(ix, choice, E):
    """Reshape(choice, [.., G, E/G]) -> TopK(t) -> ReduceSum -> TopK(topk_group)."""
    for r in ix.followers(choice, "Reshape"):
        shape = ix.const(r.input[1])
        if shape is None or shape.size < 2:
            continue
        G, gs = int(shape.reshape(-1)[-2]), int(shape.reshape(-1)[-1])
        if G <= 0 and gs > 0:
            G = E // gs
        if gs <= 0 and G > 0:
            gs = E // G
        # Other consumers (Shape for a zeros_like, ...) may share these tensors.
        first = lambda t, op: next(iter(ix.followers(t, op)), None)
        t1 = first(r.output[0], "TopK")
        if t1 is None or G * gs != E:
            continue
        rs = first(t1.output[0], "ReduceSum")
        t2 = rs and first(rs.output[0], "TopK")
        if t2 is None:
            continue
        return dict(n_group=G, group_score_topk=topk_k(ix, t1), topk_group=topk_k(ix, t2))
    raise NearMiss("masked top-k without a recognizable expert-group selection")


def match(ix, tk):
    scores, cast_to = ix.source(tk.input[0])
    src = ix.producer.get(scores)
    where = None
    if src is not None and src.op_type == "Where":
        # masked_fill(~group_mask, -inf): the non-constant branch carries the choice scores
        cands = [i for i in src.input[1:] if ix.const(ix.source(i)[0]) is None]
        if len(cands) != 1:
            raise Miss("TopK ranks a Where whose both branches vary (not a group mask)")
        where, choice = src, ix.source(cands[0])[0]
        src = ix.producer.get(choice)
    else:
        choice = scores
    bias, views = None, []
    if src is not None and src.op_type == "Add" and sigmoid_of(ix, choice) is None:
        # optimum's TorchScript export views the scores as [-1, E] before adding the bias
        behind = [ix.behind_views(i) for i in src.input]
        j = next((j for j, (t, _) in enumerate(behind) if sigmoid_of(ix, t) is not None), None)
        if j is None:
            raise Miss("TopK ranks a sum that is not Sigmoid scores + bias")
        scores, views, bias = behind[j][0], behind[j][1], src.input[1 - j]
    elif src is not None and sigmoid_of(ix, choice) is not None:
        scores = choice
    else:
        raise Miss("TopK does not rank Sigmoid scores (with or without a bias or group mask)")
    logits = sigmoid_of(ix, scores)
    k = topk_k(ix, tk)
    E = experts_of(ix, tk, scores, logits, *([bias] if bias else []))
    a = gate_defaults(E, k) | dict(score_func="sigmoid")
    if where is not None:
        a |= group_params(ix, choice, E)
    ge = gathered(ix, tk, scores)
    if ge is not None:
        w0, w0_cast = ge.output[0], ix.source(ge.input[0])[1]
    elif bias is None and where is None:
        w0, w0_cast = tk.output[0], cast_to  # the top-k values are the sigmoid scores themselves
    else:
        raise NearMiss(f"sigmoid gate {tk.name!r}: weights are not gathered from the sigmoid scores")
    w, normalize, scale, cast = weights_chain(ix, w0)
    a |= dict(normalize=normalize, scale=scale)
    return Gate("sigmoid_topk", tk, logits, bias, w, tk.output[1], a, cast_to=cast or w0_cast,
                logits_views=tuple(views))


RULE = Rule("sigmoid_topk", "Sigmoid (or 1/(1+exp(-x))) [+ bias] [-> group mask] -> TopK -> GatherElements(Sigmoid) [-> x / sum] [-> x * scale]",
            "DeepSeek-V3, LFM2-MoE (ORT GenAI builder)", match)
