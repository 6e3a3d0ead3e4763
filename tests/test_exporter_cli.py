"""Every bad input to `gpcl-trt export`: one clear error line, exit 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main


def _invoke(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def _assert_bad_input(res, out_dir: Path, before: set[str], needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpcl-trt export: error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert {p.name for p in out_dir.iterdir()} == before  # no output, no temp file


def _model_dir(tmp_path: Path, src: Path | None = None, config: dict | str | None = None) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    if src is not None:
        shutil.copy(src / "config.json", d / "config.json")
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_dir(tmp_path, out_dir):
    res = _invoke(str(tmp_path / "nope"), "-o", str(out_dir / "m.onnx"))
    _assert_bad_input(res, out_dir, set(), "does not exist")


def test_no_config(tmp_path, out_dir):
    d = _model_dir(tmp_path)
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "no config.json")


def test_config_not_json(tmp_path, out_dir):
    d = _model_dir(tmp_path, config="{not json")
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "not readable JSON")


def test_encoder_decoder_is_refused_naming_its_task(tmp_path, out_dir):
    d = _model_dir(tmp_path, config={"model_type": "t5", "architectures": ["T5Model"]})
    res = _invoke(str(d), "-o", str(out_dir / "m.onnx"))
    _assert_bad_input(res, out_dir, set(), "unsupported architecture")
    assert "encoder-decoder model (task text2text-generation)" in res.stderr


def test_no_weights(tmp_path, out_dir, tiny_gpt2_dir):
    d = _model_dir(tmp_path, tiny_gpt2_dir)
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "has no weights")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights(tmp_path, out_dir, tiny_gpt2_dir, damage):
    d = _model_dir(tmp_path, tiny_gpt2_dir)
    blob = (tiny_gpt2_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"\x07" * 4096)
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "unreadable weights")


def test_weights_not_matching_config(tmp_path, out_dir, tiny_gpt2_dir):
    """A well-formed file whose tensors do not fit config.json must not export random weights."""
    import torch
    from safetensors.torch import save_file

    d = _model_dir(tmp_path, tiny_gpt2_dir)
    save_file({"unrelated.weight": torch.zeros(3, 3)}, str(d / "model.safetensors"))
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "do not match config.json")


def test_pickle_refused_without_flag(tmp_path, out_dir, tiny_gpt2_dir):
    d = _model_dir(tmp_path, tiny_gpt2_dir)
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    _assert_bad_input(_invoke(str(d), "-o", str(out_dir / "m.onnx")), out_dir, set(), "--allow-pickle")


def test_existing_output_needs_force(out_dir, tiny_gpt2_dir):
    (out_dir / "m.onnx").write_text("keep me")
    res = _invoke(str(tiny_gpt2_dir), "-o", str(out_dir / "m.onnx"))
    _assert_bad_input(res, out_dir, {"m.onnx"}, "--force")
    assert (out_dir / "m.onnx").read_text() == "keep me"


def test_existing_manifest_needs_force(out_dir, tiny_gpt2_dir):
    (out_dir / "m.manifest.json").write_text("keep me")
    res = _invoke(str(tiny_gpt2_dir), "-o", str(out_dir / "m.onnx"))
    _assert_bad_input(res, out_dir, {"m.manifest.json"}, "--force")
    assert (out_dir / "m.manifest.json").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "image-classification"], "not supported for gpt2"),
        (["--opset", "11"], "opset 11 is not supported"),
        (["--atol", "-1"], "atol must be >= 0"),
    ],
)
def test_bad_options(out_dir, tiny_gpt2_dir, args, needle):
    res = _invoke(str(tiny_gpt2_dir), "-o", str(out_dir / "m.onnx"), *args)
    _assert_bad_input(res, out_dir, set(), needle)


def test_bad_output_paths(tmp_path, tiny_gpt2_dir, out_dir):
    _assert_bad_input(_invoke(str(tiny_gpt2_dir), "-o", str(out_dir / "m.txt")), out_dir, set(), "must end in .onnx")
    res = _invoke(str(tiny_gpt2_dir), "-o", str(tmp_path / "missing" / "m.onnx"))
    _assert_bad_input(res, out_dir, set(), "does not exist")
    (out_dir / "d.onnx").mkdir()
    res = _invoke(str(tiny_gpt2_dir), "-o", str(out_dir / "d.onnx"), "--force")
    _assert_bad_input(res, out_dir, {"d.onnx"}, "is a directory")


def test_json_error_object(tmp_path, out_dir):
    res = _invoke(str(tmp_path / "nope"), "-o", str(out_dir / "m.onnx"), "--json")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "does not exist" in doc["error"]


def test_help_documents_every_option():
    res = CliRunner().invoke(main, ["export", "--help"])
    assert res.exit_code == 0
    for opt in (
        "--output",
        "--task",
        "--opset",
        "--dtype",
        "--atol",
        "--no-validate",
        "--force",
        "--trust-remote-code",
        "--allow-pickle",
        "--json",
    ):
        assert opt in res.output
