"""Tasks: the task names gpcl-trt exports, the transformers head class serving each task, and
the task of a head class, all read from transformers' own auto-class mappings
(``transformers.models.auto.modeling_auto``), never from a list of model names."""

from __future__ import annotations

import inspect
from typing import Any

FEATURE_EXTRACTION = "feature-extraction"
FILL_MASK = "fill-mask"
TEXT_CLASSIFICATION = "text-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
TEXT_GENERATION = "text-generation"
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
IMAGE_CLASSIFICATION = "image-classification"
ZERO_SHOT_IMAGE_CLASSIFICATION = "zero-shot-image-classification"
AUTOMATIC_SPEECH_RECOGNITION = "automatic-speech-recognition"  # CTC heads (wav2vec2-style encoders)
AUDIO_CLASSIFICATION = "audio-classification"
# encoder-decoder text models (T5, BART, Marian, Pegasus): an encoder graph and a decoder graph with past
TEXT2TEXT_GENERATION = "text2text-generation"
TASKS = (
    FEATURE_EXTRACTION,
    FILL_MASK,
    TEXT_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    QUESTION_ANSWERING,
    TEXT_GENERATION,
    TEXT_GENERATION_WITH_PAST,
    IMAGE_CLASSIFICATION,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
    AUTOMATIC_SPEECH_RECOGNITION,
    AUDIO_CLASSIFICATION,
    TEXT2TEXT_GENERATION,
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
    ZERO_SHOT_IMAGE_CLASSIFICATION: (
        "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForZeroShotImageClassification",
    ),
    AUTOMATIC_SPEECH_RECOGNITION: ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC"),
    AUDIO_CLASSIFICATION: ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "AutoModelForAudioClassification"),
    TEXT2TEXT_GENERATION: ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
}
# Whisper-style speech encoder-decoders serve automatic-speech-recognition through this mapping (CTC heads above)
SPEECH_SEQ2SEQ_HEADS = ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq")


def auto_mapping(name: str) -> dict[str, Any]:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name, {}) or {}


def _names(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) if value else ()


def in_mapping(mapping: str, model_type: str) -> bool:
    return bool(_names(auto_mapping(mapping).get(model_type)))


def class_in_mapping(mapping: str, cls_name: str) -> bool:
    return any(cls_name in _names(v) for v in auto_mapping(mapping).values())


def head_class(task: str, model_type: str) -> type | None:
    """The transformers class serving ``task`` for ``model_type`` (None if it has none)."""
    import transformers

    for name in _names(auto_mapping(TASK_HEADS[task][0]).get(model_type)):
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
    # a dual encoder's class (CLIPModel) is also AutoModel's: its own task comes first
    order = [ZERO_SHOT_IMAGE_CLASSIFICATION, *(t for t in TASK_HEADS if t != ZERO_SHOT_IMAGE_CLASSIFICATION)]
    for task in order:
        if task != TEXT_GENERATION_WITH_PAST and class_in_mapping(TASK_HEADS[task][0], cls_name):
            return task
    return None


def is_decoder_type(model_type: str) -> bool:
    # BERT-like encoders also have a causal LM head class (BertLMHeadModel); they have a masked LM one too.
    return in_mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", model_type) and not in_mapping(
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES", model_type
    )
