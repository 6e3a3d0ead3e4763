"""The generation model that ``gpcl-trt triton`` writes next to a decoder's tensor model:
``REPO/NAME_generate``, python backend, decoupled, speaking Triton's generate extension with the
request and response names of TensorRT-LLM's and vLLM's Triton backends. Its ``1/`` holds the
decoder (weights linked, as for the tensor model), ``model.py`` (``triton_generate_model.py``)
and the tokenizer / config files of the model directory (linked through gpcl_trt.weightfiles).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gpcl_trt import weightfiles
from gpcl_trt.common import GpclError, atomic_dir, sha256_file, write_manifest
from gpcl_trt.feeds import is_past
from gpcl_trt.text import TOKENIZER_FILES

SUFFIX = "_generate"
MODEL_SOURCE = Path(__file__).with_name("triton_generate_model.py")
# (name, Triton type, dims, optional): TensorRT-LLM's / vLLM's field names
INPUTS = (
    ("text_input", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("random_seed", "TYPE_UINT64", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),
    ("bad_words", "TYPE_STRING", [-1], True),
    ("end_id", "TYPE_INT32", [1], True),
    ("pad_id", "TYPE_INT32", [1], True),
    ("return_log_probs", "TYPE_BOOL", [1], True),
)
# text_output, and TensorRT-LLM's token outputs: output_ids (the new ids; a whole answer padded with
# pad_id to max_tokens when the request gives one), sequence_length (new ids so far), and with
# return_log_probs each new id's log-probability (output_log_probs) and their sum (cum_log_probs)
OUTPUTS = (
    ("text_output", "TYPE_STRING", [-1]),
    ("output_ids", "TYPE_INT32", [-1]),
    ("sequence_length", "TYPE_INT32", [1]),
    ("output_log_probs", "TYPE_FP32", [-1]),
    ("cum_log_probs", "TYPE_FP32", [1]),
)
CONFIG_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")
# an encoder-decoder's generation model also takes the feature extractor (Whisper) and its two graphs
SEQ2SEQ_FILES = ("preprocessor_config.json",)
ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model_merged.onnx"
# a speech model's request: FP32 mono samples at the feature extractor's rate (text_input is then absent)
AUDIO_INPUT = ("audio", "TYPE_FP32", [-1], True)
# the model's generation rules (gpcl_trt.generate.rules), from the artifact's manifest chain at write time: the
# version directory's model.onnx has no manifest, so the served model reads them from here
RULES_FILE = "gpcl_generation.json"


def generate_name(name: str) -> str:
    return name + SUFFIX


def why_not(artifact: Path, backend: str, io: dict, tokenizer_dir: Path | None) -> str | None:
    """None when a generation model can be written for this artifact, else the reason."""
    if backend == "tensorrt":
        return "the generation loop has no TensorRT runtime yet (engines serve the tensor model only)"
    if any(is_past(t["name"]) and ".encoder." in t["name"] for t in io["inputs"]):
        return "an encoder-decoder's decoder alone: give the export directory, or the decoder with --encoder FILE"
    if artifact.suffix != ".onnx" or not any(is_past(t["name"]) for t in io["inputs"]):
        return "not a decoder exported with past (past_key_values.* inputs)"
    if tokenizer_dir is None:
        return "no model directory in the manifest chain to take the tokenizer from (pass --tokenizer DIR)"
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        return f"no tokenizer files in {tokenizer_dir} (pass --tokenizer DIR)"
    return None


def build_generate_config(name: str, slots: int, params: dict[str, str], speech: bool = False):
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    inputs = [(n, t, d, o or speech) for n, t, d, o in INPUTS] + ([AUDIO_INPUT] if speech else [])
    for input_name, dtype, dims, optional in inputs:
        cfg.input.add(name=input_name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional)
    for output_name, dtype, dims in OUTPUTS:
        cfg.output.add(name=output_name, data_type=mc.DataType.Value(dtype), dims=dims)
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    for key, value in sorted((params | {"slots": str(slots)}).items()):
        cfg.parameters[key].string_value = value
    return cfg


def write_generate_model(
    artifact: Path,
    repo: Path,
    name: str,
    tokenizer_dir: Path,
    config_dir: Path | None,
    slots: int = 8,
    default_max_tokens: int = 16,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``repo/name`` (already ``NAME_generate``); returns its paths and config text."""
    # the tensor model's helpers: weights linked under the model file's names, the stub's site dirs
    from gpcl_trt.deploy.triton import _python_path, _save_onnx, config_text, parse_config
    from gpcl_trt.generate.rules import generation_section, settings_from
    from gpcl_trt.manifest import generation_of

    if slots < 1:
        raise GpclError(f"--generate-slots must be >= 1, got {slots}")
    final = repo / name
    with atomic_dir(final, force=force) as tmp:
        vdir = tmp / "1"
        vdir.mkdir()
        _save_onnx(artifact, vdir / "model.onnx")
        shutil.copyfile(MODEL_SOURCE, vdir / "model.py")
        linked = []
        for d, names in ((tokenizer_dir, TOKENIZER_FILES + CONFIG_FILES), (config_dir, CONFIG_FILES)):
            for f in names if d is not None else ():
                if (d / f).is_file() and not (vdir / f).exists():
                    weightfiles.link_or_copy(d / f, vdir / f)
                    linked.append(f)
        section = generation_of(artifact)
        source = "manifest" if section is not None else "config.json"  # config.json: exports made before
        section = section if section is not None else generation_section(config_dir)
        rules = settings_from(section, source=source)  # a rule this version does not follow: refused here
        (vdir / RULES_FILE).write_text(json.dumps(section, indent=1) + "\n")
        params = {
            "onnx_file": "model.onnx",
            "gpcl_python_path": _python_path(),
            "default_max_tokens": str(default_max_tokens),
        }
        text = config_text(build_generate_config(name, slots, params))
        parse_config(text)
        (tmp / "config.pbtxt").write_text(text)
        (tmp / "README.md").write_text(_readme(name))
        write_manifest(
            tmp / "config.pbtxt",
            stage="triton",
            inputs={"artifact": {"path": str(artifact), "sha256": sha256_file(artifact)}},
            options={"backend": "python", "generate": True, "slots": slots, "tokenizer": str(tokenizer_dir)},
            results={
                "inputs": [i[0] for i in INPUTS],
                "outputs": [o[0] for o in OUTPUTS],
                "files": sorted(linked),
                "generation": section,
                "generation_from": rules["from"],
            },
            packages=("tritonclient", "onnx", "transformers"),
            weight_files={
                f"1/{f.name}": weightfiles.file_identity(f)
                for f in sorted(vdir.iterdir())
                if f.name.startswith("model.onnx")
            },
        )
    return {
        "name": name,
        "model_dir": str(final),
        "config": str(final / "config.pbtxt"),
        "slots": slots,
        "rules": rules["rules"],
        "rules_from": rules["from"],
    }


