"""Model input feeds: the one place that knows the I/O naming convention of docs/architecture.md.

Every stage that runs a model (export validation, calibration, accuracy, the served-model check,
the benchmarks) builds its feeds here, from the model's input names and axes:

- axes ``batch``, ``sequence``, ``past_sequence`` and ``total_sequence`` (= past + sequence),
  ``encoder_sequence`` (an encoder-decoder model's source length; the sequence unless given);
  an unnamed dynamic axis is the batch when it leads, else the sequence;
- ``input_ids`` (token ids below the vocabulary size), ``attention_mask`` (ones over past and
  new tokens), ``token_type_ids`` (zeros), ``position_ids`` (past, past + 1, ...; or following the
  mask of a padded text batch), ``past_key_values.{i}.key|value`` (normal floats),
  ``encoder_attention_mask`` (like ``attention_mask``, over ``encoder_sequence``),
  ``past_key_values.{i}.decoder|encoder.key|value`` (an encoder-decoder's self- and cross-attention
  caches: normal floats), ``input_features`` (log-mel frames: normal floats), ``pixel_values``
  (normal floats), ``input_values`` (a waveform: ``samples`` = 320 per ``sequence`` step; normal
  floats); a dual encoder's ``text_batch`` and ``image_batch`` take
  the batch size unless given;
- optional text: a tokenizer's ids, mask and token types replace the random ones.

Next to it: one ONNX Runtime session factory and one max-abs-diff, so stages compare alike.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gpcl_trt.common import GpclError, one_line

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
POSITION_IDS = "position_ids"
PIXEL_VALUES = "pixel_values"
INPUT_VALUES = "input_values"  # a raw waveform [batch, samples] (wav2vec2-style encoders)
SAMPLES = "samples"
# Waveform samples per frame: 20 ms at 16 kHz, wav2vec2's feature-encoder stride; a ``sequence``
# of N means N frames, so random audio is long enough for any such encoder's convolutions.
SAMPLES_PER_FRAME = 320
INPUT_FEATURES = "input_features"  # log-mel frames [batch, mel bins, frames] (Whisper's encoder)
ENCODER_ATTENTION_MASK = "encoder_attention_mask"  # the source's mask, read by an encoder-decoder's decoder
ENCODER_SEQUENCE = "encoder_sequence"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
TEXT_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
AXES = ("batch", "sequence", "past_sequence", "total_sequence", ENCODER_SEQUENCE)
DEFAULT_VOCAB = 100  # ids drawn when the vocabulary size is unknown: valid for any real model

_VIEW_OPS = {"Reshape", "Flatten", "Cast", "Identity", "Squeeze", "Unsqueeze", "View"}
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, dims (int, axis name, or None for unnamed dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


def past_names(num_layers: int, prefix: str = PAST_PREFIX) -> list[str]:
    return [f"{prefix}{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


# ----------------------------------------------------------------------------- specs
def specs_from_onnx(model: Any) -> list[InputSpec]:
    """The graph inputs of an onnx ModelProto that are not initializers."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def specs_from_axes(tensor_specs: Iterable[Any], float_dtype: Any = np.float32) -> list[InputSpec]:
    """From the exporter's I/O description (``.name``, ``.dtype`` "float" or a numpy name,
    ``.axes``): "float" is the model's float type."""
    return [
        InputSpec(t.name, np.dtype(float_dtype if t.dtype == "float" else t.dtype), tuple(t.axes)) for t in tensor_specs
    ]


def specs_from_session(session: Any) -> list[InputSpec]:
    specs = []
    for meta in session.get_inputs():
        dtype = _ORT_TYPES.get(meta.type)
        if dtype is None:
            raise GpclError(f"cannot make data for model input {meta.name!r} of type {meta.type}")
        dims = tuple(d if isinstance(d, (int, str)) and d != 0 else None for d in meta.shape)
        specs.append(InputSpec(meta.name, np.dtype(dtype), dims))
    return specs


# ----------------------------------------------------------------------------- feeds
def _shape(dims: Iterable, sizes: Mapping[str, int]) -> tuple[int, ...]:
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, (int, np.integer)) and d > 0:
            out.append(int(d))
        elif isinstance(d, str) and d in sizes:
            out.append(sizes[d])
        elif d == SAMPLES:  # a waveform: ``sequence`` frames of audio
            out.append(sizes["sequence"] * SAMPLES_PER_FRAME)
        else:  # an unnamed dynamic axis: the leading one is the batch, the others the sequence
            out.append(sizes["batch"] if i == 0 else sizes["sequence"])
    return tuple(out)


