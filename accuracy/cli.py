"""``gpcl-trt diff`` and ``gpcl-trt study``: thin shells over gpcl_trt.accuracy.comparison / .effect_study.
Nothing heavy is imported here; the work (and polygraphy, which logs to stdout) runs with
stdout redirected to stderr so that --json output stays one clean object."""

from __future__ import annotations

import contextlib
import sys

import click

from gpcl_trt import tolerance
from gpcl_trt.cli import result_command
from gpcl_trt.gpcl import MODES


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def register(main: click.Group) -> None:
    @result_command(main, "diff", short_help="Compare a candidate (ONNX / engine / PyTorch) against a reference.")
    @click.option(
        "--reference",
        "reference",
        type=click.Path(exists=True),
        help="Reference: Hugging Face model dir (PyTorch), .onnx (ONNX Runtime) or .engine (TensorRT).",
    )
    @click.option(
        "--candidate", "candidate", type=click.Path(exists=True), help="Candidate: model dir, .onnx or .engine."
    )
    @click.option(
        "--inputs",
        "inputs",
        type=click.Path(exists=True, dir_okay=False),
        help="Inputs from .npz or a polygraphy data-loader JSON instead of generated ones.",
    )
    @click.option("--samples", default=4, show_default=True, help="Number of generated input samples.")
    @click.option("--seq", default=32, show_default=True, help="Sequence length of generated inputs.")
    @click.option("--batch", default=1, show_default=True, help="Batch size of generated inputs.")
    @click.option("--seed", default=0, show_default=True, help="Seed of the input generator.")
    @click.option(
        "--atol",
        type=float,
        default=None,
        help="Absolute tolerance (an element fails only if it exceeds both tolerances: |ref - cand| > atol and > "
        f"rtol * |cand|, polygraphy's rule) [default: {tolerance.DIFF_ATOL:g}; a candidate with quantized weights "
        "(its manifest chain) against a float reference: "
        + ", ".join(f"{w} {a:g}" for w, (a, _) in tolerance.QUANT_DIFF.items())
        + "; the rule used is printed].",
    )
    @click.option(
        "--rtol",
        type=float,
        default=None,
        help=f"Relative tolerance, against the candidate [default: {tolerance.DIFF_RTOL:g}; quantized: "
        + ", ".join(f"{w} {r:g}" for w, (_, r) in tolerance.QUANT_DIFF.items())
        + "].",
    )
    @click.option(
        "--save-golden",
        "save_golden",
        type=click.Path(dir_okay=False),
        help="Record the reference outputs (polygraphy RunResults JSON) and their inputs (FILE stem + .inputs.json).",
    )
    @click.option(
        "--golden",
        "golden",
        type=click.Path(exists=True, dir_okay=False),
        help="Compare against recorded golden outputs instead of running --reference.",
    )
    @click.option(
        "--per-layer",
        is_flag=True,
        help="Also compare the intermediate tensors both ONNX graphs share and name the first layer out of tolerance.",
    )
    @click.option(
        "--report",
        "report",
        type=click.Path(file_okay=False),
        help="Write report.md, report.json and plots to this directory.",
    )
    @click.option(
        "--task",
        default="auto",
        show_default=True,
        help="Task for a PyTorch model dir (feature-extraction, text-generation, auto).",
    )
    @click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice).")
    @click.option("--force", is_flag=True, help="Overwrite an existing golden file or report directory.")
    def diff_cmd(
        reference,
        candidate,
        inputs,
        samples,
        seq,
        batch,
        seed,
        atol,
        rtol,
        save_golden,
        golden,
        per_layer,
        report,
        task,
        threads,
        force,
    ):
        """Run REF and CAND on the same inputs and compare every output: max/mean abs error, max
        rel error, cosine, and for logits top-1/top-5 agreement and KL divergence. Exit 1 when an
        output is out of tolerance, 2 on bad input (e.g. the two sides take different inputs).

        \b
        Examples:
          gpcl-trt diff --reference MODEL_DIR --candidate m.onnx
          gpcl-trt diff --reference m.onnx --candidate g.onnx --per-layer --report rep
          gpcl-trt diff --reference MODEL_DIR --save-golden golden.json
          gpcl-trt diff --golden golden.json --candidate g.engine
        """
        from gpcl_trt.accuracy.comparison import diff

        with contextlib.redirect_stdout(sys.stderr):
            result = diff(
                reference=reference,
                candidate=candidate,
                inputs=inputs,
                samples=samples,
                seq=seq,
                batch=batch,
                seed=seed,
                atol=atol,
                rtol=rtol,
                save_golden_path=save_golden,
                golden=golden,
                per_layer=per_layer,
                report=report,
                task=task,
                threads=threads,
                force=force,
            )
        _print_diff(result)
        return result

    @result_command(
        main, "study", short_help="Measure the effect of GPCL (modes x tau) on a model: the GPCL effect report."
    )
    @click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
    @click.option(
        "-o", "--output", "output", required=True, type=click.Path(file_okay=False), help="Report directory to create."
    )
    @click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated GPCL modes.")
    @click.option("--taus", default=None, help="Comma-separated fixed tau values (default: 1e9,8,4,2,1).")
    @click.option("--percentiles", default=None, help="Comma-separated calibration percentiles (default: 99.99,99,90).")
    @click.option("--sites", default="pre-attention,pre-mlp", show_default=True, help="Comma-separated GPCL sites.")
    @click.option("--samples", default=8, show_default=True, help="Evaluation samples.")
    @click.option("--calib-samples", default=16, show_default=True, help="Calibration samples.")
    @click.option("--seq", default=32, show_default=True, help="Sequence length for the accuracy sweep.")
    @click.option(
        "--latency-seqs",
        default=None,
        help="Comma-separated sequence lengths for the latency sweep (default: 16,64,256).",
    )
    @click.option("--latency-reps", default=20, show_default=True, help="Timed runs per point of the latency sweep.")
    @click.option(
        "--threads", type=int, default=1, show_default=True, help="ONNX Runtime intra-op threads for the latency sweep."
    )
    @click.option(
        "--onnx",
        "onnx",
        type=click.Path(exists=True, dir_okay=False),
        help="Reuse this export of MODEL_DIR (gpcl-trt export) instead of exporting again.",
    )
    @click.option("--seed", default=1234, show_default=True, help="Seed of the evaluation inputs.")
    @click.option("--force", is_flag=True, help="Overwrite an existing report directory.")
    def study_cmd(
        model_dir,
        output,
        modes,
        taus,
        percentiles,
        sites,
        samples,
        calib_samples,
        seq,
        latency_seqs,
        latency_reps,
        threads,
        onnx,
        seed,
        force,
    ):
        """Measure the GPCL claims on MODEL_DIR instead of repeating them: for each mode and tau
        (calibrated percentiles and fixed values) the accuracy against the original model, the
        fraction of groups changed, the max radius after GPCL, and the ONNX Runtime CPU latency
        overhead per token against sequence length. Writes report.md, report.json and plots.

        \b
        Example:
          gpcl-trt study MODEL_DIR -o study --modes clamp,soft --taus 1e9,4,1
        """
        from gpcl_trt.accuracy.effect_study import study

        def ints(text):
            return [int(v) for v in _floats(text)] if text else None

        with contextlib.redirect_stdout(sys.stderr):
            result = study(
                model_dir,
                output,
                modes=tuple(m for m in modes.split(",") if m),
                taus=_floats(taus),
                percentiles=_floats(percentiles),
                sites=tuple(s for s in sites.split(",") if s),
                samples=samples,
                calib_samples=calib_samples,
                seq=seq,
                latency_seqs=ints(latency_seqs),
                latency_reps=latency_reps,
                threads=threads,
                onnx=onnx,
                seed=seed,
                force=force,
            )
        click.echo(result.get("summary", ""), err=True)
        return result

    @result_command(
        main,
        "eval",
        short_help="Generation-level accuracy of a decoder: greedy agreement and teacher-forced NLL.",
        help="Compare CANDIDATE with REFERENCE where users see it. Each is a Hugging Face model directory "
        "(PyTorch), or a decoder exported with past (.onnx, GPCL or not; ONNX Runtime). --prompts FILE (one "
        "per line): greedy agreement, the share of prompts whose first --max-new-tokens tokens are identical, "
        "and the mean step of the first divergence. --text FILE (one sequence per line): mean NLL and "
        "perplexity under teacher forcing, for both. Exit 1 when the agreement is below --min-agreement or "
        "the candidate's NLL exceeds the reference's by more than --nll-rtol.",
    )
    @click.argument("candidate", type=click.Path(exists=True))
    @click.option("--reference", required=True, type=click.Path(exists=True), help="Model dir or .onnx decoder.")
    @click.option("--prompts", "prompts", type=click.Path(dir_okay=False), help="Prompts, one per line.")
    @click.option("--text", "text", type=click.Path(dir_okay=False), help="Text for the NLL, one sequence per line.")
    @click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
    @click.option(
        "--min-agreement", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Greedy agreement to pass."
    )
    @click.option(
        "--nll-rtol",
        type=click.FloatRange(min=0),
        default=1e-3,
        show_default=True,
        help="Largest NLL increase that passes, relative to the reference's.",
    )
    @click.option("--tokenizer", type=click.Path(file_okay=False, exists=True), help="Tokenizer directory.")
    @click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per runtime.")
    @click.option("--allow-pickle", is_flag=True, help="Let PyTorch load pickle (.bin) weights.")
    def eval_cmd(
        candidate, reference, prompts, text, max_new_tokens, min_agreement, nll_rtol, tokenizer, threads, allow_pickle
    ):
        from gpcl_trt.accuracy.generation import evaluate, report_lines

        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate(
                reference,
                candidate,
                prompts=prompts,
                text=text,
                max_new_tokens=max_new_tokens,
                tokenizer=tokenizer,
                threads=threads,
                allow_pickle=allow_pickle,
                nll_rtol=nll_rtol,
                min_agreement=min_agreement,
            )
        for line in report_lines(result):
            click.echo(line, err=True)
        return result


def _print_diff(result: dict) -> None:
    for name, m in result.get("outputs", {}).items():
        extra = "".join(f" {k} {m[k]:.4g}" for k in ("top1", "top5", "kl") if k in m)
        status = "ok  " if m.get("passed") else "FAIL"
        if m.get("missing"):
            click.echo(f"  {status} {name}: missing in the candidate", err=True)
            continue
        click.echo(
            f"  {status} {name}: max abs {m['max_abs']:.3g} mean abs {m['mean_abs']:.3g} max rel {m['max_rel']:.3g} "
            f"cosine {m['cosine']:.6f}{extra}",
            err=True,
        )
    click.echo(result.get("summary", ""), err=True)
