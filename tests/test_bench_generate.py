"""tools/bench_generate.py's runtime choice: --ours NAME=PATH values and the runtimes that --paired
cannot hold are usage errors before anything is built (the benchmark itself needs the genai and
Optimum venvs and minutes of CPU, so it is run by hand: BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_generate.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_generate", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    work = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, str(TOOL), "--work", str(work), *args], capture_output=True, text=True, timeout=60
    )
    assert not work.exists()  # refused before prepare() made anything
    return res


def test_ours_graphs_named_and_resolved(tmp_path, monkeypatch):
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _tool()._ours_graphs(argparse.ArgumentParser(), ["mine=g.onnx", "b.2=g.onnx"]) == {
        "mine": graph.resolve(),
        "b.2": graph.resolve(),
    }


@pytest.mark.parametrize(
    "spec, says",
    [
        ("noequals", "expected NAME=PATH"),
        ("=g.onnx", "expected NAME=PATH"),
        ("genai=g.onnx", "not a built-in"),
        ("a/b=g.onnx", "letters, digits"),
        ("x=missing.onnx", "is not a file"),
    ],
)
def test_bad_ours_is_a_usage_error(tmp_path, spec, says):
    (tmp_path / "g.onnx").write_bytes(b"x")
    spec = spec.replace("g.onnx", str(tmp_path / "g.onnx")).replace("missing.onnx", str(tmp_path / "missing.onnx"))
    res = _run(tmp_path, "--runtimes", "ours,genai", "--ours", spec)
    assert res.returncode == 2 and res.stdout == ""
    assert says in res.stderr.strip().splitlines()[-1]


def test_repeated_ours_name_is_a_usage_error(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"x")
    g = str(tmp_path / "g.onnx")
    res = _run(tmp_path, "--ours", f"x={g}", "--ours", f"x={g}")
    assert res.returncode == 2 and "repeated" in res.stderr.strip().splitlines()[-1]


def test_paired_refuses_optimum(tmp_path):
    res = _run(tmp_path, "--paired", "--runtimes", "ours,optimum,genai")
    assert res.returncode == 2 and res.stdout == ""
    assert "--paired: optimum" in res.stderr.strip().splitlines()[-1]


def test_unknown_runtime_or_no_genai_is_a_usage_error(tmp_path):
    for runtimes in ("ours,nosuch,genai", "ours,optimum"):
        res = _run(tmp_path, "--runtimes", runtimes)
        assert res.returncode == 2 and "--runtimes" in res.stderr.strip().splitlines()[-1]
