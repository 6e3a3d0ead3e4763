"""Round-to-nearest block quantization along the reduction axis, and ONNX's int4 packing.

A weight is handled as ``[K, N]`` (K, the axis the MatMul sums over, first), in blocks of
``block`` rows; each block of each column has one scale (and, asymmetric, one zero point):

- symmetric: ``scale = max|w| / qmax`` (qmax 7 for int4, 127 for int8), ``q = clip(rint(w / scale),
  qmin, qmax)``, stored as INT4 / INT8 with no zero point;
- asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``scale = (hi - lo) / qmax`` (15 or 255),
  ``zp = clip(rint(-lo / scale), 0, qmax)``, ``q = clip(rint(w / scale) + zp, 0, qmax)``, stored as
  UINT4 / UINT8 with a zero point of the same type.

The scale is rounded to the model's float type before ``q`` is computed, so what
``DequantizeLinear`` computes from the stored scale is what was quantized against. A block
whose scale is 0 (all zeros) stores zeros. ``rint`` rounds half to even (numpy's, and ONNX's
QuantizeLinear's). A last block shorter than ``block`` (K not a multiple) is what ONNX's
blocked DequantizeLinear defines: its scale row covers the remaining rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEIGHTS = ("int8", "int4")
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Scheme:
    """One quantization format: bits and symmetry, and the ONNX element types it stores."""

    weights: str  # int8 | int4
    symmetric: bool

    @property
    def bits(self) -> int:
        return 4 if self.weights == "int4" else 8

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def onnx_type(self) -> int:
        from onnx import TensorProto as TP

        return {
            (4, True): TP.INT4,
            (4, False): TP.UINT4,
            (8, True): TP.INT8,
            (8, False): TP.UINT8,
        }[self.bits, self.symmetric]

    @property
    def np_type(self) -> type:
        return np.int8 if self.symmetric else np.uint8

    def nbytes(self, count: int) -> int:
        """Stored bytes of ``count`` elements (int4: two per byte, the last byte half used)."""
        return (count + 1) // 2 if self.bits == 4 else count


def quantize_blocks(
    w: np.ndarray, block: int, scheme: Scheme, scale_dtype: np.dtype = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``w`` [k, n] in blocks of ``block`` rows: (q [k, n] in scheme.np_type,
    scale [ceil(k/block), n] in ``scale_dtype``, zero point like scale in scheme.np_type or None)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    wp = np.concatenate([w, np.zeros((pad, n), np.float32)]) if pad else w
    wb = wp.reshape(nb, block, n)
    if scheme.symmetric:
        amax = np.abs(wb).max(axis=1)
        scale = (amax / np.float32(scheme.qmax)).astype(scale_dtype)
    else:
        lo = np.minimum(wb.min(axis=1), 0)
        hi = np.maximum(wb.max(axis=1), 0)
        scale = ((hi - lo) / np.float32(scheme.qmax)).astype(scale_dtype)
    s = scale.astype(np.float32)  # what DequantizeLinear will multiply by
    nonzero = s > 0
    # w / scale where scale > 0, else 0: the block is all zeros (or its scale underflowed)
    r = np.divide(wb, s[:, None, :], out=np.zeros_like(wb), where=nonzero[:, None, :])
    zp = None
    if scheme.symmetric:
        q = np.clip(np.rint(r), scheme.qmin, scheme.qmax)
    else:
        neg_lo = np.divide(-lo, s, out=np.zeros_like(s), where=nonzero)
        zpf = np.clip(np.rint(neg_lo), 0, scheme.qmax)
        q = np.clip(np.rint(r) + zpf[:, None, :], 0, scheme.qmax)
        zp = zpf.astype(scheme.np_type)
    return q.reshape(nb * block, n)[:k].astype(scheme.np_type), scale, zp


def pack_int4(values: np.ndarray) -> np.ndarray:
    """ONNX's int4/uint4 layout: elements in row-major order, two per byte, the first in the
    low nibble; an odd count leaves the last high nibble 0."""
    flat = np.asarray(values).reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """The inverse of pack_int4: ``count`` elements as int8 (signed, sign-extended) or uint8."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(p.size * 2, np.uint8)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    out = out[:count]
    if signed:
        return ((out.astype(np.int16) ^ 8) - 8).astype(np.int8)
    return out


def encode(q: np.ndarray, scheme: Scheme) -> bytes:
    """The stored bytes of quantized values (row-major)."""
    return (pack_int4(q) if scheme.bits == 4 else np.ascontiguousarray(q, dtype=scheme.np_type)).tobytes()


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, block: int) -> np.ndarray:
    """What DequantizeLinear (axis 0, block_size ``block``) computes: (q - zp) * scale, float32."""
    k = q.shape[0]
    s = np.repeat(np.asarray(scale, np.float32), block, axis=0)[:k]
    x = q.astype(np.float32)
    if zero_point is not None:
        x = x - np.repeat(zero_point.astype(np.float32), block, axis=0)[:k]
    return x * s
