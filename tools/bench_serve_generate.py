"""Served throughput of the text generation model (NAME_generate): N concurrent requests against
the same N requests one at a time, in one tritonserver, rounds alternating.

A random-weight Llama (fp32; shape from the flags), a byte-level BPE tokenizer trained here,
exported with past, written by write_triton_repo with N slots, served by the bundled tritonserver
on 127.0.0.1. Every request has its own prompt length and asks for --new-tokens tokens with
end_id -1 (no EOS stop), so both ways decode the same tokens (counted from each answer's
output_ids). Prints one JSON object.

``--shape 0.5b``: Qwen2-0.5B's shape as a Llama (hidden 896, 24 layers, 14/2 heads, intermediate
4864, vocab 151936), the checkpoint and export of tools/bench_generate.py (WORK/ckpt_0.5b,
WORK/ours_0.5b/model.onnx: made here the same way when absent, reused when there). Its tokenizer
is bench_generate's WordLevel one (three entries: every word is <unk>), so request i's prompt is
8 * (i + 1) words = that many tokens; the generated ids are real ids of the 151936-row lm_head
(their text is empty: the tokenizer has no entries for them), which is why tokens are counted from
output_ids.

``--breakdown``: no server; the same requests through the in-flight batcher (generate/inflight.py)
in this process, one round each way, its methods wrapped with timers: prefill runs, batch step
runs (median per step by rows), cache merges on join, leaves, picks (detokenising and emit
included) and the rest. The served rounds' wall time less this is the server path's share.

    .venv/bin/python tools/bench_serve_generate.py --requests 16 --new-tokens 64 --rounds 3
    .venv/bin/python tools/bench_serve_generate.py --shape 0.5b --work /tmp/bg --rounds 2
    .venv/bin/python tools/bench_serve_generate.py --shape 0.5b --work /tmp/bg --breakdown
    .venv/bin/python tools/bench_serve_generate.py --shape 0.5b --work /tmp/bg --rounds 2 --serve optimized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))


def _post(port: int, name: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{name}/generate", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _export_0p5b(work: Path) -> Path:
    """bench_generate's 0.5B checkpoint (its shape, vocab and WordLevel tokenizer) and our export of
    it with past, each made once under ``work`` and shared with tools/bench_generate.py."""
    from bench_generate import checkpoint

    ckpt, onnx = checkpoint(work, "0.5b"), work / "ours_0.5b" / "model.onnx"
    if not onnx.is_file():
        from gpcl_trt.exporter import export_model

        onnx.parent.mkdir(parents=True, exist_ok=True)
        assert export_model(ckpt, onnx, task="text-generation-with-past")["ok"]
    return onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", choices=["flags", "0.5b"], default="flags", help="0.5b: Qwen2-0.5B's shape")
    ap.add_argument("--hidden", type=int, default=512, help="--shape flags: hidden size")
    ap.add_argument("--layers", type=int, default=8, help="--shape flags: layers")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_generate"), help="--shape 0.5b: its files")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="no server: the same requests through the in-flight batcher in this process, one round each "
        "way, the time split into prefill runs, batch step runs, cache merges on join / leave, picks "
        "(with detokenising and emit) and the rest",
    )
    ap.add_argument(
        "--serve",
        choices=["export", "optimized"],
        default="export",
        help="the graph the generate model runs: the export as it is, or `gpcl-trt optimize --variant "
        "contrib-gqa --logits last` of it (made beside it once), as the pipeline's [optimize] serves",
    )
    args = ap.parse_args()

    from gpcl_trt.deploy import write_triton_repo
    from gpcl_trt.deploy.server import TritonServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.shape == "0.5b":
        from bench_generate import SHAPES, VOCAB

        onnx = _export_0p5b(args.work)
        shape = {**SHAPES["0.5b"], "vocab": VOCAB["0.5b"], "dtype": "fp32", "tokenizer": "WordLevel, 3 entries"}
        bodies = [
            {"text_input": " ".join(["w"] * 8 * (i + 1)), "max_tokens": args.new_tokens, "end_id": -1}
            for i in range(args.requests)
        ]
    else:
        onnx = _export_flags(tmp, args.hidden, args.layers)
        from test_generate import SENTENCES, VOCAB

        shape = {"hidden": args.hidden, "layers": args.layers, "vocab": VOCAB, "dtype": "fp32"}
        text = " ".join(SENTENCES)
        bodies = [
            {"text_input": text[: 20 + 9 * i], "max_tokens": args.new_tokens, "end_id": -1}
            for i in range(args.requests)
        ]
    if args.serve == "optimized":
        from gpcl_trt.passes.fuse_ort import optimize_file

        made = onnx.with_name(onnx.stem + "_gqa_last.onnx")
        if not made.is_file():
            optimize_file(onnx, made, variant="contrib-gqa", logits="last")
        onnx = made
    shape["served"] = onnx.name
    if args.breakdown:
        print(json.dumps(breakdown(onnx, bodies, args.threads or None), indent=1))
        return
    repo = tmp / "repo"
    write_triton_repo(onnx, repo, "llama", backend="python", generate_slots=args.requests)
    if args.threads:
        cfg_path = repo / "llama_generate" / "config.pbtxt"
        cfg_path.write_text(
            cfg_path.read_text()
            + f'parameters {{ key: "intra_op_threads" value {{ string_value: "{args.threads}" }} }}\n'
        )
    server = TritonServer(repo, models=["llama_generate"])
    rows = []
    try:
        server.start()
        port = server.http_port
        _post(port, "llama_generate", bodies[0])  # warm-up
        for _ in range(args.rounds):
            for mode in ("sequential", "concurrent"):
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                if mode == "sequential":
                    outs = [_post(port, "llama_generate", b) for b in bodies]
                else:
                    with ThreadPoolExecutor(len(bodies)) as pool:
                        outs = list(pool.map(lambda b: _post(port, "llama_generate", b), bodies))
                wall = time.perf_counter() - t0
                tokens = sum(len(_ids(o)) for o in outs)
                assert tokens == len(outs) * args.new_tokens, [len(_ids(o)) for o in outs]
                rows.append(
                    {
                        "mode": mode,
                        "wall_s": wall,
                        "tokens_per_s": tokens / wall,
                        "load_1min_before": load,
                        "load_1min_after": os.getloadavg()[0],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        server.stop()
    best = {m: max(r["tokens_per_s"] for r in rows if r["mode"] == m) for m in ("sequential", "concurrent")}
    print(
        json.dumps(
            {
                "shape": shape,
                "requests": args.requests,
                "prompt_tokens": "8 * (i + 1) for request i" if args.shape == "0.5b" else "6-45",
                "new_tokens": args.new_tokens,
                "rounds": rows,
                "best_tokens_per_s": best,
                "ratio": best["concurrent"] / best["sequential"],
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "threads_alive": threading.active_count(),
            },
            indent=1,
        )
    )


def breakdown(onnx: Path, bodies: list[dict], threads: int | None) -> dict:
    """Where the served time goes: the batcher the generation model runs (generate/inflight.py),
    in this process, its methods wrapped with timers (nothing in it changed). Sequential: each
    request alone, waited for; concurrent: all submitted at once (as the server's requests arrive)."""
    from gpcl_trt.generate.detok import load_tokenizer
    from gpcl_trt.generate.inflight import InflightBatcher
    from gpcl_trt.generate.rules import model_settings
    from gpcl_trt.generate.runtimes import OrtRuntime
    from gpcl_trt.manifest import model_dir_of

    model_dir = model_dir_of(onnx)
    tok = load_tokenizer(model_dir)
    batcher = InflightBatcher(
        OrtRuntime(onnx, threads=threads), tok, model_settings(model_dir, tok, artifact=onnx), capacity=len(bodies)
    )
    times: dict = {}
    steps: list = []  # (rows, seconds) of each batch step's run
    inside: list = []  # the wrapped calls in progress

    def timed(name, fn):
        def wrapper(*a, **kw):
            key = name
            if name == "_run":
                key = "prefill" if a[3] is None else "step_run"
            elif name == "_take":
                key = "take_join" if "_join" in inside else "take_step"
            inside.append(name)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                inside.pop()
                times[key] = times.get(key, 0.0) + dt
                if key == "step_run":
                    steps.append((a[0].shape[0], dt))

        return wrapper

    for name in ("_run", "_join", "_leave", "_take", "_step", "_admit"):
        setattr(batcher, name, timed(name, getattr(batcher, name)))

    def serve(group: list[dict]) -> None:
        done = threading.Semaphore(0)
        for b in group:
            emit = lambda piece, final, finish, error, **kw: final and done.release()  # noqa: E731
            batcher.submit(b["text_input"], emit, max_tokens=b["max_tokens"], eos_ids=[], details=True)
        for _ in group:
            done.acquire()

    serve(bodies[:1])  # warm-up
    out = {}
    try:
        for mode in ("concurrent", "sequential"):
            times.clear()
            steps.clear()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            if mode == "concurrent":
                serve(bodies)
            else:
                for b in bodies:
                    serve([b])
            wall = time.perf_counter() - t0
            t = dict(times)
            by_rows: dict = {}
            for rows, dt in steps:
                by_rows.setdefault(rows, []).append(dt)
            out[mode] = {
                "wall_s": wall,
                "tokens_per_s": sum(b["max_tokens"] for b in bodies) / wall,
                "load_1min_before": load,
                "prefill_s": t.get("prefill", 0.0),
                "join_merge_s": t.get("_join", 0.0) - t.get("prefill", 0.0) - t.get("take_join", 0.0),
                "step_run_s": t.get("step_run", 0.0),
                "take_s": t.get("take_join", 0.0) + t.get("take_step", 0.0),
                "leave_s": t.get("_leave", 0.0),
                "rest_of_step_s": t.get("_step", 0.0)
                - t.get("step_run", 0.0)
                - t.get("take_step", 0.0)
                - t.get("_leave", 0.0),
                "outside_admit_and_step_s": wall - t.get("_step", 0.0) - t.get("_admit", 0.0),
                "step_run_median_s_by_rows": {
                    r: sorted(v)[len(v) // 2] for r, v in sorted(by_rows.items()) if r in (1, max(by_rows))
                },
            }
            print(json.dumps({mode: out[mode]}), file=sys.stderr, flush=True)
    finally:
        batcher.close()
    return out


def _ids(answer: dict) -> list:
    ids = answer["output_ids"]
    return ids if isinstance(ids, list) else [ids]  # the generate extension writes one element bare


def _export_flags(tmp: Path, h: int, layers: int) -> Path:
    """A random-init Llama of hidden ``h`` and ``layers`` layers with the tests' byte-level BPE
    tokenizer, exported with past."""
    import torch
    import transformers as tf
    from test_generate import VOCAB, _tokenizer

    from gpcl_trt.exporter import export_model

    model_dir = tmp / "llama"
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=int(h * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=h // 64,
        num_key_value_heads=max(1, h // 256),
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    _tokenizer(model_dir)
    onnx = tmp / "onnx" / "llama.onnx"
    onnx.parent.mkdir()
    assert export_model(model_dir, onnx, task="text-generation-with-past")["ok"]
    return onnx


if __name__ == "__main__":
    main()
