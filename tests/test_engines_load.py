"""The engine loader (engines/load.py), the one way runners, diff and generate get an engine: a
weight-stripped plan is refitted from the ONNX model its manifest names, prepared as the build
prepared it, and refused in one line when that model or its weights are gone or changed.

Without a GPU, TensorRT-RTX neither builds a refittable plan nor deserialises one, so the CPU
tests run the loader's decisions on the manifest a ``--strip-weights`` build writes (a real
build's manifest, marked stripped as that build marks it); the refit itself is the ``gpu`` test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main
from gpcl_trt.common import GpclError, sha256_file
from gpcl_trt.engines import build_engine
from gpcl_trt.engines.load import RefitSource, load_engine, refit_source
from gpcl_trt.manifest import Manifest, engine_weights
from gpcl_trt.plugins.onnx_function import gpcl_model

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install 'gpcl-trt[rtx]')")


def _ext_model(directory: Path, out_features: int = 256) -> Path:
    """X[batch, 64] -> GPCL -> MatMul W[64, out] -> Z, with W in external data (m.onnx.data)."""
    m = gpcl_model(["batch", 64])
    w = np.random.default_rng(0).standard_normal((64, out_features)).astype(np.float32)
    m.graph.initializer.append(onnx.numpy_helper.from_array(w, "W"))
    m.graph.node.append(onnx.helper.make_node("MatMul", ["Y", "W"], ["Z"], name="proj"))
    m.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("Z", onnx.TensorProto.FLOAT, ["batch", out_features]))
    src = directory / "m.onnx"
    onnx.save(m, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return src


def _mark_stripped(engine: Path) -> Manifest:
    """Rewrite a build manifest as the same build with --strip-weights writes it."""
    mpath = Path(str(engine) + ".manifest.json")
    doc = json.loads(mpath.read_text())
    doc["options"]["strip_weights"] = True
    doc["results"]["weights"] = engine_weights(True, doc["inputs"]["onnx"]["path"])
    mpath.write_text(json.dumps(doc))
    return Manifest.read(engine)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The external-data model and its fp32 and fp16 engines (real TensorRT-RTX builds)."""
    d = tmp_path_factory.mktemp("load")
    src = _ext_model(d)
    for precision in ("fp32", "fp16"):
        build_engine(src, d / f"{precision}.engine", backend="tensorrt-rtx", precision=precision)
    return d, src


def _stripped_copy(built, directory: Path, precision: str) -> Path:
    """A private copy of the model and of one engine, its manifest naming the copy and marked
    stripped (the copied weight file has another inode, the same bytes: still the same weights)."""
    d, _ = built
    for name in ("m.onnx", "m.onnx.data", f"{precision}.engine"):
        shutil.copy2(d / name, directory / name)
    doc = json.loads((d / f"{precision}.engine.manifest.json").read_text())
    doc["inputs"]["onnx"]["path"] = str(directory / "m.onnx")
    (directory / f"{precision}.engine.manifest.json").write_text(json.dumps(doc))
    _mark_stripped(directory / f"{precision}.engine")
    return directory / f"{precision}.engine"


@pytest.fixture
def stripped(built, tmp_path):
    return _stripped_copy(built, tmp_path, "fp16")


def test_a_plan_that_holds_its_weights_is_not_refitted(built, tmp_path):
    d, _ = built
    assert refit_source(d / "fp32.engine", Manifest.read(d / "fp32.engine")) is None
    assert refit_source(tmp_path / "x.engine", None) is None  # no manifest: nothing says it is stripped


def test_a_stripped_plan_is_refitted_from_its_model_prepared_as_the_build_did(built, stripped):
    d, src = built
    got = refit_source(stripped, Manifest.read(stripped))
    # TensorRT-RTX fp16 parsed the model lowered to fp16: the refit must see those weights too.
    assert got == RefitSource(
        onnx=stripped.parent / "m.onnx",
        gpcl="native",
        lower_to="fp16",
        weight_files={"m.onnx.data": got.weight_files["m.onnx.data"]},
    )
    assert got.weight_files["m.onnx.data"]["sha256"] == sha256_file(src.parent / "m.onnx.data")
    (stripped.parent / "fp32").mkdir()
    fp32 = _stripped_copy(built, stripped.parent / "fp32", "fp32")
    assert refit_source(fp32, Manifest.read(fp32)).lower_to is None