def _readme(name: str, seq2seq: bool = False, speech: bool = False) -> str:
    if seq2seq:
        example = (
            '{"audio": [0.0, 0.01, ...], "max_tokens": 32}'
            if speech
            else '{"text_input": "translate: hello", "max_tokens": 32}'
        )
        return (
            f"# Triton model `{name}` (python backend, decoupled: encoder-decoder generation)\n\n"
            "Written by `gpcl-trt triton` for an encoder-decoder export, next to its two tensor models.\n"
            "The same generate endpoint and fields as a decoder's generation model:\n\n"
            f"    curl -s localhost:8000/v2/models/{name}/generate -d '{example}'\n\n"
            + (
                "A speech model (Whisper) takes `audio`: FP32 mono samples at its feature extractor's rate\n"
                "(16 kHz), e.g. a WAV file's samples; `1/preprocessor_config.json` turns them into features.\n"
                if speech
                else ""
            )
            + f"`1/{ENCODER_FILE}` runs once per request, then `1/{DECODER_FILE}` one token a step;\n"
            "requests are decoded one at a time in arrival order (the decoder takes no self-attention mask,\n"
            "so requests at different steps cannot share a batch); the others wait.\n"
        )
    return (
        f"# Triton model `{name}` (python backend, decoupled: text generation)\n\n"
        "Written by `gpcl-trt triton` next to the decoder's tensor model. It speaks Triton's generate\n"
        "extension with the field names of TensorRT-LLM's and vLLM's backends:\n\n"
        f"    curl -s localhost:8000/v2/models/{name}/generate \\\n"
        '      -d \'{"text_input": "Once upon a time", "max_tokens": 32}\'\n'
        f"    curl -sN localhost:8000/v2/models/{name}/generate_stream \\\n"
        '      -d \'{"text_input": "Once upon a time", "max_tokens": 32, "stream": true}\'\n\n'
        "Fields: text_input, max_tokens, stream, temperature, top_k, top_p, random_seed, stop_words and\n"
        "bad_words (lists of strings), end_id (-1: no end id), pad_id, return_log_probs. Answer:\n"
        "text_output, output_ids (padded with pad_id to max_tokens when given, not streaming),\n"
        "sequence_length, and with return_log_probs output_log_probs and cum_log_probs. The KV cache\n"
        "stays in the server: requests share one in-flight batch of `slots` rows, the rest wait.\n"
        'A bad value is that request\'s 400, one line. A JSON value of the wrong type (`"max_tokens":\n'
        '"ten"`, `"text_input": 3`) is answered by Triton\'s HTTP frontend itself with a 500 before this\n'
        "model sees it: the inputs are typed as TensorRT-LLM's, so that its gRPC clients work unchanged.\n"
        "gRPC clients may also send the fields as request parameters (`max_tokens`: any integer type;\n"
        "`stop_words` / `bad_words`: one string); those are checked here.\n"
        f"`1/{RULES_FILE}` holds the model's generation rules (EOS ids, positions, re-prefill).\n"
        "`gpcl_python_path` lists where gpcl_trt, onnxruntime and transformers are found.\n"
    )


