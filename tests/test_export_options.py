"""Export options (exporter/options.py, exporter/cli.py): a memory budget that is not a size is one
line; ``--trace-layers`` is the replication policy (insert's ``--layers`` are layer indices)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main

TG = "text-generation"


def _one_error_line(res, needle: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpcl-trt export: error: "), res.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- --memory-budget
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "abc", "1e400"])
def test_memory_budget_that_is_not_a_size_is_one_line(tmp_path, value):
    """``inf`` and ``1e400`` parse as float infinity, whose int() raised OverflowError (a
    traceback, exit 1)."""
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(
        main, ["export", str(tmp_path / "model"), "-o", str(out / "m.onnx"), "--memory-budget", value]
    )
    _one_error_line(res, "memory budget")
    assert not any(out.iterdir())


# ----------------------------------------------------------------------------- tiny checkpoints
def _save_llama(out: Path, dtype: str = "float32", safe: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=safe)
    return out


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    base = tmp_path_factory.mktemp("option_models")
    return {
        "fp32": _save_llama(base / "fp32"),
        "fp16": _save_llama(base / "fp16", "float16"),
        "bf16": _save_llama(base / "bf16", "bfloat16"),
        "pickle": _save_llama(base / "pickle", safe=False),
    }


# ----------------------------------------------------------------------------- --trace-layers
def test_trace_layers_is_the_replication_policy_and_layers_is_not_an_export_option(llamas, tmp_path):
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "--trace-layers [auto|replicate|all]" in help_text and "--layers" not in help_text
    d = llamas["fp32"]
    res = CliRunner().invoke(main, ["export", str(d), "-o", str(tmp_path / "a.onnx"), "--layers", "0,2"])
    assert res.exit_code == 2 and "--layers" in res.output
    res = CliRunner().invoke(
        main, ["export", str(d), "-o", str(tmp_path / "b.onnx"), "--trace-layers", "replicate", "--task", TG]
    )
    # 2 layers: nothing to replicate (found after the progress lines of reading the checkpoint)
    assert res.exit_code == 2, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gpcl-trt export: error: cannot replicate the layers"), res.stderr
    res = CliRunner().invoke(
        main,
        ["export", str(d), "-o", str(tmp_path / "c.onnx"), "--trace-layers", "all", "--task", TG, "--json"],
    )
    assert res.exit_code == 0, res.output
    layers = json.loads(res.stdout)["weights"]["layers"]
    assert layers["traced"] == 2 and layers["why_every_layer"] == "not asked (replicate=False)"
