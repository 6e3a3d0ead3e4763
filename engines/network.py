"""What a parsed network holds: a layer summary and where the GPCL computation went.

The ONNX parser stamps every layer with ``metadata`` naming its ONNX node, and for layers that
come from a model-local function also the calling node and its op:
``[ONNX Layer: node_of__max5_0 | gpcl/layer0/pre-attention (GPCL)]``. That is how we tell a
GPCL that was inlined (function body) from one that became a plugin layer, without a GPU."""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

# GPCL, or GPCL__<variant> where a build split the overloads (engines/build.py).
GPCL_CALL = re.compile(r"\|\s*([^|\]]+?) \(GPCL(?:__\w+)?\)")
_PLUGIN_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")


def parser_node_name(node: Any) -> str:
    """The name the ONNX parser gives a node (its own, else ``node_of_<first output>``)."""
    return node.name or f"node_of_{node.output[0]}"


def _layer_type(layer: Any) -> str:
    return str(layer.type).rsplit(".", 1)[-1]


def layer_summary(network: Any, gpcl_nodes: Iterable[str]) -> dict[str, Any]:
    """Counts by layer type, and per GPCL node the layers that implement it (function body
    layers or plugin layers). ``gpcl_nodes``: the parser's names of the GPCL nodes."""
    gpcl_nodes = list(gpcl_nodes)
    wanted = set(gpcl_nodes)
    by_type: collections.Counter[str] = collections.Counter()
    body: dict[str, int] = collections.defaultdict(int)
    plugin: dict[str, int] = collections.defaultdict(int)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = _layer_type(layer)
        by_type[kind] += 1
        meta = getattr(layer, "metadata", "") or ""
        call = GPCL_CALL.search(meta)
        if call and call.group(1) in wanted:
            body[call.group(1)] += 1
            continue
        owner = _owning_node(meta, wanted)
        if owner is None:
            continue
        (plugin if kind in _PLUGIN_TYPES else body)[owner] += 1
    return {
        "num_layers": network.num_layers,
        "by_type": dict(sorted(by_type.items())),
        "gpcl": {
            "nodes": len(gpcl_nodes),
            "body_layers": sum(body.values()),
            "plugin_layers": sum(plugin.values()),
            "nodes_as_body": sorted(body),
            "nodes_as_plugin": sorted(plugin),
        },
    }


def _owning_node(meta: str, wanted: set[str]) -> str | None:
    """The GPCL node a layer was made for directly (a plugin layer), from its metadata."""
    m = re.match(r"\[ONNX Layer: ([^|\]]+?)\s*[\]|]", meta)
    if m and m.group(1) in wanted:
        return m.group(1)
    return None


def network_io(network: Any) -> dict[str, list[dict[str, Any]]]:
    """Engine inputs and outputs (name, TensorRT dtype, dims with -1 for dynamic), in order:
    what a Triton config or a runner needs to feed the engine."""

    def describe(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": str(t.dtype).rsplit(".", 1)[-1], "shape": list(t.shape)}

    return {
        "inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)],
    }
