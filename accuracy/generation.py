"""Accuracy at the level users see, for decoders: ``gpcl-trt eval``.

- Greedy agreement over a prompts file: each prompt's first N new tokens from the reference and
  from the candidate (the one generation loop, greedy, EOS ignored so both make N tokens or run
  to the last position); agreement is the share of prompts whose tokens are identical, and the
  first divergence is the step (0-based new token) where they first differ, averaged over the
  prompts that diverge.
- Teacher-forced NLL over a text file (one sequence per non-empty line, cut to the model's
  positions): the mean negative log-likelihood of each next token given the true ones before it,
  over all predicted tokens, and its perplexity exp(NLL), for both sides.

Reference and candidate are any of: a Hugging Face model directory (PyTorch), a with-past .onnx
(ONNX Runtime), GPCL or not. The tokenizer comes from the manifest chain (either side) or
``tokenizer``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpcl_trt.common import GpclError, one_line


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GpclError(f"cannot read {what} {path}: {exc}") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise GpclError(f"{what} {path} has no non-empty line")
    return lines


def all_logits(runtime: Any, ids: np.ndarray) -> np.ndarray:
    """Logits at every position of ``ids`` [1, n] in one call, float32 [n, vocab] (no cache kept)."""
    from gpcl_trt.generate.runtimes import OrtRuntime

    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    if isinstance(runtime, OrtRuntime):
        feeds = {}
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            if name in runtime.inputs:
                feeds[name] = np.ascontiguousarray(value, runtime.inputs[name].dtype)
        for spec in runtime.past:
            feeds[spec.name] = runtime._empty_past(spec, 1)
        try:
            (logits,) = runtime.session.run(["logits"], feeds)
        except Exception as exc:
            raise GpclError(f"ONNX Runtime failed on {runtime.path.name}: {one_line(exc)}") from None
        if logits.shape[1] != ids.shape[1]:
            raise GpclError(
                f"{runtime.path.name} gives the last position's logits only (optimize --logits last): "
                f"teacher-forced NLL needs every position; evaluate the model it was optimized from"
            )
        return np.asarray(logits[0], np.float32)
    import torch

    kw: dict[str, Any] = {"attention_mask": torch.from_numpy(mask)}
    if runtime.takes_positions:
        kw["position_ids"] = torch.from_numpy(pos)
    with torch.inference_mode():
        out = runtime.model(input_ids=torch.from_numpy(ids), use_cache=False, **kw)
    return out.logits[0].float().numpy()


def nll(runtime: Any, sequences: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Teacher-forced mean NLL (nats per predicted token) and perplexity over ``sequences``."""
    total, count, per = 0.0, 0, []
    for seq in sequences:
        ids = np.array([list(seq)], np.int64)
        x = all_logits(runtime, ids)[:-1].astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        token_nll = -logp[np.arange(len(seq) - 1), ids[0, 1:]]
        total += float(token_nll.sum())
        count += len(token_nll)
        per.append(float(token_nll.mean()))
    mean = total / count
    return {"mean_nll": mean, "perplexity": math.exp(mean), "tokens": count, "per_sequence_nll": per}


def greedy_tokens(runtime: Any, prompts: Sequence[Sequence[int]], n: int, settings: dict) -> list[list[int]]:
    from gpcl_trt.generate.loop import decode

    out = decode(
        runtime,
        prompts,
        max_new_tokens=n,
        eos_ids=(),
        pad_id=settings["pad_id"],
        max_positions=settings["max_positions"],
        batch_size=1,  # each prompt alone: no padding effect in either runtime
        reprefill_at=settings["reprefill_at"],
    )
    return out["tokens"]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, Any]:
    diverge = []
    for r, c in zip(reference, candidate):
        step = next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), None)
        if step is None and len(r) != len(c):
            step = min(len(r), len(c))
        diverge.append(step)
    steps = [s for s in diverge if s is not None]
    return {
        "greedy_agreement": (len(diverge) - len(steps)) / len(diverge),
        "prompts_agreeing": len(diverge) - len(steps),
        "mean_first_divergence": sum(steps) / len(steps) if steps else None,
        "first_divergence": diverge,
    }


