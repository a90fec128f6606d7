"""Triton Python-backend text generation for an ONNX Runtime GenAI model folder (written by
`moe-export triton --backend python`), with the tensor names of Triton's vLLM backend so its
/generate and /generate_stream endpoints and tools work unchanged: input `text_input`, optional
`stream`, `exclude_input_in_output` and `sampling_parameters` (JSON), sampling settings also as
request parameters; output `text_output`. Decoupled: a stream answers token by token.

Needs numpy and onnxruntime-genai in the server's Python, nothing of moe-export. Requests run
concurrently, each with its own generator over the one loaded model, at most `max_concurrent`
at once (moe_export.json); the rest wait in order."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime_genai as og
import triton_python_backend_utils as pb_utils

# what a request may set, and the type its value is read as
SETTINGS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
            "ignore_eos": bool, "stream": bool, "exclude_input_in_output": bool}


class BadRequest(Exception):
    pass


def _flag(v):
    if isinstance(v, str):
        if v.lower() in ("true", "1", "false", "0"):
            return v.lower() in ("true", "1")
        raise ValueError(v)
    return bool(v)


class TritonPythonModel:
    def initialize(self, args):
        home = args["model_repository"]
        with open(os.path.join(home, "moe_export.json")) as f:
            self.meta = json.load(f)
        self.model = og.Model(os.path.join(home, args["model_version"], "model"))
        self.tokenizer = og.Tokenizer(self.model)
        self.context = int(self.meta["context_length"])
        self.pool = ThreadPoolExecutor(int(self.meta.get("max_concurrent", 4)))
        self.final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def _settings(self, request):
        got = {}
        for name in ("stream", "exclude_input_in_output"):
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None and t.as_numpy().size:
                got[name] = bool(t.as_numpy().reshape(-1)[0])
        t = pb_utils.get_input_tensor_by_name(request, "sampling_parameters")
        sources = [request.parameters()]
        if t is not None and t.as_numpy().size:
            sources.append(t.as_numpy().reshape(-1)[0])
        for src in sources:
            if isinstance(src, bytes):
                src = src.decode("utf-8", "replace")
            try:
                params = json.loads(src) if src else {}
            except ValueError:
                raise BadRequest("sampling parameters are not JSON") from None
            for k, v in params.items():
                if k not in SETTINGS:
                    raise BadRequest(f"unknown setting {k!r} (known: {', '.join(SETTINGS)})")
                try:
                    got[k] = _flag(v) if SETTINGS[k] is bool else SETTINGS[k](v)
                except (TypeError, ValueError):
                    raise BadRequest(f"setting {k!r}: {v!r} is not a {SETTINGS[k].__name__}") from None
        if got.get("max_tokens", 1) < 1:
            raise BadRequest("max_tokens must be at least 1")
        if got.get("temperature", 0.0) < 0 or not 0 < got.get("top_p", 1.0) <= 1 or got.get("top_k", 1) < 0:
            raise BadRequest("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
        return got

    def _prompt(self, request):
        t = pb_utils.get_input_tensor_by_name(request, "text_input")
        raw = t.as_numpy().reshape(-1) if t is not None else np.array([])
        if raw.size != 1:
            raise BadRequest(f"text_input holds {raw.size} strings; send one")
        text = raw[0].decode("utf-8", "replace") if isinstance(raw[0], bytes) else str(raw[0])
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32) if text else np.zeros(0, np.int32)
        if ids.size == 0:
            raise BadRequest("text_input is empty")
        return text, ids

    def _generate(self, request, sender):
        try:
            text, ids = self._prompt(request)
            s = self._settings(request)
            new = s.get("max_tokens", int(self.meta.get("default_max_tokens", 16)))
            if ids.size + new > self.context:
                raise BadRequest(f"prompt of {ids.size} tokens + max_tokens {new} exceeds the model's context "
                                 f"of {self.context}")
        except BadRequest as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)),
                        flags=self.final)
            return
        try:
            params = og.GeneratorParams(self.model)
            sample = s.get("temperature", 0.0) > 0
            # a sliding-window layer's cache must hold the window: the generator may be longer than
            # the request, which then stops after its own max_tokens
            length = min(max(ids.size + new, int(self.meta.get("min_length", 0))), self.context)
            options = {"max_length": int(length), "do_sample": sample}
            if sample:
                options.update(temperature=s["temperature"], top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0))
                if "seed" in s:
                    options["random_seed"] = s["seed"]
            if s.get("ignore_eos"):
                options["min_length"] = int(ids.size + new)
            params.set_search_options(**options)
            gen = og.Generator(self.model, params)
            gen.append_tokens(ids.reshape(1, -1))
            stream, pieces, tokens = s.get("stream", False), self.tokenizer.create_stream(), []
            while not gen.is_done() and len(tokens) < new:
                if request.is_cancelled():
                    sender.send(flags=self.final)
                    return
                gen.generate_next_token()
                token = int(gen.get_next_tokens()[0])
                tokens.append(token)
                if stream:
                    piece = pieces.decode(token)
                    if piece:
                        sender.send(self._text(piece))
            if stream:
                sender.send(flags=self.final)
            else:
                out = self.tokenizer.decode(np.asarray(tokens, dtype=np.int32)) if tokens else ""
                if not s.get("exclude_input_in_output", False):
                    out = text + out
                sender.send(self._text(out), flags=self.final)
        except Exception as e:  # the server keeps serving; the client gets the one line
            msg = (str(e).strip().splitlines() or ["failed"])[0][:300]
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("onnxruntime-genai: " + msg)),
                        flags=self.final)

    @staticmethod
    def _text(s):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([s.encode("utf-8")], dtype=np.object_))])

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._generate, request, request.get_response_sender())
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