def write_seq2seq_generate_model(
    encoder: Path,
    decoder: Path,
    repo: Path,
    name: str,
    tokenizer_dir: Path,
    config_dir: Path | None,
    default_max_tokens: int = 16,
    force: bool = False,
) -> dict[str, Any]:
    """``repo/name`` for an encoder-decoder: the same endpoint and fields as a decoder's, its ``1/``
    holding both graphs (encoder_model.onnx, decoder_model_merged.onnx), the tokenizer, config and
    generation config (the seq2seq runtime reads its rules from them: generate/seq2seq.py) and, for
    Whisper, the feature extractor; a speech model's request gives ``audio`` instead of text_input."""
    from gpcl_trt.deploy.triton import _python_path, _save_onnx, config_text, onnx_io, parse_config
    from gpcl_trt.generate.seq2seq import generation_rules

    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        raise GpclError(f"no tokenizer files in {tokenizer_dir} (pass --tokenizer DIR)")
    speech = any(t["name"] == "input_features" for t in onnx_io(encoder)["inputs"])
    if speech and (config_dir is None or not (config_dir / SEQ2SEQ_FILES[0]).is_file()):
        raise GpclError(f"a speech model needs its feature extractor ({SEQ2SEQ_FILES[0]}) in the model directory")
    rules = generation_rules(config_dir)
    final = repo / name
    with atomic_dir(final, force=force) as tmp:
        vdir = tmp / "1"
        vdir.mkdir()
        _save_onnx(encoder, vdir / ENCODER_FILE)
        _save_onnx(decoder, vdir / DECODER_FILE)
        shutil.copyfile(MODEL_SOURCE, vdir / "model.py")
        linked = []
        for d, names in ((tokenizer_dir, TOKENIZER_FILES + CONFIG_FILES), (config_dir, CONFIG_FILES + SEQ2SEQ_FILES)):
            for f in names if d is not None else ():
                if (d / f).is_file() and not (vdir / f).exists():
                    weightfiles.link_or_copy(d / f, vdir / f)
                    linked.append(f)
        params = {
            "onnx_file": DECODER_FILE,
            "encoder_file": ENCODER_FILE,
            "gpcl_python_path": _python_path(),
            "default_max_tokens": str(default_max_tokens),
        }
        text = config_text(build_generate_config(name, 1, params, speech=speech))
        parse_config(text)
        (tmp / "config.pbtxt").write_text(text)
        (tmp / "README.md").write_text(_readme(name, seq2seq=True, speech=speech))
        write_manifest(
            tmp / "config.pbtxt",
            stage="triton",
            inputs={
                "encoder": {"path": str(encoder), "sha256": sha256_file(encoder)},
                "artifact": {"path": str(decoder), "sha256": sha256_file(decoder)},
            },
            options={"backend": "python", "generate": True, "slots": 1, "tokenizer": str(tokenizer_dir)},
            results={
                "inputs": [i[0] for i in INPUTS] + (["audio"] if speech else []),
                "outputs": [o[0] for o in OUTPUTS],
                "files": sorted(linked),
                "seq2seq": {"speech": speech, "batching": "one request at a time, the others queued"},
                "generation": {k: v for k, v in rules.items() if k != "not_applied"},
                "rules_not_applied": rules["not_applied"],
            },
            packages=("tritonclient", "onnx", "transformers"),
            weight_files={
                f"1/{f.name}": weightfiles.file_identity(f)
                for f in sorted(vdir.iterdir())
                if f.name.startswith((ENCODER_FILE, DECODER_FILE))
            },
        )
    return {
        "name": name,
        "model_dir": str(final),
        "config": str(final / "config.pbtxt"),
        "slots": 1,
        "speech": speech,
        "rules_from": "config.json / generation_config.json",
    }
