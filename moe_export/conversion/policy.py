"""The routing a conversion writes: one policy for every layer, or per-layer choices (calibrate)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from ..errors import MoeExportError, UsageError
from ..op.spec import POLICIES
from .stand_in import check_stand_in


@dataclass
class Policy:
    policy: str = "static"
    threshold: float | None = None  # required by a dynamic policy (unless per_layer gives them all)
    min_experts: int = 1
    max_experts: int | None = None  # None: the gate's own k
    # per-gate overrides written by calibrate: {gate name: threshold, or (policy, threshold[,
    # renormalize])}
    per_layer: dict | None = None
    renormalize: float = 1.0
    # policy probe's fitted probes, {gate name: (P [H, E], b [E])} (calibrate; probe.py)
    probes: dict | None = None
    # stand-ins for dropped experts, {gate name: (c [E, H], G [E, H, r], V [E, r, H])} (calibrate
    # --stand-in; stand_in.py); re-setting a converted model: None keeps those it has, {} removes them
    stand_ins: dict | None = None

    def __post_init__(self):
        """The Python API's arguments held to what the command line accepts, in its words: a
        value that would otherwise be cast or replaced silently (max_experts 0 or 2.5) is refused."""
        if self.policy not in POLICIES:
            raise UsageError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.threshold is None and (self.policy == "static" or not self.per_layer):
            if self.policy != "static":
                raise UsageError(f"policy {self.policy} needs a threshold")
            self.threshold = 0.0
        if self.threshold is not None:  # (None: every layer's is in per_layer; of() holds it to that)
            self.threshold = _number("threshold", self.threshold)
        self.renormalize = _number("renormalize", self.renormalize)
        self.min_experts = _count("min_experts", self.min_experts)
        if self.probes is not None:
            if not isinstance(self.probes, dict):
                raise UsageError("probes must be a dict {layer: (P [H, E], b [E])}, got "
                                 f"{type(self.probes).__name__}")
            self.probes = {layer: _probe(layer, v) for layer, v in self.probes.items()}
        if self.stand_ins is not None:
            if not isinstance(self.stand_ins, dict):
                raise UsageError("stand_ins must be a dict {layer: (c [E, H], G [E, H, r], V [E, r, H])}, got "
                                 f"{type(self.stand_ins).__name__}")
            self.stand_ins = {layer: check_stand_in(layer, v) for layer, v in self.stand_ins.items()}
        if self.max_experts is not None:
            self.max_experts = _count("max_experts", self.max_experts)

    def of(self, layer) -> tuple:
        """(policy, threshold, renormalize) of one layer."""
        v = (self.per_layer or {}).get(layer, self.threshold)
        if v is None:
            raise UsageError(f"no threshold for layer {layer}: per_layer leaves it out and the policy has none")
        if not isinstance(v, (tuple, list)):
            return self.policy, float(v), self.renormalize
        return v[0], float(v[1]), float(v[2]) if len(v) > 2 else self.renormalize

    def probe_of(self, layer):
        """The probe (P, b) of a layer that policy probe routes, else None; refused where missing."""
        if self.of(layer)[0] != "probe":
            return None
        probe = (self.probes or {}).get(layer)
        if probe is None:
            raise MoeExportError(f"policy probe at {layer} needs a probe fitted on data: `moe-export calibrate "
                                 "--policy probe` fits it")
        return probe

    def check_layers(self, layers) -> None:
        """Refuses per-layer choices for layers the graph does not have (a misspelt name would
        otherwise route that layer by the global threshold, silently)."""
        for what, names in (("per_layer", self.per_layer), ("probes", self.probes), ("stand_ins", self.stand_ins)):
            unknown = sorted(set(names or ()) - set(layers))
            if unknown:
                raise MoeExportError(f"{what} names {', '.join(map(repr, unknown))}, not a MoE layer of this graph "
                                     f"(its layers: {', '.join(layers)})")


def _number(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (Real, str)):
        raise UsageError(f"{name} must be a number, got {v!r}")
    try:
        x = float(v)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise UsageError(f"{name} must be finite, got {v!r}")
    return x


def _probe(layer, v) -> tuple:
    """(P [H, E], b [E]) as float32 arrays, finite, their E alike."""
    try:
        P, b = (np.asarray(x, dtype=np.float32) for x in v)
    except (TypeError, ValueError):
        raise UsageError(f"probes[{layer!r}] must be a pair (P [H, E], b [E]) of numbers") from None
    if P.ndim != 2 or b.ndim != 1 or P.shape[1] != b.size:
        raise UsageError(f"probes[{layer!r}] must be (P [H, E], b [E]), got shapes {P.shape} and {b.shape}")
    if not (np.isfinite(P).all() and np.isfinite(b).all()):
        raise UsageError(f"probes[{layer!r}] must be finite")
    return P, b


def _count(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
        raise UsageError(f"{name} must be a whole number >= 1 (max_experts None: the graph's k), got {v!r}")
    return int(v)
