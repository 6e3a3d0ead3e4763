"""GPCL itself: the numpy/torch reference (the oracle), the model-local ONNX function, and the
CUDA kernel library (plugins/gpcl/ holds the kernel, the shared math and the TensorRT plugin)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.plugins.native import KernelLibrary as KernelLibrary
    from gpcl_trt.plugins.native import build_kernel_library as build_kernel_library
    from gpcl_trt.plugins.onnx_function import attach_gpcl_functions as attach_gpcl_functions
    from gpcl_trt.plugins.onnx_function import gpcl_model as gpcl_model
    from gpcl_trt.plugins.onnx_function import inline_gpcl_functions as inline_gpcl_functions
    from gpcl_trt.plugins.onnx_function import make_gpcl_node as make_gpcl_node
    from gpcl_trt.plugins.reference import gpcl_numpy as gpcl_numpy
    from gpcl_trt.plugins.reference import gpcl_torch as gpcl_torch

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "gpcl_numpy": "reference",
        "gpcl_torch": "reference",
        "make_gpcl_node": "onnx_function",
        "attach_gpcl_functions": "onnx_function",
        "inline_gpcl_functions": "onnx_function",
        "gpcl_model": "onnx_function",
        "KernelLibrary": "native",
        "build_kernel_library": "native",
    },
)
