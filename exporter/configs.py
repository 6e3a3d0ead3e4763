"""Architecture families: which HF model class to load for a task, the ONNX inputs/outputs (names,
dtypes, dynamic axes) and the wrapper module that is traced.

The architecture is read from the checkpoint, not from a list of names: config.json's
``architectures`` (the head class) and ``model_type`` are looked up in transformers' own auto-class
mappings (``transformers.models.auto.modeling_auto``), which say whether a model is a text encoder,
a decoder-only LM or a vision encoder, and which task its head serves. What differs between models
of one family (whether the forward takes ``token_type_ids``, rotary positions, the per-layer shape
of the KV cache, the vocabulary of the LM head) is read from the model class's forward signature,
the config, or one tiny forward of the loaded model, never from its name.

A per-architecture subclass exists only where the generic path measurably fails, with a comment
saying why (:data:`OVERRIDES`). Encoder-decoder, audio and multimodal models are refused with a
message that names the task they would need.
"""

from __future__ import annotations

import abc
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gpcl_trt import feeds
from gpcl_trt.common import GpclError, one_line

FEATURE_EXTRACTION = "feature-extraction"
FILL_MASK = "fill-mask"
TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
TEXT_GENERATION = "text-generation"
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (
    FEATURE_EXTRACTION,
    FILL_MASK,
    TEXT_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    QUESTION_ANSWERING,
    TEXT_GENERATION,
    TEXT_GENERATION_WITH_PAST,
    IMAGE_CLASSIFICATION,
)

# task -> (transformers auto mapping holding model_type -> head class name, Auto class)
TASK_HEADS: dict[str, tuple[str, str]] = {
    FEATURE_EXTRACTION: ("MODEL_MAPPING_NAMES", "AutoModel"),
    FILL_MASK: ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    TEXT_CLASSIFICATION: ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    TOKEN_CLASSIFICATION: ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    QUESTION_ANSWERING: ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    TEXT_GENERATION: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    TEXT_GENERATION_WITH_PAST: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    IMAGE_CLASSIFICATION: ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}

# Families that are out of scope for now: mapping -> (what the model is, the task it would need).
REFUSED: tuple[tuple[str, str, str], ...] = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "an encoder-decoder model", "text2text-generation"),
    (
        "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
        "an audio (speech encoder-decoder) model",
        "automatic-speech-recognition",
    ),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "an audio model", "automatic-speech-recognition"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "an audio model", "audio-classification"),
    ("MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES", "an audio model", "audio-frame-classification"),
    ("MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES", "an audio model", "audio-xvector"),
    ("MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES", "an audio model", "text-to-audio"),
    ("MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES", "an audio model", "text-to-audio"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "a multimodal (image + text) model", "image-text-to-text"),
    ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "a multimodal model", "any-to-any"),
    (
        "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "a multimodal (image + text) model",
        "zero-shot-image-classification",
    ),
)

# config.layer_types values (transformers 5) of layers whose cache is a state, not key/value tensors.
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "hybrid", "mamba", "recurrent", "conv"})

