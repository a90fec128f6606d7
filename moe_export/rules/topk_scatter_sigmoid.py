"""Llama 4: TopK ranks the raw logits; the chosen logits are scattered into a table of -inf and
the Sigmoid of that table is the dense [tokens, experts] routing weights (0 for the experts not
chosen), which every expert multiplies its input by. As DynamicRouter attributes:
score_func=sigmoid, select=before_score, no renormalization; the router's weights are scattered
into a dense table of zeros in its place."""
import numpy as np

from .base import Gate, Miss, Rule, Wiring, experts_of, scalar, sigmoid_of, topk_k
from ..op.schema import gate_defaults

ORDER = 36


def match(ix, tk):
    logits = tk.input[0]
    scatter = next((c for c in ix.consumers_of(tk.output[0]) if c.op_type == "ScatterElements"
                    and list(c.input[1:]) == [tk.output[1], tk.output[0]]), None)
    if scatter is None:
        raise Miss("the TopK values are not scattered by its ids")
    fill = ix.producer.get(scatter.input[0])
    value = scalar(ix, fill.input[0]) if fill is not None and fill.op_type == "Expand" else None
    if value is None or value != float("-inf"):
        raise Miss("the chosen logits are not scattered into a table of -inf")
    sig = ix.only_consumer(scatter.output[0])
    if sig is None or sigmoid_of(ix, sig.output[0]) is None:
        raise Miss("the scattered logits do not go to a Sigmoid alone")
    E = experts_of(ix, tk, logits)
    return Gate("topk_scatter_sigmoid", tk, logits, None, sig.output[0], tk.output[1],
                gate_defaults(E, topk_k(ix, tk)) | dict(score_func="sigmoid", select="before_score", normalize=0))


def dense_weights(w: Wiring) -> str:
    """The router's weights as a dense [tokens, E] table, zero where no kept slot points: scattered
    into a table one column wider (a dropped slot's id E lands there) that is then sliced off."""
    b, E = w.builder, w.attrs.num_experts
    table = b.op("ScatterElements", [b.filled(w.logits, E + 1, 0, w.dtype), w.indices, w.weights], axis=-1)
    dense = b.op("Slice", [table, b.const([0], np.int64), b.const([E], np.int64), b.const([-1], np.int64)],
                 hint="dense_weights")
    w.surgery.rewire(w.gate.weights, dense)
    return dense


RULE = Rule("topk_scatter_sigmoid", "logits -> TopK -> ScatterElements(-inf, ids, values) -> Sigmoid (dense weights)",
            "Llama 4", match, wire=dense_weights)
