"""onnx-graphsurgeon plumbing shared by the passes: loading and saving a model without losing
what graphsurgeon drops (node metadata, model metadata), and the few graph predicates that site
finding and insertion both need."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from gpcl_trt.common import load_onnx_graph
from gpcl_trt.gpcl import GPCL_DOMAIN, GPCL_OP, SCOPES_KEY, parse_scopes

# Ops that only re-view or re-type a tensor: a projection reached through them (GPT-2's Conv1D
# flattens to 2-D before its Gemm) still projects the same hidden state; GPCL is see-through so
# that site finding works the same on a model that already has GPCL in it.
TRANSPARENT_OPS = {"Reshape", "Flatten", "Cast", "Identity", "Squeeze", "Unsqueeze"}
PROJECTION_OPS = {"MatMul", "Gemm"}
# Ops that only prepare a weight (constant folding left undone).
WEIGHT_PREP_OPS = {"Transpose", "Cast", "Identity", "DequantizeLinear", "Reshape"}
NORM_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
}


def is_gpcl(node: gs.Node) -> bool:
    return node.op == GPCL_OP and node.domain == GPCL_DOMAIN


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def is_const(t: gs.Tensor, depth: int = 4) -> bool:
    """A weight: an initializer, a Constant node, or a shallow transform of one."""
    if isinstance(t, gs.Constant):
        return True
    p = producer(t)
    if p is None or depth == 0:
        return False
    if p.op == "Constant":
        return True
    return p.op in WEIGHT_PREP_OPS and bool(p.inputs) and is_const(p.inputs[0], depth - 1)


def weight_shape(t: gs.Tensor, depth: int = 4) -> tuple[int, ...] | None:
    """A weight's shape as its consumer sees it, read through the ops that prepare it: exported
    graphs declare no intermediate shapes, and a lazy export leaves ``Transpose(W)`` of each
    projection for the runtime to fold."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    p = producer(t)
    if p is None or depth == 0:
        return None
    if p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return tuple(int(d) for d in p.attrs["value"].shape)
    if not p.inputs or p.op not in {"Transpose", "Cast", "Identity", "DequantizeLinear"}:
        return None
    shape = weight_shape(p.inputs[0], depth - 1)
    if shape is None or p.op != "Transpose":
        return shape
    perm = p.attrs.get("perm") or list(reversed(range(len(shape))))
    return tuple(shape[i] for i in perm) if len(perm) == len(shape) else None


def is_projection(node: gs.Node) -> bool:
    """A linear layer: MatMul/Gemm of an activation by a constant weight."""
    return (
        node.op in PROJECTION_OPS
        and len(node.inputs) >= 2
        and is_const(node.inputs[1])
        and not is_const(node.inputs[0])
    )


def is_expert_projection(node: gs.Node) -> bool:
    """A mixture-of-experts block's batched matmul, weights first: ``W_e @ x`` where ``W_e`` is
    picked per token from a constant bank of expert weights (a Gather by indices computed from
    the data, e.g. the router's top-k). Its activation is input 1."""
    if node.op != "MatMul" or len(node.inputs) < 2 or is_const(node.inputs[1]):
        return False
    p, depth = producer(node.inputs[0]), 4
    while p is not None and depth and p.op in WEIGHT_PREP_OPS and p.inputs:
        p, depth = producer(p.inputs[0]), depth - 1
    return (
        p is not None
        and p.op in ("Gather", "GatherND", "GatherElements")
        and len(p.inputs) >= 2
        and is_const(p.inputs[0])
        and not is_const(p.inputs[1])
    )


def see_through(t: gs.Tensor) -> gs.Tensor:
    """Walk back from ``t`` through view/cast ops and GPCL nodes to the tensor they re-present."""
    while True:
        p = producer(t)
        if p is None or not p.inputs or not (p.op in TRANSPARENT_OPS or is_gpcl(p)):
            return t
        t = p.inputs[0]


# ----------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A model as a graphsurgeon graph plus what graphsurgeon would drop on the way back."""

    path: Path
    model: onnx.ModelProto
    graph: gs.Graph
    node_metadata: dict[str, list[onnx.StringStringEntryProto]] = field(default_factory=dict)

    @property
    def scopes(self) -> dict[str, list[str]]:
        """node name -> module scopes recorded by the dynamo exporter (outermost first)."""
        out = {}
        for name, props in self.node_metadata.items():
            for p in props:
                if p.key == SCOPES_KEY:
                    out[name] = parse_scopes(p.value)
        return out


def load_graph(path: str | Path) -> LoadedModel:
    """Load an ONNX file's graph (one clear GpclError if it is not one) and import it into
    graphsurgeon. External weights are not read: they stay where they are, referenced."""
    p = Path(path)
    return from_proto(load_onnx_graph(p), p)


def from_proto(model: onnx.ModelProto, path: Path | None = None) -> LoadedModel:
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
    return LoadedModel(path=Path(path or "<memory>"), model=model, graph=gs.import_onnx(model), node_metadata=meta)


def to_proto(graph: gs.Graph, like: LoadedModel) -> onnx.ModelProto:
    """Export ``graph`` and restore what graphsurgeon drops: node and model metadata, IR version,
    producer and the opset imports of the source model."""
    graph.toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    src = like.model
    out.ir_version = max(src.ir_version, out.ir_version)
    out.producer_name, out.producer_version = src.producer_name, src.producer_version
    out.doc_string = src.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(src.metadata_props)
    for node in out.graph.node:
        props = like.node_metadata.get(node.name)
        if props:
            del node.metadata_props[:]
            node.metadata_props.extend(props)
    have = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in src.opset_import if o.domain not in have)
    return out
