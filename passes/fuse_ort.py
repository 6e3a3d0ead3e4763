"""Rewrite an exported decoder so that ONNX Runtime runs it faster, in standard ONNX ops (so a
TensorRT build of the result parses it too). Measured on a batch-8 decode step of our Llama export
(BENCHMARKS.md, "Generate"), ORT ran ~500 kernels per step, and two patterns of the dynamo export
cost it most:

- **repeat-KV**: grouped-query attention repeats each KV head ``groups`` times with
  ``Unsqueeze -> Expand -> Reshape``, which copies every layer's whole cache on every step (its
  cost grows with batch x context). ``grouped_attention`` removes the copy: the query heads that
  share a KV head are folded into the row axis instead (``Q [B, H, S, D] -> [B, kvH, groups*S, D]``,
  a free view), one MatMul per KV head reads the cache as it is, and the scores come back to
  ``[B, H, S, T]`` (again a view) for the scale, mask and Softmax; the same for ``P @ V``. One
  GEMM with ``groups`` rows replaces ``groups`` matrix-vector products per KV head.
- **RMSNorm** exported as ``x * Reciprocal(Sqrt(mean(x^2) + eps))``: ORT's
  SimplifiedLayerNormalization fusion only knows ``x / Sqrt(...)``, so seven ops stay seven
  kernels. ``rmsnorm_div`` writes the ``Div`` form (the same arithmetic up to one rounding), and
  ORT fuses each norm into one kernel when it loads the session.

Every original tensor that survives keeps its name, graph inputs and outputs are unchanged, and
new nodes inherit the exporter's scope metadata of the node they replace, so GPCL nodes (which
read a norm's output and feed the projections) survive and ``gpcl-trt sites`` finds the same
sites on the result. The pass is idempotent: a second run finds nothing to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from gpcl_trt.common import GpclError, check_can_write, sha256_file
from gpcl_trt.passes.graph import LoadedModel, is_gpcl, load_graph, producer

VARIANTS = ("standard", "contrib", "contrib-gqa")
LOGITS = ("all", "last")
MS = "com.microsoft"
STAGE = "optimize"


def _const_value(t: Any) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = producer(t)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return np.asarray(p.attrs["value"].values)
    return None


def _int_at(shape_tensor: Any, index: int) -> int | None:
    """Element ``index`` of a shape tensor when it is known: a constant, or a Concat whose piece
    at that position is a one-element constant."""
    v = _const_value(shape_tensor)
    if v is not None:
        return int(v.reshape(-1)[index]) if v.size > index else None
    p = producer(shape_tensor)
    if p is None or p.op != "Concat":
        return None
    pos = 0
    for inp in p.inputs:
        c = _const_value(inp)
        n = c.size if c is not None else 1  # a computed piece of a shape Concat is one dimension
        if pos <= index < pos + n:
            return int(c.reshape(-1)[index - pos]) if c is not None else None
        pos += n
    return None


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        v = _const_value(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def _const(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, np.int64))


def _inherit(like: LoadedModel | None, new: gs.Node, old: gs.Node) -> None:
    if like is not None and old.name in like.node_metadata:
        like.node_metadata[new.name] = like.node_metadata[old.name]


# ----------------------------------------------------------------------------- repeat-KV
def _repeat_kv(expand: gs.Node) -> tuple[gs.Tensor, gs.Tensor, int, int] | None:
    """``Unsqueeze(kv, 2) -> Expand([B, kvH, g, T, D]) -> Reshape([B, kvH*g, T, D])``: (kv, the
    repeated tensor, kvH, groups)."""
    if len(expand.inputs) != 2 or len(expand.outputs[0].outputs) != 1:
        return None
    unsq = producer(expand.inputs[0])
    reshape = expand.outputs[0].outputs[0]
    if unsq is None or unsq.op != "Unsqueeze" or _axes(unsq) not in ([2], [-3]) or reshape.op != "Reshape":
        return None
    kv_heads, groups = _int_at(expand.inputs[1], 1), _int_at(expand.inputs[1], 2)
    heads = _int_at(reshape.inputs[1], 1)
    if not kv_heads or not groups or groups < 1 or (heads is not None and heads != kv_heads * groups):
        return None
    return unsq.inputs[0], reshape.outputs[0], kv_heads, groups


def grouped_attention(graph: gs.Graph, like: LoadedModel | None = None) -> list[str]:
    """Replace each repeat-KV whose every use is ``A @ repeat(kv)`` or ``A @ repeat(kv)^T`` by a
    grouped MatMul (module docstring). Returns the names of the Expand nodes removed."""
    done = []
    for expand in [n for n in graph.nodes if n.op == "Expand"]:
        found = _repeat_kv(expand)
        if found is None:
            continue
        kv, rep, kv_heads, groups = found
        uses = []  # (MatMul, Transpose or None)
        for c in rep.outputs:
            t = None
            if c.op == "Transpose" and list(c.attrs.get("perm", [])) == [0, 1, 3, 2] and len(c.outputs[0].outputs) == 1:
                t, c = c, c.outputs[0].outputs[0]
            if c.op != "MatMul" or c.inputs[1] is not (t.outputs[0] if t else rep):
                uses = None
                break
            uses.append((c, t))
        if not uses:
            continue
        for mm, t in uses:
            tag = mm.name or mm.outputs[0].name
            a, y = mm.inputs[0], mm.outputs[0]
            a_g = gs.Variable(f"{tag}/gqa_a", dtype=a.dtype)
            y_g = gs.Variable(f"{tag}/gqa_y", dtype=y.dtype)
            if t is not None:
                t.inputs[0] = kv
            mm.inputs[0] = a_g
            mm.inputs[1] = t.outputs[0] if t is not None else kv
            mm.outputs[0] = y_g
            # Reshape's 0 copies the input's dim: [B, H, S, X] -> [B, kvH, groups*S, X] and back
            fold = gs.Node(
                "Reshape",
                f"{tag}/gqa_fold",
                inputs=[a, _const(f"{tag}/gqa_fold_shape", [0, kv_heads, -1, 0])],
                outputs=[a_g],
            )
            sc = y.outputs[0] if len(y.outputs) == 1 else None
            k = None if sc is None or sc.op != "Mul" or len(sc.inputs) != 2 else (1 if sc.inputs[0] is y else 0)
            c = _const_value(sc.inputs[k]) if k is not None else None
            if c is not None and c.size == 1 and sc.inputs[1 - k] is y:
                # the softmax scale goes before the unfold, next to the MatMul: ORT folds it into
                # FusedMatMul's alpha (one kernel fewer per layer)
                sc.inputs[1 - k] = y_g
                y = sc.outputs[0]
                y_g = gs.Variable(f"{tag}/gqa_scaled", dtype=y.dtype)
                sc.outputs[0] = y_g
            unfold = gs.Node(
                "Reshape",
                f"{tag}/gqa_unfold",
                inputs=[y_g, _const(f"{tag}/gqa_unfold_shape", [0, kv_heads * groups, -1, 0])],
                outputs=[y],
            )
            for n in (fold, unfold):
                _inherit(like, n, mm)
            graph.nodes.extend([fold, unfold])
        done.append(expand.name)
    return done


# ----------------------------------------------------------------------------- RMSNorm
def rmsnorm_div(graph: gs.Graph, like: LoadedModel | None = None) -> list[str]:
    """``Mul(x, Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps)))`` -> ``Div(x, Sqrt(...))``, the
    form ORT's SimplifiedLayerNormalization fusion matches. The Mul's output keeps its name.
    Returns the names of the Reciprocal nodes removed."""
    done = []
    for rec in [n for n in graph.nodes if n.op == "Reciprocal"]:
        sqrt = producer(rec.inputs[0])
        if sqrt is None or sqrt.op != "Sqrt" or len(rec.outputs[0].outputs) != 1:
            continue
        add = producer(sqrt.inputs[0])
        mean = producer(add.inputs[0]) if add is not None and add.op == "Add" else None
        pow_ = producer(mean.inputs[0]) if mean is not None and mean.op == "ReduceMean" else None
        if pow_ is None or pow_.op not in ("Pow", "Mul"):
            continue
        x = pow_.inputs[0]
        if pow_.op == "Mul" and pow_.inputs[1] is not x:
            continue
        mul = rec.outputs[0].outputs[0]
        if mul.op != "Mul" or len(mul.inputs) != 2 or x not in mul.inputs:
            continue
        y = mul.outputs[0]
        mul.inputs.clear()  # the Mul and the Reciprocal become dead; cleanup removes them
        mul.outputs.clear()
        div = gs.Node("Div", f"{mul.name}/rms_div", inputs=[x, sqrt.outputs[0]], outputs=[y])
        _inherit(like, div, mul)
        graph.nodes.append(div)
        done.append(rec.name)
    return done


# ----------------------------------------------------------------------------- contrib (ORT only)
def _only(t: gs.Tensor, op: str) -> gs.Node | None:
    p = producer(t)
    return p if p is not None and p.op == op else None


def _heads_input(t: gs.Tensor) -> gs.Tensor | None:
    """``Transpose([0, 2, 1, 3])(Reshape(x, [B, S, heads, D]))``: x, the projection's [B, S, heads*D]."""
    tr = _only(t, "Transpose")
    if tr is None or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    rs = _only(tr.inputs[0], "Reshape")
    return rs.inputs[0] if rs is not None else None


