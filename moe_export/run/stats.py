"""Router statistics on data, shared by calibrate, the quality-budget search, profile and validate:
each router's logits collected from a run, thresholds solved for a mean number of experts per
token, and routed (token, expert) pairs counted."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import onnx

from ..errors import MoeExportError
from ..conversion.policy import Policy
from ..conversion.record import Router, Routing
from ..conversion.rewrite import rewrite_model, router_nodes, set_policy
from ..conversion.stand_in import detach_stand_ins
from ..op.schema import ATTRIBUTES, SpecError
from ..op.spec import RouterAttrs, policy_counts, policy_view, probe_keep, probe_signals
from .runtime import run_exposed

_ROUTING = tuple(a.name for a in ATTRIBUTES if a.routing)  # what a policy sets, not the gate


def static_copy(model: onnx.ModelProto, max_experts=None) -> onnx.ModelProto:
    """A converted copy of `model` routing statically: an original is converted in memory (its
    regrouped experts take memory in proportion to the tokens, where a batched export gathers a
    weight matrix per (token, slot): 24 GB for 32 x 128 tokens of a 1 GB model), a converted one
    has its routers set to static. `max_experts`: the routers' width (None: as they are)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    routing = Routing.read(m)
    if routing is None:
        rewrite_model(m, Policy("static", max_experts=max_experts))
    elif routing.portable:
        raise MoeExportError("a --portable conversion cannot be retuned; calibrate the original model")
    else:
        set_policy(m, Policy("static", max_experts=max_experts))
        detach_stand_ins(m)  # (they add nothing where nothing drops, and a read-out must not see them)
    return m


def router_logits(model, base_dir, feeds, batch=16, progress=None) -> list[tuple]:
    """Per router of the converted `model` (static_copy): ([tokens, E] float32 logits, its bias or
    None, its probe's [tokens, E] sizes or None) on `feeds`."""
    routing = Routing.read(model)
    tensors = router_tensors(model, routing)
    got = dict(zip(tensors, run_exposed(model, base_dir, tensors, feeds, batch, progress=progress)))
    return [router_inputs(got, r, lg) for r, lg in zip(routing.routers, logits_in(model, routing))]


def logits_in(model, routing: Routing) -> list[str]:
    """The logits each router node reads: the gate's logits through the views it took them by (a
    column slice, in Inkling's gate), which only the node has (a portable router: the gate's)."""
    return [n.input[0] if n is not None else r.logits for r, n in zip(routing.routers, router_nodes(model, routing))]


def router_tensors(model, routing: Routing) -> list[str]:
    """What router_inputs reads of each router, to expose in a run."""
    return [t for r, lg in zip(routing.routers, logits_in(model, routing)) for t in (lg, r.bias, r.sizes) if t]


def router_inputs(got: dict, r: Router, logits: str) -> tuple:
    """A router's ([tokens, E] float32 logits, [E] bias or None, [tokens, E] sizes or None) from
    the batches of a run that exposed router_tensors ({tensor: [per-batch arrays]}); `logits`:
    its logits_in."""
    E = r.num_experts
    rows = lambda t: np.concatenate([c.reshape(-1, E) for c in got[t]]).astype(np.float32)
    return (rows(logits), got[r.bias][0].reshape(E).astype(np.float32) if r.bias else None,
            rows(r.sizes) if r.sizes else None)


def routed_pairs(indices: np.ndarray, num_experts: int) -> int:
    """(token, expert) pairs a router's ids route (a dropped slot's id is num_experts)."""
    return int((np.asarray(indices) < num_experts).sum())


def solve(mean_count, target, increasing, lo=0.0, hi=1.0, iters=40):
    """(threshold, mean count) with the mean count closest to `target`, by bisection (counts move
    monotonically in the threshold: up with it when `increasing`)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        c = mean_count(mid)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (mid, c)
        if (c < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


class Thresholds:
    """One router's logits under one dynamic policy: the mean experts per token at a threshold,
    and the threshold giving a target mean."""

    def __init__(self, router: Router, policy, logits, bias, min_experts=1, max_experts=None, sizes=None):
        gate = {k: v for k, v in asdict(router.attrs).items() if k not in _ROUTING}
        try:
            self.attrs = RouterAttrs(**gate, policy=policy, threshold=0.5, min_experts=min_experts,
                                     max_experts=max_experts or router.attrs.max_experts or router.k).resolved()
        except SpecError as e:
            raise MoeExportError(f"invalid policy arguments: {e}") from None
        if policy == "probe":
            if sizes is None:
                raise MoeExportError(f"policy probe at {router.layer}: the router has no probe attached")
            self.signal = probe_signals(logits, bias, sizes, **asdict(self.attrs))
        else:
            self.view = policy_view(logits, bias, **asdict(self.attrs))

    def mean(self, t) -> float:
        self.attrs.threshold = float(t)
        if self.attrs.policy == "probe":
            return float(probe_keep(self.attrs, self.signal)[0].sum(axis=1).mean())
        return float(policy_counts(self.attrs, self.view)[0].mean())

    @property
    def hi(self):
        if self.attrs.policy == "probe":  # (its threshold is in output-size units: any value >= 0)
            top = self.signal[np.isfinite(self.signal)]
            return float(top.max()) * 1.001 + 1e-30 if top.size else 1.0
        return 0.999 if self.attrs.policy == "entropy" else 1.0

    @property
    def increasing(self):  # more mass wanted -> more experts; the others go the other way
        return self.attrs.policy == "top-p"

    def solve(self, target):
        """(threshold, mean experts per token) closest to `target`."""
        return solve(self.mean, target, self.increasing, hi=self.hi)


def fewer(reduction: float) -> str:
    """A saving for people: "24.5% fewer", or "59.4% more" where hard tokens took more than k."""
    return f"{100 * reduction:.1f}% fewer" if reduction >= 0 else f"{-100 * reduction:.1f}% more"
