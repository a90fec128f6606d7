"""Regenerates what derives from moe_export/op/schema.py (the DynamicRouter op's one declaration):
plugins/core/router_attrs.h and the attribute table of docs/dynamic_router.md.

    .venv/bin/python scripts/gen_schema.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moe_export, not an installed one
from moe_export.op.schema import write  # noqa: E402

if __name__ == "__main__":
    write()
