"""Triton python-backend model: text generation from the decoder next to it, for Triton's
generate extension (``POST v2/models/NAME/generate`` and ``generate_stream``).

Copied as ``model.py`` by ``gpcl-trt triton`` for a decoder exported with past. Decoupled: the
KV cache stays in this process, in gpcl_trt's in-flight batcher (one background thread owns the
running batch; a request joins it at the next step and leaves when done; beyond the slots it
waits). Request fields are those of TensorRT-LLM's and vLLM's Triton backends: text_input,
max_tokens, stream, temperature, top_k, top_p, random_seed, stop_words, bad_words, end_id (-1:
none), pad_id, return_log_probs; the answer is text_output (pieces when ``stream`` is true, else
the whole text in one response) with output_ids and sequence_length (and output_log_probs,
cum_log_probs when asked). Fields Triton passes as request parameters (the generate endpoint's
``parameters`` object, keys that are no input; gRPC's ``parameters``) are read too. A value out
of range, or a parameter of the wrong type, is this request's 400 (one line); the others go on. A
JSON value of the wrong type for an input (``"max_tokens": "ten"``, ``"text_input": 3``) never
reaches this model: Triton's HTTP frontend converts the JSON to the input's declared type and
answers 500 itself (the inputs are typed as TensorRT-LLM's, for its gRPC clients; see
triton_generate.INPUTS).
Config parameters:
  onnx_file           the decoder in the version directory (model.onnx)
  gpcl_python_path    site directories (os.pathsep separated) with gpcl_trt, onnxruntime and
                      transformers; the stub runs with the server's own Python
  slots               requests decoded together (the in-flight batch)
  default_max_tokens  max_tokens when a request gives none
  intra_op_threads    ONNX Runtime threads (0: its default)
  encoder_file        an encoder-decoder (T5, BART, Marian, Pegasus, Whisper): its encoder graph; onnx_file
                      is then the decoder (decoder_model_merged.onnx) and requests are decoded one at a
                      time in arrival order (gpcl_trt.generate.inflight.Seq2SeqQueue). A speech model
                      takes ``audio`` (FP32 mono samples at its feature extractor's rate, 16 kHz for
                      Whisper) instead of text_input; preprocessor_config.json lies next to it.
The tokenizer, config.json and generation_config.json lie in the version directory, and
gpcl_generation.json: the model's generation rules from the export's manifest chain.
"""

import json
import os
import site
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# field -> the Python type its value must have (bool before int: a JSON true is no token count)
FIELDS = {
    "max_tokens": int,
    "stream": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "random_seed": int,
    "end_id": int,
    "pad_id": int,
    "return_log_probs": bool,
}
RULES_FILE = "gpcl_generation.json"


