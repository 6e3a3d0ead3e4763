"""Export options checked and resolved before any work: dtype (``auto``: the checkpoint's own),
opset, tolerances, validation mode and the memory budget (``8G``, ``512M``...)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from gpcl_trt.common import GpclError
from gpcl_trt.tolerance import DEFAULT_ATOL, DEFAULT_RTOL

DTYPES = ("fp32", "fp16", "bf16")  # bf16: lazy export only (a bf16 checkpoint linked as is), no ORT validation on CPU
DTYPE_CHOICES = ("auto", *DTYPES)
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# --dtype auto: a safetensors checkpoint's floating dtype -> the export dtype. bf16 -> fp16: ONNX
# Runtime's CPU provider has no bf16 MatMul, so a bf16 export cannot be validated here, and fp16
# keeps the 2-byte size (fp32 would double it: a 7B bf16 checkpoint became 27 GB).
AUTO_DTYPE = {"F64": "fp32", "F32": "fp32", "F16": "fp16", "BF16": "fp16"}
_STORED_NAME = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
MIN_OPSET, MAX_OPSET = 18, 23


def resolve_dtype(dtype: str, model_dir: Path) -> tuple[str, str]:
    """(the export dtype, why) for ``--dtype`` (``auto`` or a dtype) and a checked model
    directory. ``auto``: the floating dtype holding most of a safetensors checkpoint's
    floating-point bytes, read from the headers (fp32 -> fp32, fp16 -> fp16, bf16 -> fp16); fp32
    for pickle weights (their dtype is known only once they are loaded)."""
    if dtype != "auto":
        return dtype, f"--dtype {dtype} asked for"
    if not any(model_dir.glob("*.safetensors")):
        return "fp32", "auto: pickle weights (their dtype is read only by loading them): fp32"
    from gpcl_trt.exporter.checkpoint import Checkpoint

    stored: dict[str, int] = {}
    for entry in Checkpoint.open(model_dir).tensors.values():
        if entry.dtype in AUTO_DTYPE:
            stored[entry.dtype] = stored.get(entry.dtype, 0) + entry.nbytes
    if not stored:
        return "fp32", "auto: the checkpoint stores no floating-point tensors: fp32"
    main = max(stored, key=lambda k: stored[k])
    share = stored[main] / sum(stored.values())
    chosen = AUTO_DTYPE[main]
    what = f"auto: the checkpoint stores {_STORED_NAME[main]} ({share:.0%} of its floating-point bytes)"
    if main == "BF16":
        return chosen, f"{what}: fp16 (ONNX Runtime's CPU provider cannot validate bf16; fp16 keeps the 2-byte size)"
    return chosen, f"{what}: {chosen}"


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


@dataclass
class Options:
    """The export options once checked. ``dtype``, ``atol`` and ``rtol`` are final after
    :meth:`resolve` has read the checkpoint (``auto``, and the tolerance defaults by dtype)."""

    asked_dtype: str
    opset: int
    atol: float | None
    rtol: float | None
    validate: str
    memory_budget: int
    dtype: str = ""
    dtype_reason: str = ""

    def resolve(self, model_dir: Path) -> None:
        self.dtype, self.dtype_reason = resolve_dtype(self.asked_dtype, model_dir)
        self.atol = DEFAULT_ATOL[self.dtype] if self.atol is None else self.atol
        self.rtol = DEFAULT_RTOL[self.dtype] if self.rtol is None else self.rtol

    def as_manifest(self) -> dict:
        """The manifest's options (and the result's), less those the caller adds."""
        return {
            "opset": self.opset,
            "dtype": self.dtype,
            "dtype_requested": self.asked_dtype,
            "dtype_reason": self.dtype_reason,
            "atol": self.atol,
            "rtol": self.rtol,
            "validate": self.validate,
            "memory_budget": self.memory_budget,
        }


def check_options(
    dtype: str,
    opset: int,
    atol: float | None,
    rtol: float | None,
    validate: bool | str,
    memory_budget: str | int | None,
    lazy: bool | None,
) -> Options:
    """Every option checked before any work; one line (GpclError) for the first that is wrong."""
    if dtype not in DTYPE_CHOICES:
        raise GpclError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise GpclError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    atol = None if atol is None else float(atol)
    if atol is not None and not atol >= 0:
        raise GpclError(f"atol must be >= 0, got {atol}")
    rtol = None if rtol is None else float(rtol)
    if rtol is not None and not rtol >= 0:
        raise GpclError(f"rtol must be >= 0, got {rtol}")
    mode = validate_mode(validate)
    budget = parse_memory_budget(memory_budget)
    if dtype == "bf16" and mode != "none":
        raise GpclError(
            "--dtype bf16 cannot be validated here (ONNX Runtime's CPU provider has no bf16 MatMul); pass --validate "
            "none"
        )
    if dtype == "bf16" and lazy is False:
        raise GpclError("--dtype bf16 is exported lazily only (safetensors checkpoints)")
    return Options(dtype, int(opset), atol, rtol, mode, budget)


def quantize_options(
    weights: str | None,
    block_size: int | None,
    asymmetric: bool,
    method: str | None,
    keep: tuple,
    lm_head: bool,
    keep_float: bool,
) -> dict | None:
    """``export --quantize``'s options as quantize_model's keywords, or None without --quantize
    (then a quantize-only option is an error, not silently ignored)."""
    if weights is None:
        given = [
            flag
            for flag, value in (
                ("--block-size", block_size is not None),
                ("--asymmetric", asymmetric),
                ("--method", method is not None),
                ("--keep", bool(keep)),
                ("--lm-head", lm_head),
                ("--keep-float", keep_float),
            )
            if value
        ]
        if given:
            raise GpclError(f"{', '.join(given)} only apply with --quantize int8|int4")
        return None
    return {
        "weights": weights,
        "block_size": 32 if block_size is None else block_size,
        "symmetric": not asymmetric,
        "method": method or "rtn",
        "keep": tuple(keep),
        "lm_head": lm_head,
    }
