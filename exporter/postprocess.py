"""Graph post-processing after the trace: the graph signature named as the family config says
(``total_sequence``), residual Adds spelled as Sum where ONNX Runtime's fusion would be slower,
intermediate tensors typed but not shaped. Each rewrite keeps the numbers and says why."""

from __future__ import annotations

from typing import Any


def normalise(proto: Any, arch: Any, task: str) -> Any:
    """Make the graph signature match the arch config: the exporter names derived axes after
    their expression (``past_sequence + sequence``); the contract calls them ``total_sequence``."""
    want = {s.name: s.axes for s in arch.inputs(task) + arch.outputs(task)}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        axes = want.get(vi.name)
        if axes is None:
            continue
        for dim, axis in zip(vi.type.tensor_type.shape.dim, axes):
            if isinstance(axis, str):
                dim.dim_param = axis
    return proto


def residual_adds_as_sum(proto: Any) -> int:
    """Spell a residual Add that feeds a LayerNormalization as a two-input Sum (the same numbers,
    standard ONNX) where ONNX Runtime will know both of its input shapes: there it fuses Add +
    LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower than the two ops it
    replaces, while its Sum kernel is slower than Add (BENCHMARKS.md, Export). Which shapes it
    will know is read from ONNX shape inference on the graph as written (intermediate shapes
    dropped first: :func:`intermediate_types_only`). TensorRT fuses either spelling. Adds with a
    constant input (a bias) are left alone. Returns how many were rewritten."""
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in proto.graph.node for o in n.output}
    residual = []
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization" or not node.input:
            continue
        add = producers.get(node.input[0])
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            if not any(i in constants for i in add.input):
                residual.append(add)
    if not residual:
        return 0
    shapes = _inferred_shapes(proto)
    named = {d.dim_param for vi in list(proto.graph.input) + list(proto.graph.output) for d in _dims(vi) if d.dim_param}
    count = 0
    for add in residual:
        a, b = (_known_dims(shapes.get(x), named) for x in add.input[:2])
        if a is not None and a == b:
            add.op_type = "Sum"
            count += 1
    return count


def _inferred_shapes(proto: Any) -> dict[str, Any]:
    """name -> TensorShapeProto of each tensor: graph inputs' and outputs' own, the intermediates'
    from ONNX shape inference on the graph alone (initializers enter as typed inputs, so no weight bytes are copied)."""
    import onnx
    from onnx import helper

    g = proto.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    graph = helper.make_graph(list(g.node), "shapes", list(g.input) + weights, list(g.output))
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is advisory here: without it nothing is known
        return {}
    infos = list(inferred.graph.value_info) + list(g.input) + list(g.output)
    return {vi.name: vi.type.tensor_type.shape for vi in infos if vi.type.tensor_type.HasField("shape")}


def _dims(vi: Any) -> Any:
    return vi.type.tensor_type.shape.dim


def _known_dims(shape: Any, named: set[str]) -> tuple | None:
    """The dims of ``shape`` if every one is a number or an axis the graph's inputs and outputs
    name (the symbols shape inference makes up for unknown dims say nothing), else None."""
    if shape is None or not shape.dim:
        return None
    dims = tuple(d.dim_value or d.dim_param for d in shape.dim)
    return dims if all(isinstance(d, int) or d in named for d in dims) else None


def intermediate_types_only(proto: Any) -> int:
    """Keep each intermediate tensor's element type in ``value_info`` and drop its shape (graph
    inputs and outputs keep theirs). Why: ONNX Runtime's CPU memory planner lets a tensor reuse a
    dead tensor's buffer when the declared shapes say they are the same size; with every shape
    declared, that reuse made MiniLM 1.05-1.07x slower than the same graph without the shapes
    (Transpose, Add, BiasGelu slower; equal again with ``enable_mem_reuse`` off; BENCHMARKS.md,
    Export). Optimum's graphs declare none. The types stay: per-layer validation and diff read
    them. Returns how many shapes were dropped."""
    count = 0
    for vi in proto.graph.value_info:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")
            count += 1
    return count