def _error(message):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _parameters(request):
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def _scalar(request, name, params):
    """The field as a tensor input, else as a request parameter; None when absent. A value of the
    wrong type (a parameter Triton passed as it came) is refused in one line."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        value = params.get(name)
    else:
        arr = tensor.as_numpy().reshape(-1)
        if arr.size != 1:
            raise ValueError(f"{name} must be one value, got {arr.size}")
        value = arr[0].item()
    want = FIELDS[name]
    if value is None:
        return None
    if want is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if want is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return want(value)


def _strings(request, name, params):
    """The field's strings: a tensor input, else a request parameter (one string: gRPC's parameters
    hold no lists); a parameter of another type is refused in one line, not ignored."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        value = params.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
        return [] if value is None else [value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for entry in params.get("gpcl_python_path", "").split(os.pathsep):
            if entry and entry not in sys.path:
                site.addsitedir(entry)  # appended, and its .pth files run (gpcl_trt's editable install)
        from gpcl_trt.generate.detok import load_tokenizer
        from gpcl_trt.generate.inflight import InflightBatcher
        from gpcl_trt.generate.loop import Sampling
        from gpcl_trt.generate.rules import model_settings
        from gpcl_trt.generate.runtimes import OrtRuntime

        self.Sampling = Sampling
        vdir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("intra_op_threads", "0") or 0) or None
        self.tokenizer = load_tokenizer(vdir)
        self.default_max_tokens = int(params.get("default_max_tokens", "16") or 16)
        self.logger = pb_utils.Logger
        if params.get("encoder_file"):
            self._initialize_seq2seq(vdir, params, threads)
            return
        self.speech = False
        runtime = OrtRuntime(os.path.join(vdir, params.get("onnx_file", "model.onnx")), threads=threads)
        rules = Path(vdir) / RULES_FILE  # the export's rules; a repository written before: config.json
        section = json.loads(rules.read_text()) if rules.is_file() else None
        settings = model_settings(Path(vdir), self.tokenizer, section=section)
        self.vocab = runtime.session.get_outputs()[0].shape[-1]
        self.vocab = self.vocab if isinstance(self.vocab, int) else None
        self.batcher = InflightBatcher(runtime, self.tokenizer, settings, capacity=int(params.get("slots", "8") or 8))

    def _initialize_seq2seq(self, vdir, params, threads):
        from gpcl_trt.generate.inflight import Seq2SeqQueue
        from gpcl_trt.generate.seq2seq import OrtSeq2SeqRuntime, generation_rules

        runtime = OrtSeq2SeqRuntime(
            os.path.join(vdir, params["encoder_file"]),
            os.path.join(vdir, params.get("onnx_file", "decoder_model_merged.onnx")),
            threads=threads,
        )
        self.speech = runtime.speech
        fx = None
        if self.speech:
            from transformers import AutoFeatureExtractor

            fx = AutoFeatureExtractor.from_pretrained(vdir, local_files_only=True)
        vocab = runtime.decoder.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else None
        self.batcher = Seq2SeqQueue(runtime, self.tokenizer, generation_rules(Path(vdir)), fx)

    def _check_id(self, name, value):
        if value is None or (name == "end_id" and value == -1):
            return
        if value < 0 or (self.vocab is not None and value >= self.vocab):
            bound = f"{self.vocab - 1}" if self.vocab is not None else "the vocabulary size"
            none = " or -1 (none)" if name == "end_id" else ""
            raise ValueError(f"{name} must be a token id from 0 to {bound}{none}, got {value}")

    def _request(self, request):
        """The request's fields, checked: (text, batcher keywords, stream, pad_id, max_tokens)."""
        params = _parameters(request)
        texts = _strings(request, "text_input", params)
        audio = pb_utils.get_input_tensor_by_name(request, "audio") if self.speech else None
        if self.speech:  # a speech model: audio samples instead of text
            if texts:
                raise ValueError("this is a speech model: give audio (FP32 samples), not text_input")
            if audio is None:
                raise ValueError("audio is required: FP32 mono samples at the model's sampling rate")
            texts = [None]
        if len(texts) != 1:
            raise ValueError(f"text_input must be one string, got {len(texts)}")
        values = {name: _scalar(request, name, params) for name in FIELDS}
        for name in ("end_id", "pad_id"):
            self._check_id(name, values[name])
        max_tokens = values["max_tokens"] if values["max_tokens"] is not None else self.default_max_tokens
        temperature = values["temperature"] or 0.0
        sampling = self.Sampling(
            temperature=temperature,
            top_k=values["top_k"] or 0,
            top_p=values["top_p"] if values["top_p"] is not None and temperature > 0 else 1.0,
            seed=values["random_seed"] or 0,
        )
        if sampling.temperature == 0:  # greedy: top_k / top_p have no effect (clients send defaults)
            sampling = self.Sampling(seed=sampling.seed)
        end_id = values["end_id"]
        kw = {
            "max_tokens": max_tokens,
            "sampling": sampling,
            "stop": [w for w in _strings(request, "stop_words", params) if w],
            "bad_words": [w for w in _strings(request, "bad_words", params) if w],
            "eos_ids": None if end_id is None else ([] if end_id == -1 else [end_id]),
            "details": True,
            "log_probs": bool(values["return_log_probs"]),
        }
        if audio is not None:
            kw["audio"] = audio.as_numpy().astype(np.float32).reshape(-1)
        return texts[0], kw, bool(values["stream"]), values["pad_id"], max_tokens

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            text, kw, stream, pad_id, max_tokens = self._request(request)
        except Exception as exc:
            sender.send(
                pb_utils.InferenceResponse(error=_error(str(exc))), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )
            return
        whole, ids, log_probs = [], [], []

        def emit(piece, final, finish, error, tokens=(), log_probs_=None):
            if error is not None:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            ids.extend(tokens)
            log_probs.extend(log_probs_ or ())
            if not stream:
                whole.append(piece)
                if not final:
                    return
                piece = "".join(whole)
                new_ids, new_lp = list(ids), list(log_probs)
                if pad_id is not None:  # TensorRT-LLM's fixed-shape answer: padded past the sequence's end
                    new_ids += [pad_id] * (max_tokens - len(new_ids))
            else:
                if not final and not piece:
                    return
                new_ids, new_lp = ids[emit.sent :], log_probs[emit.sent :]
                emit.sent = len(ids)
            outputs = [
                pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("output_ids", np.array(new_ids, np.int32)),
                pb_utils.Tensor("sequence_length", np.array([len(ids)], np.int32)),
            ]
            if kw["log_probs"]:
                outputs.append(pb_utils.Tensor("output_log_probs", np.array(new_lp, np.float32)))
                outputs.append(pb_utils.Tensor("cum_log_probs", np.array([sum(log_probs)], np.float32)))
            response = pb_utils.InferenceResponse(output_tensors=outputs)
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

        emit.sent = 0

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
                text,
                lambda piece, final, finish, error, tokens=(), log_probs=None: emit(
                    piece, final, finish, error, tokens, log_probs
                ),
                cancelled=cancelled,
                **kw,
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
