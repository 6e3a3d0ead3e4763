#!/usr/bin/env python3
"""GPCL on the GPU: the CUDA kernel vs torch eager (the reference in torch ops) vs torch.compile
of the same, for tokens x hidden from 1x4096 to 16384x8192 in float16/bfloat16/float32.

Achieved bandwidth (one read + one write of the tensor) is reported as a fraction of a
device-to-device copy of the same tensor, measured in the same run. Inputs are random normal
(a mix of clamped and untouched groups), never zeros. Targets: >= 0.90 of copy bandwidth at
large sizes and >= 1.0x torch.compile.

    python tools/bench_gpcl.py [--lib build/gpcl/libgpcl_kernel.so] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

SHAPES = [(1, 4096), (128, 4096), (1024, 4096), (4096, 4096), (16384, 4096), (16384, 8192)]
DTYPES = ("float16", "bfloat16", "float32")


def cuda_time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median of per-call CUDA-event times (each call bracketed by events on the stream). A short
    device-side sleep is queued first, so the events time the device work alone, not how long
    the host takes to launch it (a ctypes call costs ~10 us more than torch's own ops, as much
    as a mid-size copy takes on an H200)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(300_000)  # ~0.15 ms of cycles: the launches below queue behind it
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_one(kernel, compiled, tokens: int, hidden: int, dtype: str, mode: str, tau: float, reps: int) -> dict:
    import torch

    from gpcl_trt.plugins.reference import gpcl_torch

    dt = getattr(torch, dtype)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float32).mul_(0.8).to(dt)
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()  # read + write
    rows = {
        "copy": lambda: y.copy_(x),
        "kernel": lambda: kernel.forward(x, tau, mode, out=y),
        "torch_eager": lambda: gpcl_torch(x, tau, mode),
    }
    if compiled is not None:
        rows["torch_compile"] = lambda: compiled(x, tau, mode)
    out = {"tokens": tokens, "hidden": hidden, "dtype": dtype, "mode": mode}
    for name, fn in rows.items():
        try:
            ms = cuda_time_ms(fn, reps)
            out[f"{name}_ms"] = ms
            out[f"{name}_GBps"] = nbytes / ms / 1e6
        except Exception as exc:  # torch.compile may be unavailable (no triton): say so, go on
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if "kernel_ms" in out:
        out["kernel_fraction_of_copy"] = out["copy_ms"] / out["kernel_ms"]
        if "torch_compile_ms" in out:
            out["kernel_speedup_vs_compile"] = out["torch_compile_ms"] / out["kernel_ms"]
        out["kernel_speedup_vs_eager"] = out["torch_eager_ms"] / out["kernel_ms"]
    # Check the timed kernel computed the right thing (same input, reference in float32).
    ref = gpcl_torch(x, tau, mode).float()
    kernel.forward(x, tau, mode, out=y)
    torch.cuda.synchronize()
    out["max_abs_diff_vs_reference"] = float((y.float() - ref).abs().max())
    return out


def markdown(results: list[dict], device: str) -> str:
    lines = [
        f"GPCL CUDA kernel on {device} (median of CUDA-event times; bandwidth = read + write)",
        "",
        "| tokens x hidden | dtype | mode | copy GB/s | kernel GB/s | kernel / copy | vs torch.compile | vs eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        comp = f"{r['kernel_speedup_vs_compile']:.2f}x" if "kernel_speedup_vs_compile" in r else "n/a"
        lines.append(
            f"| {r['tokens']}x{r['hidden']} | {r['dtype']} | {r['mode']} | {r.get('copy_GBps', 0):.0f} | "
            f"{r.get('kernel_GBps', 0):.0f} | {r.get('kernel_fraction_of_copy', 0):.3f} | {comp} | "
            f"{r.get('kernel_speedup_vs_eager', 0):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lib",
        type=Path,
        default=os.environ.get("GPCL_KERNEL_LIB"),
        help="libgpcl_kernel.so (default: $GPCL_KERNEL_LIB, else build it with nvcc now)",
    )
    ap.add_argument("--modes", default="clamp", help="comma-separated modes (clamp,soft,hopf)")
    ap.add_argument("--tau", type=float, default=1.0, help="scalar tau")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per measurement")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--quick", action="store_true", help="two sizes only (smoke run)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path, help="write a markdown table here")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_gpcl: needs torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gpcl: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 2
    from gpcl_trt.plugins import native
    from gpcl_trt.plugins.reference import gpcl_torch

    lib = args.lib
    if lib is None:
        major, minor = torch.cuda.get_device_capability()
        lib = native.build_kernel_library(tempfile.mkdtemp(prefix="gpcl_bench_"), archs=(f"{major}{minor}",))
    kernel = native.KernelLibrary(lib)
    compiled = None
    if not args.no_compile:
        # One specialisation per (shape, dtype, mode): raise dynamo's recompile limit (default 8),
        # past which it silently falls back to eager and the comparison would be against eager.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        compiled = torch.compile(gpcl_torch, dynamic=False)
    device = torch.cuda.get_device_name()
    shapes = SHAPES[1::3] if args.quick else SHAPES
    results = []
    for mode in args.modes.split(","):
        for dtype in DTYPES:
            for tokens, hidden in shapes:
                r = bench_one(kernel, compiled, tokens, hidden, dtype, mode, args.tau, args.reps)
                results.append(r)
                print(
                    f"{tokens:>6}x{hidden:<5} {dtype:9} {mode}: kernel {r.get('kernel_GBps', 0):7.0f} GB/s "
                    f"= {r.get('kernel_fraction_of_copy', 0):.3f} of copy; vs compile "
                    f"{r.get('kernel_speedup_vs_compile', float('nan')):.2f}x",
                    file=sys.stderr,
                    flush=True,
                )
    doc = {"bench": "gpcl_kernel", "device": device, "torch": torch.__version__, "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(results, device))
    bad = [r for r in results if r["max_abs_diff_vs_reference"] > (0.02 if r["dtype"] != "float32" else 1e-5)]
    if bad:
        print(f"bench_gpcl: {len(bad)} measurement(s) disagree with the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
