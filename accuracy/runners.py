"""One side of a diff: a polygraphy runner plus what is needed to feed it.

- Hugging Face model dir -> ``TorchRunner`` (ours, polygraphy's ``BaseRunner`` interface) over
  the exporter's wrapped module, so PyTorch and ONNX see the same input/output names.
- ``.onnx`` -> polygraphy's ``OnnxrtRunner`` on a CPU session; extra outputs (per-layer
  tensors, GPCL site inputs) are marked on an in-memory copy of the model.
- ``.engine`` -> polygraphy's ``TrtRunner`` over the engine ``engines.load.load_engine`` gives
  (needs a GPU and TensorRT / TensorRT-RTX; a weight-stripped plan is refitted from its ONNX).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from polygraphy.backend.base import BaseRunner

from gpcl_trt import feeds
from gpcl_trt.accuracy import inputs as inp
from gpcl_trt.common import GpclError, has_large_weights, load_onnx_graph


# Outputs by task, when the exporter's module does not name them itself (architecture.md names).
class TorchRunner(BaseRunner):
    """PyTorch inference on the exporter's wrapped module (the module that is exported)."""

    def __init__(self, model_dir: str | Path, task: str = "auto", name: str | None = None, graph: str | None = None):
        super().__init__(name=name, prefix="torch-runner")
        self.model_dir = Path(model_dir)
        self.task = task
        self.graph = graph  # an encoder-decoder's graph (encoder / decoder); None: the default
        self.output_names: list[str] = []

    def load(self) -> None:
        """Load once; activation after that is free (a diff activates each runner once)."""
        if getattr(self, "module", None) is not None:
            return
        from gpcl_trt.exporter import load_model, make_dummy_inputs

        self.module, self.arch, self.task = load_model(self.model_dir, task=self.task, graph=self.graph)
        self.module.eval()
        self.dummy = make_dummy_inputs(self.arch, self.task, 1, 8, 0)
        self.output_names = list(self.module.output_names)

    def activate_impl(self) -> None:
        self.load()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name, arr in self.dummy.items():
            # Every axis of a text model's input is dynamic here; ONNX names them.
            meta.add(name, dtype=arr.dtype, shape=[f"dim{i}" for i in range(arr.ndim)])
        return meta

    def infer_impl(self, feed_dict):
        import torch

        kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
        start = time.perf_counter()
        with torch.inference_mode():
            outs = self.module(**kwargs)
        self.inference_time = time.perf_counter() - start
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        elif isinstance(outs, dict):
            outs = tuple(outs.values())
        flat = [o for o in _flatten(outs)]
        names = self.output_names if len(self.output_names) == len(flat) else [f"output_{i}" for i in range(len(flat))]
        return OrderedDict(
            (n, o.detach().float().numpy() if o.is_floating_point() else o.numpy()) for n, o in zip(names, flat)
        )

    def deactivate_impl(self) -> None:
        # Keep the loaded module: deactivation is per Comparator.run, loading is per diff.
        pass


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    else:
        yield obj


# ----------------------------------------------------------------------------- sides
@dataclass
class Side:
    """A reference or candidate: its runner, how to make inputs for it, its input spec."""

    kind: str  # "torch" | "onnx" | "engine"
    path: Path
    runner: Any
    spec: "OrderedDict[str, tuple[np.dtype, list]]"
    onnx_model: Any = None  # onnx.ModelProto for kind == "onnx"
    extra_outputs: list[str] = field(default_factory=list)
    generate: Callable[[int, int, int, int], list] | None = None


