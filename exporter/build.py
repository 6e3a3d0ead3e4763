"""Building the model that is traced: config.json bound to its family config and task, then the
HF model built lazily (on ``meta``, joined to the checkpoint's headers: exporter/lazy.py) or
loaded eagerly by transformers (``load_model``, also the PyTorch runner of validation)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.exporter.model_dir import check_weights, family_class, read_model_dir
from gpcl_trt.exporter.options import DTYPES, TORCH_DTYPES


def resolve_task(arch: Any, task: str) -> str:
    from gpcl_trt.exporter.tasks import TASKS

    if task == "auto":
        task = arch.default_task()
    elif task not in TASKS:
        raise GpclError(f"unknown task {task!r}; choose auto or one of {', '.join(TASKS)}")
    arch.check_task(task)
    return task


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
    graph: str | None = None,
):
    """Load a local HF model directory and wrap it exactly as it is exported.
    ``graph``: which graph of an encoder-decoder model (``encoder`` or ``decoder``, the default;
    an export's manifest says which in ``results.graph``); the returned arch config then
    describes that graph's I/O.

    Returns ``(module, arch_config, task)``: ``module(**feeds)`` takes the ONNX input names
    (numpy arrays or tensors) and returns the outputs as a tuple in ONNX output order
    (``module.input_names`` / ``module.output_names``); ``arch_config`` is the bound
    per-architecture config (``arch_config.inputs(task)``, ``.outputs(task)``); ``task`` is the
    resolved task. Raises GpclError for a bad directory, config or weights.
    """
    if dtype not in DTYPES or dtype == "bf16":
        raise GpclError(f"unknown dtype {dtype!r} for a loaded model; choose fp32 or fp16")
    d, raw = read_model_dir(model_dir)
    arch_cls = family_class(raw, d / "config.json", trust_remote_code)
    _, use_safetensors = check_weights(d, allow_pickle)

    import torch

    from gpcl_trt.exporter.cores import OnnxIOModule

    with quiet():
        hf_config, arch, task = bind_config(d, arch_cls, dtype, task, trust_remote_code)
        if use_safetensors and getattr(arch, "eager_only", False):
            # the layer counts only: such checkpoints omit tensors the model computes (Marian's
            # sinusoidal positions), which the lazy binder would report as missing
            from gpcl_trt.exporter.checkpoint import Checkpoint, check_config_layers

            check_config_layers(hf_config, Checkpoint.open(d), d / "config.json")
        elif use_safetensors:
            # The headers against config.json before anything is allocated: a config that cannot
            # match its checkpoint (100000 layers next to a small file) would otherwise allocate
            # until the kernel kills the process.
            lazy_model(d, hf_config, arch, task, dtype, trust_remote_code, precheck_only=True)
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
    if graph is not None and hasattr(arch, "modules"):  # an encoder-decoder model: one of its two graphs
        if graph not in ("encoder", "decoder"):
            raise GpclError(f"unknown graph {graph!r} of {arch.name}; choose encoder or decoder")
        return arch.modules(model, task)[graph], arch.graph(graph), task
    module = OnnxIOModule(arch.core(model, task), arch, task).eval()
    return module, arch, task


def lazy_model(
    d: Path, hf_config: Any, arch: Any, task: str, dtype: str, trust_remote_code: bool, precheck_only: bool = False
):
    """The model built on ``meta`` and joined to the checkpoint's headers (exporter/lazy.py):
    returns ``(model, checkpoint, binding)``, or a str, the reason, when the checkpoint needs
    transformers' own loader (``NeedsEager``). Raises GpclError naming the file and tensor when the
    checkpoint cannot match config.json (``precheck_only``: returns None for other failures, which
    the eager loader then reports)."""
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
        return str(exc)
    except GpclError:
        raise
    except Exception as exc:
        if precheck_only:  # the eager loader will say what is wrong in its own words
            return None
        raise GpclError(f"cannot build {arch.name} from {d / 'config.json'}: {one_line(exc)}") from None
    return model, ckpt, binding


def bind_config(d: Path, arch_cls: Any, dtype: str, task: str, trust_remote_code: bool) -> tuple[Any, Any, str]:
    """(HF config, the architecture config bound to it, the resolved task); one clear line for a
    config transformers cannot read."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise GpclError(f"cannot read config {d / 'config.json'}: {one_line(exc)}") from None
    arch = arch_cls(hf_config, dtype)
    return hf_config, arch, resolve_task(arch, task)


def prepare(d: Path, arch_cls: Any, dtype: str, task: str, trust_remote_code: bool, lazy: bool | None) -> tuple:
    """Which path the export takes: ``(built, arch, task, eager_reason)``; ``built`` is
    :func:`lazy_model`'s ``(model, checkpoint, binding)`` for a safetensors checkpoint that needs
    no conversion op, else None and ``eager_reason`` says why (``arch`` and ``task`` are then
    resolved by :func:`load_model`). ``lazy=True`` refuses the eager path, ``lazy=False`` takes it."""
    from gpcl_trt import progress

    if not any(d.glob("*.safetensors")):
        if lazy is True:
            raise GpclError(f"lazy export needs safetensors weights; {d} has pickle weights")
        return None, None, task, "pickle weights"
    if lazy is False:
        return None, None, task, "lazy=False"
    import torch  # noqa: F401  (transformers wants it first)

    with progress.step(f"read {d.name} (config and safetensors headers)"), quiet():
        hf_config, arch, task = bind_config(d, arch_cls, dtype, task, trust_remote_code)
        built = lazy_model(d, hf_config, arch, task, dtype, trust_remote_code)
    if isinstance(built, str):
        if lazy is True:
            raise GpclError(f"lazy export impossible for {d}: {built}")
        return None, arch, task, built
    return built, arch, task, None
