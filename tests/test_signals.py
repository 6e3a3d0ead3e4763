"""Ctrl-C and SIGTERM in the middle of a command: one line, exit 130 / 143, nothing at the final
path and no temporary left behind (the CLI turns SIGTERM into an exception that unwinds like
Ctrl-C's KeyboardInterrupt, so every staging directory and temporary file is removed on the way
out). Engine builds have their own tests (tests/test_engines_signals.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GPCL_TRT = str(Path(sys.executable).with_name("gpcl-trt"))


def _wait_for(predicate, limit_s: float = 300.0) -> None:
    """Poll until ``predicate()``; the bound only keeps a broken run from hanging the suite."""
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail("the command never reached the point where the signal is sent")
        time.sleep(0.05)


# SIGINT takes the same path (KeyboardInterrupt); one export process costs ~40 s on 2 cores.
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_export_leaves_nothing(tiny_llama_dir, tmp_path, sig, code, word):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        [GPCL_TRT, "export", str(tiny_llama_dir), "-o", str(out / "m.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # The staging directory (.m.onnx.gpcl-PID-X.tmp) exists from the start of the work.
        _wait_for(lambda: any(p.name.startswith(".m.onnx.gpcl-") for p in out.iterdir()) or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"gpcl-trt export: error: {word}" in err and "Traceback" not in err, err[-2000:]
    assert os.listdir(out) == []
    assert os.listdir(tmp_path / "tmp") == []
