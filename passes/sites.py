"""Finding GPCL sites: the normalised hidden state that feeds a block's attention projections
(pre-attention) or its MLP's first projection(s) (pre-MLP).

Two ways, tried in order:
1. metadata: the dynamo exporter records each node's module scopes. A projection whose scope is
   ``...<N>.<submodule>...`` with ``submodule`` in :data:`SUBMODULE_KIND` belongs to layer N; the
   block's *entry* projections are those whose input comes from outside that submodule (Q/K/V,
   gate/up, BERT's intermediate.dense, GPT-2's c_attn/c_fc), never o_proj/down_proj.
2. structure (ONNX from elsewhere, metadata stripped): every norm output (LayerNormalization or
   a decomposed RMSNorm/LayerNorm) that feeds projections is a candidate; it is pre-attention if a
   Softmax is reachable from those projections before the next projection, pre-MLP if the path
   reaches a second projection (the MLP's down projection), otherwise not a site (lm_head).
   Layers are numbered in graph order by the pre-attention sites.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from gpcl_trt.passes.graph import (
    NORM_OPS,
    LoadedModel,
    is_const,
    is_gpcl,
    is_projection,
    load_graph,
    producer,
    see_through,
)

KINDS = ("pre-attention", "pre-mlp")

# The one piece of architecture knowledge: which block submodule names are attention and which
# are MLP, across the families we export (Llama/Mistral/Qwen, BERT, GPT-2, and common others).
SUBMODULE_KIND = {
    "self_attn": "pre-attention",
    "attention": "pre-attention",
    "attn": "pre-attention",
    "self_attention": "pre-attention",
    "mlp": "pre-mlp",
    "intermediate": "pre-mlp",
    "feed_forward": "pre-mlp",
    "ffn": "pre-mlp",
    "block_sparse_moe": "pre-mlp",
}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.([A-Za-z_]\w*)")
_BFS_LIMIT = 200  # nodes; an attention block's Softmax is ~10-30 nodes past Q/K


@dataclass
class Site:
    layer: int
    kind: str
    tensor: str  # the site tensor: the norm output (its name never changes)
    hidden: int | None
    consumers: list[str]  # nodes rewired to read the GPCL output (they lead to the projections)
    projections: list[str]
    norm: str  # what produces the tensor: LayerNormalization, RMSNorm (decomposed), ...
    method: str  # "metadata" or "structure"
    gpcl: str | None = None  # the GPCL node already in place, if any

    @property
    def key(self) -> str:
        return f"layer{self.layer}/{self.kind}"

    @property
    def node_name(self) -> str:
        return f"gpcl/{self.key}"

    @property
    def output_name(self) -> str:
        return f"{self.tensor}/gpcl"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["key"] = self.key
        return d


# ----------------------------------------------------------------------------- norms
def _const_value(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = producer(t)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    return None


def _is_square(node: gs.Node) -> bool:
    if node.op == "Pow":
        v = _const_value(node.inputs[1])
        return v is not None and v.size == 1 and float(v.reshape(())) == 2.0
    return node.op == "Mul" and node.inputs[0] is node.inputs[1]


def _descendants(t: gs.Tensor, ops: set[str], hops: int) -> set[int]:
    seen, frontier = set(), [t]
    for _ in range(hops):
        nxt = []
        for tensor in frontier:
            for c in tensor.outputs:
                if c.op in ops:
                    for o in c.outputs:
                        if id(o) not in seen:
                            seen.add(id(o))
                            nxt.append(o)
        frontier = nxt
    return seen


def _affine_tail(t: gs.Tensor) -> gs.Tensor:
    """Follow the norm's scale/shift (Mul/Add by a weight, Casts) to its final output."""
    while len(t.outputs) == 1:
        c = t.outputs[0]
        if c.op == "Cast" or (c.op in ("Mul", "Add") and any(is_const(i) for i in c.inputs if i is not t)):
            t = c.outputs[0]
        else:
            break
    return t


