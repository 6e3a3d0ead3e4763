"""CLI for the passes: ``sites``, ``insert``, ``calibrate``, ``strip``. Each command calls one
function of gpcl_trt.passes and prints a short summary on stderr; nothing heavy is imported
until a command runs."""

from __future__ import annotations

import click

from gpcl_trt.cli import result_command
from gpcl_trt.gpcl import MODES

_ONNX = click.Path(dir_okay=False)


def _say(line: str) -> None:
    click.echo(line, err=True)


def _tau_text(tau) -> str:
    if isinstance(tau, dict):
        return f"per-group[{tau.get('per_group', '?')}] {tau['min']:.4g}..{tau['max']:.4g}"
    return f"{tau:.4g}"


def register(main: click.Group) -> None:
    @result_command(
        main,
        "sites",
        short_help="List GPCL candidate sites (changes nothing).",
        help="List the GPCL candidate sites of an ONNX model: layer, kind, tensor, hidden size, "
        "norm and the projection nodes that would read GPCL. Changes nothing.",
    )
    @click.argument("model", type=_ONNX)
    def sites(model: str) -> dict:
        from gpcl_trt.passes import sites_file

        result = sites_file(model)
        if result["reason"]:
            _say(f"{result['model']}: 0 sites: {result['reason']}")
            return result
        _say(
            f"{result['model']}: {len(result['sites'])} sites in {result['layers']} layers (found by "
            f"{result['method']})"
        )
        _say(f"{'layer':>5}  {'kind':<19}  {'hidden':>6}  {'tensor':<24}  {'norm':<24}  consumers")
        for s in result["sites"]:
            _say(
                f"{s['layer']:>5}  {s['kind']:<19}  {s['hidden']!s:>6}  {s['tensor']:<24}  {s['norm']:<24}  "
                f"{', '.join(s['consumers'])}" + (f"  [GPCL: {s['gpcl']}]" if s["gpcl"] else "")
            )
        return result

    @result_command(
        main,
        "insert",
        short_help="Insert GPCL at pre-attention / pre-cross-attention / pre-MLP sites.",
        help="Insert GPCL at pre-attention / pre-cross-attention / pre-MLP sites of an ONNX model. Only the projection "
        "inputs are rewired (the residual path keeps the original tensor); inserting into a "
        "GPCL model updates tau/mode in place.",
    )
    @click.argument("model", type=_ONNX)
    @click.option("-o", "--output", required=True, type=_ONNX, help="Where to write the GPCL model (.onnx).")
    @click.option(
        "--sites",
        "kinds",
        default="pre-attention,pre-cross-attention,pre-mlp",
        show_default=True,
        help="Comma list of site kinds: pre-attention, pre-cross-attention (an encoder-decoder's decoder "
        "block: the cross-attention's query input), pre-mlp, shared (one norm feeding both attention and "
        "MLP, as in GPT-J or Falcon; chosen by shared or by naming pre-attention and pre-mlp).",
    )
    @click.option("--layers", default=None, help="Layer indices and ranges, e.g. 0,2,5-7 (default: all layers).")
    @click.option(
        "--mode",
        type=click.Choice(MODES),
        default="clamp",
        show_default=True,
        help="GPCL mode; soft and hopf change the function everywhere (for models trained with GPCL).",
    )
    @click.option(
        "--tau", type=float, default=None, help="One radius bound for every site (exclusive with --calibration)."
    )
    @click.option(
        "--calibration",
        type=click.Path(dir_okay=False),
        default=None,
        help="calib.json from `gpcl-trt calibrate` on this model: tau per site or per group.",
    )
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    def insert(model, output, kinds, layers, mode, tau, calibration, force) -> dict:
        from gpcl_trt.passes import insert_file

        result = insert_file(
            model, output, sites=kinds, layers=layers, mode=mode, tau=tau, calibration=calibration, force=force
        )
        _say(
            f"wrote {output}: {len(result['inserted'])} GPCL nodes inserted, {len(result['updated'])} updated (mode "
            f"{mode})"
        )
        for s in result["sites"]:
            _say(f"  {s['gpcl']:<28} on {s['tensor']:<20} tau {_tau_text(s['tau'])}")
        return result

    @result_command(
        main,
        "calibrate",
        short_help="Calibrate tau per GPCL site (calib.json).",
        help="Run ONNX Runtime on sample inputs, measure the quaternion radii at every site and "
        "write tau = margin x percentile per site (or per group) with the statistics to calib.json.",
    )
    @click.argument("model", type=_ONNX)
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write calib.json.")
    @click.option("--samples", type=int, default=64, show_default=True, help="Number of sample sequences to run.")
    @click.option(
        "--data",
        type=click.Path(dir_okay=False),
        default=None,
        help="Sample inputs: .npz keyed by model input name, or a text file with one sentence a line "
        "(default: the shipped corpus, or random token ids when the model has no tokenizer).",
    )
    @click.option(
        "--percentile", type=float, default=99.99, show_default=True, help="Percentile of the radius distribution."
    )
    @click.option("--margin", type=float, default=1.25, show_default=True, help="tau = margin x percentile.")
    @click.option("--per-group", is_flag=True, help="One tau per group of 4 channels instead of one per site.")
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    def calibrate(model, output, samples, data, percentile, margin, per_group, force) -> dict:
        from gpcl_trt.passes import calibrate_file

        result = calibrate_file(
            model,
            output,
            samples=samples,
            data=data,
            percentile=percentile,
            margin=margin,
            per_group=per_group,
            force=force,
        )
        _say(f"wrote {output}: {result['samples']} samples ({result['data']['kind']}), {result['tokens']} tokens")
        for key, s in result["sites"].items():
            _say(f"  {key:<22} tau {_tau_text(s['tau'])}  max r {s['max']:.4g}")
        return result

    @result_command(
        main,
        "strip",
        short_help="Remove GPCL nodes and function from a model.",
        help="Remove every GPCL node and the GPCL function, restoring the original wiring.",
    )
    @click.argument("model", type=_ONNX)
    @click.option("-o", "--output", required=True, type=_ONNX, help="Where to write the model without GPCL (.onnx).")
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    def strip(model, output, force) -> dict:
        from gpcl_trt.passes import strip_file

        result = strip_file(model, output, force=force)
        _say(f"wrote {output}: removed {len(result['removed'])} GPCL nodes")
        return result
