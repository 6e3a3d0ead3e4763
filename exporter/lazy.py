"""Lazy export: trace a model whose weights never exist in memory, and point the ONNX external
data straight at the checkpoint.

1. ``build_meta_model``: the HF model built from config.json on the ``meta`` device, the way
   ``from_pretrained`` builds it before loading (so the same classes, dtypes and ties), then
   non-persistent buffers (rotary ``inv_freq``, BERT's ``position_ids``...) computed for real by
   transformers' own init code, persistent buffers read from the checkpoint.
2. ``bind_checkpoint``: every parameter joined to one checkpoint tensor with transformers' own key
   mapping (renames, base-model prefix, legacy ``gamma/beta``); shapes checked; tied parameters
   share one tensor. Keys that need a transformers *conversion op* (fused experts...) are refused
   here (``NeedsEager``).
3. ``fake_parameters``: the meta parameters become FakeTensors on ``cpu`` so the dynamo exporter
   traces with real inputs and real buffers but no weight data.
4. ``place_weights``: per tensor, when the checkpoint dtype is the export dtype, the checkpoint
   file is hard-linked (else reflinked, else copied, and the result says which) into the output
   directory and the initializer points at the tensor's byte range inside it; otherwise the tensor
   is converted one chunk at a time into ``OUT.onnx.data`` at 4 KiB-aligned offsets.
5. ``bind_initializers``: the traced graph's weight initializers become ``ExternalTensor``s over
   those files; the exporter's optimizer then runs exactly as on an eager export.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gpcl_trt.common import GpclError
from gpcl_trt.exporter.checkpoint import DTYPES, TORCH_TO_ST, Checkpoint, TensorEntry

CORE_PREFIX = "model."  # ArchConfig.core(...) keeps the HF model as ``.model``
CHUNK = 64 << 20  # conversion chunk: 64 MiB of source bytes
ALIGN_BIG = 4096  # page: ONNX Runtime can memory-map a tensor only at an aligned offset
ALIGN_SMALL = 64
BIG = 1 << 20


class NeedsEager(Exception):
    """The checkpoint needs something only transformers' full loader does (a conversion op on
    the weights); the caller falls back to the eager path and says why."""


# ----------------------------------------------------------------------------- progress
@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar in bytes with the rate, on stderr; ``advance(n)`` after each chunk. Prints
    the step's bytes, time and GB/s when it ends."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    from gpcl_trt.progress import console

    t0 = time.perf_counter()
    done = [0]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=max(total, 1))

        def advance(n: int) -> None:
            done[0] += n
            bar.advance(task, n)

        yield advance
    dt = time.perf_counter() - t0
    rate = done[0] / dt / 1e9 if dt > 0 else 0.0
    console.print(f"[green]done[/green] {description}: {done[0] / 1e9:.2f} GB in {dt:.1f} s ({rate:.2f} GB/s)")


# ----------------------------------------------------------------------------- the meta model
def build_meta_model(
    arch: Any, task: str, hf_config: Any, torch_dtype: Any, trust_remote_code: bool, ckpt: Checkpoint
) -> Any:
    """The HF model for ``task`` with every parameter on ``meta`` and every buffer real."""
    import torch
    from transformers import initialization as hf_init

    auto = arch.auto_class(task)
    with torch.device("meta"), hf_init.meta_device_safe_creation_ops():
        model = auto.from_config(
            hf_config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **arch.load_kwargs(task)
        )
    model.eval()
    # Buffers the checkpoint holds are loaded from it (as from_pretrained would); the others,
    # and the non-persistent ones, are recomputed by transformers' own init code, exactly as
    # from_pretrained does after loading (params are flagged so none of them is touched).
    by_model_key, _ = map_keys(model, ckpt)
    persistent = {k for k, _ in model.named_buffers()} - {k for k, _ in model.named_non_persistent_buffers()}
    from_ckpt = {k: by_model_key[k] for k in persistent if k in by_model_key}
    model._move_missing_keys_from_meta_to_device(persistent - set(from_ckpt), None, None, None)
    for p in model.parameters():
        p._is_hf_initialized = True
    model._initialize_missing_keys(False)
    for k, e in from_ckpt.items():
        mod_name, _, attr = k.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        old = mod._buffers[attr]
        if tuple(old.shape) != e.shape:
            raise GpclError(
                f"weights do not match config.json: {e.where()} is {list(e.shape)}, buffer {k} is {list(old.shape)}"
            )
        mod._buffers[attr] = ckpt.tensor(e).to(old.dtype).clone()
    left = [k for k, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise NeedsEager(f"buffer {left[0]} could not be computed without loading the model")
    return model


def map_keys(model: Any, ckpt: Checkpoint) -> tuple[dict[str, TensorEntry], list[str]]:
    """Checkpoint tensors by the model key transformers would load them into (its renames,
    base-model prefix and legacy names, in its order: ``convert_and_load_state_dict_in_model``),
    and the checkpoint keys that map to nothing."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model, None, None) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = {k: True for k in model.state_dict(keep_vars=True)}
    prefix = getattr(model, "base_model_prefix", None) or None
    by_model_key: dict[str, TensorEntry] = {}
    unused = []
    for ck in sorted(ckpt.tensors, key=dot_natural_key):
        mk, conv = rename_source_key(ck, renamings, converters, prefix, meta_sd)
        if mk not in meta_sd and ck in meta_sd:
            mk, conv = rename_source_key(ck, [], [], prefix, meta_sd)
        if mk in meta_sd and conv is not None:
            raise NeedsEager(
                f"tensor {ck} in {ckpt.tensors[ck].file.name} needs transformers' weight conversion ({conv})"
            )
        if mk in meta_sd and mk not in by_model_key:
            by_model_key[mk] = ckpt.tensors[ck]
        else:
            unused.append(ck)
    return by_model_key, unused