def norm_outputs(graph: gs.Graph) -> dict[int, str]:
    """id(tensor) -> label for every normalisation output: fused norm ops, and the decomposed
    RMSNorm (x * rsqrt(mean(x^2) + eps) * w) and LayerNorm (d = x - mean(x); d / sqrt(mean(d^2)))."""
    out: dict[int, str] = {}
    for node in graph.nodes:
        if node.op in NORM_OPS and node.outputs:
            out[id(node.outputs[0])] = node.op
            continue
        if node.op != "ReduceMean" or not node.inputs:
            continue
        sq = producer(node.inputs[0])
        if sq is None or not _is_square(sq):
            continue
        x = sq.inputs[0]
        scale = _descendants(node.outputs[0], {"Add", "Sqrt", "Reciprocal", "Div", "Pow", "Cast", "Max"}, 6)
        xs = [x] + [c.outputs[0] for c in x.outputs if c.op == "Cast"]
        for xv in xs:
            for c in xv.outputs:
                if c.op in ("Mul", "Div") and any(id(i) in scale for i in c.inputs):
                    x_prod = producer(x)
                    label = "LayerNorm (decomposed)" if x_prod is not None and x_prod.op == "Sub" else "RMSNorm (decomposed)"
                    out[id(_affine_tail(c.outputs[0]))] = label
    return out


# ----------------------------------------------------------------------------- helpers
def _head_consumer(proj: gs.Node, root: gs.Tensor) -> gs.Node:
    """The node on the path root -> proj that reads root (or root's GPCL output) directly."""
    node, t = proj, proj.inputs[0]
    while t is not root:
        p = producer(t)
        if p is None or is_gpcl(p):
            break
        node, t = p, p.inputs[0]
    return node


def _gpcl_on(root: gs.Tensor) -> gs.Node | None:
    return next((c for c in root.outputs if is_gpcl(c)), None)


def _hidden(root: gs.Tensor, proj: gs.Node) -> int | None:
    if root.shape and isinstance(root.shape[-1], (int, np.integer)) and root.shape[-1] > 0:
        return int(root.shape[-1])
    w = proj.inputs[1]
    if isinstance(w, gs.Constant) and len(w.shape) >= 2:
        trans_b = proj.op == "Gemm" and proj.attrs.get("transB", 0)
        return int(w.shape[-1] if trans_b else w.shape[-2])
    return None


def _norm_label(root: gs.Tensor, norms: dict[int, str]) -> str:
    if id(root) in norms:
        return norms[id(root)]
    p = producer(root)
    return p.op if p is not None else "graph input"


def _make_sites(groups: dict[tuple[int, str], list[tuple[gs.Tensor, gs.Node]]], norms, method) -> list[Site]:
    sites = []
    claimed: set[int] = set()
    for (layer, kind), entries in sorted(groups.items(), key=lambda kv: (kv[0][0], KINDS.index(kv[0][1]))):
        counts = Counter(id(r) for r, _ in entries)
        root = next(r for r, _ in entries if id(r) == counts.most_common(1)[0][0])
        if id(root) in claimed:  # a parallel block reading one norm for both: one site only
            continue
        claimed.add(id(root))
        projs = [p for r, p in entries if r is root]
        heads = list(dict.fromkeys(_head_consumer(p, root).name for p in projs))
        gp = _gpcl_on(root)
        sites.append(
            Site(
                layer=layer,
                kind=kind,
                tensor=root.name,
                hidden=_hidden(root, projs[0]),
                consumers=heads,
                projections=[p.name for p in projs],
                norm=_norm_label(root, norms),
                method=method,
                gpcl=gp.name if gp is not None else None,
            )
        )
    return sites


# ----------------------------------------------------------------------------- metadata
def _scope_site(scope_list: list[str]) -> tuple[int, str, str] | None:
    """(layer, kind, submodule scope prefix) from a node's module scopes, innermost first."""
    for s in reversed(scope_list):
        for m in reversed(list(_LAYER_RE.finditer(s))):
            kind = SUBMODULE_KIND.get(m.group(2))
            if kind:
                return int(m.group(1)), kind, s[: m.end()]
    return None


def _inside(node: gs.Node | None, prefix: str, scopes: dict[str, list[str]]) -> bool:
    if node is None:
        return False
    return any(s == prefix or s.startswith(prefix + ".") for s in scopes.get(node.name, ()))


