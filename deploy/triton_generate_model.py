"""Triton python-backend model: text generation from the decoder next to it, for Triton's
generate extension (``POST v2/models/NAME/generate`` and ``generate_stream``).

Copied as ``model.py`` by ``gpcl-trt triton`` for a decoder exported with past. Decoupled: the
KV cache stays in this process, in gpcl_trt's in-flight batcher (one background thread owns the
running batch; a request joins it at the next step and leaves when done; beyond the slots it
waits). Request fields are those of TensorRT-LLM's and vLLM's Triton backends: text_input,
max_tokens, stream, temperature, top_k, top_p, random_seed, stop_words, end_id, pad_id; the
answer is text_output (pieces when ``stream`` is true, else the whole text in one response).
Config parameters:
  onnx_file           the decoder in the version directory (model.onnx)
  gpcl_python_path    site directories (os.pathsep separated) with gpcl_trt, onnxruntime and
                      transformers; the stub runs with the server's own Python
  slots               requests decoded together (the in-flight batch)
  default_max_tokens  max_tokens when a request gives none
  intra_op_threads    ONNX Runtime threads (0: its default)
The tokenizer, config.json and generation_config.json lie in the version directory.
"""

import json
import os
import site
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FIELDS = ("max_tokens", "stream", "temperature", "top_k", "top_p", "random_seed", "end_id", "pad_id")


def _error(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise ValueError(f"{name} must be one value, got {arr.size}")
    return arr[0].item()


def _strings(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for entry in params.get("gpcl_python_path", "").split(os.pathsep):
            if entry and entry not in sys.path:
                site.addsitedir(entry)  # appended, and its .pth files run (gpcl_trt's editable install)
        from gpcl_trt.generate.api import model_settings
        from gpcl_trt.generate.detok import load_tokenizer
        from gpcl_trt.generate.inflight import InflightBatcher
        from gpcl_trt.generate.loop import Sampling
        from gpcl_trt.generate.runtimes import OrtRuntime

        self.Sampling = Sampling
        vdir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("intra_op_threads", "0") or 0) or None
        runtime = OrtRuntime(os.path.join(vdir, params.get("onnx_file", "model.onnx")), threads=threads)
        self.tokenizer = load_tokenizer(vdir)
        settings = model_settings(Path(vdir), self.tokenizer)
        self.default_max_tokens = int(params.get("default_max_tokens", "16") or 16)
        self.batcher = InflightBatcher(runtime, self.tokenizer, settings, capacity=int(params.get("slots", "8") or 8))
        self.logger = pb_utils.Logger

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            texts = _strings(request, "text_input")
            if len(texts) != 1:
                raise ValueError(f"text_input must be one string, got {len(texts)}")
            values = {name: _scalar(request, name) for name in FIELDS}
            max_tokens = values["max_tokens"] if values["max_tokens"] is not None else self.default_max_tokens
            temperature = float(values["temperature"] or 0.0)
            sampling = self.Sampling(
                temperature=temperature,
                top_k=int(values["top_k"] or 0),
                top_p=float(values["top_p"]) if values["top_p"] is not None and temperature > 0 else 1.0,
                seed=int(values["random_seed"] or 0),
            )
            stream = bool(values["stream"])
            eos = None if values["end_id"] is None else [int(values["end_id"])]
            if sampling.temperature == 0:  # greedy: top_k / top_p have no effect (clients send defaults)
                sampling = self.Sampling(seed=sampling.seed)
        except Exception as exc:
            sender.send(
                pb_utils.InferenceResponse(error=_error(str(exc))), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
            return
        whole = []

        def emit(piece, final, finish, error):
            if error is not None:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if not stream:
                whole.append(piece)
                if not final:
                    return
                piece = "".join(whole)
            elif not final and not piece:
                return
            out = pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_))
            response = pb_utils.InferenceResponse(output_tensors=[out])
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

        def cancelled():
            if not sender.is_cancelled():
                return False
            if not gone:
                gone.append(True)
                self.logger.log_info("gpcl_trt generate: a request was cancelled; its slot is freed")
            return True

        gone = []

        try:
            self.batcher.submit(
                texts[0],
                emit,
                max_tokens=int(max_tokens),
                sampling=sampling,
                stop=[s for s in _strings(request, "stop_words") if s],
                eos_ids=eos,
                cancelled=cancelled,
            )
        except Exception as exc:  # bad input: this request's error, the others go on
            sender.send(
                pb_utils.InferenceResponse(error=_error(str(exc))), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None  # decoupled: the batcher's thread answers through each response sender

    def finalize(self):
        self.batcher.close()
