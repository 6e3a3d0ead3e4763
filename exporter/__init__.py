"""HF -> ONNX exporter: export a local model directory, load it as it is exported, make its
inputs. ``api.export_model`` is the orchestrator; api.py's docstring lists the module of each
step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.exporter.api import export_model as export_model
    from gpcl_trt.exporter.build import load_model as load_model
    from gpcl_trt.exporter.model_dir import check_model_dir as check_model_dir
    from gpcl_trt.exporter.tracing import make_dummy_inputs as make_dummy_inputs

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "export_model": "api",
        "load_model": "build",
        "make_dummy_inputs": "tracing",
        "check_model_dir": "model_dir",
    },
)
