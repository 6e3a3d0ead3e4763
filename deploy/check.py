"""Served-model checks against a live tritonserver: outputs over HTTP and gRPC equal ONNX
Runtime's on the same ONNX file, a bounded concurrent load with zero errors, a clean stop;
and what the server says about configs whose backends it lacks."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from gpcl_trt.common import GpclError


def make_inputs(
    onnx_path: str | os.PathLike, batch: int = 1, seq: int = 16, seed: int = 0, past: int = 4
) -> dict[str, Any]:
    """Inputs for the served model (``past`` cached tokens where it takes a KV cache, so the
    decode path is served too)."""
    from gpcl_trt import feeds

    specs = feeds.specs_from_session(feeds.ort_session(onnx_path))
    has_past = any(feeds.is_past(s.name) for s in specs)
    return feeds.make_feeds(specs, batch, seq, past if has_past else 0, seed=seed)


def seq2seq_check_seq(model_dir: str | os.PathLike | None, seq: int = 16, past: int = 4) -> int:
    """``seq`` for checking an encoder-decoder's served decoder: its longest case (2 x seq new
    tokens after ``past`` cached) within the model's decoder positions (Whisper's are few)."""
    from gpcl_trt.generate.seq2seq import generation_rules

    limit = generation_rules(Path(model_dir) if model_dir else None).get("max_positions")
    return max(1, min(seq, (int(limit) - past) // 2)) if limit else seq


def ort_outputs(onnx_path: str | os.PathLike, inputs: dict[str, Any]) -> dict[str, Any]:
    from gpcl_trt import feeds

    return feeds.ort_run(feeds.ort_session(onnx_path), inputs)


def _infer(module, client, model: str, feeds: dict[str, Any], outputs: Iterable[str]) -> dict[str, Any]:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, value in feeds.items():
        t = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        inputs.append(t)
    result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


def _max_diff(got: dict[str, Any], want: dict[str, Any]) -> float:
    from gpcl_trt.feeds import max_abs_diff

    return max((max_abs_diff(got[n], ref) if n in got else float("inf") for n, ref in want.items()), default=0.0)


def run_load(
    url: str,
    model: str,
    cases: list[tuple[dict, dict]],
    requests: int = 1000,
    concurrency: int = 16,
    time_limit_s: float = 120.0,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """``requests`` gRPC inferences from ``concurrency`` threads (one client each), cycling
    through ``cases``; every answer is compared with its expected output. Stops submitting
    at the time limit (what was not sent counts as not completed)."""
    import tritonclient.grpc as tg

    local = threading.local()
    deadline = time.monotonic() + time_limit_s

    def one(i: int) -> tuple[float, str | None]:
        if time.monotonic() > deadline:
            return 0.0, "skipped"
        if not hasattr(local, "client"):
            local.client = tg.InferenceServerClient(url)
        feeds, want = cases[i % len(cases)]
        t0 = time.perf_counter()
        try:
            got = _infer(tg, local.client, model, feeds, list(want))
        except Exception as exc:  # every failure is counted and a few are reported
            return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        diff = _max_diff(got, want)
        return dt, None if diff <= atol else f"output differs from ONNX Runtime by {diff:.3g}"

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    latencies = sorted(dt for dt, err in results if err is None)
    errors = [err for _, err in results if err not in (None, "skipped")]
    skipped = sum(1 for _, err in results if err == "skipped")

    def pct(p: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) if latencies else None

    return {
        "requests": requests,
        "concurrency": concurrency,
        "completed": len(latencies),
        "errors": len(errors),
        "not_sent": skipped,
        "error_samples": sorted(set(errors))[:3],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 1) if wall else None,
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99)},
        "time_limit_s": time_limit_s,
    }


def check_served_model(
    repo: str | os.PathLike,
    name: str,
    onnx_path: str | os.PathLike | None = None,
    requests: int = 1000,
    concurrency: int = 16,
    time_limit_s: float = 300.0,
    atol: float = 1e-5,
    seq: int = 16,
    startup_timeout: float = 120.0,
    server: Any = None,
) -> dict[str, Any]:
    """Serve ``repo/name`` (a python- or onnxruntime-backend model) with a real tritonserver
    and compare it with ONNX Runtime on ``onnx_path`` (default: the repository's model.onnx).

    ``server``: a running :class:`TritonServer` with the model loaded, left running; by
    default one is started for ``name`` alone and stopped at the end (and the stop checked)."""
    from gpcl_trt.deploy.server import TritonServer

    model_dir = Path(repo) / name
    onnx_path = Path(onnx_path) if onnx_path else model_dir / "1" / "model.onnx"
    if not onnx_path.is_file():
        raise GpclError(f"no ONNX model to compare with: {onnx_path} does not exist")
    cases = []
    for seed, (batch, s) in enumerate([(1, seq), (2, seq // 2 or 1), (1, seq * 2), (3, seq)]):
        feeds = make_inputs(onnx_path, batch=batch, seq=s, seed=seed)
        cases.append((feeds, ort_outputs(onnx_path, feeds)))

    import tritonclient.grpc as tg
    import tritonclient.http as th

    result: dict[str, Any] = {"model": name, "repo": str(repo), "reference": str(onnx_path), "atol": atol}
    owned = server is None
    if owned:
        server = TritonServer(repo, models=[name], startup_timeout=startup_timeout)
    t0 = time.perf_counter()
    try:
        if owned:
            server.start()
            result["startup_s"] = round(time.perf_counter() - t0, 2)
        feeds, want = cases[0]
        with th.InferenceServerClient(server.http_url) as http:
            result["http_max_abs_diff"] = max(_max_diff(_infer(th, http, name, f, list(w)), w) for f, w in cases)
        grpc = tg.InferenceServerClient(server.grpc_url)
        result["grpc_max_abs_diff"] = max(_max_diff(_infer(tg, grpc, name, f, list(w)), w) for f, w in cases)
        grpc.close()
        result["load"] = run_load(server.grpc_url, name, cases, requests, concurrency, time_limit_s, atol)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["server_log_tail"] = server.log_tail()
    finally:
        if owned:
            result["stop"] = server.stop()
    load = result.get("load", {})
    result["ok"] = (
        "error" not in result
        and result.get("http_max_abs_diff", 1e9) <= atol
        and result.get("grpc_max_abs_diff", 1e9) <= atol
        and load.get("errors") == 0
        and load.get("completed") == requests
        and (not owned or (result["stop"]["leftover_processes"] == 0 and result["stop"]["returncode"] == 0))
    )
    return result