def _rotary(t: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor] | None:
    """``x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin`` (transformers' rotate_half):
    (x, cos, sin) with cos/sin as the Mul reads them."""
    add = _only(t, "Add")
    if add is None:
        return None
    for m_cos, m_sin in (
        (producer(add.inputs[0]), producer(add.inputs[1])),
        (producer(add.inputs[1]), producer(add.inputs[0])),
    ):
        if m_cos is None or m_sin is None or m_cos.op != "Mul" or m_sin.op != "Mul":
            continue
        for i in (0, 1):
            cat = _only(m_sin.inputs[i], "Concat")
            if cat is None or len(cat.inputs) != 2:
                continue
            neg, sl = producer(cat.inputs[0]), producer(cat.inputs[1])
            if neg is None or sl is None or neg.op != "Neg" or sl.op != "Slice":
                continue
            x = sl.inputs[0]
            if (
                x not in m_cos.inputs
                or _only(neg.inputs[0], "Slice") is None
                or producer(neg.inputs[0]).inputs[0] is not x
            ):
                continue
            return x, m_cos.inputs[1 - m_cos.inputs.index(x)], m_sin.inputs[1 - i]
    return None


def _rope_table(cos: gs.Tensor, sin: gs.Tensor, position_ids: gs.Tensor, max_positions: int, half: int | None):
    """cos/sin caches [max_positions, D/2] for RotaryEmbedding, when the graph's tables are
    ``scale * Cos(Concat(f, f))`` with ``f = positions * inv_freq`` (a constant inv_freq: the
    default, linear, Llama-3 and YaRN ropes; not dynamic NTK, whose inv_freq depends on length)."""
    tables = []
    for t, fn in ((cos, "Cos"), (sin, "Sin")):
        scale = 1.0
        while (p := producer(t)) is not None and p.op in ("Unsqueeze", "Cast", "Mul"):
            if p.op == "Mul":
                c = [_const_value(i) for i in p.inputs]
                k = next((j for j in (0, 1) if c[j] is not None and c[j].size == 1), None)
                if k is None:
                    return None
                scale *= float(c[k].reshape(-1)[0])
                t = p.inputs[1 - k]
            else:
                t = p.inputs[0]
        trig = _only(t, fn)
        cat = _only(trig.inputs[0], "Concat") if trig is not None else None
        if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            return None
        f = _only(cat.inputs[0], "Mul")
        inv = None
        if f is not None:
            for j in (0, 1):
                v = _const_value(f.inputs[j])
                if v is not None and v.size == (half or v.size) and v.size > 1:
                    inv = v.astype(np.float32).reshape(-1)
        if inv is None:
            return None
        pos = np.arange(max_positions, dtype=np.float32)[:, None]
        ang = (pos * inv[None, :]).astype(np.float32)  # float32 product, as the graph does
        tables.append((np.cos(ang.astype(np.float64)) if fn == "Cos" else np.sin(ang.astype(np.float64))) * scale)
    return [np.asarray(x, np.float32) for x in tables]


