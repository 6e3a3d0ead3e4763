"""Triton python-backend model: serves the ONNX model next to it with ONNX Runtime.

Copied as ``model.py`` into a model repository by ``gpcl-trt triton --backend python``, for
servers that have only the python backend. The GPCL nodes run through their ONNX function
bodies, so no plugin is needed. Config parameters:
  onnx_file         the model file in the version directory (model.onnx)
  gpcl_python_path  extra sys.path entries (os.pathsep separated) where onnxruntime lives; the
                    stub runs with the server's own Python, which may not have it
  intra_op_threads  ONNX Runtime threads per instance (0: ONNX Runtime's default)
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        for entry in params.get("gpcl_python_path", "").split(os.pathsep):
            if entry and entry not in sys.path:
                sys.path.append(entry)  # appended: never shadow the stub's own numpy
        import onnxruntime as ort

        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        # Requests of one dynamic batch may differ in sequence length: run them one by one.
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input {name!r}")
                    feeds[name] = tensor.as_numpy()
                outputs = self.session.run(self.output_names, feeds)
                tensors = [pb_utils.Tensor(n, o) for n, o in zip(self.output_names, outputs)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # one bad request must not take the instance down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def finalize(self):
        self.session = None
