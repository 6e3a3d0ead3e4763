"""AWQ (quantize --method awq) and the quantized model's check against the same weights
dequantized: on a small graph whose norm has a few large channels (what makes AWQ matter in
trained models), AWQ's output error is below RTN's on fresh inputs; its 1/s is folded into the
LayerNormalization feeding Q/K/V-like projections and goes in as a Mul elsewhere; the model still
computes its dequantized weights exactly; a format disagreement fails the check and writes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from gpcl_trt.cli import main
from gpcl_trt.quantize import quantize_model
from gpcl_trt.quantize.check import dequantized_reference

K, N = 128, 96


def _outlier_model(path, seed: int = 0):
    """x [B, S, K] -> LayerNorm (a few channels scaled x30) -> two projections that read it (the
    norm fold) -> Relu -> a projection (a Mul) -> Tanh -> y."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(K, np.float32)
    gamma[rng.choice(K, 4, replace=False)] = 30.0
    beta = (0.1 * rng.standard_normal(K)).astype(np.float32)
    wa, wb = (rng.standard_normal((K, N)).astype(np.float32) * 0.05 for _ in range(2))
    wc = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wa"], ["a"], name="proj_a"),
        helper.make_node("MatMul", ["h", "wb"], ["b"], name="proj_b"),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Relu", ["ab"], ["r"]),
        helper.make_node("MatMul", ["r", "wc"], ["c"], name="proj_c"),
        helper.make_node("Tanh", ["c"], ["y"]),  # not an output head (those stay float)
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (("ln.weight", gamma), ("ln.bias", beta))]
    inits += [numpy_helper.from_array(v, n) for n, v in (("wa", wa), ("wb", wb), ("wc", wc))]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", K])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def _run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("block", [32, 128])
def test_awq_beats_rtn_and_folds(tmp_path, block):
    src = _outlier_model(tmp_path / "m.onnx")
    x = np.random.default_rng(7).standard_normal((4, 16, K)).astype(np.float32)  # not the calibration draw
    ref = _run(src, x)
    err = {}
    for method in ("rtn", "awq"):
        out = tmp_path / f"{method}.onnx"
        res = quantize_model(src, out, weights="int4", block_size=block, method=method, samples=16)
        assert res["ok"] and res["check"]["passed"], res["check"]
        got = _run(out, x)
        # the model computes exactly the weights it stores (with AWQ's scales folded in)
        np.testing.assert_allclose(got, _run(dequantized_reference(onnx.load(out)), x), rtol=0, atol=1e-5)
        err[method] = float(np.square(got - ref).mean())
        if method == "awq":
            a = res["awq"]
            assert a["groups"] == 2 and a["scaled"] == 2, a
            assert a["folded"] == 1 and a["muls"] == 1, a  # h: the LayerNorm's only readers; r: after a Relu
            assert a["calibration_error_vs_rtn"] < 1
            m = onnx.load(out)
            ln = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
            assert not np.allclose(ln["ln.weight"], numpy_helper.to_array(onnx.load(src).graph.initializer[0]))
            assert sum(n.op_type == "Mul" for n in m.graph.node) == 1
            assert res["method"] == "awq" and res["samples"] == 16
            assert not [p for p in tmp_path.iterdir() if ".gpcl-" in p.name]  # the kept rows' temporary folder
    assert err["awq"] < 0.7 * err["rtn"], err


def test_awq_on_exported_llama_folds_rmsnorm(exports, tmp_path):
    """The exporter's RMSNorm (a final Mul by the norm weight) takes the fold: Q/K/V and gate/up
    of each layer; o_proj and down_proj get a Mul. Logits equal the dequantized reference."""
    src, _ = exports("llama", "text-generation")
    out = tmp_path / "q.onnx"
    res = quantize_model(src, out, weights="int4", method="awq", samples=8)
    assert res["ok"] and res["check"]["passed"]
    a = res["awq"]
    assert a["groups"] == 8 and a["folded"] + a["muls"] == a["scaled"], a  # 2 layers x (qkv, o, gate/up, down)
    assert a["folded"] >= 2, a


def _ln(x, model):
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * w["ln.weight"] + w["ln.bias"]


def _groups(path):
    from gpcl_trt.common import load_onnx
    from gpcl_trt.quantize import awq
    from gpcl_trt.quantize.api import DEFAULT_KEEP, plan

    model = load_onnx(path, external_data=False)
    groups, _ = awq.groups_of(model, plan(model, DEFAULT_KEEP)[0])
    return model, {g.tensor: g for g in groups}


