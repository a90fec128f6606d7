"""Fitting policy probe's probes (conversion/probe.py) on calibration data: per layer and expert,
least squares of the log of the expert's output size on the router's input, over the tokens the
static routing sends to it.

The sizes are read out of the graph itself, so every expert-section form is served the same way:
per layer, the expert section up to the routed experts' sum (`section_output`) is cut out of the
graph and run with the router's weights and ids replaced, once per slot with only that slot's
expert kept at weight 1, so the sum is that expert's output (`SectionReader`). Layers before it
route statically, so each layer sees the hidden states it sees in the static model; a run with
every slot checks, on the first batch, that the slots add up to the section's output. Cost: one
run of the graph up to each layer and k + 1 runs of its section (on the first batch; k after) on
at most MAX_TOKENS calibration tokens, and per expert a least-squares solve of the smaller of H
and its token count, cubed."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import MoeExportError
from ..conversion.probe import router_input, section_output
from ..conversion.record import Routing
from ..model.files import Progress
from ..model.graph import (GraphIndex, NodeBuilder, drop_unused_initializers, needed, reads_of,
                           rename_reads)
from .runtime import batches, expose, run_guarded, session_from_proto, take_rows
from .stand_in import fit_stand_in, stand_in_at

RIDGE = 1.0       # the least squares' regularizer, in units of the inputs' mean square
MAX_TOKENS = 32768  # per layer, so the read-out's memory and the fit's time stay bounded at any data size
MIN_TOKENS = 8    # an expert routed fewer tokens than this gets a constant: its mean log size
OUTPUT_BYTES = 1 << 30  # the experts' outputs a stand-in's fit holds per layer: fewer tokens at a large H
_SLOT = "moe_export.probe.slot"


def _slot_nodes(r):
    """Nodes feeding the expert section one slot of the router's: the expert in slot `_SLOT` (an
    input) at weight 1, the others dropped; slot -1 feeds every slot at its weight, the static
    routing. Returns (builder, fed ids, fed weights)."""
    ids, w = f"{_SLOT}.ids", f"{_SLOT}.weights"
    b = NodeBuilder("moe_export/probe_slot")
    every = b.op("Less", [_SLOT, b.const(np.int64(0))])
    one_slot = b.op("Equal", [b.const(np.arange(r.attrs.width, dtype=np.int64)), _SLOT])
    b.nodes.append(helper.make_node("Where", [b.op("Or", [one_slot, every]), r.indices,
                                              b.const(np.int64(r.num_experts))], [ids]))
    one = b.op("Pow", [r.weights, b.const(np.float32(0.0))])  # ones of the weights' type and shape
    b.nodes.append(helper.make_node("Where", [every, r.weights, b.op("Where", [one_slot, one, b.op("Sub", [one, one])])],
                                    [w]))
    return b, ids, w


class SectionReader:
    """Layer r's expert sum `y` computed one slot at a time, on the section alone. The graph is
    cut in two: a prefix, run once per batch, outputs what the section reads from before it (the
    hidden states, shapes, the router's weights and ids) and the router input x; the section (the
    nodes the router's weights and ids reach, up to y) is then run per slot on those. So a layer
    costs one run up to it plus k runs of its section, not k + 1 runs up to it."""

    def __init__(self, model, base_dir, r, ix: GraphIndex):
        self.base_dir = base_dir
        self.unread = (f"policy probe and --stand-in: {r.layer}'s expert outputs cannot be read out of this graph: "
                       "its expert section does not compute the router's slots one at a time")
        x, self.y = router_input(ix, r.logits), section_output(ix, r)
        b, ids, w = _slot_nodes(r)
        nodes = [onnx.NodeProto() for _ in model.graph.node]
        for n, src in zip(nodes, model.graph.node):
            n.CopyFrom(src)
        holder = onnx.GraphProto()
        holder.node.extend(nodes)
        rename_reads(holder, {r.weights: w, r.indices: ids})
        reached, section = {ids, w}, []
        for n in holder.node:
            if reads_of([n]) & reached:
                section.append(n)
                reached.update(o for o in n.output if o)
        section = needed(b.nodes + section, {self.y})
        g = model.graph
        known = {o for n in g.node for o in n.output if o} | {i.name for i in g.input}
        inits = {t.name for t in g.initializer}
        made = {o for n in section for o in n.output if o}
        # (names read inside a Scan or Loop body that the body makes itself are not the graph's)
        self.boundary = sorted((reads_of(section) - made - inits) & known)
        cut = self.boundary + [x, r.weights, r.indices]
        self.prefix = expose(model, cut, f"{_SLOT}.cut")
        pg, outs = self.prefix.graph, self.cut_names(len(cut))
        kept = needed(list(pg.node), outs)
        del pg.node[:]
        pg.node.extend(kept)
        del pg.output[:]
        pg.output.extend(helper.make_empty_tensor_value_info(o) for o in outs)
        drop_unused_initializers(pg)
        self.section_nodes, self.slot_inits, self.model = section, b.inits, model
        self.psess = self.ssess = None

    @staticmethod
    def cut_names(n):
        return [f"{_SLOT}.cut{i}" for i in range(n)]

    def _section_model(self, feeds):
        """The section as a graph of its own, its inputs typed as the prefix's outputs came."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        g = m.graph
        del g.node[:]
        g.node.extend(self.section_nodes)
        del g.input[:]
        g.input.extend(helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(feeds[t].dtype), None)
                       for t in self.boundary)
        g.input.append(helper.make_tensor_value_info(_SLOT, onnx.TensorProto.INT64, []))
        del g.output[:]
        g.output.append(helper.make_empty_tensor_value_info(self.y))
        keep = [v for v in g.value_info if v.name not in set(self.boundary)]
        del g.value_info[:]
        g.value_info.extend(keep)
        g.initializer.extend(self.slot_inits)
        drop_unused_initializers(g)
        return m

    def _session(self, m):
        try:
            return session_from_proto(m, self.base_dir)
        except MoeExportError as e:
            raise MoeExportError(f"{self.unread} ({e})") from None

    def prefix_run(self, rows):
        """(the section's inputs, x, weights, ids) on a batch of the graph's inputs."""
        if self.psess is None:
            self.psess = self._session(self.prefix)
        got = run_guarded(self.psess, self.cut_names(len(self.boundary) + 3), rows)
        return dict(zip(self.boundary, got)), *got[len(self.boundary):]

    def slot(self, cut, slot):
        """The section's output with only `slot` fed (-1: every slot), on prefix_run's inputs."""
        if self.ssess is None:
            self.ssess = self._session(self._section_model(cut))
        return run_guarded(self.ssess, [self.y], cut | {_SLOT: np.array(slot, np.int64)})[0]


