"""One small config per architecture family: which HF model class to load for a task, the ONNX
inputs/outputs (names, dtypes, dynamic axes) and the wrapper module that is traced.

Adding an architecture means adding one subclass here and one entry in ``ARCHITECTURES``; the
exporter itself has no per-architecture branches.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

FEATURE_EXTRACTION = "feature-extraction"
TEXT_GENERATION = "text-generation"
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
TASKS = (FEATURE_EXTRACTION, TEXT_GENERATION, TEXT_GENERATION_WITH_PAST)


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output: name, element type and axes (a str is a dynamic axis)."""

    name: str
    dtype: str  # "int64" or "float" (the model dtype: float32 or float16)
    axes: tuple[str | int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}


class ArchConfig(abc.ABC):
    """Base of the per-architecture configs. An instance binds the class-level description to
    one HF config (for vocab size, layer count, KV heads...)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.json "model_type" values served by this config
    tasks: ClassVar[tuple[str, ...]]

    def __init__(self, hf_config: Any, dtype: str = "fp32"):
        self.hf_config = hf_config
        self.dtype = dtype  # "fp32" or "fp16": the element type of every "float" tensor

    # --- what the caller asks of every architecture
    def default_task(self) -> str:
        return self.tasks[0]

    @abc.abstractmethod
    def auto_class(self, task: str) -> type:
        """Per architecture."""

    def load_kwargs(self, task: str) -> dict[str, Any]:
        """Extra from_pretrained arguments for this architecture."""
        return {}

    @abc.abstractmethod
    def inputs(self, task: str) -> list[TensorSpec]:
        """Per architecture."""

    @abc.abstractmethod
    def outputs(self, task: str) -> list[TensorSpec]:
        """Per architecture."""

    @abc.abstractmethod
    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """The module that is traced: plain tensors in (ONNX input order), a tuple out."""

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)


# ----------------------------------------------------------------------------- encoders
class EncoderCore(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return (out.last_hidden_state,)


class BertFamily(ArchConfig):
    """BERT-style encoders: input_ids, attention_mask, token_type_ids -> last_hidden_state."""

    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta")
    tasks = (FEATURE_EXTRACTION,)
    token_type_ids: ClassVar[bool] = True

    def auto_class(self, task: str) -> type:
        from transformers import AutoModel

        return AutoModel

    def load_kwargs(self, task: str) -> dict[str, Any]:
        # Only last_hidden_state is exported; many sentence-embedding checkpoints ship without
        # pooler weights, which would otherwise count as missing.
        return {"add_pooling_layer": False}

    def inputs(self, task: str) -> list[TensorSpec]:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.token_type_ids else [])
        return [TensorSpec(n, "int64", ("batch", "sequence")) for n in names]

    def outputs(self, task: str) -> list[TensorSpec]:
        hidden = int(self.hf_config.hidden_size)
        return [TensorSpec("last_hidden_state", "float", ("batch", "sequence", hidden))]

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        return EncoderCore(model)


# ----------------------------------------------------------------------------- decoders
class CausalLMCore(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        kw = {} if position_ids is None else {"position_ids": position_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        return (out.logits,)


class CausalLMWithPastCore(torch.nn.Module):
    """Explicit past tensors in, present tensors out. Transformers 5 keeps the cache in a Cache
    object, which the dynamo exporter cannot take as a graph input, so the cache is rebuilt from
    the flat tensors inside the traced forward."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=()):
        from transformers import DynamicCache

        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs)
        kw = {} if position_ids is None else {"position_ids": position_ids}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **kw
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class CausalLM(ArchConfig):
    """Decoder-only LMs. Subclasses only say whether ``position_ids`` is an input."""

    tasks = (TEXT_GENERATION_WITH_PAST, TEXT_GENERATION)
    position_ids: ClassVar[bool] = True

    def default_task(self) -> str:
        # config.json says whether the model is meant to decode with a KV cache.
        return TEXT_GENERATION_WITH_PAST if getattr(self.hf_config, "use_cache", True) else TEXT_GENERATION

    def auto_class(self, task: str) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        cfg = self.hf_config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.hf_config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    def past_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def inputs(self, task: str) -> list[TensorSpec]:
        past = task == TEXT_GENERATION_WITH_PAST
        specs = [
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence" if past else "sequence")),
        ]
        if self.position_ids:
            specs.append(TensorSpec("position_ids", "int64", ("batch", "sequence")))
        if past:
            axes = ("batch", self.num_kv_heads, "past_sequence", self.head_dim)
            specs += [TensorSpec(n, "float", axes) for n in self.past_names("past_key_values")]
        return specs

    def outputs(self, task: str) -> list[TensorSpec]:
        specs = [TensorSpec("logits", "float", ("batch", "sequence", self.vocab_size))]
        if task == TEXT_GENERATION_WITH_PAST:
            axes = ("batch", self.num_kv_heads, "total_sequence", self.head_dim)
            specs += [TensorSpec(n, "float", axes) for n in self.past_names("present")]
        return specs

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        if task == TEXT_GENERATION_WITH_PAST:
            return CausalLMWithPastCore(model, self.num_layers)
        return CausalLMCore(model)


class Llama(CausalLM):
    name = "llama"
    model_types = ("llama",)
    position_ids = True  # RoPE: a runtime with padded batches must say where each token sits


class GPT2(CausalLM):
    name = "gpt2"
    model_types = ("gpt2",)
    position_ids = False  # learned positions follow from the past length; HF derives them


ARCHITECTURES: tuple[type[ArchConfig], ...] = (BertFamily, Llama, GPT2)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES for t in a.model_types)


def arch_for_model_type(model_type: str) -> type[ArchConfig] | None:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None