# Cache layer classes that hold plain key/value tensors (the with-past export's flat I/O).
_KV_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer")


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output: name, element type and axes (a str is a dynamic axis, an
    int a fixed size, None a fixed size the exporter decides, e.g. a vision model's tokens)."""

    name: str
    dtype: str  # "int64" or "float" (the model dtype: float32 or float16)
    axes: tuple[str | int | None, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}


# ----------------------------------------------------------------------------- transformers lookups
def _mapping(name: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name, {}) or {}


def _names(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) if value else ()


def _in_mapping(mapping: str, model_type: str) -> bool:
    return bool(_names(_mapping(mapping).get(model_type)))


def _class_in_mapping(mapping: str, cls_name: str) -> bool:
    return any(cls_name in _names(v) for v in _mapping(mapping).values())


def head_class(task: str, model_type: str) -> type | None:
    """The transformers class serving ``task`` for ``model_type`` (None if it has none)."""
    import transformers

    for name in _names(_mapping(TASK_HEADS[task][0]).get(model_type)):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return None


def forward_params(cls_or_model: Any) -> set[str]:
    """The argument names of a model's forward (what it can take: token_type_ids, position_ids)."""
    try:
        return set(inspect.signature(cls_or_model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def task_of_class(cls_name: str) -> str | None:
    """The task whose head class is ``cls_name`` (LlamaForCausalLM -> text-generation), or None."""
    for task, (mapping, _) in TASK_HEADS.items():
        if task != TEXT_GENERATION_WITH_PAST and _class_in_mapping(mapping, cls_name):
            return task
    return None


# ----------------------------------------------------------------------------- family base
class ArchConfig(abc.ABC):
    """Base of the family configs. An instance binds the family's description to one HF config
    (and, once :meth:`core` has seen the loaded model, to what a tiny forward of it showed)."""

    family: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    main_input: ClassVar[str] = "input_ids"

    def __init__(self, hf_config: Any, dtype: str = "fp32"):
        self.hf_config = hf_config
        self.dtype = dtype  # "fp32" or "fp16": the element type of every "float" tensor
        self._params: set[str] | None = None  # forward arguments of the loaded model
        self._vocab: int | None = None
        self._logits: int | None = None

    # --- naming
    @property
    def name(self) -> str:
        """The architecture: config.json's model_type (llama, roberta, vit...)."""
        return str(self.hf_config.model_type)

    @property
    def head(self) -> str | None:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else None

    # --- tasks and classes
    def default_task(self) -> str:
        """The task of the head class named in config.json's ``architectures``; the family's
        first task when it names none we know."""
        task = task_of_class(self.head) if self.head else None
        if task is None:
            return self.tasks[0]
        if task not in self.tasks:
            raise GpclError(
                f"{self.head} ({self.name}) is a {task} head, which gpcl-trt does not export for "
                f"{self.family} models; choose --task {' or '.join(self.tasks)}"
            )
        return task

    def auto_class(self, task: str) -> type:
        import transformers

        return getattr(transformers, TASK_HEADS[task][1])

    def model_class(self, task: str) -> type | None:
        return head_class(task, self.name)

    def load_kwargs(self, task: str) -> dict[str, Any]:
        """Extra from_pretrained arguments. Eager attention: the exporter decomposes SDPA with a
        NaN guard on the probabilities (IsNaN + Where over batch x heads x seq x seq per layer,
        ~11% of MiniLM's ONNX Runtime CPU time) that the plain matmul-softmax-matmul does not
        need; the numbers are the model's own either way. No pooler for feature extraction where
        the class has one (many sentence-embedding checkpoints ship without pooler weights, which
        would otherwise count as missing; only last_hidden_state is exported). Mixture-of-experts
        blocks run as ``batched_mm``: transformers' default grouped matmul is a custom op with no
        ONNX translation, and its eager loop indexes tokens by data (torch.export cannot trace
        it); batched_mm runs every expert on every token (top-k of E of it is used) with static
        shapes. Models without experts ignore it."""
        kwargs: dict[str, Any] = {"attn_implementation": "eager", "experts_implementation": "batched_mm"}
        cls = self.model_class(task)
        if task == FEATURE_EXTRACTION and cls is not None:
            try:
                if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
                    kwargs["add_pooling_layer"] = False
            except (TypeError, ValueError):
                pass
        return kwargs

    def check_task(self, task: str) -> None:
        """Refuse a task the family or this model type cannot serve, with a clear line."""
        if task not in self.tasks:
            raise GpclError(
                f"task {task!r} is not supported for {self.name} ({self.family}); supported: {', '.join(self.tasks)}"
            )
        if not getattr(self.hf_config, "auto_map", None) and self.model_class(task) is None:
            raise GpclError(f"transformers has no {task} head for model_type {self.name!r}; choose another --task")

    def params(self, task: str) -> set[str]:
        if self._params is not None:
            return self._params
        cls = self.model_class(task)
        return forward_params(cls) if cls is not None else set()

    # --- sizes
    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding (what input_ids may index)."""
        if self._vocab is not None:
            return self._vocab
        return int(self.hf_config.get_text_config().vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.get_text_config().hidden_size)

    @property
    def num_labels(self) -> int:
        return int(getattr(self.hf_config, "num_labels", 2))

    def _bind(self, model: torch.nn.Module) -> None:
        self._params = forward_params(model)
        emb = _call(model, "get_input_embeddings")
        if isinstance(emb, torch.nn.Embedding):
            self._vocab = int(emb.num_embeddings)
        out = _call(model, "get_output_embeddings")
        if isinstance(out, torch.nn.Linear):
            self._logits = int(out.out_features)

    # --- what each family says
    @abc.abstractmethod
    def inputs(self, task: str) -> list[TensorSpec]:
        """The ONNX graph inputs for ``task``."""

    @abc.abstractmethod
    def outputs(self, task: str) -> list[TensorSpec]:
        """The ONNX graph outputs for ``task``."""

    @abc.abstractmethod
    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """The module that is traced: plain tensors in (ONNX input order), a tuple out."""

    def _head_outputs(self, task: str, seq_axes: tuple) -> list[TensorSpec]:
        """The outputs of an encoder head; ``seq_axes`` are the axes of one token position."""
        if task == FEATURE_EXTRACTION:
            return [TensorSpec("last_hidden_state", "float", (*seq_axes, self.hidden_size))]
        if task == FILL_MASK:
            return [TensorSpec("logits", "float", (*seq_axes, self._logits or self.vocab_size))]
        if task in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION):
            return [TensorSpec("logits", "float", ("batch", self.num_labels))]
        if task == TOKEN_CLASSIFICATION:
            return [TensorSpec("logits", "float", (*seq_axes, self.num_labels))]
        if task == QUESTION_ANSWERING:
            return [TensorSpec(n, "float", seq_axes) for n in ("start_logits", "end_logits")]
        raise GpclError(f"task {task!r} has no outputs in {self.family}")


def _call(model: Any, method: str) -> Any:
    try:
        return getattr(model, method)()
    except Exception:  # not implemented by this class
        return None


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written as ``(x * (1 + erf(x / sqrt 2))) * 0.5``: the same numbers as
    ``0.5 * x * (...)`` (halving is exact), but the order ONNX Runtime's GELU fusion recognises,
    so the exported graph runs one BiasGelu kernel instead of five element-wise ops (the
    exporter's own decomposition multiplies by 0.5 first and is left unfused)."""
    return (x * (1.0 + torch.erf(x / math.sqrt(2.0)))) * 0.5


class _GeluErf(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_erf(x)


def use_fusable_gelu(model: torch.nn.Module) -> int:
    """Swap the model's exact GELUs (transformers' GELUActivation, torch.nn.GELU) for
    :func:`gelu_erf`; returns how many. Tanh and other approximations are left alone."""
    from transformers.activations import GELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, GELUActivation) and getattr(child, "act", None) is torch.nn.functional.gelu:
                child.act = gelu_erf
                swapped += 1
            elif type(child) is torch.nn.GELU and child.approximate == "none":
                setattr(parent, name, _GeluErf())
                swapped += 1
    return swapped


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


class TextEncoder(ArchConfig):
    """Bidirectional text encoders (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, MPNet, ModernBERT,
    ...): input_ids, attention_mask, plus token_type_ids where the forward takes them."""

    family = "text-encoder"
    tasks = (FEATURE_EXTRACTION, FILL_MASK, TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)

    def inputs(self, task: str) -> list[TensorSpec]:
        params = self.params(task)
        names = ["input_ids"] + [n for n in ("attention_mask", "token_type_ids") if n in params]
        return [TensorSpec(n, "int64", ("batch", "sequence")) for n in names]

    def outputs(self, task: str) -> list[TensorSpec]:
        return self._head_outputs(task, ("batch", "sequence"))

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        return EncoderCore(model, [s.name for s in self.outputs(task)], return_dict=True)


# ----------------------------------------------------------------------------- vision encoders
class VisionCore(HeadCore):
    def forward(self, pixel_values):
        return self._pick(self._run(pixel_values=pixel_values))


class VisionEncoder(ArchConfig):
    """ViT-like image encoders (ViT, DeiT, BEiT, DINOv2, ...): pixel_values [batch, channels,
    height, width] at the config's image size -> logits or last_hidden_state."""

    family = "vision-encoder"
    tasks = (IMAGE_CLASSIFICATION, FEATURE_EXTRACTION)
    main_input = "pixel_values"

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.hf_config, "image_size", 224)
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)

    @property
    def vocab_size(self) -> int:  # no token ids; kept so callers that ask get a number
        return 0

    def inputs(self, task: str) -> list[TensorSpec]:
        channels = int(getattr(self.hf_config, "num_channels", 3))
        return [TensorSpec(feeds.PIXEL_VALUES, "float", ("batch", channels, *self.image_size))]

    def outputs(self, task: str) -> list[TensorSpec]:
        return self._head_outputs(task, ("batch", None))  # the token count is fixed by the image size

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        return VisionCore(model, [s.name for s in self.outputs(task)], return_dict=True)


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
        for layer in _out_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _cache_arg(model: torch.nn.Module) -> str:
    """Transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name is
    deprecated); use whichever this model takes."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def _out_cache(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class KVShape:
    """One layer's cache: KV heads and head sizes. Keys and values may differ in head size
    (DeepSeek's multi-head latent attention: keys carry the rotary part, 192 vs 128)."""

    heads: int
    head_dim: int
    value_dim: int | None = None  # None: the same as head_dim

    @property
    def value_head_dim(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim


class DecoderOnly(ArchConfig):
    """Decoder-only LMs (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, GPT-J, OPT, Bloom,
    Falcon, ...): input_ids, attention_mask, position_ids where positions are rotary (a runtime
    with padded batches must say where each token sits; learned absolute positions follow from
    the past length), and with past the flat ``past_key_values.{i}.key|value`` tensors, whose
    per-layer head count and head size are read from the cache of one tiny forward."""

    family = "decoder-only"
    tasks = (
        TEXT_GENERATION_WITH_PAST,
        TEXT_GENERATION,
        FEATURE_EXTRACTION,
        TEXT_CLASSIFICATION,
        TOKEN_CLASSIFICATION,
        QUESTION_ANSWERING,
    )

    def __init__(self, hf_config: Any, dtype: str = "fp32"):
        super().__init__(hf_config, dtype)
        self._kv: list[KVShape] | None = None
        self._rotary: bool | None = None

    def default_task(self) -> str:
        task = super().default_task()
        if task == TEXT_GENERATION:
            # config.json says whether the model decodes with a cache, and of which layers: a
            # recurrent or linear-attention layer (Mamba, Jamba, Qwen3-Next...) keeps a state,
            # not key/value tensors, which with-past export does not write.
            # A BERT-like encoder's causal LM head (ElectraForCausalLM) keeps no cache either.
            cfg = self.hf_config.get_text_config()
            states = set(getattr(cfg, "layer_types", None) or ()) & RECURRENT_LAYER_TYPES
            cached = getattr(cfg, "use_cache", None) and not states and _is_decoder_type(self.name)
            return TEXT_GENERATION_WITH_PAST if cached else TEXT_GENERATION
        return task

    # --- what the model takes
    @property
    def rotary(self) -> bool:
        if self._rotary is None:
            self._rotary = _config_says_rotary(self.hf_config.get_text_config())
        return self._rotary

    def _bind(self, model: torch.nn.Module) -> None:
        super()._bind(model)
        self._rotary = self.rotary or any("rotary" in type(m).__name__.lower() for m in model.modules())

    @property
    def num_layers(self) -> int:
        if self._kv is not None:
            return len(self._kv)
        return int(self.hf_config.get_text_config().num_hidden_layers)

    def kv_shapes(self) -> list[KVShape]:
        if self._kv is not None:
            return self._kv
        cfg = self.hf_config.get_text_config()
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return [KVShape(heads, head_dim)] * int(cfg.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return self.kv_shapes()[0].heads

    @property
    def head_dim(self) -> int:
        return self.kv_shapes()[0].head_dim

    def past_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def inputs(self, task: str) -> list[TensorSpec]:
        past = task == TEXT_GENERATION_WITH_PAST
        params = self.params(task)
        specs = [TensorSpec(feeds.INPUT_IDS, "int64", ("batch", "sequence"))]
        if "attention_mask" in params or not params:
            specs.append(TensorSpec(feeds.ATTENTION_MASK, "int64", ("batch", "total_sequence" if past else "sequence")))
        if self.rotary and "position_ids" in params:
            specs.append(TensorSpec(feeds.POSITION_IDS, "int64", ("batch", "sequence")))
        if past:
            specs += self._cache_specs(feeds.PAST_PREFIX, "past_sequence")
        return specs

    def _cache_specs(self, prefix: str, axis: str) -> list[TensorSpec]:
        """``{prefix}{i}.key`` and ``.value`` of every layer: [batch, heads, ``axis``, head size]."""
        return [
            TensorSpec(f"{prefix}{i}.{n}", "float", ("batch", kv.heads, axis, size))
            for i, kv in enumerate(self.kv_shapes())
            for n, size in (("key", kv.head_dim), ("value", kv.value_head_dim))
        ]

    def check_task(self, task: str) -> None:
        super().check_task(task)
        if task == TEXT_CLASSIFICATION and getattr(self.hf_config, "pad_token_id", None) is None:
            # batch > 1 needs it: the head reads each row's last token that is not padding
            raise GpclError(
                f"{self.name} text-classification needs pad_token_id in config.json (the head reads each row's "
                "last non-padding token); set it to the tokenizer's pad id"
            )

    def outputs(self, task: str) -> list[TensorSpec]:
        if task not in (TEXT_GENERATION, TEXT_GENERATION_WITH_PAST):
            return self._head_outputs(task, ("batch", "sequence"))
        specs = [TensorSpec("logits", "float", ("batch", "sequence", self._logits or self.vocab_size))]
        if task == TEXT_GENERATION_WITH_PAST:
            specs += self._cache_specs(feeds.PRESENT_PREFIX, "total_sequence")
        return specs

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        if task == TEXT_GENERATION_WITH_PAST:
            self._kv = probe_kv_cache(model, self.name)
            return CausalLMWithPastCore(model, self.num_layers, [s.name for s in self.outputs(task)])
        if task == FEATURE_EXTRACTION:
            return EncoderCore(model, ["last_hidden_state"], use_cache=False, return_dict=True)
        return CausalLMCore(model, [s.name for s in self.outputs(task)], return_dict=True)


def _config_says_rotary(cfg: Any) -> bool:
    """RoPE, by what the config carries: rope_parameters (transformers 5) or a rotary size."""
    if getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None):
        return True
    return any(getattr(cfg, a, None) for a in ("rotary_dim", "rotary_pct", "rotary_emb_base", "partial_rotary_factor"))


def probe_kv_cache(model: torch.nn.Module, name: str) -> list[KVShape] | None:
    """Per-layer KV heads and head size, read from the cache after one forward of two tokens
    (layers may differ: Gemma 3, sliding/full hybrids, models that share KV across layers). A
    model whose cache holds anything but key/value tensors (Mamba or linear-attention states) is
    refused for with-past export. None when that forward cannot run here (the shapes then come
    from the config, and validation against PyTorch checks them)."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    ids = torch.tensor([[1, 2]], dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, return_dict=True)
    except ValueError as exc:  # transformers' own refusal, e.g. a cache of linear-attention layers only
        raise GpclError(
            f"text-generation-with-past is not supported for {name}: its cache does not run with key/value "
            f"tensors ({one_line(exc)}); export --task text-generation instead"
        ) from None
    except Exception:  # e.g. routing that reads tensor values (JetMoE) on a lazy export's fake weights
        return None
    cache = _out_cache(out)
    layers = getattr(cache, "layers", None)
    kinds = sorted({type(layer).__name__ for layer in layers or ()})
    if not layers or any(k not in _KV_LAYERS for k in kinds):
        what = type(cache).__name__ if cache is not None else "no cache"
        detail = f" with {', '.join(kinds)} layers" if layers else ""
        raise GpclError(
            f"text-generation-with-past is not supported for {name}: its cache is {what}{detail}, not key/value "
            "tensors per layer; export --task text-generation instead"
        )
    shapes = []
    for layer in layers:
        k, v = layer.keys, layer.values
        if k is None or k.dim() != 4 or v is None or v.shape[:2] != k.shape[:2]:
            raise GpclError(
                f"text-generation-with-past is not supported for {name}: a cache layer holds no 4-D key/value; "
                "export --task text-generation instead"
            )
        key_dim, value_dim = int(k.shape[3]), int(v.shape[3])
        shapes.append(KVShape(int(k.shape[1]), key_dim, None if value_dim == key_dim else value_dim))
    return shapes


# ----------------------------------------------------------------------------- per architecture
def _falcon_alibi_bf16_emulated(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' Falcon ``build_alibi_tensor`` with its bfloat16 product spelled as float32
    arithmetic on bfloat16-rounded operands, rounded to bfloat16 once: the same numbers (a
    product of two 8-bit mantissas is exact in float32), but ONNX Runtime's CPU provider has no
    bfloat16 Mul, so the original exports and then cannot run (NOT_IMPLEMENTED: Mul(14))."""
    import math

    batch_size, seq_length = attention_mask.shape
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.full(
        (), 2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), device=attention_mask.device, dtype=torch.float32
    )
    powers = torch.arange(1, 1 + closest_power_of_2, device=attention_mask.device, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    if closest_power_of_2 != num_heads:
        extra_base = torch.full(
            (),
            2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))),
            device=attention_mask.device,
            dtype=torch.float32,
        )
        num_remaining_heads = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining_heads, 2, device=attention_mask.device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    arange_tensor = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    rounded = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    alibi = (rounded(slopes[..., None]) * rounded(arange_tensor)).to(torch.bfloat16)
    return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)


