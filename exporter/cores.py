"""The I/O core modules: what is traced. A core calls the HF model with plain tensors in ONNX
input order and returns a tuple in ONNX output order (``HeadCore`` and one subclass per kind of
forward); ``OnnxIOModule`` wraps a core so it takes the ONNX input names (the PyTorch side of
validation and of the accuracy runners)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpcl_trt.exporter.patchers import use_fusable_gelu
from gpcl_trt.exporter.tasks import forward_params
from gpcl_trt.feeds import is_past


class HeadCore(torch.nn.Module):
    """Calls the HF model with the named inputs and returns the named outputs (a tuple)."""

    def __init__(self, model: torch.nn.Module, outputs: list[str], **call_kwargs: Any):
        super().__init__()
        use_fusable_gelu(model)
        self.model = model
        self.outputs = list(outputs)
        self.call_kwargs = call_kwargs
        # (module, attribute, replacement) swapped in while the model runs (and is traced); for
        # an architecture whose own code exports but cannot run in ONNX Runtime (see Falcon).
        self.patches: list[tuple[Any, str, Any]] = []

    def _run(self, **kwargs: Any) -> Any:
        saved = [(m, a, getattr(m, a)) for m, a, _ in self.patches]
        for m, a, v in self.patches:
            setattr(m, a, v)
        try:
            return self.model(**kwargs, **self.call_kwargs)
        finally:
            for m, a, v in saved:
                setattr(m, a, v)

    def _pick(self, out: Any) -> tuple:
        return tuple(out[n] for n in self.outputs)


# ----------------------------------------------------------------------------- text encoders
class EncoderCore(HeadCore):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return self._pick(self._run(input_ids=input_ids, **kw))


# ----------------------------------------------------------------------------- vision encoders
class VisionCore(HeadCore):
    def forward(self, pixel_values):
        return self._pick(self._run(pixel_values=pixel_values))


# ----------------------------------------------------------------------------- audio encoders
class AudioCore(HeadCore):
    def forward(self, input_values):
        return self._pick(self._run(input_values=input_values))


# ----------------------------------------------------------------------------- dual encoders
class DualEncoderCore(HeadCore):
    """Texts and images in one call (CLIP, SigLIP): both towers and the scores between them."""

    def forward(self, input_ids, pixel_values, attention_mask=None):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self._pick(self._run(input_ids=input_ids, pixel_values=pixel_values, **kw))
        # logits_per_text is logits_per_image.t(): a strided view that numpy consumers cannot view()
        return tuple(t.contiguous() for t in out)


# ----------------------------------------------------------------------------- decoders
class CausalLMCore(HeadCore):
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        kw = {} if position_ids is None else {"position_ids": position_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        return self._pick(self._run(input_ids=input_ids, use_cache=False, **kw))


class CausalLMWithPastCore(HeadCore):
    """Explicit past tensors in, present tensors out. Transformers 5 keeps the cache in a Cache
    object, which the dynamo exporter cannot take as a graph input, so the cache is rebuilt from
    the flat tensors inside the traced forward. Every layer is a full DynamicLayer: sliding-window
    layers (Mistral, Gemma 2/3, Qwen2 with a window...) still attend only inside their window,
    because the attention mask, not the cache, applies the window, so presents always hold the
    whole sequence (one axis, total_sequence, for every layer)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, outputs: list[str]):
        super().__init__(model, outputs)
        self.num_layers = num_layers
        self.cache_arg = _cache_arg(model)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=()):
        from transformers import DynamicCache

        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs)
        kw = {} if position_ids is None else {"position_ids": position_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        kw[self.cache_arg] = cache
        out = self._run(input_ids=input_ids, use_cache=True, return_dict=True, **kw)
        present = []
        for layer in out_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_arg(model: torch.nn.Module) -> str:
    """Transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name is
    deprecated); use whichever this model takes."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def out_cache(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    return None


# ----------------------------------------------------------------------------- the wrapped module
class OnnxIOModule(torch.nn.Module):
    """``forward(**feeds)`` takes the ONNX input names (numpy arrays or tensors) and returns
    the outputs as a tuple in ONNX output order. ``core`` is the module that is traced."""

    def __init__(self, core: torch.nn.Module, arch: Any, task: str):
        super().__init__()
        self.core = core
        self.task = task
        self.input_names = [s.name for s in arch.inputs(task)]
        self.output_names = [s.name for s in arch.outputs(task)]
        self._past = [n for n in self.input_names if is_past(n)]

    def core_kwargs(self, feeds: dict[str, Any]) -> dict[str, Any]:
        missing = set(self.input_names) - set(feeds)
        extra = set(feeds) - set(self.input_names)
        if missing or extra:
            raise ValueError(
                f"inputs must be exactly {self.input_names}; missing {sorted(missing)}, extra {sorted(extra)}"
            )
        as_t = lambda v: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v  # noqa: E731
        kw = {n: as_t(feeds[n]) for n in self.input_names if n not in self._past}
        if self._past:
            kw["past_key_values"] = tuple(as_t(feeds[n]) for n in self._past)
        return kw

    def forward(self, **feeds: Any) -> tuple:
        return tuple(self.core(**self.core_kwargs(feeds)))
