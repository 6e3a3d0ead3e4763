"""Build and call the GPCL native code in plugins/gpcl/ from Python: the host check of the shared
math (CI, no GPU), the CUDA kernel library (compile check in CI; GPU tests and the benchmark
call it through ctypes), and a compile of the TensorRT plugin against given TensorRT headers.

Nothing here needs CMake (the tests build straight with the compilers, in a temporary folder);
``make kernel`` builds the same sources with plugins/gpcl/CMakeLists.txt.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from gpcl_trt.common import GpclError
from gpcl_trt.plugins.reference import MODE_IDS, check_args

SRC = Path(__file__).resolve().parent / "gpcl"
DEFAULT_ARCHS = ("80", "89", "90")
DTYPE_IDS = {"float32": 0, "float16": 1, "bfloat16": 2}


def cuda_home() -> Path:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_fp16.h").exists():
            return Path(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    raise GpclError("CUDA toolkit not found (set CUDA_HOME): the GPCL native code needs its headers")


def nvcc_path() -> str:
    nvcc = shutil.which("nvcc") or str(cuda_home() / "bin" / "nvcc")
    if not Path(nvcc).exists():
        raise GpclError("nvcc not found: the GPCL kernel needs the CUDA compiler")
    return nvcc


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GpclError(
            f"{Path(cmd[0]).name} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )


def build_host_check(out_dir: str | os.PathLike, cxx: str = "g++") -> Path:
    """Compile gpcl_host_check.cpp (the kernel's per-group code, for the CPU)."""
    exe = Path(out_dir) / "gpcl_host_check"
    _run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            "-ffp-contract=off",
            f"-I{cuda_home() / 'include'}",
            str(SRC / "gpcl_host_check.cpp"),
            "-o",
            str(exe),
        ]
    )
    return exe


def kernel_compile_cmd(output: Path, archs=DEFAULT_ARCHS, shared: bool = True) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    kind = ["-shared"] if shared else ["-c"]
    # --fmad=false: no FMA contraction, so the math rounds like the reference.
    return [
        nvcc_path(),
        "-O3",
        "--fmad=false",
        "-std=c++17",
        "-Xcompiler",
        "-fPIC",
        *kind,
        *gencode,
        str(SRC / "gpcl_kernel.cu"),
        "-o",
        str(output),
    ]


def build_kernel_library(out_dir: str | os.PathLike, archs=DEFAULT_ARCHS) -> Path:
    """nvcc the kernel into ``libgpcl_kernel.so`` for the given sm_XX architectures."""
    lib = Path(out_dir) / "libgpcl_kernel.so"
    _run(kernel_compile_cmd(lib, archs))
    return lib


def _strict_cxx(cxx: str, tensorrt_include, optimize: str) -> list[str]:
    """The C++ compile of the plugin code: warnings are errors; TensorRT's headers are system
    headers (their own warnings are not ours)."""
    return [cxx, "-std=c++17", optimize, "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
            "-isystem", str(tensorrt_include), f"-I{cuda_home() / 'include'}"]  # fmt: skip


def _plugin_objects(out: Path, tensorrt_include, archs, cxx: str) -> tuple[Path, Path]:
    kernel_o = out / "gpcl_kernel.o"
    if not kernel_o.exists():
        _run(kernel_compile_cmd(kernel_o, archs, shared=False))
    plugin_o = out / "gpcl_plugin.o"
    if not plugin_o.exists():
        _run(
            [
                *_strict_cxx(cxx, tensorrt_include, "-O2"),
                "-fPIC",
                "-c",
                str(SRC / "gpcl_plugin.cpp"),
                "-o",
                str(plugin_o),
            ]
        )
    return kernel_o, plugin_o


