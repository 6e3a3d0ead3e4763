"""Family resolution: config.json (``architectures``, ``model_type``, ``auto_map``) -> the family
config class (text encoder, decoder-only LM, vision encoder, or a per-architecture override), from
transformers' auto-class mappings; encoder-decoder, audio and multimodal models, unknown model
types and custom code without --trust-remote-code are refused in one line that says what the
model is and what the user can do."""

from __future__ import annotations

from gpcl_trt.common import GpclError
from gpcl_trt.exporter.configs import (
    ArchConfig,
    AudioEncoder,
    DecoderOnly,
    DualEncoder,
    TextEncoder,
    VisionEncoder,
)
from gpcl_trt.exporter.overrides import OVERRIDES
from gpcl_trt.exporter.seq2seq import Seq2Seq
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
    class_in_mapping,
    forward_params,
    head_class,
    in_mapping,
    is_decoder_type,
    task_of_class,
)

# Encoder-decoder heads (exporter/seq2seq.py): text2text-generation and Whisper-style speech.
SEQ2SEQ_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")

# Families that are out of scope for now: mapping -> (what the model is, the task it would need).
REFUSED: tuple[tuple[str, str, str], ...] = (
    ("MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES", "an audio model", "text-to-audio"),
    ("MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES", "an audio model", "text-to-audio"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "a multimodal (image + text) model", "image-text-to-text"),
    ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "a multimodal model", "any-to-any"),
)


# The generic families; a model_type in OVERRIDES (exporter/overrides.py) takes its own class.
FAMILIES: tuple[type[ArchConfig], ...] = (
    TextEncoder,
    DecoderOnly,
    VisionEncoder,
    DualEncoder,
    AudioEncoder,
    Seq2Seq,
)


# Heads refused by their class only: the same model types also have heads that are exported
# (Wav2Vec2ForCTC is, Wav2Vec2ForAudioFrameClassification is not).
REFUSED_HEADS: tuple[tuple[str, str, str], ...] = (
    ("MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES", "an audio model", "audio-frame-classification"),
    ("MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES", "an audio model", "audio-xvector"),
)


def _refusal(model_type: str, cls_name: str | None) -> str | None:
    for mapping, what, task in REFUSED:
        if (cls_name and class_in_mapping(mapping, cls_name)) or (not cls_name and in_mapping(mapping, model_type)):
            return f"{model_type} is {what} (task {task}), which gpcl-trt does not export yet"
    for mapping, what, task in REFUSED_HEADS:
        if cls_name and class_in_mapping(mapping, cls_name):
            return f"{model_type} ({cls_name}) is {what} (task {task}), which gpcl-trt does not export yet"
    return None


def _family_of_task(task: str, model_type: str) -> type[ArchConfig] | None:
    if task in (TEXT_GENERATION, TEXT_GENERATION_WITH_PAST):
        return DecoderOnly
    if task == IMAGE_CLASSIFICATION:
        return VisionEncoder
    if task == ZERO_SHOT_IMAGE_CLASSIFICATION or in_mapping(TASK_HEADS[ZERO_SHOT_IMAGE_CLASSIFICATION][0], model_type):
        return DualEncoder
    if is_decoder_type(model_type):
        return DecoderOnly
    cls = head_class(task, model_type)
    params = forward_params(cls) if cls is not None else set()
    if "input_values" in params:  # a raw waveform in: CTC, audio-classification or the bare encoder
        return AudioEncoder
    if task in (AUTOMATIC_SPEECH_RECOGNITION, AUDIO_CLASSIFICATION):
        return None  # log-mel features (Whisper's encoder) are not this family
    if "pixel_values" in params and "input_ids" not in params:
        return VisionEncoder
    if "input_ids" in params and "pixel_values" not in params:
        return TextEncoder
    return None


def _family_by_type(model_type: str) -> type[ArchConfig] | None:
    if is_decoder_type(model_type):
        return DecoderOnly
    for task in (
        FILL_MASK,
        TEXT_CLASSIFICATION,
        TOKEN_CLASSIFICATION,
        QUESTION_ANSWERING,
        IMAGE_CLASSIFICATION,
        AUTOMATIC_SPEECH_RECOGNITION,
        AUDIO_CLASSIFICATION,
        FEATURE_EXTRACTION,
    ):
        if in_mapping(TASK_HEADS[task][0], model_type):
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


def _is_seq2seq(model_type: str, head: str | None, raw: dict) -> bool:
    """An encoder-decoder generation head (T5ForConditionalGeneration, MarianMTModel,
    WhisperForConditionalGeneration...), or no head named and an encoder-decoder model_type
    that has one."""
    if head:
        return any(class_in_mapping(m, head) for m in SEQ2SEQ_MAPPINGS)
    return bool(raw.get("is_encoder_decoder", True)) and any(in_mapping(m, model_type) for m in SEQ2SEQ_MAPPINGS)


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
    if _is_seq2seq(model_type, head, raw):
        return Seq2Seq
    if any(in_mapping(m, model_type) for m in SEQ2SEQ_MAPPINGS) and raw.get("is_encoder_decoder", True):
        # the bare model (T5Model, BartModel): no LM head, nothing to decode with
        raise GpclError(
            f"unsupported architecture ({where}): {model_type} ({head or 'no head'}) is an encoder-decoder model "
            "(task text2text-generation) without its generation head; export a checkpoint whose architectures "
            "name its ...ForConditionalGeneration class"
        )
    task = task_of_class(head) if head else None
    refusal = _refusal(model_type, head if task is None else None)
    if task is None and refusal is None and raw.get("is_encoder_decoder"):
        refusal = (
            f"{model_type} is an encoder-decoder model without a text2text-generation or speech-to-text head in "
            "transformers, which gpcl-trt does not export"
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
