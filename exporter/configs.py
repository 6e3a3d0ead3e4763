"""Family configs: the ONNX inputs/outputs (names, dtypes, dynamic axes) of each architecture
family and the core module that is traced (exporter/cores.py).

The family is read from the checkpoint (exporter/families.py), not from a list of names. What
differs between models of one family (whether the forward takes ``token_type_ids``, rotary
positions, the per-layer shape of the KV cache, the vocabulary of the LM head) is read from the
model class's forward signature, the config, or one tiny forward of the loaded model
(:func:`probe_kv_cache`), never from its name. Per-architecture subclasses, only where the
generic path measurably fails, are in exporter/overrides.py.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gpcl_trt import feeds
from gpcl_trt.common import GpclError, one_line
from gpcl_trt.exporter.cores import (
    AudioCore,
    CausalLMCore,
    CausalLMWithPastCore,
    DualEncoderCore,
    EncoderCore,
    VisionCore,
    out_cache,
)
from gpcl_trt.exporter.patchers import dynamic_rope_patches
from gpcl_trt.exporter.tasks import (
    AUDIO_CLASSIFICATION,
    AUTOMATIC_SPEECH_RECOGNITION,
    FEATURE_EXTRACTION,
    FILL_MASK,
    IMAGE_CLASSIFICATION,
    QUESTION_ANSWERING,
    TASK_HEADS,
    TEXT_CLASSIFICATION,
    TEXT_GENERATION,
    TEXT_GENERATION_WITH_PAST,
    TOKEN_CLASSIFICATION,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
    forward_params,
    head_class,
    is_decoder_type,
    task_of_class,
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


# ----------------------------------------------------------------------------- text encoders
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
    def convolutional(self) -> bool:
        """Convolutional stages (ResNet, ConvNeXt, MobileViT: per-stage ``hidden_sizes`` and no
        ``hidden_size``): features are a [batch, channels, height, width] map, not tokens."""
        return getattr(self.hf_config, "hidden_size", None) is None and bool(
            getattr(self.hf_config, "hidden_sizes", None)
        )

    @property
    def vocab_size(self) -> int:  # no token ids; kept so callers that ask get a number
        return 0

    def inputs(self, task: str) -> list[TensorSpec]:
        channels = int(getattr(self.hf_config, "num_channels", 3))
        return [TensorSpec(feeds.PIXEL_VALUES, "float", ("batch", channels, *self.image_size))]

    def outputs(self, task: str) -> list[TensorSpec]:
        if task == FEATURE_EXTRACTION and self.convolutional:  # sizes fixed by the image size
            return [TensorSpec("last_hidden_state", "float", ("batch", None, None, None))]
        return self._head_outputs(task, ("batch", None))  # the token count is fixed by the image size

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        return VisionCore(model, [s.name for s in self.outputs(task)], return_dict=True)


# ----------------------------------------------------------------------------- audio encoders
class AudioEncoder(ArchConfig):
    """wav2vec2-style speech encoders (wav2vec2, HuBERT, WavLM, Data2Vec-audio...): raw waveform
    ``input_values`` [batch, samples] -> a convolutional feature encoder (a frame per 320
    samples, 20 ms at 16 kHz, for wav2vec2's strides) -> a transformer encoder. Optimum's I/O: CTC ``logits``
    [batch, frames, vocab] (automatic-speech-recognition), ``logits`` [batch, labels]
    (audio-classification) or ``last_hidden_state``."""

    family = "audio-encoder"
    tasks = (AUTOMATIC_SPEECH_RECOGNITION, AUDIO_CLASSIFICATION, FEATURE_EXTRACTION)
    main_input = "input_values"

    @property
    def vocab_size(self) -> int:  # no token ids in; the CTC head's size is read from the config
        return 0

    def inputs(self, task: str) -> list[TensorSpec]:
        return [TensorSpec(feeds.INPUT_VALUES, "float", ("batch", feeds.SAMPLES))]

    def outputs(self, task: str) -> list[TensorSpec]:
        if task == AUTOMATIC_SPEECH_RECOGNITION:
            return [TensorSpec("logits", "float", ("batch", None, int(self.hf_config.vocab_size)))]
        if task == AUDIO_CLASSIFICATION:
            return [TensorSpec("logits", "float", ("batch", self.num_labels))]
        return [TensorSpec("last_hidden_state", "float", ("batch", None, self.hidden_size))]

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        return AudioCore(model, [s.name for s in self.outputs(task)], return_dict=True)


# ----------------------------------------------------------------------------- dual encoders
class DualEncoder(ArchConfig):
    """CLIP-style dual encoders (CLIP, SigLIP, ...): a text tower and a vision tower, scored
    against each other. Optimum's I/O: ``input_ids``, ``pixel_values``, ``attention_mask`` (where
    the forward takes it) -> ``logits_per_image`` [image batch, text batch], ``logits_per_text``,
    ``text_embeds``, ``image_embeds``; feature-extraction gives the two embeddings. The texts and
    the images are batched apart (zero-shot scores N images against M labels). Either tower alone
    is a text or vision encoder checkpoint (``clip_text_model``, ``siglip_vision_model``...)."""

    family = "dual-encoder"
    tasks = (ZERO_SHOT_IMAGE_CLASSIFICATION, FEATURE_EXTRACTION)

    @property
    def vision_config(self) -> Any:
        return self.hf_config.vision_config

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.vision_config, "image_size", 224)
        return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))

    def inputs(self, task: str) -> list[TensorSpec]:
        channels = int(getattr(self.vision_config, "num_channels", 3))
        specs = [
            TensorSpec(feeds.INPUT_IDS, "int64", ("text_batch", "sequence")),
            TensorSpec(feeds.PIXEL_VALUES, "float", ("image_batch", channels, *self.image_size)),
        ]
        if "attention_mask" in self.params(task):
            specs.append(TensorSpec(feeds.ATTENTION_MASK, "int64", ("text_batch", "sequence")))
        return specs

    def outputs(self, task: str) -> list[TensorSpec]:
        embeds = [
            TensorSpec("text_embeds", "float", ("text_batch", None)),
            TensorSpec("image_embeds", "float", ("image_batch", None)),
        ]
        if task == FEATURE_EXTRACTION:
            return embeds
        return [
            TensorSpec("logits_per_image", "float", ("image_batch", "text_batch")),
            TensorSpec("logits_per_text", "float", ("text_batch", "image_batch")),
            *embeds,
        ]

    def core(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self._bind(model)
        return DualEncoderCore(model, [s.name for s in self.outputs(task)], return_dict=True)


# ----------------------------------------------------------------------------- decoders
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
            cached = getattr(cfg, "use_cache", None) and not states and is_decoder_type(self.name)
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
            core = CausalLMWithPastCore(model, self.num_layers, [s.name for s in self.outputs(task)])
        elif task == FEATURE_EXTRACTION:
            core = EncoderCore(model, ["last_hidden_state"], use_cache=False, return_dict=True)
        else:
            core = CausalLMCore(model, [s.name for s in self.outputs(task)], return_dict=True)
        # a config variant of any rotary decoder, so by what the model holds, not by model_type
        core.patches += dynamic_rope_patches(model)
        return core


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
    cache = out_cache(out)
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
