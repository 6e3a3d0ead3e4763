"""Export options checked and resolved before any work: dtype, opset, tolerances, validation mode
and the memory budget (``8G``, ``512M``...)."""

from __future__ import annotations

import math
import os

from gpcl_trt.common import GpclError

DTYPES = ("fp32", "fp16", "bf16")  # bf16: lazy export only (a bf16 checkpoint linked as is), no ORT validation on CPU
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MIN_OPSET, MAX_OPSET = 18, 23


VALIDATE_MODES = ("auto", "full", "layers", "none")
DEFAULT_BUDGET_FRACTION = 0.5  # of MemAvailable when the command starts
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory_budget(value: str | int | float | None) -> int:
    """``"8G"``, ``"512M"``, ``"0.5G"``, a byte count, or None (the default: half of the memory
    available now) -> bytes. Anything else (``inf``, ``nan``, ``1e400``, ``-1``, ``0``, ``abc``)
    is one line (a GpclError), never an OverflowError out of ``int(inf)``."""
    if value is None:
        return int(available_memory() * DEFAULT_BUDGET_FRACTION)
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            n = float(value)
        else:
            text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
            unit = text[-1:] if text[-1:] in _UNITS else ""
            n = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
        raise GpclError(f"memory budget {value!r} is not a size (e.g. 8G, 512M)") from None
    if not math.isfinite(n):  # float() reads "inf", "nan" and "1e400" (inf) as numbers
        raise GpclError(f"memory budget {value!r} is not a finite size (e.g. 8G, 512M)")
    if n < 1:
        raise GpclError(f"memory budget must be at least 1 byte, got {value!r}")
    return int(n)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def validate_mode(validate: bool | str) -> str:
    if validate is True:
        return "auto"
    if validate is False or validate is None:
        return "none"
    if validate not in VALIDATE_MODES:
        raise GpclError(f"unknown validation mode {validate!r}; choose {', '.join(VALIDATE_MODES)}")
    return validate
