"""Lower an fp32 ONNX model to fp16/bf16 compute for strongly typed backends.

TensorRT-RTX builds strongly typed networks only (no BuilderFlag.FP16/BF16): a tensor's type
in the engine is its type in the ONNX model. So ``--precision fp16`` there means: float
initializers and constants become fp16, Casts to float become Casts to fp16, and the graph's
float inputs/outputs keep float32 through boundary Casts, so callers feed and read the same
types at every precision. GPCL's tau stays float32 (the spec computes GPCL in float32 and its
function body casts everything it reads), and model-local function bodies are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpcl_trt.common import GpclError

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FP16_MAX = 65504.0


def _lower_array(a: np.ndarray, precision: str) -> TensorProto:
    if precision == "fp16":
        # -finfo(float32).max masks (transformers' attention bias) would become -inf, and
        # -inf * 0 is NaN; the largest finite fp16 keeps them a finite, huge bias.
        return numpy_helper.from_array(np.clip(a, -_FP16_MAX, _FP16_MAX).astype(np.float16))
    import ml_dtypes

    return numpy_helper.from_array(a.astype(ml_dtypes.bfloat16))


def _lower_tensor(t: TensorProto, precision: str) -> TensorProto:
    out = _lower_array(numpy_helper.to_array(t).astype(np.float32), precision)
    out.name = t.name
    return out


def _is_float(t: TensorProto) -> bool:
    return t.data_type == TensorProto.FLOAT


def _keep_fp32_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors that must stay float32: GPCL's tau input (spec: float32[] or float32[D/4])."""
    return {n.input[1] for n in graph.node if n.domain == "gpcl" and len(n.input) > 1 and n.input[1]}


def _lower_graph(graph: onnx.GraphProto, precision: str, low: int, keep: set[str]) -> None:
    for i, init in enumerate(graph.initializer):
        if _is_float(init) and init.name not in keep:
            graph.initializer[i].CopyFrom(_lower_tensor(init, precision))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = low
            elif attr.type == onnx.AttributeProto.TENSOR and _is_float(attr.t) and node.output[0] not in keep:
                # Constant(value=...), ConstantOfShape(value=...)
                attr.t.CopyFrom(_lower_tensor(attr.t, precision))
            elif (
                node.op_type == "Constant"
                and attr.name in ("value_float", "value_floats")
                and node.output[0] not in keep
            ):
                value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
                attr.CopyFrom(helper.make_attribute("value", _lower_array(value, precision)))
            elif attr.type == onnx.AttributeProto.GRAPH:
                _lower_graph(attr.g, precision, low, keep)
    # Intermediate type annotations are now stale; the parser infers types itself.
    del graph.value_info[:]


def _rename(graph: onnx.GraphProto, old: str, new: str, fields: tuple[str, ...]) -> None:
    for node in graph.node:
        for field in fields:
            names = getattr(node, field)
            for k, name in enumerate(names):
                if name == old:
                    names[k] = new


def _retype_io(graph: onnx.GraphProto, low: int, keep: set[str]) -> None:
    """Keep float32 at the graph boundary: Cast float inputs down (except those in ``keep``,
    e.g. a GPCL tau fed as a graph input), Cast float outputs up."""
    head, tail = [], []
    for inp in (i for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT and i.name not in keep):
        _rename(graph, inp.name, f"{inp.name}/lowp", ("input",))
        head.append(helper.make_node("Cast", [inp.name], [f"{inp.name}/lowp"], to=low, name=f"{inp.name}/cast_lowp"))
    for out in (o for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT):
        # The producer writes the low-precision tensor (which may also feed other nodes).
        _rename(graph, out.name, f"{out.name}/lowp", ("input", "output"))
        tail.append(
            helper.make_node(
                "Cast", [f"{out.name}/lowp"], [out.name], to=TensorProto.FLOAT, name=f"{out.name}/cast_fp32"
            )
        )
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)


def lower_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``precision`` (fp16 | bf16) with float32 I/O."""
    if precision not in LOW_TYPES:
        raise GpclError(f"cannot lower a model to {precision!r}; choose one of {', '.join(LOW_TYPES)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    low = LOW_TYPES[precision]
    keep = _keep_fp32_names(out.graph)
    _lower_graph(out.graph, precision, low, keep)
    _retype_io(out.graph, low, keep)
    return out
