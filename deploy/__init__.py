"""Triton deployment and the one-shot pipeline (issue 7). Module imports stay light: the
heavy libraries (onnx, onnxruntime, tritonclient) load inside the functions."""

from gpcl_trt.deploy.triton import write_triton_repo

__all__ = ["write_triton_repo", "run_pipeline"]


def run_pipeline(*args, **kwargs):
    """See :func:`gpcl_trt.deploy.pipeline.run_pipeline`."""
    from gpcl_trt.deploy.pipeline import run_pipeline as _run

    return _run(*args, **kwargs)
