"""Passes on a model whose weights are external data: sites, calibrate, insert and strip read the
graph only; their outputs read hard links of the source's weight file under their own names and
compute what the same passes give on the self-contained model."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_passes import toy_transformer  # noqa: E402  (tests/ is on sys.path under pytest)

from gpcl_trt.feeds import complete_feed, specs_from_session
from gpcl_trt.passes import calibrate_file, insert_file, sites_file, strip_file


def _outputs(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, complete_feed(specs_from_session(sess), {"input_ids": ids}))


@pytest.fixture
def models(tmp_path):
    """The same toy decoder twice: self-contained, and with every weight in ext.onnx.data."""
    model = toy_transformer(d=192, norm="rms")  # weights above the small-constant size, so they stay external
    inline, ext = tmp_path / "inline.onnx", tmp_path / "ext.onnx"
    onnx.save(model, inline)
    onnx.save(
        model, ext, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0
    )
    return inline, ext


def test_passes_reference_the_weights_and_match_the_inline_model(models, tmp_path):
    inline, ext = models
    data = tmp_path / "ext.onnx.data"
    assert ext.stat().st_size < data.stat().st_size / 10
    assert sites_file(ext)["sites"] == sites_file(inline)["sites"]

    ci, ce = tmp_path / "ci.json", tmp_path / "ce.json"
    calibrate_file(inline, ci, samples=3)
    calibrate_file(ext, ce, samples=3)
    taus = [{k: v["tau"] for k, v in json.loads(p.read_text())["sites"].items()} for p in (ci, ce)]
    assert taus[0] == taus[1]

    # Beside the source: a hard link under the output's own name, no weight bytes written; the
    # manifest records the identity of the weights it reads.
    gi, ge = tmp_path / "gi.onnx", tmp_path / "ge.onnx"
    insert_file(inline, gi, tau=0.5)
    res = insert_file(ext, ge, tau=0.5)
    manifest = json.loads((tmp_path / "ge.manifest.json").read_text())
    assert manifest["results"]["external_data"] == {"ge.onnx.data": "hardlink"} and res["ok"]
    assert os.path.samefile(tmp_path / "ge.onnx.data", data)
    assert manifest["weight_files"]["ge.onnx.data"]["size"] == data.stat().st_size
    assert ge.stat().st_size < data.stat().st_size / 10
    ids = np.random.default_rng(0).integers(1, 50, (2, 9), dtype=np.int64)
    for a, b in zip(_outputs(gi, ids), _outputs(ge, ids)):
        np.testing.assert_array_equal(a, b)

    # Elsewhere: a hard link to the same weights, no copy; strip gives the original back.
    other = tmp_path / "other"
    other.mkdir()
    strip_file(ge, other / "s.onnx")
    linked = other / "s.onnx.data"
    assert os.path.samefile(linked, data) and data.stat().st_nlink == 3
    assert json.loads((other / "s.manifest.json").read_text())["results"]["external_data"] == {
        "s.onnx.data": "hardlink"
    }
    for a, b in zip(_outputs(inline, ids), _outputs(other / "s.onnx", ids)):
        np.testing.assert_array_equal(a, b)
    # Passes on a model whose weights are a hard link (onnx's own loader and checker refuse
    # those): calibrate and insert again, same result as on the self-contained model.
    calibrate_file(other / "s.onnx", other / "c.json", samples=3)
    insert_file(other / "s.onnx", other / "g.onnx", tau=0.5)
    for a, b in zip(_outputs(gi, ids), _outputs(other / "g.onnx", ids)):
        np.testing.assert_array_equal(a, b)


def test_a_missing_weight_file_is_one_clear_error(models, tmp_path):
    from gpcl_trt.common import GpclError

    _, ext = models
    (tmp_path / "ext.onnx.data").rename(tmp_path / "moved.data")
    with pytest.raises(GpclError, match="external weight file is missing|cannot load"):
        insert_file(ext, tmp_path / "g.onnx", tau=0.5)
    assert not (tmp_path / "g.onnx").exists()


def test_engine_build_reads_external_weights_in_place(models, tmp_path):
    """A GPCL model whose weights are external builds with TensorRT-RTX from the graph rewritten
    beside them (flat GPCL body): no copy of the weights is written anywhere next to it."""
    from gpcl_trt.engines import build_engine

    _, ext = models
    insert_file(ext, tmp_path / "g.onnx", tau=0.5)
    before = {p.name for p in tmp_path.iterdir()}
    res = build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", backend="tensorrt-rtx")
    assert res["ok"] and res["gpcl"]["implementation"] == "native"
    assert {p.name for p in tmp_path.iterdir()} - before == {"g.engine", "g.engine.manifest.json"}
    assert res["engine_bytes"] > 0


def test_weight_stripped_plan_needs_a_gpu_to_build_here(models, tmp_path):
    """A refittable (weight-stripped) plan is JIT-compiled on the device by TensorRT-RTX: without
    a GPU the build is refused up front in one line, and nothing is written."""
    from gpcl_trt.common import GpclError
    from gpcl_trt.engines import build_engine
    from gpcl_trt.engines.inspection import gpu_present

    if gpu_present():
        pytest.skip("has a GPU: test_engines_load.py builds, refits and runs a stripped plan")
    _, ext = models
    with pytest.raises(GpclError, match="--strip-weights needs a CUDA GPU"):
        build_engine(ext, tmp_path / "w.engine", backend="tensorrt-rtx", strip_weights=True)
    assert not (tmp_path / "w.engine").exists()


def test_triton_refuses_a_weight_stripped_plan(tmp_path):
    """Triton's TensorRT backend cannot refit: a plan whose build manifest says its weights are
    stripped is refused, and the repository is not touched."""
    from gpcl_trt.common import GpclError, write_manifest
    from gpcl_trt.deploy import write_triton_repo
    from gpcl_trt.manifest import engine_inputs, engine_weights, file_ref

    engine = tmp_path / "w.engine"
    engine.write_bytes(b"plan")
    write_manifest(
        engine,
        "build",
        engine_inputs(file_ref(tmp_path / "m.onnx", None)),
        {"strip_weights": True},
        {"weights": engine_weights(True, tmp_path / "m.onnx")},
    )
    with pytest.raises(GpclError, match="weight-stripped plan"):
        write_triton_repo(engine, tmp_path / "repo", "w", backend="tensorrt")
    assert not (tmp_path / "repo").exists()


def test_diff_runs_external_weights_where_they_are(models, tmp_path):
    """diff reads a model's graph only and lets ONNX Runtime read the weights from their file:
    the external-data model and its self-contained twin agree bit for bit."""
    from gpcl_trt.accuracy import diff

    inline, ext = models
    res = diff(reference=inline, candidate=ext, samples=2, seq=8, atol=0.0, rtol=0.0)
    assert res["ok"], res
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_large_weights_take_the_bounded_paths(models, tmp_path, monkeypatch):
    """Above gpcl.LARGE_WEIGHT_BYTES a pass checks the graph with the ONNX checker alone (an ORT
    session would read every weight) and calibrate runs a bounded ORT session; both still work."""
    import gpcl_trt.gpcl

    _, ext = models
    monkeypatch.setattr(gpcl_trt.gpcl, "LARGE_WEIGHT_BYTES", 0)
    res = calibrate_file(ext, tmp_path / "c.json", samples=2)
    assert all(v["tau"] > 0 for v in res["sites"].values())
    insert_file(ext, tmp_path / "g.onnx", calibration=tmp_path / "c.json")
    assert json.loads((tmp_path / "g.manifest.json").read_text())["results"]["ort_check"] is False
    ids = np.random.default_rng(1).integers(1, 50, (1, 6), dtype=np.int64)
    assert all(np.isfinite(o).all() for o in _outputs(tmp_path / "g.onnx", ids))
