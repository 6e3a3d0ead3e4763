"""Weight-only quantization (gpcl-trt quantize): RTN blocks and int4 packing bit for bit against
a plain numpy reference, the streamed path (several chunks per weight, odd widths, a K that is not
a multiple of the block), a quantized tiny Llama in ONNX Runtime against a model that dequantizes
the same weights and against fp32, the passes and a TensorRT-RTX build on the quantized model,
one read per weight of a sharded lazy export, and bad input in one line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from gpcl_trt.cli import main
from gpcl_trt.common import load_onnx
from gpcl_trt.feeds import make_feeds, specs_from_onnx
from gpcl_trt.quantize import api as qapi
from gpcl_trt.quantize import quantize_model

SCHEMES = [("int8", True), ("int8", False), ("int4", True), ("int4", False)]


# ----------------------------------------------------------------------------- references
def ref_quantize(w_kn: np.ndarray, block: int, bits: int, symmetric: bool):
    """The definition, one block at a time (rtn.py's docstring)."""
    k, n = w_kn.shape
    nb = -(-k // block)
    qmax = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    qmin = -(1 << (bits - 1)) if symmetric else 0
    q = np.zeros((k, n), np.int64)
    scale = np.zeros((nb, n), np.float32)
    zp = np.zeros((nb, n), np.int64)
    for b in range(nb):
        for j in range(n):
            blk = w_kn[b * block : (b + 1) * block, j].astype(np.float32)
            if symmetric:
                s = np.float32(np.abs(blk).max() / np.float32(qmax))
                z = 0
            else:
                lo, hi = min(blk.min(), np.float32(0)), max(blk.max(), np.float32(0))
                s = np.float32((hi - lo) / np.float32(qmax))
                z = int(np.clip(np.rint(-lo / s), 0, qmax)) if s > 0 else 0
            scale[b, j], zp[b, j] = s, z
            vals = np.rint(blk / s) + z if s > 0 else np.zeros_like(blk)
            q[b * block : (b + 1) * block, j] = np.clip(vals, qmin, qmax)
    return q, scale, (None if symmetric else zp)


def ref_pack(values: np.ndarray, bits: int) -> bytes:
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    if bits == 8:
        return bytes(v & 0xFF for v in flat)
    if len(flat) % 2:
        flat.append(0)
    return bytes((flat[i] & 0xF) | ((flat[i + 1] & 0xF) << 4) for i in range(0, len(flat), 2))


def ref_dequantize(q, scale, zp, block):
    k = q.shape[0]
    s = np.repeat(scale, block, axis=0)[:k]
    z = 0 if zp is None else np.repeat(zp, block, axis=0)[:k]
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def _unpack(t: onnx.TensorProto) -> np.ndarray:
    from gpcl_trt.quantize import unpack_int4

    n = int(np.prod(t.dims))
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return unpack_int4(np.frombuffer(t.raw_data, np.uint8), n, t.data_type == TensorProto.INT4).reshape(t.dims)
    return numpy_helper.to_array(t)


def dequantized_reference(path: Path) -> onnx.ModelProto:
    """The quantized model with every DequantizeLinear replaced by its numpy result: the same
    weights, dequantized outside ONNX Runtime."""
    m = load_onnx(path)
    inits = {t.name: t for t in m.graph.initializer}
    nodes, folded = [], []
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            nodes.append(n)
            continue
        q, s = _unpack(inits[n.input[0]]).astype(np.int64), numpy_helper.to_array(inits[n.input[1]])
        z = _unpack(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 else None
        block = next(a.i for a in n.attribute if a.name == "block_size")
        folded.append(numpy_helper.from_array(ref_dequantize(q, s, z, block), n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(folded)
    return m


def _session(model, fused: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if fused:  # MatMulNBits with fp32 compute (the default level 4 quantizes activations to int8)
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    else:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- RTN, bit for bit
def _projection_model(path: Path, w_nk: np.ndarray) -> Path:
    """x [2, K] -> MatMul(x, Transpose(W [N, K])) -> Relu -> y: the exporter's layout."""
    n, k = w_nk.shape
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(w_nk, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("weights,symmetric", SCHEMES)
def test_rtn_bit_for_bit(tmp_path, monkeypatch, weights, symmetric, block):
    """K = 203 (not a multiple of any block size: ONNX's blocked DequantizeLinear allows a short
    last block), N = 23 (odd: int4 nibbles straddle rows), one block per chunk (the streamed path
    with many chunks), with a zero block (scale 0)."""
    rng = np.random.default_rng(block)
    w = rng.standard_normal((23, 203)).astype(np.float32) * 0.05
    w[:, :block] = 0  # an all-zero block
    w[3, 40:44] = 0.9  # an outlier
    src = _projection_model(tmp_path / "m.onnx", w)
    monkeypatch.setattr(qapi, "CHUNK_BYTES", 1)  # rows per chunk: one block
    res = quantize_model(src, tmp_path / "q.onnx", weights=weights, block_size=block, symmetric=symmetric)
    assert res["quantized"] == 1 and res["opset"] == {"before": 18, "after": 21}

    bits = 4 if weights == "int4" else 8
    q_ref, s_ref, z_ref = ref_quantize(w.T, block, bits, symmetric)
    model = onnx.load(tmp_path / "q.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul", "Relu"]  # the Transpose went
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": block}
    qt, st = inits[dq.input[0]], inits[dq.input[1]]
    want_type = {
        ("int4", True): TensorProto.INT4,
        ("int4", False): TensorProto.UINT4,
        ("int8", True): TensorProto.INT8,
        ("int8", False): TensorProto.UINT8,
    }[weights, symmetric]
    assert qt.data_type == want_type and list(qt.dims) == [203, 23]
    assert qt.raw_data == ref_pack(q_ref, bits)
    assert numpy_helper.to_array(st).tobytes() == s_ref.tobytes()
    if symmetric:
        assert len(dq.input) == 2
    else:
        assert inits[dq.input[2]].data_type == want_type and inits[dq.input[2]].raw_data == ref_pack(z_ref, bits)

    # ONNX Runtime's DequantizeLinear of what we wrote equals the reference bit for bit
    deq = ref_dequantize(q_ref, s_ref, z_ref, block)
    model.graph.output.append(helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None))
    x = rng.standard_normal((2, 203)).astype(np.float32)
    y, w_ort = _session(model, fused=False).run(None, {"x": x})
    assert np.array_equal(w_ort, deq)
    np.testing.assert_allclose(y, np.maximum(x @ deq, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["gemm_transB", "gemm", "matmul_fp16", "cast_fp16_to_fp32"])
def test_layouts(tmp_path, layout):
    """Gemm with transB 1 or 0 (K read from either axis; transB becomes 0), an fp16 weight (fp16
    scales), a weight behind a Cast: each quantized, the float weight and its chain gone, and the
    output equals the dequantized weights in numpy."""
    rng = np.random.default_rng(3)
    n, k = 24, 96
    w_nk = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    ft = TensorProto.FLOAT
    if layout == "gemm_transB":
        init, nodes = w_nk, [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1)]
    elif layout == "gemm":
        init, nodes = w_nk.T.copy(), [helper.make_node("Gemm", ["x", "W"], ["h"])]
    elif layout == "matmul_fp16":
        ft = TensorProto.FLOAT16
        init = w_nk.astype(np.float16)
        nodes = [
            helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "Wt"], ["h"]),
        ]
    else:
        init = w_nk.astype(np.float16)
        nodes = [
            helper.make_node("Cast", ["W"], ["Wc"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["Wc"], ["Wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "Wt"], ["h"]),
        ]
    nodes.append(helper.make_node("Relu", ["h"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", ft, [2, k])],
        [helper.make_tensor_value_info("y", ft, [2, n])],
        [numpy_helper.from_array(init, "W")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), src)
    res = quantize_model(src, tmp_path / "q.onnx", weights="int8", block_size=32)
    assert res["quantized"] == 1
    q = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in q.graph.node] == ["DequantizeLinear", nodes[-2].op_type, "Relu"]
    assert all(a.i == 0 for n in q.graph.node for a in n.attribute if a.name == "transB")
    scale = next(t for t in q.graph.initializer if t.name.endswith("_scale"))
    assert scale.data_type == (TensorProto.FLOAT16 if layout == "matmul_fp16" else TensorProto.FLOAT)
    w_ref = init.astype(np.float32) if init.dtype == np.float16 else w_nk  # what the model holds, as [N, K]
    x = rng.standard_normal((2, k)).astype(np.float16 if ft == TensorProto.FLOAT16 else np.float32)
    y = _session(tmp_path / "q.onnx", fused=False).run(None, {"x": x})[0].astype(np.float32)
    if layout == "matmul_fp16":  # fp16 scales and arithmetic: close to the float weights
        np.testing.assert_allclose(y, np.maximum(x.astype(np.float32) @ w_ref.T, 0), rtol=0, atol=2e-2)
    else:
        deq = ref_dequantize(*ref_quantize(w_ref.T, 32, 8, True), 32)
        np.testing.assert_allclose(y, np.maximum(x @ deq, 0), rtol=0, atol=1e-5)


def test_pack_unpack_roundtrip():
    from gpcl_trt.quantize import pack_int4, unpack_int4

    v = np.arange(-8, 8, dtype=np.int8).repeat(3)[:-1]  # odd count
    packed = pack_int4(v)
    assert packed.tobytes() == ref_pack(v, 4)
    assert np.array_equal(unpack_int4(packed, v.size, signed=True), v)
    u = np.arange(16, dtype=np.uint8)
    assert np.array_equal(unpack_int4(pack_int4(u), 16, signed=False), u)


# ----------------------------------------------------------------------------- a tiny Llama
@pytest.fixture(scope="module")
def sharded_export(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama saved in several safetensors shards and exported lazily with its weights
    linked (external data in the shard files themselves)."""
    from transformers import LlamaForCausalLM

    from gpcl_trt.exporter import export_model

    d = tmp_path_factory.mktemp("sharded")
    ckpt = d / "ckpt"
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(ckpt, max_shard_size="100KB")
    assert len(list(ckpt.glob("*.safetensors"))) > 1
    out = d / "out" / "llama.onnx"
    out.parent.mkdir()
    res = export_model(ckpt, out, task="text-generation", external_data=True)
    assert res["ok"], res
    return out


@pytest.fixture(scope="module")
def quantized(sharded_export, tmp_path_factory):
    """(weights) -> (path, result), each quantized once."""
    cache: dict = {}

    def get(weights: str, block: int = 32):
        if (weights, block) not in cache:
            out = tmp_path_factory.mktemp(f"q_{weights}_{block}") / "q.onnx"
            cache[weights, block] = (out, quantize_model(sharded_export, out, weights=weights, block_size=block))
        return cache[weights, block]

    return get


def _logits(model, feed, fused=True) -> np.ndarray:
    return _session(model, fused).run(["logits"], feed)[0]


def test_decoder_logits(sharded_export, quantized):
    model = onnx.load(sharded_export, load_external_data=False)
    feed = make_feeds(specs_from_onnx(model), 2, 9, vocab=128)
    fp32 = _logits(sharded_export, feed)
    errors = {}
    for weights in ("int8", "int4"):
        path, res = quantized(weights)
        # embeddings and lm_head stay float; every block projection is quantized (2 layers x 7)
        assert res["quantized"] == 14
        assert any("Gather" in why for why in res["kept"].values())
        assert "lm_head" in " ".join(res["kept"].values())
        ref = _logits(dequantized_reference(path), feed)
        np.testing.assert_allclose(_logits(path, feed), ref, rtol=0, atol=1e-5)  # MatMulNBits, fp32 compute
        np.testing.assert_allclose(_logits(path, feed, fused=False), ref, rtol=0, atol=1e-5)  # plain DQ + MatMul
        errors[weights] = float(np.abs(_logits(path, feed) - fp32).max())
    scale = float(np.abs(fp32).max())
    assert 0 < errors["int8"] < 0.02 * scale
    assert errors["int8"] < errors["int4"] < 0.3 * scale


def test_lm_head_flag(sharded_export, tmp_path):
    """--lm-head quantizes the output projection too (onnxruntime-genai's default); the logits
    still equal the same weights dequantized."""
    out = tmp_path / "q.onnx"
    res = quantize_model(sharded_export, out, weights="int4", lm_head=True)
    assert res["quantized"] == 15 and not any("lm_head" in why for why in res["kept"].values())
    feed = make_feeds(specs_from_onnx(onnx.load(out, load_external_data=False)), 1, 6, vocab=128)
    np.testing.assert_allclose(_logits(out, feed), _logits(dequantized_reference(out), feed), rtol=0, atol=1e-5)


def test_reads_each_weight_once(sharded_export, tmp_path, monkeypatch):
    """Every external weight of the sharded export is read exactly once (quantized or copied),
    and the output is self-contained (its own data file, none of the shards)."""
    reads: Counter = Counter()
    array, raw_range = qapi.SourceReader.array, qapi.SourceReader.raw_range

    def counting_array(self, t):
        reads[t.name] += 1
        return array(self, t)

    def counting_raw_range(self, t):
        reads[t.name] += 1
        return raw_range(self, t)

    monkeypatch.setattr(qapi.SourceReader, "array", counting_array)
    monkeypatch.setattr(qapi.SourceReader, "raw_range", counting_raw_range)
    out = tmp_path / "q.onnx"
    quantize_model(sharded_export, out, weights="int4")
    src = onnx.load(sharded_export, load_external_data=False)
    external = {t.name for t in src.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert len({e.value for t in src.graph.initializer for e in t.external_data if e.key == "location"}) > 1
    assert set(reads) == external and set(reads.values()) == {1}
    q = onnx.load(out, load_external_data=False)
    assert {e.value for t in q.graph.initializer for e in t.external_data if e.key == "location"} == {"q.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.manifest.json", "q.onnx", "q.onnx.data"]


def test_passes_on_quantized(sharded_export, quantized, tmp_path):
    """sites, calibrate, insert, diff work on the quantized model; quantizing a GPCL model keeps
    GPCL (float) and its sites."""
    from gpcl_trt.accuracy import diff
    from gpcl_trt.passes import calibrate_file, insert_file, sites_file

    q, _ = quantized("int4")
    n_sites = len(sites_file(sharded_export)["sites"])
    assert n_sites == 4 and len(sites_file(q)["sites"]) == n_sites
    calibrate_file(q, tmp_path / "calib.json", samples=2)
    g = tmp_path / "g.onnx"
    res = insert_file(q, g, calibration=tmp_path / "calib.json")
    assert len(res["inserted"]) == n_sites
    assert diff(reference=q, candidate=g, samples=1, seq=8)["ok"]  # calibrated tau: no clamping on these inputs

    gf = tmp_path / "gf.onnx"
    insert_file(sharded_export, gf, tau=1e4)
    gq = tmp_path / "gq.onnx"
    res = quantize_model(gf, gq, weights="int4")
    assert res["quantized"] == 14
    assert len(sites_file(gq)["sites"]) == n_sites
    feed = make_feeds(specs_from_onnx(onnx.load(gq, load_external_data=False)), 1, 5, vocab=128)
    np.testing.assert_allclose(_logits(gq, feed), _logits(q, feed), rtol=0, atol=1e-5)  # tau 1e4: GPCL is identity


def _mlp_model(path: Path, width: int, layers: int) -> Path:
    """x -> (MatMul(., Transpose(W_i)) -> Relu) x layers, weights in external data: a model whose
    weights are nearly all of its size."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.03, f"W{i}"))
        nodes += [
            helper.make_node("Transpose", [f"W{i}"], [f"W{i}t"], perm=[1, 0]),
            helper.make_node("MatMul", [h, f"W{i}t"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        h = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def test_external_zero_chunks_are_holes(tmp_path, monkeypatch):
    """External data, several chunks per weight, one chunk all zeros (left as a hole, as a sparse
    checkpoint's would be): the model still computes its dequantized weights."""
    src = _mlp_model(tmp_path / "mlp.onnx", 64, 1)
    m = onnx.load(src)  # read it back whole, zero the first block of K, write it again external
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[:, :32] = 0
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W0"))
    (tmp_path / "mlp.onnx.data").unlink()
    onnx.save(m, src, save_as_external_data=True, location="mlp.onnx.data", size_threshold=0)
    monkeypatch.setattr(qapi, "CHUNK_BYTES", 1)
    out = tmp_path / "q.onnx"
    quantize_model(src, out, weights="int4", symmetric=False)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    deq = ref_dequantize(*ref_quantize(w.T, 32, 4, False), 32)
    y = _session(out, fused=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x @ deq, 0), rtol=0, atol=1e-5)


def test_tensorrt_rtx_plan_smaller(tmp_path):
    """A TensorRT-RTX build (CPU-only AOT here) of the int4 model succeeds and its plan keeps the
    weights in int4: a quarter of the fp32 plan's size, with scales, where weights are nearly all."""
    pytest.importorskip("tensorrt_rtx", reason="needs tensorrt-rtx (the 'rtx' extra)")
    from gpcl_trt.engines import build_engine

    src = _mlp_model(tmp_path / "mlp.onnx", 1024, 4)  # 16 MB of fp32 weights
    q = tmp_path / "q.onnx"
    assert quantize_model(src, q, weights="int4")["quantized"] == 4
    fp = build_engine(src, tmp_path / "fp.engine", backend="tensorrt-rtx")
    qe = build_engine(q, tmp_path / "q.engine", backend="tensorrt-rtx")
    assert fp["ok"] and qe["ok"]
    assert qe["engine_bytes"] < 0.35 * fp["engine_bytes"], (qe["engine_bytes"], fp["engine_bytes"])


# ----------------------------------------------------------------------------- bad input
def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stderr


def test_bad_input(tmp_path):
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    src = _projection_model(tmp_path / "m.onnx", w)
    (tmp_path / "junk.onnx").write_bytes(b"\x00 not a protobuf")
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    cases = [
        (["quantize", tmp_path / "junk.onnx", "-o", tmp_path / "a.onnx"], "not a readable ONNX model"),
        (["quantize", src, "-o", tmp_path / "a.onnx", "--weights", "int3"], "--weights"),
        (["quantize", src, "-o", tmp_path / "a.onnx", "--block-size", "48"], "--block-size"),
        (["quantize", src, "-o", tmp_path / "exists.onnx"], "--force"),
        (["quantize", src, "-o", src, "--force"], "input model"),
        (["quantize", src, "-o", tmp_path / "a.onnx", "--keep", "W"], "no projection weight"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, needle in cases:
        code, err = _cli(*args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("gpcl-trt quantize: error:") and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"
    code, _ = _cli("quantize", src, "-o", tmp_path / "exists.onnx", "--force")
    assert code == 0 and onnx.load(tmp_path / "exists.onnx").opset_import[0].version == 21


def test_cli_help_and_light_import():
    import subprocess
    import sys

    import click

    cmd = main.commands["quantize"]
    assert cmd.help and _cli("quantize", "--help")[0] == 0
    assert all(p.help for p in cmd.params if isinstance(p, click.Option))
    # `gpcl-trt --help` stays instant: the CLI loads neither the quantizer nor numpy for it
    code = (
        "import sys, gpcl_trt.quantize; light = not any(m in sys.modules for m in ('numpy', 'onnx')); "
        "import gpcl_trt.cli; print(light, sorted(m for m in sys.modules if m.startswith('gpcl_trt.quantize')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True ['gpcl_trt.quantize', 'gpcl_trt.quantize.cli']", out
