"""The test suite's own machinery, run as CI runs it: pytest in a subprocess with the real
setup.cfg and tests/conftest.py. A test past its time limit fails and its tritonserver is
stopped by its own teardown; a test that swallows the timeout is ended by the backstop; the
family corpus skips, naming the package, when an optional extra is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pytest(cwd: Path, *args: str, prelude: str = "", env: dict | None = None, limit: float = 300):
    """pytest under the repository's setup.cfg in a fresh interpreter; ``prelude`` runs first."""
    code = f"{prelude}\nimport sys, pytest\nsys.exit(pytest.main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "-c", str(ROOT / "setup.cfg"), "-p", "no:cacheprovider", "-rA", *args]
    return subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=limit
    )


def _inner_suite(tmp_path: Path, test_text: str) -> Path:
    """A folder with the real conftest and one test file (its rootdir, so the repo's tests are
    not collected)."""
    d = tmp_path / "inner"
    d.mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", d / "conftest.py")
    (d / "test_inner.py").write_text(textwrap.dedent(test_text))
    return d


def test_setup_cfg_limit_and_method_are_in_force():
    """pytest reads setup.cfg's 600 s and the signal method (so teardowns run): a misspelt key or a
    missing plugin would leave every test without a limit."""
    res = _pytest(ROOT, "--collect-only", "tests/test_cli.py")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "timeout: 600.0s" in res.stdout and "timeout method: signal" in res.stdout, res.stdout[:2000]


def test_a_test_past_its_limit_fails_and_its_server_is_stopped(tmp_path):
    """A live-server test that hangs: the timeout fails it, and the fixture's teardown stops
    tritonserver (it reports no leftover process; the process is gone). With the thread method
    the run would exit on the spot and no teardown would run."""
    pytest.importorskip("pytriton", reason="needs nvidia-pytriton (tritonserver; pip install 'gpcl-trt[triton]')")
    out = tmp_path / "out"
    out.mkdir()
    d = _inner_suite(
        tmp_path,
        """
        import json, os, time
        from pathlib import Path

        import pytest

        from gpcl_trt.deploy.server import TritonServer

        OUT = Path(os.environ["INNER_OUT"])


        @pytest.fixture
        def server(tmp_path):
            (tmp_path / "repo").mkdir()
            s = TritonServer(tmp_path / "repo", models=[])
            try:
                s.start()
                yield s
            finally:
                (OUT / "stop.json").write_text(json.dumps(s.stop()))


        # func_only: the limit starts once the server is up, whatever the load of the machine
        @pytest.mark.timeout(3, func_only=True)
        def test_hangs_with_a_live_server(server):
            (OUT / "pid").write_text(str(server.proc.pid))
            time.sleep(600)
        """,
    )
    res = _pytest(d, "test_inner.py", env={"INNER_OUT": str(out)})
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "Timeout" in text and "1 failed" in text, text[-3000:]
    pid = int((out / "pid").read_text())
    assert (out / "stop.json").is_file(), "the fixture's teardown did not run: " + text[-3000:]
    stop = json.loads((out / "stop.json").read_text())
    assert stop["returncode"] == 0 and stop["leftover_processes"] == 0 and not stop["killed"], stop
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_test_that_swallows_its_timeout_is_ended_by_the_backstop(tmp_path):
    """Native code can drop the timeout's exception (TensorRT's logger callback does): the
    conftest backstop then ends the run `timeout_kill_after` seconds later, with the stacks."""
    d = _inner_suite(
        tmp_path,
        """
        import time

        import pytest


        @pytest.mark.timeout(1)
        def test_swallows_every_exception():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.05)
                except BaseException:
                    pass
        """,
    )
    res = _pytest(d, "test_inner.py", "-o", "timeout_kill_after=2", limit=200)
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "Timeout" in text and "test_swallows_every_exception" in text, text[-3000:]
    assert " passed" not in text


def test_the_corpus_skips_naming_each_missing_extra(tmp_path):
    """Without TensorRT-RTX and the triton extra (hidden from the import system), the corpus
    tests that need them skip before building anything, and the reason names every package."""
    hide = "import sys\nfor m in ('tensorrt_rtx', 'tritonclient', 'pytriton'):\n    sys.modules[m] = None"
    res = _pytest(
        ROOT,
        "tests/test_families.py::test_pipeline_calibrates_builds_and_deploys[bert]",
        "tests/test_families.py::test_pipeline_calibrates_builds_and_deploys[mistral]",
        prelude=hide,
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "2 skipped" in text and "failed" not in text, text[-3000:]
    skips = [ln for ln in text.splitlines() if ln.startswith("SKIPPED")]
    assert len(skips) == 2, text[-3000:]
    for line in skips:
        assert "tensorrt-rtx-cu13" in line and "tritonclient" in line, line
    assert sum("nvidia-pytriton" in ln for ln in skips) == 1, skips  # only mistral is served