def kind_of(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise GpclError(f"{p} is a directory without config.json: not a Hugging Face model dir")
        return "torch"
    if not p.exists():
        raise GpclError(f"{p} does not exist")
    if p.suffix == ".onnx":
        return "onnx"
    if p.suffix in (".engine", ".plan", ".trt"):
        return "engine"
    raise GpclError(f"{p}: expected a model dir, an .onnx or an .engine file")


def make_side(
    path: str | Path,
    role: str,
    task: str = "auto",
    extra_outputs=(),
    threads: int | None = None,
    tokenizer_dir: str | Path | None = None,
    onnx_model=None,
    graph: str | None = None,
) -> Side:
    """``tokenizer_dir`` overrides the tokenizer found next to / recorded for ``path``;
    ``onnx_model`` is ``path`` already loaded (an .onnx is read once per diff); ``graph``: which
    graph of an encoder-decoder model a PyTorch side runs (the other side's export says)."""
    kind = kind_of(path)
    tok = Path(tokenizer_dir) if tokenizer_dir else inp.find_tokenizer_dir(path)
    if kind == "onnx":
        return _onnx_side(Path(path), role, list(extra_outputs), threads, tok, onnx_model)
    if extra_outputs:
        raise GpclError("extra (per-layer / GPCL site) outputs need an .onnx model, not " + str(path))
    if kind == "torch":
        return _torch_side(Path(path), role, task, tok, graph)
    return _engine_side(Path(path), role, task, tok)


def _torch_side(path: Path, role: str, task: str, tok, graph: str | None = None) -> Side:
    runner = TorchRunner(path, task=task, name=role, graph=graph)
    try:
        runner.load()
    except GpclError:
        raise
    except Exception as exc:
        raise GpclError(f"cannot load {path} with PyTorch: {type(exc).__name__}: {exc}") from None
    specs = feeds.specs_from_axes(
        runner.arch.inputs(runner.task), np.float16 if runner.arch.dtype == "fp16" else np.float32
    )
    spec = OrderedDict((s.name, (s.dtype, list(s.dims))) for s in specs)
    return Side("torch", path, runner, spec, generate=_generator(specs, runner.arch.vocab_size, tok))


def with_outputs(model, names: list[str]):
    """A copy of ``model`` with ``names`` added as graph outputs (typed where value_info knows
    the type; ORT accepts an untyped graph output)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types = {vi.name: vi for vi in m.graph.value_info}
    for name in names:
        if name in have:
            continue
        vi = types.get(name)
        m.graph.output.append(vi if vi is not None else onnx.helper.make_empty_tensor_value_info(name))
    return m


def _onnx_side(path: Path, role: str, extra_outputs, threads, tok, model=None) -> Side:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    model = model if model is not None else load_onnx_graph(path)
    run_model = with_outputs(model, extra_outputs) if extra_outputs else model
    # External weights are read by ORT where they are (the graph is written beside them).
    # External weights: a bounded session reads them from their file mapping, no anonymous copies.
    bounded = has_large_weights(run_model, path.parent)
    runner = OnnxrtRunner(
        lambda: feeds.ort_session(run_model, base_dir=path.parent, threads=threads, bounded=bounded), name=role
    )
    specs = feeds.specs_from_onnx(model)
    spec = OrderedDict((s.name, (s.dtype, list(s.dims))) for s in specs)
    return Side(
        "onnx",
        path,
        runner,
        spec,
        onnx_model=model,
        extra_outputs=list(extra_outputs),
        generate=_generator(specs, feeds.vocab_size(model), tok),
    )


def infer_types(model):
    """Shape inference, so intermediate tensors have dtypes (a model > 2 GB keeps what it has)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:
        return model


def _generator(specs: list, vocab: int | None, tok: Path | None) -> Callable[[int, int, int, int], list]:
    """samples x [batch, seq] feeds (no past): the tokenizer's text where there is one and the
    model reads token ids, random inputs otherwise; sample i is drawn with seed + i."""
    reads_text = any(s.name == feeds.INPUT_IDS for s in specs)

    def generate(samples: int, batch: int, seq: int, seed: int) -> list:
        texts = (
            inp.tokenize_samples(tok, samples, batch, seq, seed) if tok is not None and reads_text else [None] * samples
        )
        return [feeds.make_feeds(specs, batch, seq, seed=seed + i, vocab=vocab, text=t) for i, t in enumerate(texts)]

    return generate


# ----------------------------------------------------------------------------- engines
def _trt_module() -> str | None:
    import importlib.util

    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def _engine_side(path: Path, role: str, task: str, tok) -> Side:
    from gpcl_trt.engines.load import engine_backend, load_engine

    # The one engine loader: backend and plugin from the manifest, a weight-stripped plan refitted
    # from its ONNX model (refused in one line when that model is gone or changed).
    runtime, engine = load_engine(path)
    from polygraphy import config

    config.USE_TENSORRT_RTX = engine_backend(path).caps.module == "tensorrt_rtx"
    from polygraphy.backend.trt import TrtRunner

    runner = TrtRunner(engine, name=role)
    runner.gpcl_runtime = runtime  # the engine must not outlive its runtime
    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
    specs = [
        feeds.InputSpec(
            n, np.dtype(m.dtype.numpy()), tuple(d if isinstance(d, int) and d >= 0 else None for d in m.shape)
        )
        for n, m in meta.items()
    ]
    spec = OrderedDict((s.name, (s.dtype, list(s.dims))) for s in specs)
    return Side("engine", path, runner, spec, generate=_generator(specs, None, tok))
