"""Reading, indexing and safely writing ONNX graphs without ever loading external weights.

The rewriter works on the protobuf directly instead of onnx-graphsurgeon: graphsurgeon rebuilds
every tensor on import and export, which on multi-GB graphs with external data costs memory and
time proportional to the weights; here cost is proportional to the node count, and initializers
(with their external-data references) pass through untouched.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import MoeExportError


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
    check_external_data(model, p.parent)
    return model


def external_files(model: onnx.ModelProto) -> list[str]:
    """Relative locations of the external-data files the initializers reference."""
    files = []
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in files:
                files.append(loc)
    return files


def _all_tensors(model):
    yield from model.graph.initializer
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def check_external_data(model, base: Path) -> None:
    for loc in external_files(model):
        f = base / loc
        if not f.is_file():
            raise MoeExportError(f"missing external data file {loc!r} (expected next to the model in {base})")


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
        if v is not None and v.type.HasField("tensor_type"):
            return v.type.tensor_type.elem_type
        t = self.initializers.get(name)
        return t.data_type if t is not None else None

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

    def op(self, op_type, inputs, n_out=1, hint=None, **kw):
        outs = [self.name((hint or op_type.lower()) + f"_o{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **kw))
        return outs if n_out > 1 else outs[0]


def write_model_atomic(model: onnx.ModelProto, out: Path, src_dir: Path) -> None:
    """Writes `model` to `out`, with its external-data files valid next to it, or not at all.

    Data files are hard-linked when possible (instant, byte-identical, no extra disk), else
    copied; everything goes to temporary names first and is renamed only once complete.
    """
    out = Path(out)
    out_dir = out.parent if str(out.parent) else Path(".")
    if not out_dir.is_dir():
        raise MoeExportError(f"output directory {out_dir} does not exist")
    staged = []  # (tmp path, final path)
    # Replacing an earlier output may replace the data files that output referenced, no others.
    replaceable = set()
    if out.is_file():
        try:
            replaceable = set(external_files(onnx.load(str(out), load_external_data=False)))
        except Exception:
            pass
    try:
        for loc in external_files(model):
            src, dst = src_dir / loc, out_dir / loc
            if dst.exists() and os.path.samefile(src, dst):
                continue
            if dst.exists() and loc not in replaceable:
                raise MoeExportError(f"{dst} exists and is not the input's external data; "
                                     "choose another output directory")
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            staged.append((tmp, dst))
        fd, tmp_model = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_model, 0o666 & ~umask)  # mkstemp's 0600 is not what a user expects
        staged.append((Path(tmp_model), out))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, dst in staged:
        os.replace(tmp, dst)
