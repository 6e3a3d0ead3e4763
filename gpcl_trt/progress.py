"""Progress display on stderr (stdout stays clean for --json)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


@contextlib.contextmanager
def step(description: str) -> Iterator[None]:
    """A spinner for one long step; prints the step's wall time when it ends."""
    import time

    t0 = time.perf_counter()
    with console.status(description):
        yield
    console.print(f"[green]done[/green] {description} ({time.perf_counter() - t0:.1f} s)")