def test_a_stripped_plan_whose_onnx_is_missing_is_refused_in_one_line(stripped, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy2(tmp_path / "m.onnx", ref / "m.onnx")
    shutil.copy2(tmp_path / "m.onnx.data", ref / "m.onnx.data")
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(GpclError, match=r"weight-stripped plan .* refitted from .*m\.onnx, which is missing"):
        load_engine(stripped)
    r = CliRunner().invoke(main, ["diff", "--reference", str(ref / "m.onnx"), "--candidate", str(stripped)])
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("gpcl-trt diff: error: fp16.engine is a weight-stripped plan") and "m.onnx" in line


def test_a_stripped_plan_whose_model_changed_is_refused(stripped, tmp_path):
    onnx_path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    # The graph changed: its sha256 is not the one the plan was built from.
    original = onnx_path.read_bytes()
    graph = onnx.load(str(onnx_path), load_external_data=False)
    graph.doc_string = "edited"
    onnx.save(graph, str(onnx_path))
    with pytest.raises(GpclError, match="built from another version of .*m.onnx"):
        load_engine(stripped)
    # The graph is the same but the weights were replaced (a re-export under the same names).
    onnx_path.write_bytes(original)
    assert refit_source(stripped, Manifest.read(stripped)) is not None
    new = tmp_path / "new.data"
    new.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
    os.replace(new, data)
    with pytest.raises(GpclError, match=r"m\.onnx\.data: weight file replaced since fp16\.engine was written"):
        load_engine(stripped)


def test_an_engine_needs_a_gpu_to_load(built):
    from gpcl_trt.engines.inspection import gpu_present

    if gpu_present():
        pytest.skip("has a GPU: test_a_stripped_plan_is_refitted_at_load_on_a_gpu loads engines")
    d, _ = built
    with pytest.raises(GpclError, match=r"fp32\.engine: running an engine needs a GPU and TensorRT \(no CUDA GPU\)"):
        load_engine(d / "fp32.engine")


@pytest.mark.gpu
def test_a_stripped_plan_is_refitted_at_load_on_a_gpu(tmp_path):
    """Build the same model with and without --strip-weights; the stripped plan holds no weights
    (its refittable weights are listed, the plan is smaller by about W), the loader refits it
    from the ONNX model and it then computes what the full plan and ONNX Runtime compute."""
    import onnxruntime as ort

    from gpcl_trt.accuracy.runners import make_side
    from gpcl_trt.engines.inspection import gpu_present
    from gpcl_trt.engines.load import engine_backend

    if not gpu_present():
        pytest.skip("needs a GPU (a refittable plan is compiled and refitted on the device)")
    src = _ext_model(tmp_path, out_features=1024)
    w_bytes = (tmp_path / "m.onnx.data").stat().st_size
    full = build_engine(src, tmp_path / "full.engine", backend="tensorrt-rtx")
    stripped = build_engine(src, tmp_path / "w.engine", backend="tensorrt-rtx", strip_weights=True)
    assert full["engine_bytes"] - stripped["engine_bytes"] > w_bytes // 2
    man = Manifest.read(tmp_path / "w.engine")
    assert man.weights_stripped and man.source == src and man.inputs["onnx"]["sha256"] == sha256_file(src)

    be = engine_backend(tmp_path / "w.engine")
    runtime = be.trt.Runtime(be.logger.impl)
    raw = runtime.deserialize_cuda_engine((tmp_path / "w.engine").read_bytes())
    assert raw.refittable and be.trt.Refitter(raw, be.logger.impl).get_all_weights()
    del raw

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    outs = {}
    for name in ("full", "w"):
        side = make_side(tmp_path / f"{name}.engine", name)
        with side.runner:
            outs[name] = np.asarray(side.runner.infer({"X": x})["Z"])
    # Tolerances allow TF32 matmuls; a plan run without its weights is off by the outputs' size.
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(outs["w"], outs["full"], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(outs["w"], want, rtol=1e-2, atol=1e-2)
    # Without its model the stripped plan is refused, not run without weights.
    os.rename(src, tmp_path / "elsewhere.onnx")
    with pytest.raises(GpclError, match="which is missing"):
        load_engine(tmp_path / "w.engine")
