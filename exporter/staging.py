"""Multi-file outputs that appear under their final names only when every check has passed.

``Staging(out_dir, name)`` makes a hidden directory ``.NAME.gpcl-PID-XXXXXXXX.tmp`` next to the
outputs (same filesystem, so the final renames are atomic and hard links work). The command writes
every file of the output there under its final name (an ONNX file's relative external-data paths
then resolve inside it), runs its checks on those files, and only then ``commit()``s: each file is
renamed into place, data files first, the ONNX file after them and the manifest last.

A process killed with SIGKILL cannot clean up; its directory carries its pid, so the next
``Staging`` in the same directory removes every staging directory of ours whose owner is dead
(``gpcl_trt.common.remove_stale_temps``). Nothing else is ever removed: only names of exactly this pattern.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gpcl_trt.common import GpclError, remove_stale_temps, temp_sibling


class Staging:
    """A hidden temporary directory for one command's outputs; see the module docstring."""

    def __init__(self, out_dir: Path, name: str):
        self.out_dir = Path(out_dir)
        self.stale_removed = remove_stale_temps(self.out_dir)  # the naming scheme of common.atomic_path
        self.path = temp_sibling(self.out_dir / name)
        os.mkdir(self.path)  # the umask's mode, like a plain mkdir: a server may run as another user
        self.committed: list[Path] = []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def file(self, name: str) -> Path:
        return self.path / name

    def commit(self, order: list[str], force: bool) -> list[Path]:
        """Rename the staged files into the output directory in ``order`` (every file of the
        staging directory must be named). Without ``force`` an existing output is an error (the
        command checked up front; this catches a race)."""
        present = set(os.listdir(self.path))
        if present != set(order):
            raise GpclError(f"internal: staged files {sorted(present)} differ from the outputs {sorted(order)}")
        if not force:
            for n in order:
                if (self.out_dir / n).exists():
                    raise GpclError(f"{self.out_dir / n} exists; pass --force to overwrite it")
        for n in order:
            os.replace(self.path / n, self.out_dir / n)
            self.committed.append(self.out_dir / n)
        return list(self.committed)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
