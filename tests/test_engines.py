"""Engines: real TensorRT-RTX builds of the exported MiniLM and the GPCL MiniLM (fp32, fp16,
dynamic batch and sequence), the engine check, the layer summary, inspect, and bad inputs.

Each MiniLM engine is built once per module (a few seconds each on CPU) and shared."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main
from gpcl_trt.common import GpclError, sha256_file
from gpcl_trt.engines import build_engine, inspect_engine
from gpcl_trt.plugins.onnx_function import gpcl_model, iter_gpcl_nodes, make_gpcl_node

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install 'gpcl-trt[rtx]')")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def minilm_engines(minilm_onnx, minilm_gpcl_onnx, engine_dir):
    """(model, precision) -> build result, built on first use."""
    models = {"base": minilm_onnx, "gpcl": minilm_gpcl_onnx}
    built: dict[tuple[str, str], dict] = {}

    def get(model: str, precision: str) -> dict:
        key = (model, precision)
        if key not in built:
            out = engine_dir / f"minilm_{model}_{precision}.engine"
            built[key] = build_engine(models[model], out, backend="tensorrt-rtx", precision=precision)
        return built[key]

    return get


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


# ----------------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("model", ["base", "gpcl"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_minilm_engine_builds_and_checks(minilm_engines, minilm_onnx, minilm_gpcl_onnx, model, precision):
    res = minilm_engines(model, precision)
    engine = Path(res["engine"])
    src = {"base": minilm_onnx, "gpcl": minilm_gpcl_onnx}[model]
    assert res["ok"] and engine.stat().st_size == res["engine_bytes"] > 1 << 20
    assert res["backend"] == "tensorrt-rtx" and res["precision"] == precision
    # The TensorRT-RTX validity check ran on the written bytes and found a well-formed header.
    v = res["validity"]
    assert v["ok"] and v["sha256"] == sha256_file(engine)
    assert v["level"] in ("header", "device") and "MALFORMED_ENGINE" not in v["diagnostics"]
    # Dynamic batch and sequence on every input.
    (profile,) = res["profiles"]
    assert set(profile) == {"input_ids", "attention_mask", "token_type_ids"}
    for p in profile.values():
        assert p["min"] == [1, 1] and p["max"] == [8, 512] and p["min"] < p["opt"] < p["max"]
    # I/O as a server must feed it: int64 ids in, float32 hidden states out at every precision.
    assert [(t["name"], t["dtype"], t["shape"]) for t in res["io"]["inputs"]] == [
        (n, "INT64", [-1, -1]) for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert res["io"]["outputs"] == [{"name": "last_hidden_state", "dtype": "FLOAT", "shape": [-1, -1, 384]}]
    # The manifest records what built it, next to the engine.
    man = json.loads(Path(res["manifest"]).read_text())
    assert Path(res["manifest"]).name == engine.name + ".manifest.json"
    assert man["artifact_sha256"] == v["sha256"]
    assert man["inputs"]["onnx"]["sha256"] == sha256_file(src)
    r = man["results"]
    assert r["backend_version"] == trt_rtx.__version__ and r["engine_bytes"] == res["engine_bytes"]
    assert r["gpcl"]["implementation"] == ("native" if model == "gpcl" else "none")
    assert r["build_phases"] == res["build_phases"] and "Building engine" in r["build_phases"]
    assert r["profiles"] == res["profiles"] and r["network"]["num_layers"] > 100
    # Readable by the server process, not only by us (mkstemp makes 0600 files).
    assert engine.stat().st_mode & stat.S_IRGRP


def test_fp16_engine_holds_half_width_weights(minilm_engines):
    """TensorRT-RTX is strongly typed: fp16 means fp16 weights, about half the fp32 engine."""
    fp32, fp16 = minilm_engines("base", "fp32"), minilm_engines("base", "fp16")
    assert 0.4 < fp16["engine_bytes"] / fp32["engine_bytes"] < 0.65
    assert "strongly typed" in fp16["precision_mode"]


def test_gpcl_engine_layer_summary_shows_gpcl(minilm_engines, minilm_gpcl_onnx):
    model = onnx.load(str(minilm_gpcl_onnx), load_external_data=False)
    names = sorted(n.name for n in iter_gpcl_nodes(model.graph))
    assert len(names) == 12  # 6 layers x (pre-attention, pre-mlp)
    base, gpcl = minilm_engines("base", "fp32"), minilm_engines("gpcl", "fp32")
    g = gpcl["gpcl"]
    # Every GPCL node became network layers from its function body (the flat one the builder
    # swaps in), none a plugin.
    assert g["nodes"] == 12 and g["nodes_as_body"] == names and g["plugin_layers"] == 0
    assert g["implementation"] == "native" and g["function_body"] == "flat"
    assert g["body_layers"] >= 12 * 5  # cast, reshape, reduce, max/div/mul, reshape back...
    # The rest of the network is unchanged; the parser adds a few unattributed constant layers
    # (the body's scalar constants: tau, eps, the rescaling factors, shapes) on top of the
    # attributed body layers.
    extra = gpcl["network"]["num_layers"] - base["network"]["num_layers"] - g["body_layers"]
    assert 0 <= extra <= 8 * 12
    assert gpcl["network"]["by_type"]["MATRIX_MULTIPLY"] == base["network"]["by_type"]["MATRIX_MULTIPLY"]
    assert base["gpcl"]["nodes"] == 0 and base["gpcl"]["body_layers"] == 0
    assert minilm_engines("gpcl", "fp16")["gpcl"]["nodes_as_body"] == names
    # And in the built engines themselves: the plan carries each GPCL call's layer records.
    for precision in ("fp32", "fp16"):
        assert minilm_engines("gpcl", precision)["plan"]["gpcl_nodes"] == names
        assert minilm_engines("base", precision)["plan"]["gpcl_nodes"] == []
    assert gpcl["plan"]["onnx_layer_records"] > base["plan"]["onnx_layer_records"] > 100


def test_inspect_reports_manifest_and_check(minilm_engines):
    res = minilm_engines("gpcl", "fp16")
    direct = inspect_engine(res["engine"])
    assert direct["ok"] and direct["gpcl"] == res["gpcl"] and direct["profiles"] == res["profiles"]
    assert (
        direct["manifest"]["inputs"]["onnx"]["sha256"]
        == json.loads(Path(res["manifest"]).read_text())["inputs"]["onnx"]["sha256"]
    )
    code, out, err = _run("inspect", res["engine"], "--json")
    assert code == 0, err
    assert json.loads(out)["validity"] == direct["validity"]
    assert "gpcl     native: 12 nodes" in err and "precision fp16" in err
    assert direct["plan"] == res["plan"] and "GPCL calls present: 12" in err


def test_inspect_catches_a_damaged_engine(minilm_engines, tmp_path):
    good = Path(minilm_engines("base", "fp16")["engine"])
    data = bytearray(good.read_bytes())
    # A flipped byte in the body: the manifest's sha256 no longer matches (exit 1).
    body = tmp_path / "body.engine"
    body.write_bytes(bytes(data[:1000]) + bytes([data[1000] ^ 0xFF]) + bytes(data[1001:]))
    (tmp_path / "body.engine.manifest.json").write_text(Path(str(good) + ".manifest.json").read_text())
    code, out, _ = _run("inspect", str(body), "--json")
    assert code == 1 and json.loads(out)["validity"]["level"] == "bytes"
    # A broken header, no manifest: TensorRT-RTX itself rejects it.
    head = tmp_path / "head.engine"
    head.write_bytes(b"\0" * 4 + bytes(data[4:4096]))
    res = inspect_engine(head)
    assert not res["ok"] and "MALFORMED_ENGINE" in res["validity"]["diagnostics"]


# ----------------------------------------------------------------------------- small models
def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_shapes_override_moves_shared_axes(tmp_path):
    """--shapes on one input also sets the axes it names on the other inputs."""
    m = gpcl_model(["batch", "sequence", 64])
    x = m.graph.input[0]
    m.graph.input.append(onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["batch", "sequence", 64]))
    add = onnx.helper.make_node("Add", ["Y", "mask"], ["Z"], name="add_mask")
    m.graph.node.append(add)
    m.graph.output[0].name = "Z"
    assert x.name == "X"
    src = _save(m, tmp_path / "g.onnx")
    res = build_engine(src, tmp_path / "g.engine", backend="tensorrt-rtx", shapes=["X:2x3x64,4x16x64,6x32x64"])
    (profile,) = res["profiles"]
    want = {"min": [2, 3, 64], "opt": [4, 16, 64], "max": [6, 32, 64]}
    assert profile == {"X": want, "mask": want}
    assert res["gpcl"]["implementation"] == "native" and res["gpcl"]["nodes_as_body"] == ["gpcl/test"]


def test_external_data_model_builds_and_its_weights_are_recorded(tmp_path):
    m = gpcl_model(["batch", 64])
    w = onnx.numpy_helper.from_array(np.full((64,), 0.5, np.float32), "w")
    m.graph.initializer.append(w)
    m.graph.node.append(onnx.helper.make_node("Mul", ["Y", "w"], ["Z"], name="scale"))
    m.graph.output[0].name = "Z"
    src = tmp_path / "ext.onnx"
    onnx.save(m, str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    for precision in ("fp32", "fp16"):  # fp16 rewrites the model, with its weights, elsewhere
        res = build_engine(src, tmp_path / f"ext_{precision}.engine", backend="tensorrt-rtx", precision=precision)
        man = json.loads(Path(res["manifest"]).read_text())
        # The identity of the weight file the plan was built from (weightfiles' policy: a small
        # file is hashed whole); a plan that holds its weights reads no weight file later.
        (ident,) = man["inputs"]["onnx"]["external_data"].values()
        assert list(man["inputs"]["onnx"]["external_data"]) == ["ext.onnx.data"]
        assert ident["sha256"] == sha256_file(tmp_path / "ext.onnx.data") and ident["size"] == 64 * 4
        assert man["weight_files"] == {} and man["results"]["weights"] == {"stripped": False}
        assert res["gpcl"]["nodes_as_body"] == ["gpcl/test"]


@pytest.mark.parametrize("damage", ["deleted", "emptied", "truncated", "replaced"])
def test_weight_files_damaged_since_export_are_one_line_exit_2(tmp_path, damage):
    """The data file of an external-data model deleted, emptied, cut short or replaced (same
    size, other bytes) after the model was written: one line, exit 2, nothing written."""
    from gpcl_trt.common import write_manifest

    m = gpcl_model(["batch", 64])
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.full((64, 64), 0.5, np.float32), "w"))
    m.graph.node.append(onnx.helper.make_node("MatMul", ["Y", "w"], ["Z"], name="proj"))
    m.graph.output[0].name = "Z"
    src, data = tmp_path / "ext.onnx", tmp_path / "ext.onnx.data"
    onnx.save(m, str(src), save_as_external_data=True, location=data.name, size_threshold=0)
    write_manifest(src, "export", {}, {})  # records the identity of ext.onnx.data
    if damage == "deleted":
        data.unlink()
    elif damage == "emptied":
        data.write_bytes(b"")
    elif damage == "truncated":
        os.truncate(data, data.stat().st_size // 2)
    else:
        new = tmp_path / "new.data"
        new.write_bytes(np.full((64, 64), 0.25, np.float32).tobytes())
        os.replace(new, data)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run("build", str(src), "-o", str(tmp_path / "x.engine"), "--backend", "tensorrt-rtx")
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("gpcl-trt build: error: ") and "ext.onnx.data" in line
    assert {"deleted": "missing", "emptied": "emptied", "truncated": "truncated", "replaced": "replaced"}[
        damage
    ] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_full_disk_while_the_plan_streams_is_one_line_and_commits_nothing(tmp_path):
    """The plan's write fails part way (a file size limit: EFBIG, as ENOSPC on a full disk) in a
    real `gpcl-trt build` subprocess. The binding used to drop the write's OSError: a truncated
    engine was committed, exit 0."""
    import subprocess
    import sys

    src = _save(gpcl_model(["batch", "sequence", 64]), tmp_path / "g.onnx")
    out = tmp_path / "out"
    out.mkdir()
    child = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        "from gpcl_trt.cli import main\n"
        "main(sys.argv[1:], prog_name='gpcl-trt')\n"
    )
    cmd = [sys.executable, "-c", child, "build", str(src), "-o", str(out / "g.engine"), "--backend", "tensorrt-rtx"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("gpcl-trt build: error: cannot write the engine to ") and "File too large" in line
    assert list(out.iterdir()) == []


def test_mixed_gpcl_variants_build_and_are_found(tmp_path):
    """Two GPCL modes need two function overloads, which the parser ignores: the builder
    gives each variant its own function name, and the layer summary finds both nodes."""
    m = gpcl_model(["batch", 8], mode="clamp")
    m.graph.node.append(make_gpcl_node("Y", "Z", name="gpcl/hopf", mode="hopf", tau=2.0))
    m.graph.output[0].name = "Z"
    from gpcl_trt.plugins.onnx_function import attach_gpcl_functions

    src = _save(attach_gpcl_functions(m), tmp_path / "mixed.onnx")
    res = build_engine(src, tmp_path / "mixed.engine", backend="tensorrt-rtx")
    assert res["gpcl"]["nodes_as_body"] == ["gpcl/hopf", "gpcl/test"] and res["gpcl"]["body_layers"] > 10
    assert res["plan"]["gpcl_nodes"] == ["gpcl/hopf", "gpcl/test"]


def test_progress_monitor_sees_builder_phases(tmp_path, monkeypatch):
    from gpcl_trt.engines import monitor

    seen: list[list[str]] = []
    real_exit = monitor.BuildProgress.__exit__

    def spy(self, *exc):
        seen.append(list(self.phases))
        return real_exit(self, *exc)

    monkeypatch.setattr(monitor.BuildProgress, "__exit__", spy)
    res = build_engine(
        _save(gpcl_model(["batch", 16]), tmp_path / "p.onnx"), tmp_path / "p.engine", backend="tensorrt-rtx"
    )
    assert seen and seen[0][0] == "Building engine" and "Optimizing graph" in seen[0]
    # Phase times nest inside the whole build's (a fast machine may time a phase at 0.0).
    phases = res["build_phases"]
    assert 0 <= phases["Optimizing graph"] <= phases["Building engine"] <= res["build_seconds"]


def test_builder_options_timing_cache_workspace_opt_level(tmp_path):
    src = _save(gpcl_model(["batch", 16]), tmp_path / "t.onnx")
    code, out, err = _run(
        "build",
        str(src),
        "-o",
        str(tmp_path / "t.engine"),
        "--backend",
        "tensorrt-rtx",
        "--timing-cache",
        str(tmp_path / "cache.bin"),
        "--workspace",
        "64",
        "--opt-level",
        "1",
        "--json",
    )
    assert code == 0, err
    res = json.loads(out)
    # TensorRT-RTX documents timing caches as no-ops: said so, and no file is invented.
    assert "no-op" in res["timing_cache"] and not (tmp_path / "cache.bin").exists()
    options = json.loads(Path(res["manifest"]).read_text())["options"]
    assert options["workspace_mib"] == 64 and options["opt_level"] == 1 and res["validity"]["ok"]


def test_gpcl_node_without_tau_is_refused_before_parsing(tmp_path):
    """A GPCL node with neither a tau attribute nor a tau input: one clear error, no engine
    (the plugin would otherwise build with its default tau)."""
    model = gpcl_model(["b", 8], tau=0.5)
    node = next(iter_gpcl_nodes(model.graph))
    keep = [a for a in node.attribute if a.name != "tau"]
    del node.attribute[:]
    node.attribute.extend(keep)
    src = tmp_path / "no_tau.onnx"
    onnx.save(model, str(src))
    with pytest.raises(GpclError, match="neither a tau attribute nor a tau input"):
        build_engine(src, tmp_path / "no_tau.engine", backend="tensorrt-rtx")
    assert not (tmp_path / "no_tau.engine").exists()
    # The plugin build's model preparation (full TensorRT only, so called directly here) must
    # refuse it too, instead of handing the plugin a node without tau.
    from gpcl_trt.engines.build import prepared_model

    with pytest.raises(GpclError, match="neither a tau attribute nor a tau input"):
        with prepared_model(src, model, "plugin", False):
            pass


def test_lowering_keeps_a_tau_graph_input_float32():
    """tau is float32 by the spec: fp16 lowering must not round a tau fed as a graph input
    (1.0001 is not representable in fp16; rounded, clamp would bound at 1.0)."""
    import onnxruntime as ort

    from gpcl_trt.engines.precision import lower_precision
    from gpcl_trt.plugins.reference import gpcl_numpy

    low = lower_precision(gpcl_model(["b", 8], tau=None, tau_shape=[2]), "fp16")
    gpcl = next(iter_gpcl_nodes(low.graph))
    assert gpcl.input[1] == "tau"  # fed directly, no Cast to fp16 in between
    x = np.array([[0.0, 0.0, 0.0, 1.0001, 3.0, 4.0, 0.0, 0.0]], np.float32)
    tau = np.array([1.0001, 5.0], np.float32)
    (y,) = ort.InferenceSession(low.SerializeToString()).run(None, {"X": x, "tau": tau})
    ref = gpcl_numpy(x.astype(np.float16), tau, "clamp").astype(np.float32)
    np.testing.assert_array_equal(y, ref)


def test_lowered_fp16_model_matches_fp32_in_onnxruntime(minilm_gpcl_onnx):
    """The fp16 lowering the TensorRT-RTX fp16 build parses computes the same function
    (checked with ONNX Runtime on CPU, where the engine itself cannot run)."""
    import onnxruntime as ort

    from gpcl_trt.engines.precision import lower_precision

    model = onnx.load(str(minilm_gpcl_onnx))
    low = lower_precision(model, "fp16")
    onnx.checker.check_model(low)
    assert not [i.name for i in low.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and "tau" not in i.name]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30000, (2, 12), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feed["attention_mask"][1, 8:] = 0  # padding exercises the large-negative mask bias
    ref = ort.InferenceSession(str(minilm_gpcl_onnx)).run(None, feed)[0]
    out = ort.InferenceSession(low.SerializeToString()).run(None, feed)[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out - ref).max() < 2e-2, np.abs(out - ref).max()


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return _save(gpcl_model(["batch", "sequence", 8]), tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpcl", "plugin"], "--gpcl plugin needs --plugin-lib"),
        (
            ["--backend", "tensorrt-rtx", "--gpcl", "plugin", "--plugin-lib", "{lib}"],
            "tensorrt-rtx cannot load the GPCL plugin",
        ),
        (["--shapes", "nope:1x1x8"], "unknown input(s) nope"),
        (["--shapes", "X:4x1x8,2x1x8,8x1x8"], "axis 0 needs MIN <= OPT <= MAX"),
        (["--shapes", "X:1x1x8,2x2x8"], "give one shape or three"),
        (["--shapes", "X:1x1,2x2,4x4"], "rank 2, but the input has rank 3"),
        (["--shapes", "X:1x1x4,1x1x4,1x1x4"], "axis 2 is fixed at 8"),
        (["--workspace", "0"], "--workspace must be a positive"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tiny_onnx, tmp_path, args, message):
    lib = tmp_path / "libgpcl_plugin.so"
    lib.write_bytes(b"\x7fELF")  # refused before it is ever loaded
    out = tmp_path / "x.engine"
    code, _, err = _run("build", str(tiny_onnx), "-o", str(out), *[a.format(lib=lib) for a in args])
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == [lib]


def test_unparsable_onnx_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    code, out, err = _run("build", str(bad), "-o", str(tmp_path / "x.engine"), "--json")
    assert code == 2 and "is not a readable ONNX model" in err
    assert json.loads(out)["exit_code"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_parse_error_names_the_failing_node(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    node = onnx.helper.make_node("Frobnicate", ["x"], ["y"], name="my/odd_node", domain="nowhere")
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "g", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("nowhere", 1)],
    )
    src = _save(model, tmp_path / "odd.onnx")
    with pytest.raises(GpclError, match=r"cannot parse .*my/odd_node \(Frobnicate\)"):
        build_engine(src, tmp_path / "odd.engine", backend="tensorrt-rtx")
    assert not (tmp_path / "odd.engine").exists()


def test_existing_output_needs_force(tiny_onnx, tmp_path):
    out = tmp_path / "t.engine"
    out.write_bytes(b"keep me")
    code, _, err = _run("build", str(tiny_onnx), "-o", str(out))
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"
    code, out_json, err = _run("build", str(tiny_onnx), "-o", str(out), "--force", "--json")
    assert code == 0, err
    assert json.loads(out_json)["engine_bytes"] == out.stat().st_size


def test_missing_backend_names_the_extra(monkeypatch):
    import importlib

    from gpcl_trt.engines import backend

    real = importlib.import_module
    monkeypatch.setattr(backend, "_LOADED", {})
    monkeypatch.setattr(
        backend.importlib,
        "import_module",
        lambda n, *a: (_ for _ in ()).throw(ImportError(n)) if n.startswith("tensorrt") else real(n, *a),
    )
    with pytest.raises(GpclError, match=r"pip install 'gpcl-trt\[trt\]'"):
        backend.load_backend("tensorrt")
    with pytest.raises(GpclError, match=r"gpcl-trt\[rtx\]"):
        backend.load_backend("auto")


def test_help_documents_every_option():
    for cmd in ("build", "inspect"):
        code, out, _ = _run(cmd, "--help")
        assert code == 0
        for opt in {
            "build": [
                "--backend",
                "--gpcl",
                "--plugin-lib",
                "--precision",
                "--shapes",
                "--timing-cache",
                "--workspace",
                "--opt-level",
                "--force",
                "--json",
            ],
            "inspect": ["--json"],
        }[cmd]:
            assert opt in out


# ----------------------------------------------------------------------------- full TensorRT / GPU
def _plugin_lib() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    found = sorted(root.glob("build/gpcl/**/libgpcl*plugin*.so"))
    env = os.environ.get("GPCL_PLUGIN_LIB")
    return Path(env) if env else (found[0] if found else None)


# skipif, not importorskip in the body: the skip must not first build the session fixtures.
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")


@pytest.mark.tensorrt
@needs_tensorrt
def test_full_tensorrt_fp16_uses_builder_flag(tiny_onnx, tmp_path):
    res = build_engine(tiny_onnx, tmp_path / "t.engine", backend="tensorrt", precision="fp16")
    assert res["precision_mode"] == "builder flag FP16" and res["validity"]["ok"]


@pytest.mark.tensorrt
@needs_tensorrt
def test_full_tensorrt_plugin_build_has_plugin_layers(tmp_path_factory, request):
    lib = _plugin_lib()
    if lib is None:
        pytest.skip("needs the GPCL TensorRT plugin library (make kernel with TENSORRT_ROOT set)")
    minilm_gpcl_onnx = request.getfixturevalue("minilm_gpcl_onnx")
    tmp_path = tmp_path_factory.mktemp("plugin")
    res = build_engine(minilm_gpcl_onnx, tmp_path / "p.engine", backend="tensorrt", gpcl="plugin", plugin_lib=lib)
    g = res["gpcl"]
    assert g["implementation"] == "plugin" and g["plugin_layers"] == g["nodes"] == 12 and g["body_layers"] == 0
    man = json.loads(Path(res["manifest"]).read_text())
    assert man["inputs"]["plugin_lib"]["sha256"] == sha256_file(lib)


@pytest.mark.gpu
def test_engine_inspector_lists_built_layers_on_a_gpu(minilm_engines):
    from gpcl_trt.engines.inspection import gpu_present

    if not gpu_present():
        pytest.skip("needs a GPU")
    res = inspect_engine(minilm_engines("gpcl", "fp32")["engine"])
    assert res["validity"]["level"] == "device" and res["engine_layers"]["num_layers"] > 0


# ----------------------------------------------------------------------------- decoder with past
@pytest.fixture(scope="module")
def llama_onnx(exports) -> Path:
    out, result = exports("llama", "text-generation-with-past")  # shared with other areas
    assert result["ok"], result
    return out


def test_decoder_with_past_profiles_and_fp16(llama_onnx, tmp_path):
    """past_sequence and total_sequence get consistent defaults; fp16 lowering keeps a padded,
    cached decoder's outputs (checked in ONNX Runtime) and builds on TensorRT-RTX."""
    import onnxruntime as ort

    from gpcl_trt.engines.precision import lower_precision

    res = build_engine(llama_onnx, tmp_path / "llama.engine", backend="tensorrt-rtx", precision="fp16")
    (profile,) = res["profiles"]
    assert profile["attention_mask"] == {"min": [1, 2], "opt": [4, 256], "max": [8, 1024]}
    assert profile["past_key_values.0.key"]["max"][2] == 512 and res["validity"]["ok"]
    assert {t["dtype"] for t in res["io"]["outputs"]} == {"FLOAT"}  # float32 I/O kept

    rng = np.random.default_rng(0)
    b, s, p = 2, 5, 3
    feed = {
        "input_ids": rng.integers(0, 128, (b, s)).astype(np.int64),
        "attention_mask": np.ones((b, p + s), np.int64),
        "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1)),
    }
    feed["attention_mask"][1, :2] = 0
    for name in (i.name for i in ort.InferenceSession(str(llama_onnx)).get_inputs() if i.name.startswith("past")):
        feed[name] = rng.standard_normal((b, 2, p, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(llama_onnx)).run(None, feed)
    low = ort.InferenceSession(lower_precision(onnx.load(str(llama_onnx)), "fp16").SerializeToString()).run(None, feed)
    for r, o in zip(ref, low):
        assert o.dtype == np.float32 and np.abs(o - r).max() < 1e-2
