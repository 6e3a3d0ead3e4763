#!/usr/bin/env python3
"""Weight-only quantization benchmark: `gpcl-trt quantize` time and peak anonymous memory, and
decode speed and peak RSS of our fp32 / int8 / int4 exports against onnxruntime-genai's
`-p int4` build of the same random-init Llama checkpoint.

    .venv/bin/python tools/bench_quantize.py --work /tmp/bq --shape 0.5b --rounds 3
    .venv/bin/python tools/bench_quantize.py --work /tmp/bq --scale 1.1b,7b   # quantize memory only
    .venv/bin/python tools/bench_quantize.py --work /tmp/bq --awq --variants "ours int4,ours int4 awq"

Decode: every measurement runs in a fresh worker process (its peak RSS is that runtime's alone),
the variants in alternating order each round; batch 1, a 128-token random prompt, 64 greedy new
tokens (no EOS), 2 threads; ratios are of medians over rounds. Ours runs our generation loop
(gpcl_trt.generate: ONNX Runtime, IOBinding, default session options: ORT fuses our block-wise
DequantizeLinear + MatMul into MatMulNBits); genai runs og.Generator on its builder's output,
from its own venv (.venv-genai; the builder itself runs in this venv from that venv's package,
as tools/bench_generate.py does).

Quantize: `gpcl-trt quantize` in its own process; tools/bench_scale.py's sampler reads the
summed VmRSS / RssAnon of the process tree every 0.1 s. --scale also quantizes Llama-shaped
checkpoints from tools/bench_scale.py (their 7B here as a sparse bf16 file: zeros, no blocks,
exported with --dtype bf16 and linked) to show that anonymous memory does not grow with the
model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_generate import SHAPES, VOCAB, checkpoint  # noqa: E402  (tools/ is on the path above)

GPCL = [
    str(Path(sys.executable).parent / "gpcl-trt")
]  # the console script (python -m gpcl_trt.cli imports itself twice)


def _genai_site(python: str) -> str:
    code = "import onnxruntime_genai, os; print(os.path.dirname(os.path.dirname(onnxruntime_genai.__file__)))"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def export(ckpt: Path, out: Path, extra: list[str] = ()) -> Path:
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*GPCL, "export", str(ckpt), "-o", str(out), "--task", "text-generation-with-past", *extra]
        subprocess.run(cmd, check=True)
    return out


def quantize(src: Path, out: Path, weights: str, block: int, extra: list[str] = ()) -> dict:
    """One `gpcl-trt quantize` run, measured (wall, peak RSS, peak RssAnon)."""
    from bench_scale import measure

    cmd = [*GPCL, "quantize", str(src), "-o", str(out), "--weights", weights, "--block-size", str(block), *extra]
    res = measure([*cmd, "--force", "--json"])
    if res["rc"]:
        raise SystemExit(f"quantize failed: {res.get('stderr_tail')}")
    j = res.pop("json")
    res.update(
        {k: j[k] for k in ("quantized", "float_bytes", "quantized_bytes", "kept_bytes", "seconds")},
        out_bytes=sum(p.stat().st_size for p in out.parent.glob(out.name + "*")),
    )
    return res


def genai_build(ckpt: Path, out: Path, precision: str, python: str, threads: int) -> dict | None:
    from bench_scale import measure

    res = None
    if not (out / "genai_config.json").is_file():
        site = _genai_site(python)
        argv = ["builder", "-i", str(ckpt), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + ".cache"]
        code = (
            f"import sys, runpy; sys.path.append({site!r}); sys.argv = {argv!r}; "
            f"runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
        )
        res = measure([sys.executable, "-c", code])
        if res["rc"]:
            raise SystemExit(f"genai builder failed: {res.get('stderr_tail')}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return res


# ----------------------------------------------------------------------------- workers
def _prompt(length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=(1, length)).astype(np.int64)


def worker_ours(model: str, length: int, new: int, threads: int, vocab: int) -> dict:
    from gpcl_trt.generate import OrtRuntime, decode

    t0 = time.perf_counter()
    rt = OrtRuntime(model, threads=threads)
    load = time.perf_counter() - t0
    prompts = _prompt(length, vocab).tolist()
    decode(rt, prompts, max_new_tokens=2)  # warm-up
    m = decode(rt, prompts, max_new_tokens=new)["measurements"]
    return {"load_s": load, "ttft_s": m["time_to_first_token_s"], "decode_tokens_per_s": m["decode_tokens_per_s"]}


def worker_genai(model: str, length: int, new: int, threads: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    m = og.Model(model)
    load = time.perf_counter() - t0
    ids = _prompt(length, vocab)

    def run(n):
        params = og.GeneratorParams(m)
        params.set_search_options(do_sample=False, max_length=length + n, min_length=length + n, batch_size=1)
        gen = og.Generator(m, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        return t1 - t0, (n - 1) / (time.perf_counter() - t1)

    run(2)
    ttft, tps = run(new)
    return {"load_s": load, "ttft_s": ttft, "decode_tokens_per_s": tps}


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def logits_report(fp32: Path, variants: dict[str, Path], length: int, vocab: int) -> dict:
    """Logits of one prefill (batch 2, ``length`` random ids, no past) of each variant against
    fp32: max and mean |diff| over all positions, top-1 agreement; MatMulNBits at accuracy level
    1 (fp32 compute: the weights' error alone) and at ORT's default 4 (int8 activations)."""
    import numpy as np
    import onnxruntime as ort

    from gpcl_trt.generate import OrtRuntime

    ids = np.random.default_rng(1).integers(3, vocab, size=(2, length)).astype(np.int64)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length), ids.shape).astype(np.int64)

    def logits(path: Path, level: str | None) -> np.ndarray:
        rt = OrtRuntime(path, threads=2)
        if level is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
            rt.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for spec in rt.past:
            feed[spec.name] = rt._empty_past(spec, 2)
        names = {i.name for i in rt.session.get_inputs()}
        return rt.session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]

    ref = logits(fp32, None)
    out = {"fp32 logits max |x|": float(np.abs(ref).max())}
    for name, path in variants.items():
        for level in ("1", None):
            got = logits(path, level)
            d = np.abs(got - ref)
            got = got.argmax(-1)
            out[f"{name} (level {level or 'default 4'})"] = {
                "max_abs_diff": float(d.max()),
                "mean_abs_diff": float(d.mean()),
                "top1_agreement": float((got == ref.argmax(-1)).mean()),
            }
            print(name, level, out[f"{name} (level {level or 'default 4'})"], file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- main
def decode_rounds(variants: dict, a) -> dict:
    runs: dict = {}
    names = list(variants)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            kind, model = variants[name]
            python = a.genai_python if kind == "genai" else sys.executable
            cmd = [python, __file__, "--worker", kind, "--model", str(model), "--shape", a.shape]
            cmd += ["--prompt", str(a.prompt), "--new", str(a.new), "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append(res)
            print(f"round {r} {name}: {res}", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    base_name = next((n for n in ("genai int4", "ours fp32") if n in med), names[0])  # --variants may drop both
    for v in med.values():
        v["decode_vs_" + base_name.replace(" ", "_")] = v["decode_tokens_per_s"] / med[base_name]["decode_tokens_per_s"]
    return {"median": med, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_quantize"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--genai-python", default=str(ROOT / ".venv-genai" / "bin" / "python"))
    ap.add_argument("--no-decode", action="store_true", help="quantize measurements only")
    ap.add_argument("--logits", action="store_true", help="also compare each variant's prefill logits with fp32")
    ap.add_argument("--requantize", action="store_true", help="quantize again (and measure) when the output exists")
    ap.add_argument(
        "--variants", default="", help="decode only these (comma list of names, e.g. 'ours int4,genai int4')"
    )
    ap.add_argument(
        "--awq", action="store_true", help="also int4 --method awq (16 sample sentences): its time, memory, decode"
    )
    ap.add_argument("--scale", default="", help="also quantize these bench_scale.py sizes (e.g. 1.1b,7b)")
    ap.add_argument("--worker", choices=["ours", "genai"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = worker_ours if a.worker == "ours" else worker_genai
        res = fn(a.model, a.prompt, a.new, a.threads, VOCAB[a.shape])
        res["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(res))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"shape": a.shape, "prompt": a.prompt, "new": a.new, "threads": a.threads, "rounds": a.rounds}
    ckpt = checkpoint(a.work, a.shape)
    fp32 = export(ckpt, a.work / f"ours_{a.shape}" / "model.onnx", ["--validate", "none"])
    variants = {"ours fp32": ("ours", fp32)}
    todo = [("int8", "int8", []), ("int4", "int4", []), ("int4 +lm_head", "int4", ["--lm-head"])]
    if a.awq:
        todo.append(("int4 awq", "int4", ["--method", "awq", "--samples", "16"]))
    for name, weights, extra in todo:
        out = a.work / f"ours_{a.shape}_{name.replace(' +', '_').replace(' ', '_')}" / "model.onnx"
        out.parent.mkdir(exist_ok=True)
        if not out.is_file() or a.requantize:
            report[f"quantize {a.shape} {name}"] = quantize(fp32, out, weights, a.block, extra)
            print(json.dumps(report[f"quantize {a.shape} {name}"]), file=sys.stderr)
        variants[f"ours {name}"] = ("ours", out)
    if Path(a.genai_python).is_file():
        g = a.work / f"genai_{a.shape}_int4"
        report["genai build int4"] = genai_build(ckpt, g, "int4", a.genai_python, a.threads)
        variants["genai int4"] = ("genai", g)
    else:
        report["genai"] = f"not run: {a.genai_python} is missing"
    if a.logits:
        ours = {k[5:]: v[1] for k, v in variants.items() if k.startswith("ours ") and k != "ours fp32"}
        report["logits"] = logits_report(fp32, ours, a.prompt, VOCAB[a.shape])
    if a.variants:
        variants = {k: v for k, v in variants.items() if k in a.variants.split(",")}
    if not a.no_decode:
        report["decode"] = decode_rounds(variants, a)
    for size in filter(None, a.scale.split(",")):
        import bench_scale

        if size == "7b":  # zeros without blocks: the memory curve, not the values
            bench_scale.SIZES["7b"] = {**bench_scale.SIZES["7b"], "sparse": True}
        d = bench_scale.generate(size, a.work / "scale")
        dtype = "bf16" if bench_scale.SIZES[size]["dtype"] == "bfloat16" else "fp32"
        src = export(d, a.work / f"scale_{size}" / "model.onnx", ["--validate", "none", "--dtype", dtype])
        out = a.work / f"scale_{size}_int4" / "model.onnx"
        out.parent.mkdir(exist_ok=True)
        report[f"quantize {size} int4"] = quantize(src, out, "int4", a.block)
        print(json.dumps(report[f"quantize {size} int4"]), file=sys.stderr)
        for p in out.parent.iterdir():  # GBs of output: measured, not kept
            p.unlink()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