class Falcon(DecoderOnly):
    """Falcon with ``alibi=True`` (falcon-rw): its ALiBi bias is a bfloat16 product, which the
    exporter writes as a bfloat16 Mul that ONNX Runtime's CPU provider cannot run; the generic
    path exports but never validates. Rotary Falcon (7B/40B/180B style) is the generic path."""

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        core = super().core(model, task)
        if getattr(self.hf_config, "alibi", False):
            from transformers.models.falcon import modeling_falcon

            core.patches.append((modeling_falcon, "build_alibi_tensor", _falcon_alibi_bf16_emulated))
        return core


def _rotary_as_real_pairs(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """A complex rotary module's forward with ``polar(1, freqs) * scaling`` kept as real
    (cos, sin) pairs in a last axis of 2."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``view_as_real(view_as_complex(x) * freqs).flatten(-2)``, in real arithmetic."""
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xr[..., 0], xr[..., 1]
    cos, sin = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def _apply_rotary_pairs(head_axis: int) -> Any:
    """``apply_rotary_emb(xq, xk, freqs)`` on real pairs; the frequencies get a head axis at
    ``head_axis`` (1: q/k are [batch, heads, seq, dim]; 2: [batch, seq, heads, dim])."""

    def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = freqs.to(xq.device).unsqueeze(head_axis)
        return _rotate_pairs(xq, f), _rotate_pairs(xk, f)

    return apply_rotary_emb


class RealRotary(DecoderOnly):
    """DeepSeek-V2 and Llama 4 compute RoPE as complex products (``torch.polar``,
    ``view_as_complex``); ONNX has no complex type and the exporter stops ("no decompositions
    registered for the complex-valued input"). Here the same products run in real arithmetic on
    (cos, sin) pairs while the model is traced (and validated: the numbers agree with the complex
    version to float rounding, tests/test_families.py)."""

    # model_type -> (transformers module, rotary module class, where apply_rotary_emb's q/k keep heads)
    WHERE: ClassVar[dict[str, tuple[str, str, int]]] = {
        "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2RotaryEmbedding", 1),
        "llama4_text": ("transformers.models.llama4.modeling_llama4", "Llama4TextRotaryEmbedding", 2),
    }

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        import importlib

        from transformers.modeling_rope_utils import dynamic_rope_update

        core = super().core(model, task)
        module_name, rotary_class, head_axis = self.WHERE[self.name]
        module = importlib.import_module(module_name)
        core.patches += [
            (getattr(module, rotary_class), "forward", dynamic_rope_update(_rotary_as_real_pairs)),
            (module, "apply_rotary_emb", _apply_rotary_pairs(head_axis)),
        ]
        return core


