#!/usr/bin/env python3
"""Scale benchmark: Llama-shaped checkpoints of 0.25B to 70B parameters, generated here without
ever holding a model in memory, and the wall time, peak RSS and peak anonymous RSS of
`gpcl-trt export` (default validation), `insert` and `build` on each, plus the extra disk blocks
of the outputs.

    python tools/bench_scale.py --sizes 0.25b,1.1b --work /tmp/scale          # real random weights
    python tools/bench_scale.py --sizes 7b --work /tmp/scale --dtype fp16     # bf16 checkpoint, fp16 export
    python tools/bench_scale.py --sizes 70b --work /tmp/scale --validate none --steps export
    python tools/bench_scale.py --generate-only --sizes 0.25b --work /tmp/scale
    python tools/bench_scale.py --sizes 0.25b,1.1b --steps export --optimum-venv /tmp/optimum-venv  # side by side

Checkpoints (``generate``): the model is built on the ``meta`` device only for its parameter
names and shapes; the safetensors shards (``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``, at most 5 GB each, as save_pretrained writes them) are written
tensor by tensor, the random values one 16M-element chunk at a time (normal, std 0.02; norms 1).
0.25B and 1.1B are fp32, 7B bf16, and the 70B shape bf16 with shards that are sparse files of
zeros (apparent size ~140 GB, no blocks): that one exists for the memory/time curve only.

Measurements (``measure``): each command runs in its own process group; a sampler reads
/proc/<pid>/status of every process in the tree every 0.1 s and records the peak of the summed
VmRSS and of the summed RssAnon; wall time from the parent. Extra disk: st_blocks of the outputs
whose link count is 1 (a hard link to the checkpoint costs no blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 5 * 10**9
CHUNK = 16 << 20  # elements

SIZES = {  # Llama-shaped configs (TinyLlama 1.1B, Llama-2 7B/70B; 0.25B a small sibling)
    "0.25b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        dtype="float32",
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        dtype="float32",
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        dtype="bfloat16",
    ),
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        dtype="bfloat16",
        sparse=True,
    ),
}
ST = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


# ----------------------------------------------------------------------------- checkpoints
def _config(size: str) -> dict:
    spec = dict(SIZES[size])
    spec.pop("sparse", None)
    dtype = spec.pop("dtype")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **spec,
    }


def _shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the HF model, from a build on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items() if not n.endswith("inv_freq")]


def _fill(f, n: int, dtype: str, norm: bool, rng) -> None:
    import numpy as np

    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        if norm:
            a = np.ones(k, np.float32)
        else:
            a = rng.standard_normal(k, dtype=np.float32)
            a *= 0.02
        if dtype == "bfloat16":
            f.write((a.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # truncation is fine for random data
        elif dtype == "float16":
            f.write(a.astype(np.float16).tobytes())
        else:
            f.write(a.tobytes())
        done += k


def generate(size: str, out: Path) -> Path:
    """Write config.json and the safetensors shards of ``size`` under ``out`` (skipped when
    already complete). Never holds more than one chunk of values."""
    import numpy as np

    d = out / f"llama-{size}"
    if (d / ".complete").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    config = _config(size)
    dtype = config["torch_dtype"]
    code, item = ST[dtype]
    sparse = SIZES[size].get("sparse", False)
    tensors = _shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * item
        if acc and acc + nbytes > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append((name, shape))
        acc += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = math.prod(shape) * item
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        t0 = time.perf_counter()
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            if sparse:
                f.truncate(8 + len(raw) + pos)  # a hole: zeros without blocks
            else:
                for name, shape in shard:
                    _fill(f, math.prod(shape), dtype, name.endswith("norm.weight"), rng)
        total += pos
        print(f"  {fname}: {pos / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    if len(shards) > 1:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (d / ".complete").write_text(str(total))
    return d


# ----------------------------------------------------------------------------- measuring
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _status(pid: int) -> tuple[int, int]:
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; sample the summed VmRSS / RssAnon of its process tree every 0.1 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    peak = {"rss": 0, "anon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            tot_rss = tot_anon = 0
            for p in _tree(proc.pid):
                r, a = _status(p)
                tot_rss += r
                tot_anon += a
            peak["rss"] = max(peak["rss"], tot_rss)
            peak["anon"] = max(peak["anon"], tot_anon)
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    result = {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak["rss"] / 1e9, 2),
        "peak_anon_gb": round(peak["anon"] / 1e9, 2),
    }
    try:
        result["json"] = json.loads(stdout)
    except json.JSONDecodeError:
        result["stdout_tail"] = stdout[-2000:]
    if proc.returncode:
        result["stderr_tail"] = stderr[-2000:]
    return result


def extra_disk(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            st = p.stat()
            if st.st_nlink == 1:
                total += st.st_blocks * 512
    return total


def outputs_of(onnx_path: Path) -> list[Path]:
    d = onnx_path.parent
    return [p for p in d.iterdir() if p.name.startswith(onnx_path.name)] + [onnx_path.with_suffix(".manifest.json")]


def run_size(size: str, work: Path, args) -> dict:
    print(f"== {size}", file=sys.stderr)
    t0 = time.perf_counter()
    model_dir = generate(size, work / "ckpt")
    gen_s = time.perf_counter() - t0
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    out = work / f"out-{size}"
    out.mkdir(parents=True, exist_ok=True)
    gpcl = [str(Path(sys.executable).parent / "gpcl-trt")]
    row = {
        "size": size,
        "weights_gb": round(weights / 1e9, 2),
        "checkpoint_dtype": SIZES[size]["dtype"],
        "generate_s": round(gen_s, 1),
    }
    onnx_path = out / "model.onnx"
    if args.optimum_venv and "export" in args.steps:
        # Optimum first: its export reads the checkpoint cold or warm just as ours does next.
        cli = args.optimum_venv / "bin" / "optimum-cli"
        if not cli.is_file():
            raise SystemExit(
                f"{cli} not found; install optimum-onnx in {args.optimum_venv} (see tools/bench_export.py)"
            )
        r = measure([str(cli), "export", "onnx", "--model", str(model_dir), "--task", args.task, str(out / "optimum")])
        row["optimum"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "rc")}
        if r["rc"]:
            row["optimum"]["error"] = (r.get("stderr_tail") or "")[-600:]
    if "export" in args.steps:
        cmd = gpcl + [
            "export",
            str(model_dir),
            "-o",
            str(onnx_path),
            "--task",
            args.task,
            "--dtype",
            args.dtype,
            "--force",
            "--json",
        ]
        if args.validate:
            cmd += ["--validate", args.validate]
        if args.memory_budget:
            cmd += ["--memory-budget", args.memory_budget]
        if args.external_data:
            cmd += ["--external-data", args.external_data]
        if args.trace_layers:
            cmd += ["--trace-layers", args.trace_layers]
        r = measure(cmd)
        res = r.get("json") or {}
        row["export"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "rc")}
        row["export"]["validation"] = (res.get("validation") or {}).get("mode")
        for key in ("max_abs_diff", "tolerance_used", "tolerance_used_per_output", "rule"):
            row["export"][key] = (res.get("validation") or {}).get(key)
        row["export"]["weights"] = {
            k: v for k, v in (res.get("weights") or {}).items() if k in ("layout", "links", "converted_bytes", "layers")
        }
        if row.get("optimum", {}).get("rc") == 0 and r["rc"] == 0:
            row["export"]["vs_optimum"] = {
                k: round(r[k] / row["optimum"][k], 3) for k in ("wall_s", "peak_rss_gb", "peak_anon_gb")
            }
        row["export"]["extra_disk_gb"] = round(extra_disk(outputs_of(onnx_path)) / 1e9, 3)
        if r["rc"] not in (0,):
            row["export"]["error"] = (r.get("stderr_tail") or "")[-600:]
    if "insert" in args.steps and onnx_path.exists():
        g = out / "gpcl.onnx"
        r = measure(gpcl + ["insert", str(onnx_path), "-o", str(g), "--tau", "8", "--force", "--json"])
        row["insert"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "rc")}
        row["insert"]["extra_disk_gb"] = round(extra_disk(outputs_of(g)) / 1e9, 3)
        if r["rc"]:
            row["insert"]["error"] = (r.get("stderr_tail") or "")[-600:]
    if "build" in args.steps and (out / "gpcl.onnx").exists():
        e = out / "gpcl.engine"
        r = measure(gpcl + ["build", str(out / "gpcl.onnx"), "-o", str(e), "--force", "--json"])
        row["build"] = {k: r[k] for k in ("wall_s", "peak_rss_gb", "peak_anon_gb", "rc")}
        if r["rc"]:
            row["build"]["error"] = (r.get("stderr_tail") or "")[-600:]
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25b,1.1b", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpcl_scale"), help="checkpoints and outputs go here")
    ap.add_argument("--steps", default="export,insert,build", help="comma list of export, insert, build")
    ap.add_argument("--task", default="text-generation-with-past")
    ap.add_argument("--dtype", default="fp32", help="export dtype (fp32, fp16)")
    ap.add_argument("--validate", default=None, help="full|layers|none (default: the exporter's default)")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--trace-layers", default=None, help="export --trace-layers (auto|replicate|all)")
    ap.add_argument(
        "--optimum-venv",
        type=Path,
        default=None,
        help="also run optimum-cli export onnx from this venv (transformers<4.58) on each checkpoint, before ours",
    )
    ap.add_argument(
        "--external-data",
        default=None,
        help="auto|link|copy|inline (insert reads weights with onnx.load, which refuses hard links)",
    )
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = ap.parse_args()
    args.steps = set(args.steps.split(","))
    rows = []
    for size in args.sizes.split(","):
        if args.generate_only:
            print(generate(size, args.work / "ckpt"))
            continue
        rows.append(run_size(size, args.work, args))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
