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

VARIANTS = ("standard",)
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


# ----------------------------------------------------------------------------- driver
def fuse_ort(graph: gs.Graph, variant: str = "standard", like: LoadedModel | None = None) -> tuple[gs.Graph, dict]:
    """Apply the ONNX Runtime rewrites to ``graph`` (in place) and report what changed."""
    if variant not in VARIANTS:
        raise GpclError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant}")
    report = {
        "variant": variant,
        "grouped_attention": grouped_attention(graph, like),
        "rmsnorm_div": rmsnorm_div(graph, like),
    }
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    report["changed"] = bool(report["grouped_attention"] or report["rmsnorm_div"])
    return graph, report


def optimize_file(
    input: str | Path, output: str | Path, target: str = "ort", variant: str = "standard", force: bool = False
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
    graph, report = fuse_ort(lm.graph, variant, lm)
    after = len(graph.nodes)
    model_dir = model_dir_of(input)
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
        options={"for": target, "variant": variant},
        results=results,
    )
    return {"ok": True, "output": str(output), **results}
