"""``gpcl-trt export``: a thin shell over ``gpcl_trt.exporter.export_model``. Imports nothing
heavy at module level."""

from __future__ import annotations

import click

# The exporter's tasks (gpcl_trt.exporter.tasks.TASKS; spelled out so that the CLI imports nothing heavy).
TASK_CHOICES = (
    "auto",
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "text-generation",
    "text-generation-with-past",
    "image-classification",
    "zero-shot-image-classification",
    "automatic-speech-recognition",
    "audio-classification",
    "text2text-generation",
)


def register(main: click.Group) -> None:
    # Imported here: gpcl_trt.cli imports this module while it registers the areas.
    from gpcl_trt.cli import result_command

    @result_command(main, "export", short_help="Export a local Hugging Face model directory to ONNX.")
    @click.argument("model_dir", type=click.Path(path_type=str))
    @click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(path_type=str),
        help="Output ONNX file (OUT.onnx; OUT.manifest.json is written next to it); for an encoder-decoder model a "
        "directory (OUT/encoder_model.onnx, OUT/decoder_model_merged.onnx, each with its manifest).",
    )
    @click.option(
        "--task",
        type=click.Choice(TASK_CHOICES),
        default="auto",
        show_default=True,
        help="What to export; auto picks from config.json: the task of the head class in architectures "
        "(BertForMaskedLM: fill-mask, ViTForImageClassification: image-classification, CLIPModel: "
        "zero-shot-image-classification; a *ForCausalLM: "
        "text-generation-with-past unless use_cache is false, its layers keep recurrent states or it is an "
        "encoder's causal LM head), else the family's first task.",
    )
    @click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18..23).")
    @click.option(
        "--dtype",
        type=click.Choice(("auto", "fp32", "fp16", "bf16")),
        default="auto",
        show_default=True,
        help="Weight and activation precision of the exported model. auto: the floating dtype a safetensors "
        "checkpoint stores, read from its headers (fp32 -> fp32, fp16 -> fp16, bf16 -> fp16: ONNX Runtime's CPU "
        "provider cannot validate bf16, and fp16 keeps the 2-byte size); pickle weights: fp32. The result and the "
        "manifest's options say which and why (dtype_reason). bf16: safetensors only, with --validate none; a bf16 "
        "checkpoint is then linked, not converted.",
    )
    @click.option(
        "--atol",
        type=float,
        default=None,
        help="Absolute part of the validation tolerance: every element of every output must have |torch - onnx| <= "
        "max(atol, rtol * |onnx|) [default: 1e-4 fp32, 1e-1 fp16].",
    )
    @click.option(
        "--rtol",
        type=float,
        default=None,
        help="Relative part of the validation tolerance, against each element of the ONNX Runtime output [default: 0 "
        "fp32, 1e-2 fp16].",
    )
    @click.option(
        "--validate",
        "validate",
        type=click.Choice(("auto", "full", "layers", "none")),
        default="auto",
        show_default=True,
        help="Compare ONNX Runtime against PyTorch (weights memory-mapped) on fresh inputs of other shapes; exit 1 "
        "above the tolerance (--atol, --rtol), and then nothing is written. full: one ONNX Runtime session over "
        "the whole model; layers: the "
        "graph run block by block (name scopes), one block's weights in memory at a time; auto: full when its "
        "estimated memory fits --memory-budget, else layers; none: skip.",
    )
    @click.option("--no-validate", "no_validate", is_flag=True, help="Same as --validate none.")
    @click.option(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="Memory validation may use, e.g. 8G or 512M  [default: half of the memory available at start].",
    )
    @click.option(
        "--external-data",
        "external_data",
        type=click.Choice(("auto", "link", "copy", "inline")),
        default="auto",
        show_default=True,
        help="Where the weights go. link: the checkpoint files reflinked, else hard-linked, else copied next to "
        "OUT.onnx as OUT.onnx.<file> (offsets point into them; tensors whose dtype differs from --dtype are "
        "converted into OUT.onnx.data); copy: never a hard link (onnx.load refuses hard-linked data; ONNX Runtime "
        "reads it); inline: inside OUT.onnx (up to 1.8 GB); auto: inline up to 256 MB, else link.",
    )
    @click.option(
        "--trace-layers",
        "trace_layers",
        type=click.Choice(("auto", "replicate", "all")),
        default="auto",
        show_default=True,
        help="Which decoder layers are traced. replicate: 4, and the others written as copies of the 4th with their "
        "own weights (an error where the layers are not one module); auto: replicate from 8 layers when every layer "
        "is the same module and the copies line up, else all, and the result says why; all: every layer.",
    )
    @click.option(
        "--quantize",
        "quantize",
        type=click.Choice(("int8", "int4")),
        default=None,
        help="Then quantize the projection weights (as gpcl-trt quantize, streamed) into OUT.onnx: the float export "
        "is validated against PyTorch in a temporary, the quantized model against the same weights dequantized, "
        "and the float export is removed (--keep-float keeps it as OUT.float.onnx). One manifest records both.",
    )
    @click.option(
        "--block-size", type=int, default=None, help="With --quantize: elements per scale along K, 32, 64, 128 [32]."
    )
    @click.option("--asymmetric", is_flag=True, help="With --quantize: unsigned values with a zero point per block.")
    @click.option(
        "--method",
        default=None,
        help="With --quantize: rtn (round to nearest), awq (activation-aware scales from sample sentences) or gptq "
        "[rtn].",
    )
    @click.option(
        "--keep",
        multiple=True,
        metavar="PATTERN",
        help="With --quantize: also keep in float the weights whose name matches this glob (repeatable).",
    )
    @click.option("--lm-head", is_flag=True, help="With --quantize: quantize the output projection (lm_head) too.")
    @click.option("--keep-float", is_flag=True, help="With --quantize: keep the float export as OUT.float.onnx.")
    @click.option("--force", is_flag=True, help="Overwrite OUT.onnx if it exists.")
    @click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Allow Python code shipped in the model directory to run (off by default).",
    )
    @click.option(
        "--allow-pickle", is_flag=True, help="Allow pickle weights (.bin/.pt); loading them can run arbitrary code."
    )
    def export(
        model_dir,
        output,
        task,
        opset,
        dtype,
        atol,
        rtol,
        validate,
        no_validate,
        memory_budget,
        external_data,
        trace_layers,
        quantize,
        block_size,
        asymmetric,
        method,
        keep,
        lm_head,
        keep_float,
        force,
        trust_remote_code,
        allow_pickle,
    ):
        """Export the Hugging Face model in MODEL_DIR (config.json + safetensors) to ONNX with the
        dynamo exporter: dynamic batch/sequence axes, node metadata kept, validated against PyTorch
        with ONNX Runtime, plus OUT.manifest.json. Safetensors checkpoints (single or sharded) are
        exported lazily: traced without loading the weights, which go to ONNX external data
        straight from the checkpoint; pickle weights (--allow-pickle) are loaded eagerly.

        \b
        Supported: what transformers can run as a text encoder, a decoder-only LM or a ViT-like
        vision encoder, found from config.json (architectures, model_type), and encoder-decoder
        models (T5, BART, Marian, Pegasus, Whisper: a directory of two graphs); multimodal
        generators are refused.
        Example: gpcl-trt export ./all-MiniLM-L6-v2 -o minilm.onnx --json
        """
        from gpcl_trt.exporter.options import quantize_options

        q = quantize_options(quantize, block_size, asymmetric, method, keep, lm_head, keep_float)
        if q is not None:
            from gpcl_trt.quantize.chain import export_quantized as export_model
        else:
            from gpcl_trt.exporter.api import export_model

        result = export_model(
            model_dir,
            output,
            **({"quantize": q, "keep_float": keep_float} if q is not None else {}),
            task=task,
            opset=opset,
            dtype=dtype,
            atol=atol,
            rtol=rtol,
            validate="none" if no_validate else validate,
            memory_budget=memory_budget,
            external_data=external_data,
            force=force,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            replicate={"auto": None, "replicate": True, "all": False}[trace_layers],
        )
        if q is not None:
            return _echo_quantized(result)
        v = result["validation"]
        if v.get("skipped"):
            summary = "validation skipped (--validate none)"
        else:
            verdict = "passed" if v["passed"] else "FAILED"
            summary = (
                f"validation ({v['mode']}) {verdict}: max abs diff {v['max_abs_diff']:.3g} "
                f"(atol {v['atol']:g}, rtol {v['rtol']:g}: {v['tolerance_used']:.2f} of the tolerance used)"
            )
        what = "wrote" if result.get("written", True) else "nothing written for"
        click.echo(f"{what} {result['output']} ({result['architecture']}, {result['task']}); {summary}", err=True)
        return result


