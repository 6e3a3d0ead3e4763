"""Trace a few layers of a deep decoder, write all of them.

The dynamo exporter's time grows with the layer count (torch.export, decompositions and
onnxscript's optimizer run once per layer; 80 layers took half an hour), while a decoder's
layers are one graph with other weights. So, when every layer is the same module:

1. ``find_stack`` / ``why_not``: the layer ``ModuleList`` and the reasons not to replicate
   (too few layers, a per-layer config list that varies, layers whose modules differ in class,
   parameter shapes, buffers or settings; the layer index itself is allowed to differ).
2. ``truncated``: the model is traced with its first ``TRACED_LAYERS`` layers only.
3. ``replicate``: layer ``TRACED_LAYERS - 1`` of the ONNX graph is the template; each further
   layer is a copy with its own weights (initializers renamed to that layer's parameters, their
   external data from the checkpoint), its own past inputs and present outputs, and name scopes
   that say its index, so sites, layer-by-layer validation and the passes see a normal graph.

Four layers are traced: layer 0 may hold what later layers share (the optimizer keeps one copy of
a common subexpression, in the first layer that computes it), and the template (layer 3) is only
used when it is node for node the same graph as layer 2, whose inputs from layer 1 line up with
the template's inputs from layer 2. When anything does not line up, the caller traces every
layer, as without this module, and says why.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from gpcl_trt.gpcl import SCOPES_KEY, parse_scopes

TRACED_LAYERS = 4
STACK_NAMES = ("layers", "layer", "h", "blocks", "block")
# Attributes that hold the layer's own index (they differ between layers by design).
_INDEX_ATTR = re.compile(r"(?:^|_)(?:idx|index|layer_id|layer_number|layer_num)$")


class NotReplicable(Exception):
    """The traced graph's layers do not line up; trace every layer instead."""


@dataclass
class LayerStack:
    path: str  # qualified name of the ModuleList in the HF model ("model.layers")
    parent: Any
    attr: str
    layers: Any  # the full torch.nn.ModuleList
    config: Any  # the text config whose num_hidden_layers counts them

    @property
    def count(self) -> int:
        return len(self.layers)


def find_stack(model: Any, config: Any) -> LayerStack | None:
    """The ModuleList of the decoder's layers: named like transformers' layer containers and as
    long as ``config.num_hidden_layers``."""
    import torch

    want = getattr(config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rpartition(".")[2] in STACK_NAMES and len(mod) == want:
            parent_name, _, attr = name.rpartition(".")
            return LayerStack(name, model.get_submodule(parent_name) if parent_name else model, attr, mod, config)
    return None


def _signature(layer: Any, index: int) -> list:
    """What must be equal between two layers for one graph to serve both."""
    sig = []
    for name, mod in layer.named_modules():
        attrs = []
        for k, v in sorted(vars(mod).items()):
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, (bool, int, float, str, type(None))) or (
                isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v)
            ):
                if _INDEX_ATTR.search(k) and v == index:
                    v = "<layer index>"
                attrs.append((k, v))
        params = [(k, tuple(p.shape), str(p.dtype)) for k, p in mod.named_parameters(recurse=False)]
        buffers = [
            (k, tuple(b.shape), str(b.dtype), b.detach().cpu().numpy().tobytes() if b.device.type != "meta" else None)
            for k, b in mod.named_buffers(recurse=False)
            if b is not None
        ]
        sig.append((name, type(mod).__qualname__, attrs, params, buffers))
    return sig


def why_not(stack: LayerStack | None, min_layers: int = 2 * TRACED_LAYERS) -> str | None:
    """None when the layers may be traced once and replicated; else the reason, in words.
    ``min_layers``: below it, tracing every layer costs little more (at least TRACED_LAYERS + 1)."""
    if stack is None:
        return "no layer stack found"
    n = stack.count
    if n < max(min_layers, TRACED_LAYERS + 1):
        return f"{n} layers (replicated from {max(min_layers, TRACED_LAYERS + 1)})"
    for key, value in vars(stack.config).items():
        if isinstance(value, (list, tuple)) and len(value) == n and any(v != value[0] for v in value):
            return f"config.{key} differs between layers"
    ref = _signature(stack.layers[TRACED_LAYERS - 1], TRACED_LAYERS - 1)
    for i in range(1, n):
        if _signature(stack.layers[i], i) != ref:
            return f"layer {i} is not the same module as layer {TRACED_LAYERS - 1}"
    return None


