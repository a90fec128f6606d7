"""Regenerates what derives from moe_export/schema.py (the DynamicRouter op's one declaration):
plugins/core/router_attrs.h and the attribute table of docs/dynamic_router.md.

    .venv/bin/python scripts/gen_schema.py
"""
from moe_export.schema import write

if __name__ == "__main__":
    write()
