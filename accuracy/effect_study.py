"""``study``: the GPCL effect report. Measures the spec's claims on a real model: for every
mode and tau (calibrated percentiles and fixed values) the accuracy against the original, the
fraction of groups GPCL changed, the max radius after it, and the ONNX Runtime CPU latency
overhead per token against sequence length; then says plainly which claims held."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gpcl_trt.accuracy import metrics as mt
from gpcl_trt.accuracy.runners import make_side, with_outputs
from gpcl_trt.common import GpclError, sha256_file
from gpcl_trt.feeds import make_feeds, ort_session, specs_from_onnx, vocab_size
from gpcl_trt.gpcl import quaternion_radii
from gpcl_trt.weightfiles import inline_external

DEFAULT_TAUS = (1e9, 8.0, 4.0, 2.0, 1.0)
DEFAULT_PERCENTILES = (99.99, 99.0, 90.0)
DEFAULT_LATENCY_SEQS = (16, 64, 256)
IDENTITY_TAU = 1e6  # at or above this a fixed tau is "huge": clamp must be bit-exact identity
ROUNDS = 5  # interleaved timing rounds per length; their spread is the noise estimate


def _variant_metrics(ref_outs: list[dict], outs: list[dict], names: list[str]) -> dict[str, Any]:
    per = {n: mt.aggregate([mt.output_metrics(n, r[n], o[n]) for r, o in zip(ref_outs, outs)]) for n in names}
    m = {"max_abs": max(v["max_abs"] for v in per.values()), "cosine": min(v["cosine"] for v in per.values())}
    for key in ("top1", "top5", "kl"):
        vals = [v[key] for v in per.values() if key in v]
        if vals:
            m[key] = vals[0]
    return m


def _site_metrics(sites: list[dict], outs: list[dict]) -> dict[str, Any]:
    changed = groups = 0
    max_after, ratio, bounded = 0.0, 0.0, True
    per_site = []
    for s in sites:
        x = np.concatenate([o[s["input"]].reshape(-1, o[s["input"]].shape[-1]) for o in outs])
        y = np.concatenate([o[s["output"]].reshape(-1, o[s["output"]].shape[-1]) for o in outs])
        st = mt.site_stats(x, y, s["tau"])
        changed += st["frac_groups_changed"] * st["groups"]
        groups += st["groups"]
        max_after = max(max_after, st["max_radius_after"])
        ratio = max(ratio, st["max_radius_after"] / st["tau_min"])
        bounded &= st["bounded"]
        per_site.append({"node": s["node"], **st})
    return {
        "frac_groups_changed": changed / max(groups, 1),
        "max_radius_after": max_after,
        "max_radius_over_tau": ratio,
        "bounded": bounded,
        "sites": per_site,
    }


def _run(model, feeds: list[dict], threads: int | None) -> list[dict]:
    sess = ort_session(model, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


def _median_time(sess, feed: dict, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency_sweep(base_model, gpcl_models: dict[str, Any], make_feed, seqs, reps: int, threads: int) -> list[dict]:
    """Median ORT CPU latency of the original and each GPCL model per sequence length; the
    overhead per token is (t_gpcl - t_orig) / tokens. Runs are interleaved so that drift in a
    shared machine's load hits both sides alike."""
    sessions = {"original": ort_session(base_model, threads=threads)}
    sessions.update({k: ort_session(m, threads=threads) for k, m in gpcl_models.items()})
    rows = []
    for seq in seqs:
        feed = make_feed(seq)
        for s in sessions.values():  # warm-up (allocations, kernel selection)
            s.run(None, feed)
        samples: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(ROUNDS):
            for k, s in sessions.items():
                samples[k].append(_median_time(s, feed, max(1, reps // ROUNDS)))
        t = {k: statistics.median(v) for k, v in samples.items()}
        # Spread of the per-round medians: what a difference must exceed to mean anything.
        spread = {k: statistics.pstdev(v) for k, v in samples.items()}
        tokens = int(np.prod(next(iter(feed.values())).shape[:2]))
        for k in gpcl_models:
            over = t[k] - t["original"]
            rows.append(
                {
                    "variant": k,
                    "seq": seq,
                    "tokens": tokens,
                    "t_original_ms": t["original"] * 1e3,
                    "t_gpcl_ms": t[k] * 1e3,
                    "overhead_ms": over * 1e3,
                    "overhead_pct": 100 * over / t["original"],
                    "overhead_us_per_token": over * 1e6 / tokens,
                    "noise_ms": max(spread["original"], spread[k]) * 1e3,
                }
            )
    return rows


def per_token_verdict(rows: list[dict]) -> dict[str, Any]:
    """Does the overhead per token grow with the sequence length? Only lengths whose overhead
    stands above the timing noise (> 3 sigma) count. Between the shortest and the longest of
    those, a cost linear in tokens keeps the per-token overhead flat while a quadratic one
    multiplies it by the token ratio: "held" when it grows by at most half that ratio (and at
    most 2x); "inconclusive" with fewer than two lengths above noise. A least-squares fit
    overhead = fixed + per_token * tokens is reported alongside."""
    out = {}
    for variant in OrderedDict((r["variant"], None) for r in rows):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["tokens"])
        tokens = np.array([r["tokens"] for r in rs], dtype=np.float64)
        over = np.array([r["overhead_ms"] for r in rs])
        fixed, per_token = np.polyfit(tokens, over, 1)[::-1] if len(rs) > 1 else (0.0, over[0] / tokens[0])
        signal = [r for r in rs if r["overhead_ms"] > 3 * r["noise_ms"]]
        if len(signal) < 2:
            verdict = "inconclusive: fewer than two lengths with an overhead above the timing noise"
        else:
            a, b = signal[0], signal[-1]
            growth = b["overhead_us_per_token"] / a["overhead_us_per_token"]
            allowed = min(2.0, max(1.0, b["tokens"] / a["tokens"] / 2))
            verdict = "held" if growth <= allowed else "not held"
            verdict += f" (per-token overhead x{growth:.2f} from seq {a['seq']} to {b['seq']})"
        out[variant] = {
            "verdict": verdict,
            "us_per_token": [r["overhead_us_per_token"] for r in rs],
            "seqs": [r["seq"] for r in rs],
            "fit_fixed_ms": float(fixed),
            "fit_us_per_token": float(per_token) * 1e3,
            "overhead_pct_longest": rs[-1]["overhead_pct"],
        }
    return out


def claims(variants: list[dict], latency: dict[str, dict]) -> list[dict]:
    """The spec's claims, each with the measurement that decides it."""
    out = []

    def add(claim: str, rows: list, held: bool | None, evidence: str) -> None:
        """held: True / False, or None when the measurement cannot decide (timing noise)."""
        if not rows:
            held, evidence = None, "not measured (no such variant in this study)"
        status = "not measured" if not rows else {True: "held", False: "not held", None: "inconclusive"}[held]
        out.append({"claim": claim, "held": held, "status": status, "evidence": evidence})

    cal = [v for v in variants if v["mode"] == "clamp" and v["tau_kind"] == "calibrated" and v["percentile"] >= 99.99]
    add(
        "clamp at calibrated tau (P99.99 x margin) changes nothing on ordinary inputs",
        cal,
        all(v["frac_groups_changed"] == 0 and v["max_abs"] == 0 for v in cal),
        "; ".join(
            f"P{v['percentile']}: groups changed {v['frac_groups_changed']:.3g}, max abs {v['max_abs']:.3g}"
            for v in cal
        ),
    )
    huge = [v for v in variants if v["mode"] == "clamp" and v["tau_kind"] == "fixed" and v["tau"] >= IDENTITY_TAU]
    add(
        "clamp with a huge tau is the exact identity",
        huge,
        all(v["max_abs"] == 0 for v in huge),
        "; ".join(f"tau {v['tau']:g}: max abs {v['max_abs']:.3g}" for v in huge),
    )
    add(
        "every group is bounded by tau after GPCL, in every mode",
        variants,
        all(v["bounded"] for v in variants),
        f"largest radius/tau over all variants: {max((v['max_radius_over_tau'] for v in variants), default=0):.6f}",
    )
    small = [v for v in variants if v["mode"] == "clamp" and v["frac_groups_changed"] > 0]
    add(
        "clamp only changes the output when it clamps (max abs > 0 implies groups changed)",
        [v for v in variants if v["mode"] == "clamp"],
        all(v["frac_groups_changed"] > 0 or v["max_abs"] == 0 for v in variants if v["mode"] == "clamp"),
        f"{len(small)} clamp variants clamped some groups",
    )
    other = [v for v in variants if v["mode"] in ("soft", "hopf") and v["tau_kind"] == "calibrated"]
    add(
        "soft and hopf change the function everywhere (they are for models trained with GPCL in place)",
        other,
        all(v["frac_groups_changed"] > 0.5 for v in other),
        "; ".join(
            f"{v['mode']} P{v['percentile']}: groups changed {v['frac_groups_changed']:.3g}, cosine {v['cosine']:.4f}"
            for v in other
        ),
    )
    lat_rows = list(latency.items())
    add(
        "GPCL costs O(D) per token: its overhead per token does not grow with the sequence length",
        lat_rows,
        False
        if any(v["verdict"].startswith("not held") for _, v in lat_rows)
        else (True if all(v["verdict"].startswith("held") for _, v in lat_rows) else None),
        "; ".join(
            f"{k}: {v['verdict']} ({', '.join(f'{u:.3g}' for u in v['us_per_token'])} us/token at seq {v['seqs']}; "
            f"fit {v['fit_fixed_ms']:.3g} ms per call + {v['fit_us_per_token']:.3g} us/token)"
            for k, v in lat_rows
        ),
    )
    return out


def study(
    model_dir: str | Path,
    out_dir: str | Path,
    modes: tuple[str, ...] = ("clamp", "soft", "hopf"),
    taus: list[float] | None = None,
    percentiles: list[float] | None = None,
    sites: tuple[str, ...] = ("pre-attention", "pre-mlp"),
    samples: int = 8,
    calib_samples: int = 16,
    seq: int = 32,
    latency_seqs: list[int] | None = None,
    latency_reps: int = 20,
    threads: int = 1,
    onnx: str | Path | None = None,
    seed: int = 1234,
    force: bool = False,
) -> dict[str, Any]:
    """Run the sweep and write report.md, report.json and plots to ``out_dir``. ``onnx`` reuses
    an existing export of ``model_dir`` instead of exporting it again."""
    from gpcl_trt.accuracy.report import write_study_report
    from gpcl_trt.common import atomic_dir
    from gpcl_trt.passes import calibrate_file
    from gpcl_trt.plugins.reference import MODES

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise GpclError(f"unknown GPCL mode(s) {bad}: choose from {', '.join(MODES)}")
    taus = list(DEFAULT_TAUS if taus is None else taus)
    percentiles = list(DEFAULT_PERCENTILES if percentiles is None else percentiles)
    if any(t <= 0 for t in taus) or any(not 0 < p <= 100 for p in percentiles):
        raise GpclError("taus must be > 0 and percentiles in (0, 100]")
    if not taus and not percentiles:
        raise GpclError("nothing to sweep: give at least one tau or percentile")
    latency_seqs = list(DEFAULT_LATENCY_SEQS if latency_seqs is None else latency_seqs)
    if samples < 1 or seq < 1 or any(s < 1 for s in latency_seqs):
        raise GpclError("samples, seq and latency sequence lengths must be >= 1")
    from gpcl_trt.passes.insert import parse_kinds

    sites = parse_kinds(sites)  # before the (slow) export, not after

    with atomic_dir(out_dir, force=force) as tmp_out, tempfile.TemporaryDirectory(prefix="gpcl-study-") as work:
        work = Path(work)
        t_start = time.perf_counter()
        if onnx is None:
            from gpcl_trt.exporter import export_model

            onnx = work / "model.onnx"
            res = export_model(model_dir, onnx)
            if not res.get("ok", True):
                raise GpclError(f"export of {model_dir} failed: {res}")
        onnx = Path(onnx)
        side = make_side(onnx, "original", tokenizer_dir=model_dir)
        base = side.onnx_model
        # The study runs many variants of one model in memory (made for small models): read the
        # weights in once.
        inline_external(base, onnx.parent)
        out_names = [o.name for o in base.graph.output]
        feeds = side.generate(samples, 1, seq, seed)
        ref_outs = _run(base, feeds, None)

        # Variants are made in memory with the graph-level pass (insert_gpcl): insert_file would
        # run the full ONNX checker and write the model out for each one; ORT still loads each.
        from gpcl_trt.passes.graph import load_graph, to_proto
        from gpcl_trt.passes.insert import insert_gpcl, load_calibration
        from gpcl_trt.plugins.onnx_function import attach_gpcl_functions

        lm = load_graph(onnx)
        src_sha = sha256_file(onnx)

        def make_variant(mode: str, tau_value) -> Any:
            graph, _rep = insert_gpcl(lm.graph, sites=sites, mode=mode, tau=tau_value, scopes=lm.scopes)
            variant = attach_gpcl_functions(to_proto(graph, lm))
            inline_external(variant, onnx.parent)  # the study runs each variant in memory
            return variant

        plan = []  # (mode, tau kind, percentile or tau, tau value for insert_gpcl)
        for p in percentiles:
            calib = work / f"calib_p{p:g}.json"
            calibrate_file(onnx, calib, samples=calib_samples, percentile=p)
            site_taus = load_calibration(calib, onnx, src_sha)[0]
            plan += [(m, "calibrated", p, site_taus) for m in modes]
        plan += [(m, "fixed", t, float(t)) for t in taus for m in modes]

        variants, radii, keep = [], {}, {}
        for mode, kind, value, tau_value in plan:
            model = make_variant(mode, tau_value)
            gsites = mt.gpcl_sites(model)
            if not gsites:
                raise GpclError(f"{onnx} has no {'/'.join(sites)} GPCL sites")
            outs = _run(with_outputs(model, [t for s in gsites for t in (s["input"], s["output"])]), feeds, None)
            site_m = _site_metrics(gsites, outs)
            taus_used = np.concatenate([np.ravel(s["tau"]) for s in gsites])
            label = f"{mode} P{value:g}" if kind == "calibrated" else f"{mode} tau={value:g}"
            variants.append(
                {
                    "label": label,
                    "mode": mode,
                    "tau_kind": kind,
                    "percentile": value if kind == "calibrated" else None,
                    "tau": value if kind == "fixed" else None,
                    "tau_mean": float(taus_used.mean()),
                    "tau_min": float(taus_used.min()),
                    "tau_max": float(taus_used.max()),
                    **_variant_metrics(ref_outs, outs, out_names),
                    **{k: v for k, v in site_m.items() if k != "sites"},
                    "sites": site_m["sites"],
                }
            )
            # Latency is timed on the first tau of the sweep for each mode.
            keep.setdefault(mode, (label, model))
            if not radii:  # radius distribution before GPCL, with this variant's tau marked
                radii = {
                    s["node"]: (np.concatenate([quaternion_radii(o[s["input"]]).ravel() for o in outs]), s["tau"])
                    for s in gsites
                }

        specs, vocab = specs_from_onnx(base), vocab_size(base)

        def make_feed(n: int) -> dict:
            return make_feeds(specs, 1, n, seed=seed + n, vocab=vocab)

        lat_rows = latency_sweep(base, dict(keep.values()), make_feed, latency_seqs, latency_reps, threads)
        lat_verdict = per_token_verdict(lat_rows)
        result = {
            "model_dir": str(model_dir),
            "onnx": str(onnx),
            "modes": list(modes),
            "sites": list(sites),
            "taus": taus,
            "percentiles": percentiles,
            "samples": samples,
            "seq": seq,
            "calib_samples": calib_samples,
            "outputs": out_names,
            "variants": variants,
            "latency": lat_rows,
            "latency_verdict": lat_verdict,
            "latency_threads": threads,
            "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
        }
        result["claims"] = claims(variants, lat_verdict)
        result["ok"] = True
        result["elapsed_s"] = time.perf_counter() - t_start
        counts = {st: sum(c["status"] == st for c in result["claims"]) for st in ("held", "not held", "inconclusive")}
        result["summary"] = (
            f"GPCL study of {model_dir.name}: {len(variants)} variants; claims: {counts['held']} held, "
            f"{counts['not held']} not held, {counts['inconclusive']} inconclusive; report in {out_dir}"
        )
        write_study_report(result, radii, tmp_out)
    result["report"] = str(out_dir)
    return result
