"""Running graphs in ONNX Runtime: sessions with the DynamicRouter library, graphs run with
inner tensors exposed, and the inputs they are fed (random from the input specs, or loaded from
.npy/.npz and checked against the graph)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import MoeExportError
from ..native import custom_op_library
from ..model.graph import GraphIndex

_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
       TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}


def session(model, providers=None, cpu_isa=None, *, custom_ops=True, data_dir=None, **session_options):
    """An onnxruntime.InferenceSession with the DynamicRouter library registered.

    `model` is a path, a ModelProto or serialized bytes. Keyword arguments set SessionOptions
    fields, e.g. intra_op_num_threads=1. `cpu_isa` ("auto", "avx2", "portable") picks the CPU
    kernel's build for this session, as MOE_EXPORT_CPU_ISA does (it sets that variable while the
    session is created, so do not create sessions from several threads with it). `data_dir`:
    where the external data of a model given in memory lives.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    for key, value in session_options.items():
        if not hasattr(so, key):
            raise TypeError(f"onnxruntime.SessionOptions has no field {key!r}")
        setattr(so, key, value)
    if data_dir is not None:
        if hasattr(model, "SerializeToString"):
            from ..model.files import resolved_data

            model, data_dir = resolved_data(model, data_dir)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    if custom_ops:
        so.register_custom_ops_library(custom_op_library())
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = str(model)
    old = os.environ.get("MOE_EXPORT_CPU_ISA")
    if cpu_isa is not None:
        os.environ["MOE_EXPORT_CPU_ISA"] = cpu_isa  # read when the session creates its kernels
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers or ["CPUExecutionProvider"])
    finally:
        if cpu_isa is not None:
            if old is None:
                del os.environ["MOE_EXPORT_CPU_ISA"]
            else:
                os.environ["MOE_EXPORT_CPU_ISA"] = old


def session_from_proto(model, base_dir, custom_ops=True, **opts):
    """session() for an in-memory graph whose external data is in base_dir; a model ORT cannot
    load is one MoeExportError (ORT's own error log silenced)."""
    try:
        return session(model, custom_ops=custom_ops, data_dir=base_dir, log_severity_level=4, **opts)
    except MoeExportError:
        raise
    except Exception as e:
        raise MoeExportError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None


# Tokens per run when sequences are run in batches: the activations (and a graph's own outputs,
# such as [tokens, vocab] logits, which onnxruntime computes whether asked for or not) grow with
# them; 2048 is 16 sequences of 128 tokens.
BATCH_TOKENS = 2048
# Weight copies a batch may make: an original batched expert section (transformers 5.x, which
# validate runs as exported) gathers a weight slab per (token, slot), 13.9 GB for 2 x 512 tokens
# of a 1 GB Qwen3-MoE export.
GATHER_BUDGET = 2 * 2**30


def gathered_per_token(model, routers) -> int:
    """Bytes of expert weights a layer's batched section gathers per token: the slabs of the
    [E, ...] tables GatherND reads, per router, times its slots. 0 where nothing is gathered so."""
    inits = {t.name: t for t in model.graph.initializer}
    slabs = 0
    for n in model.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "GatherND" and n.input else None
        if t is not None and len(t.dims) >= 3:
            slabs += int(np.prod(t.dims[1:])) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if not slabs or not routers:
        return 0
    return slabs // len(routers) * max(r["k"] for r in routers)