def test_awq_statistics_are_the_real_tokens(tmp_path):
    """The calibration's reductions (in the graph, one sequence at a time, weights external: the
    bounded session) equal numpy's over the real tokens of padded batches: mean |x| per channel,
    and the kept rows are the real tokens' rows (here all of them: fewer than the row budget).
    Padding is filled with huge values, so one padded token would show."""
    from gpcl_trt.quantize import awq

    src = _outlier_model(tmp_path / "m.onnx")
    m = onnx.load(src)
    onnx.save(onnx.load(src), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    rng = np.random.default_rng(3)
    lengths = [12, 5, 9, 1, 12, 7, 3, 11, 6, 2]  # two batches of the npz (8 + 2)
    x = (1000 * rng.standard_normal((len(lengths), 12, K))).astype(np.float32)
    mask = np.zeros((len(lengths), 12), np.int64)
    for j, n in enumerate(lengths):
        x[j, :n] = rng.standard_normal((n, K))
        mask[j, :n] = 1
    np.savez(tmp_path / "d.npz", x=x, attention_mask=mask)
    model, groups = _groups(src)
    desc = awq.collect(model, src, list(groups.values()), 16, str(tmp_path / "d.npz"), tmp_path)
    assert desc["tokens"] == sum(lengths)
    h = _ln(x[mask.astype(bool)], m)  # [real tokens, K]
    g = groups["h"]
    np.testing.assert_allclose(g.mean_abs, np.abs(h).mean(0), rtol=1e-4, atol=1e-6)
    assert g.rows.shape == h.shape
    np.testing.assert_allclose(g.rows[np.lexsort(g.rows.T)], h[np.lexsort(h.T)], rtol=1e-4, atol=1e-5)
    assert not isinstance(g.rows, np.ndarray) or isinstance(g.rows, np.memmap)  # on disk, not in memory
    assert groups["r"].rows.shape == (sum(lengths), N)


def test_awq_calibration_run_does_not_grow_with_tokens(tmp_path):
    """What ONNX Runtime hands back per calibration run is the reductions, the same size for 16
    tokens and for 2048: the group inputs themselves ([tokens, K] each, every layer's at once)
    never leave the runtime."""
    from gpcl_trt.quantize import awq

    src = _outlier_model(tmp_path / "m.onnx")
    model, groups = _groups(src)
    probe = awq._probe(model, list(groups.values()))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.array([0, 5, 7, 3], np.int64)
    shapes = []
    for tokens in (16, 2048):
        x = np.random.default_rng(tokens).standard_normal((1, tokens, K)).astype(np.float32)
        outs = sess.run(None, {"x": x, awq.ROWS_INPUT: rows, awq.MASK_INPUT: np.ones((1, tokens), np.float32)})
        assert outs[1] == tokens and outs[4] == tokens
        shapes.append([o.shape for o in outs])
        assert sum(o.size for o in outs) == (1 + len(rows)) * (K + N) + 2, shapes  # sums, rows; 2 token counts
    assert shapes[0] == shapes[1]
    # each reduction comes right after the node producing its input (ORT runs equal-priority nodes in
    # this order: the input is reduced and freed as soon as its layer has run, not at the end)
    order = [n.output[0] for n in probe.graph.node]
    producer = {o: i for i, n in enumerate(probe.graph.node) for o in n.output}
    for i, t in enumerate(groups):
        assert order.index(f"awq/{i}/flat") == producer[t] + 1, (t, order)


def test_awq_probe_reads_linear_weights_transposed_in_place(tmp_path):
    """An nn.Linear as exported (MatMul of Transpose(W [N, K])) runs in the calibration as
    FusedMatMul(transB=1) on W itself: no transposed copy of every weight on every run (ORT's
    optimizer, which would fuse it, is off in the bounded session); the reductions unchanged."""
    from gpcl_trt.quantize import awq

    rng = np.random.default_rng(0)
    w = (0.05 * rng.standard_normal((N, K))).astype(np.float32)  # [out, in], as PyTorch stores it
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["a"], name="proj_a"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["r", "w2t"], ["y0"], name="proj_b"),
        helper.make_node("Tanh", ["y0"], ["y"]),
    ]
    w2 = (0.05 * rng.standard_normal((K, N))).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", K])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), src)
    model, groups = _groups(src)
    assert sorted(groups) == ["r", "x"]
    probe = awq._probe(model, list(groups.values()))
    ops = [n.op_type for n in probe.graph.node]
    assert ops.count("FusedMatMul") == 1 and "Transpose" not in ops, ops  # proj_b is past the last group input
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": x, awq.ROWS_INPUT: np.arange(3, dtype=np.int64), awq.MASK_INPUT: np.ones((2, 5), np.float32)}
    names = [o.name for o in probe.graph.output]
    got = dict(zip(names, sess.run(None, feed)))
    i = list(groups).index("r")
    r = np.maximum(x.reshape(-1, K) @ w.T, 0)
    np.testing.assert_allclose(got[f"awq/{i}/sum"], np.abs(r).sum(0), rtol=1e-4)
    np.testing.assert_allclose(got[f"awq/{i}/rows"], r[:3], rtol=1e-4, atol=1e-6)


def test_check_catches_a_format_disagreement(tmp_path, monkeypatch):
    """The check compares ONNX Runtime's reading of the stored int4 with ours (rtn.unpack_int4):
    were they to disagree (here: ours made to read the high nibble first), the result is ok
    False, nothing is written and the CLI exits 1."""
    from gpcl_trt.quantize import check, rtn

    src = _outlier_model(tmp_path / "m.onnx")

    def high_first(packed, count, signed):
        p = np.asarray(packed, np.uint8)
        return rtn.unpack_int4(((p >> 4) | (p << 4)).astype(np.uint8), count, signed)

    monkeypatch.setattr(check, "unpack_int4", high_first)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = quantize_model(src, tmp_path / "q.onnx", weights="int4")
    assert not res["ok"] and not res["written"] and not res["check"]["passed"], res["check"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 1 and "FAILED: nothing written" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_awq_bad_input(tmp_path):
    src = _outlier_model(tmp_path / "m.onnx")
    for args, needle in (
        (["--method", "hqq"], "--method"),
        (["--method", "awq", "--samples", "0"], "--samples"),
    ):
        r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), *args])
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
