"""Generation side by side: our loop over our export (ONNX Runtime, IOBinding) against
onnxruntime-genai's builder output and its og.Generator, and Optimum's ORTModelForCausalLM, on one
random-init Llama checkpoint. ``ours_ort`` is the same loop over our export rewritten by
``gpcl-trt optimize --for ort`` (passes/fuse_ort.py: grouped attention without the repeat-KV copy,
RMSNorm in the form ORT fuses; standard ONNX), ``ours_ortc`` by ``--variant contrib`` (also ORT's
RotaryEmbedding and SkipSimplifiedLayerNormalization), ``ours_ortg`` by ``--variant contrib-gqa``
(also GroupQueryAttention). ``--ours NAME=PATH`` (repeatable) adds any other ONNX graph of ours
(an optimize output made elsewhere) as runtime NAME, run by the same loop as ``ours``.

Every measurement runs in a fresh worker process (so peak RSS is that runtime's alone), rounds
alternating the order of the runtimes; greedy, no EOS (the same number of tokens on every side),
the same random prompt ids, the same thread count. onnxruntime-genai lives in its own venv
(default .venv-genai: `python -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai`);
its model builder runs in this venv (it needs torch and transformers) from that venv's package.

``optimum``: Optimum in its own venv (``--optimum-python``, default /tmp/optimum-venv/bin/python:
`python3 -m venv /tmp/optimum-venv && /tmp/optimum-venv/bin/pip install torch 'transformers<4.58'
optimum-onnx onnxruntime`; optimum-onnx 0.1.0 needs transformers 4.x, this venv has 5.x). The
checkpoint is exported once by that venv's `optimum-cli export onnx --task
text-generation-with-past` into WORK/optimum_SHAPE; the worker loads it with
``ORTModelForCausalLM.from_pretrained(DIR, session_options=...)`` (CPU provider, intra-op threads
as the others, inter-op 1; IOBinding as Optimum defaults on CPU: off; torch's threads, for
generate's own tensor work, the same count unless ``--optimum-torch-threads``: on 2 cores the two
pools contend, and at batch 8 generate's argmax / clone / where took ~100 ms a step outside
ONNX Runtime with torch at 2 threads, ~8 ms at 1) and runs ``generate(do_sample=False, min_new_tokens=N,
max_new_tokens=N)`` after a 2-token warm-up. The times come from one generate call, timestamped by
a streamer: transformers calls ``streamer.put`` with the prompt just before it prepares the cache
and runs the prefill, then once after each token is picked. TTFT = first token's put - prompt's
put (prefill + first pick, as ours and genai's are measured); decode tokens/s = tokens after the
first, all rows, over last put - first put. (Subtracting a generate(max_new_tokens=1) call from a
generate(N) call would take two runs' noise and charge generate's setup to neither side
consistently.) ``ttft_call_s`` in the runs also counts generate's argument checks before the
prompt's put. Peak RSS is the worker's VmHWM, torch and transformers included (what a user of
ORTModelForCausalLM pays). ``--paired`` refuses ``optimum``: its venv carries its own torch,
transformers 4.x and onnxruntime install, which cannot be appended into the one paired process
beside ours (transformers 5.x) without one shadowing the other.

    .venv/bin/python tools/bench_generate.py --work /tmp/bg --shape small --batches 1,8 --rounds 3
    .venv/bin/python tools/bench_generate.py --work /tmp/bg --runtimes ours,ours_ort,ours_ortc,ours_ortg,genai --paired
    .venv/bin/python tools/bench_generate.py --work /tmp/bg --runtimes ours,optimum,genai --ours mine=/x/model.onnx

Prints one JSON object: per runtime and batch, the median time to first token (prefill + first
pick), decode tokens/s (tokens after the first, all rows, over the time after the first pick)
and peak RSS, and each runtime's ratios to genai.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # the first measurement: hidden 512, 8 layers
    "small": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2
    ),
    # Qwen2-0.5B's shape as a Llama
    "0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
}
VOCAB = {"small": 32000, "0.5b": 151936}
# runtimes run by our loop over a graph that prepare() makes; --ours NAME=PATH adds more
OURS_VARIANTS = ("ours", "ours_ort", "ours_ortc", "ours_ortg")
BUILTIN = (*OURS_VARIANTS, "optimum", "genai")


def _genai_site(python: str) -> str:
    out = subprocess.run(
        [
            python,
            "-c",
            "import onnxruntime_genai, os; print(os.path.dirname(os.path.dirname(onnxruntime_genai.__file__)))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def checkpoint(work: Path, shape: str) -> Path:
    """The random-init Llama checkpoint of ``shape`` with a 3-word WordLevel tokenizer, made once
    under ``work`` (shared with tools/bench_quantize.py and tools/bench_serve_generate.py)."""
    ckpt = work / f"ckpt_{shape}"
    if not (ckpt / "config.json").is_file():
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        cfg = LlamaConfig(
            vocab_size=VOCAB[shape], max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[shape]
        )
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).eval().save_pretrained(ckpt)
        tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        ).save_pretrained(ckpt)
    return ckpt


def prepare(
    work: Path, shape: str, genai_python: str, threads: int, names=OURS_VARIANTS, optimum_python: str = ""
) -> dict:
    """The checkpoint, our export, genai's build and, where ``names`` asks for them, our
    optimize variants and Optimum's export (each made once)."""
    ckpt, ours, genai = work / f"ckpt_{shape}", work / f"ours_{shape}" / "model.onnx", work / f"genai_{shape}"
    checkpoint(work, shape)
    if not ours.is_file() and set(names) & set(OURS_VARIANTS):
        from gpcl_trt.exporter import export_model

        ours.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        res = export_model(ckpt, ours, task="text-generation-with-past")
        assert res["ok"], res
        print(f"exported ours in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not (genai / "genai_config.json").is_file():
        site = _genai_site(genai_python)
        argv = ["builder", "-i", str(ckpt), "-o", str(genai), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")]
        code = (  # appended: this venv's numpy and onnxruntime stay first on the path
            f"import sys, runpy; sys.path.append({site!r}); sys.argv = {argv!r}; "
            f"runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
        )
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=sys.stderr)  # stdout: the result only
        print(f"built genai in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cfg_path = genai / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=4))
    out = {"ckpt": ckpt, "ours": ours, "genai": genai, "optimum": work / f"optimum_{shape}"}
    for name, variant in (("ours_ort", "standard"), ("ours_ortc", "contrib"), ("ours_ortg", "contrib-gqa")):
        out[name] = ours.with_name(f"model_{name[5:]}.onnx")
        if name in names and not out[name].is_file():
            from gpcl_trt.passes.fuse_ort import optimize_file

            t = time.perf_counter()
            optimize_file(ours, out[name], variant=variant)
            print(f"optimized ours for ort ({variant}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if "optimum" in names and not (out["optimum"] / "model.onnx").is_file():
        from gpcl_trt.common import atomic_dir

        # optimum-cli run by the Optimum venv's python (its transformers 4.x reads this checkpoint's config)
        code = (
            "import sys; from optimum.commands.optimum_cli import main; sys.argv[0] = 'optimum-cli'; sys.exit(main())"
        )
        t = time.perf_counter()
        with atomic_dir(out["optimum"], force=True) as tmp:
            cmd = [optimum_python, "-c", code, "export", "onnx", "--model", str(ckpt)]
            cmd += ["--task", "text-generation-with-past", str(tmp)]
            subprocess.run(cmd, check=True, stdout=sys.stderr, env={**os.environ, "PYTHONPATH": ""})
        print(f"exported optimum in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def _prompt(batch: int, length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=(batch, length)).astype(np.int64)


def worker_ours(model: str, batch: int, length: int, new: int, threads: int, vocab: int) -> dict:
    from gpcl_trt.generate import OrtRuntime, decode

    rt = OrtRuntime(model, threads=threads)
    prompts = _prompt(batch, length, vocab).tolist()
    decode(rt, prompts[:1], max_new_tokens=2)  # warm-up: first-run allocations
    m = decode(rt, prompts, max_new_tokens=new)["measurements"]
    assert m["new_tokens"] == batch * new
    return {"ttft_s": m["time_to_first_token_s"], "decode_tokens_per_s": m["decode_tokens_per_s"]}


def worker_genai(model: str, batch: int, length: int, new: int, threads: int, vocab: int) -> dict:
    import onnxruntime_genai as og

    m = og.Model(model)
    ids = _prompt(batch, length, vocab)

    def run(rows, n):
        params = og.GeneratorParams(m)
        params.set_search_options(do_sample=False, max_length=length + n, min_length=length + n, batch_size=len(rows))
        gen = og.Generator(m, params)
        t0 = time.perf_counter()
        gen.append_tokens(rows)
        gen.generate_next_token()
        t1 = time.perf_counter()
        steps = 1
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        assert steps == n, steps
        return t1 - t0, len(rows) * (n - 1) / (t2 - t1)

    run(ids[:1], 2)  # warm-up
    ttft, tps = run(ids, new)
    return {"ttft_s": ttft, "decode_tokens_per_s": tps}


def worker_optimum(
    model: str, batch: int, length: int, new: int, threads: int, vocab: int, torch_threads: int | None = None
) -> dict:
    """ORTModelForCausalLM.generate, timed by a streamer (module docstring: why this method)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(torch_threads or threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    m = ORTModelForCausalLM.from_pretrained(model, session_options=opts)

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value) -> None:  # the prompt once, then each step's picked tokens
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = torch.from_numpy(_prompt(batch, length, vocab))

    def run(rows, n):
        stamps = Stamps()
        t_call = time.perf_counter()
        out = m.generate(
            input_ids=rows,
            attention_mask=torch.ones_like(rows),
            do_sample=False,
            num_beams=1,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=0,
            streamer=stamps,
        )
        assert tuple(out.shape) == (rows.shape[0], rows.shape[1] + n) and len(stamps.t) == n + 1, (out.shape, stamps.t)
        t = stamps.t
        return t[1] - t[0], rows.shape[0] * (n - 1) / (t[-1] - t[1]), t[1] - t_call

    run(ids[:1], 2)  # warm-up
    ttft, tps, ttft_call = run(ids, new)
    return {"ttft_s": ttft, "decode_tokens_per_s": tps, "ttft_call_s": ttft_call}


def worker_paired(
    models: dict, batch: int, length: int, new: int, threads: int, vocab: int, rounds: int, ours_site: str
) -> dict:
    """Every runtime loaded in this one process (the genai venv, with our venv's packages appended
    to its path: one onnxruntime), runs alternating back to back, ``rounds`` times: each pair of
    runs sees the same machine load, which on a shared box moves by several x within a minute.
    No peak RSS here (one process holds them all)."""
    import site

    site.addsitedir(ours_site)
    import onnxruntime_genai as og

    from gpcl_trt.generate import OrtRuntime, decode

    ids = _prompt(batch, length, vocab)
    runners = {}
    for name, path in models.items():
        if name == "genai":
            m = og.Model(path)

            def run_genai(rows, n, m=m):
                params = og.GeneratorParams(m)
                params.set_search_options(
                    do_sample=False, max_length=length + n, min_length=length + n, batch_size=len(rows)
                )
                gen = og.Generator(m, params)
                t0 = time.perf_counter()
                gen.append_tokens(rows)
                gen.generate_next_token()
                t1 = time.perf_counter()
                while not gen.is_done():
                    gen.generate_next_token()
                t2 = time.perf_counter()
                return t1 - t0, len(rows) * (n - 1) / (t2 - t1)

            runners[name] = run_genai
        else:
            rt = OrtRuntime(path, threads=threads)

            def run_ours(rows, n, rt=rt):
                meas = decode(rt, rows.tolist(), max_new_tokens=n)["measurements"]
                return meas["time_to_first_token_s"], meas["decode_tokens_per_s"]

            runners[name] = run_ours
    for run in runners.values():
        run(ids[:1], 2)  # warm-up
    runs: dict = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in order[:: 1 if r % 2 == 0 else -1]:
            ttft, tps = runners[name](ids, new)
            runs[name].append({"ttft_s": ttft, "decode_tokens_per_s": tps})
    return runs


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM belongs to the address space exec made (ru_maxrss would
    carry over the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ours_graphs(ap: argparse.ArgumentParser, specs: list) -> dict:
    """--ours NAME=PATH values as {NAME: absolute PATH}; a bad one is a usage error."""
    out: dict = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            ap.error(f"--ours {spec!r}: expected NAME=PATH")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in BUILTIN or name in out:
            ap.error(f"--ours {spec!r}: NAME must be letters, digits, _ . - and not a built-in or repeated name")
        if not Path(path).is_file():
            ap.error(f"--ours {spec!r}: {path} is not a file")
        out[name] = Path(path).resolve()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_generate"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai-python", default=str(ROOT / ".venv-genai" / "bin" / "python"))
    ap.add_argument(
        "--optimum-python",
        default="/tmp/optimum-venv/bin/python",
        help="the python of a venv with optimum-onnx (transformers 4.x) for the optimum runtime",
    )
    ap.add_argument(
        "--optimum-torch-threads",
        type=int,
        help="torch's threads in the optimum worker (generate's logits work); default --threads, as torch's own "
        "default is the core count. On 2 cores, torch's and ONNX Runtime's pools of 2 each contend at batch 8",
    )
    ap.add_argument(
        "--runtimes",
        default="ours,ours_ort,ours_ortc,ours_ortg,genai",
        help="comma list of ours (the export as it is), ours_ort (optimize --for ort), ours_ortc (--variant "
        "contrib), ours_ortg (--variant contrib-gqa), optimum (ORTModelForCausalLM over Optimum's export), "
        "genai (required), and NAMEs given by --ours",
    )
    ap.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run our loop over the ONNX graph PATH as runtime NAME (repeatable; added to --runtimes "
        "where not listed there)",
    )
    ap.add_argument(
        "--paired",
        action="store_true",
        help="all runtimes in one process (the genai venv with ours appended), runs alternating back to back; "
        "ratios per pair (robust to a shared machine's load; no peak RSS); not with optimum (its own venv)",
    )
    ap.add_argument("--worker", choices=["ours", "genai", "optimum", "paired"], help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    ap.add_argument("--ours-site", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "paired":
        res = worker_paired(
            json.loads(a.models), int(a.batches), a.prompt, a.new, a.threads, VOCAB[a.shape], a.rounds, a.ours_site
        )
        print(json.dumps(res))
        return
    if a.worker:
        fn = {"ours": worker_ours, "genai": worker_genai, "optimum": worker_optimum}[a.worker]
        kw = {"torch_threads": a.optimum_torch_threads} if a.worker == "optimum" else {}
        res = fn(a.model, int(a.batches), a.prompt, a.new, a.threads, VOCAB[a.shape], **kw)
        res["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(res))
        return
    names = [n.strip() for n in a.runtimes.split(",") if n.strip()]
    extra = _ours_graphs(ap, a.ours)
    names += [n for n in extra if n not in names]
    if "genai" not in names or not set(names) <= {*BUILTIN, *extra} or len(set(names)) != len(names):
        ap.error(f"--runtimes: a comma list without repeats of {', '.join(BUILTIN)} and --ours NAMEs, with genai")
    if a.paired and "optimum" in names:
        ap.error(
            "--paired: optimum runs in its own venv (torch, transformers 4.x, onnxruntime) and cannot join "
            "the paired process; leave it out of --runtimes or drop --paired"
        )
    if "optimum" in names and not os.access(a.optimum_python, os.X_OK):
        ap.error(f"--optimum-python: {a.optimum_python} is not an executable (make the venv: see --help's module doc)")
    a.work.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]  # the 1-minute load around the runs: other work on a shared box
    paths = {**prepare(a.work, a.shape, a.genai_python, a.threads, names, a.optimum_python), **extra}
    runs: dict = {}
    pythons = {"genai": a.genai_python, "optimum": a.optimum_python}
    sides = [(n, pythons.get(n, sys.executable), paths[n]) for n in names]
    if a.paired:
        import sysconfig

        for batch in [int(b) for b in a.batches.split(",")]:
            cmd = [a.genai_python, __file__, "--worker", "paired", "--shape", a.shape, "--batches", str(batch)]
            cmd += ["--models", json.dumps({n: str(paths[n]) for n in names}), "--rounds", str(a.rounds)]
            cmd += ["--prompt", str(a.prompt), "--new", str(a.new), "--threads", str(a.threads)]
            cmd += ["--ours-site", sysconfig.get_paths()["purelib"]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
            for name, res in json.loads(out.stdout.strip().splitlines()[-1]).items():
                runs[f"{name}/b{batch}"] = [{**x, "peak_rss_mb": float("nan")} for x in res]
                print(f"batch {batch} {name}: {res}", file=sys.stderr)
    for r in range(0 if a.paired else a.rounds):
        for batch in [int(b) for b in a.batches.split(",")]:
            for name, python, model in sides[:: 1 if r % 2 == 0 else -1]:
                worker = name if name in ("genai", "optimum") else "ours"
                cmd = [python, __file__, "--worker", worker, "--model", str(model), "--shape", a.shape]
                cmd += ["--batches", str(batch), "--prompt", str(a.prompt), "--new", str(a.new)]
                cmd += [
                    "--threads",
                    str(a.threads),
                    "--optimum-torch-threads",
                    str(a.optimum_torch_threads or a.threads),
                ]
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
                )
                res = {**json.loads(out.stdout.strip().splitlines()[-1]), "load_1min": os.getloadavg()[0]}
                runs.setdefault(f"{name}/b{batch}", []).append(res)
                print(f"round {r} {name} batch {batch}: {res}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    summary = {
        k: {m: statistics.median(x[m] for x in v) for m in ("ttft_s", "decode_tokens_per_s", "peak_rss_mb")}
        for k, v in runs.items()
    }
    ratios = {}
    for name in (n for n in names if n != "genai"):
        for batch in a.batches.split(","):
            o, g = summary[f"{name}/b{batch}"], summary[f"genai/b{batch}"]
            ratios[f"{name}/b{batch}"] = {
                "decode_tokens_per_s": o["decode_tokens_per_s"] / g["decode_tokens_per_s"],
                "ttft": o["ttft_s"] / g["ttft_s"],
                "peak_rss": o["peak_rss_mb"] / g["peak_rss_mb"],
            }
    # per-round ratios (each round runs both sides back to back): the spread shows the noise
    per_round = {
        f"{name}/b{batch}": [
            x["decode_tokens_per_s"] / y["decode_tokens_per_s"]
            for x, y in zip(runs[f"{name}/b{batch}"], runs[f"genai/b{batch}"])
        ]
        for name in names
        if name != "genai"
        for batch in a.batches.split(",")
    }
    median_pair = {k: statistics.median(v) for k, v in per_round.items()}
    print(
        json.dumps(
            {
                "shape": a.shape,
                "load_1min_before_after": load,
                "paired": a.paired,
                "decode_ratio_median_of_pairs": median_pair,
                "prompt": a.prompt,
                "new": a.new,
                "threads": a.threads,
                "optimum_torch_threads": (a.optimum_torch_threads or a.threads) if "optimum" in names else None,
                "rounds": a.rounds,
                "median": summary,
                "over_genai": ratios,
                "decode_ratio_per_round": per_round,
                "runs": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
