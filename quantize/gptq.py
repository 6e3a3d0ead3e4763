"""GPTQ (Frantar et al. 2022): block-wise RTN with the rounding error of each input channel
pushed onto the channels not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, ``H = X^T X`` over calibration activations ``X``.

Within this toolchain: the calibration is AWQ's (quantize/awq.py ``collect``: the kept rows of
each projection input, on disk); ``H`` comes from those rows (a few hundred per input, fewer
than K in a wide layer: the damping fills the rest). Each output column is independent, so a
weight is quantized a chunk of columns at a time, along K in the order it is stored; a block's
scale (and zero point) is RTN's (rtn.quantize_blocks) over the block's weights as updated when
the block starts, so the stored format and its reading are unchanged.

Memory: ``H`` and then its inverse's Cholesky factor ``U`` share one K x K float32 array (LAPACK
in place through scipy: 0.1 GB at K = 4864, 0.5 GB at K = 11008), built from the kept rows a chunk
at a time, one projection input's at a time (the previous one's freed first); the weight is
updated a chunk of columns at a time, a block of rows' errors pushed onto the later rows at once
(temporaries of K x chunk). Still K^2: GPTQ's memory grows with the widest K, AWQ's does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpcl_trt.common import GpclError
from gpcl_trt.quantize.rtn import Scheme, quantize_blocks

DAMP = 0.01  # of the mean diagonal, added to H (the reference implementation's default)
CHUNK_BYTES = 16 << 20  # float64 bytes of the columns of one weight quantized at a time
ROW_CHUNK = 256  # kept rows added to H at a time (a float32 copy of each chunk)


def inverse_factor(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``U``: the upper Cholesky factor of ``(X^T X + damp I)^-1`` (float32 [K, K]), and the
    channels no row activates (their weights are quantized as zeros: nothing reads them).

    With scipy, one K x K float32 array in all: H accumulated from the rows a chunk at a time
    (BLAS syrk, upper triangle), damped, then LAPACK's Cholesky, inverse from it, and Cholesky
    again, each in place in float32 as the reference implementation does on the GPU. Without
    scipy, numpy's inverse and Cholesky (float64 inside: several K x K temporaries)."""
    try:
        from scipy.linalg import blas, lapack
    except ImportError:  # pragma: no cover - scipy is declared; numpy's path is unbounded in K
        return _inverse_factor_numpy(rows)
    k = rows.shape[1]
    damp_scale = 1.0
    for _ in range(4):
        h = np.zeros((k, k), np.float32, order="F")  # LAPACK's layout: in place, no copy
        for r0 in range(0, len(rows), ROW_CHUNK):
            x = np.ascontiguousarray(rows[r0 : r0 + ROW_CHUNK], np.float32)
            blas.ssyrk(1.0, x.T, beta=1.0, c=h, trans=0, lower=0, overwrite_c=1)  # h += x^T x (upper)
        diag = np.diag_indices(k)
        dead = h[diag] == 0
        h[dead, dead] = 1.0
        damp = DAMP * damp_scale * float(np.mean(h[diag]))
        h[diag] += np.float32(damp)
        c, info = lapack.spotrf(h, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            c, info = lapack.spotri(c, lower=0, overwrite_c=1)  # H^-1, upper triangle
        if info == 0:
            c, info = lapack.spotrf(c, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            return c, dead  # h's memory (F order): U[i, j] for i <= j, zeros below
        del h, c  # float32 roundoff on a nearly singular H: rebuild it with more damping
        damp_scale *= 10
    raise GpclError("gptq: the calibration activations' Hessian is not positive definite")


def _inverse_factor_numpy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(rows, np.float32)
    h = x.T @ x
    diag = np.diag_indices_from(h)
    dead = h[diag] == 0
    h[dead, dead] = 1.0
    damp = DAMP * float(np.mean(h[diag]))
    h[diag] += np.float32(damp)
    for _ in range(4):
        try:
            hinv = np.linalg.inv(h)
            u = np.linalg.cholesky(hinv)
            break
        except np.linalg.LinAlgError:  # float32 roundoff on a nearly singular H: more damping
            h[diag] += np.float32(9 * damp)
            damp *= 10
    else:
        raise GpclError("gptq: the calibration activations' Hessian is not positive definite")
    del h, hinv
    return np.ascontiguousarray(u.T, np.float32), dead


def quantize_columns(
    w: np.ndarray, u: np.ndarray, dead: np.ndarray, block: int, scheme: Scheme, scale_dtype: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of ``w`` [K, m] (some of a weight's columns): as rtn.quantize_blocks returns."""
    w = np.array(w, np.float32)
    w[dead] = 0.0
    k, m = w.shape
    nb = -(-k // block)
    q = np.empty((k, m), scheme.np_type)
    scales = np.empty((nb, m), scale_dtype)
    zps = None if scheme.symmetric else np.empty((nb, m), scheme.np_type)
    lo, hi = (scheme.qmin, scheme.qmax) if scheme.symmetric else (0, scheme.qmax)
    for j, b0 in enumerate(range(0, k, block)):
        b1 = min(k, b0 + block)
        _, sv, zv = quantize_blocks(w[b0:b1], block, scheme, scale_dtype)
        scales[j] = sv[0]
        s = sv[0].astype(np.float32)
        z = np.float32(0) if zv is None else zv[0].astype(np.float32)
        if zps is not None:
            zps[j] = zv[0]
        err = np.empty((b1 - b0, m), np.float32)
        for i in range(b0, b1):
            r = np.divide(w[i], s, out=np.zeros(m, np.float32), where=s > 0)
            qi = np.clip(np.rint(r) + z, lo, hi)
            q[i] = qi
            e = (w[i] - (qi - z) * s) / u[i, i]
            w[i + 1 : b1] -= np.outer(u[i, i + 1 : b1], e)
            err[i - b0] = e
        w[b1:] -= u[b0:b1, b1:].T @ err  # the block's errors onto every later row at once
    return q, scales, zps


def quantize_weight(
    load: Any, k: int, n: int, u: np.ndarray, dead: np.ndarray, block: int, scheme: Scheme, scale_dtype: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of a whole weight, ``load(n0, n1)`` giving its columns as float32 [K, n1 - n0]: the
    quantized values (the weight's size in int8), scales and zero points, a chunk of columns at a time."""
    nb = -(-k // block)
    q = np.empty((k, n), scheme.np_type)
    scales = np.empty((nb, n), scale_dtype)
    zps = None if scheme.symmetric else np.empty((nb, n), scheme.np_type)
    step = max(1, CHUNK_BYTES // (8 * k))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        qc, sc, zc = quantize_columns(load(n0, n1), u, dead, block, scheme, scale_dtype)
        q[:, n0:n1], scales[:, n0:n1] = qc, sc
        if zps is not None:
            zps[:, n0:n1] = zc
    return q, scales, zps


class Calibrated:
    """The GPTQ of each weight, from its projection input's kept rows (awq.collect's groups):
    ``quantize(w)`` gives (q, scales, zero points) for the whole weight, or None for a weight
    left to RTN (its projections read different inputs). One input's ``U`` is held at a time;
    the output error against the float weights on the kept rows, GPTQ's and RTN's, is summed."""

    def __init__(self, groups: list, load: Any, block: int, scheme: Scheme, spill: Any):
        self.groups, self.spill = groups, spill
        self.group_of = {w.name: g for g in groups for w in g.weights}
        self.load, self.block, self.scheme = load, block, scheme
        self.rows = max((len(g.rows) for g in groups), default=0)
        self.current: Any = None
        self.factor: tuple | None = None
        self.errors = {"gptq": 0.0, "rtn": 0.0}

    def quantize(self, w: Any, scale_dtype: Any) -> tuple | None:
        from gpcl_trt.quantize.rtn import dequantize

        g = self.group_of.get(w.name)
        if g is None:
            return None
        if g is not self.current:
            self.current = self.factor = None  # the previous input's U freed before the next is built
            self.factor = inverse_factor(g.rows)
            self.current = g
        k, n = w.kn
        q, s, z = quantize_weight(
            lambda n0, n1: self.load(w, n0, n1), k, n, *self.factor, self.block, self.scheme, scale_dtype
        )
        x = np.asarray(g.rows, np.float32)
        step = max(1, CHUNK_BYTES // (8 * k))
        for n0 in range(0, n, step):  # the output error on the kept rows, a chunk of columns at a time
            n1 = min(n, n0 + step)
            wf = self.load(w, n0, n1)
            ref = x @ wf
            got = x @ dequantize(q[:, n0:n1], s[:, n0:n1], None if z is None else z[:, n0:n1], self.block)
            rq, rs, rz = quantize_blocks(wf, self.block, self.scheme, scale_dtype)
            self.errors["gptq"] += float(np.square(got - ref).sum())
            self.errors["rtn"] += float(np.square(x @ dequantize(rq, rs, rz, self.block) - ref).sum())
        return q, s, z

    def close(self) -> None:
        """Drop the kept rows (their mappings, and the folder ``spill`` that holds their file)."""
        import shutil

        for g in self.groups:
            g.rows = None
        self.current = self.factor = None
        shutil.rmtree(self.spill, ignore_errors=True)

    def summary(self, groups: list, plain: dict, data: dict) -> dict:
        rtn, err = self.errors["rtn"], self.errors["gptq"]
        return {
            "data": data,
            "groups": len(groups),
            "plain_rtn": plain,
            "calibration_error_vs_rtn": round(err / rtn, 4) if rtn > 0 else None,
            "rows_per_input": self.rows,
        }
