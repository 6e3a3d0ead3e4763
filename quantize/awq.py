"""Activation-aware weight quantization (AWQ, Lin et al. 2023), streamed one weight at a time.

The projections that read one activation tensor ``x`` (Q, K and V after a norm; gate and up)
form a group. For the group, the mean ``|x|`` of each input channel is measured over calibration
data (ONNX Runtime over the float model, reduced in the graph at each group input), and a few
hundred rows of ``x`` are kept. A scale per channel ``s = mean|x| ** alpha`` (normalised so
that ``sqrt(max s * min s) = 1``) multiplies the rows of each weight before RTN, and the
activation is divided by ``s``: ``x W = (x / s)(s W)``. The channels that carry large
activations get finer steps. ``alpha`` is searched over ``ALPHAS`` per group, minimising the
squared error of the group's outputs on the kept rows against the float weights; ``alpha = 0`` is
RTN itself, so on the calibration rows AWQ is never worse than RTN.

The ``1/s`` goes into the graph where it costs nothing when it can: folded into the weight of
the norm that produces ``x`` (LayerNormalization's scale and bias, an RMSNorm's final
``Mul`` by a weight vector) when the projections are that norm's only readers; else a ``Mul`` by
a ``[K]`` vector is inserted on the group's input (one small vector per group).

Memory, flat with the model's size: the calibration session is ONNX Runtime over the float model
cut at the group inputs, each reduced in the graph to its sum of |x| per channel and a few token
rows (_probe), its external weights read from their mapping (a bounded session); the kept rows
(capped: ROWS_BYTES) go to a temporary file, which the search maps one group at a time; the
search reads one weight at a time, in chunks of columns.
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
ROWS_BYTES = 256 << 20  # all groups' kept rows together (float32, on disk): fewer rows per group in a large model
CHUNK_BYTES = 4 << 20  # float32 bytes of the columns of one weight searched at a time (x ~6 in temporaries)
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
ROWS_INPUT = "awq/rows"  # the probe's extra inputs: which token rows of each group input to return,
MASK_INPUT = "awq/mask"  # and which tokens are real (the attention mask, as float)


def _probe(model: Any, groups: list[Group]) -> Any:
    """The float graph cut after the groups' inputs (the nodes past them gone: a 152k-vocabulary
    lm_head's transposed copy alone was half a GB), each input ``x`` [..., K] reduced in the graph
    to what AWQ keeps of it: ``sum |x|`` over its real tokens [K] and their count (float32), and
    the token rows ``ROWS_INPUT`` mod T [r, K]. ORT frees each ``x`` after its last reader, so a
    run holds one layer's activations, not every group input of the model at once (0.5 GB at the
    0.5B shape for 16 sentences, growing with the depth, the width and the tokens).

    Real tokens: ``MASK_INPUT`` flattened where it has as many elements as ``x`` has tokens (T;
    the attention mask of a text model), else every token (a vision model's patches: no padding)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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
    _fuse_weight_transposes(probe)
    g.input.append(helper.make_tensor_value_info(ROWS_INPUT, TensorProto.INT64, ["rows"]))
    g.input.append(helper.make_tensor_value_info(MASK_INPUT, TensorProto.FLOAT, None))
    del g.output[:]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), "awq/flat"),
            numpy_helper.from_array(np.array([0], np.int64), "awq/first"),
            numpy_helper.from_array(np.array(1.0, np.float32), "awq/one"),
        ]
    )
    first = [
        helper.make_node("Reshape", [MASK_INPUT, "awq/flat"], ["awq/mask_flat"]),
        helper.make_node("Size", [MASK_INPUT], ["awq/mask_size"]),
    ]
    after: dict[str, list] = {}
    mk = helper.make_node
    for i, grp in enumerate(groups):
        k, p = int(grp.weights[0].kn[0]), f"awq/{i}/"
        g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), p + "shape"))
        add = [mk("Reshape", [grp.tensor, p + "shape"], [p + "flat"])]
        flat = p + "flat"
        if grp.weights[0].out_type != TensorProto.FLOAT:  # sums in float32: a half's sum overflows
            add.append(mk("Cast", [flat], [p + "f32"], to=TensorProto.FLOAT))
            flat = p + "f32"
        add += [
            mk("Shape", [flat], [p + "dims"]),
            mk("Slice", [p + "dims", "awq/first", "awq/flat"], [p + "T1"]),  # [T]
            mk("Squeeze", [p + "T1", "awq/first"], [p + "T"]),
            # w [T]: the flat mask where it has T elements, else ones (slice of mask ++ ones, blended)
            mk("ConstantOfShape", [p + "T1"], [p + "ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
            mk("Concat", ["awq/mask_flat", p + "ones"], [p + "cat"], axis=0),
            mk("Slice", [p + "cat", "awq/first", p + "T1"], [p + "fit"]),
            mk("Equal", [p + "T", "awq/mask_size"], [p + "eq_b"]),
            mk("Cast", [p + "eq_b"], [p + "eq"], to=TensorProto.FLOAT),
            mk("Sub", ["awq/one", p + "eq"], [p + "ne"]),
            mk("Mul", [p + "fit", p + "eq"], [p + "wm"]),
            mk("Add", [p + "wm", p + "ne"], [p + "w"]),
            mk("Abs", [flat], [p + "abs"]),
            mk("MatMul", [p + "w", p + "abs"], [p + "sum"]),
            mk("ReduceSum", [p + "w"], [p + "tokens"], keepdims=0),
            mk("Mod", [ROWS_INPUT, p + "T"], [p + "index"]),
            mk("Gather", [flat, p + "index"], [p + "rows"], axis=0),
        ]
        after.setdefault(grp.tensor, []).extend(add)
        g.output.extend(
            [
                helper.make_tensor_value_info(p + "sum", TensorProto.FLOAT, [k]),
                helper.make_tensor_value_info(p + "tokens", TensorProto.FLOAT, []),
                helper.make_tensor_value_info(p + "rows", TensorProto.FLOAT, ["rows", k]),
            ]
        )
    # Each reduction right after the node producing its input: ORT runs nodes of equal priority in
    # this order (priority-based, as bounded sessions are), so x is reduced, and freed, as soon as its
    # layer has run; appended at the end they ran last, every group input alive until then (+0.27 GB
    # for 8 sentences at the 0.5B shape).
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(first)
    for t in [t for t in after if t not in producer]:  # graph inputs
        g.node.extend(after.pop(t))
    for n in nodes:
        g.node.append(n)
        for o in n.output:
            g.node.extend(after.pop(o, []))
    return probe


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc serves a freed large block's size from the heap from then on (its mmap threshold
    rises to it), and a heap does not shrink below its highest live block: ORT's unpooled
    activations (a bounded session has no arena) then left 0.41 GB RssAnon at the 0.5B shape where
    0.23 GB were live at most. A fixed threshold returns each large block to the system when
    freed. Process-wide (mallopt), and only where the C library is glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _fuse_weight_transposes(probe: Any) -> None:
    """MatMul(A, Transpose(W)) over a float32 initializer W [N, K] (the exporter's nn.Linear) ->
    FusedMatMul(A, W, transB=1), the rewrite ORT's own optimizer makes: a bounded session runs
    unoptimized, so it transposed every weight on every run (a weight-sized temporary each: 0.18
    GB at a 7B's MLP; the session's peak grew with the width), where MLAS reads W transposed as it is."""
    from onnx import TensorProto, helper

    from gpcl_trt.quantize.api import _attr

    g = probe.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    gone = set()
    for t in g.node:
        if t.op_type != "Transpose" or t.domain not in ("", "ai.onnx") or t.input[0] not in inits:
            continue
        w = inits[t.input[0]]
        users = readers.get(t.output[0], [])
        if (
            len(w.dims) != 2
            or w.data_type != TensorProto.FLOAT
            or list(_attr(t, "perm", [1, 0])) != [1, 0]
            or not users
            or any(
                u.op_type != "MatMul" or u.domain not in ("", "ai.onnx") or list(u.input) != [u.input[0], t.output[0]]
                for u in users
            )
            or t.output[0] in {o.name for o in g.output}
        ):
            continue
        for u in users:
            fused = helper.make_node(
                "FusedMatMul", [u.input[0], w.name], list(u.output), name=u.name, domain="com.microsoft", transB=1
            )
            u.CopyFrom(fused)
        gone.add(id(t))
    if gone:
        keep = [n for n in g.node if id(n) not in gone]
        del g.node[:]
        g.node.extend(keep)
        if not any(o.domain == "com.microsoft" for o in probe.opset_import):
            probe.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def collect(model: Any, src: Path, groups: list[Group], samples: int, data: str | None, spill: Path) -> dict:
    """Run ONNX Runtime over the float model (cut at the groups' inputs and reduced there:
    _probe) on the calibration data; fill each group's mean |x| per channel over the real tokens
    and its kept rows. The rows go to a file in the folder ``spill``, read back one group at a
    time by the search (from the page cache: not anonymous memory); the session reads external
    weights from their mapping (ort_options bounded). Returns where the data came from."""
    from onnx.external_data_helper import uses_external_data

    from gpcl_trt.feeds import complete_feed, ort_session, specs_from_session
    from gpcl_trt.passes.calibrate import sample_inputs

    _fixed_mmap_threshold()
    probe = _probe(model, groups)
    batches, desc = sample_inputs(SimpleNamespace(model=model), src, samples, data)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    session = ort_session(probe, base_dir=src.parent, bounded=external)
    del probe
    specs = [s for s in specs_from_session(session) if s.name not in (ROWS_INPUT, MASK_INPUT)]
    rng = np.random.default_rng(0)
    widest = max(int(g.weights[0].kn[0]) for g in groups)
    max_rows = max(32, min(MAX_ROWS, ROWS_BYTES // (4 * widest * max(len(groups), 1))))
    take = max(1, -(-max_rows // max(len(batches), 1)))
    outputs = [f"awq/{i}/{what}" for i in range(len(groups)) for what in ("sum", "tokens", "rows")]
    sums = [np.zeros(int(g.weights[0].kn[0]), np.float64) for g in groups]
    tokens = [0.0] * len(groups)
    filled = [0] * len(groups)
    offsets, pos = [], 0
    for g in groups:
        offsets.append(pos)
        pos += 4 * max_rows * int(g.weights[0].kn[0])
    path = spill / "awq_rows.f32"
    with open(path, "wb") as f:
        for batch in batches:
            feed = complete_feed(specs, batch)
            mask = batch.get("attention_mask", feed.get("attention_mask"))
            if mask is not None and np.ndim(mask) == 2:
                real = np.flatnonzero(np.asarray(mask).reshape(-1))  # flat token positions b * S + t
                feed[MASK_INPUT] = (np.asarray(mask) != 0).astype(np.float32)
                at = rng.choice(real, min(take, len(real)), replace=False)
            else:  # no padding; T unknown here: the graph takes the rows mod T
                feed[MASK_INPUT] = np.ones(1, np.float32)
                at = rng.integers(0, 1 << 30, take)
            feed[ROWS_INPUT] = at.astype(np.int64)
            try:
                outs = session.run(outputs, feed)
            except Exception as exc:
                raise GpclError(f"ONNX Runtime failed on the calibration data ({one_line(exc)})") from None
            for i in range(len(groups)):
                s, t, rows = outs[3 * i : 3 * i + 3]
                sums[i] += s
                tokens[i] += float(t)
                rows = np.ascontiguousarray(rows[: max_rows - filled[i]], np.float32)
                if len(rows):
                    f.seek(offsets[i] + 4 * filled[i] * rows.shape[1])
                    f.write(rows.tobytes())
                    filled[i] += len(rows)
            del outs
    if min(tokens, default=0) == 0:
        raise GpclError("the calibration data has no tokens")
    for i, g in enumerate(groups):
        g.mean_abs = (sums[i] / tokens[i]).astype(np.float32)
        g.rows = np.memmap(path, np.float32, "r", offset=offsets[i], shape=(filled[i], int(g.weights[0].kn[0])))
    return {**desc, "tokens": int(round(max(tokens)))}


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