# ----------------------------------------------------------------------------- checkpoint binding
@dataclass
class Binding:
    """Which checkpoint tensor each parameter reads. ``canonical``: one name per distinct
    parameter tensor (the first under ``named_parameters``, as torch.export names it);
    ``aliases``: every name of that tensor (tied weights). ``unused``: the checkpoint tensors no
    parameter or buffer reads (``unused_report()`` for the export result); ``untied``: the tied
    parameters that transformers does not tie for this checkpoint (both stored, different)."""

    entries: dict[str, TensorEntry]  # canonical param name -> checkpoint tensor
    aliases: dict[str, list[str]]
    target: dict[str, Any]  # canonical param name -> torch dtype of the export
    unused: list[str] = field(default_factory=list)  # checkpoint tensors no parameter reads
    unexpected: list[str] = field(default_factory=list)  # of those, the ones the model does not expect
    untied: list[str] = field(default_factory=list)  # tie targets that keep their own tensor

    def unused_report(self, examples: int = 5) -> dict[str, Any]:
        """``{"count", "examples", "unexpected"}``: how many checkpoint tensors the export does not
        read, the first few names, and how many of them the model class does not declare as
        ignorable (``_keys_to_ignore_on_load_unexpected``, e.g. DeepSeek-V3's MTP layer; for those
        transformers warns on load)."""
        return {"count": len(self.unused), "examples": self.unused[:examples], "unexpected": len(self.unexpected)}


def _set_parameter(model: Any, name: str, value: Any) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = value


def bind_checkpoint(model: Any, ckpt: Checkpoint, config_path: Path) -> Binding:
    """Join every parameter of ``model`` (on ``meta``) to a checkpoint tensor the way
    ``from_pretrained`` loads it: keys mapped by transformers' own renames (``map_keys``); every
    stored key loaded into its own parameter (as ``set_param_for_module`` does, which unties);
    then transformers' own ``tie_weights(missing_keys=...)`` decides the ties (a tie whose two
    tensors are both stored and differ is not made, and the target keeps its tensor; a tie whose
    source is absent reads the target). The stand-ins of tied parameters are the file-mapped
    checkpoint tensors, so its equality check reads real bytes; afterwards every parameter is on
    ``meta`` again with its export dtype, ties as decided. Raises GpclError naming the tensor and
    file for a parameter no stored tensor feeds, or a shape mismatch."""
    import torch

    by_model_key, unused = map_keys(model, ckpt)
    named = list(model.named_parameters(remove_duplicate=False))
    dtype_of = {n: p.dtype for n, p in named}
    shape_of = {n: tuple(p.shape) for n, p in named}
    tied_before = dict(getattr(model, "all_tied_weights_keys", None) or {})
    tie_names = set(tied_before) | set(tied_before.values())
    entry_of: dict[int, TensorEntry] = {}
    for name, p in named:
        e = by_model_key.get(name)
        if e is None:
            continue
        if shape_of[name] != e.shape:
            raise GpclError(
                f"weights do not match config.json: {e.where()} is {e.dtype}{list(e.shape)}, "
                f"but {config_path} makes parameter {name} {list(shape_of[name])}"
            )
        if not DTYPES[e.dtype][1].startswith(("float", "bfloat")):
            raise GpclError(f"unreadable weights: {e.where()} has dtype {e.dtype}, expected a float type")
        # only tied parameters need their bytes (transformers compares the two); the others need an identity
        data = ckpt.tensor(e) if name in tie_names else torch.empty(e.shape, dtype=e.torch_dtype, device="meta")
        stand_in = torch.nn.Parameter(data, requires_grad=False)
        entry_of[id(stand_in)] = e
        _set_parameter(model, name, stand_in)
    missing = {k for k in model.state_dict(keep_vars=True) if k not in by_model_key}
    if tied_before:
        import logging

        hf_log = logging.getLogger("transformers.modeling_utils")  # it warns about each tie it does not make
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)
        try:
            model.tie_weights(missing_keys=missing, recompute_mapping=False)
        finally:
            hf_log.setLevel(level)
    untied = sorted(set(tied_before) - set(getattr(model, "all_tied_weights_keys", None) or {}))

    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    entries, aliases, target = {}, {}, {}
    for pid, names in groups.items():
        canonical = names[0]
        found = entry_of.get(pid)
        if found is None:
            where = ", ".join(f.name for f in ckpt.files[:3]) + (" ..." if len(ckpt.files) > 3 else "")
            raise GpclError(
                f"weights in {ckpt.root} do not match config.json: no tensor for parameter {canonical} "
                f"{list(shape_of[canonical])} in {where}"
            )
        entries[canonical], aliases[canonical], target[canonical] = found, names, dtype_of[canonical]
        meta = torch.nn.Parameter(
            torch.empty(shape_of[canonical], dtype=dtype_of[canonical], device="meta"), requires_grad=False
        )
        for n in names:
            _set_parameter(model, n, meta)
    return Binding(entries, aliases, target, unused, _unexpected(model, unused), untied)


