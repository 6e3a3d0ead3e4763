"""Shared plumbing for every stage: error classes (and their exit codes), atomic writes,
hashes and manifests. Kept free of heavy imports so the CLI starts fast."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


class GpclError(Exception):
    """Bad input or an unusable environment: one clear line, exit code 2."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(GpclError):
    """The work ran but a check (validation, accuracy, serving) failed: exit code 1."""

    exit_code = EXIT_CHECK_FAILED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every temporary output is removed
    on the way out (the handler is installed by the CLI)."""


def os_error_line(exc: OSError) -> str:
    """A filesystem error as the one line the error contract promises: the file and what the
    system said (read-only filesystem, no space left, permission denied...)."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    what = exc.strerror or one_line(exc)
    hint = {errno.ENOSPC: "; free space or write elsewhere", errno.EDQUOT: "; free space or write elsewhere"}
    return f"{where}: {what}{hint.get(exc.errno, '')}" if where else f"{what}{hint.get(exc.errno, '')}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (terminal colour codes removed), for
    the one-line error contract; the exception's type name when the message is empty."""
    text = _ANSI.sub("", str(exc))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_dir(path: str | os.PathLike, skip: Iterable[str] = ()) -> str:
    """Hash of a directory tree: relative names and contents, in sorted order."""
    root = Path(path)
    skip = set(skip)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part in skip for part in p.relative_to(root).parts):
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- outputs
def check_can_write(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite without --force, and refuse a missing parent directory."""
    p = Path(path)
    if p.exists() and not force:
        raise GpclError(f"{p} exists; pass --force to overwrite it")
    parent = p.parent
    if not parent.is_dir():
        blocker = next((a for a in parent.parents if a.exists()), None) if not parent.exists() else parent
        if blocker is not None and not blocker.is_dir():
            raise GpclError(f"cannot write {p}: {blocker} is a file, not a directory")
        raise GpclError(f"output directory {parent} does not exist")
    # Before any work (reading, tracing): a read-only filesystem or directory is one line now,
    # not a traceback after the model was traced.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GpclError(f"cannot write {p}: {parent} is not writable (read-only filesystem or permissions)")
    return p


# Every temporary output is a hidden sibling named .NAME.gpcl-PID-XXXXXXXX.tmp: the same
# filesystem (atomic renames, hard links) and the owner's pid, so the next write into that
# directory removes what a killed process (SIGKILL, OOM) left behind. Only this pattern is removed.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.gpcl-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.gpcl-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid > 0


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove our temporary files and directories in ``directory`` whose owning process is dead."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            m = TEMP_RE.match(name)
            if m is None or _pid_alive(int(m.group("pid"))):
                continue
            p = Path(directory) / name
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(name)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block
    succeeds, so a failure never leaves a partial output behind."""
    final = check_can_write(path, force)
    if final.is_dir():
        raise GpclError(f"{final} is a directory; give a file name")
    remove_stale_temps(final.parent)
    tmp_path = temp_sibling(final)
    tmp_path.touch(mode=0o666 & ~_umask(), exist_ok=False)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Like ``atomic_path``, for a directory: yield a temporary sibling to fill; on success it
    is renamed into place (an existing one, with ``force``, is moved aside first and removed only
    after the new one is in), on failure nothing is left behind."""
    final = check_can_write(path, force)
    remove_stale_temps(final.parent)
    tmp = temp_sibling(final)
    tmp.mkdir()  # the umask's mode, like a plain mkdir: a server may run as another user
    try:
        yield tmp
        old = None
        if final.exists():
            old = temp_sibling(final)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, force: bool = False) -> Path:
    return write_text_atomic(path, to_json(obj, indent=2) + "\n", force)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    """Strict JSON has no Infinity/NaN: write them as the strings float() reads back."""
    if isinstance(o, float) and not math.isfinite(o):
        return "NaN" if math.isnan(o) else ("Infinity" if o > 0 else "-Infinity")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def to_json(obj: Any, indent: int | None = None) -> str:
    """JSON for every stage's files and --json output: sorted keys, numpy values as Python ones,
    non-finite floats as strings (strict JSON readers reject a bare Infinity)."""
    plain = json.loads(json.dumps(obj, default=_json_default))  # numpy scalars/arrays -> Python
    return json.dumps(_finite(plain), indent=indent, sort_keys=True, allow_nan=False)


# ----------------------------------------------------------------------------- ONNX files
def load_onnx(path: str | os.PathLike, external_data: bool = True) -> Any:
    """onnx.load, with one clear GpclError when the file is missing or not a readable ONNX model
    (protobuf raises several unrelated exception types on garbage) or its external data is
    missing or truncated. Every stage that reads a user's ONNX file goes through here (or
    load_onnx_graph, which leaves the weights on disk)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise GpclError(f"{p}: no such ONNX file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise GpclError(f"{p} is not a readable ONNX model ({type(exc).__name__}: {one_line(exc, 200)})") from None
    if external_data:
        from gpcl_trt.weightfiles import inline_external, verify_onnx

        verify_onnx(p, model)
        inline_external(model, p.parent)
    return model


# ----------------------------------------------------------------------------- package API
def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Any, Any]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for an area's ``__init__``: each public name
    resolves to the real object of its submodule on first use (so ``inspect.signature`` shows
    the real signature) while importing the area, hence the CLI, stays cheap."""
    import importlib

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return sorted(exports), __getattr__, __dir__


# Tensors the stages read themselves (a Pow exponent, a norm's epsilon, a per-group tau) are
# small; weights are not.
SMALL_TENSOR_BYTES = 64 * 1024


def load_onnx_graph(path: str | os.PathLike) -> Any:
    """An ONNX model without its external weights: they stay on disk, referenced (a runtime reads
    them from there). External tensors of at most SMALL_TENSOR_BYTES are read
    in (they become inline). A missing weight file is one clear error."""
    from gpcl_trt.weightfiles import inline_external, verify_onnx

    p = Path(path)
    model = load_onnx(p, external_data=False)
    verify_onnx(p, model)
    inline_external(model, p.parent, SMALL_TENSOR_BYTES)
    return model


def external_locations(model: Any) -> list[str]:
    """The external data files a ModelProto's tensors point at (relative to its directory)."""
    from gpcl_trt.weightfiles import external_locations as locations

    return locations(model)


