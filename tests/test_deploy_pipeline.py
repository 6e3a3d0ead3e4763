"""`gpcl-trt pipeline`: every stage for real (export or import, calibrate, insert, TRT-RTX
engine build, accuracy diff, Triton repository, served-model check on a live tritonserver),
reruns that skip unchanged stages, a failing stage that stops the run and keeps what was
built, and config errors caught before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpcl_trt.common import GpclError, read_manifest, sha256_file
from gpcl_trt.deploy import run_pipeline

pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
pytest.importorskip("pytriton", reason="needs tritonserver (nvidia-pytriton)")

# Small but complete: every stage runs, the served check sends a real (short) load.
FAST = """
[calibrate]
samples = 8
[diff]
samples = 2
seq = 8
[serve]
requests = 64
concurrency = 8
seq = 8
"""


def _config(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.slow  # every stage, TensorRT-RTX builds and a live tritonserver
def test_pipeline_from_exported_minilm(minilm_onnx, tmp_path):
    out = tmp_path / "out"
    cfg = _config(tmp_path, '[pipeline]\nname = "minilm"\n' + FAST)
    s = run_pipeline(minilm_onnx, out, config=cfg)
    assert s["ok"], s
    assert {k: v["status"] for k, v in s["stages"].items()} == dict.fromkeys(
        ["export", "calibrate", "insert", "build", "diff", "triton", "serve"], "done"
    )
    # Each stage's artifact and manifest are in OUT_DIR.
    for rel in ("model.onnx", "calib.json", "model_gpcl.onnx", "model_gpcl.engine", "accuracy.json", "served.json"):
        assert (out / rel).is_file() and read_manifest(out / rel) is not None, rel
    assert (out / "accuracy" / "report.md").is_file()
    for entry in ("minilm", "minilm_ort", "minilm_trt"):
        assert (out / "triton_repo" / entry / "config.pbtxt").is_file(), entry
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    report = (out / "report.md").read_text()
    assert "GPCL sites | 12 (clamp)" in report and "served (python backend) | ok" in report

    assert len(s["sites"]["inserted"]) == 12 and 0 < s["sites"]["tau_min"] <= s["sites"]["tau_max"]
    assert s["engine"]["size_bytes"] == (out / "model_gpcl.engine").stat().st_size > 1_000_000
    assert s["engine"]["backend"] == "tensorrt-rtx"
    # clamp with calibrated tau changes nothing on ordinary inputs.
    assert s["accuracy"]["passed"] and s["accuracy"]["max_abs"] < 1e-4
    assert s["served"]["ok"] and (s["served"]["completed"], s["served"]["errors"]) == (64, 0)
    assert s["served"]["http_max_abs_diff"] <= 1e-6

    # Rerun: every stage's inputs are unchanged, nothing is redone, same summary.
    engine_sha = sha256_file(out / "model_gpcl.engine")
    again = run_pipeline(minilm_onnx, out, config=cfg)
    assert {v["status"] for v in again["stages"].values()} == {"cached"}
    assert again["accuracy"] == s["accuracy"] and again["served"] == s["served"]

    # A changed build option reruns build; a failing build stops the run with its own
    # message, and what earlier stages wrote (and the previous engine) stays as it was.
    gpcl_sha = sha256_file(out / "model_gpcl.onnx")
    bad = _config(tmp_path, '[pipeline]\nname = "minilm"\n' + FAST + '[build]\nprecision = "fp7"\n', "bad.toml")
    with pytest.raises(GpclError, match=r"^stage build failed: .*fp7"):
        run_pipeline(minilm_onnx, out, config=bad)
    assert sha256_file(out / "model_gpcl.onnx") == gpcl_sha
    assert sha256_file(out / "model_gpcl.engine") == engine_sha
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["build"]["status"] == "failed" and "fp7" in state["build"]["error"]

    # Skipping build (and serve): the repository loses its tensorrt entry, the rest is reused.
    skip = _config(tmp_path, '[pipeline]\nname = "minilm"\nskip = ["build", "serve"]\n' + FAST, "skip.toml")
    s3 = run_pipeline(minilm_onnx, out, config=skip)
    assert {k: v["status"] for k, v in s3["stages"].items()} == {
        "export": "cached",
        "calibrate": "cached",
        "insert": "cached",
        "build": "skipped (config)",
        "diff": "cached",
        "triton": "done",
        "serve": "skipped (config)",
    }
    assert sorted(p.name for p in (out / "triton_repo").iterdir()) == ["minilm", "minilm_ort"]
    assert s3["ok"] and s3["engine"]["size_bytes"] is None and s3["served"] == {}


def test_pipeline_from_an_export_linked_to_its_checkpoint(tiny_llama_dir, tmp_path):
    """A lazy export whose weights are links into the checkpoint (OUT.onnx.model.safetensors,
    the default above 256 MB) brings those files along into the pipeline's directory."""
    from gpcl_trt.exporter import export_model

    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    export_model(tiny_llama_dir, src, external_data="link", task="text-generation")
    assert (src.parent / "m.onnx.model.safetensors").is_file()
    cfg = _config(tmp_path, FAST + '[pipeline]\nskip = ["serve"]\n')
    summary = run_pipeline(src, tmp_path / "out", config=cfg)
    assert summary["ok"], summary["stages"]
    linked = tmp_path / "out" / "model.onnx.model.safetensors"  # the pipeline's model.onnx names its own links
    assert linked.is_file() and sha256_file(linked) == sha256_file(src.parent / "m.onnx.model.safetensors")
    again = run_pipeline(src, tmp_path / "out", config=cfg)["stages"]
    assert all(s["status"] in ("cached", "skipped (config)") for s in again.values()), again

    # The linked checkpoint file is part of the stage's key (not only an X.onnx.data sidecar):
    # replaced by other bytes, the rerun does not hit the cache; it reads the file's identity in
    # m.onnx's manifest and refuses in one line.
    data = src.parent / "m.onnx.model.safetensors"
    blob = bytearray(data.read_bytes())
    blob[-4:] = bytes(b ^ 0xFF for b in blob[-4:])
    tmp = data.with_name("replacement")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, data)
    with pytest.raises(GpclError, match="weight file replaced since m.onnx was written"):
        run_pipeline(src, tmp_path / "out", config=cfg)


