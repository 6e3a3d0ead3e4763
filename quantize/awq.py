"""Activation-aware weight quantization (AWQ, Lin et al. 2023), streamed one weight at a time.

The projections that read one activation tensor ``x`` (Q, K and V after a norm; gate and up)
form a group. For the group, the mean ``|x|`` of each input channel is measured over calibration
data (ONNX Runtime over the float model, each group input exposed as an extra output), and a
few hundred rows of ``x`` are kept. A scale per channel ``s = mean|x| ** alpha`` (normalised so
that ``sqrt(max s * min s) = 1``) multiplies the rows of each weight before RTN, and the
activation is divided by ``s``: ``x W = (x / s)(s W)``. The channels that carry large
activations get finer steps. ``alpha`` is searched over ``ALPHAS`` per group, minimising the
squared error of the group's outputs on the kept rows against the float weights; ``alpha = 0`` is
RTN itself, so on the calibration rows AWQ is never worse than RTN.

The ``1/s`` goes into the graph where it costs nothing when it can: folded into the weight of
the norm that produces ``x`` (LayerNormalization's scale and bias, an RMSNorm's final
``Mul`` by a weight vector) when the projections are that norm's only readers; else a ``Mul`` by
a ``[K]`` vector is inserted on the group's input (one small vector per group).

Memory: the calibration session is ONNX Runtime over the float model up to the last group input
(its weights mapped where they are external: a bounded session for a large model); the kept
rows are capped (ROWS_BYTES); the search reads one weight at a time, in chunks of columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from gpcl_trt.common import GpclError, one_line
from gpcl_trt.quantize.rtn import Scheme, dequantize, quantize_blocks

ALPHAS = tuple(round(i * 0.1, 1) for i in range(11))  # 0 is RTN
MAX_ROWS = 512  # rows of x kept per group for the search (sampled evenly over the calibration tokens)
ROWS_BYTES = 256 << 20  # all groups' kept rows together (float32): fewer rows per group in a large model
CHUNK_BYTES = 16 << 20  # float32 bytes of the columns of one weight searched at a time
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}  # input 1 (and 2): scale (bias)


@dataclass
class Group:
    """The quantized projections that read one activation tensor (input A of each)."""

    tensor: str
    weights: list  # api.Weight
    mean_abs: np.ndarray | None = None
    rows: np.ndarray | None = None
    scale: np.ndarray | None = None  # s [K] (weights' rows are multiplied by it)
    alpha: float = 0.0
    errors: dict = field(default_factory=dict)
    placed: str = ""


def groups_of(model: Any, weights: list) -> tuple[list[Group], dict[str, str]]:
    """The AWQ groups and, for each weight left to plain RTN, why."""
    from gpcl_trt.quantize.api import _attr

    by_input: dict[str, list] = {}
    plain: dict[str, str] = {}
    for w in weights:
        inputs = set()
        for node, _ in w.uses:
            if node.op_type == "Gemm" and _attr(node, "transA", 0):
                inputs.add(None)
            inputs.add(node.input[0])
        if len(inputs) != 1 or None in inputs:
            plain[w.name] = "its projections read different inputs (or a transposed A)"
            continue
        by_input.setdefault(inputs.pop(), []).append(w)
    return [Group(t, ws) for t, ws in by_input.items()], plain


# ----------------------------------------------------------------------------- calibration
def _probe(model: Any, groups: list[Group]) -> Any:
    """The float graph with the groups' inputs as its only outputs and the nodes past them gone
    (the output head: a 152k-vocabulary lm_head's transposed copy alone was half a GB)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    producer = {o: n for n in g.node for o in n.output}
    need, stack, keep = set(), [grp.tensor for grp in groups], set()
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
            for a in node.attribute:  # names a subgraph reads from the outer scope
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    stack.extend(i for n in sub.node for i in n.input if i)
    nodes = [n for n in g.node if id(n) in keep]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | need
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    for grp in groups:
        g.output.append(onnx.helper.make_tensor_value_info(grp.tensor, grp.weights[0].out_type, None))
    return probe


def collect(model: Any, src: Path, groups: list[Group], samples: int, data: str | None) -> dict:
    """Run ONNX Runtime over the float model (up to the groups' inputs, _probe) on the calibration
    data; fill each group's mean |x| per channel and its kept rows. Returns where the data came
    from."""
    from gpcl_trt.common import has_large_weights
    from gpcl_trt.feeds import complete_feed, ort_session, specs_from_session
    from gpcl_trt.passes.calibrate import sample_inputs

    probe = _probe(model, groups)
    batches, desc = sample_inputs(SimpleNamespace(model=model), src, samples, data)
    session = ort_session(probe, base_dir=src.parent, bounded=has_large_weights(model, src.parent))
    specs = specs_from_session(session)
    names = [g.tensor for g in groups]
    sums = {n: None for n in names}
    kept: dict[str, list] = {n: [] for n in names}
    tokens = dict.fromkeys(names, 0)
    rng = np.random.default_rng(0)
    widest = max(int(g.weights[0].kn[0]) for g in groups)
    max_rows = max(32, min(MAX_ROWS, ROWS_BYTES // (4 * widest * max(len(groups), 1))))
    for batch in batches:
        feed = complete_feed(specs, batch)
        try:
            outs = session.run(names, feed)
        except Exception as exc:
            raise GpclError(f"ONNX Runtime failed on the calibration data ({one_line(exc)})") from None
        mask = feed.get("attention_mask", batch.get("attention_mask"))  # the probe may not read it
        for name, arr in zip(names, outs):
            x = np.asarray(arr, np.float32)
            k = x.shape[-1]
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask.astype(bool)]  # real tokens only
            x = x.reshape(-1, k)
            s = np.abs(x).sum(0, dtype=np.float64)
            sums[name] = s if sums[name] is None else sums[name] + s
            take = min(len(x), max(1, -(-max_rows // max(len(batches), 1))))
            kept[name].append(x[rng.choice(len(x), take, replace=False)])
            tokens[name] += len(x)
    if min(tokens.values(), default=0) == 0:
        raise GpclError("the calibration data has no tokens")
    for g in groups:
        g.mean_abs = (sums[g.tensor] / tokens[g.tensor]).astype(np.float32)
        g.rows = np.concatenate(kept[g.tensor])[:max_rows]
    return {**desc, "tokens": max(tokens.values())}


# ----------------------------------------------------------------------------- the search
def _scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs, 1e-8).astype(np.float64) ** alpha
    s = np.maximum(s, 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def _fake_quant(w: np.ndarray, block: int, scheme: Scheme) -> np.ndarray:
    q, sc, zp = quantize_blocks(w, block, scheme)
    return dequantize(q, sc, zp, block)


def search(group: Group, load: Any, block: int, scheme: Scheme, alphas: tuple = ALPHAS) -> None:
    """Pick the group's alpha: the squared error of x W against (x / s) Q(s W), summed over the
    group's weights on the kept rows. The error and the blocks (along K) are column by column,
    so each weight is searched in chunks of columns: ``load(w, n0, n1)`` gives its columns
    n0:n1 as float32 [K, n1 - n0]."""
    x = group.rows
    err = np.zeros(len(alphas))
    cands = [_scales(group.mean_abs, a) for a in alphas]
    xs = [x / s for s in cands]
    for w in group.weights:
        k, n = w.kn
        step = max(1, CHUNK_BYTES // (4 * k))
        for n0 in range(0, n, step):
            wf = load(w, n0, min(n, n0 + step))
            ref = x @ wf
            for i, s in enumerate(cands):
                y = xs[i] @ _fake_quant(wf * s[:, None], block, scheme)
                err[i] += float(np.square(y - ref).sum())
            del wf, ref
    best = int(np.argmin(err))
    group.alpha = float(alphas[best])
    group.scale = cands[best] if alphas[best] != 0 else None
    group.errors = {"rtn": float(err[alphas.index(0.0)]) if 0.0 in alphas else None, "awq": float(err[best])}


# ----------------------------------------------------------------------------- the graph
def _tensor_of(inits: dict, name: str) -> Any:
    t = inits.get(name)
    return t if t is not None and len(t.dims) == 1 else None


def place(model: Any, groups: list[Group], reader: Any) -> dict[int, list]:
    """Put each scaled group's 1/s into the graph: folded into the norm producing its input when
    the group's projections are the only readers, else a Mul on the group's input. Returns the
    Mul nodes to insert, by the id of the node they go before."""
    from onnx import helper, numpy_helper

    from gpcl_trt.quantize.api import _np_dtype

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {t.name: t for t in g.initializer}
    index = {id(n): i for i, n in enumerate(g.node)}
    before: dict[int, list] = {}
    for grp in groups:
        if grp.scale is None:
            grp.placed = "rtn (alpha 0)"
            continue
        inv = (1.0 / grp.scale.astype(np.float64)).astype(np.float32)
        k = inv.size
        uses = {id(n) for w in grp.weights for n, _ in w.uses}
        readers = consumers.get(grp.tensor, [])
        node = producers.get(grp.tensor)
        folded = False
        if node is not None and all(id(r) in uses for r in readers):
            if node.op_type in NORM_OPS:
                params = [i for i in node.input[1:3] if i]
            elif node.op_type == "Mul":
                params = [i for i in node.input if _tensor_of(inits, i) is not None][:1]
            else:
                params = []
            ok = bool(params) and all(
                _tensor_of(inits, p) is not None and int(inits[p].dims[0]) == k and inits[p].data_type in (1, 10, 16)
                for p in params
            )
            if ok:
                for i, p in enumerate(node.input):
                    if p not in params:
                        continue
                    t = inits[p]
                    v = np.asarray(reader.array(t), np.float32) * inv
                    # a norm weight other nodes read too gets its own scaled copy
                    name = p if len(consumers.get(p, [])) == 1 else f"{p}/awq_{grp.tensor}"
                    new = numpy_helper.from_array(v.astype(_np_dtype(t.data_type)), name)
                    if name == p:
                        t.CopyFrom(new)
                    else:
                        g.initializer.append(new)
                        node.input[i] = name
                folded = True
                grp.placed = f"folded into {node.op_type} {node.name or node.output[0]}"
        if not folded:
            dtype = grp.weights[0].out_type
            cname, out = f"{grp.tensor}/awq_inv_scale", f"{grp.tensor}/awq_scaled"
            g.initializer.append(numpy_helper.from_array(inv.astype(_np_dtype(dtype)), cname))
            mul = helper.make_node("Mul", [grp.tensor, cname], [out], name=f"{grp.tensor}/awq_Mul")
            first = min((n for w in grp.weights for n, _ in w.uses), key=lambda n: index[id(n)])
            before.setdefault(id(first), []).append(mul)
            for w in grp.weights:
                for n, _ in w.uses:
                    n.input[0] = out
            g.value_info.append(helper.make_tensor_value_info(out, dtype, None))
            grp.placed = "Mul on the input"
    return before  # the Muls go in with the DequantizeLinears (api._rewrite): rebuilding g.node copies the nodes


def summary(groups: list[Group], plain: dict[str, str], data: dict) -> dict:
    rtn = sum(g.errors.get("rtn") or 0.0 for g in groups)
    awq = sum(g.errors.get("awq") or 0.0 for g in groups)
    return {
        "data": data,
        "groups": len(groups),
        "scaled": sum(g.scale is not None for g in groups),
        "folded": sum(g.placed.startswith("folded") for g in groups),
        "muls": sum(g.placed.startswith("Mul") for g in groups),
        "plain_rtn": plain,
        "calibration_error_vs_rtn": round(awq / rtn, 4) if rtn > 0 else None,
        "per_group": {
            g.tensor: {"alpha": g.alpha, "placed": g.placed, "weights": [w.name for w in g.weights]} for g in groups
        },
    }
