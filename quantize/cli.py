"""CLI for weight-only quantization: ``quantize``. Nothing heavy is imported until it runs."""

from __future__ import annotations

import click

from gpcl_trt.cli import result_command

_ONNX = click.Path(dir_okay=False)


def register(main: click.Group) -> None:
    @result_command(
        main,
        "quantize",
        short_help="Weight-only int8/int4 quantization (block-wise RTN, AWQ or GPTQ), streamed.",
        help="Quantize the projection weights of an ONNX model to int8 or int4, in blocks along the "
        "reduction axis (round to nearest), as standard ONNX: block-wise DequantizeLinear (opset 21) "
        "feeding each MatMul. Embeddings, the output projection (lm_head), norms, biases and GPCL stay "
        "float. One weight at a time is read from its memory-mapped file and written to OUT.onnx.data, "
        "so memory stays flat whatever the model's size.",
    )
    @click.argument("model", type=_ONNX)
    @click.option("-o", "--output", required=True, type=_ONNX, help="Where to write the quantized model (.onnx).")
    @click.option("--weights", default="int4", show_default=True, help="int8 or int4.")
    @click.option(
        "--block-size", type=int, default=32, show_default=True, help="Elements per scale along K: 32, 64, 128."
    )
    @click.option(
        "--asymmetric",
        is_flag=True,
        help="Unsigned values with a zero point per block (default: symmetric, no zero point).",
    )
    @click.option(
        "--method",
        default="rtn",
        show_default=True,
        help="rtn (round to nearest), or awq: per-input-channel scales from the mean |activation| on sample data, "
        "searched per projection input to minimise the output error, the inverse folded into the preceding norm "
        "(else a Mul on the input), or gptq: each input channel's rounding error compensated on the channels not "
        "yet quantized, from the sample activations' Hessian (memory grows with the widest projection input, K^2).",
    )
    @click.option(
        "--data",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="--method awq|gptq: sample inputs, a text file (one sentence a line, the model's tokenizer) or an .npz "
        "[default: the shipped sentences with the tokenizer of the export's model directory, else random ids].",
    )
    @click.option(
        "--samples", type=int, default=64, show_default=True, help="--method awq|gptq: sample sequences used."
    )
    @click.option(
        "--keep",
        multiple=True,
        metavar="PATTERN",
        help="Also keep in float the weights whose initializer or node name matches this glob (repeatable), "
        "e.g. '*layers.0.*'.",
    )
    @click.option(
        "--lm-head",
        is_flag=True,
        help="Quantize the output projection (lm_head) too, as onnxruntime-genai's builder does: faster decoding "
        "where the vocabulary is large, at some accuracy.",
    )
    @click.option("--force", is_flag=True, help="Overwrite an existing output.")
    def quantize(model, output, weights, block_size, asymmetric, method, data, samples, keep, lm_head, force) -> dict:
        from gpcl_trt.quantize import quantize_model

        result = quantize_model(
            model,
            output,
            weights=weights,
            block_size=block_size,
            symmetric=not asymmetric,
            method=method,
            keep=keep,
            lm_head=lm_head,
            force=force,
            data=data,
            samples=samples,
        )
        c = result["check"]
        check = (
            f"check skipped ({c['reason']})"
            if c.get("skipped")
            else f"vs the same weights dequantized: max abs diff {c['max_abs_diff']:.3g} "
            f"({'passed' if c['passed'] else 'FAILED: nothing written'})"
        )
        awq, gptq = result.get("awq"), result.get("gptq")
        how = (
            method if awq is None else f"awq: {awq['scaled']} of {awq['groups']} inputs scaled, {awq['folded']} folded"
        )
        if gptq is not None:
            how = f"gptq: {gptq['groups']} inputs, output error {gptq['calibration_error_vs_rtn']} of RTN's"
        click.echo(
            f"{'wrote' if result['ok'] else 'nothing written for'} {result['output']}: {result['quantized']} weights "
            f"{weights} (block {block_size}, {'symmetric' if not asymmetric else 'asymmetric'}, {how}), "
            f"{len(result['kept'])} kept float; "
            f"{result['float_bytes'] / 1e6:.1f} MB -> {result['quantized_bytes'] / 1e6:.1f} MB "
            f"({result['seconds']:.1f} s); {check}",
            err=True,
        )
        return result
