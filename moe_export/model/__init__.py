"""Model files: the ONNX graph and its surgery (graph.py), outputs written all-or-nothing and the
files a model references (files.py), ONNX Runtime GenAI folders (genai.py), a model source loaded
once (source.py), and the torch export of transformers checkpoints (export.py)."""