def make_feeds(
    specs: Iterable[InputSpec],
    batch: int,
    sequence: int,
    past: int = 0,
    *,
    seed: int = 0,
    vocab: int | None = None,
    pad_last_row: bool = False,
    text: Mapping[str, np.ndarray] | None = None,
    encoder_sequence: int | None = None,
) -> "OrderedDict[str, np.ndarray]":
    """One feed for ``specs`` (in their order). ``past`` tokens of cache precede the
    ``sequence`` new ones; ``encoder_sequence`` (default: ``sequence``) is the source length of
    an encoder-decoder model. ``pad_last_row`` pads the tail of the last row's mask (batch > 1) so
    masking is exercised. ``text`` (a tokenizer's ids/mask/type ids, [batch, sequence]) replaces
    the random ids and sets batch and sequence; positions then follow its mask."""
    if text is not None:
        batch, sequence = (int(n) for n in text[INPUT_IDS].shape)
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence}
    sizes[ENCODER_SEQUENCE] = sequence if encoder_sequence is None else encoder_sequence
    feed: OrderedDict[str, np.ndarray] = OrderedDict()
    for spec in specs:
        shape, dtype, name = _shape(spec.dims, sizes), spec.dtype, spec.name
        if text is not None and name in text:
            feed[name] = np.asarray(text[name]).astype(dtype).reshape(shape)
        elif name == INPUT_IDS:
            feed[name] = rng.integers(0, vocab or DEFAULT_VOCAB, size=shape).astype(dtype)
        elif name in (ATTENTION_MASK, ENCODER_ATTENTION_MASK):
            mask = np.ones(shape, dtype)
            if pad_last_row and shape[0] > 1 and shape[-1] > 2:
                mask[-1, shape[-1] - max(1, shape[-1] // 4) :] = 0
            feed[name] = mask
        elif name == TOKEN_TYPE_IDS:
            feed[name] = np.zeros(shape, dtype)
        elif name == POSITION_IDS:
            if text is not None and ATTENTION_MASK in text:
                pos = np.clip(np.cumsum(text[ATTENTION_MASK], axis=-1) - 1, 0, None) + past
            else:
                pos = np.arange(past, past + shape[-1])
            feed[name] = np.broadcast_to(pos, shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating):  # past key/values, pixel_values, other float inputs
            feed[name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise GpclError(f"no rule to make data for model input {name!r} ({dtype}); pass an .npz with it")
    return feed


def complete_feed(specs: Iterable[InputSpec], given: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
    """``given`` (ids and mask, or any subset of the inputs, e.g. from an .npz) completed with
    neutral values for the rest: no past, positions following the mask."""
    specs = list(specs)
    first = next((given[s.name] for s in specs if s.name in given), None)
    if first is None:
        raise GpclError(f"the sample data has none of the model inputs {[s.name for s in specs]}")
    text = {k: v for k, v in given.items() if k in TEXT_INPUTS}
    if INPUT_IDS in text:
        feed = make_feeds(specs, 0, 0, text=text)
    else:
        shape = first.shape
        feed = make_feeds(specs, int(shape[0]), int(shape[1]) if len(shape) > 1 else 1)
    for s in specs:
        if s.name in given:
            feed[s.name] = np.asarray(given[s.name]).astype(s.dtype)
    return feed


# ----------------------------------------------------------------------------- runtime
def vocab_size(model: Any, ids_name: str = INPUT_IDS) -> int | None:
    """Rows of the embedding table that ``input_ids`` indexes: the Gather of an initializer that
    reads the ids, directly or through view/cast ops."""
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((i, node))
    frontier, seen = [ids_name], set()
    while frontier:
        tensor = frontier.pop()
        for index, node in readers.get(tensor, ()):
            if node.op_type == "Gather" and index == 1 and node.input[0] in inits:
                return int(inits[node.input[0]].dims[0])
            if node.op_type in _VIEW_OPS and index == 0 and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append(node.output[0])
    return None


def ort_options(bounded: bool = False, threads: int | None = None, profile: bool = False) -> Any:
    """ONNX Runtime session options. ``bounded``: no anonymous copies of the weights; ORT reads
    external initializers from their file mapping as they are (graph optimizations off, so no
    constant folding writes transposed or cast copies; no MLAS pre-packing; no arena, so the
    per-node temporaries of a Transpose/Cast over a weight are freed after each node). Measured
    on a 0.98 GB Llama: 1.19 GB RssAnon after a default session, 0.05 GB bounded."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if bounded:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_cpu_mem_arena = False
        # The default order runs the Transpose of every weight (inputs: initializers only) before
        # the first block: 2.7 GB RssAnon peak on a 4.4 GB Llama; priority-based runs each next
        # to its MatMul: 0.1 GB.
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_profiling = profile
    return opts


def ort_session(
    model: Any,
    *,
    base_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    bounded: bool = False,
    profile: bool = False,
) -> Any:
    """A CPU ONNX Runtime session of a path, serialized bytes or a ModelProto. A ModelProto
    whose weights are external (loaded graph-only) reads them from ``base_dir``, where it came
    from; one too big for a protobuf goes through a temporary file. ``bounded``: see ort_options.
    A model ORT cannot load is bad input: one clear line."""
    import onnxruntime as ort

    opts = ort_options(bounded, threads, profile)
    try:
        if hasattr(model, "SerializeToString"):
            from gpcl_trt.common import external_locations
            from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES

            if external_locations(model):
                if base_dir is None:
                    raise GpclError("a model with external weights needs the directory they are in")
                # ORT reads them from their folder; nothing is written there (it may be read-only).
                folder = str(Path(base_dir).resolve())
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            if external_locations(model) or model.ByteSize() < EXTERNAL_DATA_BYTES:
                return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            import tempfile

            import onnx

            with tempfile.TemporaryDirectory(prefix="gpcl-session-") as d:
                path = os.path.join(d, "model.onnx")
                onnx.save(
                    model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
                )
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise GpclError(f"ONNX Runtime cannot load the model ({one_line(exc)})") from None


def ort_run(session: Any, feed: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed))))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| in float64; inf when the shapes differ or only one side is non-finite."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return float("inf")
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    if not np.array_equal(fin_a, fin_b):
        return float("inf")
    if not np.array_equal(a64[~fin_a], b64[~fin_b], equal_nan=True):  # +inf vs -inf, say
        return float("inf")
    return float(np.max(np.abs(a64[fin_a] - b64[fin_a]), initial=0.0))
