"""Finding GPCL sites: the normalised hidden state that feeds a block's attention projections
(pre-attention), its MLP's first projection(s) (pre-MLP), or both at once (shared: GPT-J, Falcon,
Phi-1/2 and CodeGen blocks read one norm for attention and MLP).

Two ways, tried in order:
1. metadata: the dynamo exporter records each node's module scopes. A projection whose scope is
   ``...<N>.<submodule>...`` belongs to block N. With ``submodule`` in :data:`SUBMODULE_KIND` its
   kind is known, and the block's *entry* projections are those whose input comes from outside
   that submodule (Q/K/V, gate/up, BERT's intermediate.dense, GPT-2's c_attn/c_fc), never
   o_proj/down_proj. A projection directly in the block (OPT's fc1/fc2) is an entry when it reads
   a norm output, and its kind comes from the structure (below).
2. structure (ONNX from elsewhere, metadata stripped): every norm output (LayerNormalization or
   a decomposed RMSNorm/LayerNorm) that feeds projections is a candidate; it is pre-attention if a
   Softmax is reachable from those projections before the next projection, pre-MLP if the path
   reaches a second projection (the MLP's down projection), otherwise not a site (lm_head). A
   norm whose projections split into attention ones (Softmax, or joining the Softmax's path: V)
   and MLP ones is shared. Where a norm's only projections feed further projections directly
   (ALBERT's embedding-size -> hidden-size mapping), their outputs are the candidates instead.
   A mixture-of-experts block's batched matmul of per-token gathered expert weights counts as a
   projection (weights first: ``W_e @ x``).
   Layers are numbered in graph order: a new block at each pre-attention/shared site, and at a
   pre-MLP site when the block has one already (MLP-only blocks: ConvNeXt). A projection reached
   only past a norm does not make an MLP (Swin's patch-merging reduction).

Hierarchical models number blocks stage by stage, and two-tower models tower by tower: a block
is its whole scope (``layers.1.blocks.0``); blocks are numbered container by container (in the
order the graph reaches them), then by index. A norm of weights alone
(DeBERTa-v3's relative-position table) is not on the residual stream and never a site. A model
without a norm over the last axis (ResNet's BatchNorm over NCHW) has no site; ``sites_file``
says why.

An encoder-decoder's decoder block has a third site, ``pre-cross-attention``: the tensor that feeds
the cross-attention's query projection (by scope: ``encoder_attn``, T5's ``EncDecAttention``; by
structure: a root whose attention projections reach only the query operand of ``Q x K^T``, its
keys and values being projections of the encoder's states or cached ones). Only that projection
is rewired; an encoder graph that computes the decoder's cross-attention keys and values from its
final norm has no such site. Without metadata, two towers (a dual encoder) are told apart by what
each site is computed from, an MLP-only block after a tower's last attention block is a head
(wav2vec2's classifier projector, SigLIP's pooling MLP), and a roll along a token axis between a
norm and its projections (Swin's shifted windows) is seen through.

One norm output read by both attention and MLP entry projections is one site of kind ``shared``
(its consumers are both sets); parallel-residual blocks with two norms (GPT-NeoX) get two sites.
A block module called more than once (ALBERT shares one layer's weights across its depth) gives
one site per call, numbered in graph order. The final norm (read only by the LM head) is never
a site.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from gpcl_trt.gpcl import BLOCK_RE, KINDS, PRE_ATTENTION, PRE_CROSS_ATTENTION, PRE_MLP, SHARED, node_name, output_name
from gpcl_trt.passes.graph import (
    NORM_OPS,
    LoadedModel,
    is_const,
    is_expert_projection,
    is_gpcl,
    is_projection,
    load_graph,
    producer,
    see_through,
    weight_shape,
)

# The one piece of architecture knowledge: which block submodule names are attention and which
# are MLP, across the families we export (Llama/Mistral/Qwen, BERT, GPT-2, and common others), and
# which are an encoder-decoder's cross-attention (BART/Marian/Pegasus/Whisper, T5, BERT-decoders).
# Names not here still work: their kind is read from the graph structure.
SUBMODULE_KIND = {
    "self_attn": PRE_ATTENTION,
    "attention": PRE_ATTENTION,
    "attn": PRE_ATTENTION,
    "self_attention": PRE_ATTENTION,
    "SelfAttention": PRE_ATTENTION,  # T5
    "encoder_attn": PRE_CROSS_ATTENTION,
    "EncDecAttention": PRE_CROSS_ATTENTION,  # T5
    "crossattention": PRE_CROSS_ATTENTION,  # BERT as a decoder
    "cross_attn": PRE_CROSS_ATTENTION,
    "DenseReluDense": PRE_MLP,  # T5
    "mlp": PRE_MLP,
    "intermediate": PRE_MLP,
    "feed_forward": PRE_MLP,
    "ffn": PRE_MLP,
    "block_sparse_moe": PRE_MLP,
}
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
        return node_name(self.layer, self.kind)

    @property
    def output_name(self) -> str:
        return output_name(self.tensor)

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
    """Follow the norm's scale/shift (Mul/Add by a weight, Casts) to its final output, and a
    sole Mul by anything (DeBERTa multiplies the embedding norm by the padding mask): what the
    block reads is the normalised state after them."""
    while len(t.outputs) == 1:
        c = t.outputs[0]
        others = [i for i in c.inputs if i is not t]
        if c.op == "Cast" or (c.op in ("Mul", "Add") and any(is_const(i) for i in others)) or c.op == "Mul":
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
            out[id(_affine_tail(node.outputs[0]))] = node.op
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
                    label = (
                        "LayerNorm (decomposed)"
                        if x_prod is not None and x_prod.op == "Sub"
                        else "RMSNorm (decomposed)"
                    )
                    out[id(_affine_tail(c.outputs[0]))] = label
    return out


# ----------------------------------------------------------------------------- helpers
def _head_consumer(proj: gs.Node, root: gs.Tensor) -> gs.Node:
    """The node on the path root -> proj that reads root (or root's GPCL output) directly."""
    node, t = proj, proj.inputs[1 if is_expert_projection(proj) else 0]
    while t is not root:
        p = producer(t)
        if p is None or is_gpcl(p):
            break
        node, t = p, p.inputs[0]
    return node


def _gpcl_on(root: gs.Tensor) -> gs.Node | None:
    return next((c for c in root.outputs if is_gpcl(c)), None)


def _hidden(root: gs.Tensor, projs: list[gs.Node]) -> int | None:
    """The site's channel count: its declared shape, else the in-features of a projection's
    weight (an expert bank's weights are gathered per token: another projection says it)."""
    if root.shape and isinstance(root.shape[-1], (int, np.integer)) and root.shape[-1] > 0:
        return int(root.shape[-1])
    for proj in projs:
        w = weight_shape(proj.inputs[1])
        if w is not None and len(w) >= 2:
            trans_b = proj.op == "Gemm" and proj.attrs.get("transB", 0)
            return int(w[-1] if trans_b else w[-2])
    return None


def _norm_label(root: gs.Tensor, norms: dict[int, str]) -> str:
    if id(root) in norms:
        return norms[id(root)]
    p = producer(root)
    return p.op if p is not None else "graph input"


def _merge_kind(kinds: set[str]) -> str:
    return SHARED if SHARED in kinds or {PRE_ATTENTION, PRE_MLP} <= kinds else min(kinds, key=KINDS.index)


@dataclass
class _Candidate:
    layer: int
    kind: str
    root: gs.Tensor
    projs: list[gs.Node]
    order: int  # graph position of the root's producer


def _make_sites(cands: list[_Candidate], norms, method) -> list[Site]:
    """One site per root tensor: a root read by attention and MLP entries becomes one shared
    site (at the earliest layer that reads it)."""
    by_root: dict[int, list[_Candidate]] = {}
    for c in cands:
        by_root.setdefault(id(c.root), []).append(c)
    sites = []
    for group in by_root.values():
        root = group[0].root
        kind = _merge_kind({c.kind for c in group})
        projs = list({id(p): p for c in group for p in c.projs}.values())
        heads = list(dict.fromkeys(_head_consumer(p, root).name for p in projs))
        gp = _gpcl_on(root)
        sites.append(
            Site(
                layer=min(c.layer for c in group),
                kind=kind,
                tensor=root.name,
                hidden=_hidden(root, projs),
                consumers=heads,
                projections=[p.name for p in projs],
                norm=_norm_label(root, norms),
                method=method,
                gpcl=gp.name if gp is not None else None,
            )
        )
    return sorted(sites, key=lambda s: (s.layer, KINDS.index(s.kind)))


def _renumber_calls(cands: list[_Candidate]) -> list[_Candidate]:
    """A block module called more than once (shared weights, one scope name for every call):
    number the blocks by call, in graph order, as the structural pass does."""
    per_group = Counter((c.layer, c.kind) for c in cands)
    if all(n == 1 for n in per_group.values()):
        return cands
    layer = -1
    for c in sorted(cands, key=lambda c: c.order):
        layer += c.kind in (PRE_ATTENTION, SHARED)
        c.layer = max(layer, 0)
    return cands


def _pick_roots(
    entries: list[tuple[gs.Tensor, gs.Node]], norms: dict[int, str], scopes: dict[str, list[str]]
) -> list[tuple[gs.Tensor, list[gs.Node]]]:
    """The roots of one (layer, kind) group: one per call when the block module is called more
    than once (the same projection module appears twice), else the norm output among them, else
    the root most projections read."""
    by_root: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
    for r, p in entries:
        by_root.setdefault(id(r), (r, []))[1].append(p)
    modules = Counter(tuple(scopes.get(p.name, ())[:-1]) for _, p in entries)
    if len(by_root) > 1 and max(modules.values()) > 1:
        return list(by_root.values())
    normed = [v for k, v in by_root.items() if k in norms]
    if normed:
        return normed[:1]
    return [max(by_root.values(), key=lambda v: len(v[1]))]


# ----------------------------------------------------------------------------- metadata
_SUBLAYER_RE = re.compile(r"^(.*[./]\d+)[./]layer[./]\d+$")


def _scope_site(scope_list: list[str]) -> tuple[str, str | None, str] | None:
    """(block, kind, submodule scope prefix) from a node's module scopes, innermost first. The
    block is its whole scope (``encoder.layers.1.blocks.0``), so the blocks of hierarchical stages
    (Swin, ConvNeXt, MobileViT) and of two towers (CLIP's text and vision encoders) stay apart.
    The kind is None for a projection directly in a numbered block under a name we do not know.
    A numbered sublayer list inside a block (T5's ``decoder.block.0.layer.1.EncDecAttention``) is
    part of that block."""
    unknown = None
    for s in reversed(scope_list):
        for m in reversed(list(BLOCK_RE.finditer(s))):
            kind = SUBMODULE_KIND.get(m.group(2))
            block = s[: m.start(2) - 1]
            sub = _SUBLAYER_RE.match(block)
            block = sub.group(1) if sub else block
            if kind:
                return block, kind, s[: m.end()]
            if unknown is None:
                unknown = (block, None, s[: m.end()])
    return unknown


def _keeps_last_axis(node: gs.Node) -> bool:
    """A permute or pad that leaves the channel (last) axis where it is: Swin's window partition
    between its norm and the attention projections (pad to whole windows, then permute)."""
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm") or ())
        return bool(perm) and perm[-1] == len(perm) - 1
    if node.op == "Pad" and len(node.inputs) >= 2 and (len(node.inputs) < 4 or not node.inputs[3].name):
        pads = _const_value(node.inputs[1])
        n = pads.size // 2 if pads is not None else 0
        return n > 0 and int(pads[n - 1]) == 0 and int(pads[2 * n - 1]) == 0
    return False


def _rank(t: gs.Tensor, depth: int = 8) -> int | None:
    """``t``'s rank: declared, or read back through the ops that set it in a window partition
    (exported graphs declare no intermediate shapes)."""
    if t.shape is not None:
        return len(t.shape)
    p = producer(t)
    if p is None or depth == 0 or not p.inputs:
        return None
    if p.op == "Reshape":
        shape = _const_value(p.inputs[1])
        return int(shape.size) if shape is not None else None
    if p.op == "Pad":
        pads = _const_value(p.inputs[1])
        return int(pads.size // 2) if pads is not None else None
    if p.op in ("Transpose", "Concat", "Slice", "Cast", "Identity"):
        return _rank(p.inputs[0], depth - 1)
    return None


def _roll_source(node: gs.Node) -> gs.Tensor | None:
    """The tensor a roll along a token axis re-presents (Swin's shifted windows: torch.roll is a
    Concat of two Slices of one tensor along one axis, never the channel axis), else None."""
    if node.op != "Concat" or len(node.inputs) < 2:
        return None
    axis = int(node.attrs.get("axis", 0))
    slices = [producer(i) for i in node.inputs]
    if any(p is None or p.op != "Slice" or len(p.inputs) < 4 for p in slices):
        return None
    src = slices[0].inputs[0]
    if any(p.inputs[0] is not src for p in slices):
        return None
    rank = _rank(src)
    if rank is None or not 0 <= (axis % rank) < rank - 1:
        return None
    for p in slices:
        axes = _const_value(p.inputs[3])
        if axes is None or axes.size != 1 or int(axes.reshape(())) % rank != axis % rank:
            return None
    return src


def _root(t: gs.Tensor) -> gs.Tensor:
    """What a projection input re-presents: back through view/cast ops, GPCL, permutes or pads
    that keep the channel axis last, and rolls along token axes (Swin's shifted windows)."""
    while True:
        t = see_through(t)
        p = producer(t)
        if p is None or not p.inputs:
            return t
        rolled = _roll_source(p)
        if rolled is not None:
            t = rolled
        elif _keeps_last_axis(p):
            t = p.inputs[0]
        else:
            return t


def _block_order(first: dict[str, int]) -> Any:
    """Sort key of blocks: container by container (a stage's or a tower's layer list, in the
    order the graph first reaches it), then by index (``layers.1.blocks.0`` is (1, 0)). Two
    towers whose layers interleave in the graph are still numbered tower by tower."""
    containers: dict[str, int] = {}
    for block, pos in first.items():
        c = block.rsplit(".", 1)[0]
        containers[c] = min(pos, containers.get(c, pos))
    return lambda b: (containers[b.rsplit(".", 1)[0]], tuple(int(i) for i in re.findall(r"(?<![^./])\d+(?![^./])", b)))


def _input_dependent(graph: gs.Graph) -> set[int]:
    """ids of the tensors computed from a graph input. A norm of weights alone (DeBERTa-v3's
    LayerNorm over the relative-position table, which every block's query/key projections also
    read) is not on the residual stream, so it is no block's input and never a site."""
    live = {id(t) for t in graph.inputs}
    for node in graph.nodes:  # topologically sorted by find_sites
        if any(id(t) in live for t in node.inputs):
            live.update(id(o) for o in node.outputs)
    return live


def _inside(node: gs.Node | None, prefix: str, scopes: dict[str, list[str]]) -> bool:
    if node is None:
        return False
    return any(s == prefix or s.startswith(prefix + ".") for s in scopes.get(node.name, ()))


def _entry_norm(root: gs.Tensor, prefix: str, norms: dict[int, str], scopes: dict[str, list[str]]) -> bool:
    """A norm inside the submodule that normalises what comes from outside it (ESM keeps its
    pre-attention LayerNorm inside ``attention``), unlike one between two of its projections
    (DeepSeek's ``kv_a_layernorm``): walk back through the norm module's own nodes and look at
    where their inputs come from."""
    first = producer(root)
    if id(root) not in norms or first is None or not scopes.get(first.name):
        return False
    norm_scope = scopes[first.name][-1]
    stack, seen = [first], {id(first)}
    while stack:
        for t in stack.pop().inputs:
            p = producer(t)
            if p is None or id(p) in seen or is_const(t):
                continue
            if _inside(p, norm_scope, scopes):
                seen.add(id(p))
                stack.append(p)
            elif _inside(p, prefix, scopes):
                return False
    return True


def sites_from_metadata(graph: gs.Graph, scopes: dict[str, list[str]], norms: dict[int, str]) -> list[Site]:
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    live = _input_dependent(graph)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    untyped: dict[str, dict[int, tuple[gs.Tensor, list[gs.Node]]]] = defaultdict(dict)
    first: dict[str, int] = {}  # block -> graph position of its first projection
    for node in graph.nodes:
        if not is_projection(node) or node.name not in scopes:
            continue
        where = _scope_site(scopes[node.name])
        if where is None:
            continue
        path, kind, prefix = where
        root = _root(node.inputs[0])
        if id(root) not in live:
            continue
        first.setdefault(path, order[id(node)])
        if kind is None:
            # a projection directly in the block (OPT's fc1, ConvNeXt's pwconv1): an entry if it reads
            # a norm from outside its own submodule (Swin's downsample normalises and projects inside it)
            if id(root) in norms and not _inside(producer(root), prefix, scopes):
                untyped[path].setdefault(id(root), (root, []))[1].append(node)
        elif not _inside(producer(root), prefix, scopes) or _entry_norm(root, prefix, norms, scopes):
            groups[(path, kind)].append((root, node))  # an entry projection of the block
    rank = {p: i for i, p in enumerate(sorted({p for p, _ in groups} | set(untyped), key=_block_order(first)))}
    cands = []
    for (path, kind), entries in groups.items():
        if kind == PRE_CROSS_ATTENTION:
            # the query projection only: the keys and values read the encoder's states (in an encoder
            # graph that computes the decoder's cross-attention cache, they read its final norm)
            entries = [(r, p) for r, p in entries if _score_sides([p], norms) == {0}]
            if not entries:
                continue
        for root, projs in _pick_roots(entries, norms, scopes):
            cands.append(_Candidate(rank[path], kind, root, projs, order.get(id(producer(root)), -1)))
    for path, roots in untyped.items():
        for root, projs in roots.values():
            for kind, part in _split_kinds(projs, norms):
                cands.append(_Candidate(rank[path], kind, root, part, order.get(id(producer(root)), -1)))
    return _make_sites(_renumber_calls(cands), norms, "metadata")


# ----------------------------------------------------------------------------- structure
# View, cast and broadcast ops between a norm and its projections (a MoE block reshapes tokens
# and broadcasts them to every expert's batched matmul).
_HEAD_PATH_OPS = {"Reshape", "Flatten", "Cast", "Identity", "Squeeze", "Unsqueeze", "Expand"}


def _projection_heads(t: gs.Tensor) -> list[gs.Node]:
    """Projections reading ``t`` directly or through view/cast/broadcast ops and GPCL."""
    found, stack, rolls = [], [t], set()
    while stack:
        cur = stack.pop()
        for c in cur.outputs:
            if (is_projection(c) and c.inputs[0] is cur) or (is_expert_projection(c) and c.inputs[1] is cur):
                found.append(c)
            elif (c.op in _HEAD_PATH_OPS or is_gpcl(c) or _keeps_last_axis(c)) and c.inputs[0] is cur:
                stack.extend(c.outputs)
            elif c.op == "Slice" and c.inputs[0] is cur:  # a roll: both slices meet in one Concat
                for cc in c.outputs[0].outputs:
                    if id(cc) not in rolls and _roll_source(cc) is cur:
                        rolls.add(id(cc))
                        stack.extend(cc.outputs)
    return found


def _reach(projs: list[gs.Node], norms: dict[int, str]) -> tuple[set[int], bool, bool]:
    """Nodes reachable from ``projs`` before any further projection or a norm output that feeds
    projections, and whether an attention Softmax (one that follows a MatMul of two activations,
    Q x K^T; a MoE router's Softmax follows only its projection) / a further projection was
    reached."""
    queue = deque((o, False, False) for p in projs for o in p.outputs)
    seen: set[int] = set()
    softmax = projection = False
    while queue and len(seen) < _BFS_LIMIT:
        t, scored, normed = queue.popleft()
        if id(t) in norms and _projection_heads(t):  # the next block's norm (q/k norms are passed)
            continue
        # a projection past a norm is not an MLP's second one (Swin's patch-merging reduction reaches
        # the classifier only through the final norm)
        normed = normed or id(t) in norms
        for c in t.outputs:
            if id(c) in seen:
                continue
            seen.add(id(c))
            if c.op == "Softmax" and scored:
                softmax = True
            if is_projection(c) or is_expert_projection(c):
                projection = projection or not normed
                continue
            pairwise = scored or (c.op in ("MatMul", "Einsum") and not any(is_const(i) for i in c.inputs))
            queue.extend((o, pairwise, normed) for o in c.outputs)
    return seen, softmax, projection


def _is_pairwise(node: gs.Node) -> bool:
    return node.op in ("MatMul", "Einsum") and not any(is_const(i) for i in node.inputs)


def _score_sides(projs: list[gs.Node], norms: dict[int, str]) -> set[int]:
    """Which operand of the first product of two activations each path from ``projs`` reaches:
    0 the query side of ``Q x K^T``, 1 the key side (or the values' side of ``P x V``). A self-
    attention's projections reach both; a cross-attention's query projection only side 0 (its
    keys and values are projections of the encoder's states, or cached ones)."""
    queue = deque(o for p in projs for o in p.outputs)
    seen: set[int] = set()
    sides: set[int] = set()
    while queue and len(seen) < _BFS_LIMIT:
        t = queue.popleft()
        if id(t) in norms and _projection_heads(t):
            continue
        for c in t.outputs:
            if _is_pairwise(c):
                sides.update(i for i, x in enumerate(c.inputs) if x is t)
                continue
            if id(c) in seen or is_projection(c) or is_expert_projection(c):
                continue
            seen.add(id(c))
            queue.extend(c.outputs)
    return sides


def _attention_kind(projs: list[gs.Node], norms: dict[int, str]) -> str:
    """pre-cross-attention where the root's attention projections reach only the query side."""
    return PRE_CROSS_ATTENTION if _score_sides(projs, norms) == {0} else PRE_ATTENTION


def _classify(projs: list[gs.Node], norms: dict[int, str]) -> str | None:
    """pre-attention if a Softmax follows before any further projection, pre-mlp if another
    projection follows (the down projection), None otherwise (e.g. lm_head)."""
    _, softmax, projection = _reach(projs, norms)
    return PRE_ATTENTION if softmax else PRE_MLP if projection else None


def _split_kinds(projs: list[gs.Node], norms: dict[int, str]) -> list[tuple[str, list[gs.Node]]]:
    """The projections of one norm output split by kind: attention ones reach a Softmax or join
    the path of one that does (V meets the attention probabilities); the others are MLP ones if
    they reach a further projection. [] when it is not a site."""
    reach = {id(p): _reach([p], norms) for p in projs}
    attn = [p for p in projs if reach[id(p)][1]]
    if not attn:
        kind = _classify(projs, norms)
        return [(kind, projs)] if kind else []
    attn_nodes = set().union(*(reach[id(p)][0] for p in attn))
    rest = [p for p in projs if p not in attn]
    attn += [p for p in rest if reach[id(p)][0] & attn_nodes]
    mlp = [p for p in rest if p not in attn and reach[id(p)][2]]
    return [(_attention_kind(attn, norms), attn)] + ([(PRE_MLP, mlp)] if mlp else [])


def _biased(t: gs.Tensor) -> gs.Tensor:
    """A projection's output after its bias (a sole Add of a weight), if it has one."""
    if len(t.outputs) == 1 and t.outputs[0].op == "Add" and any(is_const(i) for i in t.outputs[0].inputs):
        return t.outputs[0].outputs[0]
    return t


def _reprojected(t: gs.Tensor) -> list[gs.Tensor]:
    """The tensors a block reads for norm output ``t``: ``t`` itself, or, where each projection
    of ``t`` feeds further projections directly (ALBERT's and ELECTRA's embedding-size ->
    hidden-size mapping; an MLP has its activation in between), those projections' outputs."""
    projs = _projection_heads(t)
    outs = [_biased(p.outputs[0]) for p in projs]
    if projs and all(_projection_heads(o) for o in outs):
        return outs
    return [t]


def sites_from_structure(graph: gs.Graph, norms: dict[int, str]) -> list[Site]:
    tensors = {id(t): t for t in graph.tensors().values()}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    live = _input_dependent(graph)
    found = []
    for tid in norms:
        t = tensors.get(tid)
        if t is None or tid not in live:
            continue
        for root in _reprojected(t):
            projs = _projection_heads(root)
            parts = _split_kinds(projs, norms) if projs else []
            if parts:
                kind = _merge_kind({k for k, _ in parts})
                found.append((order.get(id(producer(root)), -1), kind, root, [p for _, ps in parts for p in ps]))
    found.sort(key=lambda f: f[0])
    tower_of = _towers(graph, [f[2] for f in found])
    cands: list[_Candidate] = []
    for tower in dict.fromkeys(tower_of):  # tower by tower, in the order the graph reaches them
        blocks: list[list[_Candidate]] = []
        for (pos, kind, t, projs), tw in zip(found, tower_of):
            if tw != tower:
                continue
            # a new block at each (self-)attention or shared site, and at a site whose kind the
            # block has already (MLP-only blocks: ConvNeXt)
            if not blocks or kind in (PRE_ATTENTION, SHARED) or kind in {c.kind for c in blocks[-1]}:
                blocks.append([])
            blocks[-1].append(_Candidate(0, kind, t, projs, pos))
        # an MLP after a tower's last attention block, with no attention of its own, is a head
        # (wav2vec2's classifier projector reading a post-LN block's last norm, SigLIP's pooling MLP)
        attention = {PRE_ATTENTION, SHARED}
        if len(blocks) > 1 and {c.kind for c in blocks[-1]} == {PRE_MLP} and attention & {c.kind for c in blocks[-2]}:
            blocks.pop()
        for block in blocks:
            layer = (cands[-1].layer + 1) if cands else 0
            for c in block:
                c.layer = layer
            cands.extend(block)
    return _make_sites(cands, norms, "structure")


def _towers(graph: gs.Graph, roots: list[gs.Tensor]) -> list[int]:
    """A tower label per root: roots are in one tower when one is computed from the other (a
    residual stream's sites all are); a dual encoder's two towers share none, so their blocks,
    which interleave in graph order, are numbered tower by tower as the metadata pass does."""
    index = {id(r): i for i, r in enumerate(roots)}
    bits: dict[int, int] = {}  # tensor -> bitset of the roots it is computed from (itself included)
    for node in graph.nodes:  # topologically sorted
        b = 0
        for t in node.inputs:
            b |= bits.get(id(t), 0)
        for o in node.outputs:
            bits[id(o)] = b | (1 << index[id(o)] if id(o) in index else 0)
    parent = list(range(len(roots)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for j, r in enumerate(roots):
        b = bits.get(id(r), 0)
        for i in range(j):
            if b >> i & 1:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(roots))]


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


def site_counts(sites: list[Site]) -> dict[str, int]:
    """Sites per kind; ``shared`` and ``pre-cross-attention`` are listed only for models that have them."""
    per_kind = Counter(s.kind for s in sites)
    return {k: per_kind.get(k, 0) for k in KINDS if k in (PRE_ATTENTION, PRE_MLP) or per_kind.get(k)}


def no_sites_reason(graph: gs.Graph) -> str:
    """Why a graph has no site, in one line."""
    if norm_outputs(graph):
        return "no normalisation output feeds attention or MLP projections"
    if any(n.op in ("Conv", "BatchNormalization") for n in graph.nodes):
        return (
            "no normalisation over the last axis: a convolutional model normalises NCHW channels (BatchNorm, "
            "folded into its convolutions on export), and GPCL reads quaternions along the last axis"
        )
    return "the graph has no normalisation"


def sites_file(path: str | Path) -> dict:
    """List the candidate GPCL sites of an ONNX model (layer, kind, tensor, hidden size,
    consumers); changes nothing. A ``shared`` site is one norm output read by both attention
    and MLP (its consumers are both); ``shared_sites`` counts them. With none, ``reason`` says
    why (a convolutional model: its norms are not over the last axis)."""
    lm = load_graph(path)
    sites = find_sites_loaded(lm)
    return {
        "ok": True,
        "model": str(path),
        "method": sites[0].method if sites else None,
        "layers": len({s.layer for s in sites}),
        "counts": site_counts(sites),
        "shared_sites": sum(s.kind == SHARED for s in sites),
        "reason": None if sites else no_sites_reason(lm.graph),
        "sites": [s.to_dict() for s in sites],
    }
