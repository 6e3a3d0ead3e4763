"""quantize_model: weight-only RTN quantization of an ONNX model's projection weights, streamed.

What it writes is standard ONNX (opset 21): each quantized weight ``W`` becomes
``DequantizeLinear(W_q [K, N], scale [ceil(K/B), N], zero_point?, axis=0, block_size=B)``
feeding the projection's B input directly, in the [K, N] layout the MatMul reads (a stored
``[N, K]`` weight behind ``Transpose`` is written transposed and the Transpose goes). That is
the pattern ONNX Runtime's CPU provider fuses into ``MatMulNBits`` (int4 and int8, measured in
1.32: BENCHMARKS.md, Quantize) and TensorRT-RTX builds as weight-only GEMMs.

Streamed: the graph is read without its weights; each weight is read from its memory-mapped
file (or from the graph, for a model whose weights are inline) in chunks of whole blocks along K,
quantized, and appended to ``OUT.onnx.data`` in a Staging directory; float weights that stay
(embeddings, the output projection, norms, biases) are copied there in chunks. Anonymous memory
is a few chunks, whatever the model's size. The files appear under their final names when the
ONNX checker (and, for a model small enough, an ONNX Runtime session) accepted the result.
"""

from __future__ import annotations

import fnmatch
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gpcl_trt.common import GpclError, check_can_write, load_onnx, manifest_path, sha256_file, write_manifest
from gpcl_trt.quantize.rtn import BLOCK_SIZES, WEIGHTS, Scheme, encode, quantize_blocks

METHODS = ("rtn", "awq", "gptq")  # awq: activation-aware scales (quantize/awq.py); gptq: quantize/gptq.py
QUANT_OPSET = 21  # blocked DequantizeLinear and int4/uint4 arrived in opset 21
MIN_OPSET = 18  # 18 -> 21 changes no op's meaning (types only) except those in CHANGED_OPS
CHANGED_OPS = {"GroupNormalization", "GridSample", "DFT"}  # their meaning changed between 18 and 21
DEFAULT_KEEP = ("*embed*", "*lm_head*", "*norm*", "*gpcl*")
LM_HEAD_PATTERN = "*lm_head*"
CHUNK_BYTES = 16 << 20  # float32 bytes of one chunk of a weight (a multiple of whole blocks along K)
COPY_BYTES = 16 << 20
ALIGN = 4096  # each tensor in OUT.onnx.data starts on a page: runtimes map it in place
FLOAT_TYPES = {1: np.float32, 10: np.float16}  # TensorProto FLOAT, FLOAT16; BFLOAT16 (16) below
CHAIN_OPS = {"Transpose", "Identity", "Cast"}


def _np_dtype(onnx_type: int) -> Any:
    if onnx_type == 16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return FLOAT_TYPES[onnx_type]


# ----------------------------------------------------------------------------- reading weights
class SourceReader:
    """Reads the source's weights: external tensors as read-only maps of their files (nothing is
    copied until a chunk is converted), inline ones from the graph. ``reads`` counts the tensors
    opened, by name (each weight is read once)."""

    def __init__(self, base: Path):
        self.base = base
        self.reads: dict[str, int] = {}

    def array(self, t: Any) -> np.ndarray:
        from onnx import numpy_helper
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        from gpcl_trt.weightfiles import external_file

        self.reads[t.name] = self.reads.get(t.name, 0) + 1
        shape = tuple(int(d) for d in t.dims)
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            file = external_file(self.base, info.location, t.name)
            dtype = np.dtype(_np_dtype(t.data_type))
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                return np.zeros(shape, dtype)
            return np.memmap(file, dtype=dtype, mode="r", offset=int(info.offset or 0), shape=shape)
        if t.raw_data:
            return np.frombuffer(t.raw_data, dtype=_np_dtype(t.data_type)).reshape(shape)
        return numpy_helper.to_array(t)

    def raw_range(self, t: Any) -> tuple[Path, int, int]:
        """(file, offset, length) of an external tensor."""
        from onnx.external_data_helper import ExternalDataInfo

        from gpcl_trt.weightfiles import external_file

        self.reads[t.name] = self.reads.get(t.name, 0) + 1
        info = ExternalDataInfo(t)
        file = external_file(self.base, info.location, t.name)
        offset = int(info.offset or 0)
        length = file.stat().st_size - offset if info.length is None else int(info.length)
        return file, offset, length


