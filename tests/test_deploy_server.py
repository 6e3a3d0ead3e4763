"""Live test: the real tritonserver shipped by nvidia-pytriton, on free loopback ports, serving
the GPCL MiniLM through the python backend. Outputs over HTTP and gRPC equal ONNX Runtime's,
1,000 requests at concurrency 16 finish with no error, and the server stops with nothing left
behind. The same server reports what it thinks of our tensorrt and onnxruntime configs (it
has neither backend) and of a config that does not parse."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from test_deploy_triton import tiny_engine  # noqa: F401  (module fixture: a real TRT-RTX engine)

from gpcl_trt.deploy import write_triton_repo

pytest.importorskip("pytriton", reason="needs tritonserver (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
pytestmark = pytest.mark.slow  # a live tritonserver under 1,000 requests

NAME = "gpcl_minilm"


@pytest.fixture(scope="module")
def repo(minilm_gpcl_onnx, tiny_engine, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("triton") / "repo"
    write_triton_repo(minilm_gpcl_onnx, d, NAME, backend="python", dynamic_batching=True)
    write_triton_repo(minilm_gpcl_onnx, d, f"{NAME}_ort", backend="onnxruntime")
    write_triton_repo(tiny_engine, d, "tiny_trt", backend="tensorrt")
    shutil.copytree(d / NAME, d / "broken")
    cfg = d / "broken" / "config.pbtxt"
    cfg.write_text(
        cfg.read_text()
        .replace('name: "gpcl_minilm"', 'name: "broken"')
        .replace("max_batch_size: 8", 'max_batch_size: "eight"')
    )
    return d


def test_live_tritonserver(repo):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    from gpcl_trt.deploy.check import check_served_model
    from gpcl_trt.deploy.server import TritonServer, _group_size

    server = TritonServer(repo, models=[NAME])
    try:  # start inside: a timeout during startup still stops the server
        server.start()
        assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
        assert server.model_ready(NAME)
        result = check_served_model(repo, NAME, requests=1000, concurrency=16, time_limit_s=150, seq=8, server=server)
        assert result["ok"], result
        # Same ONNX Runtime, same model file: the served answer is the local one.
        assert result["http_max_abs_diff"] <= 1e-6 and result["grpc_max_abs_diff"] <= 1e-6
        load = result["load"]
        assert (load["completed"], load["errors"], load["not_sent"]) == (1000, 0, 0), load

        # Bad requests are answered with an error, and the model keeps serving.
        client = tg.InferenceServerClient(server.grpc_url)
        bad = tg.InferInput("input_ids", [1, 4], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 4), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer(NAME, [bad])
        assert server.model_ready(NAME)

        # Without the tensorrt / onnxruntime backends the server can only parse those configs:
        # it gets as far as looking for the backend. A config that does not parse fails earlier.
        answers = {n: server.load_model(n) for n in (f"{NAME}_ort", "tiny_trt", "broken")}
        print({n: (a["message"], a["log_errors"]) for n, a in answers.items()})  # what tritonserver says (-s)
        assert not any(a["loaded"] for a in answers.values())
        assert "unable to find backend library for backend 'onnxruntime'" in answers[f"{NAME}_ort"]["message"]
        assert "unable to find backend library for backend 'tensorrt'" in answers["tiny_trt"]["message"]
        assert "backend library" not in answers["broken"]["message"]
        assert any('Expected integer, got: "eight"' in line for line in answers["broken"]["log_errors"])
        assert server.model_ready(NAME)
    finally:
        pgid = server.proc.pid if server.proc else None
        stop = server.stop()
    assert stop["leftover_processes"] == 0 and not stop["killed"], stop
    assert _group_size(pgid) == 0
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