@contextlib.contextmanager
def truncated(stack: LayerStack, k: int) -> Iterator[None]:
    """The model with its first ``k`` layers (and per-layer config lists cut to match)."""
    import torch

    n = stack.count
    lists = {key: v for key, v in vars(stack.config).items() if isinstance(v, (list, tuple)) and len(v) == n}
    setattr(stack.parent, stack.attr, torch.nn.ModuleList(list(stack.layers)[:k]))
    stack.config.num_hidden_layers = k
    for key, v in lists.items():
        setattr(stack.config, key, type(v)(v[:k]))
    try:
        yield
    finally:
        setattr(stack.parent, stack.attr, stack.layers)
        stack.config.num_hidden_layers = n
        for key, v in lists.items():
            setattr(stack.config, key, v)


# ----------------------------------------------------------------------------- the ONNX side
def _scope_layer(node: Any, prefix: str) -> int | None:
    head = prefix + "."
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            for scope in parse_scopes(p.value):
                if scope.startswith(head) and scope[len(head) :].isdigit():
                    return int(scope[len(head) :])
    return None


def _with_index(name: str, old: int, new: int) -> str | None:
    """``name`` with its one ``.<old>.`` replaced by ``.<new>.`` (past_key_values.3.key), else None."""
    parts = name.split(f".{old}.")
    return f".{new}.".join(parts) if len(parts) == 2 else None


