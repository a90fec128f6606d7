"""The routing a conversion writes: one policy for every layer, or per-layer choices (calibrate)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoeExportError


@dataclass
class Policy:
    policy: str = "static"
    threshold: float = 0.0
    min_experts: int = 1
    max_experts: int | None = None  # None: the gate's own k
    # per-gate overrides written by calibrate: {gate name: threshold, or (policy, threshold[,
    # renormalize])}
    per_layer: dict | None = None
    renormalize: float = 1.0

    def of(self, layer) -> tuple:
        """(policy, threshold, renormalize) of one layer."""
        v = (self.per_layer or {}).get(layer, self.threshold)
        if not isinstance(v, (tuple, list)):
            return self.policy, float(v), self.renormalize
        return v[0], float(v[1]), float(v[2]) if len(v) > 2 else self.renormalize

    def check_layers(self, layers) -> None:
        """Refuses per-layer choices for layers the graph does not have (a misspelt name would
        otherwise route that layer by the global threshold, silently)."""
        unknown = sorted(set(self.per_layer or ()) - set(layers))
        if unknown:
            raise MoeExportError(f"per_layer names {', '.join(map(repr, unknown))}, not a MoE layer of this graph "
                                 f"(its layers: {', '.join(layers)})")
