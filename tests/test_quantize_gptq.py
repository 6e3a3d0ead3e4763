"""GPTQ (quantize --method gptq): with a diagonal Hessian (no channel correlates with another)
it is RTN bit for bit; on a small graph with outlier channels its output error is below RTN's on
fresh inputs, and the model computes exactly the weights it stores (int4, int8; symmetric and
asymmetric)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_quantize_awq import K, _outlier_model, _run

from gpcl_trt.quantize import quantize_model
from gpcl_trt.quantize.check import dequantized_reference
from gpcl_trt.quantize.gptq import quantize_columns
from gpcl_trt.quantize.rtn import Scheme, quantize_blocks


@pytest.mark.parametrize("weights,symmetric", [("int4", True), ("int4", False), ("int8", True)])
def test_gptq_with_a_diagonal_hessian_is_rtn(weights, symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    scheme = Scheme(weights, symmetric)
    u = np.diag(rng.uniform(0.5, 2.0, 96)).astype(np.float32)  # U of a diagonal H: no error is carried
    got = quantize_columns(w, u, np.zeros(96, bool), 32, scheme, np.float32)
    want = quantize_blocks(w, 32, scheme)
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("weights,block,symmetric", [("int4", 32, True), ("int4", 128, False), ("int8", 32, True)])
def test_gptq_beats_rtn(tmp_path, weights, block, symmetric):
    src = _outlier_model(tmp_path / "m.onnx")
    x = np.random.default_rng(7).standard_normal((4, 16, K)).astype(np.float32)  # not the calibration draw
    ref = _run(src, x)
    err = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.onnx"
        res = quantize_model(
            src, out, weights=weights, block_size=block, symmetric=symmetric, method=method, samples=16
        )
        assert res["ok"] and res["check"]["passed"], res["check"]
        got = _run(out, x)
        np.testing.assert_allclose(got, _run(dequantized_reference(onnx.load(out)), x), rtol=0, atol=1e-5)
        err[method] = float(np.square(got - ref).mean())
        if method == "gptq":
            g = res["gptq"]
            assert g["groups"] == 2 and g["calibration_error_vs_rtn"] < 0.9, g
            assert res["method"] == "gptq" and res["samples"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", *(f"{m}.{e}" for m in ("rtn", "gptq") for e in ("onnx", "manifest.json"))]
    )
    assert err["gptq"] < 0.85 * err["rtn"], err


def test_gptq_cli(tmp_path):
    from click.testing import CliRunner

    from gpcl_trt.cli import main

    src = _outlier_model(tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--method", "gptq"])
    assert r.exit_code == 0, r.stderr
    assert "gptq: 2 inputs, output error" in r.stderr and "passed" in r.stderr, r.stderr
    manifest = json.loads((tmp_path / "q.manifest.json").read_text())
    assert manifest["options"]["method"] == "gptq" and manifest["options"]["samples"] == 64


def test_inverse_factor_is_one_float32_k_by_k_in_place():
    """U is LAPACK's float32 Cholesky of H^-1 built in H's own memory: the numpy arrays alive at
    once peak at one K x K float32 (numpy's float64 inverse and Cholesky needed ~6), and U is the
    float64 factor within float32 rounding (1% damping bounds H's condition)."""
    pytest.importorskip("scipy")
    import tracemalloc

    from gpcl_trt.quantize.gptq import inverse_factor

    rng = np.random.default_rng(3)
    k = 384
    x = (rng.standard_normal((300, k)) * rng.uniform(0.1, 10, k)).astype(np.float32)  # 300 rows: 2 chunks
    x[:, 5] = 0  # a dead channel
    tracemalloc.start()
    try:
        u, dead = inverse_factor(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * k * k * 4, peak / (k * k * 4)
    assert u.dtype == np.float32 and u.shape == (k, k) and np.flatnonzero(dead).tolist() == [5]
    h = x.astype(np.float64).T @ x.astype(np.float64)
    h[5, 5] = 1.0
    h[np.diag_indices(k)] += 0.01 * np.mean(np.diag(h))
    want = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    assert np.abs(np.tril(u, -1)).max() == 0
    np.testing.assert_allclose(u, want, rtol=0, atol=1e-4 * np.abs(want).max())