@pytest.mark.slow  # every stage, TensorRT-RTX builds and a live tritonserver
def test_pipeline_from_model_dir_cli(tiny_llama_dir, tmp_path):
    """The whole path from a Hugging Face directory (a decoder with past key/values), through
    the CLI with --json; the accuracy reference is the PyTorch model itself."""
    from gpcl_trt.cli import main

    out = tmp_path / "demo"
    cfg = _config(tmp_path, '[pipeline]\nname = "tiny"\n' + FAST)
    res = CliRunner().invoke(main, ["pipeline", str(tiny_llama_dir), "-o", str(out), "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["ok"] and s["architecture"] == "llama"
    assert s["accuracy"]["passed"] and s["served"]["ok"]
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["reference_kind"] == "torch"
    assert "gpcl-trt pipeline: OK" in res.stderr  # the rich summary table goes to stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("[bogus]\nx = 1\n", r"unknown table \[bogus\]"),
        ('[build]\nprecison = "fp16"\n', r"\[build\] unknown option 'precison'"),
        ('[insert]\noutput = "x.onnx"\n', r"\[insert\] output is set by the pipeline"),
        ('[pipeline]\nskip = ["export"]\n', r"cannot skip \['export'\]"),
        ('[pipeline]\nname = "../up"\n', "invalid model name"),
        ("[calibrate\n", "not valid TOML"),
        ("pipeline = 3\n", r"pipeline must be a table"),
        ('[pipeline]\nskip = "build"\n', r"skip must be a list of stage names"),
        ('[triton]\nbackends = ["bogus"]\n', r"\[triton\] backends must be a non-empty list"),
        ("[quantize]\nbits = 4\n", r"\[quantize\] unknown option 'bits'; known: block_size, data, keep, lm_head"),
        ('[quantize]\noutput = "q.onnx"\n', r"\[quantize\] output is set by the pipeline"),
        ('[quantize]\nweights = "int3"\n', r"\[quantize\] weights must be one of int8, int4, got 'int3'"),
        ("[quantize]\nblock_size = 48\n", r"\[quantize\] block_size must be one of 32, 64, 128"),
        ('[quantize]\nsymmetric = "yes"\n', r"\[quantize\] symmetric must be true or false"),
        ('[quantize]\nkeep = "*mlp*"\n', r"\[quantize\] keep must be a list of glob patterns"),
    ],
)
def test_pipeline_config_errors(tmp_path, minilm_dir, text, message):
    out = tmp_path / "out"
    with pytest.raises(GpclError, match=message):
        run_pipeline(minilm_dir, out, config=_config(tmp_path, text))
    assert not out.exists()  # refused before any work


