"""Triton deployment (repositories, the served-model check) and the one-shot pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.deploy.check import check_served_model as check_served_model
    from gpcl_trt.deploy.pipeline import run_pipeline as run_pipeline
    from gpcl_trt.deploy.triton import write_triton_repo as write_triton_repo

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "write_triton_repo": "triton",
        "check_served_model": "check",
        "run_pipeline": "pipeline",
    },
)
