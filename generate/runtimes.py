"""Runtimes the generation loop drives. Each owns its KV cache between calls, so the loop only
hands over the new tokens, the mask and the positions:

- ``prefill(input_ids, attention_mask, position_ids)`` drops any cache, runs the whole prompt
  batch in one call and returns the last position's logits, float32 [batch, vocab];
- ``step(input_ids, attention_mask, position_ids)`` runs one token per row on top of the cache
  (the mask covers cache + new token) and returns its logits the same way.

``takes_positions`` says whether the model reads ``position_ids``; without them a left-padded
row's positions would start at its padding, so the loop runs prompts of one length per batch.
A TensorRT engine runtime fits the same two calls (its cache in device buffers bound to the
engine's past/present bindings); none exists yet.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.feeds import (
    ATTENTION_MASK,
    INPUT_IDS,
    PAST_PREFIX,
    POSITION_IDS,
    PRESENT_PREFIX,
    is_past,
    ort_session,
    specs_from_session,
)

LOGITS = "logits"


class Runtime(Protocol):
    name: str
    takes_positions: bool

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...


class OrtRuntime:
    """Any with-past export (GPCL or not, fp32 or fp16) in ONNX Runtime. The cache never leaves
    ONNX Runtime's buffers; two ways, by what the graph allows:

    - an export concatenates past and new keys: each step's ``present.{i}.*`` OrtValues are
      bound, as they are, as the next step's ``past_key_values.{i}.*`` inputs (IOBinding);
    - a graph whose manifest chain says ``kv_cache: shared-buffer`` (``gpcl-trt optimize
      --variant contrib-gqa``): one buffer per cache tensor, preallocated to the length the
      caller ``reserve``s (doubled if a batch outgrows it), is bound as both past and present,
      and GroupQueryAttention writes each step's keys into it in place. One IOBinding lives
      across the steps: a step binds only the new ids, the mask and the positions (no
      allocation or copy of the cache per step, as onnxruntime-genai runs its graphs)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        from gpcl_trt.weightfiles import verify_onnx

        self.path = Path(onnx_path)
        verify_onnx(self.path)  # weight files missing, truncated or replaced since: one line
        self.session = ort_session(self.path, threads=threads)
        specs = {s.name: s for s in specs_from_session(self.session)}
        outputs = [o.name for o in self.session.get_outputs()]
        self.past = [s for n, s in specs.items() if is_past(n)]
        if INPUT_IDS not in specs or LOGITS not in outputs or not self.past:
            raise GpclError(
                f"{self.path.name} is not a decoder exported with past (needs input_ids, "
                f"past_key_values.* inputs and logits, present.* outputs): export with "
                f"--task text-generation-with-past"
            )
        self.present = {s.name: PRESENT_PREFIX + s.name[len(PAST_PREFIX) :] for s in self.past}
        missing = sorted(set(self.present.values()) - set(outputs))
        if missing:
            raise GpclError(f"{self.path.name} has past inputs without present outputs: {', '.join(missing)}")
        self.inputs = specs
        self.outputs = [LOGITS, *self.present.values()]
        self.takes_positions = POSITION_IDS in specs
        self.float_dtype = self.past[0].dtype
        self._cache: dict[str, Any] = {}
        from gpcl_trt.manifest import kv_cache_of

        self.shared_buffer = kv_cache_of(self.path) == "shared-buffer"
        self._reserved = 0
        self._shared: dict[str, Any] = {}  # cache name -> (numpy buffer, OrtValue over it)
        self._binding: Any = None
        self._keep: list = []
        self._logits_buffer: np.ndarray | None = None
        logits_spec = self.session.get_outputs()[outputs.index(LOGITS)]
        self.vocab = logits_spec.shape[-1]
        self.logits_dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(logits_spec.type)
        if not isinstance(self.vocab, int):
            self.shared_buffer = False  # the step's logits buffer needs the vocabulary size

    def reserve(self, length: int) -> None:
        """The longest sequence (prompt + new tokens, padding included) the next batch reaches:
        a shared buffer is preallocated to it."""
        self._reserved = int(length)

    def _empty_past(self, spec: Any, batch: int) -> np.ndarray:
        shape = []
        for i, d in enumerate(spec.dims):
            if d == "batch" or (d is None and i == 0):
                shape.append(batch)
            elif isinstance(d, int):
                shape.append(d)
            else:  # past_sequence (or an unnamed sequence axis): empty
                shape.append(0)
        return np.zeros(shape, spec.dtype)

    def _bind_shared(self, batch: int, length: int, keep: int) -> None:
        """Buffers of ``length`` positions bound as past and present; the first ``keep``
        positions of the current ones are carried over (a batch that outgrew its buffer)."""
        import onnxruntime as ort

        binding = self._binding if keep else self.session.io_binding()
        if not keep:
            binding.bind_output(LOGITS, "cpu")  # first: get_outputs()[0]
        shared = {}
        for spec in self.past:
            shape = self._empty_past(spec, batch).shape
            axis = next(i for i, d in enumerate(spec.dims) if i and not isinstance(d, int))
            shape = shape[:axis] + (length,) + shape[axis + 1 :]
            buf = np.zeros(shape, spec.dtype)
            if keep:
                old = self._shared[spec.name][0]
                index = [slice(None)] * buf.ndim
                index[axis] = slice(0, keep)
                buf[tuple(index)] = old[tuple(index)]
            value = ort.OrtValue.ortvalue_from_numpy(buf)  # a view: the numpy buffer is the cache
            shared[spec.name] = (buf, value)
            binding.bind_ortvalue_input(spec.name, value)
            binding.bind_ortvalue_output(self.present[spec.name], value)
        self._shared, self._binding = shared, binding

    def _run_shared(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, first: bool) -> np.ndarray:
        batch, total = mask.shape
        length = next(iter(self._shared.values()))[0].shape[2] if self._shared else 0
        if first:
            length = max(self._reserved, total)
            self._bind_shared(batch, length, keep=0)
        elif total > length:  # outgrew the reserved length: double it, keep what is cached
            self._bind_shared(batch, max(2 * length, total), keep=total - ids.shape[1])
        binding, keep = self._binding, []
        # a step's logits [B, 1, V] go into a fresh array of ours (returned as it is: no output
        # list, no copy); a prefill's have the prompt's length and are allocated by ORT
        if ids.shape[1] == 1:
            import onnxruntime as ort

            self._logits_buffer = np.empty((batch, 1, self.vocab), self.logits_dtype or np.float32)
            binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits_buffer))
        else:
            binding.bind_output(LOGITS, "cpu")
        for name, value in ((INPUT_IDS, ids), (ATTENTION_MASK, mask), (POSITION_IDS, pos)):
            if name in self.inputs:
                arr = np.ascontiguousarray(value, self.inputs[name].dtype)
                keep.append(arr)
                binding.bind_cpu_input(name, arr)
        self._keep = keep  # bound numpy inputs must outlive the run
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise GpclError(f"ONNX Runtime failed on {self.path.name}: {one_line(exc)}") from None
        self._cache = {name: pair[1] for name, pair in self._shared.items()}
        if ids.shape[1] == 1:
            return np.asarray(self._logits_buffer[:, -1, :], np.float32)
        return np.asarray(binding.get_outputs()[0].numpy()[:, -1, :], np.float32)

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, first: bool) -> np.ndarray:
        if self.shared_buffer:
            return self._run_shared(ids, mask, pos, first)
        binding = self.session.io_binding()
        keep = []  # bound numpy inputs must outlive the run
        for name, value in ((INPUT_IDS, ids), (ATTENTION_MASK, mask), (POSITION_IDS, pos)):
            if name in self.inputs:
                arr = np.ascontiguousarray(value, self.inputs[name].dtype)
                keep.append(arr)
                binding.bind_cpu_input(name, arr)
        for spec in self.past:
            if first:
                arr = self._empty_past(spec, ids.shape[0])
                keep.append(arr)
                binding.bind_cpu_input(spec.name, arr)
            else:
                binding.bind_ortvalue_input(spec.name, self._cache[spec.name])
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise GpclError(f"ONNX Runtime failed on {self.path.name}: {one_line(exc)}") from None
        values = binding.get_outputs()
        self._cache = {spec.name: values[1 + i] for i, spec in enumerate(self.past)}
        logits = values[0].numpy()
        return np.asarray(logits[:, -1, :], np.float32)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self._run(input_ids, attention_mask, position_ids, first=True)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if not self._cache:
            raise GpclError("step before prefill")
        return self._run(input_ids, attention_mask, position_ids, first=False)


