"""HF model directory -> ONNX with the dynamo exporter, validated against PyTorch.

Public API (see docs/architecture.md): ``export_model``, ``load_model``, ``make_dummy_inputs``.
torch / transformers / onnx are imported inside the functions so that importing this module
(and so the CLI) stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gpcl_trt.common import GpclError, check_can_write, manifest_path, one_line, sha256_dir, sha256_file, write_manifest
from gpcl_trt.exporter import replicate as rep
from gpcl_trt.feeds import is_past
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES

DTYPES = ("fp32", "fp16", "bf16")  # bf16: lazy export only (a bf16 checkpoint linked as is), no ORT validation on CPU
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MIN_OPSET, MAX_OPSET = 18, 23
# Default validation tolerances: fp32 1e-4; fp16 accumulates ~1e-3 relative error per
# layer and the two runtimes round differently, so the bar is two orders of magnitude looser.
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-1}
# Relative part of the tolerance (max|onnx - torch| <= atol + rtol * max|torch|, per output): none
# for fp32; in 16-bit arithmetic the error grows with the size of the numbers summed.
DEFAULT_RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 5e-2}
# Shapes: the trace uses one, validation a different one, so a shape baked in by mistake shows.
EXPORT_SHAPE = {"batch": 2, "sequence": 8, "past": 5}
VALIDATE_SHAPE = {"batch": 3, "sequence": 11, "past": 0}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")


# ----------------------------------------------------------------------------- the wrapped module
def _io_module_class():
    import torch

    class OnnxIOModule(torch.nn.Module):
        """``forward(**feeds)`` takes the ONNX input names (numpy arrays or tensors) and returns
        the outputs as a tuple in ONNX output order. ``core`` is the module that is traced."""

        def __init__(self, core: torch.nn.Module, arch: Any, task: str):
            super().__init__()
            self.core = core
            self.task = task
            self.input_names = [s.name for s in arch.inputs(task)]
            self.output_names = [s.name for s in arch.outputs(task)]
            self._past = [n for n in self.input_names if is_past(n)]

        def core_kwargs(self, feeds: dict[str, Any]) -> dict[str, Any]:
            missing = set(self.input_names) - set(feeds)
            extra = set(feeds) - set(self.input_names)
            if missing or extra:
                raise ValueError(
                    f"inputs must be exactly {self.input_names}; missing {sorted(missing)}, extra {sorted(extra)}"
                )
            as_t = lambda v: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v  # noqa: E731
            kw = {n: as_t(feeds[n]) for n in self.input_names if n not in self._past}
            if self._past:
                kw["past_key_values"] = tuple(as_t(feeds[n]) for n in self._past)
            return kw

        def forward(self, **feeds: Any) -> tuple:
            return tuple(self.core(**self.core_kwargs(feeds)))

    return OnnxIOModule


# ----------------------------------------------------------------------------- input checks
def _check_model_dir(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    d = Path(model_dir)
    if not d.exists():
        raise GpclError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise GpclError(f"{d} is not a directory (expected a local Hugging Face model directory)")
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
    d, raw = _check_model_dir(model_dir)
    _arch_class(raw, d / "config.json")
    return raw["model_type"]


def _arch_class(raw_config: dict, cfg_path: Path, trust_remote_code: bool = False):
    """The family class (text encoder, decoder-only, vision encoder) from config.json's
    architectures/model_type and transformers' auto-class mappings; one clear line otherwise."""
    from gpcl_trt.exporter.families import resolve_family

    return resolve_family(raw_config, str(cfg_path), trust_remote_code)


