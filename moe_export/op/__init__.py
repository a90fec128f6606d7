"""The DynamicRouter op: its one declaration (schema.py) and its numpy reference (spec.py)."""
