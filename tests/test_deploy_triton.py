"""`gpcl-trt triton`: repositories written from Triton's own ModelConfig schema, for the GPCL
MiniLM (python and onnxruntime backends) and a real TensorRT-RTX engine (tensorrt backend);
bad input is refused with one line and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpcl_trt.common import GpclError, read_manifest
from gpcl_trt.deploy import triton as tr
from gpcl_trt.deploy import write_triton_repo


def _tiny_onnx(path: Path) -> Path:
    """Embedding lookup masked by attention_mask: batch/sequence axes like an encoder export."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    emb = nh.from_array(np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32), "emb")
    axis = nh.from_array(np.array([-1], dtype=np.int64), "axis")
    nodes = [
        h.make_node("Gather", ["emb", "input_ids"], ["g"]),
        h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["m", "axis"], ["mu"]),
        h.make_node("Mul", ["g", "mu"], ["last_hidden_state"]),
    ]
    graph = h.make_graph(
        nodes,
        "tiny",
        [h.make_tensor_value_info(n, T.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [h.make_tensor_value_info("last_hidden_state", T.FLOAT, ["batch", "sequence", 8])],
        [emb, axis],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> Path:
    """A real engine, built by our engines area with TensorRT-RTX (builds without a GPU)."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
    from gpcl_trt.engines import build_engine

    d = tmp_path_factory.mktemp("tiny_engine")
    onnx_path = _tiny_onnx(d / "tiny.onnx")
    result = build_engine(
        onnx_path, d / "tiny.engine", shapes=["input_ids:1x1,2x16,4x64", "attention_mask:1x1,2x16,4x64"]
    )
    assert result["ok"], result
    return d / "tiny.engine"


def test_python_repo_for_gpcl_minilm(minilm_gpcl_onnx, tmp_path):
    import onnx
    import onnxruntime as ort

    r = write_triton_repo(minilm_gpcl_onnx, tmp_path / "repo", "gpcl_minilm", backend="python", dynamic_batching=True)
    model_dir = tmp_path / "repo" / "gpcl_minilm"
    assert {p.name for p in model_dir.iterdir()} == {"1", "config.pbtxt", "config.pbtxt.manifest.json", "README.md"}
    assert {p.name for p in (model_dir / "1").iterdir()} == {"model.py", "model.onnx"}

    cfg = tr.parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.platform == "" and cfg.max_batch_size == 8
    assert cfg.HasField("dynamic_batching")
    assert [(i.name, i.dims) for i in cfg.input] == [
        ("input_ids", [-1]),
        ("attention_mask", [-1]),
        ("token_type_ids", [-1]),
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("last_hidden_state", [-1, 384])]
    from tritonclient.grpc import model_config_pb2 as mc

    assert {i.data_type for i in cfg.input} == {mc.TYPE_INT64} and cfg.output[0].data_type == mc.TYPE_FP32
    assert cfg.parameters["onnx_file"].string_value == "model.onnx"
    assert Path(cfg.parameters["gpcl_python_path"].string_value.split(":")[0]).is_dir()

    # The served copy carries the GPCL function bodies and computes what the source does.
    served = onnx.load(model_dir / "1" / "model.onnx")
    assert any(n.domain == "gpcl" for n in served.graph.node)
    assert any(f.domain == "gpcl" for f in served.functions)
    feeds = {
        "input_ids": np.array([[101, 2023, 2003, 102]], np.int64),
        "attention_mask": np.ones((1, 4), np.int64),
        "token_type_ids": np.zeros((1, 4), np.int64),
    }
    a = ort.InferenceSession(str(minilm_gpcl_onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    b = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[
        0
    ]
    np.testing.assert_array_equal(a, b)

    manifest = read_manifest(model_dir / "config.pbtxt")
    assert manifest["stage"] == "triton" and manifest["options"]["backend"] == "python"
    assert r["config_text"] == (model_dir / "config.pbtxt").read_text()


def test_onnxruntime_repo_options(minilm_gpcl_onnx, tmp_path):
    r = write_triton_repo(minilm_gpcl_onnx, tmp_path / "repo", "ort", max_batch_size=0, instances=3)
    assert r["backend"] == "onnxruntime"  # the default for an .onnx artifact
    cfg = tr.parse_config(Path(r["config"]).read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
    assert cfg.instance_group[0].count == 3 and not cfg.HasField("dynamic_batching")
    # Without batching, Triton's dims include the batch axis.
    assert list(cfg.output[0].dims) == [-1, -1, 384]
    assert Path(r["model_file"]).name == "model.onnx"


def test_tensorrt_repo_for_a_real_engine(tiny_engine, tmp_path):
    plugin = tmp_path / "libgpcl_plugin.so"  # a file to ship; TensorRT would load it, Triton copies it
    plugin.write_bytes(b"\x7fELF stand-in library file")
    r = write_triton_repo(tiny_engine, tmp_path / "repo", "tiny_trt", plugin_lib=plugin)
    assert r["backend"] == "tensorrt"  # the default for an engine
    model_dir = Path(r["model_dir"])
    assert (model_dir / "1" / "model.plan").read_bytes() == tiny_engine.read_bytes()
    assert (model_dir / "1" / "libgpcl_plugin.so").read_bytes() == plugin.read_bytes()
    cfg = tr.parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert cfg.parameters["gpcl_plugin_library"].string_value == "1/libgpcl_plugin.so"
    # I/O came from the ONNX model named in the engine's manifest.
    assert [i.name for i in cfg.input] == ["input_ids", "attention_mask"]
    assert list(cfg.output[0].dims) == [-1, 8]
    assert cfg.max_batch_size == 4  # the engine profile allows batch 1..4, not the default 8
    readme = (model_dir / "README.md").read_text()
    assert "--backend-config=tensorrt,plugins=" in readme and "LD_PRELOAD" in readme


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "..", "a\\b", "x" * 200, "a b"])
def test_bad_model_names(tmp_path, name):
    with pytest.raises(GpclError, match="invalid model name"):
        write_triton_repo(_tiny_onnx(tmp_path / "t.onnx"), tmp_path / "repo", name)
    assert not any((tmp_path / "repo").glob("*")) if (tmp_path / "repo").exists() else True


def test_refusals_leave_nothing_behind(tmp_path, monkeypatch):
    art = _tiny_onnx(tmp_path / "t.onnx")
    repo = tmp_path / "repo"
    first = write_triton_repo(art, repo, "m")
    before = Path(first["config"]).read_text()
    with pytest.raises(GpclError, match="exists; pass --force"):
        write_triton_repo(art, repo, "m", instances=2)
    assert Path(first["config"]).read_text() == before
    for kwargs, message in [
        ({"backend": "tensorrt"}, "is an ONNX model"),
        ({"plugin_lib": str(art)}, "only applies to --backend tensorrt"),
        ({"dynamic_batching": True, "max_batch_size": 0}, "needs --max-batch-size > 0"),
        ({"backend": "nope"}, "unknown backend"),
    ]:
        with pytest.raises(GpclError, match=message):
            write_triton_repo(art, repo, "n", **kwargs)
    with pytest.raises(GpclError, match="does not exist"):
        write_triton_repo(tmp_path / "missing.onnx", repo, "n")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(GpclError, match="is not a readable ONNX model"):
        write_triton_repo(garbage, repo, "n")
    with pytest.raises(GpclError, match="is not a readable ONNX model"):
        write_triton_repo(garbage, tmp_path / "fresh_repo", "n")
    assert not (tmp_path / "fresh_repo").exists()

    # A failure while the model directory is being filled leaves neither it nor a temp dir,
    # and --force over an existing entry keeps the old one until the new one is complete.
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tr, "_save_onnx", boom)
    with pytest.raises(OSError):
        write_triton_repo(art, repo, "n")
    with pytest.raises(OSError):
        write_triton_repo(art, repo, "m", force=True, instances=2)
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    assert Path(first["config"]).read_text() == before
    monkeypatch.undo()
    r = write_triton_repo(art, repo, "m", force=True, instances=2)
    assert tr.parse_config(Path(r["config"]).read_text()).instance_group[0].count == 2
    assert sorted(p.name for p in repo.iterdir()) == ["m"]


def test_no_batch_axis_needs_max_batch_size_0(tmp_path):
    import onnx

    art = _tiny_onnx(tmp_path / "t.onnx")
    m = onnx.load(art)
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, art)
    r = write_triton_repo(art, tmp_path / "repo", "fixed")
    assert r["max_batch_size"] == 0  # auto: no dynamic leading axis
    with pytest.raises(GpclError, match="no dynamic leading batch axis"):
        write_triton_repo(art, tmp_path / "repo", "fixed2", max_batch_size=4)


def test_cli_triton(tmp_path):
    from gpcl_trt.cli import main

    art = _tiny_onnx(tmp_path / "t.onnx")
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "triton",
            str(art),
            "--repo",
            str(tmp_path / "repo"),
            "--name",
            "m",
            "--backend",
            "python",
            "--dynamic-batching",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and out["backend"] == "python" and Path(out["model_dir"]).is_dir()
    res = runner.invoke(main, ["triton", str(art), "--repo", str(tmp_path / "repo"), "--name", "m"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        f"gpcl-trt triton: error: {tmp_path / 'repo' / 'm'} exists; pass --force to overwrite it"
    ]
    res = runner.invoke(main, ["triton", str(art), "--repo", str(tmp_path / "repo"), "--name", "../evil"])
    assert res.exit_code == 2 and not (tmp_path / "evil").exists()
    for cmd in (["triton", "--help"], ["pipeline", "--help"]):
        res = runner.invoke(main, cmd)
        assert res.exit_code == 0 and "--force" in res.output and "--json" in res.output


def test_plugin_engine_needs_its_library(tiny_engine, tmp_path):
    """An engine whose manifest records GPCL plugin layers is refused without its library,
    and gets the library recorded at build time when that still exists."""
    import shutil

    from gpcl_trt.common import sha256_file, write_manifest
    from gpcl_trt.manifest import Manifest, engine_inputs, file_ref

    # The build's own manifest writer with a plugin build's sections (a plugin build itself
    # needs full TensorRT): the reader must find the library where the writer put it.
    engine = tmp_path / "plugin.engine"
    shutil.copyfile(tiny_engine, engine)
    built = Manifest.read(tiny_engine)
    lib = tmp_path / "libgpcl_plugin.so"
    lib.write_bytes(b"\x7fELF stand-in library file")
    results = {**built.results, "gpcl": {"implementation": "plugin", "plugin_layers": 2, "nodes_as_plugin": ["a", "b"]}}
    write_manifest(
        engine, "build", engine_inputs(built.inputs["onnx"], file_ref(lib, sha256_file(lib))), built.options, results
    )
    lib_copy = lib.read_bytes()
    lib.unlink()
    with pytest.raises(GpclError, match="built with the GPCL TensorRT plugin; pass its library"):
        write_triton_repo(engine, tmp_path / "repo", "p")
    lib.write_bytes(lib_copy)
    r = write_triton_repo(engine, tmp_path / "repo", "p")
    assert Path(r["plugin_lib"]).read_bytes() == lib.read_bytes()