# ----------------------------------------------------------------------------- resolving
FAMILIES: tuple[type[ArchConfig], ...] = (TextEncoder, DecoderOnly, VisionEncoder)

# Per-architecture classes, only where the generic path measurably fails (model_type -> class).
OVERRIDES: dict[str, type[ArchConfig]] = {"falcon": Falcon, **dict.fromkeys(RealRotary.WHERE, RealRotary)}


def _refusal(model_type: str, cls_name: str | None) -> str | None:
    for mapping, what, task in REFUSED:
        if (cls_name and _class_in_mapping(mapping, cls_name)) or (not cls_name and _in_mapping(mapping, model_type)):
            return f"{model_type} is {what} (task {task}), which gpcl-trt does not export yet"
    return None


def _is_decoder_type(model_type: str) -> bool:
    # BERT-like encoders also have a causal LM head class (BertLMHeadModel); they have a masked LM one too.
    return _in_mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", model_type) and not _in_mapping(
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES", model_type
    )


def _family_of_task(task: str, model_type: str) -> type[ArchConfig] | None:
    if task in (TEXT_GENERATION, TEXT_GENERATION_WITH_PAST):
        return DecoderOnly
    if task == IMAGE_CLASSIFICATION:
        return VisionEncoder
    if _is_decoder_type(model_type):
        return DecoderOnly
    cls = head_class(task, model_type)
    params = forward_params(cls) if cls is not None else set()
    if "pixel_values" in params and "input_ids" not in params:
        return VisionEncoder
    if "input_ids" in params and "pixel_values" not in params:
        return TextEncoder
    return None