def replicate(
    proto: Any,
    prefix: str,
    total: int,
    weight: Callable[[str], Any | None],
) -> int:
    """Grow ``proto`` (traced with ``TRACED_LAYERS`` layers, scopes ``<prefix>.<i>``) to ``total``
    layers in place. ``weight(name)`` gives the initializer (a TensorProto) for a layer parameter
    name such as ``<prefix>.7.mlp.up_proj.weight``, or None for a name that is not a parameter.
    Returns the number of nodes added; raises NotReplicable when layers do not line up."""
    import onnx

    k = TRACED_LAYERS
    g = proto.graph
    nodes = list(g.node)
    layer_of = [_scope_layer(n, prefix) for n in nodes]
    # Nodes an optimizer rewrite made carry no scopes (a Split that replaced three Slices, say):
    # they belong to the one layer whose values they read.
    producer = {o: (i, j) for i, n in enumerate(nodes) for j, o in enumerate(n.output) if o}
    for i, n in enumerate(nodes):
        if layer_of[i] is None and not any(p.key == SCOPES_KEY for p in n.metadata_props):
            read = {layer_of[producer[x][0]] for x in n.input if x in producer}
            if len(read) == 1 and None not in read:
                layer_of[i] = read.pop()
    by_layer: dict[int, list[int]] = {}
    for idx, li in enumerate(layer_of):
        if li is not None:
            by_layer.setdefault(li, []).append(idx)
    if sorted(by_layer) != list(range(k)):
        raise NotReplicable(f"layer scopes found: {sorted(by_layer)}")
    prev2, prev, tmpl = (by_layer[k - 3], by_layer[k - 2], by_layer[k - 1])
    if not (len(prev2) == len(prev) == len(tmpl)):
        raise NotReplicable(f"layers {k - 3}..{k - 1} have {len(prev2)}, {len(prev)}, {len(tmpl)} nodes")
    if tmpl != list(range(tmpl[0], tmpl[0] + len(tmpl))):
        raise NotReplicable(f"layer {k - 1}'s nodes are not contiguous")
    pos = {idx: (layer_of[idx], p) for lst in by_layer.values() for p, idx in enumerate(lst)}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {v.name: v for v in g.input}
    graph_outputs = {v.name: v for v in g.output}
    weight_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")

    # How each input of the template is fed in layer i: ("shared", name), ("weight", suffix),
    # ("input", name with the index), ("internal", pos, out), ("previous", pos, out).
    plan: list[list[tuple]] = []
    for p, (a_idx, b_idx) in enumerate(zip(prev, tmpl)):
        a, b = nodes[a_idx], nodes[b_idx]
        if (a.op_type, a.domain, len(a.input), len(a.output)) != (b.op_type, b.domain, len(b.input), len(b.output)):
            raise NotReplicable(f"node {p} of layers {k - 2} and {k - 1}: {a.op_type} vs {b.op_type}")
        if [x.SerializeToString() for x in a.attribute] != [x.SerializeToString() for x in b.attribute]:
            raise NotReplicable(f"node {p} ({b.op_type}) of layers {k - 2} and {k - 1} has other attributes")
        feeds = []
        for x, y in zip(a.input, b.input):
            wx, wy = weight_re.match(x) if x in inits else None, weight_re.match(y) if y in inits else None
            px, py = producer.get(x), producer.get(y)
            if wx and wy and int(wx.group(1)) == k - 2 and int(wy.group(1)) == k - 1 and wx.group(2) == wy.group(2):
                feeds.append(("weight", wy.group(2)))
            elif x in graph_inputs and y in graph_inputs and _with_index(x, k - 2, k - 1) == y:
                feeds.append(("input", y))
            elif py is not None and pos.get(py[0], (None,))[0] == k - 1:
                if px is None or pos.get(px[0]) != (k - 2, pos[py[0]][1]) or px[1] != py[1]:
                    raise NotReplicable(f"node {p} ({b.op_type}): internal input {y} does not line up")
                feeds.append(("internal", pos[py[0]][1], py[1]))
            elif py is not None and pos.get(py[0], (None,))[0] == k - 2:
                if px is None or pos.get(px[0]) != (k - 3, pos[py[0]][1]) or px[1] != py[1]:
                    raise NotReplicable(f"node {p} ({b.op_type}): input {y} from layer {k - 2} does not line up")
                feeds.append(("previous", pos[py[0]][1], py[1]))
            elif x == y and (py is None or (pos.get(py[0], (None,))[0] or 0) < k - 2):
                # a graph input, a constant, or a value computed once before (outside the layers,
                # or in an earlier layer that first computed a common subexpression)
                if y in inits and weight_re.match(y):
                    raise NotReplicable(f"node {p} ({b.op_type}) reads another layer's parameter {y}")
                feeds.append(("shared", y))
            elif x in inits and y in inits and _same_constant(inits[x], inits[y]):
                feeds.append(("shared", y))
            else:
                raise NotReplicable(f"node {p} ({b.op_type}): inputs {x} / {y} do not line up")
        plan.append(feeds)
    out_kind: dict[tuple[int, int], str] = {}
    for p, (a_idx, b_idx) in enumerate(zip(prev, tmpl)):
        for j, (x, y) in enumerate(zip(nodes[a_idx].output, nodes[b_idx].output)):
            if y in graph_outputs:
                if x not in graph_outputs or _with_index(x, k - 2, k - 1) != y:
                    raise NotReplicable(f"graph output {y} is not a per-layer output")
                out_kind[(p, j)] = "output"

    # The copies, layer by layer; each reads the previous copy where the template read layer k-2.
    value_info = {v.name: v for v in g.value_info}
    taken = set(producer) | set(inits) | set(graph_inputs) | {n.name for n in nodes}
    last_names = [list(nodes[i].output) for i in tmpl]  # layer i-1's outputs, by template position
    copies: list[Any] = []
    scope_re = re.compile(rf"{re.escape(prefix)}\.{k - 1}(?=[.'\":/\s]|$)")

    def fresh(name: str, i: int) -> str:
        new = f"{name}__layer{i}"
        while new in taken:
            new += "_"
        taken.add(new)
        return new

    for i in range(k, total):
        names = []
        for p, b_idx in enumerate(tmpl):
            b = nodes[b_idx]
            c = onnx.NodeProto()
            c.CopyFrom(b)
            c.name = fresh(b.name, i) if b.name else ""
            outs = []
            for j, y in enumerate(b.output):
                if not y:
                    outs.append(y)
                elif out_kind.get((p, j)) == "output":
                    outs.append(_with_index(y, k - 1, i))
                else:
                    outs.append(fresh(y, i))
                    if y in value_info:
                        vi = onnx.ValueInfoProto()
                        vi.CopyFrom(value_info[y])
                        vi.name = outs[-1]
                        g.value_info.append(vi)
            del c.output[:]
            c.output.extend(outs)
            names.append(outs)
            copies.append(c)
        for p, feeds in enumerate(plan):
            c = copies[len(copies) - len(tmpl) + p]
            new_inputs = []
            for f in feeds:
                if f[0] == "shared":
                    new_inputs.append(f[1])
                elif f[0] == "weight":
                    name = f"{prefix}.{i}.{f[1]}"
                    if name not in inits:
                        t = weight(name)
                        if t is None:
                            raise NotReplicable(f"no checkpoint tensor for {name}")
                        g.initializer.append(t)
                        inits[name] = t
                    new_inputs.append(name)
                elif f[0] == "input":
                    name = _with_index(f[1], k - 1, i)
                    if name not in graph_inputs:
                        vi = onnx.ValueInfoProto()
                        vi.CopyFrom(graph_inputs[f[1]])
                        vi.name = name
                        g.input.append(vi)
                        graph_inputs[name] = vi
                    new_inputs.append(name)
                elif f[0] == "internal":
                    new_inputs.append(names[f[1]][f[2]])
                else:  # previous
                    new_inputs.append(last_names[f[1]][f[2]])
            del c.input[:]
            c.input.extend(new_inputs)
            for prop in c.metadata_props:
                prop.value = scope_re.sub(f"{prefix}.{i}", prop.value)
        for (p, j), kind in out_kind.items():
            y = nodes[tmpl[p]].output[j]
            if _with_index(y, k - 1, i) not in graph_outputs:
                vi = onnx.ValueInfoProto()
                vi.CopyFrom(graph_outputs[y])
                vi.name = _with_index(y, k - 1, i)
                g.output.append(vi)
                graph_outputs[vi.name] = vi
        last_names = names

    # Nodes after the stack read the last copy instead of the template.
    rename = {}
    for p, b_idx in enumerate(tmpl):
        for j, y in enumerate(nodes[b_idx].output):
            if y and out_kind.get((p, j)) != "output":
                rename[y] = last_names[p][j]
    tmpl_set = set(tmpl)
    for idx, n in enumerate(nodes):
        if idx in tmpl_set or layer_of[idx] is not None:
            continue
        for j, name in enumerate(n.input):
            if name in rename:
                if idx < tmpl[0]:
                    raise NotReplicable(f"node {n.name} before layer {k - 1} reads its value {name}")
                n.input[j] = rename[name]
    for v in g.output:
        if v.name in rename:
            raise NotReplicable(f"graph output {v.name} is produced inside layer {k - 1}")
    end = tmpl[-1] + 1
    del g.node[:]
    g.node.extend(nodes[:end] + copies + nodes[end:])
    return len(copies)


def _same_constant(a: Any, b: Any) -> bool:
    """Two initializers with the same type, shape and bytes (names aside)."""
    return (
        not a.external_data
        and not b.external_data
        and (a.data_type, list(a.dims), a.raw_data) == (b.data_type, list(b.dims), b.raw_data)
        and a.raw_data != b""
    )


def order_io(proto: Any, inputs: list[str], outputs: list[str]) -> None:
    """Graph inputs and outputs in the contract's order (copies were appended at the end)."""
    for field, names in ((proto.graph.input, inputs), (proto.graph.output, outputs)):
        rank = {n: i for i, n in enumerate(names)}
        items = sorted(field, key=lambda v: rank.get(v.name, len(rank)))
        copied = []
        for v in items:
            c = type(v)()
            c.CopyFrom(v)
            copied.append(c)
        del field[:]
        field.extend(copied)
