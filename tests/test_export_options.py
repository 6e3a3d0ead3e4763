"""Export options (exporter/options.py, exporter/cli.py): a memory budget that is not a size is one
line; ``--trace-layers`` is the replication policy (insert's ``--layers`` are layer indices);
``--dtype auto`` (the default) exports a checkpoint in the floating dtype it stores, bf16 as fp16,
pickle weights as fp32, and says so in the result and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main
from gpcl_trt.common import manifest_path
from gpcl_trt.exporter import export_model

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
def _save_llama(out: Path, dtype: str = "float32") -> Path:
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
    LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype)).save_pretrained(out)
    return out


def _as_pickle(src: Path, out: Path) -> Path:
    """The same weights (fp16 here) as pytorch_model.bin: a dtype only loading them can tell."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    torch.save(load_file(src / "model.safetensors"), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    base = tmp_path_factory.mktemp("option_models")
    dirs = {
        "fp32": _save_llama(base / "fp32"),
        "fp16": _save_llama(base / "fp16", "float16"),
        "bf16": _save_llama(base / "bf16", "bfloat16"),
    }
    dirs["pickle"] = _as_pickle(dirs["fp16"], base / "pickle")
    return dirs


def _weight_types(onnx_path: Path) -> set[int]:
    """ONNX element types of the weight matrices (small constants may stay fp32 in any export)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}


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


# ----------------------------------------------------------------------------- --dtype auto
@pytest.mark.parametrize(
    "name, dtype, onnx_type, why",
    [
        ("fp32", "fp32", 1, "stores fp32"),
        ("fp16", "fp16", 10, "stores fp16"),
        ("bf16", "fp16", 10, "stores bf16"),
        ("pickle", "fp32", 1, "pickle weights"),
    ],
)
def test_dtype_auto_is_the_checkpoint_dtype(llamas, tmp_path, name, dtype, onnx_type, why):
    """The default exports a 16-bit checkpoint in 16 bits (a 7B bf16 checkpoint is no longer
    converted to 27 GB of fp32): fp16 as stored, bf16 as fp16 (ONNX Runtime's CPU provider cannot
    validate bf16); pickle weights, whose dtype is unknown before they are loaded, as fp32. The
    export is validated against PyTorch at the chosen dtype's tolerance, and the manifest says what
    was chosen and why."""
    out = tmp_path / "m.onnx"
    res = export_model(llamas[name], out, task=TG, allow_pickle=name == "pickle")
    assert res["ok"] and res["validation"]["passed"]
    opts = res["options"]
    assert opts["dtype"] == dtype and opts["dtype_requested"] == "auto" and why in opts["dtype_reason"]
    assert res["dtype"] == {"value": dtype, "requested": "auto", "reason": opts["dtype_reason"]}
    assert _weight_types(out) == {onnx_type}
    manifest = json.loads(manifest_path(out).read_text())
    assert {k: manifest["options"][k] for k in ("dtype", "dtype_requested", "dtype_reason")} == {
        k: opts[k] for k in ("dtype", "dtype_requested", "dtype_reason")
    }
    if name == "fp16":  # stored as exported: linked, nothing converted
        assert res["weights"]["converted_bytes"] == 0


def test_dtype_asked_for_is_kept(llamas, tmp_path):
    res = export_model(llamas["fp16"], tmp_path / "m.onnx", task=TG, dtype="fp32")
    assert res["options"]["dtype"] == "fp32" and res["options"]["dtype_requested"] == "fp32"
    assert _weight_types(tmp_path / "m.onnx") == {1}


def test_dtype_help_says_what_auto_picks():
    text = " ".join(CliRunner().invoke(main, ["export", "--help"]).output.split())
    assert "[auto|fp32|fp16|bf16]" in text and "default: auto" in text
    assert "bf16 -> fp16" in text and "pickle weights: fp32" in text


# ----------------------------------------------------------------------------- --force and old data files
def test_force_export_keeps_an_old_data_file_another_artifact_reads(llamas, tmp_path):
    """A --force export that no longer writes a data file of the export it replaces retires it
    through gpcl_trt.weightfiles: deleted, unless another artifact's manifest in the directory
    reads it (the exporter used to unlink it regardless)."""
    d, out = llamas["fp32"], tmp_path / "m.onnx"
    export_model(d, out, task=TG, external_data="link", validate="none")
    data = tmp_path / "m.onnx.model.safetensors"
    assert data.is_file()
    (tmp_path / "other.onnx").write_bytes(b"")
    other = {"artifact": "other.onnx", "results": {"external_data": [data.name]}}
    (tmp_path / "other.manifest.json").write_text(json.dumps(other))
    res = export_model(d, out, task=TG, external_data="inline", validate="none", force=True)
    assert res["external_data"] == [] and data.is_file()  # kept: other.onnx reads it
    (tmp_path / "other.manifest.json").unlink()
    export_model(d, out, task=TG, external_data="link", validate="none", force=True)
    export_model(d, out, task=TG, external_data="inline", validate="none", force=True)
    assert not data.exists()  # retired: nothing else reads it
