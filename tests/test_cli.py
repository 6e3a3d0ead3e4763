"""The CLI contract shared by every command: --version, usage errors as one line (and a JSON
error object with --json), exit 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gpcl_trt import __version__
from gpcl_trt.cli import main


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["diff", "--reference", "/nonexistent/ref.onnx", "--candidate", "/nonexistent/c.onnx"], "does not exist"),
        (["export", "/tmp", "-o", "x.onnx", "--opset", "abc"], "not a valid integer"),
        (["study", "/tmp", "-o", "s", "--taus", "abc"], "comma-separated numbers"),
        (["build", "m.onnx"], "Missing option"),
    ],
)
def test_usage_errors_are_one_line_and_json(args, fragment):
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith(f"gpcl-trt {args[0]}: error:")
    doc = json.loads(res.stdout)
    assert doc == {"ok": False, "exit_code": 2, "error": doc["error"]} and fragment in doc["error"]


def test_unknown_command_is_one_line():
    res = CliRunner().invoke(main, ["no-such-command"])
    assert res.exit_code == 2 and res.stdout == ""
    assert [line for line in res.stderr.splitlines() if line.strip()] == [
        "gpcl-trt: error: No such command 'no-such-command'. (see 'gpcl-trt --help')"
    ]