def _family_by_type(model_type: str) -> type[ArchConfig] | None:
    if _is_decoder_type(model_type):
        return DecoderOnly
    for task in (
        FILL_MASK,
        TEXT_CLASSIFICATION,
        TOKEN_CLASSIFICATION,
        QUESTION_ANSWERING,
        IMAGE_CLASSIFICATION,
        FEATURE_EXTRACTION,
    ):
        if _in_mapping(TASK_HEADS[task][0], model_type):
            family = _family_of_task(task, model_type)
            if family is not None:
                return family
    return None


def _family_by_names(raw: dict) -> type[ArchConfig] | None:
    """Custom code (auto_map): the Auto classes it registers and its head class name."""
    keys = set((raw.get("auto_map") or {}).keys())
    head = ((raw.get("architectures") or [None])[0]) or ""
    if "AutoModelForCausalLM" in keys or head.endswith(("ForCausalLM", "LMHeadModel")):
        return DecoderOnly
    if "AutoModelForImageClassification" in keys or head.endswith("ForImageClassification"):
        return VisionEncoder
    if keys & {
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
    } or head.endswith(("ForMaskedLM", "ForSequenceClassification")):
        return TextEncoder
    return None


def resolve_family(raw: dict, where: str, trust_remote_code: bool = False) -> type[ArchConfig]:
    """The family class for a parsed config.json (``where`` names it in messages). Raises
    GpclError with one line saying what the model is and what the user can do."""
    from transformers import __version__ as tf_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise GpclError(f"{where} has no model_type; expected a Hugging Face config.json")
    archs = raw.get("architectures") or []
    head = archs[0] if archs and isinstance(archs[0], str) else None
    if model_type not in CONFIG_MAPPING_NAMES:
        if raw.get("auto_map"):
            if not trust_remote_code:
                raise GpclError(
                    f"model_type {model_type!r} in {where} is custom code shipped with the checkpoint (auto_map); "
                    "pass --trust-remote-code if you trust it"
                )
            family = _family_by_names(raw)
            if family is not None:
                return family
        raise GpclError(
            f"unsupported architecture: transformers {tf_version} does not know model_type {model_type!r} ({where}); "
            "upgrade transformers, or pass --trust-remote-code if the checkpoint ships its own code"
        )
    if model_type in OVERRIDES:
        return OVERRIDES[model_type]
    task = task_of_class(head) if head else None
    refusal = _refusal(model_type, head if task is None else None)
    if task is None and refusal is None and raw.get("is_encoder_decoder"):
        refusal = (
            f"{model_type} is an encoder-decoder model (task text2text-generation), which gpcl-trt does not export yet"
        )
    if refusal:
        raise GpclError(f"unsupported architecture ({where}): {refusal}")
    family = (_family_of_task(task, model_type) if task else None) or _family_by_type(model_type)
    if family is None:
        raise GpclError(
            f"unsupported architecture ({where}): model_type {model_type!r}"
            + (f" ({head})" if head else "")
            + " is not a text encoder, decoder-only LM or ViT-like vision encoder in transformers' auto classes"
        )
    return family


def supported_tasks() -> dict[str, tuple[str, ...]]:
    return {f.family: f.tasks for f in FAMILIES}