# ----------------------------------------------------------------------------- writing weights
class DataWriter:
    """Appends tensors to one external data file (positional writes, each tensor page-aligned),
    or, for an inline output, into the tensors themselves."""

    def __init__(self, path: Path | None, location: str | None):
        self.path, self.location = path, location
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666) if path is not None else None
        self.end = 0
        self.bytes = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def begin(self, t: Any, length: int) -> "TensorSink":
        self.bytes += length
        if self.fd is None:
            return TensorSink(self, t, None, length)
        offset = -(-self.end // ALIGN) * ALIGN
        self.end = offset + length
        from onnx import TensorProto

        del t.external_data[:]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return TensorSink(self, t, offset, length)

    def finish(self) -> None:
        if self.fd is not None and self.end:
            os.ftruncate(self.fd, self.end)  # a tensor of length 0 at the end still lies inside the file


@dataclass
class TensorSink:
    writer: DataWriter
    tensor: Any
    offset: int | None  # None: inline
    length: int
    written: int = 0
    parts: list = field(default_factory=list)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        if self.offset is None:
            self.parts.append(bytes(data))
        elif not np.frombuffer(data, np.uint8).any():
            pass  # all zeros: left as a hole (the file is sized at the end), so a sparse source stays sparse
        else:
            view = memoryview(data)
            done = 0
            while done < n:
                done += os.pwrite(self.writer.fd, view[done:], self.offset + self.written + done)
        self.written += n

    def close(self) -> None:
        if self.written != self.length:
            raise GpclError(f"internal: tensor {self.tensor.name!r}: wrote {self.written} bytes of {self.length}")
        if self.offset is None:
            self.tensor.raw_data = b"".join(self.parts)
            self.parts = []


# ----------------------------------------------------------------------------- finding weights
@dataclass
class Weight:
    """A projection weight to quantize: the initializer, the axis of K in its stored layout, the
    float type the projection reads, its uses (node, input index) and the nodes between."""

    tensor: Any
    k_axis: int
    out_type: int
    uses: list[tuple[Any, int]]
    chain: list[Any]

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def kn(self) -> tuple[int, int]:
        r, c = (int(d) for d in self.tensor.dims)
        return (r, c) if self.k_axis == 0 else (c, r)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_names(graph: Any) -> set[str]:
    """Every tensor name read inside a subgraph (If/Loop bodies): weights read there stay float."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                for n in g.node:
                    names.update(n.input)
                names |= _subgraph_names(g)
    return names


def _walk(name: str, consumers: dict, outputs: set, parity: int, out_type: int, weight: Weight) -> str | None:
    """Follow ``name`` to the projections that read it; None when every path ends in one, else
    why the weight stays float."""
    if name in outputs:
        return "a graph output"
    uses = consumers.get(name, [])
    if not uses:
        return "unused"
    for node, idx in uses:
        if node.op_type in CHAIN_OPS and idx == 0:
            if node.op_type == "Transpose":
                if list(_attr(node, "perm", [1, 0])) != [1, 0]:
                    return "transposed other than [1, 0]"
                p, t = parity ^ 1, out_type
            elif node.op_type == "Cast":
                t = _attr(node, "to")
                if t not in (1, 10, 16):
                    return f"cast to a non-float type ({t})"
                p = parity
            else:
                p, t = parity, out_type
            weight.chain.append(node)
            why = _walk(node.output[0], consumers, outputs, p, t, weight)
            if why:
                return why
        elif node.op_type in ("MatMul", "Gemm") and idx == 1:
            k_axis = parity ^ (1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0)
            if node.op_type == "Gemm" and _attr(node, "alpha", 1.0) != 1.0:
                return "Gemm with alpha != 1"
            if weight.uses and (k_axis, out_type) != (weight.k_axis, weight.out_type):
                return "read in two layouts or types"
            weight.k_axis, weight.out_type = k_axis, out_type
            weight.uses.append((node, idx))
        else:
            return f"read by {node.op_type}" + (" (an embedding table)" if node.op_type == "Gather" else "")
    return None


def _feeds_output(node: Any, consumers: dict, outputs: set, depth: int = 3) -> bool:
    """The projection's result is a graph output (through a bias Add or reshapes): the model's
    output head (lm_head): float unless asked (ModelOpt's default; onnxruntime-genai's builder
    quantizes it)."""
    out = node.output[0]
    for _ in range(depth + 1):
        if out in outputs:
            return True
        nxt = consumers.get(out, [])
        if len(nxt) != 1 or nxt[0][0].op_type not in {"Add", "Reshape", "Identity", "Cast", "Squeeze", "Flatten"}:
            return False
        out = nxt[0][0].output[0]
    return False


def plan(model: Any, keep: Iterable[str], lm_head: bool = False) -> tuple[list[Weight], dict[str, str]]:
    """The weights to quantize and, for every other 2-D float initializer, why it stays float.
    ``lm_head``: the output projection is quantized too."""
    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in g.output}
    in_subgraphs = _subgraph_names(g)
    patterns = list(keep)
    weights, kept = [], {}
    for t in g.initializer:
        if len(t.dims) != 2 or t.data_type not in (1, 10, 16):
            continue
        w = Weight(t, 0, t.data_type, [], [])
        why = _walk(t.name, consumers, outputs, 0, t.data_type, w)
        if why is None and t.name in in_subgraphs:
            why = "read inside a subgraph"
        if why is None:
            named = [t.name] + [n.name for n, _ in w.uses]
            hit = next((p for p in patterns if any(fnmatch.fnmatchcase(s, p) for s in named)), None)
            if hit:
                why = f"kept by pattern {hit!r}"
            elif not lm_head and any(_feeds_output(n, consumers, outputs) for n, _ in w.uses):
                why = "the output projection (lm_head)"
        if why is None:
            weights.append(w)
        else:
            kept[t.name] = why
    return weights, kept


# ----------------------------------------------------------------------------- the graph
def _opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise GpclError("the model imports no default-domain (ai.onnx) opset")


def _bump_opset(model: Any) -> int:
    """Raise the default-domain opset to QUANT_OPSET (model and model-local functions); refuse a
    model whose ops would change meaning."""
    before = _opset(model)
    if before >= QUANT_OPSET:
        return before
    if before < MIN_OPSET:
        raise GpclError(f"quantize needs opset >= {MIN_OPSET} (the model has {before}); export with --opset 18+")
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    changed = sorted(ops & CHANGED_OPS)
    if changed:
        raise GpclError(f"the model uses {', '.join(changed)}, whose meaning changes at opset {QUANT_OPSET}")
    for imps in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for imp in imps:
            if imp.domain in ("", "ai.onnx"):
                imp.version = QUANT_OPSET
    if model.ir_version < 10:
        model.ir_version = 10  # int4 types
    return before


def _rewrite(
    model: Any, weights: list[Weight], new_tensors: dict[str, list], block: int, extra: dict | None = None
) -> None:
    """Put one DequantizeLinear per weight right before its first projection, point the
    projections at it, drop the weight's Transpose/Cast chain and its float initializer."""
    from onnx import helper

    g = model.graph
    drop_nodes = {id(n) for w in weights for n in w.chain}
    drop_inits = {w.name for w in weights}
    before: dict[int, list] = {k: list(v) for k, v in (extra or {}).items()}  # AWQ's Muls
    index = {id(n): i for i, n in enumerate(g.node)}
    for w in weights:
        q, s, z = new_tensors[w.name]
        out = f"{w.name}/dequantized"
        inputs = [q.name, s.name] + ([z.name] if z is not None else [])
        dq = helper.make_node(
            "DequantizeLinear", inputs, [out], name=f"{w.name}/DequantizeLinear", axis=0, block_size=block
        )
        for node, idx in w.uses:
            node.input[idx] = out
            if node.op_type == "Gemm":
                for a in node.attribute:
                    if a.name == "transB":
                        a.i = 0
        first = min(w.uses, key=lambda u: index[id(u[0])])[0]
        before.setdefault(id(first), []).append(dq)
        g.value_info.append(helper.make_tensor_value_info(out, w.out_type, None))
    nodes = []
    for n in g.node:
        nodes.extend(before.get(id(n), []))
        if id(n) not in drop_nodes:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    gone = {o for w in weights for n in w.chain for o in n.output}
    vi = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(vi)
    inits = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(inits)
    for ts in new_tensors.values():
        g.initializer.extend(t for t in ts if t is not None)


# ----------------------------------------------------------------------------- streaming
def _quantize_weight(
    w: Weight,
    reader: SourceReader,
    writer: DataWriter,
    scheme: Scheme,
    block: int,
    row_scale: Any = None,
    pre: tuple | None = None,
) -> tuple[list, dict[str, Any]]:
    """Stream one weight: chunks of whole blocks along K, each quantized and appended.
    ``row_scale`` [K] (AWQ): each row of K is multiplied by it before quantization. ``pre``
    (GPTQ): the whole weight's values, scales and zero points, written instead of RTN's."""
    from onnx import TensorProto

    k, n = w.kn
    nb = -(-k // block)
    src = reader.array(w.tensor)
    scale_np = np.dtype(_np_dtype(w.out_type))
    q = TensorProto(name=f"{w.name}_quantized", data_type=scheme.onnx_type, dims=[k, n])
    s = TensorProto(name=f"{w.name}_scale", data_type=w.out_type, dims=[nb, n])
    z = None if scheme.symmetric else TensorProto(name=f"{w.name}_zero_point", data_type=scheme.onnx_type, dims=[nb, n])
    q_sink = writer.begin(q, scheme.nbytes(k * n))
    s_sink = writer.begin(s, nb * n * scale_np.itemsize)
    z_sink = writer.begin(z, scheme.nbytes(nb * n)) if z is not None else None
    rows = max(block, (CHUNK_BYTES // max(4 * n, 1)) // block * block)  # whole blocks (an even count of rows)
    zp_parts = []
    for k0 in range(0, k, rows):
        k1 = min(k, k0 + rows)
        chunk = src[k0:k1, :] if w.k_axis == 0 else src[:, k0:k1].T
        chunk = np.asarray(chunk, dtype=np.float32)
        if row_scale is not None:
            chunk = chunk * row_scale[k0:k1, None]
        if not np.isfinite(chunk).all():
            raise GpclError(f"weight {w.name!r} has non-finite values (inf or NaN): it cannot be quantized")
        if pre is None:
            qv, sv, zv = quantize_blocks(chunk, block, scheme, scale_np)
        else:  # these whole blocks of GPTQ's
            b0, b1 = k0 // block, -(-k1 // block)
            qv, sv, zv = pre[0][k0:k1], pre[1][b0:b1], None if pre[2] is None else pre[2][b0:b1]
        if scheme.bits == 4 and (qv.size % 2) and k1 < k:
            raise GpclError(f"internal: an odd int4 chunk inside {w.name!r}")
        q_sink.write(encode(qv, scheme))
        s_sink.write(np.ascontiguousarray(sv).tobytes())
        if zv is not None:
            if scheme.bits == 4:
                zp_parts.append(zv)  # nibbles of one tensor: packed once at the end (nb x n is small)
            else:
                z_sink.write(zv.tobytes())
        del chunk
    if z_sink is not None and scheme.bits == 4:
        z_sink.write(encode(np.concatenate(zp_parts), scheme))
    for sink in (q_sink, s_sink, z_sink):
        if sink is not None:
            sink.close()
    del src
    stored = q_sink.length + s_sink.length + (z_sink.length if z_sink is not None else 0)
    float_bytes = k * n * np.dtype(_np_dtype(w.tensor.data_type)).itemsize
    return [q, s, z], {"k": k, "n": n, "blocks": nb, "float_bytes": float_bytes, "stored_bytes": stored}


def _copy_external(t: Any, reader: SourceReader, writer: DataWriter) -> int:
    """Copy a float initializer that stays into the output's data file, in chunks."""
    file, offset, length = reader.raw_range(t)
    sink = writer.begin(t, length)
    with open(file, "rb") as f:
        done = 0
        while done < length:
            block = os.pread(f.fileno(), min(COPY_BYTES, length - done), offset + done)
            if not block:
                raise GpclError(f"{file}: truncated external data for tensor {t.name!r}")
            sink.write(block)
            done += len(block)
    sink.close()
    return length


# ----------------------------------------------------------------------------- the command
def _check_options(weights: str, block_size: int, method: str, samples: int = 1) -> None:
    if weights not in WEIGHTS:
        raise GpclError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if block_size not in BLOCK_SIZES:
        raise GpclError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")
    if method not in METHODS:
        raise GpclError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if samples < 1:
        raise GpclError(f"--samples must be >= 1, got {samples}")


def quantize_model(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    weights: str = "int4",
    block_size: int = 32,
    symmetric: bool = True,
    method: str = "rtn",
    keep: Iterable[str] = (),
    lm_head: bool = False,
    force: bool = False,
    data: str | os.PathLike | None = None,
    samples: int = 64,
    chain: dict | None = None,
) -> dict:
    """Quantize the projection weights of ``onnx_path`` (int8 or int4, blocks of ``block_size``
    along K, RTN) and write ``output`` (+ OUT.onnx.data when the source's weights are external,
    + OUT.manifest.json). Embeddings, the output projection, norms, biases and GPCL stay float
    (``DEFAULT_KEEP`` and the graph's structure); ``keep`` adds glob patterns matched against
    initializer and node names. ``lm_head``: quantize the output projection too (what
    onnxruntime-genai's builder does by default: at 0.5B with a 152k vocabulary the fp32 lm_head is
    half of what a decode step reads).

    ``method``: ``rtn``, or ``awq`` (activation-aware per-channel scales searched on calibration
    data: ``data``, a text file or .npz as for calibrate, else the shipped sentences with the
    model's tokenizer, else random ids; ``samples`` sequences; quantize/awq.py).

    The result is checked against the same weights dequantized in numpy (quantize/check.py)
    when its weights are small; ``ok`` is False when that check fails, and then nothing is
    written. ``chain``: recorded as the manifest's inputs instead of the source's (export
    --quantize: the float export is a temporary, its export manifest is kept there)."""
    from onnx.external_data_helper import uses_external_data

    from gpcl_trt import weightfiles
    from gpcl_trt.manifest import model_dir_of, pass_inputs
    from gpcl_trt.passes.modelio import check_model, weights_as_inputs

    t0 = time.perf_counter()
    _check_options(weights, block_size, method, samples)
    src, out = Path(onnx_path), Path(output)
    if out.suffix != ".onnx":
        raise GpclError(f"output {out} must end in .onnx")
    if src.exists() and out.exists() and os.path.samefile(src, out):
        raise GpclError(f"{out} is the input model; write the quantized model to another name")
    model = load_onnx(src, external_data=False)
    check_can_write(out, force)
    weightfiles.verify_onnx(src, model)
    scheme = Scheme(weights, symmetric)
    keep_patterns = tuple(p for p in DEFAULT_KEEP if not (lm_head and p == LM_HEAD_PATTERN)) + tuple(keep)
    todo, kept = plan(model, keep_patterns, lm_head)
    if not todo:
        raise GpclError(f"{src}: no projection weight to quantize (kept: {len(kept)} float weights)")
    awq_info = None
    scales: dict[str, Any] = {}
    if method == "awq":
        awq_info = _awq(model, src, todo, scheme, block_size, samples, data, scales, out)
    calib_model = None
    if method == "gptq":  # calibrated below (its kept rows in the staging folder), at the model's own opset
        import onnx

        calib_model = onnx.ModelProto()
        calib_model.CopyFrom(model)
    opset_before = _bump_opset(model)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    src_sha = sha256_file(src)
    reader = SourceReader(src.parent)
    layers: dict[str, Any] = {}
    with weightfiles.Staging(out.parent, out.name) as stage:
        data_name = f"{out.name}.data"
        writer = DataWriter(stage.file(data_name) if external else None, data_name if external else None)
        try:
            gptq, gptq_info = None, None
            if calib_model is not None:
                gptq, gptq_info = _gptq(calib_model, src, todo, scheme, block_size, samples, data, stage.file("gptq"))
                calib_model = None
            new: dict[str, list] = {}
            for w in todo:
                pre = None if gptq is None else gptq.quantize(w, np.dtype(_np_dtype(w.out_type)))
                new[w.name], layers[w.name] = _quantize_weight(
                    w, reader, writer, scheme, block_size, scales.get(w.name), pre
                )
            if gptq is not None:
                gptq_info = gptq.summary(gptq_info["_groups"], gptq_info["plain"], gptq_info["data"])
                gptq.close()  # the kept rows: not an output (a failure leaves them to the staging's removal)
            awq_nodes = None
            if awq_info is not None:
                from gpcl_trt.quantize import awq

                # before the copy: folded norm weights go inline
                groups = awq_info.pop("_groups")
                awq_nodes = awq.place(model, groups, reader)
                awq_info = awq.summary(groups, awq_info["plain"], awq_info["data"])
            kept_bytes = 0
            if external:
                quantized = {w.name for w in todo}
                for t in model.graph.initializer:
                    if t.name not in quantized and uses_external_data(t):
                        kept_bytes += _copy_external(t, reader, writer)
            writer.finish()
        finally:
            writer.close()
        _rewrite(model, todo, new, block_size, awq_nodes)
        _reattach_gpcl(model)
        staged = stage.file(out.name)
        staged.write_bytes(model.SerializeToString())
        if external:
            from gpcl_trt.common import has_large_weights

            small = not has_large_weights(model, stage.path)
            check_model(weights_as_inputs(model), "quantize", (lambda: _ort_check(staged)) if small else None)
        else:
            small = True
            check_model(str(staged), "quantize")
        from gpcl_trt.gpcl import LARGE_WEIGHT_BYTES

        # the reference holds every weight in float: the float size decides, not the quantized one
        float_total = sum(layer["float_bytes"] for layer in layers.values()) + kept_bytes
        if small and float_total <= LARGE_WEIGHT_BYTES:
            from gpcl_trt.quantize.check import check_quantized

            check = check_quantized(staged, _FLOAT_NAMES.get(todo[0].out_type, "fp32"))
        else:
            check = {
                "skipped": True,
                "reason": f"{float_total / 2**20:.0f} MiB of float weights: above gpcl.LARGE_WEIGHT_BYTES, "
                "not held in memory for a reference",
            }
        ok = bool(check.get("passed", True))
        results = {
            "quantized": len(todo),
            "kept": kept,
            "opset": {"before": opset_before, "after": max(opset_before, QUANT_OPSET)},
            "float_bytes": sum(layer["float_bytes"] for layer in layers.values()),
            "quantized_bytes": sum(layer["stored_bytes"] for layer in layers.values()),
            "kept_bytes": kept_bytes,
            "external_data": [data_name] if external else [],
            "ort_check": small,
            "check": check,
            **({"awq": awq_info} if awq_info is not None else {}),
            **({"gptq": gptq_info} if gptq_info is not None else {}),
        }
        options = {
            "weights": weights,
            "block_size": block_size,
            "symmetric": symmetric,
            "method": method,
            "keep": list(keep_patterns),
            "lm_head": lm_head,
            **({"samples": samples, "data": None if data is None else str(data)} if method in ("awq", "gptq") else {}),
        }
        model_dir = model_dir_of(src)
        inputs = pass_inputs(src, src_sha, str(model_dir) if model_dir else None)
        if chain is not None:
            inputs = {**inputs, **chain}
        write_manifest(
            staged,
            "quantize",
            inputs=inputs,
            options=options,
            results={k: v for k, v in results.items() if k != "reads"},
            packages=("onnx", "onnxruntime"),
            weight_files=weightfiles.record(model, stage.path),
        )
        files = ([data_name] if external else []) + [out.name, manifest_path(out).name]
        if ok:
            stage.commit(files, force)
    return {
        "ok": ok,
        "written": ok,
        "output": str(out),
        **options,
        **{k: v for k, v in results.items() if v is not None},
        "layers": layers,
        "seconds": round(time.perf_counter() - t0, 3),
    }


_FLOAT_NAMES = {1: "fp32", 10: "fp16", 16: "bf16"}


def _awq(
    model: Any, src: Path, todo: list, scheme: Scheme, block: int, samples: int, data: Any, scales: dict, out: Path
) -> dict:
    """Calibrate and search the AWQ scales (quantize/awq.py); fills ``scales`` (weight -> s [K])
    and returns the groups to place, the weights left to RTN and where the data came from."""
    import shutil

    from gpcl_trt import progress
    from gpcl_trt.common import temp_sibling
    from gpcl_trt.quantize import awq

    groups, plain = awq.groups_of(model, todo)
    reader = SourceReader(src.parent)

    def load(w: Weight, n0: int, n1: int) -> np.ndarray:
        a = reader.array(w.tensor)
        return np.array(a[:, n0:n1] if w.k_axis == 0 else a[n0:n1, :].T, dtype=np.float32)

    # the kept activation rows wait on disk beside the output (not in memory) until their group's
    # search; a hidden temporary sibling (common.temp_sibling: a killed run's is removed by the next)
    tmp = temp_sibling(out.with_name(out.name + ".awq"))
    tmp.mkdir()
    try:
        with progress.step(f"awq: calibrate {len(groups)} projection inputs"):
            data_desc = awq.collect(model, src, groups, samples, None if data is None else str(data), tmp)
        with progress.step("awq: search the scales"):
            for g in groups:
                awq.search(g, load, block, scheme)
                g.rows = None  # its mapping of the file
                for w in g.weights:
                    if g.scale is not None:
                        scales[w.name] = g.scale
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"_groups": groups, "plain": plain, "data": data_desc}


def _gptq(
    model: Any, src: Path, todo: list, scheme: Scheme, block: int, samples: int, data: Any, spill: Path
) -> tuple[Any, dict]:
    """Calibrate for GPTQ (quantize/gptq.py) as AWQ does (awq.collect: the kept rows of each
    projection input, in ``spill``); the GPTQ itself runs weight by weight as they are written."""
    from gpcl_trt import progress
    from gpcl_trt.quantize import awq, gptq

    groups, plain = awq.groups_of(model, todo)
    reader = SourceReader(src.parent)

    def load(w: Weight, n0: int, n1: int) -> np.ndarray:
        a = reader.array(w.tensor)
        return np.array(a[:, n0:n1] if w.k_axis == 0 else a[n0:n1, :].T, dtype=np.float32)

    spill.mkdir()
    with progress.step(f"gptq: calibrate {len(groups)} projection inputs"):
        data_desc = awq.collect(model, src, groups, samples, None if data is None else str(data), spill)
    state = gptq.Calibrated(groups, load, block, scheme, spill)
    return state, {"_groups": groups, "plain": plain, "data": data_desc}


def _ort_check(path: Path) -> None:
    from gpcl_trt.feeds import ort_session

    ort_session(str(path))


def _reattach_gpcl(model: Any) -> None:
    """A GPCL model's functions are rebuilt at the new opset (their bodies use opset-18 ops)."""
    from gpcl_trt.plugins.onnx_function import GPCL_DOMAIN

    if any(n.domain == GPCL_DOMAIN for n in model.graph.node):
        from gpcl_trt.plugins.onnx_function import attach_gpcl_functions

        attach_gpcl_functions(model)
