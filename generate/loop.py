"""The one generation loop: prefill the (left-padded) prompt batch in one call, then one token per
row per step until every row has stopped (an EOS id, a caller's stop rule such as a stop string,
its token budget, or the model's last position). Token choice is greedy or sampled (temperature,
then top-k, then top-p, as transformers orders its warpers) from a seeded numpy Generator, so a
seed reproduces a run. The runtime keeps the cache (``runtimes.py``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from gpcl_trt.common import GpclError

# (prompt index, token id) -> True to stop that prompt here (the token is kept)
OnToken = Callable[[int, int], bool]


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax, the first of equal maxima, as torch does)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> "Sampling":
        if not self.temperature >= 0:
            raise GpclError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GpclError(f"top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GpclError(f"top-p must be in (0, 1] (1: off), got {self.top_p}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise GpclError("top-k and top-p sample: they need a temperature > 0 (temperature 0 is greedy)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of ``logits`` [batch, vocab]."""
    if sampling.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    x = np.asarray(logits, np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = np.partition(x, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if sampling.top_p < 1:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, axis=-1)
        p = np.exp(sorted_x - sorted_x[:, :1])
        p /= p.sum(axis=-1, keepdims=True)
        before = np.cumsum(p, axis=-1) - p  # probability mass of the more likely tokens
        drop = np.zeros_like(x, dtype=bool)
        np.put_along_axis(drop, order, before >= sampling.top_p, axis=-1)
        x = np.where(drop, -np.inf, x)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(x.shape[0]) * cdf[:, -1]
    return np.array([min(int(np.searchsorted(c, v, side="right")), len(c) - 1) for c, v in zip(cdf, u)], np.int64)


def _batches(lengths: Sequence[int], batch_size: int | None, by_length: bool) -> list[list[int]]:
    """Prompt indices per batch, in order; ``by_length``: only prompts of one length together."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n if by_length else 0, []).append(i)
    size = batch_size or len(lengths)
    return [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]


def decode(
    runtime: object,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: Iterable[int] = (),
    pad_id: int = 0,
    max_positions: int | None = None,
    batch_size: int | None = None,
    on_token: OnToken | None = None,
    reprefill_at: int | None = None,
) -> dict:
    """Generate for each prompt (token ids). Returns ``tokens`` (the new ids per prompt, an EOS
    included), ``finish`` per prompt (``eos``, ``stop``, ``length``) and ``measurements``: prompt
    and new token counts, time to first token (the first batch's prefill and first pick), decode
    tokens/s (tokens after each row's first over the time after the first pick).

    ``reprefill_at``: the model's own rule (Phi-3's, from transformers' Phi3ForCausalLM): when a
    batch's sequence (padding included) first grows past this length, the cache is dropped and
    the whole sequence is prefilled again. LongRoPE switches from its short to its long factors
    there, which changes every cached key; without it the logits drift."""
    if max_new_tokens < 1:
        raise GpclError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GpclError("every prompt needs at least one token")
    for i, p in enumerate(prompts):
        if max_positions is not None and len(p) >= max_positions:
            raise GpclError(
                f"prompt {i + 1} has {len(p)} tokens: the model has {max_positions} positions, "
                f"which leaves no room for a new token"
            )
    sampling = sampling.check()
    rng = np.random.default_rng(sampling.seed)
    eos = {int(e) for e in eos_ids}
    tokens: list[list[int]] = [[] for _ in prompts]
    finish = [""] * len(prompts)
    ttft = None
    decode_s = 0.0
    by_length = not getattr(runtime, "takes_positions", True)
    for idx in _batches([len(p) for p in prompts], batch_size, by_length):
        rows = len(idx)
        width = max(len(prompts[i]) for i in idx)
        ids = np.full((rows, width), pad_id, np.int64)
        mask = np.zeros((rows, width), np.int64)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = prompts[i]
            mask[r, width - len(prompts[i]) :] = 1
        # transformers' rule: positions count the row's own tokens; padding gets 1 (masked anyway)
        pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1)
        budget = [
            min(max_new_tokens, max_positions - len(prompts[i])) if max_positions else max_new_tokens for i in idx
        ]
        next_pos = pos[:, -1:] + 1
        done = np.zeros(rows, bool)
        if hasattr(runtime, "reserve"):  # the longest this batch can grow (a shared cache buffer)
            runtime.reserve(width + max(budget))
        t0 = time.perf_counter()
        logits = runtime.prefill(ids, mask, pos)
        t_first = None
        while True:
            step_ids = pick(logits, sampling, rng)
            if t_first is None:
                t_first = time.perf_counter()
                ttft = t_first - t0 if ttft is None else ttft
            for r, i in enumerate(idx):
                if done[r]:
                    step_ids[r] = pad_id
                    continue
                t = int(step_ids[r])
                tokens[i].append(t)
                if t in eos:
                    finish[i] = "eos"
                elif on_token is not None and on_token(i, t):
                    finish[i] = "stop"
                elif len(tokens[i]) >= budget[r]:
                    finish[i] = "length"
                done[r] = bool(finish[i])
            if done.all():
                break
            mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
            ids = np.concatenate([ids, step_ids[:, None]], axis=1)
            if reprefill_at is not None and mask.shape[1] == reprefill_at + 1:
                logits = runtime.prefill(ids, mask, np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 1))
            else:
                logits = runtime.step(step_ids[:, None], mask, next_pos)
            next_pos = next_pos + 1
        decode_s += time.perf_counter() - t_first
    new = sum(len(t) for t in tokens)
    after_first = new - len(prompts)
    return {
        "tokens": tokens,
        "finish": finish,
        "measurements": {
            "prompts": len(prompts),
            "prompt_tokens": sum(len(p) for p in prompts),
            "new_tokens": new,
            "time_to_first_token_s": ttft,
            "decode_s": decode_s,
            "decode_tokens_per_s": after_first / decode_s if decode_s > 0 and after_first > 0 else None,
        },
    }
