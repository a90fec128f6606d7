"""Converting a graph: the gates the rules found are replaced by DynamicRouter nodes (rewrite.py)
under a routing Policy (policy.py), wired in by their rules, the expert ids kept right where
slots are dropped (ids.py), expert sections regrouped (experts.py), the routers recorded in the
model's metadata (record.py); write.py does it on files."""
from .write import convert, convert_model, repolicy
from .policy import Policy
from .record import Router, Routing, routers_metadata
from .rewrite import rewrite_model, set_policy

__all__ = ["convert", "convert_model", "repolicy", "Policy", "Router", "Routing", "routers_metadata",
           "rewrite_model", "set_policy"]
