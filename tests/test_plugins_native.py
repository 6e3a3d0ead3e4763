"""The native GPCL code without a GPU: the shared math header compiled for the host against the
reference, the CUDA kernel library compiled for sm_80/89/90, and the TensorRT plugin compiled
against TensorRT headers (TENSORRT_INCLUDE) and loaded into TensorRT-RTX's plugin registry."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpcl_trt.plugins import native
from gpcl_trt.plugins.reference import MODE_IDS, MODES, gpcl_numpy

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _np_dtype(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    try:
        native.cuda_home()
    except Exception:
        pytest.skip("needs the CUDA headers (cuda_fp16.h)")
    return native.build_host_check(tmp_path_factory.mktemp("host_check"))


def edge_groups(g: int, seed: int) -> np.ndarray:
    """[rows, 4g] float32: random groups at several scales plus zero, sub-eps, boundary,
    NaN, Inf and float32-overflowing groups."""
    rng = np.random.default_rng(seed)
    rows = 9
    scale = rng.choice([1e-8, 1e-3, 0.3, 1, 5, 300], size=(rows, g, 1))
    x = (rng.standard_normal((rows, g, 4)) * scale).astype(np.float32)
    x[0, 0] = 0
    x[0, 1] = [4e-7, 0, -3e-7, 0]
    x[1, 0] = [1.5, 0, 0, 0]  # exactly on the tau = 1.5 sphere
    x[1, 1, 2] = np.nan
    x[2, 0, 3] = np.inf
    x[2, 1, 0] = -np.inf
    x[3, 0] = [3e19, 0, 0, 0]  # finite, but the sum of squares overflows float32
    x[3, 1] = [-2e37, 1e37, 0, 3e36]  # likewise, on every channel
    x[4, 0] = [3e38, 3e38, 0, 0]  # true radius > FLT_MAX: +Inf in float32, bounded output
    return x.reshape(rows, 4 * g)


def run_host(exe: Path, x: np.ndarray, tau, mode: str, eps: float, tmp: Path) -> np.ndarray:
    g = x.shape[-1] // 4
    x.tofile(tmp / "x.bin")
    tau_arg = "-"
    if np.ndim(tau):
        np.asarray(tau, np.float32).tofile(tmp / "tau.bin")
        tau_arg = str(tmp / "tau.bin")
    scalar = float(tau) if not np.ndim(tau) else 1.0
    subprocess.run(
        [
            str(exe),
            str(MODE_IDS[mode]),
            str(DTYPES[str(x.dtype)]),
            repr(eps),
            repr(scalar),
            str(x.size // 4),
            str(g),
            str(tmp / "x.bin"),
            tau_arg,
            str(tmp / "y.bin"),
        ],
        check=True,
    )
    return np.fromfile(tmp / "y.bin", dtype=x.dtype).reshape(x.shape)


@pytest.mark.parametrize("per_group", [False, True], ids=["tau-scalar", "tau-per-group"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_host_math_matches_reference(host_check, tmp_path, mode, dtype, per_group):
    g = 6
    with np.errstate(over="ignore"):  # the overflow groups become Inf in float16: NaN out
        x = edge_groups(g, seed=MODE_IDS[mode]).astype(_np_dtype(dtype))
    tau = np.linspace(0.5, 3, g).astype(np.float32) if per_group else 1.5
    eps = 1e-6 if mode != "hopf" else 1e-3
    y = run_host(host_check, x, tau, mode, eps, tmp_path)
    ref = gpcl_numpy(x, tau, mode, eps)
    yf, rf = y.astype(np.float32), ref.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(yf), np.isnan(rf))
    if mode == "soft" and dtype == "float32":  # tanhf (libm) vs numpy tanh: an ulp or two
        np.testing.assert_allclose(yf, rf, rtol=1e-6, atol=1e-12)
    else:  # same operation order in float32: identical results
        np.testing.assert_array_equal(yf, rf)
    overflow = yf.reshape(-1, 4)[[3 * g, 3 * g + 1]]
    if dtype == "float16":  # 3e19 is +Inf in float16: a non-finite channel
        assert np.isnan(overflow).all()
    else:  # the sum of squares overflowed float32, the output did not
        assert np.isfinite(overflow).all() and np.isfinite(yf.reshape(-1, 4)[4 * g]).all()


def test_host_check_refuses_bad_files(host_check, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 12)  # 3 floats, not one group
    proc = subprocess.run(
        [str(host_check), "0", "0", "1e-6", "1", "1", "1", str(tmp_path / "x.bin"), "-", str(tmp_path / "y.bin")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "do not match" in proc.stderr
    assert not (tmp_path / "y.bin").exists()


def _need_nvcc():
    try:
        return native.nvcc_path()
    except Exception:
        pytest.skip("needs nvcc (the CUDA compiler)")


def test_kernel_library_compiles_for_sm80_89_90(tmp_path):
    """CI has nvcc but no GPU: the kernel must at least build for every target architecture."""
    _need_nvcc()
    lib = native.build_kernel_library(tmp_path, archs=native.DEFAULT_ARCHS)
    blob = lib.read_bytes()  # each embedded cubin names its target (no cuobjdump needed)
    for arch in native.DEFAULT_ARCHS:
        assert f"sm_{arch}".encode() in blob
    exports = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert {"gpcl_forward", "gpcl_error_string", "gpcl_abi_version"} <= set(exports.split())


@pytest.fixture(scope="module")
def plugin_lib(tmp_path_factory):
    include = os.environ.get("TENSORRT_INCLUDE")
    if not include or not (Path(include) / "NvInferRuntime.h").exists():
        pytest.skip("needs TensorRT headers (set TENSORRT_INCLUDE to a folder with NvInferRuntime.h)")
    _need_nvcc()
    return native.build_plugin(tmp_path_factory.mktemp("plugin"), include)


def test_plugin_build_logic_on_the_host(plugin_lib):
    """Creator, field (de)serialisation, types, formats and shape checks of the plugin, driven
    the way TensorRT's builder drives them (plugins/gpcl/gpcl_plugin_check.cpp)."""
    exe = native.build_plugin_check(plugin_lib.parent, os.environ["TENSORRT_INCLUDE"])
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failure(s)" in proc.stdout and proc.stdout.count("ok ") >= 25


