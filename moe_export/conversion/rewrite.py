"""Rewriting a graph in memory: every gate the rules find is replaced by one DynamicRouter node
(or its standard-ONNX expansion, portable.py), wired in by its rule, its expert ids kept right
(ids.py), its expert section regrouped by expert (experts.py), and the whole recorded in the
model's metadata (record.py). Re-setting the policy of a converted graph is here too."""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import MoeExportError
from ..model.graph import GraphIndex, NodeBuilder, Surgery, opset_version, share_constants
from ..op.schema import DOMAIN, OP_TYPE, VERSION, node_attributes
from ..op.spec import RouterAttrs, SpecError
from ..rules.base import Gate, Wiring, family, find_gates, fused_after, no_gates_message
from ..rules.fused_moe import flops_per_pair
from .experts import group_by_expert
from .ids import keep_ids_right
from .policy import Policy
from .portable import portable_router
from .probe import attach_probes, build_probe
from .record import Router, Routing
from .stand_in import attach_stand_ins, detach_stand_ins


_FORMS = {"batched": "batched: each (token, slot) gathers its expert's weights",
          "unknown": "not one moe-export can widen"}


def router_attrs(gate: Gate, pol: Policy, group_experts=True) -> RouterAttrs:
    policy, t, r = pol.of(gate.name)
    a = RouterAttrs(**gate.attrs, policy=policy, threshold=t, renormalize=r, min_experts=pol.min_experts,
                    max_experts=pol.max_experts or gate.attrs["k"])
    # More than k slots per token: a per-expert loop takes any number (each expert gathers its
    # own rows), a fused op once its k is raised; a batched section only once regrouped, whose
    # combine is then widened.
    if a.max_experts > a.k and not family(gate.family).wider:
        raise MoeExportError(f"max_experts={a.max_experts} exceeds the graph's k={a.k} at {gate.name}: a "
                             f"{gate.family} gate weighs its own {a.k} picks, and no more")
    if a.max_experts > a.k and not (gate.expert_form in ("loop", "fused")
                                    or (gate.expert_form == "batched" and group_experts)):
        raise MoeExportError(f"max_experts={a.max_experts} exceeds the graph's k={a.k} at {gate.name}: the "
                             f"expert section of this graph ({_FORMS.get(gate.expert_form, gate.expert_form)}) is "
                             "built for k slots per token"
                             + ("; drop --no-group-experts" if gate.expert_form == "batched" else ""))
    try:
        return a.resolved()
    except SpecError as e:
        raise MoeExportError(f"invalid policy arguments: {e}") from None


def _float_type(ix: GraphIndex, gate: Gate):
    t = ix.elem_type(gate.logits) or ix.elem_type(gate.weights)
    return t or TensorProto.FLOAT


def _router(b: NodeBuilder, a: RouterAttrs, logits, bias, ftype, portable, sizes=None):
    """The router's (weights, indices): one DynamicRouter node, or its expansion."""
    if portable:
        return portable_router(b, a, logits, bias, ftype, sizes=sizes)
    w, idx = b.name("weights"), b.name("indices")
    b.nodes.append(helper.make_node(OP_TYPE, [logits] + ([bias] if bias else []) + ([sizes] if sizes else []),
                                    [w, idx], name=b.name("DynamicRouter"), domain=DOMAIN, **node_attributes(a)))
    return w, idx


