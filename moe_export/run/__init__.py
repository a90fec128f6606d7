"""Running models: ONNX Runtime sessions and feeds (runtime.py), router statistics (stats.py), and
the commands built on them: validate, calibrate (budget.py for the quality budget), profile."""
