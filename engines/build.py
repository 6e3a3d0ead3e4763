"""``build_engine``: ONNX -> serialized TensorRT / TensorRT-RTX engine + manifest.

One code path for both backends; what differs is asked of ``backend.caps`` (engines/backend.py).
Steps: read the model and check its weight files, prepare it for the chosen GPCL implementation
and precision, parse, check where GPCL went, set the optimisation profile, build, write
atomically, check the written engine, write the manifest. ``prepared_model`` is shared with the
engine loader (engines/load.py), which refits a weight-stripped plan from the same preparation."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from gpcl_trt.common import (
    CheckFailed,
    GpclError,
    check_can_write,
    load_onnx,
    remove_stale_temps,
    sha256_file,
    temp_sibling,
    write_manifest,
)
from gpcl_trt.engines.inspection import check_engine_bytes, engine_layers, plan_layer_records
from gpcl_trt.gpcl import EXTERNAL_DATA_BYTES

GPCL_CHOICES = ("native", "plugin")
PRECISION_CHOICES = ("fp32", "fp16", "bf16")


def build_engine(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    backend: str = "auto",
    gpcl: str = "native",
    plugin_lib: str | os.PathLike | None = None,
    precision: str = "fp32",
    shapes: Sequence[str] | dict | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace: int | None = None,
    opt_level: int | None = None,
    strip_weights: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Build an engine for ``onnx_path`` and write it to ``output`` (plus its manifest).

    ``shapes``: ``["NAME:MIN,OPT,MAX", ...]`` (or the parsed dict) overriding the default
    profile; ``workspace`` in MiB; ``opt_level`` the builder optimisation level;
    ``strip_weights``: a weightless plan (STRIP_PLAN + REFIT) that ``engines.load.load_engine``
    refits from the same ONNX model when it is loaded (the manifest names that model, its hash
    and its weight files)."""
    from gpcl_trt.engines import profiles as prof
    from gpcl_trt.engines.backend import load_backend
    from gpcl_trt.weightfiles import verify_onnx

    onnx_path, output = Path(onnx_path), Path(output)
    _check_options(onnx_path, gpcl, plugin_lib, precision, workspace, opt_level)
    check_can_write(output, force)
    remove_stale_temps(tempfile.gettempdir())  # what builds killed by SIGKILL left there (build_temp_dir)
    model = read_model(onnx_path)
    verify_onnx(onnx_path, model)  # weight files deleted, emptied or replaced since: one line
    shape_overrides = shapes if isinstance(shapes, dict) else prof.parse_shapes(shapes or ())
    be = load_backend(backend)
    if strip_weights:
        from gpcl_trt.engines.inspection import gpu_present

        if not gpu_present():
            # Measured with TensorRT-RTX 1.7: a refittable build JIT-compiles with CUDA and fails
            # without a device, unlike a plain CPU-only AOT build.
            raise GpclError(
                "--strip-weights needs a CUDA GPU at build time (a refittable plan is compiled on the "
                "device); build without it here"
            )
    if gpcl == "plugin" and not be.caps.plugins:
        raise GpclError(
            f"{be.name} cannot load the GPCL plugin library; build with --gpcl native "
            "(the parser inlines the GPCL function) or use --backend tensorrt"
        )
    be.logger.take()

    gpcl_nodes = _gpcl_node_names(model)
    lowered = precision != "fp32" and not _precision_flags(be)

    from gpcl_trt.common import atomic_path
    from gpcl_trt.engines.network import layer_summary, network_io

    # The weights stay memory-mapped (file-backed pages) from parse to the end of the build,
    # and the plan streams into the output's temporary file: no copy of either in our memory.
    with prepared_model(onnx_path, model, gpcl, lowered and precision) as prepared:
        builder, network, parser, plugin_sha = _parse(be, onnx_path, prepared, gpcl, plugin_lib)
        layers = layer_summary(network, gpcl_nodes)
        gpcl_impl = _check_gpcl(layers["gpcl"], gpcl)
        profile = prof.make_profiles(_network_inputs(network, model), shape_overrides)
        io = network_io(network)

        config = builder.create_builder_config()
        _configure(be, builder, config, profile, precision, workspace, opt_level, strip_weights)
        cache_note = _load_timing_cache(be, config, timing_cache)
        with atomic_path(output, force=force) as tmp:
            build_seconds, phases = _build(be, builder, network, config, onnx_path, tmp)
            cache_note = _save_timing_cache(be, config, timing_cache) or cache_note
            del builder, network, parser, config
            _chmod_default(tmp)
            with open(tmp, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                validity = check_engine_bytes(be, data)
                if not validity["ok"]:
                    raise CheckFailed(f"the built engine failed its check: {validity['detail']}")
                engine_bytes = len(data)
                plan = plan_layer_records(data)
                engine_info = engine_layers(be, data)  # None without a GPU

    from gpcl_trt.manifest import engine_inputs, engine_weights, file_ref

    results = {
        "backend": be.name,
        "backend_version": be.version,
        "precision": precision,
        "precision_mode": _precision_mode(be, precision, lowered),
        "profiles": [profile],
        "io": io,
        "gpcl": {
            "implementation": gpcl_impl,
            **({"function_body": "flat"} if gpcl_impl == "native" else {}),
            **layers["gpcl"],
        },
        "build_seconds": round(build_seconds, 3),
        "build_phases": phases,
        "engine_bytes": engine_bytes,
        "network": {k: layers[k] for k in ("num_layers", "by_type")},
        "plan": plan,
        "validity": validity,
        "timing_cache": cache_note,
        # A weightless plan must be refitted (OnnxParserRefitter) from this very ONNX model.
        "weights": engine_weights(strip_weights, onnx_path),
    }
    if engine_info is not None:
        results["engine_layers"] = engine_info

    from gpcl_trt.weightfiles import record

    # The identity of the weight files the plan was built from (weightfiles' hashing policy: whole
    # up to a size, identity above), so a refit can tell that they changed since.
    weights = record(model, onnx_path.parent)
    inputs = engine_inputs(
        file_ref(onnx_path, sha256_file(onnx_path), **({"external_data": weights} if weights else {})),
        file_ref(plugin_lib, plugin_sha) if plugin_lib else None,
    )
    options = {
        "backend": backend,
        "gpcl": gpcl,
        "precision": precision,
        "shapes": {k: [list(s) for s in v] for k, v in shape_overrides.items()},
        "workspace_mib": workspace,
        "opt_level": opt_level,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "strip_weights": strip_weights,
    }
    # A weightless plan reads those files at every load: where they sit beside it, its manifest
    # lists them, so the weight-file owner never deletes them under it (weightfiles.readers).
    beside = strip_weights and output.resolve().parent == onnx_path.resolve().parent
    manifest = write_manifest(
        output, "build", inputs, options, results, packages=(_dist_name(be),), weight_files=weights if beside else {}
    )
    return {"ok": True, "engine": str(output), "manifest": str(manifest), **results}


def _parse(be: Any, onnx_path: Path, prepared: "Prepared", gpcl: str, plugin_lib: Any) -> tuple:
    """(builder, network, parser, plugin sha256 or None). The parser gets the graph from
    ``prepared.graph`` and every external weight as a pointer into its memory-mapped file
    (``load_initializer``), so it neither reads nor copies them; the parser must outlive the
    network, hence it is returned too."""
    trt = be.trt
    builder = trt.Builder(be.logger.impl)
    network = builder.create_network(0)  # explicit batch (TensorRT 10), strongly typed (RTX)
    parser = trt.OnnxParser(network, be.logger.impl)
    plugin_sha = _load_plugin(be, plugin_lib) if gpcl == "plugin" else None
    with be.logger.errors.reraising():
        ok = parser.load_model_proto(prepared.graph, str(prepared.path))
        for name, array in prepared.weights.items():
            ok = ok and parser.load_initializer(name, array.ctypes.data, array.nbytes)
        if not ok or not parser.parse_model_proto():
            raise GpclError(f"cannot parse {onnx_path}: {parser_errors(parser, be)}")
    return builder, network, parser, plugin_sha


def _stream_writer(trt: Any, f: Any, errors: Any) -> Any:
    """An IStreamWriter that appends the builder's plan to the open file ``f`` as it is serialized.
    A failed write (disk full) is kept in ``errors`` as one line: the binding would drop it."""

    class Writer(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)

        def write(self, data: Any) -> int:
            with errors.catch():
                try:
                    return f.write(data)
                except OSError as exc:
                    raise GpclError(f"cannot write the engine to {f.name}: {exc.strerror or exc}") from None
            return 0  # a short write fails the build

    return Writer()


def _build(be: Any, builder: Any, network: Any, config: Any, onnx_path: Path, out: Path) -> tuple[float, dict]:
    """Build and stream the plan into ``out``; (build seconds, seconds per builder phase). An
    interrupt that lands in one of our callbacks cancels the build and is raised here."""
    from gpcl_trt.engines.monitor import BuildProgress

    errors = be.logger.errors
    t0 = time.perf_counter()
    with errors.reraising(), errors.watching_signals():
        with BuildProgress(be.trt, config, errors) as progress, open(out, "wb") as f:
            ok = builder.build_serialized_network_to_stream(network, config, _stream_writer(be.trt, f, errors))
        if not ok or out.stat().st_size == 0:
            raise GpclError(f"{be.name} could not build {onnx_path}: {log_errors(be) or 'no error message'}")
    return time.perf_counter() - t0, progress.seconds


# ----------------------------------------------------------------------------- options
def _check_options(onnx_path: Path, gpcl: str, plugin_lib: Any, precision: str, workspace: Any, opt_level: Any) -> None:
    if not onnx_path.is_file():
        raise GpclError(f"{onnx_path} does not exist")
    if gpcl not in GPCL_CHOICES:
        raise GpclError(f"--gpcl must be one of {', '.join(GPCL_CHOICES)}, got {gpcl!r}")
    if precision not in PRECISION_CHOICES:
        raise GpclError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if gpcl == "plugin" and not plugin_lib:
        raise GpclError("--gpcl plugin needs --plugin-lib PATH (the GPCL TensorRT plugin library, see `make kernel`)")
    if gpcl == "native" and plugin_lib:
        raise GpclError("--plugin-lib is only used with --gpcl plugin")
    if plugin_lib and not Path(plugin_lib).is_file():
        raise GpclError(f"plugin library {plugin_lib} does not exist")
    if workspace is not None and workspace <= 0:
        raise GpclError(f"--workspace must be a positive number of MiB, got {workspace}")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise GpclError(f"--opt-level must be 0..5, got {opt_level}")


def _chmod_default(path: Path) -> None:
    # mkstemp (behind atomic_path) creates 0600 files; an engine is shared with a server process.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _dist_name(be: Any) -> str:
    return {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx-cu13"}.get(be.name, be.caps.module)


def _precision_flags(be: Any) -> bool:
    # Weakly typed precision flags where the backend has them (full TensorRT 10); a backend
    # without BuilderFlag.FP16 (TensorRT-RTX) is strongly typed: the ONNX types decide.
    return be.caps.precision_flags and hasattr(be.trt.BuilderFlag, "FP16")


def _precision_mode(be: Any, precision: str, lowered: bool) -> str:
    if precision == "fp32":
        return "fp32"
    return f"onnx lowered to {precision} (strongly typed)" if lowered else f"builder flag {precision.upper()}"


# ----------------------------------------------------------------------------- model
def read_model(path: Path) -> Any:
    """The graph, weights left in their files."""
    return load_onnx(path, external_data=False)


def _gpcl_node_names(model: Any) -> list[str]:
    from gpcl_trt.engines.network import parser_node_name
    from gpcl_trt.plugins.onnx_function import iter_gpcl_nodes

    return [parser_node_name(n) for n in iter_gpcl_nodes(model.graph)]


@dataclass
class Prepared:
    """What the parser reads: the serialized graph (weights referenced, not included), the path
    its external data is relative to, and each external initializer as a read-only array over
    its memory-mapped file."""

    graph: bytes
    path: Path
    weights: dict[str, Any]


@contextlib.contextmanager
def prepared_model(path: Path, model: Any, gpcl: str, lower_to: str | bool) -> Iterator[Prepared]:
    """The model as the parser gets it: rewritten for the GPCL implementation (graph only;
    the weights stay where they are), or, when the precision is lowered (which converts the
    weights), a self-contained converted copy in a temporary directory. The maps are closed on
    exit, so the build must happen inside."""
    import onnx

    from gpcl_trt.plugins import onnx_function as of

    gpcl_present = any(True for _ in of.iter_gpcl_nodes(model.graph))
    if gpcl_present:
        # Validate every GPCL node (mode, tau, eps) before either implementation sees it: the
        # plugin would otherwise fall back to its field defaults, the function to a parse error.
        of.gpcl_variants(model)
    changes = []
    if gpcl_present and gpcl == "plugin":
        changes.append(_as_plugin_nodes)
    elif gpcl_present:
        # The model carries the branching body (tuned for ONNX Runtime); an engine gets the
        # flat one, which computes the same function without an If (see
        # plugins/onnx_function.py).
        changes.append(lambda m: _split_overloads(of.attach_gpcl_functions(m, body="flat")))
    if not lower_to:
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        for change in changes:
            rewritten = change(rewritten)
        with _mapped_weights(rewritten, path.parent) as weights:
            yield Prepared(rewritten.SerializeToString(), path, weights)
        return
    from gpcl_trt.engines.precision import lower_precision

    full = load_onnx(path)  # lowering converts the weights: a self-contained rewritten copy
    for change in changes + [lambda m: lower_precision(m, lower_to)]:
        full = change(full)
    with build_temp_dir() as tmp:
        out = tmp / path.name
        big = full.ByteSize() > EXTERNAL_DATA_BYTES
        onnx.save(full, str(out), save_as_external_data=big, location=f"{path.name}.data" if big else None)
        del full
        graph = load_onnx(out, external_data=False)
        with _mapped_weights(graph, out.parent) as weights:
            yield Prepared(graph.SerializeToString(), out, weights)


@contextlib.contextmanager
def _mapped_weights(model: Any, base: Path) -> Iterator[dict[str, Any]]:
    """{initializer name: read-only uint8 array over its bytes} for every external initializer,
    each file memory-mapped once."""
    import numpy as np
    import onnx

    maps: dict[str, mmap.mmap] = {}
    weights: dict[str, Any] = {}
    try:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            location = info["location"]
            if location not in maps:
                with open(base / location, "rb") as f:
                    maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else len(maps[location]) - offset
            if offset + length > len(maps[location]):
                raise GpclError(f"{base / location} is shorter than initializer {t.name} needs (truncated?)")
            weights[t.name] = np.frombuffer(maps[location], dtype=np.uint8, count=length, offset=offset)
        yield weights
    finally:
        weights.clear()
        for m in maps.values():
            with contextlib.suppress(BufferError):
                m.close()


@contextlib.contextmanager
def build_temp_dir() -> Iterator[Path]:
    """A private directory in TMPDIR for the lowered copy of a model (its converted weights):
    named like every gpcl temporary (common.TEMP_RE, the owner's pid), so each build first
    removes those of dead owners (a build killed by SIGKILL, OOM). Removed on exit, an interrupt
    or the CLI's SIGTERM exception included."""
    base = Path(tempfile.gettempdir())
    remove_stale_temps(base)
    tmp = temp_sibling(base / "gpcl-build")
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_overloads(model: Any) -> Any:
    """The parser finds local functions by op name and ignores ``overload``, so a model mixing
    GPCL variants gets one function name per variant (``GPCL__clamp_attr``...) for the build.
    Renaming, not inlining, keeps each layer's provenance (``| node (GPCL__hopf_attr)``)."""
    from gpcl_trt.plugins.onnx_function import GPCL_DOMAIN, iter_gpcl_nodes

    for fn in model.functions:
        if fn.domain == GPCL_DOMAIN and fn.overload:
            fn.name, fn.overload = f"{fn.name}__{fn.overload}", ""
    for node in list(iter_gpcl_nodes(model.graph)):
        if node.overload:
            node.op_type, node.overload = f"{node.op_type}__{node.overload}", ""
    return model


def _as_plugin_nodes(model: Any) -> Any:
    """For the plugin build: drop the GPCL function, which the parser would otherwise inline.
    A node with no importer and no function goes to the parser's plugin fallback, which looks
    the plugin up by op name, version "1" and, lacking a plugin_namespace attribute, the
    node's domain: GPCL / 1 / gpcl, the plugin's identity in docs/gpcl-spec.md."""
    from gpcl_trt.plugins.onnx_function import remove_gpcl_functions

    return remove_gpcl_functions(model)


def _load_plugin(be: Any, plugin_lib: Any) -> str:
    registry = be.trt.get_plugin_registry()
    handle = registry.load_library(str(plugin_lib))
    if not handle:
        raise GpclError(f"{be.name} could not load plugin library {plugin_lib}: {log_errors(be) or 'no message'}")
    return sha256_file(plugin_lib)


def parser_errors(parser: Any, be: Any) -> str:
    """The parser's (or the ONNX refitter's) errors, one line."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = err.node_name() or (f"node #{err.node()}" if err.node() >= 0 else "")
        op = err.node_operator()
        lines.append(f"{where} ({op}): {err.desc()}" if where else err.desc())
    return "; ".join(lines) or log_errors(be) or "the parser gave no reason"


def log_errors(be: Any) -> str:
    """The last errors the backend logged since the last take(), one line."""
    msgs = [m for sev, m in be.logger.take() if sev in ("ERROR", "INTERNAL_ERROR")]
    return "; ".join(msgs[-5:])


# ----------------------------------------------------------------------------- network
def _check_gpcl(summary: dict[str, Any], gpcl: str) -> str:
    """Which GPCL implementation the network holds; a plugin build that fell back to the
    decomposed body (or a native one that lost nodes) is a failed check."""
    n = summary["nodes"]
    if n == 0:
        return "none"
    if gpcl == "plugin":
        if summary["body_layers"] or len(summary["nodes_as_plugin"]) != n:
            raise CheckFailed(
                f"--gpcl plugin: {len(summary['nodes_as_plugin'])} of {n} GPCL nodes became plugin layers "
                f"and {summary['body_layers']} layers came from the decomposed body"
            )
        return "plugin"
    if len(summary["nodes_as_body"]) != n:
        raise CheckFailed(f"--gpcl native: only {len(summary['nodes_as_body'])} of {n} GPCL nodes are in the network")
    return "native"


def _network_inputs(network: Any, model: Any) -> list[tuple[str, list[int | str]]]:
    """(name, dims) per network input: static sizes as ints, dynamic ones by their ONNX axis
    name ("" when unnamed)."""
    onnx_dims = {
        i.name: [d.dim_param if d.HasField("dim_param") else "" for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    out = []
    for k in range(network.num_inputs):
        t = network.get_input(k)
        names = onnx_dims.get(t.name, [])
        dims = [d if d >= 0 else (names[a] if a < len(names) else "") for a, d in enumerate(t.shape)]
        out.append((t.name, dims))
    return out


def _configure(be, builder, config, profile, precision, workspace, opt_level, strip_weights=False) -> None:
    trt = be.trt
    if profile:
        opt = builder.create_optimization_profile()
        for name, p in profile.items():
            opt.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(opt)
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace) << 20)
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if precision != "fp32" and _precision_flags(be):
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT)
    # Keep layer names and their parameters in the plan, for the engine inspector.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED


def _load_timing_cache(be: Any, config: Any, path: Any) -> str | None:
    if not path:
        return None
    if not be.caps.timing_cache:
        return f"not used: timing caches are a no-op in {be.name}"
    blob = Path(path).read_bytes() if Path(path).is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return f"loaded {len(blob)} bytes" if blob else "new"


def _save_timing_cache(be: Any, config: Any, path: Any) -> str | None:
    if not path or not be.caps.timing_cache:
        return None
    from gpcl_trt.common import atomic_path

    data = memoryview(config.get_timing_cache().serialize()).tobytes()
    with atomic_path(path, force=True) as tmp:  # a cache is meant to be updated in place
        tmp.write_bytes(data)
    return f"saved {len(data)} bytes to {path}"
