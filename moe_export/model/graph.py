"""Reading and indexing ONNX graphs without ever loading external weights (writing: files.py).

The rewriter works on the protobuf directly instead of onnx-graphsurgeon: graphsurgeon rebuilds
every tensor on import and export, which on multi-GB graphs with external data costs memory and
time proportional to the weights; here cost is proportional to the node count, and initializers
(with their external-data references) pass through untouched.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import MoeExportError
from .files import data_locations


def load_model(path) -> onnx.ModelProto:
    """Loads the graph only (external weights stay on disk), with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise MoeExportError(f"{p}: no such file")
    if p.is_dir():
        raise MoeExportError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise MoeExportError(f"{p}: empty file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-derived errors, ...
        raise MoeExportError(f"{p}: not a valid ONNX model ({type(e).__name__})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise MoeExportError(f"{p}: not a valid ONNX model (no graph nodes)")
    locs = data_locations(model)
    for loc in locs:
        if Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise MoeExportError(f"{p}: external data location {loc!r} points outside the model's directory")
        if not (p.parent / loc).is_file():
            raise MoeExportError(f"missing external data file {loc!r} (expected next to the model in {p.parent})")
    _read_small_external(model, p.parent)
    return model


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 if it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


_PACKED = {onnx.TensorProto.STRING, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
           getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}  # no fixed byte size per element
INLINE_MAX = 4096  # elements: k, axes, shapes, scales, a correction bias [E]; every weight is larger


def _read_small_external(model, base: Path) -> None:
    """Brings small externally stored initializers into the graph (onnx.save(...,
    size_threshold=0) puts even k and axes outside), so patterns can read them; weights stay out."""
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) > INLINE_MAX:
            continue
        if t.data_type in _PACKED:
            continue
        info = {e.key: e.value for e in t.external_data}
        try:
            with open(base / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"])) if "length" in info else f.read()
        except (OSError, ValueError, KeyError):
            continue  # left external: read as unknown, like any other non-constant
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        raw = raw[:int(np.prod(t.dims)) * itemsize]
        if len(raw) != int(np.prod(t.dims)) * itemsize:
            continue
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw


# Ops that pass a tensor's values through unchanged (reshaped, reordered, retyped): uses of the
# expert ids are followed through them.
PASS_THROUGH = {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity", "Cast"}


class GraphIndex:
    """Producers, consumers and constant values of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.value_info = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}

    SMALL = 1 << 16  # elements; shapes, axes, scalars and per-expert vectors are far below

    def const(self, name: str):
        """The value of a small constant tensor (initializer or Constant node), else None.
        Never reads weights: a constant stored outside the model, or larger than SMALL elements,
        is treated as unknown."""
        t = self.initializers.get(name)
        if t is None:
            n = self.producer.get(name)
            if n is None or n.op_type != "Constant":
                return None
            a = n.attribute[0]
            if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.array(onnx.helper.get_attribute_value(a))
            if a.name != "value":
                return None
            t = a.t
        if t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) > self.SMALL:
            return None
        return numpy_helper.to_array(t)

    def consumers_of(self, name):
        return self.consumers.get(name, [])

    def only_consumer(self, name, op_type=None):
        cs = self.consumers_of(name)
        if len(cs) != 1 or name in self.graph_outputs:
            return None
        return cs[0] if op_type is None or cs[0].op_type == op_type else None

    def elem_type(self, name):
        v = self.value_info.get(name)
        if v is not None and v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
        t = self.initializers.get(name)
        if t is not None:
            return t.data_type
        p = self.producer.get(name)
        return attr(p, "to") if p is not None and p.op_type == "Cast" else None

    # Float16 conversions (onnxconverter-common) wrap ops that lack a float16 kernel, TopK among
    # them, in Casts; TorchScript puts one between scores and TopK. Patterns step over them.
    def source(self, name):
        """(the tensor before any Casts that produced `name`, the type the Cast nearest `name`
        produced, or None)."""
        to = None
        while (p := self.producer.get(name)) is not None and p.op_type == "Cast":
            to = attr(p, "to") if to is None else to
            name = p.input[0]
        return name, to

    def source_node(self, name, op_type=None):
        """The node producing `name`, Casts stepped over; None unless of `op_type` when given."""
        n = self.producer.get(self.source(name)[0])
        return n if n is not None and (op_type is None or n.op_type == op_type) else None

    def path_up(self, tensor, ops):
        """The nodes producing `tensor` along `ops`, nearest first, Casts stepped over: ops[0]
        produces `tensor`, ops[1] one of ops[0]'s inputs, and so on; None if there is no such path."""
        node = self.source_node(tensor, ops[0])
        if node is None:
            return None
        found = [node]
        for op in ops[1:]:
            node = next((n for n in (self.source_node(i, op) for i in node.input if i) if n is not None), None)
            if node is None:
                return None
            found.append(node)
        return found

    VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")

    def behind_views(self, name):
        """(the tensor before any view ops and Casts that produced `name`, the view nodes stepped
        over in data order). An elementwise score seen through them equals the score of the
        logits taken through the same views."""
        views = []
        while (p := self.producer.get(name)) is not None and p.op_type in self.VIEWS + ("Cast",):
            if p.op_type != "Cast":
                views.insert(0, p)
            name = p.input[0]
        return name, views

    def through_casts(self, name):
        """(`name` followed forward through a chain of sole-consumer Casts, the last type cast to)."""
        to = None
        while (c := self.only_consumer(name, "Cast")) is not None:
            name, to = c.output[0], attr(c, "to")
        return name, to

    def followers(self, name, op_type):
        """Consumers of `name` of `op_type`, reached directly or through Casts."""
        out, stack = [], [name]
        while stack:
            for c in self.consumers_of(stack.pop()):
                if c.op_type == op_type:
                    out.append(c)
                elif c.op_type == "Cast":
                    stack.append(c.output[0])
        return out

    def static_last_dim(self, name):
        v = self.value_info.get(name)
        if v is not None and v.type.tensor_type.HasField("shape"):
            dims = v.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return dims[-1].dim_value
        t = self.initializers.get(name)
        if t is not None and t.dims:
            return t.dims[-1]
        return None


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_axes(ix: "GraphIndex", node):
    """A node's axes, from the attribute (older opsets) or the constant second input (newer)."""
    a = attr(node, "axes")
    if a is None and len(node.input) > 1:
        v = ix.const(node.input[1])
        a = None if v is None else v.reshape(-1).tolist()
    return a


class NodeBuilder:
    """Emits nodes and constants under unique names below `prefix` (a rewrite's own namespace)."""

    def __init__(self, prefix):
        self.prefix, self.nodes, self.inits = prefix, [], []
        self._n = 0

    def name(self, hint):
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, dtype=None, hint="c"):
        arr = np.asarray(value, dtype=dtype)
        t = numpy_helper.from_array(arr, self.name(hint))
        self.inits.append(t)
        return t.name

    def i64(self, value):
        """An int64 constant (the type of every shape, axis and index input)."""
        return self.const(value, np.int64)

    def zero(self, elem_type):
        """A scalar 0 of an ONNX element type (bfloat16 too, which numpy lacks)."""
        t = helper.make_tensor(self.name("zero"), elem_type, [], [0])
        self.inits.append(t)
        return t.name

    def op(self, op_type, inputs, n_out=1, hint=None, **kw):
        outs = [self.name((hint or op_type.lower()) + f"_o{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **kw))
        return outs if n_out > 1 else outs[0]

    def filled(self, like, last, value, dtype):
        """A tensor of `value` shaped as `like` but with `last` elements on the last axis."""
        i64 = self.i64
        shape = self.op("Concat", [self.op("Slice", [self.op("Shape", [like]), i64([0]), i64([-1])]), i64([last])], axis=0)
        return self.op("ConstantOfShape", [shape], value=helper.make_tensor("value", dtype, [1], [value]))


def _reads(graph: onnx.GraphProto, acc: set) -> set:
    """Every tensor name read by the graph's nodes, subgraphs (If/Loop/Scan bodies) included."""
    acc |= reads_of(graph.node)
    return acc


def share_constants(graph: onnx.GraphProto, prefix: str) -> None:
    """Makes each small constant named under `prefix` the first initializer of its value, the
    graph's own where it has one (not one a user may feed). onnxruntime's ConstantSharing would
    otherwise merge them at load, and every change its optimizers make re-resolves the whole
    graph, each If and Scan body included: with a Scan per layer, such changes (this and three
    other folds) made a 48-layer model load in 1.7x the original's time
    (benchmarks/load_cpu.py --deep)."""
    fed = {i.name for i in graph.input}
    first, alias = {}, {}
    for t in graph.initializer:
        if (t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING
                or int(np.prod(t.dims)) > 64):
            continue
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in first and t.name.startswith(prefix):
            alias[t.name] = first[key]
        elif t.name not in fed:
            first.setdefault(key, t.name)
    if alias:
        rename_reads(graph, alias)
        drop_unused_initializers(graph)


def rename_reads(graph: onnx.GraphProto, alias: dict) -> None:
    for n in graph.node:
        for i, t in enumerate(n.input):
            n.input[i] = alias.get(t, t)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                rename_reads(sub, alias)


def drop_named(graph: onnx.GraphProto, prefixes: tuple) -> None:
    """Removes the nodes and initializers named under `prefixes` (what an earlier pass attached,
    before attaching it again under the same names). Node lookups made before go stale: the
    fields are rebuilt from copies."""
    for items in (graph.node, graph.initializer):
        if prefixes and any(x.name.startswith(prefixes) for x in items):
            keep = [x for x in items if not x.name.startswith(prefixes)]
            del items[:]
            items.extend(keep)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Removes initializers nothing reads (ORT warns about each one in every session)."""
    live = _reads(graph, set()) | {o.name for o in graph.output} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name in live]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


@dataclass
class Rewire:
    """Consumers of `old` read `new` instead; those named in `exceptions` read the tensor given
    there. A graph output named `old` keeps its name and carries `output` (default `new`)."""
    old: str
    new: str
    exceptions: dict = field(default_factory=dict)
    output: str | None = None


class Surgery:
    """One batch of edits to a graph, applied together: new nodes placed before an anchor node,
    consumers rewired, nodes that nothing reads any more removed (from the given candidates),
    then unused initializers and stale value_info dropped. Every node must be named (the
    rewriter names them first)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.added: dict[tuple, list] = {}  # (anchor node name, 0 before / 1 after) -> nodes
        self.inits: list = []
        self.rewires: list[Rewire] = []
        self.removable: set[str] = set()   # node names that go once unused
        self.stale: set[str] = set()       # tensors whose value_info no longer holds

    def insert(self, builder: "NodeBuilder", before: str | None = None, after: str | None = None) -> None:
        """Places the builder's nodes right before node `before`, or right after node `after`."""
        self.added.setdefault((before, 0) if before else (after, 1), []).extend(builder.nodes)
        self.inits += builder.inits

    def rewire(self, old, new, exceptions=None, output=None) -> None:
        self.rewires.append(Rewire(old, new, dict(exceptions or {}), output))

    def remove(self, names) -> None:
        self.removable |= set(names)

    def apply(self) -> None:
        g = self.graph
        rw = {r.old: r for r in self.rewires}
        for n in g.node:  # only the existing nodes: the new ones read the tensors as they were
            for i, t in enumerate(n.input):
                if t in rw:
                    n.input[i] = rw[t].exceptions.get(n.name, rw[t].new)
        outputs = {o.name for o in g.output}
        producers = {o: n for n in g.node for o in n.output}
        keep, moved = [], {}
        for n in g.node:
            for j, o in enumerate(n.output):
                if o in rw and o in outputs:
                    # The old producer lets go of the name (and so usually becomes dead); an
                    # Identity takes it. New nodes that read the old tensor follow it.
                    n.output[j] = moved[o] = f"{o}/replaced_by_moe_export"
                    r = rw[o]
                    keep.append(helper.make_node("Identity", [r.output or r.new], [o], name=f"moe_export/keep_{o}"))
        for added in self.added.values():
            for n in added:
                for i, t in enumerate(n.input):
                    if t in moved:
                        n.input[i] = moved[t]
        nodes = []
        for n in g.node:
            nodes.extend(self.added.get((n.name, 0), ()))
            nodes.append(n)
            nodes.extend(self.added.get((n.name, 1), ()))
        # Removable too: new nodes nobody reads, and nodes that fed only removed ones.
        added = {n.name for a in self.added.values() for n in a}
        fed = {p.name for n in g.node if n.name in self.removable for t in n.input
               for p in [producers.get(t)] if p is not None}
        nodes = prune(nodes + keep, outputs, self.removable | added | fed)
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(self.inits)
        drop_unused_initializers(g)
        produced = {o for n in nodes for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
        stale = set(rw) | self.stale
        keep_vi = [v for v in g.value_info if v.name in produced and v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(keep_vi)


def input_dependent(graph: onnx.GraphProto) -> set:
    """The tensors whose values the graph's inputs reach (subgraph reads included; not through a
    Shape or Size, whose outputs depend on the inputs' shapes alone)."""
    init = {t.name for t in graph.initializer}
    live = {i.name for i in graph.input} - init
    for n in graph.node:
        if n.op_type not in ("Shape", "Size") and reads_of([n]) & live:
            live.update(o for o in n.output if o)
    return live


def prune(nodes, outputs, removable=None):
    """Removes nodes (of `removable`, by name; default any) whose outputs neither the other nodes
    nor `outputs` read (iteratively)."""
    while True:
        used = reads_of(nodes) | outputs
        keep = [n for n in nodes if (removable is not None and n.name not in removable)
                or any(o in used for o in n.output if o)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def needed(nodes, outputs) -> list:
    """The nodes of `nodes` (topologically ordered, as a graph's are) that `outputs` depend on: one
    backward pass, where prune peels a long unread tail one node deep at a time."""
    want, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in want for o in n.output if o):
            keep.append(n)
            want |= reads_of([n])
    return keep[::-1]


def reads_of(nodes) -> set:
    acc = set()
    for n in nodes:
        acc.update(i for i in n.input if i)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _reads(sub, acc)
    return acc
