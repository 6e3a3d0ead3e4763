"""Served throughput of the text generation model (NAME_generate): N concurrent requests against
the same N requests one at a time, in one tritonserver, rounds alternating.

A random-weight Llama (fp32; shape from the flags), a byte-level BPE tokenizer trained here,
exported with past, written by write_triton_repo with N slots, served by the bundled tritonserver
on 127.0.0.1. Every request has its own prompt length and asks for --new-tokens tokens with
end_id -1 (no EOS stop), so both ways decode the same tokens. Prints one JSON object.

    .venv/bin/python tools/bench_serve_generate.py --requests 16 --new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _post(port: int, name: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{name}/generate", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    args = ap.parse_args()

    import torch
    import transformers as tf
    from test_generate import SENTENCES, VOCAB, _tokenizer

    from gpcl_trt.deploy import write_triton_repo
    from gpcl_trt.deploy.server import TritonServer
    from gpcl_trt.exporter import export_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = tmp / "llama"
    h = args.hidden
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=int(h * 2.75),
        num_hidden_layers=args.layers,
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
    repo = tmp / "repo"
    write_triton_repo(onnx, repo, "llama", backend="python", generate_slots=args.requests)
    if args.threads:
        cfg_path = repo / "llama_generate" / "config.pbtxt"
        cfg_path.write_text(
            cfg_path.read_text()
            + f'parameters {{ key: "intra_op_threads" value {{ string_value: "{args.threads}" }} }}\n'
        )
    text = " ".join(SENTENCES)
    bodies = [
        {"text_input": text[: 20 + 9 * i], "max_tokens": args.new_tokens, "end_id": -1} for i in range(args.requests)
    ]
    server = TritonServer(repo, models=["llama_generate"])
    rows = []
    try:
        server.start()
        port = server.http_port
        _post(port, "llama_generate", bodies[0])  # warm-up
        for _ in range(args.rounds):
            for mode in ("sequential", "concurrent"):
                t0 = time.perf_counter()
                if mode == "sequential":
                    outs = [_post(port, "llama_generate", b) for b in bodies]
                else:
                    with ThreadPoolExecutor(len(bodies)) as pool:
                        outs = list(pool.map(lambda b: _post(port, "llama_generate", b), bodies))
                wall = time.perf_counter() - t0
                rows.append({"mode": mode, "wall_s": wall, "tokens_per_s": len(outs) * args.new_tokens / wall})
    finally:
        server.stop()
    best = {m: max(r["tokens_per_s"] for r in rows if r["mode"] == m) for m in ("sequential", "concurrent")}
    print(
        json.dumps(
            {
                "shape": {"hidden": h, "layers": args.layers, "vocab": VOCAB, "dtype": "fp32"},
                "requests": args.requests,
                "new_tokens": args.new_tokens,
                "rounds": rows,
                "best_tokens_per_s": best,
                "ratio": best["concurrent"] / best["sequential"],
                "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
                "threads_alive": threading.active_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
