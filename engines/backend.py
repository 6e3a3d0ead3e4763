"""Run-time choice between full TensorRT (module ``tensorrt``) and TensorRT-RTX (module
``tensorrt_rtx``). Both expose the same Python API for what we use; the differences we rely on
are listed once, in :class:`Capabilities`, so the build code is written once for both."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
from types import ModuleType
from typing import Any, Iterator

from gpcl_trt.common import GpclError

BACKEND_CHOICES = ("auto", "tensorrt", "tensorrt-rtx")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend can do. Each field names a behaviour, not a backend, so build code
    asks ``caps.plugins`` instead of ``name == 'tensorrt'``."""

    module: str  # importable Python module
    extra: str  # the gpcl-trt extra that installs it
    # IPluginV3 libraries through the ONNX parser (--gpcl plugin).
    plugins: bool
    # BuilderFlag.FP16 / BF16 exist (weakly typed networks). TensorRT-RTX only builds strongly
    # typed networks, so lower precision there means lower-precision ONNX weights and compute.
    precision_flags: bool
    # Timing cache load/save has an effect (TensorRT-RTX: documented no-op since 1.2).
    timing_cache: bool


CAPABILITIES = {
    "tensorrt": Capabilities(module="tensorrt", extra="trt", plugins=True, precision_flags=True, timing_cache=True),
    "tensorrt-rtx": Capabilities(
        module="tensorrt_rtx", extra="rtx", plugins=False, precision_flags=False, timing_cache=False
    ),
}

# auto prefers full TensorRT: it is the one that can use the GPCL plugin.
_AUTO_ORDER = ("tensorrt", "tensorrt-rtx")


class CallbackErrors:
    """An exception raised inside a Python callback that TensorRT calls (logger, progress
    monitor, plan writer) is printed and dropped by the bindings: Ctrl-C (KeyboardInterrupt, or
    the CLI's exception on SIGTERM) landing in the logger let the build finish and the engine be
    committed with exit 0. Callbacks run their body in ``catch()``, which keeps the first such
    exception; the progress monitor then cancels the build, and ``reraising()`` around the
    TensorRT call raises it once the call returns."""

    def __init__(self) -> None:
        self._pending: BaseException | None = None
        self._wakeup: int | None = None  # read end of the signal wake-up pipe while a call runs

    @property
    def pending(self) -> BaseException | None:
        """The exception to raise, also a signal received since ``watching_signals()`` began: the
        Python handler runs only on the main thread between bytecodes, never while the main thread
        waits inside TensorRT (callbacks may run on TensorRT's threads), but the wake-up pipe is
        written by the C handler at once, so every callback sees Ctrl-C or SIGTERM as it lands."""
        if self._pending is None and self._wakeup is not None:
            try:
                got = os.read(self._wakeup, 64)
            except (BlockingIOError, OSError):
                got = b""
            if signal.SIGTERM in got:
                from gpcl_trt.common import Terminated

                self._pending = Terminated()
            elif signal.SIGINT in got:
                self._pending = KeyboardInterrupt()
        return self._pending

    @pending.setter
    def pending(self, exc: BaseException | None) -> None:
        self._pending = exc

    @contextlib.contextmanager
    def watching_signals(self) -> Iterator[None]:
        """Around a long TensorRT call made on the main thread: SIGINT / SIGTERM also reach
        ``pending`` through a wake-up pipe (see there)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wakeup = r
        try:
            yield
        finally:
            signal.set_wakeup_fd(old)
            self._wakeup = None
            os.close(r)
            os.close(w)

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:  # an interrupt above all must survive the binding
            if self.pending is None:
                self.pending = exc

    def raise_pending(self) -> None:
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc

    @contextlib.contextmanager
    def reraising(self) -> Iterator[None]:
        """Around a TensorRT call: a callback's exception is raised when the call returns, and
        wins over the failure it caused (a cancelled build reports the interrupt, not itself)."""
        try:
            yield
        except BaseException:
            self.raise_pending()
            raise
        self.raise_pending()


class _Logger:
    """One logger per backend module (TensorRT warns when builders get different loggers).
    Messages are kept so errors can quote them; nothing is printed unless ``echo`` is set."""

    def __init__(self, trt: ModuleType) -> None:
        sev = trt.ILogger.Severity
        self._rank = {sev.INTERNAL_ERROR: 0, sev.ERROR: 1, sev.WARNING: 2, sev.INFO: 3, sev.VERBOSE: 4}
        self.messages: list[tuple[str, str]] = []
        self.echo_level = 1  # errors only, on stderr
        # Shared by every callback of this backend (the logger reaches them all).
        self.errors = CallbackErrors()

        outer = self

        class Impl(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                with outer.errors.catch():
                    outer._log(severity, msg)

        self.impl = Impl()

    def _log(self, severity: Any, msg: str) -> None:
        rank = self._rank.get(severity, 4)
        if rank <= 3:
            self.messages.append((str(severity).rsplit(".", 1)[-1], msg))
        if rank <= self.echo_level and self.errors.pending is None:  # not the errors of a cancelled call
            from gpcl_trt.common import eprint

            eprint(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Echo nothing for a call whose errors are expected (e.g. a GPU query without a GPU)."""
        level, self.echo_level = self.echo_level, -1
        try:
            yield
        finally:
            self.echo_level = level

    def take(self) -> list[tuple[str, str]]:
        out, self.messages = self.messages, []
        return out


@dataclasses.dataclass
class Backend:
    name: str
    trt: ModuleType
    caps: Capabilities
    logger: _Logger

    @property
    def version(self) -> str:
        return str(self.trt.__version__)


_LOADED: dict[str, Backend] = {}


def _import(name: str) -> Backend | None:
    if name in _LOADED:
        return _LOADED[name]
    caps = CAPABILITIES[name]
    try:
        trt = importlib.import_module(caps.module)
    except ImportError:
        return None
    backend = Backend(name=name, trt=trt, caps=caps, logger=_Logger(trt))
    _LOADED[name] = backend
    return backend


def load_backend(name: str = "auto") -> Backend:
    """The backend ``name`` (``auto``: full TensorRT if installed, else TensorRT-RTX); a missing
    one is a clear error naming the extra that installs it."""
    if name not in BACKEND_CHOICES:
        raise GpclError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    order = _AUTO_ORDER if name == "auto" else (name,)
    for candidate in order:
        backend = _import(candidate)
        if backend is not None:
            return backend
    if name == "auto":
        raise GpclError(
            "no TensorRT backend is installed: pip install 'gpcl-trt[rtx]' (TensorRT-RTX, builds without a GPU) "
            "or 'gpcl-trt[trt]' (full TensorRT)"
        )
    caps = CAPABILITIES[name]
    raise GpclError(f"backend {name} needs the Python module {caps.module}: pip install 'gpcl-trt[{caps.extra}]'")
