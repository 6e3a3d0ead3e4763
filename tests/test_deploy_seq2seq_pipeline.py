"""``gpcl-trt pipeline`` on a tiny random T5: every stage runs once per graph (export to model/,
calibrate and insert both graphs into model_gpcl/, one TensorRT-RTX engine per graph, each GPCL
graph diffed against its export plus a greedy decode of both pairs, the Triton repository with
the generate model, both tensor models checked in one tritonserver); a second run is all cached."""

from __future__ import annotations

import json

import pytest
from test_seq2seq import make_checkpoint

pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX")
pytest.importorskip("pytriton", reason="needs tritonserver (nvidia-pytriton)")
pytestmark = pytest.mark.slow  # export, two builds, a live tritonserver: ~90 s on 2 cores


def test_pipeline_runs_every_stage_per_graph(tmp_path):
    from gpcl_trt.deploy.pipeline import run_pipeline

    model = make_checkpoint("t5", tmp_path / "t5")
    out = tmp_path / "out"
    summary = run_pipeline(model, out)
    assert summary["ok"], summary
    assert set(summary["stages"]) == {"export", "calibrate", "insert", "build", "diff", "triton", "serve"}
    assert all(v["status"] == "done" for v in summary["stages"].values()), summary["stages"]
    for g, f in (("encoder", "encoder_model.onnx"), ("decoder", "decoder_model_merged.onnx")):
        assert (out / "model" / f).is_file() and (out / "model_gpcl" / f).is_file()
        assert (out / f"calib_{g}.json").is_file() and (out / f"model_gpcl_{g}.engine").stat().st_size > 0
    sites = summary["sites"]["inserted"]
    assert sites and summary["engine"]["path"].count(".engine") == 2
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert set(accuracy["graphs"]) == {"encoder", "decoder"} and accuracy["generation"]["prompts"] == 3
    entries = set(summary["triton"]["entries"])
    assert {"gpcl_model_encoder", "gpcl_model_decoder", "gpcl_model_generate"} <= entries
    assert {"gpcl_model_trt_encoder", "gpcl_model_trt_decoder", "gpcl_model_ort_decoder"} <= entries
    served = json.loads((out / "served.json").read_text())
    assert served["ok"] and set(served["graphs"]) == {"encoder", "decoder"}

    again = run_pipeline(model, out)
    assert all(v["status"] == "cached" for v in again["stages"].values()), again["stages"]


def test_pipeline_refuses_quantize_on_an_encoder_decoder(tmp_path):
    from gpcl_trt.common import GpclError
    from gpcl_trt.deploy.pipeline import run_pipeline

    model = make_checkpoint("t5", tmp_path / "t5")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text("[quantize]\nweights = 'int8'\n")
    with pytest.raises(GpclError, match="encoder-decoder"):
        run_pipeline(model, tmp_path / "out", config=cfg)
    assert not (tmp_path / "out").exists()


def test_pipeline_on_whisper_serves_within_its_positions(tmp_path):
    """The served-model check's longest decoder case stays within Whisper's 32 decoder positions
    (the check's default 2 x 16 new tokens after 4 cached ran past them: GatherND index 32)."""
    from gpcl_trt.deploy.pipeline import run_pipeline

    model = make_checkpoint("whisper", tmp_path / "whisper")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[pipeline]\nskip = ["build", "diff"]\n')
    summary = run_pipeline(model, tmp_path / "out", config=cfg)
    assert summary["ok"] and summary["stages"]["serve"]["status"] == "done", summary
    served = json.loads((tmp_path / "out" / "served.json").read_text())
    assert served["graphs"]["decoder"]["ok"] and served["graphs"]["encoder"]["ok"]
    assert "whisper_generate" not in summary["triton"]["entries"]  # the pipeline's name is gpcl_model
    assert "gpcl_model_generate" in summary["triton"]["entries"]