def contrib_attention(graph: gs.Graph, max_positions: int | None, like: LoadedModel | None = None) -> list[str]:
    """Each layer's rotary + cache Concat + attention -> RotaryEmbedding (q, k) and one
    GroupQueryAttention (com.microsoft; ONNX Runtime only), the causal/padding/window mask passed
    as its attention_bias. Runs after :func:`grouped_attention`. Returns the present keys
    rewritten."""
    inputs = {t.name: t for t in graph.inputs}
    mask_in, pos_in = inputs.get("attention_mask"), inputs.get("position_ids")
    if mask_in is None or pos_in is None or not max_positions:
        return []
    done: list[str] = []
    shared: dict = {}
    for out_k in [o for o in graph.outputs if o.name.startswith("present.") and o.name.endswith(".key")]:
        out_v = next((o for o in graph.outputs if o.name == out_k.name[: -len("key")] + "value"), None)
        ck, cv = _only(out_k, "Concat"), _only(out_v, "Concat") if out_v is not None else None
        if ck is None or cv is None or len(ck.inputs) != 2 or len(cv.inputs) != 2:
            continue
        past_k, k_rot = ck.inputs
        past_v, v_t = cv.inputs
        rot_k = _rotary(k_rot)
        v3 = _heads_input(v_t)
        if rot_k is None or v3 is None:
            continue
        k3 = _heads_input(rot_k[0])
        # present.key -> Transpose -> MatMul(fold(q_rot), .) -> unfold [-> Mul scale] -> ... Softmax
        uses = [c for c in out_k.outputs]
        if k3 is None or len(uses) != 1 or uses[0].op != "Transpose" or len(uses[0].outputs[0].outputs) != 1:
            continue
        mm1 = uses[0].outputs[0].outputs[0]
        if mm1.op != "MatMul":
            continue
        fold = _only(mm1.inputs[0], "Reshape")  # grouped_attention's fold; absent without GQA
        rot_q = _rotary(fold.inputs[0] if fold is not None else mm1.inputs[0])
        q3 = _heads_input(rot_q[0]) if rot_q is not None else None
        shape = past_k.shape if isinstance(past_k.shape, (list, tuple)) and len(past_k.shape) == 4 else None
        if q3 is None or shape is None or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            continue
        kv_heads, head = int(shape[1]), int(shape[3])
        unfold, t = None, mm1.outputs[0]
        while unfold is None and len(t.outputs) == 1 and t.outputs[0].op in ("Mul", "Reshape"):
            unfold = t.outputs[0] if t.outputs[0].op == "Reshape" else None
            t = t.outputs[0].outputs[0]
        heads = kv_heads if fold is None else (_int_at(unfold.inputs[1], 1) if unfold is not None else None)
        if not heads or heads % kv_heads:
            continue
        # walk the scores to the Softmax: Reshape / Mul(scalar) / Add(mask)
        scale, bias, t = 1.0, None, mm1.outputs[0]
        node = None
        while len(t.outputs) == 1:
            node = t.outputs[0]
            if node.op == "Reshape":
                pass
            elif node.op in ("Mul", "Div"):
                c = [_const_value(i) for i in node.inputs]
                if c[1] is None or c[1].size != 1:
                    break
                scale = scale * float(c[1].reshape(-1)[0]) if node.op == "Mul" else scale / float(c[1].reshape(-1)[0])
            elif node.op == "Add" and bias is None:
                bias = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
            else:
                break
            t = node.outputs[0]
        if node is None or node.op != "Softmax" or bias is None:
            continue
        # Softmax -> fold -> MatMul(., present.value) -> unfold -> Transpose -> Reshape [B, S, H*D]
        t = node.outputs[0]
        while len(t.outputs) == 1 and t.outputs[0].op == "Reshape":
            t = t.outputs[0].outputs[0]
        mm2 = t.outputs[0] if len(t.outputs) == 1 else None
        if mm2 is None or mm2.op != "MatMul" or mm2.inputs[1] is not out_v:
            continue
        t = mm2.outputs[0]
        while len(t.outputs) == 1 and t.outputs[0].op == "Reshape":
            t = t.outputs[0].outputs[0]
        tr = t.outputs[0] if len(t.outputs) == 1 else None
        if tr is None or tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
            continue
        rs = tr.outputs[0].outputs[0] if len(tr.outputs[0].outputs) == 1 else None
        if rs is None or rs.op != "Reshape":
            continue
        key = (id(rot_q[1]), id(rot_q[2]))
        if key not in shared:
            tables = _rope_table(rot_q[1], rot_q[2], pos_in, max_positions, head // 2)
            if tables is None:
                continue
            shared[key] = (
                gs.Constant(f"ort_rope_cos_{len(shared)}", tables[0]),
                gs.Constant(f"ort_rope_sin_{len(shared)}", tables[1]),
            )
        if (id(rot_k[1]), id(rot_k[2])) != key:
            continue
        cos_c, sin_c = shared[key]
        if "lens" not in shared:
            shared["lens"] = _seqlens(graph, mask_in)
        seqlens, total = shared["lens"]
        tag = f"/ort_attention/{out_k.name}"
        q_r = gs.Variable(f"{tag}/q_rot", dtype=q3.dtype)
        k_r = gs.Variable(f"{tag}/k_rot", dtype=k3.dtype)
        new = [
            gs.Node("RotaryEmbedding", f"{tag}/rotary_q", domain=MS, inputs=[q3, pos_in, cos_c, sin_c], outputs=[q_r]),
            gs.Node("RotaryEmbedding", f"{tag}/rotary_k", domain=MS, inputs=[k3, pos_in, cos_c, sin_c], outputs=[k_r]),
        ]
        y = rs.outputs[0]
        for n in (rs, ck, cv):  # the old producers let go of the tensors GQA now makes
            n.outputs.clear()
        empty = gs.Variable.empty
        new.append(
            gs.Node(
                "GroupQueryAttention",
                f"{tag}/gqa",
                domain=MS,
                attrs={"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)},
                inputs=[q_r, k_r, v3, past_k, past_v, seqlens, total, empty(), empty(), empty(), bias],
                outputs=[y, out_k, out_v],
            )
        )
        for n in new:
            _inherit(like, n, mm1)
        graph.nodes.extend(new)
        done.append(out_k.name)
    return done


def contrib_rotary(graph: gs.Graph, max_positions: int | None, like: LoadedModel | None = None) -> list[str]:
    """Each rotate_half rotary left (on [B, heads, S, D]: the standard attention path) -> one
    RotaryEmbedding (com.microsoft) reading position_ids and cos/sin caches made from the graph's
    constant inv_freq. Returns the rotated tensors' names."""
    pos_in = next((t for t in graph.inputs if t.name == "position_ids"), None)
    if pos_in is None or not max_positions:
        return []
    done, tables = [], {}
    for add in [n for n in graph.nodes if n.op == "Add"]:
        found = _rotary(add.outputs[0])
        if found is None:
            continue
        x, cos, sin = found
        key = (id(cos), id(sin))
        if key not in tables:
            t = _rope_table(cos, sin, pos_in, max_positions, None)
            tables[key] = t and (
                gs.Constant(f"ort_rotary_cos_{len(tables)}", t[0]),
                gs.Constant(f"ort_rotary_sin_{len(tables)}", t[1]),
            )
        if not tables[key]:
            continue
        # rotate_half splits x at its own half: the cache must cover the whole of x's last axis
        half = tables[key][0].values.shape[1]
        cats = [c for m in (producer(i) for i in add.inputs) for j in m.inputs if (c := _only(j, "Concat")) is not None]
        end = _const_value(producer(cats[0].inputs[1]).inputs[2]) if cats else None
        if end is None or end.size != 1 or int(end.reshape(-1)[0]) != half:
            continue
        y = add.outputs[0]
        add.outputs.clear()
        node = gs.Node(
            "RotaryEmbedding",
            f"{add.name}/rotary",
            domain=MS,
            inputs=[x, pos_in, *tables[key]],
            outputs=[y],
        )
        _inherit(like, node, add)
        graph.nodes.append(node)
        done.append(y.name)
    return done


def skip_rmsnorm(graph: gs.Graph, like: LoadedModel | None = None) -> list[str]:
    """``r = a + b`` followed by the RMSNorm of ``r`` (the Div form of :func:`rmsnorm_div`) times
    a weight -> one SkipSimplifiedLayerNormalization (com.microsoft), whose fourth output is ``r``
    under its own name (the next residual Add reads it). Returns the norms' output names."""
    done = []
    for div in [n for n in graph.nodes if n.op == "Div"]:
        x, sq = div.inputs
        sqrt = _only(sq, "Sqrt")
        add_eps = _only(sqrt.inputs[0], "Add") if sqrt is not None else None
        if add_eps is None or len(div.outputs[0].outputs) != 1:
            continue
        eps = next((_const_value(i) for i in add_eps.inputs if _const_value(i) is not None), None)
        mean = next((producer(i) for i in add_eps.inputs if producer(i) is not None), None)
        if eps is None or eps.size != 1 or mean is None or mean.op != "ReduceMean" or _axes(mean) not in ([-1], [2]):
            continue
        mul = div.outputs[0].outputs[0]
        gamma = next((i for i in mul.inputs if _const_value(i) is not None), None) if mul.op == "Mul" else None
        res = _only(x, "Add")
        if gamma is None or res is None or any(_const_value(i) is not None for i in res.inputs):
            continue
        y = mul.outputs[0]
        a, b = res.inputs
        for n in (mul, res):
            n.outputs.clear()
        node = gs.Node(
            "SkipSimplifiedLayerNormalization",
            f"{div.name}/skip_rms",
            domain=MS,
            attrs={"epsilon": float(eps.reshape(-1)[0])},
            inputs=[a, b, gamma],
            outputs=[y, gs.Variable.empty(), gs.Variable.empty(), x],
        )
        _inherit(like, node, div)
        graph.nodes.append(node)
        done.append(y.name)
    return done


def _seqlens(graph: gs.Graph, mask: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """GroupQueryAttention's seqlens_k ([B] int32: total length - 1) and total_sequence_length
    (int32 scalar) from attention_mask [B, T]. Every row has T: left padding is masked by the
    attention bias, not by a shorter length."""
    tag = "/ort_attention/lens"
    names = [f"{tag}/{n}" for n in ("shape", "total64", "total", "last", "batch", "seqlens")]
    v = {n: gs.Variable(n) for n in names}
    shape, total64, total, last, batch, seqlens = (v[n] for n in names)
    nodes = [
        gs.Node("Shape", f"{tag}/Shape", inputs=[mask], outputs=[shape]),
        gs.Node(
            "Gather",
            f"{tag}/Gather",
            attrs={"axis": 0},
            inputs=[shape, gs.Constant(f"{tag}/one", np.array(1, np.int64))],
            outputs=[total64],
        ),
        gs.Node("Cast", f"{tag}/Cast", attrs={"to": 6}, inputs=[total64], outputs=[total]),
        gs.Node(
            "Sub", f"{tag}/Sub", inputs=[total, gs.Constant(f"{tag}/one32", np.array(1, np.int32))], outputs=[last]
        ),
        gs.Node(
            "Slice", f"{tag}/Batch", inputs=[shape, _const(f"{tag}/s0", [0]), _const(f"{tag}/s1", [1])], outputs=[batch]
        ),
        gs.Node("Expand", f"{tag}/Expand", inputs=[last, batch], outputs=[seqlens]),
    ]
    shape.dtype, total64.dtype, batch.dtype = np.int64, np.int64, np.int64
    total.dtype, last.dtype, seqlens.dtype = np.int32, np.int32, np.int32
    graph.nodes.extend(nodes)
    return seqlens, total


def past_length_from_mask(graph: gs.Graph, like: LoadedModel | None = None) -> list[str]:
    """Let every ``past_key_values.*`` input feed GroupQueryAttention alone, so that a runtime can
    bind one buffer preallocated to the maximum length as both the past and the present (GQA
    writes each step's keys in place: ORT's shared past/present buffer, as onnxruntime-genai
    runs it). The exporter reads the past length from a past input's shape (for the cache
    positions and the mask); that read becomes ``T - S`` (``attention_mask`` [B, T],
    ``input_ids`` [B, S]), which is the same number whenever the past holds exactly the earlier
    tokens. Returns the replaced Shape nodes' names; [] when a past input has another reader
    (nothing is changed then)."""
    inputs = {t.name: t for t in graph.inputs}
    mask_in, ids_in = inputs.get("attention_mask"), inputs.get("input_ids")
    pasts = [t for t in graph.inputs if t.name.startswith("past_key_values.")]
    if mask_in is None or ids_in is None or not pasts:
        return []
    shapes = []
    for t in pasts:
        for node in t.outputs:
            if node.op == "GroupQueryAttention":
                continue
            dims = t.shape if isinstance(t.shape, (list, tuple)) else None
            if (
                node.op != "Shape"
                or dims is None
                or len(dims) != 4
                or not all(isinstance(d, int) for d in (dims[1], dims[3]))
            ):
                return []
            shapes.append((node, int(dims[1]), int(dims[3])))
    tag = "/ort_attention/past_length"
    if shapes:
        ids_shape, mask_shape = gs.Variable(f"{tag}/ids_shape", np.int64), gs.Variable(f"{tag}/mask_shape", np.int64)
        batch, s_len, t_len, past = (gs.Variable(f"{tag}/{n}", np.int64) for n in ("batch", "s", "t", "past"))
        graph.nodes.extend(
            [
                gs.Node("Shape", f"{tag}/ShapeIds", inputs=[ids_in], outputs=[ids_shape]),
                gs.Node("Shape", f"{tag}/ShapeMask", inputs=[mask_in], outputs=[mask_shape]),
                gs.Node(
                    "Slice",
                    f"{tag}/Batch",
                    inputs=[ids_shape, _const(f"{tag}/0", [0]), _const(f"{tag}/1", [1])],
                    outputs=[batch],
                ),
                gs.Node(
                    "Slice",
                    f"{tag}/S",
                    inputs=[ids_shape, _const(f"{tag}/1a", [1]), _const(f"{tag}/2", [2])],
                    outputs=[s_len],
                ),
                gs.Node(
                    "Slice",
                    f"{tag}/T",
                    inputs=[mask_shape, _const(f"{tag}/1b", [1]), _const(f"{tag}/2b", [2])],
                    outputs=[t_len],
                ),
                gs.Node("Sub", f"{tag}/Sub", inputs=[t_len, s_len], outputs=[past]),
            ]
        )
    done = []
    for i, (node, heads, head) in enumerate(shapes):
        out = node.outputs[0]
        node.outputs.clear()
        start, end = node.attrs.get("start"), node.attrs.get("end")
        full = out if start is None and end is None else gs.Variable(f"{out.name}/full", np.int64)
        new = [
            gs.Node(
                "Concat",
                f"{node.name}/from_mask",
                attrs={"axis": 0},
                inputs=[batch, _const(f"{tag}/heads_{i}", [heads]), past, _const(f"{tag}/head_{i}", [head])],
                outputs=[full],
            )
        ]
        if full is not out:  # Shape's own start / end (opset 15)
            lo, hi = _const(f"{tag}/start_{i}", [start or 0]), _const(f"{tag}/end_{i}", [4 if end is None else end])
            new.append(gs.Node("Slice", f"{node.name}/from_mask_slice", inputs=[full, lo, hi], outputs=[out]))
        for n in new:
            _inherit(like, n, node)
        graph.nodes.extend(new)
        done.append(node.name)
    return done


def shares_kv_buffer(graph: gs.Graph) -> bool:
    """Every past input is read by GroupQueryAttention alone, and its present comes from the same
    node: the graph runs with one buffer bound as both (see :func:`past_length_from_mask`)."""
    pasts = [t for t in graph.inputs if t.name.startswith("past_key_values.")]
    if not pasts:
        return False
    for t in pasts:
        present = next((o for o in graph.outputs if o.name == "present." + t.name[len("past_key_values.") :]), None)
        readers = t.outputs
        if present is None or not readers or any(n.op != "GroupQueryAttention" for n in readers):
            return False
        if producer(present) not in readers:
            return False
    return True


def _sliced(graph: gs.Graph) -> bool:
    return any(n.name.endswith("/last_position") for n in graph.nodes)


def last_logits(graph: gs.Graph, like: LoadedModel | None = None) -> list[str]:
    """``logits`` for the last position only ([B, 1, V]): the output projection reads
    ``hidden[:, -1:]``. Generation needs no other position, and at prefill the projection over
    every prompt position is a large share of the work (42% of a 128-token prefill's FLOPs at
    hidden 512 / vocab 32000). Teacher-forced evaluation needs every position: it refuses such a
    graph. Returns the projection's name; [] when it is already sliced or not found."""
    out = next((o for o in graph.outputs if o.name == "logits"), None)
    node = producer(out) if out is not None else None
    # walk back over element-wise ops on the logits (bias, soft-capping) to the projection
    while node is not None and node.op in ("Add", "Mul", "Div", "Tanh", "Cast"):
        var = [i for i in node.inputs if _const_value(i) is None]
        node = producer(var[0]) if len(var) == 1 else None
    if node is None or node.op != "MatMul" or _const_value(node.inputs[0]) is not None:
        return []
    x = node.inputs[0]
    if _sliced(graph):
        return []  # idempotent
    sliced = gs.Variable(f"{x.name}/last", dtype=x.dtype)
    cut = gs.Node(
        "Slice",
        f"{node.name}/last_position",
        inputs=[
            x,
            _const(f"{node.name}/last_start", [-1]),
            _const(f"{node.name}/last_end", [2**62]),
            _const(f"{node.name}/last_axis", [1]),
        ],
        outputs=[sliced],
    )
    _inherit(like, cut, node)
    node.inputs[0] = sliced
    graph.nodes.append(cut)
    return [node.name]


# ----------------------------------------------------------------------------- driver
def fuse_ort(
    graph: gs.Graph,
    variant: str = "standard",
    like: LoadedModel | None = None,
    max_positions: int | None = None,
    logits: str = "all",
) -> tuple[gs.Graph, dict]:
    """Apply the ONNX Runtime rewrites to ``graph`` (in place) and report what changed.
    ``logits``: ``all`` positions (as exported) or the ``last`` one only (:func:`last_logits`)."""
    if variant not in VARIANTS:
        raise GpclError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant}")
    if logits not in LOGITS:
        raise GpclError(f"--logits must be one of {', '.join(LOGITS)}, got {logits}")
    report: dict[str, Any] = {
        "variant": variant,
        "grouped_attention": grouped_attention(graph, like),
        "rmsnorm_div": rmsnorm_div(graph, like),
    }
    if variant == "contrib-gqa":
        graph.cleanup(remove_unused_graph_inputs=False)  # the repeat-KV leftovers still read the presents
        report["contrib_attention"] = contrib_attention(graph, max_positions, like)
        graph.cleanup(remove_unused_graph_inputs=False)
        report["past_length_from_mask"] = past_length_from_mask(graph, like)
    if variant in ("contrib", "contrib-gqa"):
        graph.cleanup(remove_unused_graph_inputs=False)  # the rotaries GroupQueryAttention took over
        report["contrib_rotary"] = contrib_rotary(graph, max_positions, like)
        report["skip_rmsnorm"] = skip_rmsnorm(graph, like)
    if logits == "last":
        report["last_logits"] = last_logits(graph, like)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    report["changed"] = any(bool(v) for k, v in report.items() if k != "variant")
    # what a runtime reads from the manifest (generate.runtimes.OrtRuntime)
    report["kv_cache"] = "shared-buffer" if shares_kv_buffer(graph) else "concat"
    report["logits"] = "last" if logits == "last" or _sliced(graph) else "all"
    return graph, report


def _max_positions(model_dir: Path | None) -> int | None:
    """The rotary cache length for RotaryEmbedding: the model's positions, from config.json."""
    import json

    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    n = cfg.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


def optimize_file(
    input: str | Path,
    output: str | Path,
    target: str = "ort",
    variant: str = "standard",
    force: bool = False,
    logits: str = "all",
) -> dict:
    """Write ``output`` (+ OUT.manifest.json): ``input`` rewritten for ``target``; weights are
    linked, not copied (passes.modelio.save_model)."""
    from gpcl_trt.manifest import model_dir_of, pass_inputs
    from gpcl_trt.passes.modelio import save_model

    if target != "ort":
        raise GpclError(f"--for must be ort, got {target}")
    check_can_write(output, force)
    lm = load_graph(input)
    before = len(lm.graph.nodes)
    model_dir = model_dir_of(input)
    graph, report = fuse_ort(lm.graph, variant, lm, max_positions=_max_positions(model_dir), logits=logits)
    after = len(graph.nodes)
    inputs = pass_inputs(input, sha256_file(input), str(model_dir) if model_dir else None)
    results = {**report, "nodes_before": before, "nodes_after": after}
    save_model(
        graph,
        lm,
        output,
        force=force,
        gpcl=any(is_gpcl(n) for n in graph.nodes),
        stage_name=STAGE,
        inputs=inputs,
        options={"for": target, "variant": variant, "logits": logits},
        results=results,
    )
    return {"ok": True, "output": str(output), **results}
