"""Remove every GPCL node and the GPCL function, reconnecting the consumers to the tensor the
node read: strip(insert(m)) has m's nodes and outputs."""

from __future__ import annotations

from pathlib import Path

import onnx_graphsurgeon as gs

from gpcl_trt.common import check_can_write, sha256_file
from gpcl_trt.passes.graph import is_gpcl, load_graph


def strip_gpcl(graph: gs.Graph) -> tuple[gs.Graph, dict]:
    """Return a copy of ``graph`` without GPCL nodes, and a report of what was removed."""
    graph = graph.copy()
    removed = []
    for node in [n for n in graph.nodes if is_gpcl(n)]:
        x, y = node.inputs[0], node.outputs[0]
        for c in list(y.outputs):
            for i, inp in enumerate(c.inputs):
                if inp is y:
                    c.inputs[i] = x
        graph.outputs = [x if o is y else o for o in graph.outputs]
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        removed.append(node.name)
    return graph, {"removed": removed}


def strip_file(input: str | Path, output: str | Path, force: bool = False) -> dict:
    """Write ``output``: ``input`` without any GPCL node or function (+ OUT.manifest.json)."""
    from gpcl_trt.manifest import model_dir_of, pass_inputs
    from gpcl_trt.passes.modelio import save_model

    check_can_write(output, force)
    lm = load_graph(input)
    graph, report = strip_gpcl(lm.graph)
    model_dir = model_dir_of(input)
    inputs = pass_inputs(input, sha256_file(input), str(model_dir) if model_dir else None)
    save_model(
        graph, lm, output, force=force, gpcl=False, stage_name="strip", inputs=inputs, options={}, results=report
    )
    return {"ok": True, "output": str(output), "removed": report["removed"]}
