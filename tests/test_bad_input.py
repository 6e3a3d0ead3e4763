"""Bad input, across the commands, the way a new user hits it: one clear line on stderr, exit 2,
nothing written and no existing file changed. Runs the real CLI in-process."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from gpcl_trt.cli import main


def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stderr


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder with a plain file, a tiny valid ONNX model and a text file."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "plain.txt").write_text("not a directory\n")
    (tmp_path / "weights.onnx").write_bytes(b"\x00garbage, not a protobuf")
    # a model directory as far as export reads before its output checks (the config decides
    # whether OUT is a file or, for encoder-decoder models, a directory)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    return tmp_path


def _cases(d: Path) -> list[tuple[list, str]]:
    blocked = d / "plain.txt" / "out"  # a parent of the output is a regular file
    return [
        (["export", d / "model", "-o", d / "plain.txt" / "m.onnx"], "not a directory"),
        (["export", d / "model", "-o", blocked / "m.onnx"], "not a directory"),
        (["calibrate", d / "m.onnx", "-o", blocked / "c.json"], "not a directory"),
        (["calibrate", d / "m.onnx", "-o", d / "plain.txt" / "c.json"], "not a directory"),
        (["insert", d / "m.onnx", "-o", blocked / "g.onnx", "--tau", "2"], "not a directory"),
        (["strip", d / "m.onnx", "-o", blocked / "s.onnx"], "not a directory"),
        (["build", d / "m.onnx", "-o", blocked / "m.engine"], "not a directory"),
        (["sites", d / "weights.onnx"], "not a readable ONNX model"),
        (["sites", d], "is a directory"),
        (["insert", d / "m.onnx", "-o", d / "g.onnx", "--tau", "2", "--layers", "3-1"], "layers"),
        (["insert", d / "m.onnx", "-o", d / "g.onnx", "--tau", "-1"], "tau"),
        (["insert", d / "m.onnx", "-o", d / "g.onnx", "--calibration", d / "plain.txt"], "calibration"),
        (["calibrate", d / "m.onnx", "-o", d / "c.json", "--samples", "0"], "--samples"),
        (["build", d / "weights.onnx", "-o", d / "w.engine"], "not a readable ONNX model"),
        (["diff", "--reference", d / "missing.onnx", "--candidate", d / "m.onnx"], "missing.onnx"),
        (["export", d / "plain.txt", "-o", d / "e.onnx"], "not a directory"),
        (["export", d, "-o", d / "e.onnx"], "config.json"),
        (["triton", d / "m.onnx", "--repo", d / "repo", "--name", "../evil"], "name"),
    ]


def test_each_bad_input_is_one_line_exit_2_and_writes_nothing(workdir):
    before = _tree(workdir)
    failures = []
    for args, needle in _cases(workdir):
        code, err = _cli(*args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if code != 2 or len(lines) != 1 or "Traceback" in err or needle not in err:
            failures.append((args[0], needle, code, err[-300:]))
    assert not failures, failures
    assert _tree(workdir) == before  # nothing written, nothing changed