def _unexpected(model: Any, unused: list[str]) -> list[str]:
    """The unused checkpoint keys that transformers would report as unexpected (its own filter,
    ``_adjust_missing_and_unexpected_keys``: the model's ``_keys_to_ignore_on_load_unexpected`` and
    its legacy rotary/position buffers are expected)."""
    from transformers.utils.loading_report import LoadStateDictInfo

    info = LoadStateDictInfo(
        missing_keys=set(),
        unexpected_keys=set(unused),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    try:
        model._adjust_missing_and_unexpected_keys(info)
    except Exception:  # a report only: transformers' private helper changed
        return list(unused)
    return sorted(info.unexpected_keys)


# ----------------------------------------------------------------------------- tracing on fake weights
def fake_parameters(model: Any) -> None:
    """Replace every meta parameter by a FakeTensor on ``cpu`` (tied parameters stay one object),
    so torch.export traces with real inputs and buffers against weights that hold no data."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    seen: dict[int, Any] = {}
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in seen:
                with mode:
                    fake = FakeTensor(mode, torch.empty(p.shape, dtype=p.dtype, device="meta"), torch.device("cpu"))
                seen[id(p)] = torch.nn.Parameter(fake, requires_grad=False)
            mod._parameters[k] = seen[id(p)]


def real_parameters(model: Any, binding: Binding, tensor_for: Any) -> None:
    """Give every parameter real data from ``tensor_for(canonical_name) -> torch.Tensor``
    (memory-mapped), keeping ties: the PyTorch reference for validation."""
    import torch

    for canonical, names in binding.aliases.items():
        t = torch.nn.Parameter(tensor_for(canonical), requires_grad=False)
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._parameters[attr] = t


# ----------------------------------------------------------------------------- weights into the output dir
@dataclass
class Placement:
    """Where each canonical parameter's bytes are while tracing: an absolute path (the checkpoint
    file itself when the dtype matches, the staged OUT.onnx.data for converted tensors), offset
    and length. ``finalize`` turns the paths into the output's own data files."""

    where: dict[str, tuple[str, int, int]]  # canonical -> (absolute path, offset, length)
    converted: str | None = None  # absolute path of the staged OUT.onnx.data
    converted_bytes: int = 0
    in_place_bytes: int = 0  # bytes of the parameters read from the checkpoint files as stored
    links: dict[str, str] = field(default_factory=dict)  # data file name -> hardlink|reflink|copy


def _clone_or_link(src: Path, dst: Path, allow_hardlink: bool) -> str:
    """A checkpoint file placed as the output's data file, by the weight files' owner: reflink,
    else a hard link (when allowed), else a streamed copy with progress. Returns which."""
    from gpcl_trt import weightfiles

    size = weightfiles.regular_file(src, "checkpoint file").st_size
    with contextlib.ExitStack() as stack:
        bar: list[Any] = []

        def advance(n: int) -> None:  # a progress bar only once bytes are really copied
            if not bar:
                why = "no reflink" + (" or hard link" if allow_hardlink else "") + " possible"
                bar.append(stack.enter_context(byte_progress(f"copy {src.name} ({why})", size)))
            bar[0](n)

        return weightfiles.link_or_copy(src, dst, hardlink=allow_hardlink, progress=advance)


