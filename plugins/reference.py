"""The GPCL reference implementation: the oracle every other implementation is tested against.

Both functions follow docs/gpcl-spec.md and use one canonical float32 operation order, which
the CUDA math header (plugins/gpcl/gpcl_math.h) and the ONNX function body repeat, so the
implementations agree to the last bit wherever the platform's sqrt/tanh agree:

    ss(v) = ((v0*v0 + v1*v1) + v2*v2) + v3*v3
    rho   = sqrt(ss(q * 2^-66))             finite exactly when every channel is finite
    r     = sqrt(ss(q)), or rho * 2^66 where that is +Inf (the float32 sum overflowed,
            |q| > ~1.8e19; the rescaled sum cannot overflow, and for those groups the
            rescaling loses nothing)
    clamp: s = t / max(r, t);                     Y = q * s        (s == 1 exactly when r <= t)
    soft:  a = max(r / t, FLT_MIN); s = tanh(a) / a  (r >= eps), s = 1 (r < eps); Y = q * s
    hopf:  u = q / r; p = hopf(u); Y = (min(r, t) * (1/sqrt 2)) * (p0, p1, p2, 1); Y = 0 if r < eps
    non-finite rule: Y = NaN (all four) where rho is not finite (a NaN or Inf channel)

(The max with FLT_MIN only matters where r / t underflows to 0 or a subnormal, where
tanh(a) / a is 1 in float32 and would otherwise be 0/0.) One float32 limit remains: a finite
group whose true radius exceeds FLT_MAX (channels near 3.4e38) has r = +Inf in float32, so
clamp and soft give 0 and hopf (0, 0, 0, t/sqrt 2): bounded and finite, but not of norm t.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpcl_trt.gpcl import DEFAULT_EPS, MODE_IDS, MODES  # noqa: F401  (re-exported: the oracle's API)

INV_SQRT2 = float(np.float32(0.70710678118654752))  # the float32 value, as a Python float
RESCALE = 2.0**-66  # ss(q * RESCALE) stays finite for every finite float32 group (4 * (2^62)^2 < FLT_MAX)
FLOAT_MIN = float(np.finfo(np.float32).tiny)  # smallest normal float32, 2^-126


def check_args(d: int, tau_shape: tuple[int, ...], mode: str, eps: float) -> None:
    """Validate what every implementation refuses: D % 4, tau shape, mode, eps."""
    if mode not in MODE_IDS:
        raise ValueError(f"GPCL mode must be one of {', '.join(MODES)}, got {mode!r}")
    if d % 4 != 0:
        raise ValueError(f"GPCL needs the last axis to be a multiple of 4, got {d}")
    if tau_shape not in ((), (1,), (d // 4,)):
        raise ValueError(f"GPCL tau must be a scalar or have shape [D/4] = [{d // 4}], got {list(tau_shape)}")
    if not eps > 0:
        raise ValueError(f"GPCL eps must be > 0, got {eps}")


def _check_tau_values(tau: np.ndarray) -> None:
    if not np.all(tau > 0):  # also refuses NaN
        raise ValueError("GPCL tau must be > 0 (and finite)")


def gpcl_numpy(x: Any, tau: Any, mode: str = "clamp", eps: float = DEFAULT_EPS) -> np.ndarray:
    """GPCL of ``x`` (float32/float16/bfloat16 array, last axis D % 4 == 0) with scalar or
    per-group ``tau`` ([D/4]). Float32 math; the result is rounded once to ``x.dtype``."""
    x = np.asarray(x)
    if x.ndim < 1 or str(x.dtype) not in ("float32", "float16", "bfloat16", "float64"):
        raise ValueError(f"GPCL needs a floating-point array of rank >= 1, got {x.dtype} rank {x.ndim}")
    t = np.asarray(tau, dtype=np.float32)
    check_args(x.shape[-1], t.shape, mode, eps)
    _check_tau_values(t)
    q = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
    with np.errstate(all="ignore"):
        y = _gpcl_groups(np, q, t.reshape(-1, 1), mode, eps)
    return y.reshape(x.shape).astype(x.dtype)


def _gpcl_groups(xp, q, t, mode: str, eps: float):
    """The per-group math on float32 groups q [..., G, 4] with t [1|G, 1], written once for
    numpy and torch (``xp`` is either module; both spell these functions alike)."""
    eps = float(np.float32(eps))  # compare against the float32 value, as the kernel does

    def ss(v):
        return ((v[..., 0:1] * v[..., 0:1] + v[..., 1:2] * v[..., 1:2]) + v[..., 2:3] * v[..., 2:3]) + v[..., 3:4] * v[
            ..., 3:4
        ]

    rho = xp.sqrt(ss(q * RESCALE))
    r = xp.sqrt(ss(q))
    r = xp.where(xp.isinf(r), rho * (1.0 / RESCALE), r)
    if mode == "clamp":
        y = q * (t / xp.maximum(r, t))
    elif mode == "soft":
        a = (r / t).clip(FLOAT_MIN)  # a method both numpy and torch spell alike
        y = xp.where(r < eps, q, q * (xp.tanh(a) / a))
    else:
        u = q / r
        u0, u1, u2, u3 = u[..., 0:1], u[..., 1:2], u[..., 2:3], u[..., 3:4]
        p0 = 2 * (u0 * u2 + u1 * u3)
        p1 = 2 * (u1 * u2 - u0 * u3)
        p2 = (u0 * u0 + u1 * u1) - (u2 * u2 + u3 * u3)
        k = xp.minimum(r, t) * INV_SQRT2
        y = xp.concatenate([k * p0, k * p1, k * p2, k], axis=-1)
        y = xp.where(r < eps, xp.zeros_like(y), y)
    return xp.where(xp.isfinite(rho), y, y + float("nan"))  # non-finite rule: whole group NaN


def gpcl_torch(x, tau, mode: str = "clamp", eps: float = DEFAULT_EPS):
    """Torch version of :func:`gpcl_numpy` (fp32/fp16/bf16, any device); ``tau`` is a float or
    a tensor of shape [] or [D/4]. Differentiable; float32 math, rounded once to ``x.dtype``."""
    import torch

    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"GPCL needs a floating-point tensor of rank >= 1, got {x.dtype} rank {x.dim()}")
    t = torch.as_tensor(tau, dtype=torch.float32, device=x.device)
    check_args(x.shape[-1], tuple(t.shape), mode, eps)
    if not bool(torch.all(t > 0)):
        raise ValueError("GPCL tau must be > 0 (and finite)")
    q = x.float().reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
    return _gpcl_groups(torch, q, t.reshape(-1, 1), mode, eps).reshape(x.shape).to(x.dtype)