def batches(model, feeds, batch=16, token_bytes=0):
    """`feeds` in slices along the batch axis: the graph's batch size where it is fixed (an export
    for a batch of one), else at most `batch` rows, BATCH_TOKENS tokens and (with `token_bytes`,
    what a token gathers) GATHER_BUDGET of weight copies, so that memory stays bounded whatever
    the data's size. A sequence is never split: a causal graph sees it whole."""
    ids = feeds.get("input_ids")
    main = "input_ids" if ids is not None else next(iter(feeds))
    n = feeds[main].shape[_batch_axes(model).get(main, 0)]
    fixed = fixed_batch(model)
    if fixed:
        batch = fixed
    elif ids is not None and ids.ndim == 2 and ids.shape[1]:
        tokens = min(BATCH_TOKENS, GATHER_BUDGET // token_bytes) if token_bytes else BATCH_TOKENS
        batch = max(1, min(batch, tokens // ids.shape[1]))
    return [take_rows(model, feeds, slice(s, s + batch)) for s in range(0, n, batch)]


def run_guarded(sess, names, feeds):
    """sess.run, with an allocation failure said in one line."""
    try:
        return sess.run(names, feeds)
    except Exception as e:
        if "alloc" not in str(e).lower():
            raise
        shape = "x".join(map(str, feeds["input_ids"].shape)) if "input_ids" in feeds else "one batch"
        raise MoeExportError(f"out of memory running the model on a batch of {shape} tokens: "
                             "give shorter sequences in --data") from None


def run_exposed(model, base_dir, tensors, feeds, batch=16, custom_ops=True, progress=None):
    """Runs `model` on `feeds` in batches() and returns for each of `tensors` the list of its
    per-batch values. `progress`: a files.Progress told the batches done."""
    prefix = "moe_export.exposed."
    names = [f"{prefix}{i}" for i in range(len(tensors))]
    sess = session_from_proto(expose(model, tensors, prefix), base_dir, custom_ops=custom_ops)
    parts = batches(model, feeds, batch)
    got = [[] for _ in tensors]
    if progress is not None:
        progress.total = len(parts)
    for j, rows in enumerate(parts):
        values = run_guarded(sess, names, rows)
        for g, r in zip(got, values):
            g.append(r)
        if progress is not None:
            progress.update(j + 1)
    return got


def _batch_axes(model) -> dict:
    """Each input's batch dimension: the one named like a batch, else the first."""
    return {i.name: next((j for j, d in enumerate(i.type.tensor_type.shape.dim) if "batch" in d.dim_param.lower()), 0)
            for i in graph_inputs(model)}


def fixed_batch(model) -> int | None:
    """The batch size a graph was exported for, where its token ids' batch dimension is fixed."""
    inputs = graph_inputs(model)
    main = next((i for i in inputs if i.name == "input_ids"), inputs[0] if inputs else None)
    if main is None or not main.type.tensor_type.HasField("shape"):
        return None
    dims = main.type.tensor_type.shape.dim
    ax = _batch_axes(model)[main.name]
    return dims[ax].dim_value if ax < len(dims) and dims[ax].HasField("dim_value") else None


def take_rows(model, feeds, rows):
    """The sequences `rows` (indices, or a slice) of every input, along each input's batch
    dimension, so [3, batch, seq] position ids split too."""
    axes = _batch_axes(model)
    out = {}
    for k, v in feeds.items():
        ax = axes.get(k, 0)
        out[k] = v[(slice(None),) * ax + (rows,)]
    return out


def token_bounds(model) -> dict:
    """The vocabulary size of each integer input that indexes an embedding."""
    ix = GraphIndex(model.graph)
    ints = [i.name for i in graph_inputs(model) if np.issubdtype(_NP.get(i.type.tensor_type.elem_type, np.float32), np.integer)]
    return {n: b for n in ints if (b := _int_bound(ix, n)) is not None}


def _int_bound(ix: GraphIndex, name, hops=2):
    """Token ids index an embedding: the rows of the first Gather's table (GatherBlockQuantized
    for int4 embeddings) tell the vocab size, looked for through a Cast or Reshape or two."""
    for c in ix.consumers_of(name):
        if c.op_type in ("Gather", "GatherBlockQuantized") and len(c.input) > 1 and c.input[1] == name:
            rows = _rows(ix, c.input[0])
            if rows is None and c.op_type == "GatherBlockQuantized" and len(c.input) > 2:
                rows = _rows(ix, c.input[2])  # its scales: one row per table row
            if rows is not None:
                return rows
    for c in ix.consumers_of(name):
        if hops and c.op_type in ("Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze") and c.input[0] == name:
            found = _int_bound(ix, c.output[0], hops - 1)
            if found is not None:
                return found
    return None


def _rows(ix: GraphIndex, t):
    """The first dimension of an initializer, or of a transposed one (a table tied to the LM head)."""
    if t in ix.initializers:
        return ix.initializers[t].dims[0] if ix.initializers[t].dims else None
    n = ix.producer.get(t)
    if n is not None and n.op_type == "Transpose" and n.input[0] in ix.initializers:
        dims = ix.initializers[n.input[0]].dims
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), list(range(len(dims)))[::-1])
        return dims[perm[0]]
    return None


def _genai_model(base) -> dict:
    """The "model" section of the genai_config.json in folder `base`, or {}."""
    import json

    cfg = Path(base) / "genai_config.json" if base is not None else None
    if cfg is None or not cfg.is_file():
        return {}
    try:
        found = json.loads(cfg.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def cache_dims(model, base=None) -> dict:
    """Sizes of the KV-cache dimensions a graph cannot run without: a sliding-window layer's cache
    capacity (GroupQueryAttention refuses one below its local_window_size) and, from an ONNX
    Runtime GenAI genai_config.json in `base`, the cache's head size."""
    params = {d.dim_param for i in graph_inputs(model) for d in i.type.tensor_type.shape.dim if d.dim_param}
    out = {}
    windows = [a.i for n in model.graph.node if n.op_type == "GroupQueryAttention"
               for a in n.attribute if a.name == "local_window_size" and a.i > 0]
    dec = _genai_model(base).get("decoder") or {}
    window = (dec.get("sliding_window") or {}).get("window_size") or (max(windows) if windows else None)
    for p in params:
        if "sliding" in p.lower() and window:
            out[p] = int(window)
        elif p in ("kv_cache_dim", "head_size") and dec.get("head_size"):
            out[p] = int(dec["head_size"])
    return out


# Metadata of a --with-past export with sliding-window layers: the window, so default inputs pass it.
SLIDING_WINDOW = "moe_export.sliding_window"


def make_feeds(model, dims=None, seed=0, tokens=16, batch=2, past=None, base=None):
    """Random inputs from the graph's input specs, consistent across inputs. A symbolic dim takes
    `dims[name]`, else what cache_dims() says (`base`: the model's folder), else `batch` when
    named like a batch, `past` (default tokens // 2) when named like a cache length
    (past_sequence_length...), the value of its expression when written as one
    ("past_sequence_length + sequence_length"), else `tokens`. So a decoder graph with
    past_key_values runs a prefill of `tokens` after a cached prefix (an empty one for graphs with
    GroupQueryAttention, ONNX Runtime GenAI's); attention_mask is all ones
    over prefix and tokens, position_ids count on from the prefix, and with no prefix (past=0)
    the cache inputs (and recurrent states) are zeros."""
    window = next((int(p.value) for p in model.metadata_props if p.key == SLIDING_WINDOW), 0)
    if window and past is None and tokens // 2 + tokens <= window:
        tokens = window + 2  # a prefix of half the window, then the rest: past the window
    # GroupQueryAttention takes several tokens after a cached prefix only for a batch of one:
    # its graphs get a prefill from an empty cache, as ONNX Runtime GenAI runs them.
    gqa = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    if past is None:
        past = 0 if gqa else tokens // 2
    dims = cache_dims(model, base) | dict(dims or {})
    ix = GraphIndex(model.graph)
    rng = np.random.default_rng(seed)
    params = {d.dim_param for i in graph_inputs(model) for d in i.type.tensor_type.shape.dim if d.dim_param}
    symbolic = set().union(*(_dim_names(p) for p in params)) if params else set()
    if set(dims) - symbolic - params:
        raise MoeExportError(f"--dim {', '.join(sorted(set(dims) - symbolic - params))}: no such input dimension "
                             f"(the graph's symbolic dimensions: {', '.join(sorted(symbolic)) or 'none'})")

    def size(param):
        if param in dims:
            return int(dims[param])
        names = _dim_names(param)
        if names != {param}:  # an expression of other dimensions
            return int(_eval_dim(param, {n: size(n) for n in names}))
        low = param.lower()
        if "total" in low:  # ORT GenAI's attention_mask: cached prefix and new tokens
            return prefix() + (size("sequence_length") if "sequence_length" in symbolic else tokens)
        return batch if "batch" in low else past if ("past" in low or "cache" in low) else tokens

    def prefix():  # the cached length (a sliding window's capacity is not one)
        cands = [q for q in sorted(params) if "past" in q.lower() and "sliding" not in q.lower() and _dim_names(q) == {q}]
        first = next((q for q in cands if q.lower().startswith("past_sequence")), cands[0] if cands else None)
        return size(first) if first else 0

    start = prefix()
    batches = [size(q) for q in params if "batch" in q.lower() and _dim_names(q) == {q}]
    new_tokens = size("sequence_length") if "sequence_length" in symbolic else tokens
    cached = max([start] + [size(q) - new_tokens for q in params if "total" in q.lower() and _dim_names(q) == {q}])
    context = _genai_model(base).get("context_length")
    if isinstance(context, int) and cached + new_tokens > context:  # (past it, ORT's rotary cache errs)
        raise MoeExportError(f"{cached + new_tokens} tokens ({cached} cached, {new_tokens} new) exceed the model's "
                             f"context_length {context} (genai_config.json)")
    if gqa and "sequence_length" in symbolic and cached > 0 and new_tokens > 1 and max(batches, default=1) > 1:
        raise MoeExportError(f"GroupQueryAttention runs {new_tokens} new tokens after a cached prefix of {cached} only "
                             "for a batch of one: add --dim batch_size=1, or --dim sequence_length=1 (a decode step)")
    feeds = {}
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else size(d.dim_param) for d in tt.shape.dim]
        dt = _NP.get(tt.elem_type)
        if dt is None:
            raise MoeExportError(f"input {inp.name!r}: element type {tt.elem_type} is not supported; pass --data")
        name = inp.name.lower()
        if "attention_mask" in name:
            feeds[inp.name] = np.ones(shape, dtype=dt)
        elif "position_ids" in name and np.issubdtype(dt, np.integer) and shape:
            feeds[inp.name] = np.broadcast_to(start + np.arange(shape[-1]), shape).astype(dt)
        elif name.startswith("past") and past == 0 and not np.issubdtype(dt, np.integer):
            feeds[inp.name] = np.zeros(shape, dtype=dt)
        elif np.issubdtype(dt, np.integer):
            hi = _int_bound(ix, inp.name) or 100
            feeds[inp.name] = rng.integers(0, hi, size=shape).astype(dt)
        elif dt is np.bool_:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[inp.name] = (rng.standard_normal(shape) * 2.0).astype(dt)
    return feeds


def _dim_names(param) -> set:
    """The dimension names in a dim_param ("a + b" -> {"a", "b"}; "seq" -> {"seq"}). Only an
    operator set off by spaces makes an expression (exporters write them so; "batch-size" is a name)."""
    import ast
    import re

    if not re.search(r"\s[-+*]\s|\s//\s", param):
        return {param}
    try:
        tree = ast.parse(param, mode="eval")
    except SyntaxError:
        return {param}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return names if names and not isinstance(tree.body, ast.Name) else {param}


def _eval_dim(param, values):
    """A dim_param expression of + - * // and integers over known dimension values."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}

    def ev(n):
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return values[n.id]
        raise MoeExportError(f"input dimension {param!r}: not an expression moe-export can size; pass --dim or --data")
    return ev(ast.parse(param, mode="eval").body)


def graph_inputs(model):
    """The inputs a caller feeds: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def load_inputs(path, model, base=None, notes=None):
    """Inputs for `model` from an .npz of named arrays, or an .npy for a single-input graph
    (token ids [batch, seq], router logits [tokens, E]); checked against the graph's inputs.
    `base`: the model's folder (its genai_config.json sizes a KV cache)."""
    p = Path(path)
    if not p.is_file():
        raise MoeExportError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                data = {k: data[k] for k in data.files}
    except Exception as e:
        raise MoeExportError(f"{p}: cannot read inputs ({type(e).__name__}); expected .npy or .npz") from None
    inputs = graph_inputs(model)
    if not isinstance(data, dict):
        ids = next((i for i in inputs if i.name == "input_ids"), None)
        if len(inputs) != 1 and ids is None:
            raise MoeExportError(f"{p}: an .npy feeds a single-input graph or a decoder's input_ids; this one has "
                                 f"inputs {', '.join(i.name for i in inputs)}: pass an .npz with one array each")
        first = ids or inputs[0]
        dims = first.type.tensor_type.shape.dim
        if data.size == 0:
            raise MoeExportError(f"{p}: no data (shape {list(data.shape)}): give at least one row of at least one token")
        if data.ndim == len(dims) - 1:  # one sequence of token ids: a batch of one
            data = data[None]
        if ids is not None and len(inputs) > 1:
            # A decoder with a KV cache: a prefill from an empty cache, the mask all ones.
            sizes = {d.dim_param: n for d, n in zip(dims, data.shape) if d.dim_param}
            data = make_feeds(model, dims=sizes, past=0, base=base) | {"input_ids": data}
        else:
            data = {first.name: data}
    return check_inputs(data, model, str(p), notes)


def check_inputs(feeds, model, where="--data", notes=None):
    """Names, element kinds, ranks and sizes of `feeds` against the graph's inputs, and token ids
    against the vocabulary; arrays cast to the graph's element types. One-line errors. A graph
    exported for a fixed batch size takes any multiple of it (batches() splits the rows), said in
    `notes` (a list) when given."""
    inputs = {i.name: i for i in graph_inputs(model)}
    axes, vocabs, split = _batch_axes(model), token_bounds(model), None
    unknown, missing = sorted(set(feeds) - set(inputs)), sorted(set(inputs) - set(feeds))
    if unknown or missing:
        raise MoeExportError(f"{where}: inputs do not match the graph's ({', '.join(inputs)}): "
                             + "; ".join(x for x in (unknown and f"unknown {', '.join(unknown)}",
                                                     missing and f"missing {', '.join(missing)}") if x))
    out = {}
    for name, arr in feeds.items():
        tt = inputs[name].type.tensor_type
        want = _NP.get(tt.elem_type)
        arr = np.asarray(arr)
        if want is None:
            raise MoeExportError(f"input {name!r}: element type {tt.elem_type} is not supported")
        kind = lambda d: "bool" if d == np.bool_ else "integer" if np.issubdtype(d, np.integer) else \
            "float" if np.issubdtype(d, np.floating) else str(d)
        if kind(arr.dtype) != kind(np.dtype(want)):
            raise MoeExportError(f"{where}: input {name!r} is {arr.dtype}, the graph wants {np.dtype(want).name}")
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if arr.ndim != len(dims):
                raise MoeExportError(f"{where}: input {name!r} has rank {arr.ndim}, the graph wants {len(dims)}")
            for j, d in enumerate(dims):
                if not d.HasField("dim_value") or arr.shape[j] == d.dim_value:
                    continue
                if j == axes[name] and arr.shape[j] % d.dim_value == 0 and arr.shape[j]:
                    split = (d.dim_value, arr.shape[j])
                    continue
                raise MoeExportError(f"{where}: input {name!r} has shape {list(arr.shape)}, "
                                     f"dimension {j} must be {d.dim_value}")
        if arr.size == 0 and not is_cache(name, tt):
            raise MoeExportError(f"{where}: input {name!r} is empty (shape {list(arr.shape)}): give at least one "
                                 "row of at least one token")
        vocab = vocabs.get(name) if np.issubdtype(arr.dtype, np.integer) else None
        if arr.size and (vocab is not None or name == "input_ids"):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or (vocab is not None and hi >= vocab):
                bad = lo if lo < 0 else hi
                pad = " (-100 is Hugging Face's label padding: strip it, or pad with a real token id)" \
                    if bad == -100 else ""
                raise MoeExportError(f"{where}: token ids must be in [0, {vocab or 'vocab'}); input {name!r} holds "
                                     f"{bad}{pad}")
        out[name] = arr.astype(want, copy=False)
    if split and notes is not None:
        notes.append(f"the graph takes batches of {split[0]}: the {split[1]} rows of {where} run as "
                     f"{split[1] // split[0]} batches")
    return out


def is_cache(name, tt):
    """A KV-cache input, empty at a prefill (past length 0)."""
    return "past" in name.lower() or any("past" in d.dim_param.lower() for d in tt.shape.dim)


def expose(model, tensors, prefix):
    """A copy of `model` with `tensors` also as graph outputs, named prefix + position."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(tensors):
        m.graph.node.append(helper.make_node("Identity", [t], [f"{prefix}{i}"], name=f"moe_export/expose_{prefix}{i}"))
        m.graph.output.append(helper.make_empty_tensor_value_info(f"{prefix}{i}"))
    return m


def present_of(past):
    """The output a cache input is fed from: past_key_values.* (torch exports) or past.* (GenAI
    builder folders) -> present.*."""
    return "present" + (past[len("past_key_values"):] if past.startswith("past_key_values") else past[len("past"):])


def greedy(sess, prompt, new_tokens):
    """Greedy decoding through a decoder graph with a KV cache (`export --with-past`'s inputs and
    outputs): a prefill of `prompt` ([batch, n] token ids) from an empty cache, then one token at
    a time, each step's present.* fed back as past_key_values.*. Returns [batch, n + new_tokens]."""
    ids = np.asarray(prompt, dtype=np.int64)
    B = ids.shape[0]
    specs = {i.name: i for i in sess.get_inputs()}
    past = {n: np.zeros([B if j == 0 else 0 if j == 2 else d for j, d in enumerate(i.shape)], np.float32)
            for n, i in specs.items() if n.startswith("past_key_values.")}
    outs = [o.name for o in sess.get_outputs()]
    seq, step, total = ids, ids, 0
    for _ in range(new_tokens):
        total += step.shape[1]
        feeds = {"input_ids": step, "attention_mask": np.ones((B, total), np.int64), **past}
        if "position_ids" in specs:
            feeds["position_ids"] = np.broadcast_to(np.arange(total - step.shape[1], total), step.shape).astype(np.int64)
        got = dict(zip(outs, sess.run(outs, feeds)))
        step = got["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        seq = np.concatenate([seq, step], axis=1)
        past = {n: got[present_of(n)] for n in past}
    return seq