def _validation_line(v: dict) -> str:
    if v.get("skipped"):
        return "validation skipped (--validate none)"
    verdict = "passed" if v["passed"] else "FAILED"
    return (
        f"validation ({v['mode']}) {verdict}: max abs diff {v['max_abs_diff']:.3g} "
        f"(atol {v['atol']:g}, rtol {v['rtol']:g}: {v['tolerance_used']:.2f} of the tolerance used)"
    )


def _echo_quantized(result: dict) -> dict:
    """export --quantize: the float validation, then the quantized model's check."""
    e, q = result["export"], result["quantize"]
    line = f"float export ({e['architecture']}, {e['task']}): {_validation_line(e['validation'])}"
    if q is not None:
        c = q["check"]
        check = (
            "check skipped (" + c["reason"] + ")"
            if c.get("skipped")
            else f"vs the same weights dequantized: max abs diff {c['max_abs_diff']:.3g} "
            f"({'passed' if c['passed'] else 'FAILED'}, atol {c['atol']:g}, rtol {c['rtol']:g})"
        )
        line += (
            f"; {q['quantized']} weights {q['weights']} (block {q['block_size']}, {q['method']}), "
            f"{q['float_bytes'] / 1e6:.1f} MB -> {q['quantized_bytes'] / 1e6:.1f} MB; {check}"
        )
    what = "wrote" if result["written"] else "nothing written for"
    kept = f" (float export kept: {result['float_kept']})" if result.get("float_kept") else ""
    click.echo(f"{what} {result['output']}{kept}; {line}", err=True)
    return result