def _check_weights(d: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
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


def _resolve_task(arch: Any, task: str) -> str:
    from gpcl_trt.exporter.tasks import TASKS

    if task == "auto":
        task = arch.default_task()
    elif task not in TASKS:
        raise GpclError(f"unknown task {task!r}; choose auto or one of {', '.join(TASKS)}")
    arch.check_task(task)
    return task


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library chatter (load bars, exporter warnings) so stderr carries our progress."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # onnx_ir warns for each initializer it does not deduplicate (weights pinned as inputs: wanted)
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    old = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
        for log, lvl in zip(loggers, old):
            log.setLevel(lvl)


def load_model(
    model_dir: str | os.PathLike,
    task: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: str = "fp32",
):
    """Load a local HF model directory and wrap it exactly as it is exported.

    Returns ``(module, arch_config, task)``: ``module(**feeds)`` takes the ONNX input names
    (numpy arrays or tensors) and returns the outputs as a tuple in ONNX output order
    (``module.input_names`` / ``module.output_names``); ``arch_config`` is the bound
    per-architecture config (``arch_config.inputs(task)``, ``.outputs(task)``); ``task`` is the
    resolved task. Raises GpclError for a bad directory, config or weights.
    """
    if dtype not in DTYPES or dtype == "bf16":
        raise GpclError(f"unknown dtype {dtype!r} for a loaded model; choose fp32 or fp16")
    d, raw = _check_model_dir(model_dir)
    arch_cls = _arch_class(raw, d / "config.json", trust_remote_code)
    _, use_safetensors = _check_weights(d, allow_pickle)

    import torch

    with _quiet():
        hf_config, arch, task = _bind_config(d, arch_cls, dtype, task, trust_remote_code)
        if use_safetensors:
            # The headers against config.json before anything is allocated: a config that cannot
            # match its checkpoint (100000 layers next to a small file) would otherwise allocate
            # until the kernel kills the process.
            _lazy_model(d, hf_config, arch, task, dtype, trust_remote_code, precheck_only=True)
        try:
            model, info = arch.auto_class(task).from_pretrained(
                d,
                config=hf_config,
                dtype=torch.float16 if dtype == "fp16" else torch.float32,
                trust_remote_code=trust_remote_code,
                use_safetensors=use_safetensors,
                local_files_only=True,
                output_loading_info=True,
                **arch.load_kwargs(task),
            )
        except Exception as exc:
            raise GpclError(f"unreadable weights in {d}: {one_line(exc)}") from None
    # A checkpoint that does not match the config loads with random weights and only a warning;
    # exporting that would be silently wrong.
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = missing[:3] if missing else [m[0] if isinstance(m, tuple) else m for m in mismatched[:3]]
        raise GpclError(
            f"weights in {d} do not match config.json ({len(missing)} missing, {len(mismatched)} mismatched, e.g. "
            f"{what})"
        )
    model.eval()
    module = _io_module_class()(arch.core(model, task), arch, task).eval()
    return module, arch, task


def _lazy_model(
    d: Path, hf_config: Any, arch: Any, task: str, dtype: str, trust_remote_code: bool, precheck_only: bool = False
):
    """The model built on ``meta`` and joined to the checkpoint's headers (exporter/lazy.py):
    returns ``(model, checkpoint, binding)``, or None when the checkpoint needs transformers'
    own loader (``NeedsEager``; the reason is in ``_lazy_model.why``). Raises GpclError naming
    the file and tensor when the checkpoint cannot match config.json."""
    import torch

    from gpcl_trt.exporter import lazy
    from gpcl_trt.exporter.checkpoint import Checkpoint, check_config_layers

    ckpt = Checkpoint.open(d)
    check_config_layers(hf_config, ckpt, d / "config.json")
    try:
        model = lazy.build_meta_model(
            arch, task, hf_config, getattr(torch, TORCH_DTYPES[dtype]), trust_remote_code, ckpt
        )
        binding = lazy.bind_checkpoint(model, ckpt, d / "config.json")
    except lazy.NeedsEager as exc:
        _lazy_model.why = str(exc)
        return None
    except GpclError:
        raise
    except Exception as exc:
        if precheck_only:  # the eager loader will say what is wrong in its own words
            return None
        raise GpclError(f"cannot build {arch.name} from {d / 'config.json'}: {one_line(exc)}") from None
    return model, ckpt, binding


def _bind_config(d: Path, arch_cls: Any, dtype: str, task: str, trust_remote_code: bool) -> tuple[Any, Any, str]:
    """(HF config, the architecture config bound to it, the resolved task); one clear line for a
    config transformers cannot read."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise GpclError(f"cannot read config {d / 'config.json'}: {one_line(exc)}") from None
    arch = arch_cls(hf_config, dtype)
    return hf_config, arch, _resolve_task(arch, task)


@contextlib.contextmanager
def _trace_errors(d: Path, arch: Any, task: str) -> Iterator[None]:
    """A failure inside the exporter becomes one line naming the model, architecture and task;
    our own errors (and NotReplicable, which the caller handles) pass as they are."""
    try:
        yield
    except (GpclError, rep.NotReplicable):
        raise
    except Exception as exc:
        raise GpclError(f"export failed for {d} ({arch.name}, {task}): {one_line(exc)}") from None


# ----------------------------------------------------------------------------- dummy inputs
def make_dummy_inputs(
    arch_config: Any, task: str, batch: int, seq: int, seed: int, past: int | None = None
) -> dict[str, np.ndarray]:
    """Random but valid inputs for ``arch_config``/``task`` (gpcl_trt.feeds, keyed by ONNX input
    name), with the last row's mask tail padded (batch > 1) so masking is exercised, and
    ``past`` cached tokens (default ``seq // 2 + 1``; 0 means a prefill)."""
    from gpcl_trt import feeds

    float_dtype = np.float16 if getattr(arch_config, "dtype", "fp32") == "fp16" else np.float32
    specs = feeds.specs_from_axes(arch_config.inputs(task), float_dtype)
    past = seq // 2 + 1 if past is None else past
    return dict(feeds.make_feeds(specs, batch, seq, past, seed=seed, vocab=arch_config.vocab_size, pad_last_row=True))


# ----------------------------------------------------------------------------- tracing
def _trace(module: Any, arch: Any, task: str, opset: int, bind: Any = None, fold_weights: bool = True):
    """Run the dynamo exporter on ``module.core`` and return the ONNX ModelProto. ``bind``
    (lazy export) is called on the traced ``onnx_ir.Model`` before the exporter's optimizer runs,
    to give the weight initializers (fake tensors at that point) their external data.
    ``fold_weights=False``: no node reading a weight is folded, so that each layer's nodes read
    their own weights (exporter/replicate.py copies them)."""
    import torch

    from gpcl_trt.exporter.tasks import TEXT_GENERATION_WITH_PAST

    shape = EXPORT_SHAPE
    feeds = make_dummy_inputs(arch, task, shape["batch"], shape["sequence"], seed=0, past=shape["past"])
    kwargs = module.core_kwargs(feeds)
    if getattr(arch, "dtype", "fp32") == "bf16":  # numpy has no bfloat16: the float feeds are cast here
        cast = lambda t: t.to(torch.bfloat16) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        kwargs = {k: tuple(cast(x) for x in v) if isinstance(v, tuple) else cast(v) for k, v in kwargs.items()}
    dims = {name: torch.export.Dim(name) for name in ("batch", "sequence", "past_sequence", "total_sequence")}
    specs = {s.name: s for s in arch.inputs(task)}

    def dyn(spec) -> dict:
        return {i: dims[a] for i, a in enumerate(spec.axes) if isinstance(a, str)}

    dynamic_shapes: dict[str, Any] = {n: dyn(specs[n]) for n in kwargs if n != "past_key_values"}
    if task == TEXT_GENERATION_WITH_PAST:
        dynamic_shapes["past_key_values"] = tuple(dyn(specs[n]) for n in module._past)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module.core,
            (),
            kwargs=kwargs,
            dynamo=True,
            opset_version=opset,
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=False,
        )
        keep = bind(program.model) if bind is not None else set()
        _optimize_keeping(program.model, keep, fold_small=fold_weights)
    proto = _normalise(program.model_proto, arch, task)
    _intermediate_types_only(proto)
    _residual_adds_as_sum(proto)
    return proto


def _trace_replicated(model: Any, arch: Any, task: str, opset: int, stack: Any, binding: Any, placement: Any):
    """Trace the first ``TRACED_LAYERS`` layers on fake weights, then grow the graph to every
    layer (exporter/replicate.py). Returns the proto and the module of the whole model (the
    PyTorch reference for validation)."""
    from gpcl_trt.exporter import lazy as lz

    io = _io_module_class()
    prefix = lz.CORE_PREFIX + stack.path

    with rep.truncated(stack, rep.TRACED_LAYERS):
        with _quiet():
            few = io(arch.core(model, task), arch, task).eval()
        proto = _trace(
            few, arch, task, opset, bind=lambda m: lz.bind_initializers(m, binding, placement), fold_weights=False
        )
    with _quiet():
        module = io(arch.core(model, task), arch, task).eval()  # every layer again: the arch's I/O too
    rep.replicate(proto, prefix, stack.count, lambda name: lz.weight_initializer(name, binding, placement))
    rep.order_io(proto, module.input_names, module.output_names)
    return _normalise(proto, arch, task), module


def _optimize_keeping(model: Any, weights: set[str], fold_small: bool = True) -> None:
    """What torch.onnx.export(optimize=True) runs (onnxscript's optimizer, then its fusions), on
    every export, except that near-identity scalars are kept (:func:`_hide_near_identity_constants`)
    and no node reading a large weight initializer (``weights``, lazy export) is folded: an eager
    export stores ``Transpose(W)`` of every projection as a new constant, i.e. a second copy of
    the weights; here the graph keeps the Transpose node over the checkpoint's own bytes (ONNX
    Runtime and TensorRT fold it when they load the model). Everything else folds exactly as on
    an eager export. ``fold_small=False``: every weight keeps its own name and nodes: none is
    folded, and none is merged with an equal one (the optimizer keeps one of several equal small
    initializers, e.g. norms that are all ones); for that, the weights are graph inputs while the
    optimizer runs, which it neither folds nor deduplicates."""
    import onnxscript
    from onnxscript.optimizer import _constant_folding

    limit = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT

    def should_fold(node: Any) -> bool | None:
        for x in node.inputs:
            if x is not None and x.name in weights and x.const_value is not None and x.const_value.size > limit:
                return False
        return None

    pinned = [] if fold_small else [v for n, v in model.graph.initializers.items() if n in weights]
    model.graph.inputs.extend(pinned)
    hidden = _hide_near_identity_constants(model.graph)
    try:
        onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
        onnxscript.rewriter.onnx_fusions.fuse(model)
    finally:
        for v in pinned:
            model.graph.inputs.remove(v)
        _restore_constants(model.graph, hidden)


def _near_identity(array: np.ndarray) -> bool:
    """A float scalar close to, but not, 0 or 1 (what onnxscript's no-op rules take for 0 and 1:
    ``|c| <= 1e-8`` for Add/Sub, ``|c - 1| <= 1e-5`` for Mul/Div; margins kept wider)."""
    if array.dtype.kind != "f" or array.size != 1:
        return False
    x = float(array.reshape(()))
    return (x != 0 and abs(x) <= 1e-6) or (x != 1 and abs(x - 1) <= 1e-4)


def _hide_near_identity_constants(graph: Any) -> list[tuple[Any, Any]]:
    """Turn each near-identity float scalar (a Constant node's output or an initializer) into a
    plain graph input while the optimizer runs. Why: its no-op rules rewrite ``x + c`` to ``x``
    when ``|c| <= 1e-8``, so Helium's RMSNorm (``rsqrt(mean(x^2) + 1e-8)``) lost its epsilon and
    gave NaN for an all-zero row (the padding token's embedding); a graph input has no value for
    the rules to read. Returns (input, tensor) pairs for :func:`_restore_constants`."""
    import onnx_ir as ir

    hidden = []
    for node in list(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        tensor = ir.convenience.get_const_tensor(out)
        if tensor is None or out.is_graph_output() or not _near_identity(tensor.numpy()):
            continue
        stand_in = ir.Value(name=out.name, type=out.type, shape=out.shape)
        out.replace_all_uses_with(stand_in)
        graph.remove(node, safe=True)
        hidden.append((stand_in, tensor))
    for name, value in list(graph.initializers.items()):
        if value.const_value is None or value.const_value.size != 1 or value.is_graph_output():
            continue  # the size first: reading a weight's values would map (or load) all of it
        if value in graph.inputs or not _near_identity(value.const_value.numpy()):
            continue
        tensor = value.const_value
        graph.initializers.pop(name)
        stand_in = ir.Value(name=name, type=value.type, shape=value.shape)
        value.replace_all_uses_with(stand_in)
        hidden.append((stand_in, tensor))
    graph.inputs.extend(v for v, _ in hidden)
    return hidden


def _restore_constants(graph: Any, hidden: list[tuple[Any, Any]]) -> None:
    """The stand-ins of :func:`_hide_near_identity_constants` become initializers again."""
    import onnx_ir as ir

    for value, tensor in hidden:
        graph.inputs.remove(value)
        if value.uses():
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)
            graph.register_initializer(value)


def _normalise(proto: Any, arch: Any, task: str) -> Any:
    """Make the graph signature match the arch config: the exporter names derived axes after
    their expression (``past_sequence + sequence``); the contract calls them ``total_sequence``."""
    want = {s.name: s.axes for s in arch.inputs(task) + arch.outputs(task)}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        axes = want.get(vi.name)
        if axes is None:
            continue
        for dim, axis in zip(vi.type.tensor_type.shape.dim, axes):
            if isinstance(axis, str):
                dim.dim_param = axis
    return proto


def _residual_adds_as_sum(proto: Any) -> int:
    """Spell a residual Add that feeds a LayerNormalization as a two-input Sum (the same numbers,
    standard ONNX) where ONNX Runtime will know both of its input shapes: there it fuses Add +
    LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower than the two ops it
    replaces, while its Sum kernel is slower than Add (BENCHMARKS.md, Export). Which shapes it
    will know is read from ONNX shape inference on the graph as written (intermediate shapes
    dropped first: :func:`_intermediate_types_only`). TensorRT fuses either spelling. Adds with a
    constant input (a bias) are left alone. Returns how many were rewritten."""
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in proto.graph.node for o in n.output}
    residual = []
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization" or not node.input:
            continue
        add = producers.get(node.input[0])
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            if not any(i in constants for i in add.input):
                residual.append(add)
    if not residual:
        return 0
    shapes = _inferred_shapes(proto)
    named = {d.dim_param for vi in list(proto.graph.input) + list(proto.graph.output) for d in _dims(vi) if d.dim_param}
    count = 0
    for add in residual:
        a, b = (_known_dims(shapes.get(x), named) for x in add.input[:2])
        if a is not None and a == b:
            add.op_type = "Sum"
            count += 1
    return count


