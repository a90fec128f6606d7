"""A model a command reads: an .onnx file or an ONNX Runtime GenAI folder, resolved and loaded
once, then handed down (the graph, its directory, the files no output may replace)."""
from __future__ import annotations

from pathlib import Path

import onnx

from . import genai
from .files import model_files
from .graph import load_model


class Source:
    def __init__(self, path):
        self.path = Path(path)
        self._graph = self._model = None

    @property
    def is_folder(self) -> bool:
        return genai.is_folder(self.path)

    @property
    def graph(self) -> Path:
        """The .onnx file: a folder's decoder, else the path (one-line errors for neither)."""
        if self._graph is None:
            self._graph = genai.resolve(self.path)
        return self._graph

    @classmethod
    def of(cls, x) -> "Source":
        return x if isinstance(x, Source) else cls(x)

    @property
    def model(self) -> onnx.ModelProto:
        """The graph (external weights stay on disk), loaded on first use. Rewrites take copy()."""
        if self._model is None:
            self._model = load_model(self.graph)
        return self._model

    @property
    def base_dir(self) -> Path:
        """Where the graph's external data lives."""
        return self.graph.parent

    def copy(self) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        return m

    def files(self) -> list[Path]:
        """The graph and every data file it references: what no output may replace. Read off the
        file, not `model`: loading takes small external tensors into the graph."""
        self.model  # one-line errors for a bad file first
        return model_files(self.graph)

    def __str__(self):
        return str(self.path)