class TorchRuntime:
    """The Hugging Face model directory in PyTorch (the reference): transformers' own causal LM
    class and its DynamicCache. Safetensors only unless ``allow_pickle``."""

    name = "pytorch"
    takes_positions = True

    def __init__(self, model_dir: str | os.PathLike, allow_pickle: bool = False, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=torch.float32, local_files_only=True, use_safetensors=not allow_pickle
            ).eval()
        except Exception as exc:
            raise GpclError(f"cannot load {model_dir} as a causal LM in PyTorch ({one_line(exc)})") from None
        params = inspect.signature(self.model.forward).parameters
        self.takes_positions = "position_ids" in params
        self._keep_last = "logits_to_keep" in params
        # transformers 5 renamed past_key_values to cache (the old name warns)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._cache: Any = None

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        import torch

        kw: dict[str, Any] = {
            "attention_mask": torch.from_numpy(np.asarray(mask, np.int64)),
            self._cache_arg: self._cache,
        }
        if self.takes_positions:
            kw["position_ids"] = torch.from_numpy(np.asarray(pos, np.int64))
        if self._keep_last:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=True, **kw)
        cache = getattr(out, "cache", None)
        self._cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1, :].float().numpy()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        return self._run(input_ids, attention_mask, position_ids)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise GpclError("step before prefill")
        return self._run(input_ids, attention_mask, position_ids)
