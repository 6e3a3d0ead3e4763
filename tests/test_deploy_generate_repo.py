"""gpcl-trt triton on a decoder with past: NAME_generate is written next to the tensor model (its
decoder, model.py, the tokenizer and config files linked in; a decoupled config Triton's schema
parses), only when it can be; refusals are one line and leave nothing behind."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from test_generate import decoders  # noqa: F401  (module fixture: tiny decoders with a tokenizer)

from gpcl_trt.cli import main


def _triton(*args: str):
    return CliRunner().invoke(main, ["triton", *args])


def test_decoder_gets_a_generation_model(decoders, tmp_path):  # noqa: F811
    from gpcl_trt.deploy.triton import parse_config

    model_dir, onnx = decoders("llama")
    repo = tmp_path / "repo"
    res = _triton(str(onnx), "--repo", str(repo), "--name", "llama", "--generate-slots", "3", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    gen = repo / "llama_generate"
    assert out["generate_model"]["model_dir"] == str(gen) and f"wrote {gen} (text generation, 3 slots)" in res.stderr
    assert (repo / "llama" / "1" / "model.onnx").is_file()  # the tensor model stays
    files = sorted(p.name for p in (gen / "1").iterdir())
    assert {"model.onnx", "model.py", "tokenizer.json", "tokenizer_config.json", "config.json"} <= set(files)
    # tokenizer files linked, not copied, where the filesystem allows it
    assert os.stat(gen / "1" / "tokenizer.json").st_ino == os.stat(model_dir / "tokenizer.json").st_ino
    cfg = parse_config((gen / "config.pbtxt").read_text())
    assert cfg.model_transaction_policy.decoupled and cfg.max_batch_size == 0
    assert cfg.parameters["slots"].string_value == "3"
    assert [i.name for i in cfg.input if not i.optional] == ["text_input"]

    # NAME_generate exists: refused before anything is written (not even NAME), unless --force
    from gpcl_trt.weightfiles import remove_tree

    remove_tree(repo / "llama")
    res = _triton(str(onnx), "--repo", str(repo), "--name", "llama")
    assert res.exit_code == 2 and f"{gen} exists; pass --force" in res.stderr
    assert not (repo / "llama").exists()
    assert _triton(str(onnx), "--repo", str(repo), "--name", "llama", "--force").exit_code == 0


def test_no_generation_model_when_not_possible_or_not_asked(decoders, tiny_gpt2_onnx, tmp_path):  # noqa: F811
    from gpcl_trt.deploy import write_triton_repo

    _, onnx = decoders("llama")
    r = write_triton_repo(onnx, tmp_path / "a", "m", generate=False)
    assert r["generate_model"]["reason"].startswith("not asked") and not (tmp_path / "a" / "m_generate").exists()
    # conftest's GPT-2 export has no tokenizer in its model directory
    r = write_triton_repo(tiny_gpt2_onnx, tmp_path / "b", "g")
    assert "no tokenizer files" in r["generate_model"]["reason"] and not (tmp_path / "b" / "g_generate").exists()
    res = _triton(str(tiny_gpt2_onnx), "--repo", str(tmp_path / "c"), "--name", "g", "--generate")
    assert res.exit_code == 2 and not (tmp_path / "c").exists()
    assert res.stderr.strip().splitlines() == [
        f"gpcl-trt triton: error: cannot write the generation model: {r['generate_model']['reason']}"
    ]


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_both_onnx_backends_write_it(decoders, tmp_path, backend):  # noqa: F811
    from gpcl_trt.deploy import write_triton_repo

    _, onnx = decoders("llama")
    r = write_triton_repo(onnx, tmp_path / "r", "m", backend=backend)
    assert r["generate_model"]["slots"] == 8 and (tmp_path / "r" / "m_generate" / "1" / "model.py").is_file()


@pytest.mark.slow  # a whole pipeline (engine build skipped), served check included
def test_pipeline_on_a_decoder(decoders, tmp_path):  # noqa: F811
    """The pipeline on a decoder with past: the diff stage reports the generation-level check of
    the GPCL model against the PyTorch model (its summary row), and the Triton stage writes one
    text generation model, next to the served entry."""
    from gpcl_trt.deploy.pipeline import run_pipeline
    from gpcl_trt.deploy.summary import rows

    model_dir, _ = decoders("llama")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[pipeline]\nskip = ["build"]\n[export]\ntask = "text-generation-with-past"\n')
    summary = run_pipeline(model_dir, tmp_path / "out", config=cfg)
    g = summary["generation"]
    assert summary["ok"] and g["prompts"] == 4 and g["max_new_tokens"] == 16
    assert 0 <= g["greedy_agreement"] <= 1 and g["candidate_nll"] > 0
    assert dict(rows(summary))["generation"].startswith(f"greedy agreement {g['greedy_agreement']:.4g} over 4")
    repo = tmp_path / "out" / "triton_repo"
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "gpcl_model",
        "gpcl_model_generate",
        "gpcl_model_ort",
    ]
    assert summary["triton"]["entries"]["gpcl_model_generate"]["generate"] is True
