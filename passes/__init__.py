"""Graph-surgery passes: find GPCL sites, insert GPCL, calibrate tau, strip GPCL.

Imports are lazy so that ``gpcl_trt.passes.cli`` (loaded by every ``gpcl-trt`` invocation)
pulls in neither onnx nor onnx-graphsurgeon."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "find_sites": "gpcl_trt.passes.sites",
    "sites_file": "gpcl_trt.passes.sites",
    "Site": "gpcl_trt.passes.sites",
    "insert_gpcl": "gpcl_trt.passes.insert",
    "insert_file": "gpcl_trt.passes.insert",
    "strip_gpcl": "gpcl_trt.passes.strip",
    "strip_file": "gpcl_trt.passes.strip",
    "calibrate_file": "gpcl_trt.passes.calibrate",
    "load_model": "gpcl_trt.passes.graph",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
