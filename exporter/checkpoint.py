"""Safetensors checkpoints without loading them: an index of every tensor (name -> file, dtype,
shape, absolute byte range) built from the headers alone, for a single ``model.safetensors`` or a
sharded ``model.safetensors.index.json``.

Every error is a ``GpclError`` that names the file and, where there is one, the tensor: a missing
shard, a truncated file, a header that is not safetensors, a tensor whose shape cannot be the
model's (checked against the parameters of the model built on the ``meta`` device, before anything
is allocated), a config.json asking for more layers than the checkpoint holds.

Layout of a safetensors file: 8-byte little-endian header length N, N bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
data; a tensor's absolute offset is ``8 + N + begin``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gpcl_trt.common import GpclError
from gpcl_trt.gpcl import LAYER_STACK_RE

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# A safetensors header is JSON for the names/shapes; 100 MB is far beyond any real one and keeps
# a garbage length field from making us read (or allocate) gigabytes.
MAX_HEADER = 100 << 20

# safetensors dtype -> (itemsize, torch dtype name, numpy dtype or None, ONNX TensorProto type)
DTYPES: dict[str, tuple[int, str, str | None, int]] = {
    "F64": (8, "float64", "float64", 11),
    "F32": (4, "float32", "float32", 1),
    "F16": (2, "float16", "float16", 10),
    "BF16": (2, "bfloat16", None, 16),
    "I64": (8, "int64", "int64", 7),
    "I32": (4, "int32", "int32", 6),
    "I16": (2, "int16", "int16", 5),
    "I8": (1, "int8", "int8", 3),
    "U8": (1, "uint8", "uint8", 2),
    "BOOL": (1, "bool", "bool", 9),
}
TORCH_TO_ST = {v[1]: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint: where its bytes are, and what they are."""

    name: str
    file: Path
    dtype: str  # safetensors dtype: F32, F16, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, DTYPES[self.dtype][1])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def where(self) -> str:
        return f"tensor {self.name} in {self.file}"


class Checkpoint:
    """The tensors of a local safetensors checkpoint, from the headers only.

    ``Checkpoint.open(model_dir)`` reads ``model.safetensors.index.json`` when present (every
    shard it names must exist and hold the tensors the index puts there), else
    ``model.safetensors``. ``tensor(name)`` returns a torch tensor over a read-only shared map of
    the file (``mapped_tensor``): the pages stay file-backed, never anonymous memory, and nothing
    counts against the commit limit."""

    def __init__(self, root: Path, files: list[Path], tensors: dict[str, TensorEntry], metadata: dict[str, Any]):
        self.root = root
        self.files = files
        self.tensors = tensors
        self.metadata = metadata
        self._maps: dict[Path, mmap.mmap] = {}

    # ------------------------------------------------------------------------- construction
    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> "Checkpoint":
        root = Path(model_dir)
        index = root / INDEX
        if index.is_file():
            return cls._open_sharded(root, index)
        single = root / SINGLE
        if single.is_file():
            entries, meta = read_header(single)
            return cls(root, [single], entries, meta)
        others = sorted(root.glob("*.safetensors"))
        if others:
            if len(others) == 1:
                entries, meta = read_header(others[0])
                return cls(root, others, entries, meta)
            raise GpclError(
                f"{root} has {len(others)} safetensors files but no {INDEX} saying which tensor is in which"
            )
        raise GpclError(f"{root} has no weights (*.safetensors)")

    @classmethod
    def _open_sharded(cls, root: Path, index: Path) -> "Checkpoint":
        try:
            doc = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GpclError(f"unreadable weights {index}: not JSON ({exc})") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise GpclError(f"unreadable weights {index}: no weight_map")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
                raise GpclError(
                    f"unreadable weights {index}: tensor {name} names shard {shard!r}, which is not a file name in "
                    f"{root}"
                )
            shards.setdefault(shard, []).append(name)
        tensors: dict[str, TensorEntry] = {}
        files: list[Path] = []
        metadata: dict[str, Any] = {}
        for shard in sorted(shards):
            path = root / shard
            if not path.is_file():
                raise GpclError(
                    f"missing shard {path} (listed in {index.name} for tensor {shards[shard][0]} and "
                    f"{len(shards[shard]) - 1} more)"
                )
            entries, meta = read_header(path)
            metadata.update(meta)
            for name in shards[shard]:
                if name not in entries:
                    raise GpclError(
                        f"unreadable weights {path}: has no tensor {name}, which {index.name} says is there"
                    )
            for name, e in entries.items():
                if name in tensors:
                    raise GpclError(f"unreadable weights {path}: tensor {name} is also in {tensors[name].file}")
                if weight_map.get(name) == shard:
                    tensors[name] = e
            files.append(path)
        return cls(root, files, tensors, metadata)

    # ------------------------------------------------------------------------- access
    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            m = map_read_only(path)
            self._maps[path] = m
        return m

    def tensor(self, name_or_entry: str | TensorEntry) -> Any:
        """The tensor as a torch.Tensor over a memory map of its file (no copy), or a copy when
        its offset is not aligned to its element size (never the case for files written by
        safetensors with the usual dtype ordering)."""
        import torch

        e = self.tensors[name_or_entry] if isinstance(name_or_entry, str) else name_or_entry
        if e.numel == 0:
            return torch.empty(e.shape, dtype=e.torch_dtype)
        buf = self._map(e.file)
        if e.offset % e.itemsize:
            t = torch.frombuffer(bytearray(buf[e.offset : e.offset + e.nbytes]), dtype=torch.uint8)
            return t.view(e.torch_dtype).reshape(e.shape)
        return mapped_tensor(buf, e.torch_dtype, e.numel, e.offset).reshape(e.shape)

    def read(self, e: TensorEntry, start: int, length: int) -> bytes:
        """``length`` bytes of tensor ``e`` from byte ``start`` within it, with pread (no mapping,
        so streaming a conversion does not grow the process's RSS by the file's pages)."""
        with open(e.file, "rb") as f:
            return os.pread(f.fileno(), length, e.offset + start)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the mapping goes with the last one
                pass
        self._maps.clear()


