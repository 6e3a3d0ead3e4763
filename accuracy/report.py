"""Report directories: report.md (tables), report.json (the result dict) and PNG plots
(matplotlib, Agg backend: no display needed). Written to a temporary directory and renamed
into place when complete."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gpcl_trt.common import atomic_dir, to_json


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return "0" if v == 0 else (f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}")
    return "" if v is None else str(v)


def md_table(rows: list[dict], columns: Iterable[str]) -> str:
    cols = [c for c in columns if any(c in r for r in rows)]
    if not rows or not cols:
        return "_(none)_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def dump_json(obj: Any, path: Path) -> None:
    path.write_text(to_json(obj, indent=2) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- plots
def plot_layer_errors(layers: list[dict], atol: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [str(g["layer"]) for g in layers]
    vals = [max(g["max_abs"], 1e-12) for g in layers]
    ax.bar(labels, vals, color=["tab:red" if g["failing"] else "tab:blue" for g in layers])
    ax.axhline(atol, color="k", ls="--", lw=1, label=f"atol {atol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max abs error")
    ax.set_title("Error per layer (red: out of tolerance)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_radii(radii: dict[str, np.ndarray], taus: dict[str, np.ndarray], path: Path, title: str) -> None:
    """One histogram per GPCL site of the group radius |q| before GPCL, with tau marked."""
    plt = _plt()
    n = len(radii)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (site, r) in zip(axes.ravel(), radii.items()):
        counts, edges = np.histogram(r, bins=60)  # stairs: far cheaper to draw than hist bars
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        ax.set_yscale("symlog", linthresh=1)
        tau = np.asarray(taus[site])
        t = float(np.max(tau))
        if np.isfinite(t) and t < 10 * max(float(r.max()), 1e-12):
            ax.axvline(t, color="tab:red", lw=1.5, label=f"tau {t:.3g}" + (" (max)" if tau.ndim else ""))
            ax.legend(fontsize=7)
        else:
            ax.set_title(f"tau {t:.3g} off scale", fontsize=7, loc="right")
        ax.set_xlabel("|q|", fontsize=8)
        ax.set_title(site, fontsize=8, loc="left")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.subplots_adjust(hspace=0.6, wspace=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- diff
def write_diff_report(result: dict, extras: dict, out: Path, force: bool = False) -> Path:
    with atomic_dir(out, force=force) as tmp:
        md = [
            f"# Accuracy diff\n\n**{result['summary']}**\n",
            f"- reference: `{result['reference']}` ({result['reference_kind']})",
            f"- candidate: `{result['candidate']}` ({result['candidate_kind']})",
            f"- inputs: {result['inputs']['source']}, {result['inputs']['samples']} samples, shapes "
            f"{result['inputs']['shapes']}",
            f"- tolerances: atol {result['tolerances']['atol']:g}, rtol {result['tolerances']['rtol']:g} "
            "(polygraphy elementwise: an element fails only if it exceeds both)\n",
            "## Outputs\n",
        ]
        rows = [{"output": n, **m} for n, m in result["outputs"].items()]
        md.append(
            md_table(rows, ["output", "passed", "max_abs", "mean_abs", "max_rel", "cosine", "top1", "top5", "kl"])
        )
        if "per_layer" in result:
            pl = result["per_layer"]
            first = pl["first_divergence"]
            md.append("\n## Per layer\n")
            md.append(
                f"{pl['compared']} intermediate tensors shared by both graphs were compared. "
                + (
                    f"First divergence: layer **{first['layer']}**, tensor `{first['tensor']}` (max abs "
                    f"{fmt(first['max_abs'])}).\n"
                    if first
                    else "No tensor is out of tolerance.\n"
                )
            )
            md.append(md_table(pl["layers"], ["layer", "tensors", "failing", "max_abs", "max_rel", "min_cosine"]))
            if pl["layers"]:
                plot_layer_errors(pl["layers"], result["tolerances"]["atol"], tmp / "layer_errors.png")
                md.append("\n![error per layer](layer_errors.png)\n")
        for role, rows in result.get("gpcl_sites", {}).items():
            md.append(f"\n## GPCL sites ({role})\n")
            md.append(
                md_table(
                    rows,
                    [
                        "node",
                        "mode",
                        "tau_min",
                        "tau_max",
                        "r_p50",
                        "r_p99",
                        "r_max",
                        "frac_r_over_tau",
                        "frac_groups_changed",
                        "max_radius_after",
                        "bounded",
                    ],
                )
            )
            radii, taus = extras["radii"][role]
            if radii:
                plot_radii(radii, taus, tmp / f"radii_{role}.png", f"radius |q| at each GPCL site ({role})")
                md.append(f"\n![radius distribution](radii_{role}.png)\n")
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        dump_json(result, tmp / "report.json")
    return out


# ----------------------------------------------------------------------------- study
def _plot_sweep(variants: list[dict], key: str, ylabel: str, path: Path, logy: bool = False) -> None:
    """``key`` against tau (mean over sites for calibrated variants), one line per mode."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode in dict.fromkeys(v["mode"] for v in variants):
        rows = sorted((v for v in variants if v["mode"] == mode), key=lambda v: v["tau_mean"])
        ax.plot(
            [v["tau_mean"] for v in rows],
            [max(v[key], 1e-12) if logy else v[key] for v in rows],
            marker="o",
            label=mode,
        )
        for v in rows:
            if v["tau_kind"] == "calibrated":
                ax.annotate(
                    f"P{v['percentile']:g}", (v["tau_mean"], max(v[key], 1e-12) if logy else v[key]), fontsize=7
                )
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("tau (mean over sites)")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_latency(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seq"])
        ax.errorbar(
            [r["seq"] for r in rs],
            [r["overhead_us_per_token"] for r in rs],
            yerr=[r["noise_ms"] * 1e3 / r["tokens"] for r in rs],
            marker="o",
            capsize=3,
            label=variant,
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("GPCL overhead (us / token)")
    ax.set_title("ORT CPU latency overhead per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_study_report(result: dict, radii: dict, tmp: Path) -> None:
    """Fill ``tmp`` (the study's atomic directory) with report.md, report.json and plots."""
    variants = result["variants"]
    md = [
        f"# GPCL effect report: {Path(result['model_dir']).name}\n",
        f"{result['summary']}\n",
        f"- modes {', '.join(result['modes'])}; sites {', '.join(result['sites'])}; "
        f"calibrated percentiles {result['percentiles']} (x margin 1.25); fixed taus {result['taus']}",
        f"- accuracy on {result['samples']} tokenized samples of {result['seq']} tokens against the original ONNX "
        "model "
        f"(outputs {', '.join(result['outputs'])}); ONNX Runtime CPU, {result['latency_threads']} thread(s) for timing",
        "- soft and hopf are meant for models trained with GPCL in place; on a model trained without it they "
        "change the function by design, which the table shows rather than hides.\n",
        "## Claims\n",
    ]
    for c in result["claims"]:
        md.append(f"- **{c['status'].upper()}**: {c['claim']}. {c['evidence']}")
    md.append("\n## Accuracy and effect per variant\n")
    md.append(
        md_table(
            variants,
            [
                "label",
                "tau_min",
                "tau_max",
                "cosine",
                "max_abs",
                "top1",
                "top5",
                "kl",
                "frac_groups_changed",
                "max_radius_after",
                "max_radius_over_tau",
                "bounded",
            ],
        )
    )
    _plot_sweep(variants, "cosine", "cosine vs original", tmp / "cosine_vs_tau.png")
    _plot_sweep(variants, "frac_groups_changed", "fraction of groups changed", tmp / "changed_vs_tau.png")
    md.append("\n![cosine vs tau](cosine_vs_tau.png)\n\n![groups changed vs tau](changed_vs_tau.png)\n")
    md.append("\n## Latency overhead per token (ONNX Runtime CPU)\n")
    load = result.get("load_average")
    if load:
        md.append(
            f"Timed with {result['latency_threads']} ORT thread(s) on {result.get('cpu_count')} cores; load average "
            f"{load[0]:.2f} at the end of the run (a loaded machine widens the noise column; absolute times are "
            "CPU times, not GPU ones).\n"
        )
    md.append(
        md_table(
            result["latency"],
            [
                "variant",
                "seq",
                "t_original_ms",
                "t_gpcl_ms",
                "overhead_ms",
                "overhead_pct",
                "overhead_us_per_token",
                "noise_ms",
            ],
        )
    )
    for variant, v in result["latency_verdict"].items():
        md.append(f"- {variant}: constant per token? **{v['verdict']}**")
    if result["latency"]:
        _plot_latency(result["latency"], tmp / "latency_per_token.png")
        md.append("\n![overhead per token](latency_per_token.png)\n")
    if radii:
        md.append("\n## Radius distribution at each site (before GPCL, calibrated tau marked)\n")
        plot_radii(
            {k: r for k, (r, _t) in radii.items()},
            {k: t for k, (_r, t) in radii.items()},
            tmp / "radii.png",
            "radius |q| per site",
        )
        md.append("![radius distribution](radii.png)\n")
    (tmp / "report.md").write_text("\n".join(md) + "\n")
    dump_json(result, tmp / "report.json")
