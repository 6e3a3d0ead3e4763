"""The pipeline's summary: one dict (summary.json), a Markdown report (report.md) and a rich
table on stderr. Reads the stage results defensively: a skipped stage leaves its rows empty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpcl_trt.common import write_json_atomic, write_text_atomic


def _tau_range(sites: list[dict]) -> tuple[float | None, float | None]:
    values: list[float] = []
    for s in sites:
        t = s.get("tau")
        if isinstance(t, (int, float)):
            values.append(float(t))
        elif isinstance(t, list) and t:
            values += [float(v) for v in t]
        elif isinstance(t, dict):  # {"min":..., "max":...} style
            values += [float(v) for k, v in t.items() if k in ("min", "max") and isinstance(v, (int, float))]
    return (min(values), max(values)) if values else (None, None)


def _accuracy(diff: dict) -> dict[str, Any]:
    if diff.get("graphs"):  # an encoder-decoder: both graphs' outputs, one verdict
        graphs = diff["graphs"]
        outputs = {f"{g}:{k}": o for g, d in graphs.items() for k, o in (d.get("outputs") or {}).items()}
        tolerances = next((d.get("tolerances") for d in graphs.values() if d.get("tolerances")), None)
        diff = {**diff, "outputs": outputs, "tolerances": tolerances}
    outputs = diff.get("outputs") or {}
    if not outputs:
        return {}
    return {
        "passed": diff.get("ok"),
        "max_abs": max(o.get("max_abs", 0.0) for o in outputs.values()),
        "min_cosine": min((o["cosine"] for o in outputs.values() if o.get("cosine") is not None), default=None),
        "atol": (diff.get("tolerances") or {}).get("atol"),
        "summary": diff.get("summary"),
    }


def _quantize(q: dict) -> dict[str, Any]:
    """What [quantize] did; empty when the stage was not part of the run."""
    if not q:
        return {}
    keys = ("weights", "block_size", "symmetric", "method", "lm_head", "quantized", "float_bytes", "quantized_bytes")
    return {k: q.get(k) for k in keys}


def _optimize(o: dict, agreement: dict | None) -> dict[str, Any]:
    """What [optimize] wrote, and its greedy agreement with the GPCL graph (diff); empty without it."""
    if not o:
        return {}
    keys = ("output", "variant", "logits", "kv_cache", "nodes_before", "nodes_after")
    return {**{k: o.get(k) for k in keys}, "generation": agreement}


def summarize(ctx, statuses: dict[str, str], timings: dict[str, float], total_s: float) -> dict[str, Any]:
    r = ctx.results
    export, insert, build = r.get("export", {}), r.get("insert", {}), r.get("build", {})
    serve, triton = r.get("serve", {}), r.get("triton", {})
    sites = insert.get("sites") or []
    tau_min, tau_max = _tau_range(sites)
    # A skipped build may have left an older engine behind: it is not this run's.
    engine = ctx.path("model_gpcl.engine") if "build" in statuses and "build" not in ctx.skip else Path("/nonexistent")
    engines = [engine]
    if getattr(ctx, "seq2seq", False) and engine.name != "nonexistent":  # one engine per graph
        engines = [ctx.graph("engine", g) for g in ("encoder", "decoder")]
        engines = engines if all(e.is_file() for e in engines) else [Path("/nonexistent")]
        graphs = (build.get("graphs") or {}).values()
        build = {**build, "build_seconds": sum(g.get("build_seconds") or 0 for g in graphs) or None}
    load = serve.get("load") or {}
    checks = {
        "accuracy": r.get("diff", {}).get("ok") if "diff" in r else None,
        "served": serve.get("ok") if serve else None,
    }
    return {
        "ok": all(v is not False for v in checks.values()),
        "model_dir": str(ctx.model_dir),
        "out_dir": str(ctx.out),
        "architecture": export.get("architecture"),
        "task": export.get("task"),
        "quantize": _quantize(r.get("quantize", {})),
        "optimize": _optimize(r.get("optimize", {}), r.get("diff", {}).get("optimized")),
        "stages": {name: {"status": st, "seconds": timings.get(name)} for name, st in statuses.items()},
        "sites": {
            "inserted": insert.get("inserted"),
            "mode": insert.get("mode"),
            "tau_min": tau_min,
            "tau_max": tau_max,
            "names": [s.get("gpcl") or s.get("key") for s in sites],
        },
        "engine": {
            "path": ", ".join(str(e) for e in engines) if engines[0].is_file() else None,
            "size_bytes": sum(e.stat().st_size for e in engines) if engines[0].is_file() else None,
            "build_s": build.get("build_seconds", timings.get("build")),
            "backend": build.get("backend"),
            "precision": build.get("precision"),
            "gpcl": (build.get("gpcl") or {}).get("implementation")
            if isinstance(build.get("gpcl"), dict)
            else build.get("gpcl"),
        },
        "accuracy": _accuracy(r.get("diff", {})),
        "generation": r.get("diff", {}).get("generation"),
        "triton": {"repo": triton.get("repo"), "entries": triton.get("entries")},
        "served": {
            "ok": serve.get("ok"),
            "http_max_abs_diff": serve.get("http_max_abs_diff"),
            "grpc_max_abs_diff": serve.get("grpc_max_abs_diff"),
            "requests": load.get("requests"),
            "completed": load.get("completed"),
            "errors": load.get("errors"),
            "throughput_rps": load.get("throughput_rps"),
            "latency_ms": load.get("latency_ms"),
            "error": serve.get("error"),
        }
        if serve
        else {},
        "checks": checks,
        "total_s": total_s,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _generation_row(g: dict | None) -> list[tuple[str, str]]:
    """Decoders: greedy agreement and NLL of the GPCL model against the reference (gpcl-trt eval)."""
    if not g:
        return []
    if "skipped" in g:
        return [("generation", f"- ({g['skipped']})")]
    div = g.get("mean_first_divergence")
    return [
        (
            "generation",
            f"greedy agreement {_fmt(g['greedy_agreement'])} over {g['prompts']} prompts x {g['max_new_tokens']} "
            f"tokens (first divergence {'none' if div is None else _fmt(div)}); NLL {_fmt(g['reference_nll'])} -> "
            f"{_fmt(g['candidate_nll'])}",
        )
    ]


def _quantize_row(q: dict | None) -> list[tuple[str, str]]:
    if not q:
        return []
    mib = "-"
    if q.get("float_bytes") and q.get("quantized_bytes") is not None:
        mib = f"{q['float_bytes'] / 2**20:.2f} -> {q['quantized_bytes'] / 2**20:.2f} MiB"
    return [
        (
            "quantized weights",
            f"{_fmt(q['weights'])}, block {_fmt(q['block_size'])}, "
            f"{'symmetric' if q.get('symmetric') else 'asymmetric'} ({_fmt(q.get('method'))}): "
            f"{_fmt(q.get('quantized'))} projections, {mib}",
        )
    ]


def _optimize_row(o: dict | None) -> list[tuple[str, str]]:
    if not o:
        return []
    g = o.get("generation") or {}
    agree = (
        f"- ({g['skipped']})"
        if "skipped" in g
        else f"greedy agreement {_fmt(g['greedy_agreement'])} with the GPCL graph over {g['prompts']} prompts"
        if g
        else "- (diff not run)"
    )
    return [
        (
            "optimized for ORT",
            f"{o.get('variant')}, logits {o.get('logits')}: {_fmt(o.get('nodes_before'))} -> "
            f"{_fmt(o.get('nodes_after'))} nodes; {agree}",
        )
    ]


def rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    s, e, a, v = summary["sites"], summary["engine"], summary["accuracy"], summary["served"]
    mb = f"{e['size_bytes'] / 2**20:.1f} MiB" if e.get("size_bytes") else ""
    out = [
        ("model", f"{summary['model_dir']} ({_fmt(summary['architecture'])}, {_fmt(summary['task'])})"),
        *_quantize_row(summary.get("quantize")),
        ("GPCL sites", f"{len(s['inserted'] or [])} ({_fmt(s['mode'])})"),
        ("tau", f"{_fmt(s['tau_min'])} .. {_fmt(s['tau_max'])}"),
        (
            "engine",
            f"{mb}, built in {_fmt(e['build_s'])} s ({_fmt(e['backend'])}, {_fmt(e['precision'])}, GPCL "
            f"{_fmt(e['gpcl'])})"
            if e.get("size_bytes")
            else "- (not built)",
        ),
        (
            "accuracy",
            f"{'PASS' if a.get('passed') else 'FAIL' if a else '-'}: max abs {_fmt(a.get('max_abs'))}, "
            f"min cosine {_fmt(a.get('min_cosine'))} (atol {_fmt(a.get('atol'))})"
            if a
            else "-",
        ),
        (
            "served (python backend)",
            (
                f"{'ok' if v.get('ok') else 'FAILED'}: HTTP/gRPC max diff {_fmt(v.get('http_max_abs_diff'))}/"
                f"{_fmt(v.get('grpc_max_abs_diff'))}, {_fmt(v.get('completed'))}/{_fmt(v.get('requests'))} requests, "
                f"{_fmt(v.get('errors'))} errors, {_fmt(v.get('throughput_rps'))} req/s"
                + (f" ({v['error']})" if v.get("error") else "")
            )
            if v
            else "-",
        ),
        *_generation_row(summary.get("generation")),
        *_optimize_row(summary.get("optimize")),
        ("stages", ", ".join(f"{k} {d['status']}" for k, d in summary["stages"].items())),
        ("total", f"{summary['total_s']:.1f} s"),
    ]
    return out


def report_md(summary: dict[str, Any]) -> str:
    lines = [
        "# gpcl-trt pipeline report",
        "",
        f"**{'OK' if summary['ok'] else 'CHECK FAILED'}**",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows(summary)]
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {k} | {d['status']} | {_fmt(d['seconds'])} |" for k, d in summary["stages"].items()]
    if summary["accuracy"].get("summary"):
        lines += [
            "",
            "## Accuracy",
            "",
            summary["accuracy"]["summary"],
            "",
            "Reference: the Hugging Face model in PyTorch (or the input ONNX model); candidate: the GPCL ONNX "
            "model in ONNX Runtime"
            + (", made from the weight-quantized model (model_q.onnx)" if summary.get("quantize") else "")
            + ". Details and site statistics: `accuracy/report.md`.",
        ]
    if summary["sites"]["names"]:
        lines += ["", "## GPCL sites", ""] + [f"- `{n}`" for n in summary["sites"]["names"]]
    lines += [
        "",
        "The engine itself is not run here (no GPU); the served model is the GPCL ONNX model behind "
        "Triton's python backend, compared with ONNX Runtime over HTTP and gRPC.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    from gpcl_trt.progress import console

    write_json_atomic(out / "summary.json", summary, force=True)
    write_text_atomic(out / "report.md", report_md(summary), force=True)
    table = Table(title=f"gpcl-trt pipeline: {'OK' if summary['ok'] else 'CHECK FAILED'}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows(summary):
        table.add_row(k, v)
    console.print(table)
    console.print(f"summary: {out / 'summary.json'}, report: {out / 'report.md'}")
