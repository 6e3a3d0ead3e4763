"""CLI for ``gpcl-trt optimize``: a runtime-specific rewrite of an exported model
(passes/fuse_ort.py). Nothing heavy is imported until the command runs."""

from __future__ import annotations

import click

from gpcl_trt.cli import result_command


def register(main: click.Group) -> None:
    @result_command(
        main,
        "optimize",
        short_help="Rewrite a decoder for ONNX Runtime (faster generate).",
        help="Rewrite an exported decoder so that ONNX Runtime runs it faster, in standard ONNX ops: "
        "grouped-query attention without the repeat-KV copy of the cache, and RMSNorm in the form "
        "ORT fuses into one kernel. Inputs, outputs and the logits stay the same (within fp32 "
        "rounding); GPCL nodes survive, and `sites`, `insert` and `calibrate` work before or after. "
        "Run it once and give OUT.onnx to `generate`, `eval` or `triton`. Idempotent.",
    )
    @click.argument("model", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write (.onnx).")
    @click.option(
        "--for",
        "target",
        type=click.Choice(["ort"]),
        default="ort",
        show_default=True,
        help="The runtime to optimize for.",
    )
    @click.option(
        "--variant",
        type=click.Choice(["standard", "contrib", "contrib-gqa"]),
        default="standard",
        show_default=True,
        help="standard: standard ONNX ops only (a TensorRT build parses the result too). contrib: also "
        "ONNX Runtime's RotaryEmbedding and SkipSimplifiedLayerNormalization; contrib-gqa: also its "
        "GroupQueryAttention (com.microsoft ops: ONNX Runtime only, TensorRT cannot parse them; build "
        "engines from the export or the standard variant). contrib-gqa's caches can be one buffer "
        "preallocated to the maximum length, written in place (the manifest says kv_cache: shared-buffer; "
        "`generate` binds it so).",
    )
    @click.option(
        "--logits",
        type=click.Choice(["all", "last"]),
        default="all",
        show_default=True,
        help="all: logits at every position, as exported. last: the last position's only ([B, 1, V]); "
        "the output projection skips the other prompt positions, which makes the first token faster. "
        "`generate` and `triton` need no more; `eval`'s teacher-forced NLL needs all and refuses it.",
    )
    @click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
    def optimize(model, output, target, variant, logits, force) -> dict:
        from gpcl_trt.passes.fuse_ort import optimize_file

        result = optimize_file(model, output, target=target, variant=variant, force=force, logits=logits)
        contrib = "".join(
            f", {len(result[k])} {what}"
            for k, what in (
                ("contrib_attention", "attentions -> GroupQueryAttention"),
                ("contrib_rotary", "rotaries -> RotaryEmbedding"),
                ("skip_rmsnorm", "residual norms -> SkipSimplifiedLayerNormalization"),
            )
            if k in result
        )
        click.echo(
            f"wrote {output}: {len(result['grouped_attention'])} repeat-KV copies removed, "
            f"{len(result['rmsnorm_div'])} RMSNorms rewritten{contrib}, nodes {result['nodes_before']} -> "
            f"{result['nodes_after']}, kv cache {result['kv_cache']}, logits {result['logits']}"
            + ("" if result["changed"] else " (nothing to change)"),
            err=True,
        )
        return result
