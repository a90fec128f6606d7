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
from ..conversion.rewrite import rewrite_model, set_policy
from ..op.schema import ATTRIBUTES, SpecError
from ..op.spec import RouterAttrs, policy_counts, policy_view
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
    return m


def router_logits(model, base_dir, feeds, batch=16, progress=None) -> list[tuple]:
    """Per router of the converted `model` (static_copy): ([tokens, E] float32 logits, its bias or
    None) on `feeds`."""
    routing = Routing.read(model)
    tensors = routing.tensors("logits", "bias")
    got = dict(zip(tensors, run_exposed(model, base_dir, tensors, feeds, batch, progress=progress)))
    return [router_inputs(got, r) for r in routing.routers]


def router_inputs(got: dict, r: Router) -> tuple:
    """A router's ([tokens, E] float32 logits, [E] bias or None) from the batches of a run that
    exposed them ({tensor: [per-batch arrays]})."""
    E = r.num_experts
    logits = np.concatenate([c.reshape(-1, E) for c in got[r.logits]]).astype(np.float32)
    return logits, got[r.bias][0].reshape(E).astype(np.float32) if r.bias else None


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

    def __init__(self, router: Router, policy, logits, bias, min_experts=1, max_experts=None):
        gate = {k: v for k, v in asdict(router.attrs).items() if k not in _ROUTING}
        try:
            self.attrs = RouterAttrs(**gate, policy=policy, threshold=0.5, min_experts=min_experts,
                                     max_experts=max_experts or router.attrs.max_experts or router.k).resolved()
        except SpecError as e:
            raise MoeExportError(f"invalid policy arguments: {e}") from None
        self.view = policy_view(logits, bias, **asdict(self.attrs))

    def mean(self, t) -> float:
        self.attrs.threshold = float(t)
        return float(policy_counts(self.attrs, self.view)[0].mean())

    @property
    def hi(self):
        return 0.999 if self.attrs.policy == "entropy" else 1.0

    @property
    def increasing(self):  # more mass wanted -> more experts; ratio and entropy go the other way
        return self.attrs.policy == "top-p"

    def solve(self, target):
        """(threshold, mean experts per token) closest to `target`."""
        return solve(self.mean, target, self.increasing, hi=self.hi)


def fewer(reduction: float) -> str:
    """A saving for people: "24.5% fewer", or "59.4% more" where hard tokens took more than k."""
    return f"{100 * reduction:.1f}% fewer" if reduction >= 0 else f"{-100 * reduction:.1f}% more"