def test_plugin_compiles_and_exports_entry_points(plugin_lib):
    exports = subprocess.run(["nm", "-D", "--defined-only", str(plugin_lib)], capture_output=True, text=True).stdout
    assert {"getCreators", "setLoggerFinder", "gpcl_forward"} <= set(exports.split())


def test_plugin_loads_into_tensorrt_rtx_registry(plugin_lib):
    """IPluginRegistry::loadLibrary finds the creator through getCreators; createPlugin parses
    the fields and refuses bad ones. (TensorRT-RTX has no plugin layers, so no engine here.)"""
    trt = pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(plugin_lib))
    assert handle is not None
    try:
        creator = registry.get_creator("GPCL", "1", "gpcl")
        assert creator is not None
        assert [f.name for f in creator.field_names] == ["mode", "tau", "eps"]

        def make(mode: str, tau: float):
            fields = trt.PluginFieldCollection(
                [
                    trt.PluginField("mode", np.frombuffer(mode.encode(), np.int8), trt.PluginFieldType.CHAR),
                    trt.PluginField("tau", np.array([tau], np.float32), trt.PluginFieldType.FLOAT32),
                ]
            )
            return creator.create_plugin("gpcl/test", fields, trt.TensorRTPhase.BUILD)

        for mode in MODES:
            plugin = make(mode, 1.5)
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == ("GPCL", "1", "gpcl")
            del core, plugin  # plugin objects must die before their library is unloaded
        assert make("tanh", 1.5) is None
        assert make("clamp", -1.0) is None
    finally:
        import gc

        gc.collect()
        registry.deregister_library(handle)
    assert registry.get_creator("GPCL", "1", "gpcl") is None


@pytest.mark.parametrize("register", ["0", "1"])
def test_plugin_registers_on_load_only_when_asked(plugin_lib, register):
    """LD_PRELOAD (Triton's way) never calls getCreators: GPCL_TRT_REGISTER_ON_LOAD=1 makes the
    library register its creator when loaded; without it nothing is registered (so that
    loadLibrary, which refuses already-registered plugins, keeps working)."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (tensorrt-rtx-cu13)")
    import importlib.util
    import sys

    libs = Path(importlib.util.find_spec("tensorrt_rtx_libs").submodule_search_locations[0])
    runtime = next(libs.glob("libtensorrt_rtx.so*"))
    code = (
        "import tensorrt_rtx as trt; c = trt.get_plugin_registry().get_creator('GPCL', '1', 'gpcl'); "
        "print(c is not None)"
    )
    env = dict(os.environ, GPCL_TRT_REGISTER_ON_LOAD=register, LD_PRELOAD=f"{runtime}:{plugin_lib}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(register == "1")
