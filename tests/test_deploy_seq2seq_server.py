"""Live test of encoder-decoder generation models in the real tritonserver (nvidia-pytriton's):
a tiny random T5 with GPCL inserted into both graphs and a tiny Whisper, each written by
``write_triton_repo`` from its export directory, served through the same generate endpoint as a
decoder's model (one server start for both). /generate equals local greedy ``generate``, the
SSE pieces of generate_stream concatenate to the same text, Whisper's ``audio`` (FP32 samples at
16 kHz) equals local ``generate --audio`` on the WAV they came from, and wrong inputs are 400s."""

from __future__ import annotations

import json

import pytest
from test_deploy_generate import _post, _sse_text
from test_seq2seq import make_checkpoint, write_wav

pytest.importorskip("pytriton", reason="needs tritonserver (nvidia-pytriton)")
pytestmark = pytest.mark.slow  # a live tritonserver, two exports

T5_GEN, WH_GEN = "t5_generate", "whisper_generate"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gpcl_trt.deploy import write_triton_repo
    from gpcl_trt.deploy.server import TritonServer
    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import insert_file

    base = tmp_path_factory.mktemp("s2s_triton")
    t5 = make_checkpoint("t5", base / "t5")
    assert export_model(t5, base / "t5_onnx")["ok"]
    gpcl = base / "t5_gpcl"  # GPCL in both graphs, under the export's file names
    gpcl.mkdir()
    for f in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        assert insert_file(base / "t5_onnx" / f, gpcl / f, tau=1e3)["inserted"]
    wh = make_checkpoint("whisper", base / "whisper")
    assert export_model(wh, base / "wh_onnx")["ok"]
    repo = base / "repo"
    r = write_triton_repo(gpcl, repo, "t5", backend="python")
    assert r["generate_model"]["model_dir"] == str(repo / T5_GEN), r["generate_model"]
    assert set(r["seq2seq"]) == {"encoder", "decoder"}
    r = write_triton_repo(base / "wh_onnx", repo, "whisper", backend="python")
    assert r["generate_model"]["speech"] is True
    server = TritonServer(repo, models=[T5_GEN, WH_GEN])
    try:  # start inside: a failed start still stops the server
        server.start()
        yield server, gpcl, base / "wh_onnx", write_wav(base / "clip.wav")
    finally:
        server.stop()


def test_seq2seq_generation_model_configs(served):
    from gpcl_trt.deploy.triton import parse_config

    server, *_ = served
    t5 = parse_config((server.repo / T5_GEN / "config.pbtxt").read_text())
    wh = parse_config((server.repo / WH_GEN / "config.pbtxt").read_text())
    assert t5.model_transaction_policy.decoupled and t5.parameters["encoder_file"].string_value
    assert [i.name for i in t5.input][:3] == ["text_input", "max_tokens", "stream"] and not t5.input[0].optional
    assert "audio" not in [i.name for i in t5.input]
    assert [i.name for i in wh.input][-1] == "audio" and wh.input[0].optional  # text_input absent for speech
    assert (server.repo / WH_GEN / "1" / "preprocessor_config.json").is_file()
    for entry in ("t5_encoder", "t5_decoder", "whisper_encoder", "whisper_decoder"):  # the raw tensor models
        assert (server.repo / entry / "config.pbtxt").is_file()


def test_t5_generate_and_stream_equal_local_greedy(served):
    from gpcl_trt.generate.seq2seq import generate_seq2seq

    server, gpcl, *_ = served
    for prompt, n in (("hello world", 12), ("the quick brown fox jumps", 7)):
        want = generate_seq2seq(gpcl, [prompt], max_new_tokens=n)["outputs"][0]["text"]
        status, body = _post(server.http_port, f"/v2/models/{T5_GEN}/generate", {"text_input": prompt, "max_tokens": n})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["text_output"] == want and answer["sequence_length"] == len(answer["output_ids"]) > 0
        status, body = _post(
            server.http_port,
            f"/v2/models/{T5_GEN}/generate_stream",
            {"text_input": prompt, "max_tokens": n, "stream": True},
        )
        text, errors = _sse_text(body)
        assert status == 200 and not errors and text == want, body
        assert body.count("data:") > 1  # streamed in pieces


def test_whisper_audio_equals_local_generate_audio(served):
    from gpcl_trt.generate.seq2seq import generate_seq2seq, read_audio

    server, _, wh_onnx, wav = served
    want = generate_seq2seq(wh_onnx, audio=[wav], max_new_tokens=10)["outputs"][0]["text"]
    samples = [float(x) for x in read_audio(wav, 16000)]  # the WAV's samples at the extractor's rate
    status, body = _post(server.http_port, f"/v2/models/{WH_GEN}/generate", {"audio": samples, "max_tokens": 10})
    assert status == 200, body
    assert json.loads(body)["text_output"] == want


def test_wrong_inputs_are_400(served):
    server, *_ = served
    cases = [
        (WH_GEN, {"text_input": "hello", "max_tokens": 4}),  # a speech model takes audio
        (WH_GEN, {"max_tokens": 4}),
        (T5_GEN, {"max_tokens": 4}),  # no text_input
        (T5_GEN, {"text_input": "hello", "max_tokens": 0}),
    ]
    for model, payload in cases:
        status, body = _post(server.http_port, f"/v2/models/{model}/generate", payload)
        assert 400 <= status < 500 and "error" in json.loads(body), (model, payload, status, body)
    assert server.model_ready(T5_GEN) and server.model_ready(WH_GEN)


def test_concurrent_requests_queue_and_a_hang_up_frees_the_queue(served):
    """Requests that arrive together are decoded one after the other, each equal to local greedy;
    a client that drops a long stream cancels it, so the queue behind it moves on."""
    import http.client
    import threading
    import time

    from gpcl_trt.generate.seq2seq import generate_seq2seq

    server, gpcl, *_ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    body = {"text_input": "hello world", "max_tokens": 100000, "stream": True}
    conn.request("POST", f"/v2/models/{T5_GEN}/generate_stream", body=json.dumps(body).encode())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(5) == b"data:"
    conn.sock.close()
    conn.close()

    jobs = [("a b c", 5), ("the quick brown fox", 9), ("hello", 3), ("once upon a time there was", 11)]
    answers: list = [None] * len(jobs)

    def run(i: int) -> None:
        text, n = jobs[i]
        answers[i] = _post(server.http_port, f"/v2/models/{T5_GEN}/generate", {"text_input": text, "max_tokens": n})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (text, n), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert json.loads(body)["text_output"] == generate_seq2seq(gpcl, [text], max_new_tokens=n)["outputs"][0]["text"]
    deadline = time.monotonic() + 60
    while "a request was cancelled" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "gpcl_trt generate: a request was cancelled; its slot is freed" in server.log()