def map_read_only(path: Path) -> mmap.mmap:
    """A read-only shared map of a weight file. Never a writable one: a private writable map
    (ACCESS_COPY) is charged in full against the commit limit, so a 27 GB converted file could not
    be mapped on a 24 GB machine (``OSError: Cannot allocate memory``)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def mapped_tensor(buf: mmap.mmap, dtype: Any, count: int, offset: int) -> Any:
    """``torch.frombuffer`` over a read-only map. torch warns that it cannot mark a tensor
    read-only; these tensors are weights that nothing writes (a write would fault), so that one
    warning is expected here and silenced here only."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


# ----------------------------------------------------------------------------- headers
def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, Any]]:
    """Parse and check one safetensors header: every tensor's byte range must match its dtype
    and shape, lie inside the data section, and the file must be as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GpclError(f"unreadable weights {path}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise GpclError(
                    f"unreadable weights {path}: header length {n} does not fit a {size}-byte file (truncated or not "
                    "safetensors)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise GpclError(f"unreadable weights {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GpclError(f"unreadable weights {path}: header is not JSON (not a safetensors file)") from None
    if not isinstance(doc, dict):
        raise GpclError(f"unreadable weights {path}: header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GpclError(f"unreadable weights {path}: bad header entry for tensor {name}") from None
        if dtype not in DTYPES:
            raise GpclError(
                f"unreadable weights {path}: tensor {name} has dtype {dtype}, which the exporter does not read"
            )
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise GpclError(f"unreadable weights {path}: tensor {name} has a negative shape or offset")
        want = math.prod(shape) * DTYPES[dtype][0]
        if end - begin != want:
            raise GpclError(
                f"unreadable weights {path}: tensor {name} has {end - begin} bytes for {dtype}{list(shape)} ({want} "
                "expected)"
            )
        if end > data_len:
            raise GpclError(
                f"unreadable weights {path}: truncated: tensor {name} ends at byte {data_start + end}, the file has "
                f"{size}"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
    return entries, meta if isinstance(meta, dict) else {}


# ----------------------------------------------------------------------------- config vs checkpoint
# Hierarchical vision models (ConvNeXt, ResNet: stages.N.layers.M) count stages in num_hidden_layers;
# the outer index is the one to compare (Swin's layers.N.blocks.M already matches its outer index first).
STAGE_RE = re.compile(r"(?:^|\.)stages\.(\d+)\.")


def checkpoint_layers(names: Iterable[str]) -> int | None:
    """Number of transformer blocks the tensor names cover (max index + 1), or None when the names
    follow no known block naming."""
    best = -1
    for n in names:
        m = STAGE_RE.search(n) or LAYER_STACK_RE.search(n)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1 if best >= 0 else None


def check_config_layers(hf_config: Any, ckpt: Checkpoint, config_path: Path) -> None:
    """Refuse a config.json that asks for more layers than the checkpoint holds, before the model
    is built at all: a config asking for 100000 layers next to a 2-layer file would otherwise make
    even a meta-device build (or, eagerly, an allocation) run until the kernel kills it. Fewer
    layers is not an error: transformers loads what the config uses and ignores the rest (a
    truncated config, or multi-token-prediction layers stored as ``model.layers.N`` one past the
    config's count, DeepSeek-V3 and GLM-4.5 style); the binding reports the tensors left over."""
    want = getattr(hf_config, "num_hidden_layers", None)
    have = checkpoint_layers(ckpt.tensors)
    if not isinstance(want, int) or have is None or want <= have:
        return
    example = next(
        (n for n in sorted(ckpt.tensors) if (m := LAYER_STACK_RE.search(n)) and int(m.group(1)) == have - 1),
        None,
    )
    raise GpclError(
        f"weights do not match config.json: {config_path} says num_hidden_layers={want}, the checkpoint "
        f"{ckpt.files[0].parent} has tensors for {have} (last: {example}); no tensor for layer {have}"
    )


def expected_param_bytes(shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    return sum(math.prod(s) for s in shapes.values()) * itemsize
