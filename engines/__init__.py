"""TensorRT and TensorRT-RTX engines: build one from an ONNX model, inspect one, load one to run it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.engines.build import build_engine as build_engine
    from gpcl_trt.engines.inspection import inspect_engine as inspect_engine
    from gpcl_trt.engines.load import load_engine as load_engine

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "build_engine": "build",
        "inspect_engine": "inspection",
        "load_engine": "load",
    },
)
