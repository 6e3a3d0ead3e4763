"""Export options (exporter/options.py, exporter/cli.py): a memory budget that is not a size is one
line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main


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