def _link_cudart() -> list[str]:
    lib = cuda_home() / "lib64"
    return [f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"]


def build_plugin(
    out_dir: str | os.PathLike, tensorrt_include: str | os.PathLike, archs=("90",), cxx: str = "g++"
) -> Path:
    """Compile the IPluginV3 plugin + kernel into ``libgpcl_trt_plugin.so`` against TensorRT headers.
    libnvinfer is not linked: TensorRT resolves getPluginRegistry when it loads the library."""
    out = Path(out_dir)
    kernel_o, plugin_o = _plugin_objects(out, tensorrt_include, archs, cxx)
    lib = out / "libgpcl_trt_plugin.so"
    _run([cxx, "-shared", "-o", str(lib), str(plugin_o), str(kernel_o), *_link_cudart()])
    return lib


def build_plugin_check(
    out_dir: str | os.PathLike, tensorrt_include: str | os.PathLike, archs=("90",), cxx: str = "g++"
) -> Path:
    """Compile gpcl_plugin_check.cpp (the plugin's build-time logic, exercised on the host)."""
    out = Path(out_dir)
    kernel_o, plugin_o = _plugin_objects(out, tensorrt_include, archs, cxx)
    exe = out / "gpcl_plugin_check"
    sources = [str(SRC / "gpcl_plugin_check.cpp"), str(plugin_o), str(kernel_o)]
    _run([*_strict_cxx(cxx, tensorrt_include, "-O1"), *sources, "-o", str(exe), *_link_cudart()])
    return exe


def tensorrt_version(include_dir: str | os.PathLike) -> str:
    """``MAJOR.MINOR.PATCH`` from NvInferVersion.h."""
    import re

    text = (Path(include_dir) / "NvInferVersion.h").read_text()
    parts = []
    for key in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define (?:NV_TENSORRT_{key}|TRT_{key}_ENTERPRISE) (\d+)", text)
        parts.append(m.group(1) if m else "?")
    return ".".join(parts)


class KernelLibrary:
    """ctypes binding of ``gpcl_forward`` (plugins/gpcl/gpcl_kernel.h), called with torch CUDA
    tensors. The launch is asynchronous on the current torch stream."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        f = self.lib.gpcl_forward
        f.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        f.restype = ctypes.c_int
        self.lib.gpcl_error_string.restype = ctypes.c_char_p
        self.lib.gpcl_abi_version.restype = ctypes.c_int

    def forward(self, x, tau, mode: str = "clamp", eps: float = 1e-6, out=None):
        """GPCL of a contiguous CUDA tensor ``x`` into ``out`` (new tensor if None; may be x)."""
        import torch

        dtype = str(x.dtype).replace("torch.", "")
        if dtype not in DTYPE_IDS or not x.is_cuda or not x.is_contiguous():
            raise GpclError(f"GPCL kernel needs a contiguous CUDA float32/float16/bfloat16 tensor, got {x.dtype}")
        d = x.shape[-1]
        tau_t = tau if isinstance(tau, torch.Tensor) else None
        check_args(d, tuple(tau_t.shape) if tau_t is not None else (), mode, eps)
        out = torch.empty_like(x) if out is None else out
        # The kernel trusts its pointers: a mismatched out or tau would be an out-of-bounds access.
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise GpclError(
                f"GPCL kernel: out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
            )
        tau_ptr, gpr, tau_scalar = None, 1, 0.0
        if tau_t is not None:
            if tau_t.dtype != torch.float32 or tau_t.device != x.device or not tau_t.is_contiguous():
                raise GpclError(f"GPCL kernel needs tau as a contiguous float32 tensor on {x.device}")
            tau_ptr, gpr = tau_t.data_ptr(), tau_t.numel()
        else:
            tau_scalar = float(tau)
        rc = self.lib.gpcl_forward(
            x.data_ptr(),
            out.data_ptr(),
            x.numel() // 4,
            gpr,
            tau_ptr,
            tau_scalar,
            eps,
            MODE_IDS[mode],
            DTYPE_IDS[dtype],
            torch.cuda.current_stream().cuda_stream,
        )
        if rc != 0:
            raise GpclError(f"gpcl_forward: {self.lib.gpcl_error_string(rc).decode()}")
        return out