def evaluate(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    prompts: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    tokenizer: str | os.PathLike | None = None,
    threads: int | None = None,
    allow_pickle: bool = False,
    nll_rtol: float = 1e-3,
    min_agreement: float = 1.0,
    prompt_lines: Sequence[str] | None = None,
    text_lines: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Greedy agreement (``prompts``) and teacher-forced NLL (``text``) of CANDIDATE against
    REFERENCE. ``ok`` is False when the greedy agreement is below ``min_agreement`` or the
    candidate's NLL exceeds the reference's by more than ``nll_rtol`` (relative)."""
    from gpcl_trt.generate.api import open_runtime, resolve
    from gpcl_trt.generate.detok import load_tokenizer
    from gpcl_trt.generate.rules import model_settings

    if prompts is None and text is None and not prompt_lines and not text_lines:
        raise GpclError("nothing to evaluate: give --prompts FILE and/or --text FILE")
    if max_new_tokens < 1:
        raise GpclError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    prompt_lines = _read_lines(prompts, "--prompts") if prompts is not None else list(prompt_lines or [])
    text_lines = _read_lines(text, "--text") if text is not None else list(text_lines or [])
    dirs = [resolve(a)[1] for a in (reference, candidate)]
    tok_dir = Path(tokenizer) if tokenizer is not None else next((d for d in dirs if d is not None), None)
    if tok_dir is None:
        raise GpclError("neither side has a model directory in its manifest chain: pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    config_dir = next((d for d in dirs if d is not None), None) or tok_dir
    # the model's rules from either side's manifest chain (the same model), else its config files
    found = (model_settings(config_dir, tok, artifact=a) for a in (candidate, reference))
    settings = next((s for s in found if s["from"] == "manifest"), None) or model_settings(config_dir, tok)
    limit = settings["max_positions"]
    prompt_ids = [list(tok(p)["input_ids"]) for p in prompt_lines]
    for i, ids in enumerate(prompt_ids):
        if not ids or (limit is not None and len(ids) >= limit):
            raise GpclError(f"prompt {i + 1} has {len(ids)} tokens: needs 1 to {limit - 1 if limit else 'any'}")
    text_ids = [list(tok(t)["input_ids"])[:limit] if limit else list(tok(t)["input_ids"]) for t in text_lines]
    text_ids = [ids for ids in text_ids if len(ids) >= 2]
    if text_lines and not text_ids:
        raise GpclError(f"--text {text}: no line has two tokens (nothing to predict)")

    result: dict[str, Any] = {
        "reference": str(reference),
        "candidate": str(candidate),
        "tokenizer": str(tok_dir),
        "max_new_tokens": max_new_tokens,
        "generation_rules": {"rules": settings["rules"], "from": settings["from"]},
    }
    sides = {}
    for role, artifact in (("reference", reference), ("candidate", candidate)):
        rt = open_runtime(artifact, threads=threads, allow_pickle=allow_pickle)
        sides[role] = {"runtime": rt.name}
        if prompt_ids:
            sides[role]["tokens"] = greedy_tokens(rt, prompt_ids, max_new_tokens, settings)
        if text_ids:
            sides[role]["nll"] = nll(rt, text_ids)
        del rt
    result["runtimes"] = {role: s["runtime"] for role, s in sides.items()}
    ok = True
    if prompt_ids:
        agree = agreement(sides["reference"]["tokens"], sides["candidate"]["tokens"])
        result["generation"] = {"prompts": len(prompt_ids), **agree}
        result["generation"]["min_agreement"] = min_agreement
        ok = ok and agree["greedy_agreement"] >= min_agreement
    if text_ids:
        ref, cand = sides["reference"]["nll"], sides["candidate"]["nll"]
        delta = cand["mean_nll"] - ref["mean_nll"]
        result["nll"] = {
            "sequences": len(text_ids),
            "tokens": ref["tokens"],
            "reference_nll": ref["mean_nll"],
            "candidate_nll": cand["mean_nll"],
            "reference_perplexity": ref["perplexity"],
            "candidate_perplexity": cand["perplexity"],
            "nll_delta": delta,
            "nll_rtol": nll_rtol,
        }
        ok = ok and delta <= nll_rtol * abs(ref["mean_nll"])
    result["ok"] = ok
    return result


# What the pipeline evaluates a decoder on when no prompts are given: a few everyday prompts, and
# the same lines as text for the NLL.
PIPELINE_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
)


def pipeline_eval(reference: str | os.PathLike, candidate: str | os.PathLike, max_new_tokens: int = 16) -> dict | None:
    """The pipeline's generation-level check of a GPCL decoder (reported, not gating): None when
    the candidate is not a decoder exported with past; ``skipped`` with the reason when it cannot
    run (no tokenizer). The reference is the PyTorch model directory or an ONNX decoder."""
    from gpcl_trt.common import load_onnx
    from gpcl_trt.feeds import is_past
    from gpcl_trt.generate.api import resolve

    if Path(candidate).suffix != ".onnx":
        return None
    if not any(is_past(i.name) for i in load_onnx(candidate, external_data=False).graph.input):
        return None
    if all(resolve(a)[1] is None for a in (reference, candidate)):
        return {"skipped": "no model directory in the manifest chain (no tokenizer)"}
    try:
        r = evaluate(
            reference,
            candidate,
            max_new_tokens=max_new_tokens,
            min_agreement=0.0,
            nll_rtol=float("inf"),
            prompt_lines=PIPELINE_PROMPTS,
            text_lines=PIPELINE_PROMPTS,
        )
    except GpclError as exc:
        return {"skipped": str(exc)}
    g, n = r["generation"], r["nll"]
    return {
        "prompts": g["prompts"],
        "max_new_tokens": max_new_tokens,
        "greedy_agreement": g["greedy_agreement"],
        "mean_first_divergence": g["mean_first_divergence"],
        "reference_nll": n["reference_nll"],
        "candidate_nll": n["candidate_nll"],
        "reference_perplexity": n["reference_perplexity"],
        "candidate_perplexity": n["candidate_perplexity"],
    }


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"reference {result['reference']} ({result['runtimes']['reference']})"]
    lines.append(f"candidate {result['candidate']} ({result['runtimes']['candidate']})")
    g = result.get("generation")
    if g:
        div = g["mean_first_divergence"]
        lines.append(
            f"greedy agreement {g['greedy_agreement']:.3f} ({g['prompts_agreeing']}/{g['prompts']} prompts, "
            f"{result['max_new_tokens']} new tokens); mean first divergence "
            + ("none" if div is None else f"step {div:.1f}")
        )
    n = result.get("nll")
    if n:
        lines.append(
            f"teacher-forced NLL {n['reference_nll']:.4f} -> {n['candidate_nll']:.4f} (delta {n['nll_delta']:+.2e}); "
            f"perplexity {n['reference_perplexity']:.3f} -> {n['candidate_perplexity']:.3f} "
            f"({n['tokens']} tokens, {n['sequences']} lines)"
        )
    lines.append("eval " + ("ok" if result["ok"] else "FAILED: the candidate's text differs from the reference's"))
    return lines
