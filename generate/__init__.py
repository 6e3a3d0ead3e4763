"""Text generation from exported decoders: one generation loop (``loop.py``) over runtimes that
keep their own KV cache (``runtimes.py``: ONNX Runtime with IOBinding, the PyTorch model as the
reference), streaming detokenisation and stop strings (``detok.py``), and the ``generate``
command (``api.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.generate.api import generate as generate
    from gpcl_trt.generate.api import open_runtime as open_runtime
    from gpcl_trt.generate.detok import StreamDecoder as StreamDecoder
    from gpcl_trt.generate.loop import Sampling as Sampling
    from gpcl_trt.generate.loop import decode as decode
    from gpcl_trt.generate.runtimes import OrtRuntime as OrtRuntime
    from gpcl_trt.generate.runtimes import TorchRuntime as TorchRuntime

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "generate": "api",
        "open_runtime": "api",
        "StreamDecoder": "detok",
        "Sampling": "loop",
        "decode": "loop",
        "OrtRuntime": "runtimes",
        "TorchRuntime": "runtimes",
    },
)
