"""The one place for tolerance rules: the default tolerances per dtype and the pass rule that
every comparison of a candidate against a reference applies (export validation, per-layer diffs).

The rule is polygraphy's elementwise comparator (``polygraphy/comparator/compare.py``,
``check_error_stat="elemwise"``, the default): an element fails only when its difference exceeds
both the absolute tolerance and the relative one, and the relative one is read against the
*candidate*::

    |ref - cand| > atol  and  |ref - cand| > rtol * |cand|      (fails)

that is, an element passes when ``|ref - cand| <= max(atol, rtol * |cand|)``. As in polygraphy
(``infinities_compare_equal=False``), a NaN or infinity on either side fails: a difference that
cannot be measured is not within any tolerance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only where a rule runs: the CLI imports the defaults and must stay light
    import numpy as np

# Defaults of ``export --atol/--rtol`` by export dtype. fp32: the two runtimes differ by rounding
# order only (~1e-6 relative per op), so 1e-4 absolute and no relative part. 16-bit: the rounding
# error of a dot product follows the size of what is summed, not the element's own size, so a
# small element next to large ones carries their error: the absolute part must cover it (a
# 32-layer fp16 Llama, BENCHMARKS.md: 0.045 on a logit of 0.18, logits up to 6.4). bf16 keeps 3
# fewer mantissa bits than fp16 (8x the rounding); it is not validated on CPU today (ONNX
# Runtime's CPU provider has no bf16 MatMul).
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-1, "bf16": 5e-1}
DEFAULT_RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 5e-2}

# Defaults of ``diff`` (any two artifacts, typically of one precision: the runtimes differ by
# rounding order only).
DIFF_ATOL = 1e-4
DIFF_RTOL = 1e-3

# Defaults of ``diff`` when the candidate's weights were quantized and the reference's were not
# (a quantize stage in the candidate's manifest chain: quantize, export --quantize, a GPCL model
# or an engine made from one). Measured, RTN against fp32 (BENCHMARKS.md, Quantize): max |diff|
# 0.0065 (int8) / 0.082 (int4) on the tiny test Llama's logits, 0.097 / 0.98 on MiniLM's
# last_hidden_state (|x| up to ~10): the bounds cover int8 and int4 at block 128 with room, and a
# wrong scale (x100, or zeroed in a trained model) still fails.
QUANT_DIFF = {"int8": (0.15, 0.05), "int4": (1.0, 0.25)}


def diff_defaults(candidate_quant: dict | None, reference_quant: dict | None) -> tuple[float, float, str]:
    """(atol, rtol, which rule) for ``diff`` from the two sides' quantize options (None: float)."""
    w = (candidate_quant or {}).get("weights")
    if w in QUANT_DIFF and not reference_quant:
        where = f"{w}, block {candidate_quant.get('block_size')}, {candidate_quant.get('method', 'rtn')}"
        return (*QUANT_DIFF[w], f"quantized weights ({where}: the candidate's manifest)")
    return DIFF_ATOL, DIFF_RTOL, "float default"


RULE = "every element |ref - cand| <= max(atol, rtol * |cand|)"


def defaults(dtype: str) -> tuple[float, float]:
    """(atol, rtol) for an export in ``dtype`` (fp32, fp16, bf16)."""
    return DEFAULT_ATOL[dtype], DEFAULT_RTOL[dtype]


def _pair(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    import numpy as np

    r, c = np.asarray(ref), np.asarray(cand)
    if r.shape != c.shape:
        return None
    if r.dtype == bool and c.dtype == bool:
        return r.astype(np.float64), c.astype(np.float64)
    return r.astype(np.float64, copy=False), c.astype(np.float64, copy=False)


def failing(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Boolean mask of the elements that fail the rule (same shape as the inputs; shapes must
    match)."""
    import numpy as np

    pair = _pair(ref, cand)
    if pair is None:
        raise ValueError(f"shapes differ: {np.shape(ref)} vs {np.shape(cand)}")
    r, c = pair
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(r - c)
        bad = (err > atol) & (err > rtol * np.abs(c))
    return bad | ~np.isfinite(err) | ~np.isfinite(c)


def within(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> bool:
    """True when every element passes (and the shapes match)."""
    import numpy as np

    if np.shape(ref) != np.shape(cand):
        return False
    return not bool(np.any(failing(ref, cand, atol, rtol)))


def used(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> float:
    """The share of the tolerance the worst element uses: max over elements of
    ``|ref - cand| / max(atol, rtol * |cand|)``. At most 1 passes (``within``); 0 for equal
    arrays (even with zero tolerances); inf for a shape mismatch, a non-finite value, or a
    difference where both tolerances are 0."""
    import numpy as np

    pair = _pair(ref, cand)
    if pair is None:
        return float("inf")
    r, c = pair
    if r.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(r - c)
        if not (np.all(np.isfinite(err)) and np.all(np.isfinite(c))):
            return float("inf")
        bound = np.maximum(atol, rtol * np.abs(c))
        ratio = np.where(err == 0, 0.0, err / bound)  # 0 / 0: equal elements use nothing
    return float(np.max(ratio))


def used_by_outputs(
    ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], atol: float, rtol: float
) -> dict[str, float]:
    """``used`` per output name of ``ref``."""
    return {n: used(ref[n], cand[n], atol, rtol) for n in ref}