def expert_sizes(model, base_dir, feeds, r, progress=None, ix=None, outputs=False, rows=False):
    """Layer r's router inputs x [N, H] (float32), static expert ids [N, k] and each slot's expert
    output norm [N, k] (float64), or with `outputs` the outputs themselves [N, k, H] (float32, on
    at most OUTPUT_BYTES of them), on at most MAX_TOKENS tokens of `feeds`; with `rows`, also each
    token's sequence (its row of input_ids) [N]. ix: the model's GraphIndex, where the caller has
    one."""
    reader = SectionReader(model, base_dir, r, ix or GraphIndex(model.graph))
    k, unread = r.k, reader.unread

    def run(f, *a):
        try:
            return f(*a)
        except MoeExportError:
            raise
        except Exception as e:
            raise MoeExportError(f"{unread} (onnxruntime: {str(e).splitlines()[0][:160]})") from None
    xs, ids, got, seqs, seen, most, first = [], [], [], [], 0, MAX_TOKENS, 0
    for batch in batches(model, feeds):
        cut, x, w, idx = run(reader.prefix_run, batch)
        H = x.shape[-1]
        if outputs:
            most = min(MAX_TOKENS, max(1, OUTPUT_BYTES // (4 * k * H)))
        x, w, idx = x.reshape(-1, H), w.reshape(-1, w.shape[-1])[:, :k], idx.reshape(-1, idx.shape[-1])[:, :k]
        slots = [run(reader.slot, cut, j).reshape(-1, H).astype(np.float64) for j in range(k)]
        if idx.shape[0] != x.shape[0] or slots[0].size != x.size:
            raise MoeExportError(f"{unread} (its router input has {x.shape[0]} rows for {idx.shape[0]} routed tokens "
                                 f"and an expert sum of {slots[0].size // max(H, 1)})")
        if not seen:  # the read-out is this form's only if the slots add up to the section's output
            total = sum(w[:, j:j + 1].astype(np.float64) * slots[j] for j in range(k))
            ref = run(reader.slot, cut, -1).reshape(-1, H).astype(np.float64)
            read = {int(e) for j, y in enumerate(slots) for e in idx[np.abs(y).max(axis=1) > 0, j]}
            # one expert alone reading anything: the first partial sum of a per-expert accumulation,
            # not experts that are dead (zero weights, which the fit takes as never worth keeping)
            if len(read) < 2 <= len(np.unique(idx)) or \
                    not np.allclose(total, ref, rtol=1e-2, atol=1e-3 * max(float(np.abs(ref).max()), 1e-30)):
                raise MoeExportError(unread)
        if rows:
            n = len(batch["input_ids"])
            if x.shape[0] % n:
                raise MoeExportError(f"{r.layer}: {x.shape[0]} tokens read out of {n} sequences; cross-fitting needs "
                                     "each token's sequence")
            seqs.append(first + np.arange(x.shape[0]) // (x.shape[0] // n))
            first += n
        xs.append(x.astype(np.float32))
        ids.append(idx)
        got.append(np.stack(slots, axis=1).astype(np.float32)[:most - seen] if outputs else
                   np.stack([np.linalg.norm(y, axis=1) for y in slots], axis=1))
        seen += x.shape[0]
        if progress is not None:
            progress()
        if seen >= most:
            break
    out = np.concatenate(xs)[:most], np.concatenate(ids)[:most], np.concatenate(got)[:most]
    return out + (np.concatenate(seqs)[:most],) if rows else out


def fit(x, ids, norms, num_experts):
    """(P [H, E], b [E]): per expert e, ridge least squares of log norm on x plus an unshrunk
    bias, over the (token, slot) pairs routed to e; solved in the smaller of the two forms, so an
    expert seeing fewer tokens than H costs their count cubed, not H's."""
    H = x.shape[1]
    logn = np.log(np.maximum(norms, 1e-30))
    ridge = RIDGE * max(float(np.mean(np.square(x, dtype=np.float64))), 1e-12)
    P, b = np.zeros((H, num_experts), np.float32), np.zeros(num_experts, np.float32)
    routed = (ids < num_experts) & (norms > 0)
    fallback = float(logn[routed].mean()) if routed.any() else 0.0
    for e in range(num_experts):
        tok, slot = np.nonzero((ids == e) & (norms > 0))  # (a zero output has no log size to fit)
        if not len(tok) and (ids == e).any():
            b[e] = np.log(1e-30)  # an expert whose output is always zero: dropping it costs nothing
            continue
        if len(tok) < MIN_TOKENS:
            b[e] = float(logn[tok, slot].mean()) if len(tok) else fallback
            continue
        X, y = x[tok].astype(np.float64), logn[tok, slot]
        mx, my = X.mean(axis=0), y.mean()
        X, y = X - mx, y - my  # (centred: the bias is the means' difference, not shrunk)
        if len(tok) >= H:
            p = np.linalg.solve(X.T @ X + ridge * np.eye(H), X.T @ y)
        else:
            p = X.T @ np.linalg.solve(X @ X.T + ridge * np.eye(len(tok)), y)
        P[:, e], b[e] = p, my - mx @ p
    return P, b


def check_width(routing, what="policy probe") -> None:
    """Refuses routers wider than their k (converted or calibrated with --max-experts above k):
    policy probe chooses among the static k, and a stand-in replaces those of them dropped."""
    for r in routing.routers:
        if r.attrs.width > r.k:
            raise MoeExportError(f"{what} works among the graph's k={r.k} experts, and {r.layer}'s router is "
                                 f"{r.attrs.width} wide (--max-experts {r.attrs.width}); calibrate the original model "
                                 "without --max-experts" + (", or use another policy" if what == "policy probe" else ""))


def _spread(n):
    """0 .. n-1 in an order whose every prefix is spread over the whole range (golden-ratio steps)."""
    return np.argsort((np.arange(n) * 0.6180339887498949) % 1.0, kind="stable")


def fit_probes(model, base_dir, feeds, probe=True, stand_in=None, subsets=None):
    """({layer: (P, b)} or None, {layer: (c, G, V)} or None) for every router of the converted
    (static) `model`, fitted on `feeds`: the probes (`probe`), of the log size of what the
    stand-in of rank `stand_in` misses where one is fitted (run/stand_in.py), else of the output's.
    With `subsets` (arrays of rows of `feeds`' input_ids): a list of those, one fitted on each
    subset's sequences, from one read-out."""
    routing = Routing.read(model)
    if probe or stand_in is not None:
        check_width(routing, "policy probe" if probe else "--stand-in")
    for r in routing.routers:
        if r.static_only:
            raise MoeExportError(f"policy probe drops slots: {r.static_only}" if probe else r.static_only)
    fits = [({}, {}) for _ in (subsets if subsets is not None else [None])]
    if subsets is not None:  # read in an order any prefix of which spans the data: the read-out
        # stops at its token cap, and every subset needs its share of what it read
        order = _spread(len(feeds["input_ids"]))
        feeds = take_rows(model, feeds, order)
    n = len(batches(model, feeds))
    what = " and ".join(["the probes of the experts' output sizes"] * probe + ["the experts' stand-ins"] *
                        (stand_in is not None))
    with Progress(f"fitting {what}", len(routing.routers) * n) as bar:
        done = [0]

        def tick():
            done[0] += 1
            bar.update(done[0])
        ix = GraphIndex(model.graph)
        for r in routing.routers:
            x, ids, got, *seq = expert_sizes(model, base_dir, feeds, r, tick, ix, outputs=stand_in is not None,
                                             rows=subsets is not None)
            # the stand-in's residual is taken in place (the outputs are the fit's largest array):
            # in the outputs themselves for the first subset, which is fitted last, in copies for
            # the others
            for i in reversed(range(len(fits))):
                probes, stand_ins = fits[i]
                keep = slice(None) if subsets is None else np.isin(order[seq[0]], subsets[i])
                if subsets is not None and not keep.any():
                    raise MoeExportError(f"{r.layer}: the read-out of the experts' outputs stops at {len(x)} tokens, "
                                         f"{len(np.unique(seq[0]))} sequences, too few to fit on each fold's "
                                         "complement; give shorter sequences, or --check heldout")
                whole = subsets is None or keep.all()
                xs, ids_s = (x, ids) if whole else (x[keep], ids[keep])
                got_s = got if whole and i == 0 else got[keep]
                if stand_in is not None:
                    stand_ins[r.layer] = fit_stand_in(xs, ids_s, got_s, r.num_experts, stand_in)
                    got_s -= stand_in_at(xs, ids_s, stand_ins[r.layer])
                    got_s = np.linalg.norm(got_s, axis=2)
                if probe:
                    probes[r.layer] = fit(xs, ids_s, got_s, r.num_experts)
    fits = [(p if probe else None, s if stand_in is not None else None) for p, s in fits]
    return fits if subsets is not None else fits[0]
