"""gpcl-trt: export Hugging Face transformers to ONNX, insert the GPCL op, build TensorRT
engines, check accuracy and serve with Triton. Each area installs as ``gpcl_trt.<area>``."""

__version__ = "0.1.0"
