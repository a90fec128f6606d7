"""What a conversion records in the model it writes: each router's tensors and attributes, under
the metadata key `moe_export.routers` (JSON). validate, calibrate, profile, repolicy and the
deployment tools read a converted model through it, never by matching the graph again."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ..errors import MoeExportError
from ..op.schema import node_attributes
from ..op.spec import RouterAttrs

META_KEY = "moe_export.routers"


@dataclass
class Router:
    layer: str                 # the gate's name (its TopK's, else its ids tensor's)
    family: str                # the rule that matched it
    weights: str               # the routing weights the expert section reads
    indices: str               # the router's expert ids (num_experts where a slot is dropped)
    logits: str                # the router's input
    bias: str | None           # its correction bias, if any
    attrs: RouterAttrs         # the DynamicRouter node's attributes
    flops_per_pair: float | None = None  # measured at conversion for fused expert ops
    expert_section: str | None = None  # what the conversion did with the experts, for people
    static_only: str | None = None  # why no policy that drops a slot may be set (keep_ids_right)
    sizes: str | None = None   # policy probe's input (probe.py), where one is attached
    stand_in: dict | None = None  # {"rank", "hidden", "of": the experts' sum, "sum": with the stand-in} (stand_in.py)
    extra: dict = field(default_factory=dict)  # keys another version wrote, kept as they were

    @property
    def num_experts(self) -> int:
        return self.attrs.num_experts

    @property
    def k(self) -> int:
        return self.attrs.k

    def with_policy(self, policy, threshold, renormalize=None, **more) -> RouterAttrs:
        """This router's attributes under another policy (unresolved)."""
        rn = self.attrs.renormalize if renormalize is None else renormalize
        return replace(self.attrs, policy=policy, threshold=float(threshold), renormalize=float(rn), **more)

    def check_drops(self, a: RouterAttrs) -> None:
        """Refuses resolved attributes `a` that can drop a slot where the graph cannot take it, or
        that give a dropped expert's weight to the kept ones where a stand-in takes it."""
        if self.static_only and a.drops:
            raise MoeExportError(self.static_only)
        if self.stand_in and a.drops and a.sums_to_one and a.renormalize != 0:
            raise MoeExportError(f"{self.layer} has a stand-in for its dropped experts, which takes their weight: "
                                 f"its renormalize must be 0 (--renormalize 0), not {a.renormalize:g}")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d["attrs"] = node_attributes(self.attrs)
        for optional in ("flops_per_pair", "expert_section", "static_only", "sizes", "stand_in"):
            if d[optional] is None:
                del d[optional]
        return {**d, **self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "Router":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        attrs = {k: v for k, v in d["attrs"].items() if k in RouterAttrs.__dataclass_fields__}
        return cls(**(known | {"attrs": RouterAttrs(**attrs)}),
                   extra={k: v for k, v in d.items() if k not in cls.__dataclass_fields__})


@dataclass
class Routing:
    """Every router of a converted model, in graph order."""
    routers: list[Router]
    portable: bool = False           # routers in standard ONNX ops: no DynamicRouter nodes to re-set
    grouped_expert_sections: int = 0
    extra: dict = field(default_factory=dict)  # keys another version wrote, kept as they were

    @classmethod
    def read(cls, model) -> "Routing | None":
        """The routing a conversion recorded in `model`, or None for a model moe-export did not write."""
        raw = routers_metadata(model)
        if raw is None:
            return None
        known = {"routers", "portable", "grouped_expert_sections"}
        return cls([Router.from_json(r) for r in raw["routers"]], bool(raw.get("portable")),
                   int(raw.get("grouped_expert_sections", 0)), {k: v for k, v in raw.items() if k not in known})

    def write(self, model) -> None:
        for i, p in enumerate(model.metadata_props):
            if p.key == META_KEY:
                del model.metadata_props[i]
                break
        value = {**self.extra, "portable": self.portable, "routers": [r.to_json() for r in self.routers],
                 "grouped_expert_sections": self.grouped_expert_sections}
        model.metadata_props.add(key=META_KEY, value=json.dumps(value))

    def check_dynamic(self) -> None:
        """Refuses a graph whose routers may not drop a slot (a dynamic policy is about to be set)."""
        reason = next((r.static_only for r in self.routers if r.static_only), None)
        if reason:
            raise MoeExportError(reason)

    def tensors(self, *fields) -> list[str]:
        """The named tensors (e.g. "logits", "bias") of every router, those it has, in order."""
        return [t for r in self.routers for f in fields for t in [getattr(r, f)] if t]


def routers_metadata(model) -> dict | None:
    """The recorded routing as its JSON (the stored format), or None for a graph moe-export did not write."""
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return None
