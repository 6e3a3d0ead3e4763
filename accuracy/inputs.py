"""Feed dicts for both sides of a diff: generated from the model's input spec (text from the
tokenizer when one can be found, random ids otherwise) with a fixed seed, or loaded from an
.npz or a polygraphy data-loader JSON file. The same list of feeds goes to both runners."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gpcl_trt.common import GpclError
from gpcl_trt.text import TOKENIZER_FILES

# Ordinary text, varied in topic and length, so calibrated GPCL sees typical activations.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Transformers compute attention over every pair of tokens in a sequence.",
    "She sold the old car and bought a bicycle for the summer.",
    "Quarterly revenue rose by 12 percent, beating analyst expectations.",
    "Please restart the server after the configuration file has been updated.",
    "The museum opens at nine and closes at five on weekdays.",
    "A warm front will bring light rain to the northern coast tomorrow.",
    "He read the contract twice before signing it.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Our team shipped the release on Friday after fixing the last bug.",
    "Mountains in the distance were covered with fresh snow.",
)


# ----------------------------------------------------------------------------- loading
def load_inputs(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Feeds from ``.npz`` (one sample, or keys ``"{i}/{name}"`` for several) or from a
    polygraphy data-loader JSON (a list of feed dicts, as ``polygraphy run --save-inputs``)."""
    p = Path(path)
    if not p.is_file():
        raise GpclError(f"inputs file {p} does not exist")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # a corrupt archive is bad input, not a crash
            raise GpclError(f"cannot read {p} as .npz: {exc}") from None
        return _group_npz(arrays, p)
    if p.suffix == ".json":
        from polygraphy.json import load_json

        from gpcl_trt.accuracy.polyutil import quiet_polygraphy

        try:
            with quiet_polygraphy():
                feeds = load_json(str(p), description="input data")
        except Exception as exc:
            raise GpclError(f"cannot read {p} as polygraphy input JSON: {exc}") from None
        if isinstance(feeds, dict):
            feeds = [feeds]
        if (
            not isinstance(feeds, list)
            or not feeds
            or not all(isinstance(f, dict) and all(isinstance(v, np.ndarray) for v in f.values()) for f in feeds)
        ):
            raise GpclError(f"{p} is not a polygraphy data-loader JSON (a list of name -> array dicts)")
        return [OrderedDict(f) for f in feeds]
    raise GpclError(f"unsupported inputs file {p}: use .npz or polygraphy data-loader .json")


def _group_npz(arrays: dict[str, np.ndarray], p: Path) -> list[dict[str, np.ndarray]]:
    if not arrays:
        raise GpclError(f"{p} holds no arrays")
    empty = [k for k, v in arrays.items() if v.size == 0]
    if empty:  # zero samples would compare nothing and pass
        raise GpclError(f"{p}: {empty[0]!r} is empty (shape {arrays[empty[0]].shape}); a comparison needs samples")
    if not any("/" in k for k in arrays):
        return [OrderedDict(arrays)]
    groups: dict[int, OrderedDict] = {}
    for key, arr in arrays.items():
        m = re.fullmatch(r"(\d+)/(.+)", key)
        if not m:
            raise GpclError(f"{p}: key {key!r} mixes per-sample ('i/name') and plain names")
        groups.setdefault(int(m.group(1)), OrderedDict())[m.group(2)] = arr
    return [groups[i] for i in sorted(groups)]


def save_inputs_json(feeds: list[dict[str, np.ndarray]], path: str | Path) -> None:
    """Write feeds in polygraphy's data-loader JSON format (readable by ``--inputs``)."""
    from polygraphy.json import save_json

    save_json([OrderedDict(f) for f in feeds], str(path), description="input data")


# ----------------------------------------------------------------------------- tokenizer
def find_tokenizer_dir(model: str | Path) -> Path | None:
    """The directory holding a tokenizer for ``model``: the model dir itself, or the HF model
    directory its manifest chain records (GPCL model -> export -> model dir)."""
    from gpcl_trt.manifest import model_dir_of

    p = Path(model)
    d = p if p.is_dir() else model_dir_of(p)
    return d if d is not None and any((d / f).exists() for f in TOKENIZER_FILES) else None


def tokenize_samples(tokenizer_dir: Path, samples: int, batch: int, seq: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Real text, padded/truncated to ``seq`` tokens so every sample has the same shape."""
    from gpcl_trt.text import text_encoder

    encode = text_encoder(tokenizer_dir, length=seq)
    if encode is None:
        raise GpclError(f"{tokenizer_dir}: no usable tokenizer for text inputs; pass --inputs FILE.npz")
    rng = np.random.default_rng(seed)
    return [encode([" ".join(rng.choice(SENTENCES, size=1 + seq // 12)) for _ in range(batch)]) for _ in range(samples)]


# ----------------------------------------------------------------------------- description
def describe_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    first = feeds[0]
    return {
        "samples": len(feeds),
        "shapes": {k: list(v.shape) for k, v in first.items()},
        "dtypes": {k: str(v.dtype) for k, v in first.items()},
    }


def feeds_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    """A hash of the feeds, so a golden file can say which inputs it was recorded on."""
    import hashlib

    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode() + json.dumps(list(f[k].shape)).encode() + str(f[k].dtype).encode())
            h.update(np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()