def rewrite_model(model: onnx.ModelProto, pol: Policy, portable=False, group_experts=True, per_expert_weights=False):
    """Rewrites `model` in memory; returns (model, gates). Raises MoeExportError if nothing matches.
    group_experts: also regroup batched expert sections so dropped slots cost nothing;
    per_expert_weights: with each expert's matrices as initializers of their own (experts.py)."""
    for j, n in enumerate(model.graph.node):  # the passes below track nodes by name
        if not n.name:
            n.name = f"moe_export/node_{j}"
    ix = GraphIndex(model.graph)
    gates, misses = find_gates(model, ix)
    if not gates:
        raise MoeExportError(no_gates_message(model, misses))
    pol.check_layers([g.name for g in gates])
    if portable and opset_version(model) < 13:
        raise MoeExportError(f"--portable needs ONNX opset >= 13, the model has {opset_version(model)}")
    surgery = Surgery(model.graph)
    routers = []
    for gi, gate in enumerate(gates):
        rule, a = family(gate.family), router_attrs(gate, pol, group_experts)
        b = NodeBuilder(f"moe_export/router_{gi}")
        ftype = _float_type(ix, gate)
        logits = gate.logits
        for v in gate.logits_views:  # the views the gate took its scores through, on the logits
            logits = b.op(v.op_type, [logits, *v.input[1:]],
                          **{x.name: helper.get_attribute_value(x) for x in v.attribute})
        sizes, bias = None, gate.bias
        if (probe := pol.probe_of(gate.name)) is not None:
            pb, sizes, probe_bias = build_probe(ix, gate.name, gate.logits, logits, gate.bias, probe, a.num_experts,
                                                ftype, opset_version(model))
            b.nodes += pb.nodes
            b.inits += pb.inits
            bias = gate.bias if portable else probe_bias  # (the expansion takes no bias for none)
        w, idx = _router(b, a, logits, bias, ftype, portable, sizes)
        if gate.cast_to is not None and gate.cast_to != ftype:
            w = b.op("Cast", [w], to=gate.cast_to)
        weights = rule.wire(Wiring(surgery, ix, gate, a, b, logits, w, idx, gate.cast_to or ftype))
        fused = [gate.topk] if rule.fused else fused_after(ix, gate.indices)
        routers.append(Router(gate.name, gate.family, weights, idx, gate.logits, gate.bias, a,
                              flops_per_pair(ix, fused[0]) if fused else None, sizes=sizes))
        if not rule.fused:  # (a fused rule's wire raises its op's k itself)
            for f in fused:  # an in-graph selection scattered into a fused op: it runs as many as kept
                k = next(x for x in f.attribute if x.name == "k")
                k.i = max(k.i, a.width)
            routers[-1].static_only = keep_ids_right(surgery, ix, gate, a, b, idx, opset_version(model))
        # The router goes where the gate's TopK stood: after logits and bias, before any user.
        surgery.insert(b, before=gate.topk.name)
    surgery.apply()
    unfused = [i for i, g in enumerate(gates) if g.expert_form != "fused"]
    kept = {i: "--no-group-experts" for i in unfused}
    if group_experts:
        grouped = group_by_expert(model, [routers[i] for i in unfused], per_expert_weights)
        kept = {i: grouped[j] for j, i in enumerate(unfused)}
    share_constants(model.graph, "moe_export/")
    for i, (g, r) in enumerate(zip(gates, routers)):
        r.expert_section = ("fused com.microsoft MoE op (skips the routes of weight 0 on CPU)" if i not in kept else
                            "grouped by expert" if kept[i] is None else
                            "per-expert loop (a dropped slot matches no expert)" if g.expert_form == "loop" else
                            f"{g.expert_form}, kept as exported: {kept[i]}")
        if r.attrs.max_experts > r.k and g.expert_form == "batched" and kept.get(i) is not None:
            raise MoeExportError(f"max_experts={r.attrs.max_experts} exceeds the graph's k={r.k} at "
                                 f"{g.name}: its batched expert section cannot be regrouped ({kept[i]})")
    Routing(routers, portable, sum(v is None for v in kept.values())).write(model)
    if not portable and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if pol.stand_ins:
        attach_stand_ins(model, pol.stand_ins)
    return model, gates


def already_converted(path, routing: Routing) -> str:
    pols = sorted({r.attrs.policy for r in routing.routers})
    how = ("convert the original model again" if routing.portable else
           f"`moe-export convert {path} -o OUT --repolicy --policy ...` re-sets the policy, "
           f"`moe-export calibrate {path} ...` retunes it")
    return (f"{path} is already converted by moe-export ({len(routing.routers)} router(s), policy "
            f"{'/'.join(pols)}{', portable' if routing.portable else ''}); {how}")


def router_nodes(model, routing: Routing | None = None):
    """The DynamicRouter node of each recorded router, in the same order (None where missing)."""
    routing = routing or Routing.read(model)
    by_out = {n.output[1]: n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN}
    return [by_out.get(r.indices) for r in routing.routers]


def set_attrs(node, a: RouterAttrs) -> None:
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in node_attributes(a).items())


def set_policy(model, pol: Policy):
    """Re-sets the routing policy of a converted model's DynamicRouter nodes, in place. The
    routers' output width stays (the expert sections were built for it): unless `pol` gives one,
    each router's max_experts is that width, as a conversion's default is the graph's k."""
    routing = Routing.read(model)
    if routing is None:
        raise MoeExportError("not written by moe-export convert: no routers to re-set")
    if routing.portable:
        raise MoeExportError("a --portable conversion has no DynamicRouter nodes to re-set; convert the "
                             "original model again")
    pol.check_layers([r.layer for r in routing.routers])
    if pol.probes:
        attach_probes(model, pol.probes)
    if pol.stand_ins is not None:  # (new ones, or {}: none; attached once the routers take their attributes)
        detach_stand_ins(model)
    routing = Routing.read(model)
    for r, node in zip(routing.routers, router_nodes(model, routing)):
        if node is None:
            raise MoeExportError(f"router {r.layer}: its DynamicRouter node is missing from the graph")
        old = r.attrs
        policy, t, rn = pol.of(r.layer)
        try:
            a = r.with_policy(policy, t, rn, min_experts=pol.min_experts,
                              max_experts=pol.max_experts or old.width).resolved()
        except SpecError as e:
            raise MoeExportError(f"invalid policy arguments: {e}") from None
        r.check_drops(a)
        if a.policy == "probe" and not r.sizes:
            pol.probe_of(r.layer)  # (refuses: a layer with no probe attached nor given)
        if a.width != old.width:
            raise MoeExportError(f"--max-experts {a.max_experts} changes {r.layer}'s router width "
                                 f"({old.width} -> {a.width}); convert the original model again for that")
        set_attrs(node, a)
        r.attrs = a
    routing.write(model)
    if pol.stand_ins:
        attach_stand_ins(model, pol.stand_ins)
    return model
