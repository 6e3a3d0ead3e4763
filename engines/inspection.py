"""Checking and describing a built engine.

Without a GPU neither backend can deserialise an engine, so the checks are layered: the bytes
match what the builder returned (or the manifest's sha256), then TensorRT-RTX's
``Runtime.get_engine_validity`` reads the engine header (format and version; its device checks
need a GPU), and where a GPU is present the engine is deserialised and the engine inspector
lists the layers TensorRT actually built."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from gpcl_trt.common import GpclError, read_manifest, sha256_bytes

# get_engine_validity diagnostics that condemn the file itself, whatever the machine.
_FILE_PROBLEMS = ("MALFORMED_ENGINE", "VERSION_MISMATCH")


@functools.lru_cache(maxsize=1)
def gpu_present() -> bool:
    """A CUDA device is visible to the driver API (no CUDA runtime or torch needed)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _flag_names(trt: Any, bits: int) -> list[str]:
    enum = getattr(trt, "EngineInvalidityDiagnostics", None)
    if enum is None:
        return []
    return [name for name, member in enum.__members__.items() if bits & int(member)]


def check_engine_bytes(be: Any, data: bytes, expected_sha256: str | None = None) -> dict[str, Any]:
    """{"ok", "level", "detail", ...}: ``level`` says how deep the check could go here
    ("device" with a GPU, "header" without one)."""
    out: dict[str, Any] = {"ok": True, "sha256": sha256_bytes(data), "gpu": gpu_present()}
    if expected_sha256 and out["sha256"] != expected_sha256:
        return {**out, "ok": False, "level": "bytes", "detail": "engine bytes differ from the recorded sha256"}
    runtime = be.trt.Runtime(be.logger.impl)
    if hasattr(runtime, "get_engine_validity"):
        # Without a GPU it logs "cannot read GPU properties": expected. An interrupt in the logger
        # is raised after the call (backend.CallbackErrors).
        with be.logger.errors.reraising(), be.logger.quiet():
            status, bits = runtime.get_engine_validity(data)
        be.logger.take()
        status = str(status).rsplit(".", 1)[-1]
        flags = _flag_names(be.trt, int(bits))
        out.update(validity=status, diagnostics=flags)
        bad = [f for f in flags if f in _FILE_PROBLEMS]
        if bad:
            return {
                **out,
                "ok": False,
                "level": "header",
                "detail": f"{be.name} rejects the engine header: {', '.join(bad)}",
            }
        if status in ("VALID", "SUBOPTIMAL"):
            return {**out, "level": "device", "detail": f"{status.lower()} for this GPU"}
        if out["gpu"]:
            return {
                **out,
                "ok": False,
                "level": "device",
                "detail": f"invalid for this GPU: {', '.join(flags) or 'no reason given'}",
            }
        return {**out, "level": "header", "detail": "header is a valid engine header; device checks need a GPU"}
    if not out["gpu"]:
        return {**out, "level": "bytes", "detail": f"{be.name} cannot check an engine without a GPU"}
    with be.logger.errors.reraising():
        engine = runtime.deserialize_cuda_engine(data)
    be.logger.take()
    if engine is None:
        return {**out, "ok": False, "level": "device", "detail": "the engine does not deserialise"}
    return {**out, "level": "device", "detail": "deserialises on this GPU"}


_PLAN_RECORD = re.compile(rb"\[ONNX Layer: ([^\]\x00]{1,512})\]")


def plan_layer_records(data: bytes) -> dict[str, Any]:
    """The parser's layer metadata (``[ONNX Layer: node | caller (GPCL)]``) carried inside the
    serialized plan. Read from the bytes, so it works without a GPU: it shows which ONNX nodes,
    and which GPCL calls, made it into the built engine."""
    from gpcl_trt.engines.network import GPCL_CALL

    records = {m.decode("utf-8", "replace") for m in _PLAN_RECORD.findall(data)}
    gpcl = {m.group(1) for r in records for m in [GPCL_CALL.search(r)] if m}
    return {"onnx_layer_records": len(records), "gpcl_nodes": sorted(gpcl)}