def _inferred_shapes(proto: Any) -> dict[str, Any]:
    """name -> TensorShapeProto of each tensor: graph inputs' and outputs' own, the intermediates'
    from ONNX shape inference on the graph alone (initializers enter as typed inputs, so no weight bytes are copied)."""
    import onnx
    from onnx import helper

    g = proto.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    graph = helper.make_graph(list(g.node), "shapes", list(g.input) + weights, list(g.output))
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is advisory here: without it nothing is known
        return {}
    infos = list(inferred.graph.value_info) + list(g.input) + list(g.output)
    return {vi.name: vi.type.tensor_type.shape for vi in infos if vi.type.tensor_type.HasField("shape")}


def _dims(vi: Any) -> Any:
    return vi.type.tensor_type.shape.dim


def _known_dims(shape: Any, named: set[str]) -> tuple | None:
    """The dims of ``shape`` if every one is a number or an axis the graph's inputs and outputs
    name (the symbols shape inference makes up for unknown dims say nothing), else None."""
    if shape is None or not shape.dim:
        return None
    dims = tuple(d.dim_value or d.dim_param for d in shape.dim)
    return dims if all(isinstance(d, int) or d in named for d in dims) else None


def _intermediate_types_only(proto: Any) -> int:
    """Keep each intermediate tensor's element type in ``value_info`` and drop its shape (graph
    inputs and outputs keep theirs). Why: ONNX Runtime's CPU memory planner lets a tensor reuse a
    dead tensor's buffer when the declared shapes say they are the same size; with every shape
    declared, that reuse made MiniLM 1.05-1.07x slower than the same graph without the shapes
    (Transpose, Add, BiasGelu slower; equal again with ``enable_mem_reuse`` off; BENCHMARKS.md,
    Export). Optimum's graphs declare none. The types stay: per-layer validation and diff read
    them. Returns how many shapes were dropped."""
    count = 0
    for vi in proto.graph.value_info:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")
            count += 1
    return count


