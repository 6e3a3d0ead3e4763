"""``gpcl-trt build`` and ``gpcl-trt inspect``: thin shells over engines.build_engine and
engines.inspect_engine. Nothing heavy is imported here (TensorRT loads inside the command)."""

from __future__ import annotations

from typing import Any

import click

from gpcl_trt.cli import result_command

_PATH = click.Path(dir_okay=False)


def register(main: click.Group) -> None:
    @result_command(main, "build", short_help="Build a TensorRT / TensorRT-RTX engine from an ONNX model.")
    @click.argument("onnx_path", metavar="IN.onnx", type=_PATH)
    @click.option(
        "-o",
        "--output",
        required=True,
        type=_PATH,
        help="Engine file to write (OUT.engine); its manifest goes next to it.",
    )
    @click.option(
        "--backend",
        type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
        default="auto",
        show_default=True,
        help="Builder library: full TensorRT or TensorRT-RTX (auto prefers full TensorRT when installed).",
    )
    @click.option(
        "--gpcl",
        type=click.Choice(["native", "plugin"]),
        default="native",
        show_default=True,
        help="GPCL implementation: native (the parser inlines the ONNX function, any backend; the build "
        "uses its flat, If-free body) or plugin (the CUDA plugin from --plugin-lib; full TensorRT only).",
    )
    @click.option(
        "--plugin-lib", type=_PATH, default=None, help="GPCL TensorRT plugin library (.so), for --gpcl plugin."
    )
    @click.option(
        "--precision",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        default="fp32",
        show_default=True,
        help="Compute precision: builder flags on full TensorRT; on TensorRT-RTX (strongly typed) the "
        "model is lowered to this type first, keeping float32 inputs and outputs.",
    )
    @click.option(
        "--shapes",
        multiple=True,
        metavar="NAME:MIN,OPT,MAX",
        help="Profile shapes for one input, e.g. input_ids:1x1,4x128,8x512 (repeatable). Defaults: batch 1,4,8; "
        "sequence, past_sequence and encoder_sequence 1,128,512 (an encoder-decoder's merged decoder: past_sequence "
        "from 0, its first step).",
    )
    @click.option(
        "--timing-cache",
        type=_PATH,
        default=None,
        help="Timing cache file to load and update (where the backend uses one).",
    )
    @click.option("--workspace", type=int, default=None, metavar="MiB", help="Workspace memory pool limit in MiB.")
    @click.option("--opt-level", type=int, default=None, metavar="N", help="Builder optimisation level, 0..5.")
    @click.option(
        "--strip-weights",
        is_flag=True,
        help="Write a weightless plan (STRIP_PLAN + REFIT), refitted from IN.onnx when it is loaded; "
        "the manifest records the model it needs.",
    )
    @click.option("--force", is_flag=True, help="Overwrite OUT.engine if it exists.")
    def build(onnx_path: str, output: str, **kw: Any) -> dict:
        """Build an engine from IN.onnx and write OUT.engine plus OUT.engine.manifest.json
        (ONNX and plugin hashes, backend, precision, profiles, GPCL implementation, layer summary,
        build time, engine check)."""
        from gpcl_trt.common import eprint
        from gpcl_trt.engines import build_engine
        from gpcl_trt.engines.inspection import format_summary

        result = build_engine(onnx_path, output, **kw)
        eprint(format_summary(result))
        return result

    @result_command(main, "inspect", short_help="Show an engine's manifest, layer summary and check.")
    @click.argument("engine_path", metavar="OUT.engine", type=_PATH)
    def inspect(engine_path: str) -> dict:
        """Print what OUT.engine holds (from its manifest and the engine itself) and check it:
        header validity without a GPU, deserialisation and the built layers with one."""
        from gpcl_trt.common import eprint
        from gpcl_trt.engines import inspect_engine
        from gpcl_trt.engines.inspection import format_summary

        result = inspect_engine(engine_path)
        eprint(format_summary(result))
        return result
