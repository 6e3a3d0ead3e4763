"""The quantized model against a reference that dequantizes the same weights outside ONNX Runtime.

The reference is the quantized graph with each DequantizeLinear replaced by its numpy result
(rtn.dequantize of the stored values): the same weights, in float. Both run in ONNX Runtime on
one generated feed; the candidate with MatMulNBits' fp32 compute (accuracy level 1), so the two
differ by rounding order only and the fp32 diff tolerance applies. What it catches: ONNX Runtime
reading the stored data (int4 nibble order, block layout, axis, the scales' type) or the rewired
graph otherwise than the quantizer meant; not a wrong value that both sides read alike (the RTN
tests hold those against a plain reference). It holds the dequantized weights in float, so it
runs for models whose float weights are small (gpcl.LARGE_WEIGHT_BYTES) and is skipped, with the
reason, above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.quantize.rtn import dequantize, unpack_int4


def _values(t: Any) -> np.ndarray:
    from onnx import TensorProto, numpy_helper

    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        packed = np.frombuffer(t.raw_data, np.uint8)
        return unpack_int4(packed, n, t.data_type == TensorProto.INT4).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def dequantized_reference(model: Any) -> Any:
    """A copy of ``model`` (weights loaded) with every DequantizeLinear folded to a float constant."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes, folded = [], []
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            nodes.append(n)
            continue
        q = _values(inits[n.input[0]]).astype(np.int64)
        s = numpy_helper.to_array(inits[n.input[1]])
        z = _values(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 and n.input[2] else None
        block = next(a.i for a in n.attribute if a.name == "block_size")
        folded.append(numpy_helper.from_array(dequantize(q, s, z, block).astype(s.dtype), n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(folded)
    return m


def check_quantized(path: Path, float_type: str = "fp32") -> dict:
    """Run ``path`` and its dequantized reference on one generated feed; max |diff| per output
    against the diff tolerance (tolerance.py) of the model's float type."""
    import onnxruntime as ort

    from gpcl_trt import tolerance
    from gpcl_trt.common import load_onnx
    from gpcl_trt.feeds import make_feeds, ort_options, specs_from_onnx, vocab_size

    model = load_onnx(path)
    atol, rtol = (tolerance.DIFF_ATOL, tolerance.DIFF_RTOL) if float_type == "fp32" else tolerance.defaults(float_type)
    specs = specs_from_onnx(model)
    feed = make_feeds(specs, 2, 7, seed=1, vocab=vocab_size(model))
    try:
        opts = ort_options()
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 compute
        cand = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ref = ort.InferenceSession(dequantized_reference(model).SerializeToString(), ort_options())
        names = [o.name for o in cand.get_outputs()]
        got = dict(zip(names, cand.run(names, dict(feed))))
        want = dict(zip(names, ref.run(names, dict(feed))))
    except Exception as exc:
        raise GpclError(f"the quantized model does not run in ONNX Runtime ({one_line(exc)})") from None
    used = tolerance.used_by_outputs(want, got, atol, rtol)
    worst = max((float(np.max(np.abs(want[n].astype(np.float64) - got[n]))) for n in names), default=0.0)
    return {
        "reference": "the same weights dequantized in numpy (DequantizeLinear folded to constants)",
        "passed": all(u <= 1.0 for u in used.values()),
        "max_abs_diff": worst,
        "atol": atol,
        "rtol": rtol,
        "tolerance_used": max(used.values(), default=0.0),
    }
