"""Model directory input checks, before anything is loaded: a local Hugging Face directory with a
readable config.json of a supported family (exporter/families.py), weights that are safetensors
(headers parsed, so a corrupt file is one line) or pickle only with --allow-pickle, custom code
only with --trust-remote-code."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpcl_trt.common import GpclError, one_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_model_dir(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(the directory, resolved; its parsed config.json), or one line saying what is wrong."""
    d = Path(model_dir)
    if not d.exists():
        raise GpclError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise GpclError(f"{d} is not a directory (expected a local Hugging Face model directory)")
    # A FIFO or device where a weight or config file should be would block the first read
    # forever (or stream garbage): refused before anything opens it.
    from gpcl_trt.weightfiles import regular_file

    for entry in d.iterdir():
        if not entry.is_dir():
            regular_file(entry, "model file")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise GpclError(f"{d} has no config.json (expected a local Hugging Face model directory)")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GpclError(f"{cfg} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise GpclError(f"{cfg} is not a JSON object")
    return d.resolve(), raw


def check_model_dir(model_dir: str | os.PathLike) -> str:
    """Cheap up-front check that ``model_dir`` is a local HF model directory of a supported
    architecture (no weights loaded); returns its model_type. For stages that plan before they
    export (the pipeline)."""
    d, raw = read_model_dir(model_dir)
    family_class(raw, d / "config.json")
    return raw["model_type"]


def family_class(raw_config: dict, cfg_path: Path, trust_remote_code: bool = False):
    """The family class (text encoder, decoder-only, vision encoder) from config.json's
    architectures/model_type and transformers' auto-class mappings; one clear line otherwise."""
    from gpcl_trt.exporter.families import resolve_family

    return resolve_family(raw_config, str(cfg_path), trust_remote_code)


def check_weights(d: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """Return (weight files, use_safetensors). Safetensors headers are parsed here so a corrupt
    or truncated file gives one clear line instead of a deep traceback."""
    safe = sorted(d.glob("*.safetensors"))
    if safe:
        from safetensors import safe_open

        for f in safe:
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except Exception as exc:  # safetensors raises its own SafetensorError and OSError
                raise GpclError(f"unreadable weights {f}: {one_line(exc)}") from None
        return safe, True
    pickled = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        if not allow_pickle:
            raise GpclError(
                f"{d} has only pickle weights ({pickled[0].name}); loading them can run arbitrary code. "
                "Convert to safetensors, or pass --allow-pickle if you trust the source"
            )
        return pickled, False
    raise GpclError(f"{d} has no weights (*.safetensors)")
