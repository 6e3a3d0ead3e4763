"""Model patchers: functions swapped into a model (or into transformers' modules, while a core
runs: ``HeadCore.patches``) so that its own code exports to ONNX that runs fast and right. Each
says why; the per-architecture classes that install them are in exporter/overrides.py."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written as ``(x * (1 + erf(x / sqrt 2))) * 0.5``: the same numbers as
    ``0.5 * x * (...)`` (halving is exact), but the order ONNX Runtime's GELU fusion recognises,
    so the exported graph runs one BiasGelu kernel instead of five element-wise ops (the
    exporter's own decomposition multiplies by 0.5 first and is left unfused)."""
    return (x * (1.0 + torch.erf(x / math.sqrt(2.0)))) * 0.5


class _GeluErf(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_erf(x)


def use_fusable_gelu(model: torch.nn.Module) -> int:
    """Swap the model's exact GELUs (transformers' GELUActivation, torch.nn.GELU) for
    :func:`gelu_erf`; returns how many. Tanh and other approximations are left alone."""
    from transformers.activations import GELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, GELUActivation) and getattr(child, "act", None) is torch.nn.functional.gelu:
                child.act = gelu_erf
                swapped += 1
            elif type(child) is torch.nn.GELU and child.approximate == "none":
                setattr(parent, name, _GeluErf())
                swapped += 1
    return swapped


@contextlib.contextmanager
def fusable_functional_gelu():
    """While tracing code that calls ``torch.nn.functional.gelu`` itself rather than through a
    module (Whisper's convolutional front end), exact GELUs are written as :func:`gelu_erf`, so
    ONNX Runtime fuses them as it does the modules' (the default spelling, ``x * (0.5 * (1 +
    erf))``, runs as five element-wise kernels). Same numbers; other approximations untouched."""
    original = torch.nn.functional.gelu

    def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        return gelu_erf(x) if approximate == "none" else original(x, approximate=approximate)

    torch.nn.functional.gelu = gelu
    try:
        yield
    finally:
        torch.nn.functional.gelu = original


# ----------------------------------------------------------------------------- Falcon (ALiBi)
def falcon_alibi_bf16_emulated(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' Falcon ``build_alibi_tensor`` with its bfloat16 product spelled as float32
    arithmetic on bfloat16-rounded operands, rounded to bfloat16 once: the same numbers (a
    product of two 8-bit mantissas is exact in float32), but ONNX Runtime's CPU provider has no
    bfloat16 Mul, so the original exports and then cannot run (NOT_IMPLEMENTED: Mul(14))."""
    batch_size, seq_length = attention_mask.shape
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.full(
        (), 2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), device=attention_mask.device, dtype=torch.float32
    )
    powers = torch.arange(1, 1 + closest_power_of_2, device=attention_mask.device, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    if closest_power_of_2 != num_heads:
        extra_base = torch.full(
            (),
            2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))),
            device=attention_mask.device,
            dtype=torch.float32,
        )
        num_remaining_heads = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining_heads, 2, device=attention_mask.device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    arange_tensor = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    rounded = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    alibi = (rounded(slopes[..., None]) * rounded(arange_tensor)).to(torch.bfloat16)
    return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)


# ----------------------------------------------------------------------------- complex RoPE (DeepSeek-V2, Llama 4)
def rotary_as_real_pairs(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """A complex rotary module's forward with ``polar(1, freqs) * scaling`` kept as real
    (cos, sin) pairs in a last axis of 2."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _rotate_pairs(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``view_as_real(view_as_complex(x) * freqs).flatten(-2)``, in real arithmetic."""
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xr[..., 0], xr[..., 1]
    cos, sin = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def apply_rotary_pairs(head_axis: int) -> Any:
    """``apply_rotary_emb(xq, xk, freqs)`` on real pairs; the frequencies get a head axis at
    ``head_axis`` (1: q/k are [batch, heads, seq, dim]; 2: [batch, seq, heads, dim])."""

    def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = freqs.to(xq.device).unsqueeze(head_axis)
        return _rotate_pairs(xq, f), _rotate_pairs(xk, f)

    return apply_rotary_emb


# ----------------------------------------------------------------------------- dynamic-NTK RoPE
def dynamic_ntk_select(raw_forward: Any) -> Any:
    """A rotary module's forward for ``rope_type: dynamic`` (dynamic NTK scaling) with the
    frequency update as a select in the graph. transformers recomputes ``inv_freq`` in Python
    once the sequence outgrows ``max_position_embeddings`` (a branch on a tensor value, which
    torch.export cannot trace) and keeps the grown frequencies as state; here they are computed
    from this call's length every time and picked by ``where(length > max, grown, original)``,
    as transformers does for LongRoPE. That is what a fresh model computes at any length (the
    cached, stateful version differs only after a longer call)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def forward(self: Any, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None) -> Any:
        rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if "dynamic" in rope_type:
            prefix = "" if layer_type is None else f"{layer_type}_"
            seq_len = position_ids.max() + 1
            grown, _ = ROPE_INIT_FUNCTIONS[rope_type](self.config, x.device, seq_len=seq_len, **kwargs)
            original = getattr(self, f"{prefix}original_inv_freq").to(x.device)
            inv_freq = torch.where(seq_len > self.original_max_seq_len, grown.to(original.dtype), original)
            # in place, as transformers' LongRoPE update: the buffer the forward reads keeps its identity
            getattr(self, f"{prefix}inv_freq").copy_(inv_freq)
        return raw_forward(self, x, position_ids, **kwargs)

    return forward


def dynamic_rope_patches(model: torch.nn.Module) -> list[tuple[Any, str, Any]]:
    """``HeadCore.patches`` for every rotary module class of ``model`` with dynamic rope scaling
    (its forward is transformers' ``dynamic_rope_update`` wrapper around the plain one)."""
    patches, seen = [], set()
    for module in model.modules():
        cls = type(module)
        rope_type = getattr(module, "rope_type", None)
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        raw = getattr(cls.forward, "__wrapped__", None)
        if cls in seen or raw is None or not any(isinstance(t, str) and "dynamic" in t for t in types):
            continue
        seen.add(cls)
        patches.append((cls, "forward", dynamic_ntk_select(raw)))
    return patches