def test_pipeline_refuses_foreign_output_dir(tmp_path, minilm_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(GpclError, match="not a pipeline output directory; pass --force"):
        run_pipeline(minilm_dir, out)
    with pytest.raises(GpclError, match="neither a model directory nor an .onnx file"):
        run_pipeline(tmp_path / "nope", tmp_path / "out2")
    # Bad input that exists is refused before the output directory is created.
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(GpclError, match="has no config.json"):
        run_pipeline(tmp_path / "empty_dir", tmp_path / "out3")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(GpclError, match="is not a readable ONNX model"):
        run_pipeline(tmp_path / "garbage.onnx", tmp_path / "out4")
    assert not (tmp_path / "out3").exists() and not (tmp_path / "out4").exists()
    # Through the CLI the refusal is bad input: one line, exit 2 (a failed check exits 1).
    from gpcl_trt.cli import main

    res = CliRunner().invoke(main, ["pipeline", str(minilm_dir), "-o", str(out)])
    assert res.exit_code == 2 and res.stdout == "", res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("gpcl-trt pipeline: error: ") and "not a pipeline output directory" in line
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep"


def test_documented_config_is_valid(tmp_path):
    """The pipeline.toml example in docs/triton.md passes the same checks a user's would."""
    from gpcl_trt.deploy.pipeline import load_config

    doc = (Path(__file__).parent.parent / "docs" / "triton.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    name, skip, options = load_config(_config(tmp_path, block))
    assert name == "minilm_gpcl" and skip == ()
    assert options["serve"] == {"requests": 1000, "concurrency": 16}


def test_pipeline_quantize_stage(tiny_llama_dir, tmp_path):
    """[quantize] turns on the quantize stage: model_q.onnx (block-wise DequantizeLinear) is what
    calibrate and insert read, so the GPCL model, its engine and Triton entries are quantized; the
    diff's reference stays the PyTorch model. Reruns hit the cache; new quantize options rerun
    quantize and everything after it, not the export."""
    import onnx

    out = tmp_path / "out"
    # The diff's default tolerance is for one precision (1e-4): int8 weights need their own.
    base = FAST.replace("[diff]\n", "[diff]\natol = 0.05\n") + '[pipeline]\nskip = ["serve"]\n'
    cfg = _config(tmp_path, base + '[quantize]\nweights = "int8"\n')
    s = run_pipeline(tiny_llama_dir, out, config=cfg)
    assert s["ok"], s
    # Judged against PyTorch, the GPCL model shows what quantization changed (fp32 alone: < 1e-4).
    assert 1e-4 < s["accuracy"]["max_abs"] < 0.05 and s["accuracy"]["passed"]
    assert {k: v["status"] for k, v in s["stages"].items()} == {
        **dict.fromkeys(["export", "quantize", "calibrate", "insert", "build", "diff", "triton"], "done"),
        "serve": "skipped (config)",
    }
    assert list(s["stages"])[:3] == ["export", "quantize", "calibrate"]
    q = onnx.load(out / "model_q.onnx", load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert s["quantize"]["weights"] == "int8" and s["quantize"]["quantized"] > 0
    assert s["quantize"]["quantized_bytes"] < s["quantize"]["float_bytes"]
    for rel in ("calib.json", "model_gpcl.onnx"):
        assert Path(read_manifest(out / rel)["inputs"]["source"]).resolve() == (out / "model_q.onnx").resolve(), rel
    g = onnx.load(out / "model_gpcl.onnx", load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" for n in g.graph.node)
    assert json.loads((out / "accuracy.json").read_text())["reference_kind"] == "torch"
    assert "quantized weights | int8, block 32, symmetric" in (out / "report.md").read_text()

    again = run_pipeline(tiny_llama_dir, out, config=cfg)
    assert {v["status"] for v in again["stages"].values()} == {"cached", "skipped (config)"}, again["stages"]
    assert again["quantize"] == s["quantize"]

    # Other quantize options: quantize and every stage after it run again, the export does not.
    q_sha = sha256_file(out / "model_q.onnx")
    cfg64 = _config(tmp_path, base + '[quantize]\nweights = "int8"\nblock_size = 64\n', "q64.toml")
    s64 = run_pipeline(tiny_llama_dir, out, config=cfg64)
    assert {k: v["status"] for k, v in s64["stages"].items()} == {
        "export": "cached",
        **dict.fromkeys(["quantize", "calibrate", "insert", "build", "diff", "triton"], "done"),
        "serve": "skipped (config)",
    }
    assert sha256_file(out / "model_q.onnx") != q_sha and s64["quantize"]["block_size"] == 64

    # Without [quantize] the stage is not part of the run, and the GPCL stages read model.onnx again.
    plain = run_pipeline(tiny_llama_dir, out, config=_config(tmp_path, base, "plain.toml"))
    assert "quantize" not in plain["stages"] and plain["quantize"] == {}
    assert Path(read_manifest(out / "model_gpcl.onnx")["inputs"]["source"]).resolve() == (out / "model.onnx").resolve()
    g = onnx.load(out / "model_gpcl.onnx", load_external_data=False)
    assert not any(n.op_type == "DequantizeLinear" for n in g.graph.node)
    assert plain["accuracy"]["max_abs"] < 1e-4
