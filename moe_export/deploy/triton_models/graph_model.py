"""Triton Python-backend model for an ONNX graph (written by `moe-export triton --backend python`).

Needs numpy and onnxruntime in the server's Python, nothing of moe-export: what it must know
about the graph (the token inputs' vocabulary, which dims are shared, the custom-op library
beside this file's folder) is in moe_export.json, written with it. Each request is checked on
its own, so a bad one is answered 400 with one line while its neighbours in a dynamic batch run;
valid requests with the same trailing shapes run as one onnxruntime call."""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class BadRequest(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        home = args["model_repository"]
        with open(os.path.join(home, "moe_export.json")) as f:
            self.meta = json.load(f)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.meta.get("intra_op_threads", 0))
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False  # requests vary in size: the arena would keep the largest
        if self.meta.get("op_library"):
            opts.register_custom_ops_library(os.path.join(home, self.meta["op_library"]))
        path = os.path.join(home, args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batched = self.meta["max_batch_size"] > 0

    def _feeds(self, request):
        feeds, seen = {}, {}
        for spec in self.meta["inputs"]:
            t = pb_utils.get_input_tensor_by_name(request, spec["name"])
            if t is None:
                raise BadRequest(f"input {spec['name']!r} is missing")
            a = t.as_numpy()
            if a.size == 0 and not spec["cache"]:
                raise BadRequest(f"input {spec['name']!r} is empty (shape {list(a.shape)})")
            if a.ndim != len(spec["dims"]):
                raise BadRequest(f"input {spec['name']!r} has rank {a.ndim}, the model wants {len(spec['dims'])}")
            for j, d in enumerate(spec["dims"]):
                if isinstance(d, int) and d >= 0 and a.shape[j] != d:
                    raise BadRequest(f"input {spec['name']!r} has shape {list(a.shape)}: dimension {j} must be {d}")
                if isinstance(d, str) and d:
                    first = seen.setdefault(d, (spec["name"], a.shape[j]))
                    if first[1] != a.shape[j]:
                        raise BadRequest(f"input {spec['name']!r} has shape {list(a.shape)}: dimension {j} ({d}) "
                                         f"is {first[1]} in {first[0]!r}")
            vocab = spec.get("vocab")
            if vocab and a.size and (a.min() < 0 or a.max() >= vocab):
                bad = int(a.min()) if a.min() < 0 else int(a.max())
                raise BadRequest(f"token ids must be in [0, {vocab}); input {spec['name']!r} holds {bad}")
            feeds[spec["name"]] = a
        return feeds

    def _run(self, feeds):
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

    def _respond(self, outs):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v))
                                                          for k, v in outs.items()])

    @staticmethod
    def _error(message):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except BadRequest as e:
                responses[i] = self._error(str(e))
                continue
            key = tuple((k, v.shape[1:] if self.batched else v.shape) for k, v in feeds.items())
            groups.setdefault(key if self.batched else i, []).append((i, feeds))
        for members in groups.values():
            if len(members) > 1:
                rows = [len(next(iter(f.values()))) for _, f in members]
                try:
                    outs = self._run({k: np.concatenate([f[k] for _, f in members]) for k in members[0][1]})
                except Exception:
                    outs = None  # one of them fails in onnxruntime: run each alone to answer each
                if outs is not None:
                    at = np.cumsum([0] + rows)
                    for (i, _), a, b in zip(members, at[:-1], at[1:]):
                        responses[i] = self._respond({k: v[a:b] for k, v in outs.items()})
                    continue
            for i, feeds in members:
                try:
                    responses[i] = self._respond(self._run(feeds))
                except Exception as e:
                    responses[i] = self._error("onnxruntime: " + (str(e).strip().splitlines() or ["failed"])[0][:300])
        return responses
