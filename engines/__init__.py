"""TensorRT and TensorRT-RTX engines: ``build_engine`` and ``inspect_engine``.

Names resolve lazily so that ``import gpcl_trt.engines.cli`` does not load onnx or TensorRT."""

from __future__ import annotations

__all__ = ["build_engine", "inspect_engine"]


def __getattr__(name: str):
    if name == "build_engine":
        from gpcl_trt.engines.build import build_engine

        return build_engine
    if name == "inspect_engine":
        from gpcl_trt.engines.inspection import inspect_engine

        return inspect_engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
