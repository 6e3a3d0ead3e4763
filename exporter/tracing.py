"""Tracing: the core module (exporter/cores.py) through the dynamo exporter on dummy inputs, with
onnxscript's optimizer guarded (no weight folded into a second copy, near-identity constants
kept), then the graph post-processed (exporter/postprocess.py). Exporter failures become one line
naming the model, architecture and task."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.exporter import replicate as rep
from gpcl_trt.exporter.build import quiet
from gpcl_trt.exporter.postprocess import intermediate_types_only, normalise, residual_adds_as_sum

# Shapes: the trace uses one, validation a different one, so a shape baked in by mistake shows.
EXPORT_SHAPE = {"batch": 2, "sequence": 8, "past": 5, "encoder_sequence": 6}


# ----------------------------------------------------------------------------- dummy inputs
def make_dummy_inputs(
    arch_config: Any,
    task: str,
    batch: int,
    seq: int,
    seed: int,
    past: int | None = None,
    encoder_sequence: int | None = None,
) -> dict[str, np.ndarray]:
    """Random but valid inputs for ``arch_config``/``task`` (gpcl_trt.feeds, keyed by ONNX input
    name), with the last row's mask tail padded (batch > 1) so masking is exercised, and
    ``past`` cached tokens (default ``seq // 2 + 1``; 0 means a prefill); ``encoder_sequence``:
    an encoder-decoder's source length (default ``seq``)."""
    from gpcl_trt import feeds

    float_dtype = np.float16 if getattr(arch_config, "dtype", "fp32") == "fp16" else np.float32
    specs = feeds.specs_from_axes(arch_config.inputs(task), float_dtype)
    past = seq // 2 + 1 if past is None else past
    return dict(
        feeds.make_feeds(
            specs,
            batch,
            seq,
            past,
            seed=seed,
            vocab=arch_config.vocab_size,
            pad_last_row=True,
            encoder_sequence=encoder_sequence,
        )
    )


@contextlib.contextmanager
def trace_errors(d: Path, arch: Any, task: str) -> Iterator[None]:
    """A failure inside the exporter becomes one line naming the model, architecture and task;
    our own errors (and NotReplicable, which the caller handles) pass as they are."""
    try:
        yield
    except (GpclError, rep.NotReplicable):
        raise
    except Exception as exc:
        raise GpclError(f"export failed for {d} ({arch.name}, {task}): {_with_cause(exc)}") from None


def _with_cause(exc: BaseException) -> str:
    """torch.onnx's message is a generic first line ("Failed to export the model with
    torch.export. This is step 1/3 ..."); what torch.export actually stopped at is the exception
    it chains. One line with both: the first sentence, then the innermost cause's first line."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is exc:
        return one_line(exc)
    return f"{one_line(exc).split('. ', 1)[0]}: {one_line(cause)}"


# ----------------------------------------------------------------------------- tracing
def trace(module: Any, arch: Any, task: str, opset: int, bind: Any = None, fold_weights: bool = True):
    """Run the dynamo exporter on ``module.core`` and return the ONNX ModelProto. ``bind``
    (lazy export) is called on the traced ``onnx_ir.Model`` before the exporter's optimizer runs,
    to give the weight initializers (fake tensors at that point) their external data.
    ``fold_weights=False``: no node reading a weight is folded, so that each layer's nodes read
    their own weights (exporter/replicate.py copies them)."""
    import torch

    shape = EXPORT_SHAPE
    feeds = make_dummy_inputs(
        arch,
        task,
        shape["batch"],
        shape["sequence"],
        seed=0,
        past=shape["past"],
        encoder_sequence=shape["encoder_sequence"],
    )
    kwargs = module.core_kwargs(feeds)
    if getattr(arch, "dtype", "fp32") == "bf16":  # numpy has no bfloat16: the float feeds are cast here
        cast = lambda t: t.to(torch.bfloat16) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        kwargs = {k: tuple(cast(x) for x in v) if isinstance(v, tuple) else cast(v) for k, v in kwargs.items()}
    specs = {s.name: s for s in arch.inputs(task)}
    # every named axis (a dual encoder batches texts and images apart: text_batch, image_batch)
    named = {a for s in specs.values() for a in s.axes if isinstance(a, str)}
    dims = {name: torch.export.Dim(name) for name in ("batch", "sequence", "past_sequence", "total_sequence", *named)}

    def dyn(spec) -> dict:
        return {i: dims[a] for i, a in enumerate(spec.axes) if isinstance(a, str)}

    dynamic_shapes: dict[str, Any] = {n: dyn(specs[n]) for n in kwargs if n != "past_key_values"}
    if module._past:  # with past: a decoder's cache, an encoder-decoder's self- and cross-attention caches
        dynamic_shapes["past_key_values"] = tuple(dyn(specs[n]) for n in module._past)
    with torch.no_grad(), quiet():
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
        optimize_keeping(program.model, keep, fold_small=fold_weights)
    proto = normalise(program.model_proto, arch, task)
    intermediate_types_only(proto)
    residual_adds_as_sum(proto)
    return proto


def trace_replicated(model: Any, arch: Any, task: str, opset: int, stack: Any, binding: Any, placement: Any):
    """Trace the first ``TRACED_LAYERS`` layers on fake weights, then grow the graph to every
    layer (exporter/replicate.py). Returns the proto and the module of the whole model (the
    PyTorch reference for validation)."""
    from gpcl_trt.exporter import lazy as lz
    from gpcl_trt.exporter.cores import OnnxIOModule

    prefix = lz.CORE_PREFIX + stack.path

    with rep.truncated(stack, rep.TRACED_LAYERS):
        with quiet():
            few = OnnxIOModule(arch.core(model, task), arch, task).eval()
        proto = trace(
            few, arch, task, opset, bind=lambda m: lz.bind_initializers(m, binding, placement), fold_weights=False
        )
    with quiet():
        module = OnnxIOModule(arch.core(model, task), arch, task).eval()  # every layer again: the arch's I/O too
    rep.replicate(proto, prefix, stack.count, lambda name: lz.weight_initializer(name, binding, placement))
    rep.order_io(proto, module.input_names, module.output_names)
    return normalise(proto, arch, task), module


def optimize_keeping(model: Any, weights: set[str], fold_small: bool = True) -> None:
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
