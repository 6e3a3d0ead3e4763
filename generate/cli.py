"""CLI for generation: ``generate``. Calls gpcl_trt.generate.generate; the generated text goes to
stdout (to stderr with --json, whose object owns stdout), the summary to stderr. Nothing heavy is
imported until the command runs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gpcl_trt.cli import result_command
from gpcl_trt.common import GpclError


def _say(line: str) -> None:
    click.echo(line, err=True)


def _read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GpclError(f"cannot read --prompts {path}: {exc}") from None
    return [line for line in lines if line.strip()]


def register(main: click.Group) -> None:
    @result_command(
        main,
        "generate",
        short_help="Generate text from a decoder or an encoder-decoder export (ONNX Runtime or PyTorch).",
        help="Generate text from ARTIFACT: a decoder exported with past (.onnx, GPCL or not, fp32 or fp16; "
        "run in ONNX Runtime with its KV cache kept in ONNX Runtime buffers) or a Hugging Face model "
        "directory (PyTorch, the reference), or an encoder-decoder export directory (OUT/ with "
        "encoder_model.onnx and decoder_model_merged.onnx: T5, BART, Marian, Pegasus; Whisper with --audio). "
        "Prompts are batched with left padding; the prompt is "
        "prefilled in one call, then one token per step until an EOS id (generation_config.json, else "
        "config.json), a --stop string or --max-new-tokens. The tokenizer is the model directory's "
        "(found through the manifest chain) unless --tokenizer is given.",
    )
    @click.argument("artifact", type=click.Path())
    @click.option("--prompt", "prompt", multiple=True, help="A prompt (repeatable).")
    @click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="A file of prompts, one per line.")
    @click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
    @click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="0: greedy; above 0: sample at this temperature.",
    )
    @click.option(
        "--top-k",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Sample among the k most likely (0: off).",
    )
    @click.option(
        "--top-p",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=1.0,
        show_default=True,
        help="Sample from the smallest set of tokens whose probability reaches p (1: off).",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler (same seed, same text).")
    @click.option(
        "--stop", multiple=True, help="Stop when the text contains this string, cut from the output (repeatable)."
    )
    @click.option("--stream", is_flag=True, help="Print the text as it is generated (prompts then run one at a time).")
    @click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template as a user turn.")
    @click.option(
        "--tokenizer", type=click.Path(file_okay=False), default=None, help="Directory of the tokenizer to use."
    )
    @click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Prompts per batch (default: all).")
    @click.option(
        "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: the runtime's)."
    )
    @click.option("--allow-pickle", is_flag=True, help="Let PyTorch load a pickled (.bin) checkpoint.")
    @click.option(
        "--audio", multiple=True, type=click.Path(dir_okay=False), help="A WAV file to transcribe (Whisper export)."
    )
    def generate(
        artifact,
        prompt,
        prompts_file,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        stream,
        chat,
        tokenizer,
        batch_size,
        threads,
        allow_pickle,
        audio,
    ) -> dict:
        from gpcl_trt.generate import generate as run

        # the streamed text must not mix into the JSON object on stdout
        as_json = bool(click.get_current_context().params.get("as_json"))
        if prompt and prompts_file:
            raise GpclError("give --prompt or --prompts, not both")
        prompts = list(prompt) if prompt else _read_prompts(prompts_file) if prompts_file else []
        if not prompts and not audio:
            raise GpclError("no prompt: give --prompt TEXT or --prompts FILE")

        current: list[int] = []

        def on_text(i: int, piece: str) -> None:
            if current and current[-1] != i:  # prompts stream one after another, a line each
                click.echo("", err=as_json)
            current.append(i)
            click.echo(piece, nl=False, err=as_json)
            (sys.stderr if as_json else sys.stdout).flush()

        result = run(
            artifact,
            prompts,
            tokenizer=tokenizer,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            chat=chat,
            on_text=on_text if stream else None,
            batch_size=1 if stream else batch_size,
            threads=threads,
            allow_pickle=allow_pickle,
            audio=list(audio),
        )
        if stream and current:
            click.echo("", err=as_json)
        elif not stream and not as_json:
            for out in result["outputs"]:
                click.echo(out["text"])
        m = result["measurements"]
        ttft, tps = m["time_to_first_token_s"], m["decode_tokens_per_s"]
        _say(
            f"{m['prompts']} prompt(s), {m['prompt_tokens']} prompt tokens -> {m['new_tokens']} new tokens "
            f"({result['runtime']}); first token {ttft * 1e3:.1f} ms" + (f", decode {tps:.1f} tokens/s" if tps else "")
        )
        return result
