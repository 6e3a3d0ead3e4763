"""``load_engine``: the one way an engine file becomes a runnable ``ICudaEngine`` (runners, diff,
generate).

It reads the engine's build manifest to pick the backend and the GPCL plugin library, and for a
weight-stripped plan (``build --strip-weights``) it refits the weights after deserialising: an
``OnnxParserRefitter`` parses the same ONNX model the build parsed, prepared the same way (GPCL
function body, lowered precision: ``build.prepared_model``), and gets every weight as a pointer
into its memory-mapped file (``load_initializer``), as the build's parser did. What to do is
decided from the manifest first (:func:`refit_source`), so a stripped plan whose ONNX model is
missing or changed is refused in one line before anything needs a GPU."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpcl_trt.common import GpclError, sha256_file


@dataclass(frozen=True)
class RefitSource:
    """Where a weight-stripped plan's weights come from: the ONNX model the build read, and how
    the build prepared it (the refitter must see the same initializers, by name and bytes)."""

    onnx: Path
    gpcl: str  # "native" | "plugin"
    lower_to: str | None  # the precision the model was lowered to before parsing (TensorRT-RTX fp16/bf16)
    # location -> identity of the ONNX's external data files at build time (weightfiles.record)
    weight_files: dict[str, Any]


def refit_source(engine: str | os.PathLike, manifest: Any) -> RefitSource | None:
    """None for a plan that holds its weights; for a weight-stripped one, the ONNX model and
    preparation to refit it from. One GpclError when that model is gone or is not the one the
    plan was built from (its sha256, or one of its weight files, differs)."""
    if manifest is None or manifest.stage != "build" or not manifest.weights_stripped:
        return None
    engine = Path(engine)
    recorded = manifest.inputs.get("onnx") or {}
    named = (manifest.results.get("weights") or {}).get("refit_from") or recorded.get("path")
    onnx = manifest.source
    if onnx is None or not onnx.is_file():
        raise GpclError(
            f"{engine.name} is a weight-stripped plan (built with --strip-weights): its weights are refitted "
            f"from {named}, which is missing; put that ONNX model back or rebuild the engine without --strip-weights"
        )
    if recorded.get("sha256") and sha256_file(onnx) != recorded["sha256"]:
        raise GpclError(
            f"{engine.name} is a weight-stripped plan built from another version of {onnx} (its sha256 differs); "
            "rebuild the engine from this model"
        )
    files = recorded.get("external_data") or {}
    precision_mode = str(manifest.results.get("precision_mode", ""))
    return RefitSource(
        onnx=onnx,
        gpcl=str(manifest.options.get("gpcl") or "native"),
        lower_to=manifest.results.get("precision") if precision_mode.startswith("onnx lowered") else None,
        # Manifests before the weight-file identity recorded a bare sha256 per file.
        weight_files={loc: ident if isinstance(ident, dict) else {"sha256": ident} for loc, ident in files.items()},
    )


def engine_backend(engine: str | os.PathLike) -> Any:
    """The backend that built ``engine`` (its manifest's), else the installed one (auto)."""
    from gpcl_trt.engines.backend import load_backend
    from gpcl_trt.manifest import Manifest

    man = Manifest.read(engine)
    return load_backend(str((man.results if man else {}).get("backend") or "auto"))


def load_engine(path: str | os.PathLike) -> tuple[Any, Any]:
    """(runtime, engine) for the engine file at ``path``, its weights in place (a weight-stripped
    plan is refitted from its ONNX model). Keep the runtime alive as long as the engine."""
    from gpcl_trt.engines.inspection import gpu_present
    from gpcl_trt.manifest import Manifest

    path = Path(path)
    if not path.is_file():
        raise GpclError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise GpclError(f"{path} is empty: not an engine")
    manifest = Manifest.read(path)
    source = refit_source(path, manifest)  # refused here, before a GPU is needed
    try:
        be = engine_backend(path)
    except GpclError as exc:
        raise GpclError(f"{path}: running an engine needs a GPU and TensorRT ({exc})") from None
    if source is not None:
        _check_weight_files(path, source)
    if not gpu_present():
        raise GpclError(f"{path}: running an engine needs a GPU and TensorRT (no CUDA GPU)")
    _load_plugin_lib(path, manifest)

    from gpcl_trt.engines.build import log_errors

    be.logger.take()
    runtime = be.trt.Runtime(be.logger.impl)
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # a plan of a large model: no copy
    try:
        with be.logger.errors.reraising():
            engine = runtime.deserialize_cuda_engine(data)
    finally:
        with contextlib.suppress(BufferError):
            data.close()
    if engine is None:
        raise GpclError(f"{path} does not deserialise with {be.name} {be.version}: {log_errors(be) or 'no reason'}")
    if source is not None:
        _refit(be, path, engine, source)
    return runtime, engine


def _check_weight_files(engine: Path, source: RefitSource) -> None:
    """The ONNX model's weight files are still those it was written with and those the plan was
    built against (a re-export may keep the graph's bytes and change the weights)."""
    from gpcl_trt.weightfiles import check_identity, verify_onnx

    verify_onnx(source.onnx)
    for location, ident in source.weight_files.items():
        check_identity(source.onnx.parent / location, ident, engine)


def _refit(be: Any, path: Path, engine: Any, source: RefitSource) -> None:
    from gpcl_trt.engines.build import log_errors, parser_errors, prepared_model, read_model

    if not engine.refittable:
        raise GpclError(f"{path}: its manifest says its weights are stripped, but the engine is not refittable")
    trt = be.trt
    model = read_model(source.onnx)
    with prepared_model(source.onnx, model, source.gpcl, source.lower_to or False) as prepared:
        with be.logger.errors.reraising():
            refitter = trt.Refitter(engine, be.logger.impl)
            parser = trt.OnnxParserRefitter(refitter, be.logger.impl)
        try:
            with be.logger.errors.reraising():
                ok = parser.load_model_proto(prepared.graph, str(prepared.path))
                # The refitter reads each weight from the caller's memory: pointers into the maps,
                # which stay open until the engine has its weights (refit_cuda_engine copies them).
                for name, array in prepared.weights.items():
                    ok = ok and parser.load_initializer(name, array.ctypes.data, array.nbytes)
                if not ok or not parser.refit_model_proto():
                    raise GpclError(f"cannot refit {path} from {source.onnx}: {parser_errors(parser, be)}")
                missing = [n or "(unnamed)" for n in refitter.get_missing_weights()]
                if missing:
                    raise GpclError(
                        f"cannot refit {path} from {source.onnx}: {len(missing)} weights missing "
                        f"({', '.join(missing[:5])})"
                    )
                if not refitter.refit_cuda_engine():
                    raise GpclError(f"cannot refit {path}: {log_errors(be) or 'the refitter gave no reason'}")
        finally:
            del parser, refitter


def _load_plugin_lib(engine: Path, manifest: Any) -> None:
    """An engine built with the GPCL plugin records the library in its manifest."""
    if manifest is not None and manifest.uses_plugin:
        if manifest.plugin_lib is None:
            raise GpclError(f"{engine.name} was built with the GPCL TensorRT plugin and its library is gone")
        ctypes.CDLL(str(manifest.plugin_lib), mode=ctypes.RTLD_GLOBAL)
