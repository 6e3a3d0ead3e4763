"""Weight-only quantization (int8 / int4, block-wise RTN), streamed one tensor at a time from the
memory-mapped weights into standard ONNX: block-wise ``DequantizeLinear`` (opset 21) feeding
each projection's ``MatMul``/``Gemm``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.quantize.api import quantize_model as quantize_model
    from gpcl_trt.quantize.rtn import dequantize as dequantize
    from gpcl_trt.quantize.rtn import pack_int4 as pack_int4
    from gpcl_trt.quantize.rtn import quantize_blocks as quantize_blocks
    from gpcl_trt.quantize.rtn import unpack_int4 as unpack_int4

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "quantize_model": "api",
        "quantize_blocks": "rtn",
        "dequantize": "rtn",
        "pack_int4": "rtn",
        "unpack_int4": "rtn",
    },
)