# ----------------------------------------------------------------------------- saving
def _initializer_bytes(proto: Any) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _write_eager(proto: Any, path: Path, external_data: bool | None) -> list[str]:
    """The eager path's ONNX file into the staging directory; weights inline, or in
    ``OUT.onnx.data`` when asked or above ~1.8 GB. Returns the data files written."""
    import onnx

    external = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    if not external:
        onnx.save_model(proto, path)
        return []
    data_name = path.name + ".data"
    onnx.save_model(
        proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    return [data_name]


INLINE_LIMIT = 256 << 20  # lazy export keeps weights up to this size inside the ONNX file by default
LAYOUTS = ("auto", "link", "copy", "inline")


def _layout(external_data: bool | str | None, nbytes: int) -> str:
    """Where a lazy export puts the weights. ``auto`` (None): inside the ONNX file up to 256 MB
    (one self-contained file, like an eager export; onnx's own loader refuses hard-linked data),
    else ``link``. True = ``link``, False = ``inline``."""
    layout = {None: "auto", True: "link", False: "inline"}.get(external_data, external_data)  # type: ignore[arg-type]
    if layout not in LAYOUTS:
        raise GpclError(f"unknown external data layout {external_data!r}; choose {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = "inline" if nbytes <= INLINE_LIMIT else "link"
    if layout == "inline" and nbytes > EXTERNAL_DATA_BYTES:
        raise GpclError(
            f"the weights ({nbytes / 1e9:.1f} GB) cannot be stored inside one ONNX file (protobuf's 2 GB limit); use "
            "external data"
        )
    return layout


def _external_locations(path: Path) -> set[str]:
    """Data files an existing ONNX output refers to (to remove those a --force export replaces
    and no longer uses). Never raises."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return {loc for loc in locs if "/" not in loc and "\\" not in loc and loc not in ("", ".", "..")}


# ----------------------------------------------------------------------------- memory budget
VALIDATE_MODES = ("auto", "full", "layers", "none")
DEFAULT_BUDGET_FRACTION = 0.5  # of MemAvailable when the command starts
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory_budget(value: str | int | float | None) -> int:
    """``"8G"``, ``"512M"``, ``"0.5G"``, a byte count, or None (the default: half of the memory
    available now) -> bytes."""
    if value is None:
        return int(available_memory() * DEFAULT_BUDGET_FRACTION)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in _UNITS else ""
        try:
            n = float(text[: len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            raise GpclError(f"memory budget {value!r} is not a size (e.g. 8G, 512M)") from None
    if not n > 0 or n != n:
        raise GpclError(f"memory budget must be > 0, got {value!r}")
    return int(n)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _validate_mode(validate: bool | str) -> str:
    if validate is True:
        return "auto"
    if validate is False or validate is None:
        return "none"
    if validate not in VALIDATE_MODES:
        raise GpclError(f"unknown validation mode {validate!r}; choose {', '.join(VALIDATE_MODES)}")
    return validate


# ----------------------------------------------------------------------------- input hash
HASH_CONTENT_LIMIT = 2 << 30  # above this, hash names, sizes, mtimes and safetensors headers


def _model_dir_hash(d: Path) -> tuple[str, str]:
    """sha256 of the model directory: its full content up to 2 GiB; beyond that, of every file's
    name, size and mtime plus the content of every non-weight file and every safetensors header
    (reading 140 GB to hash it would cost more than the export). Returns (hex, kind)."""
    import hashlib
    import struct

    files = sorted(p for p in d.rglob("*") if p.is_file())
    if sum(p.stat().st_size for p in files) <= HASH_CONTENT_LIMIT:
        return sha256_dir(d), "content"
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(d).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                h.update(head + f.read(min(n, 100 << 20)))
        elif st.st_size <= 16 << 20:
            h.update(p.read_bytes())
    return h.hexdigest(), "names+sizes+mtimes+headers"


# ----------------------------------------------------------------------------- export
def export_model(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    task: str = "auto",
    opset: int = 18,
    dtype: str = "fp32",
    atol: float | None = None,
    rtol: float | None = None,
    validate: bool | str = True,
    force: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    external_data: bool | None = None,
    memory_budget: str | int | None = None,
    lazy: bool | None = None,
    replicate: bool | None = None,
) -> dict[str, Any]:
    """Export a local HF model directory to ONNX (dynamo exporter, dynamic batch/sequence axes,
    node metadata kept), validate it against PyTorch with ONNX Runtime and write
    OUT.manifest.json. Returns the result dict; ``ok`` is False when validation exceeds the
    tolerance (``max|onnx - torch| <= atol + rtol * max|torch|`` per output, defaults by dtype),
    and then nothing is written: every output appears under its final name only after every
    check has passed.

    Safetensors checkpoints take the lazy path (exporter/lazy.py): traced on fake weights, the
    ONNX external data pointing into hard links of the checkpoint files (dtype as stored) or into
    ``OUT.onnx.data`` (converted one chunk at a time). Pickle checkpoints (``allow_pickle``), or
    checkpoints that need transformers' weight conversion ops, take the eager path (the model
    loaded in memory); ``lazy=False`` forces it, ``lazy=True`` refuses to fall back.

    ``validate``: True/"auto" (full when ONNX Runtime's estimated memory fits ``memory_budget``,
    else layers), "full", "layers", False/"none". ``memory_budget``: bytes or "8G"; default half of
    the available memory. ``external_data``: None = lazy exports always, eager above ~1.8 GB;
    True/False to force (False on the lazy path reads the weights back into one file).
    ``replicate`` (lazy path): None = a decoder of 8 or more layers that are one module is traced
    with 4 layers and grown to all of them (exporter/replicate.py), else every layer is traced and
    ``weights.layers.why_every_layer`` says why; True insists (an error if impossible); False
    traces every layer."""
    from gpcl_trt import progress
    from gpcl_trt.exporter import validate as val
    from gpcl_trt.exporter.staging import Staging

    out = Path(output)
    if out.suffix != ".onnx":
        raise GpclError(f"output {out} must end in .onnx")
    if out.is_dir():
        raise GpclError(f"output {out} is a directory")
    check_can_write(out, force)
    check_can_write(manifest_path(out), force)  # the manifest is an output too
    if dtype not in DTYPES:
        raise GpclError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise GpclError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
    if not atol >= 0:
        raise GpclError(f"atol must be >= 0, got {atol}")
    rtol = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)
    if not rtol >= 0:
        raise GpclError(f"rtol must be >= 0, got {rtol}")
    mode = _validate_mode(validate)
    budget = parse_memory_budget(memory_budget)
    if dtype == "bf16" and mode != "none":
        raise GpclError(
            "--dtype bf16 cannot be validated here (ONNX Runtime's CPU provider has no bf16 MatMul); pass --validate "
            "none"
        )
    if dtype == "bf16" and lazy is False:
        raise GpclError("--dtype bf16 is exported lazily only (safetensors checkpoints)")

    d, raw = _check_model_dir(model_dir)
    arch_cls = _arch_class(raw, d / "config.json", trust_remote_code)
    use_safetensors = any(d.glob("*.safetensors"))
    if not use_safetensors:
        _check_weights(d, allow_pickle)  # the pickle refusal, or "no weights"
    eager_reason = None
    built = None
    if use_safetensors and lazy is not False:
        import torch  # noqa: F401  (transformers wants it first)

        with progress.step(f"read {d.name} (config and safetensors headers)"), _quiet():
            hf_config, arch, task = _bind_config(d, arch_cls, dtype, task, trust_remote_code)
            built = _lazy_model(d, hf_config, arch, task, dtype, trust_remote_code)
        if built is None:
            eager_reason = getattr(_lazy_model, "why", "the checkpoint needs transformers' own loader")
            if lazy is True:
                raise GpclError(f"lazy export impossible for {d}: {eager_reason}")
    elif lazy is True:
        raise GpclError(f"lazy export needs safetensors weights; {d} has pickle weights")
    else:
        eager_reason = "pickle weights" if not use_safetensors else "lazy=False"

    old_locations = _external_locations(out) if force and out.is_file() else set()
    weights: dict[str, Any]
    with Staging(out.parent, out.name) as stage:
        staged = stage.file(out.name)
        if built is not None:
            from gpcl_trt.exporter import lazy as lz

            model, ckpt, binding = built
            lz.fake_parameters(model)
            layout = _layout(external_data, lz.nbytes_of(binding))
            with progress.step(f"weights: {lz.nbytes_of(binding) / 1e9:.2f} GB in {len(binding.entries)} tensors"):
                placement = lz.convert_weights(binding, ckpt, stage.path, out.name)
            stack = rep.find_stack(model, hf_config.get_text_config())
            layers = {"traced": stack.count if stack else None, "replicated": 0}
            why = "not asked (replicate=False)"
            if replicate is not False:
                why = rep.why_not(stack, rep.TRACED_LAYERS + 1 if replicate else 2 * rep.TRACED_LAYERS)
            if why is None:
                try:
                    with (
                        progress.step(
                            f"trace {arch.name} on fake weights, {rep.TRACED_LAYERS} of {stack.count} layers "
                            f"({task}, opset {opset}, {dtype})"
                        ),
                        _trace_errors(d, arch, task),
                    ):
                        proto, module = _trace_replicated(model, arch, task, int(opset), stack, binding, placement)
                    layers = {"traced": rep.TRACED_LAYERS, "replicated": stack.count - rep.TRACED_LAYERS}
                except rep.NotReplicable as exc:
                    why = f"layers do not line up ({exc})"
            if why is not None and replicate:
                raise GpclError(f"cannot replicate the layers of {d}: {why}")
            if why is not None:
                layers["why_every_layer"] = why
                with _quiet():
                    module = _io_module_class()(arch.core(model, task), arch, task).eval()
                with (
                    progress.step(f"trace {arch.name} on fake weights ({task}, opset {opset}, {dtype})"),
                    _trace_errors(d, arch, task),
                ):
                    proto = _trace(
                        module, arch, task, int(opset), bind=lambda m: lz.bind_initializers(m, binding, placement)
                    )
            with progress.step(f"write {out.name} ({layout})"):
                data_files = lz.finalize_proto(proto, placement, stage.path, out.name, layout)
                staged.write_bytes(proto.SerializeToString())
                del proto
            lz.real_parameters(model, binding, lz.reference_tensors(binding, ckpt, placement))
            weights = {
                "path": "lazy",
                "layers": layers,
                "layout": layout,
                "links": placement.links,
                "in_place_bytes": placement.in_place_bytes,
                "converted_bytes": placement.converted_bytes,
            }
        else:
            with progress.step(f"load {d.name} (eager: {eager_reason})"):
                module, arch, task = load_model(d, task, trust_remote_code, allow_pickle, dtype)
            with progress.step(f"trace {arch.name} ({task}, opset {opset}, {dtype})"), _trace_errors(d, arch, task):
                proto = _trace(module, arch, task, int(opset))
            data_files = _write_eager(
                proto,
                staged,
                {None: None, "auto": None, "inline": False}.get(external_data, external_data is not False),
            )
            del proto
            weights = {"path": "eager", "eager_reason": eager_reason}
        weights["data_files"] = data_files
        weights["extra_disk_bytes"] = _extra_disk([staged] + [stage.file(f) for f in data_files])

        validation: dict[str, Any] = {"mode": "none", "skipped": True}
        if mode != "none":
            plan = val.plan_validation(staged, mode, budget)
            with progress.step(f"validate against PyTorch ({plan['mode']}: {plan['reason']})"):
                validation = val.validate_export(module, arch, task, staged, atol, mode=plan["mode"], rtol=rtol)
            validation.update(
                {"requested": mode, "reason": plan["reason"], "memory_budget": budget, "estimate": plan["estimate"]}
            )
        ok = bool(validation.get("passed", True))
        model_hash, hash_kind = _model_dir_hash(d)
        results = {
            "architecture": arch.name,
            "model_type": arch.hf_config.model_type,
            "hf_class": type(module.core.model).__name__,
            "task": task,
            "inputs": [s.as_dict() for s in arch.inputs(task)],
            "outputs": [s.as_dict() for s in arch.outputs(task)],
            "external_data": data_files,
            "weights": weights,
            "validation": validation,
        }
        options = {
            "task": task,
            "opset": int(opset),
            "dtype": dtype,
            "atol": atol,
            "rtol": rtol,
            "validate": mode,
            "memory_budget": budget,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
        }
        inputs = {
            "model_dir": str(d),
            "model_dir_sha256": model_hash,
            "model_dir_hash": hash_kind,
            "config_sha256": sha256_file(d / "config.json"),
        }
        onnx_sha = sha256_file(staged)
        if built is not None:
            lz.drop_unused(placement, data_files)
        if ok:
            write_manifest(staged, "export", inputs, options, results, packages=PACKAGES, force=True)
            stage.commit(data_files + [out.name, manifest_path(out).name], force)
            for loc in old_locations - set(data_files):
                with contextlib.suppress(OSError):
                    (out.parent / loc).unlink()
    return {
        "ok": ok,
        "written": ok,
        "output": str(out),
        "manifest": str(manifest_path(out)),
        "onnx_sha256": onnx_sha,
        **{k: results[k] for k in ("architecture", "task", "validation", "weights", "external_data")},
        "inputs": module.input_names,
        "outputs": module.output_names,
        "options": options,
    }


def _extra_disk(paths: list[Path]) -> int:
    """Disk blocks of the outputs not shared with another hard link (a hard link to the
    checkpoint costs nothing; reflinks cannot be told from copies by stat and count fully)."""
    total = 0
    for p in paths:
        st = p.stat()
        if st.st_nlink == 1:
            total += st.st_blocks * 512
    return total
