"""Signals during `gpcl-trt build`: a real build in a subprocess, interrupted mid-build, leaves
nothing at the final path and nothing in its (private) TMPDIR, and exits non-zero.

The child blocks inside TensorRT's logger callback once the builder has started (it prints
``building`` first) until the interrupt is recorded, so the parent signals a build known to be
running: no timing. fp16 on TensorRT-RTX lowers the model into a
temporary directory first, whose fate the tests check too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import onnx
import pytest

from gpcl_trt.plugins.onnx_function import gpcl_model

pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install 'gpcl-trt[rtx]')")

CHILD = """
import signal, sys, time

# A job started in the background by a non-interactive shell (make test &) inherits SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler: give the child a terminal's.
signal.signal(signal.SIGINT, signal.default_int_handler)
from gpcl_trt.engines import backend, monitor

state = {"started": False, "blocked": False}
real_start, real_log = monitor.BuildProgress.start, backend._Logger._log


def start(self, *args):
    state["started"] = True
    return real_start(self, *args)


def log(self, severity, msg):
    if state["started"] and not state["blocked"]:
        state["blocked"] = True
        print("building", flush=True)
        deadline = time.monotonic() + 120
        # The parent's signal arrives meanwhile (on the main thread, which waits for the build).
        while self.errors.pending is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_log(self, severity, msg)


monitor.BuildProgress.start, backend._Logger._log = start, log
from gpcl_trt.cli import main

main(sys.argv[1:], prog_name="gpcl-trt")
"""


@pytest.fixture
def dirs(tmp_path):
    """(model, output dir, private TMPDIR, child script)."""
    src = tmp_path / "g.onnx"
    onnx.save(gpcl_model(["batch", "sequence", 64]), str(src))
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    return src, out, tmp, child


def _interrupted_build(dirs, sig: int) -> tuple[int, str]:
    src, out, tmp, child = dirs
    cmd = [sys.executable, str(child), "build", str(src), "-o", str(out / "g.engine")]
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [*cmd, "--backend", "tensorrt-rtx", "--precision", "fp16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        if line != "building\n":
            proc.kill()
            raise AssertionError(f"the build did not start: {line!r} {proc.communicate()[1][-2000:]}")
        # Mid-build: the lowered copy of the model is in TMPDIR, the plan's temporary beside the output.
        assert [p.is_dir() for p in tmp.iterdir()] == [True]
        assert [p.name.startswith(".g.engine.gpcl-") for p in out.iterdir()] == [True]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_mid_build_cancels_it_and_commits_nothing(dirs):
    _, out, tmp, _ = dirs
    code, err = _interrupted_build(dirs, signal.SIGINT)
    assert code == 130, err[-2000:]
    # One line: the binding no longer sees (and prints, and drops) the KeyboardInterrupt, and the
    # cancelled build's own errors are not echoed.
    assert err.strip().splitlines() == ["gpcl-trt build: error: interrupted; nothing was written"]
    assert list(out.iterdir()) == [] and list(tmp.iterdir()) == []


def test_sigterm_mid_build_unwinds_and_commits_nothing(dirs):
    """The CLI turns SIGTERM into an exception (common.Terminated), which lands in the callback
    like Ctrl-C: the build is cancelled and every temporary removed on the way out."""
    _, out, tmp, _ = dirs
    code, err = _interrupted_build(dirs, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert err.strip().splitlines() == ["gpcl-trt build: error: terminated; nothing was written"]
    assert list(out.iterdir()) == [] and list(tmp.iterdir()) == []


def test_the_next_build_removes_what_a_killed_one_left(dirs, monkeypatch):
    """SIGKILL cannot be caught: the lowered copy stays in TMPDIR and the plan's temporary
    beside the output. Both carry the dead owner's pid, and the next build removes them, but
    not those of a live process."""
    from gpcl_trt.engines import build_engine

    src, out, tmp, _ = dirs
    code, _ = _interrupted_build(dirs, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (left,) = tmp.iterdir()
    assert len(list(out.iterdir())) == 1 and next(left.iterdir()).name == "g.onnx"  # a copy of the model
    live = tmp / f".gpcl-build.gpcl-{os.getpid()}-0123abcd.tmp"
    live.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    res = build_engine(src, out / "g.engine", backend="tensorrt-rtx")
    assert res["ok"] and list(tmp.iterdir()) == [live]
    assert sorted(p.name for p in out.iterdir()) == ["g.engine", "g.engine.manifest.json"]
