"""``generate``: text in, text out, for an exported decoder (ONNX Runtime) or its Hugging Face
model directory (PyTorch, the reference). The tokenizer, EOS ids and the number of positions come
from the model directory, found through the manifest chain (or given)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from gpcl_trt.common import GpclError
from gpcl_trt.generate.detok import TextStream, load_tokenizer
from gpcl_trt.generate.loop import Sampling, decode
from gpcl_trt.generate.rules import model_settings  # noqa: F401  (EOS ids, positions, rules: manifest, else config)

ENGINE_SUFFIXES = (".engine", ".plan")

# (prompt index, text piece) as it becomes stable
OnText = Callable[[int, str], None]


def resolve(artifact: str | os.PathLike) -> tuple[str, Path | None]:
    """(kind, HF model directory): kind ``pytorch`` for a model directory, ``onnxruntime`` for an
    .onnx file (its directory from the manifest chain, None when there is no manifest)."""
    p = Path(artifact)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GpclError(f"{p} is a directory without config.json: not a Hugging Face model directory")
        return "pytorch", p
    if not p.exists():
        raise GpclError(f"{p} does not exist")
    if p.suffix in ENGINE_SUFFIXES:
        raise GpclError(f"{p.name}: generating from an engine needs a TensorRT runtime with a GPU (none here)")
    if p.suffix != ".onnx":
        raise GpclError(f"{p.name} is neither an .onnx decoder nor a Hugging Face model directory")
    from gpcl_trt.manifest import model_dir_of

    return "onnxruntime", model_dir_of(p)


def open_runtime(artifact: str | os.PathLike, threads: int | None = None, allow_pickle: bool = False) -> Any:
    """The runtime for an artifact: OrtRuntime for a with-past .onnx, TorchRuntime for a model dir."""
    from gpcl_trt.generate.runtimes import OrtRuntime, TorchRuntime

    kind, _ = resolve(artifact)
    if kind == "pytorch":
        return TorchRuntime(artifact, allow_pickle=allow_pickle, threads=threads)
    return OrtRuntime(artifact, threads=threads)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GpclError("--chat: the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def generate(
    artifact: str | os.PathLike,
    prompts: Sequence[str],
    *,
    tokenizer: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    on_text: OnText | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    allow_pickle: bool = False,
    runtime: Any = None,
    audio: Sequence[str | os.PathLike] = (),
) -> dict:
    """Generate text for each prompt. ARTIFACT: a with-past .onnx (ONNX Runtime) or a Hugging
    Face model directory (PyTorch). ``on_text(i, piece)`` receives prompt i's text as it becomes
    stable (whole characters, never part of a stop string); the pieces of a prompt join to its
    ``text``. ``runtime``: an open runtime for ARTIFACT, to reuse a loaded session. An
    encoder-decoder export (its directory, or either graph in it) goes to generate/seq2seq.py;
    ``audio``: WAV files for a speech one (Whisper)."""
    from gpcl_trt.generate import seq2seq

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if seq2seq.export_files(artifact) is not None:
        sampling = Sampling(float(temperature), int(top_k), float(top_p), int(seed))
        return seq2seq.generate_seq2seq(
            artifact, prompts, audio=audio, tokenizer=tokenizer, max_new_tokens=max_new_tokens, sampling=sampling,
            stop=stop, on_text=on_text, batch_size=batch_size, threads=threads,
        )  # fmt: skip
    if audio:
        raise GpclError(f"--audio needs a speech encoder-decoder export (a Whisper directory); {artifact} is not one")
    if not prompts:
        raise GpclError("no prompt: give --prompt TEXT or --prompts FILE")
    sampling = Sampling(float(temperature), int(top_k), float(top_p), int(seed)).check()
    if max_new_tokens < 1:
        raise GpclError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    _, model_dir = resolve(artifact)
    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if tok_dir is None:
        raise GpclError(f"{Path(artifact).name} has no model directory in its manifest chain: pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    config_dir = model_dir or (tok_dir if (tok_dir / "config.json").is_file() else None)
    settings = model_settings(config_dir, tok, artifact=artifact)
    prompt_ids = encode_prompts(tok, prompts, chat)
    for i, ids in enumerate(prompt_ids):  # before loading the model: a long prompt fails fast
        if settings["max_positions"] is not None and len(ids) >= settings["max_positions"]:
            raise GpclError(
                f"prompt {i + 1} has {len(ids)} tokens: the model has {settings['max_positions']} positions, "
                f"which leaves no room for a new token"
            )
    rt = runtime if runtime is not None else open_runtime(artifact, threads=threads, allow_pickle=allow_pickle)
    streams = [TextStream(tok, stop) for _ in prompts]

    def on_token(i: int, token: int) -> bool:
        stopped = streams[i].add(token)
        if on_text is not None:
            piece = streams[i].pending()
            if piece:
                on_text(i, piece)
        return stopped

    eos = set(settings["eos_ids"])
    out = decode(
        rt,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos,
        pad_id=settings["pad_id"],
        max_positions=settings["max_positions"],
        batch_size=batch_size,
        on_token=on_token,
        reprefill_at=settings["reprefill_at"],
    )
    outputs = []
    for i, prompt in enumerate(prompts):
        s = streams[i]
        s.finish()
        if on_text is not None:
            piece = s.pending()
            if piece:
                on_text(i, piece)
        outputs.append(
            {
                "prompt": prompt,
                "text": s.text,
                "tokens": out["tokens"][i],
                "prompt_tokens": len(prompt_ids[i]),
                "finish": out["finish"][i],
            }
        )
    return {
        "artifact": str(artifact),
        "runtime": rt.name,
        "model_dir": str(model_dir) if model_dir else None,
        "tokenizer": str(tok_dir),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
        | ({"seed": sampling.seed} if not sampling.greedy else {}),
        "max_new_tokens": max_new_tokens,
        "eos_ids": sorted(eos),
        "rules": {"reprefill_at": settings["reprefill_at"]} if settings["reprefill_at"] else {},
        "stop": list(stop),
        "outputs": outputs,
        "measurements": out["measurements"],
    }
