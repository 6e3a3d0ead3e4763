"""HF -> ONNX exporter: ``export_model``, ``load_model``, ``make_dummy_inputs``.

Names resolve lazily so that ``import gpcl_trt.exporter.cli`` (the CLI) does not pull in numpy
or torch."""

from __future__ import annotations

__all__ = ["export_model", "load_model", "make_dummy_inputs", "check_model_dir"]


def __getattr__(name: str):
    if name in __all__:
        from gpcl_trt.exporter import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