def engine_layers(be: Any, data: bytes) -> dict[str, Any] | None:
    """The engine inspector's layer list (names and types of the built layers), or None where
    the engine cannot be deserialised here (no GPU)."""
    if not gpu_present():
        return None
    trt = be.trt
    with be.logger.errors.reraising():
        engine = trt.Runtime(be.logger.impl).deserialize_cuda_engine(data)
    be.logger.take()
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [layer if isinstance(layer, str) else layer.get("Name", "") for layer in info.get("Layers", [])]
    return {
        "num_layers": len(layers),
        "gpcl_layers": [name for name in layers if "gpcl" in name.lower()],
        "names": layers,
    }


def inspect_engine(path: str | os.PathLike) -> dict[str, Any]:
    """Manifest, layer summary and check of the engine at ``path``."""
    from gpcl_trt.engines.backend import load_backend

    path = Path(path)
    if not path.is_file():
        raise GpclError(f"{path} does not exist")
    data = path.read_bytes()
    manifest = read_manifest(path)
    results = (manifest or {}).get("results", {})
    be = load_backend(results.get("backend", "auto"))
    validity = check_engine_bytes(be, data, expected_sha256=(manifest or {}).get("artifact_sha256"))
    out: dict[str, Any] = {
        "ok": validity["ok"],
        "engine": str(path),
        "engine_bytes": len(data),
        "backend": be.name,
        "backend_version": be.version,
        "validity": validity,
        "manifest": manifest,
    }
    for key in ("precision", "precision_mode", "profiles", "io", "gpcl", "network", "build_seconds"):
        if key in results:
            out[key] = results[key]
    out["plan"] = plan_layer_records(data)
    layers = engine_layers(be, data)
    if layers is not None:
        out["engine_layers"] = layers
    return out


def format_summary(result: dict[str, Any]) -> str:
    """The human view of a build/inspect result (the CLI prints it on stderr)."""
    lines = [f"engine   {result['engine']} ({result['engine_bytes'] / 2**20:.1f} MiB)"]
    lines.append(f"backend  {result['backend']} {result['backend_version']}")
    if "precision" in result:
        lines.append(f"precision {result['precision']} ({result.get('precision_mode', '')})")
    for profile in result.get("profiles", []):
        for name, p in profile.items():
            lines.append(f"profile  {name}: min {_x(p['min'])}  opt {_x(p['opt'])}  max {_x(p['max'])}")
    for kind, tensors in result.get("io", {}).items():
        lines.append(f"{kind:<8} " + ", ".join(f"{t['name']} {t['dtype'].lower()}[{_x(t['shape'])}]" for t in tensors))
    if "gpcl" in result:
        g = result["gpcl"]
        lines.append(
            f"gpcl     {g['implementation']}: {g['nodes']} nodes, {g['body_layers']} body layers, "
            f"{g['plugin_layers']} plugin layers"
        )
    if "network" in result:
        n = result["network"]
        kinds = ", ".join(f"{k.lower()} {v}" for k, v in sorted(n["by_type"].items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"network  {n['num_layers']} layers ({kinds}, ...)")
    if "plan" in result:
        p = result["plan"]
        lines.append(
            f"plan     {p['onnx_layer_records']} ONNX layer records, GPCL calls present: {len(p['gpcl_nodes'])}"
        )
    if "engine_layers" in result:
        e = result["engine_layers"]
        lines.append(f"engine   {e['num_layers']} built layers, {len(e['gpcl_layers'])} named after GPCL")
    if "build_seconds" in result:
        lines.append(f"built in {result['build_seconds']:.1f} s")
    v = result["validity"]
    lines.append(f"check    {'ok' if v['ok'] else 'FAILED'} ({v['level']}): {v['detail']}")
    return "\n".join(lines)


def _x(dims: list[int]) -> str:
    return "x".join(map(str, dims))