def data_file_name(out_name: str, ckpt_file: Path) -> str:
    return f"{out_name}.{ckpt_file.name}"


def convert_weights(binding: Binding, ckpt: Checkpoint, staging: Path, out_name: str) -> Placement:
    """Parameters stored in the export dtype are referenced where they are (no byte moves);
    the others are converted, one chunk of at most 64 MiB at a time, into OUT.onnx.data in the
    staging directory at aligned offsets (4 KiB for tensors of 1 MiB and more, so ONNX Runtime
    may memory-map them)."""
    import torch

    where: dict[str, tuple[str, int, int]] = {}
    convert: list[tuple[str, TensorEntry, Any]] = []
    in_place = 0
    for canonical, e in binding.entries.items():
        want = binding.target[canonical]
        if e.torch_dtype == want:
            where[canonical] = (str(e.file.resolve()), e.offset, e.nbytes)
            in_place += e.nbytes
        else:
            convert.append((canonical, e, want))
    placement = Placement(where, in_place_bytes=in_place)
    if not convert:
        return placement
    path = staging / f"{out_name}.data"
    total = sum(e.numel * torch.empty((), dtype=w).element_size() for _, e, w in convert)
    kinds = sorted({f"{e.dtype}->{_dtype_name(w)}" for _, e, w in convert})
    with open(path, "wb") as f, byte_progress(f"convert {len(convert)} tensors ({', '.join(kinds)})", total) as advance:
        pos = 0
        for canonical, e, want in convert:
            out_item = torch.empty((), dtype=want).element_size()
            length = e.numel * out_item
            pad = (-pos) % (ALIGN_BIG if length >= BIG else ALIGN_SMALL)
            if pad:
                f.write(b"\0" * pad)
                pos += pad
            where[canonical] = (str(path.resolve()), pos, length)
            step = max(1, CHUNK // e.itemsize)  # elements per chunk
            buf = bytearray(min(step, e.numel) * e.itemsize)
            with open(e.file, "rb") as src_f:
                for start in range(0, e.numel, step):
                    n = min(step, e.numel - start)
                    view = memoryview(buf)[: n * e.itemsize]
                    got = os.preadv(src_f.fileno(), [view], e.offset + start * e.itemsize)
                    if got != n * e.itemsize:
                        raise GpclError(f"unreadable weights: {e.where()} is truncated (short read)")
                    converted = torch.frombuffer(view, dtype=e.torch_dtype).to(want)
                    f.write(memoryview(converted.view(torch.uint8).numpy()))
                    advance(n * out_item)
            pos += length
    placement.converted = str(path.resolve())
    placement.converted_bytes = pos
    return placement


def finalize_proto(proto: Any, placement: Placement, staging: Path, out_name: str, layout: str) -> list[str]:
    """Turn the absolute external-data paths of the traced, optimized model into the output's
    own files. ``layout``: ``inline`` (the bytes into the ONNX file; small models), ``link``
    (each checkpoint file the model reads is reflinked, else hard-linked, else copied into the
    output directory as OUT.onnx.<file name>; offsets stay the checkpoint's), ``copy`` (the
    same, never a hard link). Returns the data file names (in the staging directory)."""
    import onnx

    converted_name = f"{out_name}.data"
    names: dict[str, str] = {}
    if placement.converted:
        names[placement.converted] = converted_name
    files: list[str] = []
    for t in _all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        src = info.get("location", "")
        if layout == "inline":
            with open(src, "rb") as f:
                t.raw_data = os.pread(f.fileno(), int(info["length"]), int(info.get("offset", 0)))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            continue
        if src not in names:
            if not os.path.isabs(src):
                raise GpclError(f"internal: initializer {t.name} has external data {src!r} of unknown origin")
            names[src] = data_file_name(out_name, Path(src))
        for e in t.external_data:
            if e.key == "location":
                e.value = names[src]
        if names[src] not in files:
            files.append(names[src])
    if layout == "inline":
        return []  # a converted OUT.onnx.data stays until validation has read it (see drop_unused)
    # Constants the optimizer folded (all small: it folds inputs of at most 8192 elements) go
    # with the weights when above 1 KiB, as onnx.save_model(size_threshold=1024) would put them.
    small = [
        t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024
    ]
    if small:
        path = staging / converted_name
        with open(path, "ab") as f:
            pos = f.tell()
            for t in small:
                pad = (-pos) % ALIGN_SMALL
                f.write(b"\0" * pad)
                pos += pad
                data = t.raw_data
                f.write(data)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", converted_name), ("offset", str(pos)), ("length", str(len(data)))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                pos += len(data)
        if placement.converted is None:
            placement.converted = str(path.resolve())
        if converted_name not in files:
            files.append(converted_name)
    for src, name in names.items():
        if src == placement.converted:
            continue
        if name in files:
            placement.links[name] = _clone_or_link(Path(src), staging / name, allow_hardlink=layout == "link")
    return files


def drop_unused(placement: Placement, files: list[str]) -> None:
    """Remove the staged OUT.onnx.data when the output does not use it (inline layout); called
    after validation, which reads the converted weights from it."""
    if placement.converted and Path(placement.converted).name not in files:
        os.unlink(placement.converted)


def _all_tensors(proto: Any) -> Iterator[Any]:
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def _dtype_name(t: Any) -> str:
    return str(t).replace("torch.", "")


# ----------------------------------------------------------------------------- graph binding
def onnx_type(torch_dtype: Any) -> int:
    return DTYPES[TORCH_TO_ST[_dtype_name(torch_dtype)]][3]


def bind_initializers(ir_model: Any, binding: Binding, placement: Placement) -> set[str]:
    """Turn every weight initializer of the traced graph (fake data) into an ExternalTensor over
    its bytes in ``placement`` (absolute paths, so the exporter's optimizer can read the few small
    ones it folds). Returns the names bound; raises if a fake initializer has no tensor."""
    import onnx_ir as ir

    alias_to_canonical = {a: c for c, names in binding.aliases.items() for a in names}
    bound: set[str] = set()
    for name, value in ir_model.graph.initializers.items():
        param = name[len(CORE_PREFIX) :] if name.startswith(CORE_PREFIX) else name
        canonical = alias_to_canonical.get(param)
        if canonical is None:
            if _is_fake(value.const_value):
                raise GpclError(f"export: initializer {name} has no checkpoint tensor (internal error)")
            continue
        path, offset, length = placement.where[canonical]
        value.const_value = ir.ExternalTensor(
            path,
            offset,
            length,
            ir.DataType(onnx_type(binding.target[canonical])),
            shape=ir.Shape(list(binding.entries[canonical].shape)),
            name=name,
        )
        bound.add(name)
    return bound


def weight_initializer(name: str, binding: Binding, placement: Placement) -> Any | None:
    """The initializer ``name`` (CORE_PREFIX + a parameter name) over its bytes in ``placement``,
    as ``bind_initializers`` makes it once serialized; None if no parameter has that name."""
    import onnx

    param = name[len(CORE_PREFIX) :] if name.startswith(CORE_PREFIX) else name
    canonical = next((c for c, names in binding.aliases.items() if param in names), None)
    if canonical is None:
        return None
    path, offset, length = placement.where[canonical]
    t = onnx.TensorProto(name=name, data_type=onnx_type(binding.target[canonical]))
    t.dims.extend(binding.entries[canonical].shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", path), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _is_fake(t: Any) -> bool:
    raw = getattr(t, "raw", None)
    return type(raw).__name__ == "FakeTensor" or getattr(getattr(raw, "device", None), "type", None) == "meta"


def reference_tensors(binding: Binding, ckpt: Checkpoint, placement: Placement) -> Any:
    """``canonical -> torch.Tensor`` for the PyTorch reference, all over read-only file maps
    (file-backed, never anonymous memory nor commit charge): the checkpoint's own bytes where the
    dtype matched, the converted bytes in OUT.onnx.data otherwise (the reference then runs on
    exactly the exported weights)."""
    import torch

    from gpcl_trt.exporter.checkpoint import map_read_only, mapped_tensor

    maps: dict[str, Any] = {}

    def tensor_for(canonical: str) -> Any:
        e = binding.entries[canonical]
        want = binding.target[canonical]
        if e.torch_dtype == want:
            return ckpt.tensor(e)
        location, offset, length = placement.where[canonical]
        if location not in maps:  # read-only: a private writable map would be charged in full
            maps[location] = map_read_only(Path(location))
        count = length // torch.empty((), dtype=want).element_size()
        return mapped_tensor(maps[location], want, count, offset).reshape(e.shape)

    return tensor_for


def nbytes_of(binding: Binding) -> int:
    import torch

    return sum(
        math.prod(e.shape) * torch.empty((), dtype=binding.target[c]).element_size() for c, e in binding.entries.items()
    )
