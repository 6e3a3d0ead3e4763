"""Feed dicts for both sides of a diff: generated from the model's input spec (text from the
tokenizer when one can be found, random ids otherwise) with a fixed seed, or loaded from an
.npz or a polygraphy data-loader JSON file. The same list of feeds goes to both runners."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gpcl_trt.common import GpclError, read_manifest
from gpcl_trt.text import TOKENIZER_FILES

Feed = "OrderedDict[str, np.ndarray]"

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
        if not isinstance(feeds, list) or not feeds or not all(
            isinstance(f, dict) and all(isinstance(v, np.ndarray) for v in f.values()) for f in feeds
        ):
            raise GpclError(f"{p} is not a polygraphy data-loader JSON (a list of name -> array dicts)")
        return [OrderedDict(f) for f in feeds]
    raise GpclError(f"unsupported inputs file {p}: use .npz or polygraphy data-loader .json")


def _group_npz(arrays: dict[str, np.ndarray], p: Path) -> list[dict[str, np.ndarray]]:
    if not arrays:
        raise GpclError(f"{p} holds no arrays")
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
def find_tokenizer_dir(model: str | Path, depth: int = 3) -> Path | None:
    """The directory holding a tokenizer for ``model``: the model dir itself, or one recorded in
    the artifact's manifest (followed through source artifacts, e.g. GPCL -> export -> model)."""
    p = Path(model)
    if p.is_dir():
        return p if any((p / f).exists() for f in TOKENIZER_FILES) else None
    if depth <= 0 or not p.is_file():
        return None
    manifest = read_manifest(p)
    for value in _strings(manifest or {}):
        cand = Path(value)
        if not cand.is_absolute():
            cand = p.parent / cand
        if cand.resolve() == p.resolve() or not cand.exists():
            continue
        found = find_tokenizer_dir(cand, depth - 1)
        if found:
            return found
    return None


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def tokenize_samples(tokenizer_dir: Path, samples: int, batch: int, seq: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Real text, padded/truncated to ``seq`` tokens so every sample has the same shape."""
    from gpcl_trt.text import text_encoder

    encode = text_encoder(tokenizer_dir, length=seq)
    if encode is None:
        raise GpclError(f"{tokenizer_dir}: no usable tokenizer for text inputs; pass --inputs FILE.npz")
    rng = np.random.default_rng(seed)
    return [encode([" ".join(rng.choice(SENTENCES, size=1 + seq // 12)) for _ in range(batch)]) for _ in range(samples)]


# ----------------------------------------------------------------------------- generation
def onnx_input_spec(model) -> "OrderedDict[str, tuple[np.dtype, list]]":
    """name -> (numpy dtype, dims) for the graph inputs that are not initializers."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    spec = OrderedDict()
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
        spec[vi.name] = (np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return spec


def vocab_size_from_onnx(model, ids_name: str = "input_ids") -> int | None:
    """The embedding table's row count: the Gather that reads ``input_ids`` from an initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == ids_name and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


_DIM_SIZES = {"past_sequence": 0}


def _concrete(dims: list, batch: int, seq: int) -> tuple[int, ...]:
    sizes = {"batch": batch, "sequence": seq, "total_sequence": seq, **_DIM_SIZES}
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in sizes:
            out.append(sizes[d])
        else:  # unnamed dynamic dim: leading is batch, the next the sequence
            out.append(batch if i == 0 else seq)
    return tuple(out)


def random_feed(spec, batch: int, seq: int, rng: np.random.Generator, vocab: int | None) -> dict[str, np.ndarray]:
    """One feed from an input spec, with the usual meaning of the conventional input names."""
    feed = OrderedDict()
    for name, (dtype, dims) in spec.items():
        shape = _concrete(dims, batch, seq)
        if name == "attention_mask":
            feed[name] = np.ones(shape, dtype)
        elif name in ("token_type_ids",) or name.startswith("past_key_values"):
            feed[name] = np.zeros(shape, dtype)
        elif name == "position_ids":
            feed[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif np.issubdtype(dtype, np.integer):
            feed[name] = rng.integers(0, vocab or 100, size=shape, dtype=dtype)
        else:
            feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def overlay_text(feed: dict[str, np.ndarray], text: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace ids/mask/type ids of ``feed`` by the tokenizer's, keeping the model's input set,
    and make position ids follow the mask."""
    out = OrderedDict(feed)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        if name in out and name in text:
            out[name] = text[name].astype(out[name].dtype)
    if "position_ids" in out and "attention_mask" in text:
        mask = text["attention_mask"]
        out["position_ids"] = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(out["position_ids"].dtype)
    return out


def describe_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    first = feeds[0]
    return {"samples": len(feeds), "shapes": {k: list(v.shape) for k, v in first.items()},
            "dtypes": {k: str(v.dtype) for k, v in first.items()}}


def feeds_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    """A hash of the feeds, so a golden file can say which inputs it was recorded on."""
    import hashlib

    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode() + json.dumps(list(f[k].shape)).encode() + str(f[k].dtype).encode())
            h.update(np.ascontiguousarray(f[k]).tobytes())
    return h.hexdigest()