def sites_from_metadata(graph: gs.Graph, scopes: dict[str, list[str]], norms: dict[int, str]) -> list[Site]:
    groups: dict[tuple[int, str], list] = defaultdict(list)
    for node in graph.nodes:
        if not is_projection(node) or node.name not in scopes:
            continue
        where = _scope_site(scopes[node.name])
        if where is None:
            continue
        layer, kind, prefix = where
        root = see_through(node.inputs[0])
        if not _inside(producer(root), prefix, scopes):  # an entry projection of the block
            groups[(layer, kind)].append((root, node))
    return _make_sites(groups, norms, "metadata")


# ----------------------------------------------------------------------------- structure
def _projection_heads(t: gs.Tensor) -> list[gs.Node]:
    """Projections reading ``t`` directly or through view/cast ops and GPCL."""
    found, stack = [], [t]
    while stack:
        cur = stack.pop()
        for c in cur.outputs:
            if is_projection(c) and c.inputs[0] is cur:
                found.append(c)
            elif (c.op in ("Reshape", "Flatten", "Cast", "Identity") or is_gpcl(c)) and c.inputs[0] is cur:
                stack.extend(c.outputs)
    return found


def _classify(projs: list[gs.Node], norms: dict[int, str]) -> str | None:
    """pre-attention if a Softmax follows before any further projection, pre-mlp if another
    projection follows (the down projection), None otherwise (e.g. lm_head)."""
    queue = deque(o for p in projs for o in p.outputs)
    seen: set[int] = set()
    reached_projection = False
    while queue and len(seen) < _BFS_LIMIT:
        t = queue.popleft()
        if id(t) in norms:
            continue
        for c in t.outputs:
            if id(c) in seen:
                continue
            seen.add(id(c))
            if c.op == "Softmax":
                return "pre-attention"
            if is_projection(c):
                reached_projection = True
                continue
            queue.extend(c.outputs)
    return "pre-mlp" if reached_projection else None


def sites_from_structure(graph: gs.Graph, norms: dict[int, str]) -> list[Site]:
    tensors = {id(t): t for t in graph.tensors().values()}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    found = []
    for tid in norms:
        t = tensors.get(tid)
        if t is None:
            continue
        projs = _projection_heads(t)
        kind = _classify(projs, norms) if projs else None
        if kind:
            found.append((order.get(id(producer(t)), -1), kind, t, projs))
    groups: dict[tuple[int, str], list] = defaultdict(list)
    layer = -1
    for _, kind, t, projs in sorted(found, key=lambda f: f[0]):
        layer += kind == "pre-attention"
        groups[(max(layer, 0), kind)].extend((t, p) for p in projs)
    return _make_sites(groups, norms, "structure")


# ----------------------------------------------------------------------------- API
def find_sites(graph: gs.Graph, scopes: dict[str, list[str]] | None = None) -> list[Site]:
    """Every candidate site of ``graph``, sorted by (layer, kind). Changes nothing but the node
    order (a topological sort, which structural layer numbering needs).

    ``scopes`` maps node names to their exporter module scopes (graphsurgeon drops node
    metadata, so :class:`LoadedModel` keeps it); without it, or when it names no block,
    sites are found from the graph structure alone."""
    graph.toposort()
    norms = norm_outputs(graph)
    sites = sites_from_metadata(graph, scopes, norms) if scopes else []
    return sites or sites_from_structure(graph, norms)


def find_sites_loaded(lm: LoadedModel) -> list[Site]:
    return find_sites(lm.graph, lm.scopes)


def sites_file(path: str | Path) -> dict:
    """List the candidate GPCL sites of an ONNX model (layer, kind, tensor, hidden size,
    consumers); changes nothing."""
    lm = load_graph(path)
    sites = find_sites_loaded(lm)
    per_layer = Counter(s.kind for s in sites)
    return {
        "ok": True,
        "model": str(path),
        "method": sites[0].method if sites else None,
        "layers": len({s.layer for s in sites}),
        "counts": {k: per_layer.get(k, 0) for k in KINDS},
        "sites": [s.to_dict() for s in sites],
    }
