"""HF -> ONNX exporter: export a local model directory, load it as it is exported, make its
inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.exporter.api import check_model_dir as check_model_dir
    from gpcl_trt.exporter.api import export_model as export_model
    from gpcl_trt.exporter.api import load_model as load_model
    from gpcl_trt.exporter.api import make_dummy_inputs as make_dummy_inputs

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "export_model": "api",
        "load_model": "api",
        "make_dummy_inputs": "api",
        "check_model_dir": "api",
    },
)
