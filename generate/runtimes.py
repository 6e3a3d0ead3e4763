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
    ONNX Runtime: each step's ``present.{i}.*`` OrtValues are bound, as they are, as the next
    step's ``past_key_values.{i}.*`` inputs through IOBinding. Our graphs concatenate past and
    new keys, so a cache preallocated to the maximum length cannot be bound in place; the
    presents ORT allocates are the buffers."""

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

    def _run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, first: bool) -> np.ndarray:
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
