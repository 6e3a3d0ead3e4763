"""Start and stop a real tritonserver (the binary the nvidia-pytriton wheel ships) on free
loopback ports, for the live tests and the pipeline's served-model check.

The wheel keeps the python backend and one stub per Python version apart; a server needs a
backend directory with ``python/{libtriton_python.so, triton_python_backend_utils.py,
triton_python_backend_stub}``, the stub matching the Python it embeds. We assemble one in a
temporary directory. The stub embeds Python and resolves its prefix through ``python3`` on
PATH, so the server gets this interpreter's directory first (numpy < 2, onnxruntime).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gpcl_trt.common import CheckFailed, GpclError


@dataclass(frozen=True)
class TritonDist:
    binary: Path
    python_backend: Path  # directory with libtriton_python.so + triton_python_backend_utils.py
    stub: Path
    libs: Path | None


def find_tritonserver(python_version: str | None = None) -> TritonDist:
    """Locate tritonserver, the python backend and the stub for ``python_version`` (this
    interpreter's by default) inside the installed nvidia-pytriton package."""
    try:
        import pytriton
    except ImportError:
        raise GpclError("needs tritonserver: install nvidia-pytriton (pip install 'gpcl-trt[triton]')") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=next(iter(sorted(Path(pytriton.__file__).parent.parent.glob("nvidia_pytriton.libs"))), None),
    )
    for p in (dist.binary, dist.python_backend / "libtriton_python.so", dist.stub):
        if not p.exists():
            raise GpclError(f"needs tritonserver: {p} is missing from the nvidia-pytriton install")
    return dist


def assemble_backends(dest: Path, dist: TritonDist) -> Path:
    """A backend directory: backends/python with the shared library, utils and our stub."""
    py = dest / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in dist.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, py / f.name)
    shutil.copy2(dist.stub, py / "triton_python_backend_stub")
    return dest / "backends"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(dist.libs)] if dist.libs else []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        # Let the stub embed the very Python this venv was made from (same ABI as its wheels).
        libs.append(sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    # The stub ignores PYTHONPATH; its embedded Python finds its prefix by looking up
    # "python3" on PATH, so this venv's bin directory first means this venv's site-packages.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


class TritonServer:
    """A tritonserver process on 127.0.0.1 (HTTP + gRPC, metrics off), its own process group.

    ``models=None`` loads every model of the repository; a list loads only those (explicit
    model control, so more can be loaded later through the repository API).
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        models: Iterable[str] | None = None,
        startup_timeout: float = 120.0,
        log_verbose: int = 0,
        workdir: str | os.PathLike | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.models = list(models) if models is not None else None
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self._workdir_arg = workdir
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.log_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- lifecycle
    def start(self) -> "TritonServer":
        dist = find_tritonserver()
        if self._workdir_arg is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gpcl-triton-")
            workdir = Path(self._tmp.name)
        else:
            workdir = Path(self._workdir_arg)
            workdir.mkdir(parents=True, exist_ok=True)
        backends = assemble_backends(workdir, dist)
        self.log_path = workdir / "tritonserver.log"
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.http_port, self.grpc_port = free_port(), free_port()
            args = [
                str(dist.binary),
                f"--model-repository={self.repo}",
                f"--backend-directory={backends}",
                "--http-address=127.0.0.1",
                f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false",
                "--allow-gpu-metrics=false",
                "--exit-timeout-secs=10",
                f"--log-verbose={self.log_verbose}",
                # Unique shared-memory names: two servers on one machine must not collide.
                f"--backend-config=python,shm-region-prefix-name=gpcl_{os.getpid()}_{self.http_port}_",
            ]
            if self.models is not None:
                args.append("--model-control-mode=explicit")
                args += [f"--load-model={m}" for m in self.models]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=_server_env(dist),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            try:
                self._wait_ready()
                return self
            except GpclError as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in self.log().lower():
                    break
        raise CheckFailed(last_error)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheckFailed(f"tritonserver exited with code {self.proc.returncode}: {self.log_tail()}")
            if self._get("/v2/health/ready")[0] == 200:
                return
            time.sleep(0.2)
        raise CheckFailed(f"tritonserver not ready after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM, wait, SIGKILL the group if needed; report whether anything was left."""
        info: dict[str, Any] = {"stopped": True, "returncode": None, "killed": False, "leftover_processes": 0}
        if self.proc is None:
            return info
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                info["killed"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(10)
        info["returncode"] = self.proc.returncode
        # Stubs notice their parent is gone on their own; give them a moment before counting.
        deadline = time.monotonic() + 5
        while _group_size(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        info["leftover_processes"] = _group_size(pgid)
        if info["leftover_processes"]:
            # Stubs that outlived the server: end them (they are ours, in our group).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return info

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- endpoints
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _get(self, path: str, data: bytes | None = None) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://{self.http_url}{path}", data=data, method="POST" if data is not None else "GET"
        )
        try:
            with urllib.request.urlopen(req, timeout=120 if data is not None else 2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, ""

    def load_model(self, name: str) -> dict[str, Any]:
        """Ask the server to load ``name`` (explicit model control); returns what it answers
        and the error lines it logged meanwhile (the answer alone can be as vague as "failed
        to poll from model repository" when the real reason is a config parse error)."""
        offset = len(self.log())
        code, body = self._get(f"/v2/repository/models/{name}/load", data=b"{}")
        message = body
        with contextlib.suppress(ValueError):
            message = json.loads(body).get("error", body) if body else ""
        logged = [ln.strip() for ln in self.log()[offset:].splitlines() if ln.startswith(("E", "[libprotobuf ERROR"))]
        return {"name": name, "loaded": code == 200, "http_status": code, "message": message, "log_errors": logged[:10]}

    def model_ready(self, name: str) -> bool:
        return self._get(f"/v2/models/{name}/ready")[0] == 200

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies, so a
    killed test run or pipeline leaves no server behind (its own session escapes Ctrl-C)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_size(pgid: int) -> int:
    """Processes still alive in a process group (zombies do not count)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                count += 1
    return count
