"""Build progress on stderr through the builder's IProgressMonitor (both backends have one), which
is also how an interrupt cancels a build (backend.CallbackErrors)."""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any


class BuildProgress:
    """Context manager: attaches a progress monitor to ``config`` for the build and shows one
    bar per builder phase (nested phases indented). A backend without ``IProgressMonitor``
    builds without a bar. ``errors``: the backend's CallbackErrors; once one is pending (Ctrl-C
    landed in a callback), the monitor asks the builder to stop."""

    def __init__(self, trt: ModuleType, config: Any, errors: Any) -> None:
        self.trt, self.config, self.errors = trt, config, errors
        self.phases: list[str] = []  # phase names seen, in order (kept for tests and logs)
        # Wall seconds per phase (phases nest; a repeated phase is summed): where a build's
        # time goes, for the manifest and tools/bench_build.py.
        self.seconds: dict[str, float] = {}
        self._monitor = None
        self._progress = None
        self._tasks: dict[str, tuple[Any, int, float]] = {}

    def __enter__(self) -> "BuildProgress":
        if not hasattr(self.trt, "IProgressMonitor") or not hasattr(self.config, "progress_monitor"):
            return self
        from gpcl_trt.progress import make_progress

        self._progress = make_progress()
        self._progress.start()
        self._monitor = _make_monitor(self.trt, self, self.errors)
        self.config.progress_monitor = self._monitor
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._monitor is not None:
            self.config.progress_monitor = None

    # Called from the builder thread, via the monitor.
    def start(self, parent: str | None, phase: str, steps: int) -> None:
        self.phases.append(phase)
        depth = self._depth(parent)
        task = self._progress.add_task(f"{'  ' * depth}{phase}", total=max(steps, 1))
        self._tasks[phase] = (task, depth, time.perf_counter())

    def step(self, phase: str) -> None:
        if phase in self._tasks:
            self._progress.advance(self._tasks[phase][0])

    def finish(self, phase: str) -> None:
        task = self._tasks.pop(phase, None)
        if task is None:
            return
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - task[2], 3)
        # Inner phases disappear when done; the two outer levels stay as the build log.
        if task[1] > 1:
            self._progress.remove_task(task[0])
        else:
            total = next(t.total for t in self._progress.tasks if t.id == task[0])
            self._progress.update(task[0], completed=total)

    def _depth(self, parent: str | None) -> int:
        return 0 if parent is None or parent not in self._tasks else self._tasks[parent][1] + 1


def _make_monitor(trt: ModuleType, sink: BuildProgress, errors: Any) -> Any:
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with errors.catch():
                sink.start(parent_phase, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with errors.catch():
                sink.step(phase_name)
            return errors.pending is None  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            with errors.catch():
                sink.finish(phase_name)

    return Monitor()
