"""Serving overhead of the bundled tritonserver (python backend) against in-process ONNX
Runtime, side by side in one run on the same model, inputs and request count.

    .venv/bin/python tools/bench_triton.py demo_out/model_gpcl.onnx [--requests 400] [--seq 16]

Prints one JSON object: requests/s in process (one session, sequential: what one python-backend
instance does), and served over gRPC at concurrency 1 and 16, with the ratios. Only the ratios
mean something on a shared CPU machine; absolute numbers belong to a quiet GPU host.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path, help="ONNX model to serve (e.g. demo_out/model_gpcl.onnx)")
    ap.add_argument("--requests", type=int, default=400, help="requests per measurement")
    ap.add_argument("--seq", type=int, default=16, help="sequence length of the test inputs")
    args = ap.parse_args()

    import onnxruntime as ort

    from gpcl_trt.deploy.check import make_inputs, ort_outputs, run_load
    from gpcl_trt.deploy.server import TritonServer
    from gpcl_trt.deploy.triton import write_triton_repo

    feeds = make_inputs(args.onnx, batch=1, seq=args.seq)
    cases = [(feeds, ort_outputs(args.onnx, feeds))]
    sess = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(args.requests):
        sess.run(None, feeds)
    ort_rps = args.requests / (time.perf_counter() - t0)
    del sess

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as d:
        write_triton_repo(args.onnx, Path(d) / "repo", "m", backend="python")
        with TritonServer(Path(d) / "repo", models=["m"]) as server:
            run_load(server.grpc_url, "m", cases, requests=16, concurrency=4)  # warm-up
            served = {c: run_load(server.grpc_url, "m", cases, requests=args.requests, concurrency=c) for c in (1, 16)}
    out = {
        "model": str(args.onnx),
        "seq": args.seq,
        "requests": args.requests,
        "ort_in_process_rps": round(ort_rps, 1),
        **{f"triton_grpc_c{c}_rps": r["throughput_rps"] for c, r in served.items()},
        **{f"triton_grpc_c{c}_errors": r["errors"] for c, r in served.items()},
        **{f"ratio_c{c}_vs_ort": round(r["throughput_rps"] / ort_rps, 3) for c, r in served.items()},
        "triton_grpc_c16_latency_ms": served[16]["latency_ms"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
