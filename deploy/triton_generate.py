"""The generation model that ``gpcl-trt triton`` writes next to a decoder's tensor model:
``REPO/NAME_generate``, python backend, decoupled, speaking Triton's generate extension with the
request and response names of TensorRT-LLM's and vLLM's Triton backends. Its ``1/`` holds the
decoder (weights linked, as for the tensor model), ``model.py`` (``triton_generate_model.py``)
and the tokenizer / config files of the model directory (linked through gpcl_trt.weightfiles).
"""

from __future__ import annotations

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
    ("end_id", "TYPE_INT32", [1], True),
    ("pad_id", "TYPE_INT32", [1], True),
)
CONFIG_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")


def generate_name(name: str) -> str:
    return name + SUFFIX


def why_not(artifact: Path, backend: str, io: dict, tokenizer_dir: Path | None) -> str | None:
    """None when a generation model can be written for this artifact, else the reason."""
    if backend == "tensorrt":
        return "the generation loop has no TensorRT runtime yet (engines serve the tensor model only)"
    if artifact.suffix != ".onnx" or not any(is_past(t["name"]) for t in io["inputs"]):
        return "not a decoder exported with past (past_key_values.* inputs)"
    if tokenizer_dir is None:
        return "no model directory in the manifest chain to take the tokenizer from (pass --tokenizer DIR)"
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        return f"no tokenizer files in {tokenizer_dir} (pass --tokenizer DIR)"
    return None


def build_generate_config(name: str, slots: int, params: dict[str, str]):
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for input_name, dtype, dims, optional in INPUTS:
        cfg.input.add(name=input_name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional)
    cfg.output.add(name="text_output", data_type=mc.DataType.Value("TYPE_STRING"), dims=[-1])
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
            results={"inputs": [i[0] for i in INPUTS], "outputs": ["text_output"], "files": sorted(linked)},
            packages=("tritonclient", "onnx", "transformers"),
            weight_files={
                f"1/{f.name}": weightfiles.file_identity(f)
                for f in sorted(vdir.iterdir())
                if f.name.startswith("model.onnx")
            },
        )
    return {"name": name, "model_dir": str(final), "config": str(final / "config.pbtxt"), "slots": slots}


def _readme(name: str) -> str:
    return (
        f"# Triton model `{name}` (python backend, decoupled: text generation)\n\n"
        "Written by `gpcl-trt triton` next to the decoder's tensor model. It speaks Triton's generate\n"
        "extension with the field names of TensorRT-LLM's and vLLM's backends:\n\n"
        f"    curl -s localhost:8000/v2/models/{name}/generate \\\n"
        '      -d \'{"text_input": "Once upon a time", "max_tokens": 32}\'\n'
        f"    curl -sN localhost:8000/v2/models/{name}/generate_stream \\\n"
        '      -d \'{"text_input": "Once upon a time", "max_tokens": 32, "stream": true}\'\n\n'
        "Fields: text_input, max_tokens, stream, temperature, top_k, top_p, random_seed, stop_words,\n"
        "end_id, pad_id (accepted; padding is internal). Answer: text_output. The KV cache stays in\n"
        "the server: requests share one in-flight batch of `slots` rows, the rest wait.\n"
        "`gpcl_python_path` lists where gpcl_trt, onnxruntime and transformers are found.\n"
    )
