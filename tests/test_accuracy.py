"""Accuracy diffing on real models: the exported MiniLM under ONNX Runtime, PyTorch on the real
MiniLM dir, GPCL models made by the real insertion pass, polygraphy's Comparator and RunResults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpcl_trt.accuracy import diff
from gpcl_trt.accuracy import inputs as inp
from gpcl_trt.accuracy import metrics as mt
from gpcl_trt.accuracy.comparison import golden_inputs_path
from gpcl_trt.cli import main
from gpcl_trt.common import GpclError

SMALL = {"samples": 2, "seq": 16}


@pytest.fixture(scope="module")
def gpcl_pair(minilm_onnx, tmp_path_factory):
    """MiniLM with GPCL clamp at every pre-attention and pre-MLP site: tau=1e9 (identity) and
    tau=0.01 (clamps every group)."""
    from gpcl_trt.passes import insert_file

    d = tmp_path_factory.mktemp("acc_gpcl")
    out = {}
    for name, tau in (("huge", 1e9), ("tiny", 0.01)):
        out[name] = d / f"minilm_{name}.onnx"
        assert insert_file(minilm_onnx, out[name], mode="clamp", tau=tau)["ok"]
    return out


def _tiny_model(path: Path, name: str, shape: list, dtype=np.float32) -> Path:
    import onnx
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["y"])],
        "g",
        [helper.make_tensor_value_info(name, elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


# ----------------------------------------------------------------------------- acceptance
def test_model_against_itself_is_exact(minilm_onnx):
    r = diff(minilm_onnx, minilm_onnx, **SMALL)
    out = r["outputs"]["last_hidden_state"]
    assert r["ok"] and out["passed"]
    assert out["max_abs"] == 0.0 and out["mean_abs"] == 0.0 and out["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["inputs"]["samples"] == 2 and r["inputs"]["shapes"]["input_ids"] == [1, 16]


def test_gpcl_huge_tau_is_exact_per_layer(minilm_onnx, gpcl_pair):
    r = diff(minilm_onnx, gpcl_pair["huge"], per_layer=True, **SMALL)
    assert r["ok"], r["summary"]
    assert r["outputs"]["last_hidden_state"]["max_abs"] == 0.0
    assert r["outputs"]["last_hidden_state"]["polygraphy_passed"] is True
    pl = r["per_layer"]
    # Every block's residual-path tensors survive insertion under their names.
    assert pl["first_divergence"] is None and pl["compared"] > 100
    assert {g["layer"] for g in pl["layers"]} >= set(range(6))
    assert all(g["max_abs"] == 0.0 for g in pl["layers"])


def test_gpcl_tiny_tau_fails_at_layer0_cli(minilm_onnx, gpcl_pair, tmp_path):
    rep = tmp_path / "rep"
    res = CliRunner().invoke(
        main,
        [
            "diff",
            "--reference",
            str(minilm_onnx),
            "--candidate",
            str(gpcl_pair["tiny"]),
            "--per-layer",
            "--report",
            str(rep),
            "--samples",
            "2",
            "--seq",
            "16",
            "--json",
        ],
    )
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["ok"] is False and not r["outputs"]["last_hidden_state"]["passed"]
    # polygraphy's Comparator and our vectorised rule (used per layer) agree.
    assert r["outputs"]["last_hidden_state"]["polygraphy_passed"] is False
    first = r["per_layer"]["first_divergence"]
    assert first["layer"] == 0
    assert r["per_layer"]["layers"][0]["layer"] == "embeddings" and r["per_layer"]["layers"][0]["failing"] == 0
    sites = r["gpcl_sites"]["candidate"]
    assert len(sites) == 12 and all(s["bounded"] and s["frac_groups_changed"] == 1.0 for s in sites)
    assert all(s["max_radius_after"] <= 0.01 * (1 + 1e-5) for s in sites)
    for f in ("report.md", "report.json", "layer_errors.png", "radii_candidate.png"):
        assert (rep / f).stat().st_size > 0
    assert "First divergence: layer **0**" in (rep / "report.md").read_text()
    assert json.loads((rep / "report.json").read_text())["per_layer"]["first_divergence"]["layer"] == 0
    # The report is never overwritten without --force.
    again = CliRunner().invoke(
        main, ["diff", "--reference", str(minilm_onnx), "--candidate", str(minilm_onnx), "--report", str(rep)]
    )
    assert again.exit_code == 2 and "--force" in again.output


def test_pytorch_vs_onnx_and_golden_round_trip(minilm_dir, minilm_onnx, gpcl_pair, tmp_path):
    golden = tmp_path / "golden.json"
    tol = {"atol": 1e-4, "rtol": 1e-4}
    r = diff(minilm_dir, minilm_onnx, save_golden_path=golden, **tol, **SMALL)
    assert r["reference_kind"] == "torch" and r["ok"], r["summary"]
    assert 0 < r["outputs"]["last_hidden_state"]["max_abs"] < 1e-4
    assert golden.exists() and golden_inputs_path(golden).exists()
    # Recorded text from the model's tokenizer, padded to the sequence length: [CLS] first.
    feeds = inp.load_inputs(tmp_path / "golden.inputs.json")
    assert len(feeds) == 2 and feeds[0]["input_ids"][0, 0] == 101

    g = diff(golden=golden, candidate=minilm_onnx, **tol)
    assert g["ok"] == r["ok"] and g["reference_kind"] == "golden"
    assert g["outputs"]["last_hidden_state"]["max_abs"] == r["outputs"]["last_hidden_state"]["max_abs"]
    bad = diff(golden=golden, candidate=gpcl_pair["tiny"], **tol)
    assert bad["ok"] is False
    with pytest.raises(GpclError, match="--force"):
        diff(minilm_onnx, minilm_onnx, save_golden_path=golden, **SMALL)


def test_decoder_logits_metrics(tiny_llama_dir, exports, tmp_path):
    """A decoder with past key/values: PyTorch vs ONNX agree on logits (top-1/top-5/KL), and a
    clamping GPCL moves the next-token distribution, which the logits metrics show."""
    from gpcl_trt.passes import insert_file

    onnx_path, exported = exports("llama", "text-generation-with-past")
    assert exported["ok"], exported
    r = diff(tiny_llama_dir, onnx_path, samples=1, seq=8)
    assert r["ok"], r["summary"]
    logits = r["outputs"]["logits"]
    assert logits["top1"] == 1.0 and logits["top5"] == 1.0 and logits["kl"] < 1e-9
    assert any(name.startswith("present.") for name in r["outputs"])

    gpcl = tmp_path / "llama_gpcl.onnx"
    assert insert_file(onnx_path, gpcl, mode="clamp", tau=0.01)["ok"]
    bad = diff(onnx_path, gpcl, samples=1, seq=8)["outputs"]["logits"]
    assert not bad["passed"] and bad["kl"] > 1e-6 and bad["cosine"] < 1.0


# ----------------------------------------------------------------------------- bad input
def test_mismatched_inputs_are_one_line_exit_2(minilm_onnx, tmp_path):
    other = _tiny_model(tmp_path / "other.onnx", "x", [1, 4])
    with pytest.raises(GpclError, match="input names differ"):
        diff(minilm_onnx, other)
    a = _tiny_model(tmp_path / "a.onnx", "x", [1, 4])
    b = _tiny_model(tmp_path / "b.onnx", "x", [1, 8])
    res = CliRunner().invoke(main, ["diff", "--reference", str(a), "--candidate", str(b), "--json"])
    assert res.exit_code == 2
    assert "input x: shape [1, 4] (reference) vs [1, 8] (candidate)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert json.loads(res.stdout)["ok"] is False
    # An inputs file that does not fit the model: one line, before anything runs.
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros((1, 4), np.int64))
    with pytest.raises(GpclError, match="inputs sample 0 has"):
        diff(a, a, inputs=tmp_path / "bad.npz")
    np.savez(tmp_path / "good.npz", x=np.ones((1, 4), np.float32))
    assert diff(a, a, inputs=tmp_path / "good.npz")["ok"]


def test_engine_without_gpu_is_a_clear_error(tmp_path, minilm_onnx):
    from gpcl_trt.accuracy.runners import _trt_module
    from gpcl_trt.engines.inspection import gpu_present

    if gpu_present() and _trt_module():
        pytest.skip("a GPU and TensorRT are present: the engine path is exercised instead")
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"not an engine")
    with pytest.raises(GpclError, match="needs a GPU and TensorRT"):
        diff(minilm_onnx, eng)


def test_bad_arguments(minilm_dir, minilm_onnx, tmp_path):
    with pytest.raises(GpclError, match="exactly one of"):
        diff(None, minilm_onnx)
    with pytest.raises(GpclError, match="cannot be combined with --per-layer"):
        diff(golden=minilm_onnx, candidate=minilm_onnx, per_layer=True)
    with pytest.raises(GpclError, match="--per-layer needs an .onnx model on both sides"):
        diff(minilm_dir, minilm_onnx, per_layer=True)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(GpclError, match="expected a model dir"):
        diff(minilm_onnx, tmp_path / "x.txt")
    for tol in ({"atol": -1.0}, {"rtol": -1e-3}, {"atol": float("nan")}):
        with pytest.raises(GpclError, match="--atol and --rtol must be >= 0"):
            diff(minilm_onnx, minilm_onnx, **tol)


# ----------------------------------------------------------------------------- inputs, metrics
def test_inputs_npz_and_polygraphy_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 9, (1, 5)), "attention_mask": np.ones((1, 5), np.int64)} for _ in range(3)]
    np.savez(tmp_path / "one.npz", **feeds[0])
    np.savez(tmp_path / "many.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    inp.save_inputs_json(feeds, tmp_path / "feeds.json")
    for path, n in (("one.npz", 1), ("many.npz", 3), ("feeds.json", 3)):
        got = inp.load_inputs(tmp_path / path)
        assert len(got) == n
        for g, f in zip(got, feeds):
            assert set(g) == set(f) and all(np.array_equal(g[k], f[k]) for k in f)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(GpclError):
        inp.load_inputs(tmp_path / "bad.json")
    (tmp_path / "feeds.txt").write_text("x")
    with pytest.raises(GpclError, match="unsupported"):
        inp.load_inputs(tmp_path / "feeds.txt")


def test_logits_metrics():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 7, 50))
    same = mt.output_metrics("logits", ref, ref.copy())
    assert same["top1"] == 1.0 and same["top5"] == 1.0 and same["kl"] == pytest.approx(0, abs=1e-12)
    assert same["max_abs"] == 0 and same["cosine"] == pytest.approx(1.0)
    flipped = mt.output_metrics("logits", ref, -ref)
    assert (
        flipped["top1"] == 0.0
        and flipped["top5"] == 0.0
        and flipped["kl"] > 1
        and flipped["cosine"] == pytest.approx(-1.0)
    )
    # Shifting logits by a constant changes no probability: KL 0, top-k intact, abs error 3.
    shifted = mt.output_metrics("logits", ref, ref + 3.0)
    assert (
        shifted["kl"] == pytest.approx(0, abs=1e-9)
        and shifted["top1"] == 1.0
        and shifted["max_abs"] == pytest.approx(3.0)
    )
    agg = mt.aggregate([same, flipped])
    assert agg["top1"] == 0.5 and agg["cosine"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "scope,name,layer",
    [
        ("model.encoder.layer.3.attention.self.query", "", 3),
        ("model.model.layers.11.mlp", "", 11),
        ("transformer.h.0.attn", "", 0),
        ("model.embeddings.LayerNorm", "", None),
        ("", "/encoder/layer.2/attention/MatMul_output_0", 2),
    ],
)
def test_layer_of(scope, name, layer):
    assert mt.layer_of(scope, name) == layer


def test_site_stats_clamp_semantics():
    from gpcl_trt.plugins.reference import gpcl_numpy

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 16)) * np.array([0.1, 10.0] * 8)).astype(np.float32)
    y = gpcl_numpy(x, 1.0, mode="clamp")
    st = mt.site_stats(x, y, np.asarray(1.0))
    r = np.linalg.norm(x.reshape(3, 4, 4), axis=-1)  # independent of the code under test
    assert st["frac_groups_changed"] == pytest.approx(np.mean(r > 1.0))
    assert st["bounded"] and st["max_radius_after"] <= 1.0 + 1e-6


def test_cli_help_names_every_option():
    for cmd in ("diff", "study"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0
        # Every option carries help text (click prints an option without help on a bare line).
        opts = [line for line in res.output.splitlines() if line.strip().startswith("-")]
        assert opts and all(len(line.split("  ")) > 1 and line.split("  ")[-1].strip() for line in opts), res.output


def test_a_json_that_is_not_golden_is_one_line(minilm_onnx, tmp_path):
    """polygraphy prints its own critical messages before raising; the CLI shows only ours."""
    bad = tmp_path / "g.json"
    bad.write_text('{"a": 1}')
    res = CliRunner().invoke(main, ["diff", "--golden", str(bad), "--candidate", str(minilm_onnx), "--json"])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("[W] 'colored'")]
    assert len(lines) == 1 and "is not a golden RunResults JSON" in lines[0], res.stderr
    assert json.loads(res.stdout)["exit_code"] == 2
