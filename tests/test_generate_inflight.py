"""In-flight batching without a server: requests submitted from many threads while others decode
join and leave one running batch, and each one's tokens equal the generation loop's for that
prompt alone (greedy and seeded sampling); a cancelled request leaves the batch; requests beyond
the capacity wait and are all served."""

from __future__ import annotations

import threading

import pytest
from test_generate import decoders  # noqa: F401  (module fixture: tiny decoders with a tokenizer)

PROMPTS = [
    "the quick brown fox",
    "héllo wörld, naïve café, once upon a time there was",
    "日本語",
    "once",
    "the lazy dog jumps over the quick brown fox and the model",
    "naïve",
    "a time there was a model once upon",
    "emoji 😀",
    "the",
    "wörld",
]


def _open(model_dir, onnx, capacity):
    from gpcl_trt.generate.api import model_settings
    from gpcl_trt.generate.detok import load_tokenizer
    from gpcl_trt.generate.inflight import InflightBatcher
    from gpcl_trt.generate.runtimes import OrtRuntime

    tok = load_tokenizer(model_dir)
    return InflightBatcher(OrtRuntime(onnx), tok, model_settings(model_dir, tok), capacity=capacity)


def _serve(batcher, jobs, cancel_after=None):
    """Submit every job from its own thread at once; returns per job (text, finish, error)."""
    out = [None] * len(jobs)
    done = [threading.Event() for _ in jobs]
    pieces = [[] for _ in jobs]

    def run(i, job):
        def emit(piece, final, finish, error):
            pieces[i].append(piece)
            if final:
                out[i] = ("".join(pieces[i]), finish, error)
                done[i].set()

        def cancelled():
            return cancel_after is not None and i == 0 and len(pieces[0]) >= cancel_after

        batcher.submit(job["text"], emit, cancelled=cancelled, **{k: v for k, v in job.items() if k != "text"})

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, d in enumerate(done):
        if cancel_after is not None and i == 0:
            continue
        assert d.wait(120), f"request {i} never finished"
    return out


@pytest.mark.parametrize("capacity", [4, 16])
def test_inflight_equals_each_prompt_alone(decoders, capacity):  # noqa: F811
    from gpcl_trt.generate import generate
    from gpcl_trt.generate.loop import Sampling

    model_dir, onnx = decoders("llama")
    jobs = [{"text": p, "max_tokens": 3 + 2 * i} for i, p in enumerate(PROMPTS)]
    jobs[3]["sampling"] = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    jobs[5]["stop"] = ["e"]
    batcher = _open(model_dir, onnx, capacity)
    try:
        served = _serve(batcher, jobs)
        stats = dict(batcher.stats)
    finally:
        batcher.close()
    for job, (text, finish, error) in zip(jobs, served):
        s = job.get("sampling", Sampling())
        ref = generate(
            onnx,
            [job["text"]],
            max_new_tokens=job["max_tokens"],
            stop=job.get("stop", ()),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
        )["outputs"][0]
        assert error is None
        assert (text, finish) == (ref["text"], ref["finish"]), job
    assert stats["admitted"] == len(jobs)
    assert 1 < stats["max_rows"] <= capacity  # rows shared steps, never more than the capacity


def test_cancelled_request_leaves_and_bad_input_is_refused(decoders):  # noqa: F811
    from gpcl_trt.common import GpclError
    from gpcl_trt.generate import generate

    model_dir, onnx = decoders("llama")
    batcher = _open(model_dir, onnx, 4)
    try:
        with pytest.raises(GpclError, match="max_tokens"):
            batcher.submit("the", lambda *a: None, max_tokens=0)
        with pytest.raises(GpclError, match="text_input"):
            batcher.submit("", lambda *a: None, max_tokens=4)
        jobs = [{"text": p, "max_tokens": 40} for p in PROMPTS[:5]]
        served = _serve(batcher, jobs, cancel_after=2)
        stats = dict(batcher.stats)
    finally:
        batcher.close()
    assert served[0] is None and stats["cancelled"] == 1
    for job, (text, finish, error) in list(zip(jobs, served))[1:]:
        ref = generate(onnx, [job["text"]], max_new_tokens=job["max_tokens"])["outputs"][0]
        assert (text, finish, error) == (ref["text"], ref["finish"], None)