def has_large_weights(model: Any, base_dir: str | os.PathLike) -> bool:
    """Its external weight files together exceed gpcl.LARGE_WEIGHT_BYTES."""
    from gpcl_trt.gpcl import LARGE_WEIGHT_BYTES
    from gpcl_trt.weightfiles import total_external_bytes

    return total_external_bytes(model, base_dir) > LARGE_WEIGHT_BYTES


# ----------------------------------------------------------------------------- manifests
def manifest_path(artifact: str | os.PathLike) -> Path:
    """OUT.onnx -> OUT.manifest.json; any other artifact (OUT.engine, calib.json...) gets
    ``.manifest.json`` appended, so the manifest always sits next to what it describes."""
    p = Path(artifact)
    if p.suffix == ".onnx":
        return p.with_suffix(".manifest.json")
    return p.with_name(p.name + ".manifest.json")


def versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    from gpcl_trt import __version__

    out["gpcl-trt"] = __version__
    return out


def write_manifest(
    artifact: str | os.PathLike,
    stage: str,
    inputs: dict[str, Any],
    options: dict[str, Any],
    results: dict[str, Any] | None = None,
    packages: Iterable[str] = (),
    force: bool = True,
    weight_files: dict[str, Any] | None = None,
) -> Path:
    """Write the stage manifest next to ``artifact``: input hashes, versions, options, results.
    The artifact's own sha256 is included so a later stage can detect a stale file, and the
    identity of every weight file it reads (``weight_files``; for an ONNX artifact, read from its
    external data when not given) so that a later command notices a file replaced under it."""
    art = Path(artifact)
    if weight_files is None and art.suffix == ".onnx" and art.is_file():
        from gpcl_trt.weightfiles import record

        weight_files = record(load_onnx(art, external_data=False), art.parent)
    doc = {
        "stage": stage,
        "artifact": art.name,
        "artifact_sha256": sha256_file(art) if art.is_file() else None,
        "inputs": inputs,
        "options": options,
        "results": results or {},
        "weight_files": weight_files or {},
        "versions": versions(*packages),
        "created_unix": int(time.time()),
    }
    return write_json_atomic(manifest_path(art), doc, force=force)


def read_manifest(artifact: str | os.PathLike) -> dict[str, Any] | None:
    p = manifest_path(artifact)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr)
