"""Encoder-decoder exports downstream (no server): ``gpcl-trt triton`` on the export directory and on
GPCL-inserted copies of its two graphs (--encoder), the refusals (a decoder alone, a wrong
--encoder: one line, nothing written), the engine profiles (a merged decoder's first step with an
empty cache) and real TensorRT-RTX builds of a tiny T5's two GPCL graphs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_seq2seq import make_checkpoint

from gpcl_trt.common import GpclError


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """(export directory, directory of GPCL copies under other names)."""
    from gpcl_trt.exporter import export_model
    from gpcl_trt.passes import insert_file

    base = tmp_path_factory.mktemp("s2s_deploy")
    assert export_model(make_checkpoint("t5", base / "t5"), base / "onnx")["ok"]
    gpcl = base / "gpcl"
    gpcl.mkdir()
    for f in ("encoder_model", "decoder_model_merged"):
        assert insert_file(base / "onnx" / f"{f}.onnx", gpcl / f"{f}.gpcl.onnx", tau=1.0)["inserted"]
    return base / "onnx", gpcl


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("gpcl-trt")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # the module's T5 export and GPCL copies (~40 s on 2 cores)
@pytest.mark.lane
def test_triton_on_the_export_directory(t5, tmp_path):
    from gpcl_trt.deploy.triton import parse_config

    onnx_dir, _ = t5
    repo = tmp_path / "repo"
    proc = _cli("triton", str(onnx_dir), "--repo", str(repo), "--name", "t5")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["t5_decoder", "t5_encoder", "t5_generate"]
    enc = parse_config((repo / "t5_encoder" / "config.pbtxt").read_text())
    dec = parse_config((repo / "t5_decoder" / "config.pbtxt").read_text())
    assert enc.platform == dec.platform == "onnxruntime_onnx" and enc.max_batch_size == 8
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask"]
    assert any(o.name == "present.0.encoder.key" for o in enc.output)
    assert any(i.name == "past_key_values.0.encoder.key" for i in dec.input)
    gen = parse_config((repo / "t5_generate" / "config.pbtxt").read_text())
    assert gen.parameters["encoder_file"].string_value == "encoder_model.onnx"
    assert gen.parameters["onnx_file"].string_value == "decoder_model_merged.onnx"
    files = {p.name for p in (repo / "t5_generate" / "1").iterdir()}
    assert {"encoder_model.onnx", "decoder_model_merged.onnx", "model.py", "tokenizer.json", "config.json"} <= files
    assert "t5_generate" in proc.stderr and "t5_encoder" in proc.stderr


@pytest.mark.slow
def test_triton_on_gpcl_copies_with_encoder(t5, tmp_path):
    from gpcl_trt.deploy import write_triton_repo

    _, gpcl = t5
    enc, dec = gpcl / "encoder_model.gpcl.onnx", gpcl / "decoder_model_merged.gpcl.onnx"
    r = write_triton_repo(dec, tmp_path / "repo", "g", encoder=enc)
    assert r["seq2seq"]["encoder"]["name"] == "g_encoder" and r["generate_model"]["name"] == "g_generate"
    doc = json.loads((tmp_path / "repo" / "g_generate" / "config.pbtxt.manifest.json").read_text())
    assert doc["inputs"]["encoder"]["path"] == str(enc) and doc["inputs"]["artifact"]["path"] == str(dec)
    # the GPCL nodes travel with their ONNX function bodies: ONNX Runtime runs the copied graphs
    import onnx

    model = onnx.load(str(tmp_path / "repo" / "g_generate" / "1" / "decoder_model_merged.onnx"))
    assert any(n.domain == "gpcl" for n in model.graph.node) and any(f.domain == "gpcl" for f in model.functions)


@pytest.mark.slow
def test_a_decoder_alone_gets_its_tensor_model_only(t5, tmp_path):
    from gpcl_trt.deploy import write_triton_repo

    onnx_dir, _ = t5
    r = write_triton_repo(onnx_dir / "decoder_model_merged.onnx", tmp_path / "repo", "dec")
    assert "encoder-decoder's decoder alone" in r["generate_model"]["reason"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["dec"]
    with pytest.raises(GpclError, match="--encoder FILE"):
        write_triton_repo(onnx_dir / "decoder_model_merged.onnx", tmp_path / "repo2", "dec", generate=True)
    assert not (tmp_path / "repo2").exists()


@pytest.mark.slow
def test_refusals_are_one_line_and_write_nothing(t5, tmp_path):
    onnx_dir, gpcl = t5
    repo = tmp_path / "repo"
    cases = [
        # the encoder given as --encoder's decoder and the other way round
        (str(onnx_dir / "encoder_model.onnx"), "--encoder", str(onnx_dir / "encoder_model.onnx")),
        (str(onnx_dir / "decoder_model_merged.onnx"), "--encoder", str(onnx_dir / "decoder_model_merged.onnx")),
        (str(gpcl),),  # a directory that is no export
        (str(onnx_dir), "--onnx", str(onnx_dir / "encoder_model.onnx")),
    ]
    for args in cases:
        proc = _cli("triton", *args, "--repo", str(repo), "--name", "x")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("gpcl-trt triton: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert not repo.exists()


def test_merged_decoder_profile_starts_at_an_empty_cache():
    from gpcl_trt.engines.profiles import make_profiles

    dec = [
        ("input_ids", ["batch", "sequence"]),
        ("encoder_attention_mask", ["batch", "encoder_sequence"]),
        ("past_key_values.0.decoder.key", ["batch", 4, "past_sequence", 8]),
        ("past_key_values.0.encoder.key", ["batch", 4, "encoder_sequence", 8]),
    ]
    p = make_profiles(dec, {})
    assert p["past_key_values.0.decoder.key"]["min"] == [1, 4, 0, 8]  # the first step: no past
    assert p["past_key_values.0.encoder.key"] == {"min": [1, 4, 1, 8], "opt": [4, 4, 128, 8], "max": [8, 4, 512, 8]}
    assert p["encoder_attention_mask"]["max"] == [8, 512]
    # a decoder-only LM keeps its profile (past from 1)
    assert make_profiles([("past_key_values.0.key", ["batch", 2, "past_sequence", 16])], {})["past_key_values.0.key"][
        "min"
    ] == [1, 2, 1, 16]


@pytest.mark.slow
def test_trt_rtx_builds_both_gpcl_graphs(t5, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX")
    _, gpcl = t5
    for f in ("encoder_model", "decoder_model_merged"):
        proc = _cli("build", str(gpcl / f"{f}.gpcl.onnx"), "-o", str(tmp_path / f"{f}.engine"))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads((tmp_path / f"{f}.engine.manifest.json").read_text())
        assert (tmp_path / f"{f}.engine").stat().st_size > 0, doc
    profiles = json.loads((tmp_path / "decoder_model_merged.engine.manifest.json").read_text())["results"]["profiles"]
    assert profiles[0]["past_key_values.0.decoder.key"]["min"][2] == 0


@pytest.mark.slow  # two tritonserver starts
def test_triton_check_serves_both_graphs(t5, tmp_path):
    onnx_dir, _ = t5
    proc = _cli("triton", str(onnx_dir), "--repo", str(tmp_path / "repo"), "--name", "t5", "--check", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] and set(result["served_check"]) == {"encoder", "decoder"}
    assert all(c["ok"] and c["http_max_abs_diff"] == 0 for c in result["served_check"].values())
    assert "encoder: served-model check ok" in proc.stderr and "decoder: served-model check ok" in proc.stderr
