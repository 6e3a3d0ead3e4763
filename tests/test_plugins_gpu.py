"""The GPCL CUDA kernel on a GPU (through its C ABI, via ctypes and torch) against the reference:
every dtype and mode, scalar and per-group tau, odd row counts, unaligned pointers, in place,
a non-default stream, and NaN-poisoned outputs that must be fully overwritten.

Needs a CUDA GPU and torch with CUDA; the kernel library is built with nvcc for the device's
architecture, or taken from GPCL_KERNEL_LIB (tools/gpu_check.sh builds it once)."""

from __future__ import annotations

import ctypes
import os

import pytest

from gpcl_trt.common import GpclError
from gpcl_trt.plugins import native
from gpcl_trt.plugins.reference import MODES, gpcl_numpy

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA device + torch with CUDA)"),
]
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = os.environ.get("GPCL_KERNEL_LIB")
    if not path:
        major, minor = torch.cuda.get_device_capability()
        path = native.build_kernel_library(tmp_path_factory.mktemp("kernel"), archs=(f"{major}{minor}",))
    return native.KernelLibrary(path)


def sample(shape, seed):
    """Random groups at several scales (never all zeros), plus zero, sub-eps, NaN, Inf and
    overflowing groups."""
    g = torch.Generator().manual_seed(seed)
    groups = shape[-1] // 4
    scale = torch.tensor([1e-8, 1e-3, 0.3, 1.0, 5.0, 300.0])[torch.randint(0, 6, (*shape[:-1], groups, 1), generator=g)]
    x = (torch.randn(*shape[:-1], groups, 4, generator=g) * scale).reshape(shape)
    flat = x.view(-1, 4)
    flat[0] = 0
    if flat.shape[0] > 4:
        flat[1] = torch.tensor([4e-7, 0, -3e-7, 0])
        flat[2, 1] = float("nan")
        flat[3, 3] = float("inf")
        flat[4, 0] = float("-inf")
    if flat.shape[0] > 6:
        flat[5] = torch.tensor([3e19, 0, -1e19, 0])  # the float32 sum of squares overflows (float16: Inf)
        flat[6] = torch.tensor([3e38, 3e38, 0, 0])  # radius > FLT_MAX
    return x


def reference(x_dev, tau, mode, eps):
    """gpcl_numpy on the exact values the kernel sees, rounded to the kernel's dtype."""
    x32 = x_dev.float().cpu().numpy()
    tau_np = tau.cpu().numpy() if isinstance(tau, torch.Tensor) else tau
    return torch.from_numpy(gpcl_numpy(x32, tau_np, mode, eps)).to(x_dev.dtype)


def assert_kernel_matches(y, ref, mode):
    y32, r32 = y.float().cpu(), ref.float().cpu()
    assert torch.equal(torch.isnan(y32), torch.isnan(r32))
    if mode == "soft":  # CUDA tanhf vs numpy tanh: a couple of float32 ulps, one output ulp
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[y.dtype]
        torch.testing.assert_close(y32, r32, rtol=tol, atol=1e-12, equal_nan=True)
    else:  # same float32 operations in the same order (no FMA): identical
        assert torch.equal(torch.nan_to_num(y32, nan=0.0), torch.nan_to_num(r32, nan=0.0))


SHAPES = [(4,), (1, 4096), (7, 384), (3, 5, 64), (2049, 36), (2, 3, 5, 12)]


@pytest.mark.parametrize("per_group", [False, True], ids=["tau-scalar", "tau-per-group"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(kernel, mode, dtype, per_group):
    for i, shape in enumerate(SHAPES):
        x = sample(shape, seed=i).to("cuda", getattr(torch, dtype))
        g = shape[-1] // 4
        tau = torch.linspace(0.5, 3, g, device="cuda") if per_group else 1.5
        eps = 1e-3 if mode == "hopf" else 1e-6
        y = kernel.forward(x, tau, mode, eps)
        torch.cuda.synchronize()
        assert y.shape == x.shape and y.dtype == x.dtype
        assert_kernel_matches(y, reference(x, tau, mode, eps), mode)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_pointers_take_the_scalar_path(kernel, dtype):
    """x and y one element off a group boundary (no vector loads possible)."""
    n = 1001 * 4
    buf_x = sample((n + 4,), seed=3).to("cuda", getattr(torch, dtype))
    buf_y = torch.full((n + 4,), float("nan"), device="cuda", dtype=buf_x.dtype)
    x, y = buf_x[1 : n + 1], buf_y[3 : n + 3]
    assert x.data_ptr() % (4 * x.element_size()) != 0
    kernel.forward(x, 2.0, "clamp", out=y)
    torch.cuda.synchronize()
    assert_kernel_matches(y, reference(x, 2.0, "clamp", 1e-6), "clamp")
    assert torch.isnan(buf_y[:3]).all() and torch.isnan(buf_y[n + 3 :]).all()  # nothing outside y written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1025, 4096), (3, 7, 40)])
def test_poisoned_output_fully_written(kernel, dtype, shape):
    """Finite input, NaN-filled output: every element must be overwritten (the big shape needs
    several grid-stride iterations)."""
    x = (torch.randn(shape, device="cuda") * 3).to(getattr(torch, dtype))
    for mode in MODES:
        y = torch.full_like(x, float("nan"))
        kernel.forward(x, 1.0, mode, out=y)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), mode


def test_in_place_and_on_a_side_stream(kernel):
    x = sample((513, 256), seed=7).cuda()
    ref = reference(x, 0.8, "hopf", 1e-6)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernel.forward(x, 0.8, "hopf", out=x)
    stream.synchronize()
    assert_kernel_matches(x, ref, "hopf")


def test_c_abi_refuses_bad_arguments(kernel):
    x = torch.ones(8, device="cuda")
    f = kernel.lib.gpcl_forward
    null = ctypes.c_void_p(0)
    assert f(x.data_ptr(), x.data_ptr(), 2, 1, null, 1.0, 1e-6, 7, 0, null) == 1  # mode
    assert f(x.data_ptr(), x.data_ptr(), 2, 1, null, 1.0, 1e-6, 0, 9, null) == 1  # dtype
    assert f(x.data_ptr(), x.data_ptr(), 2, 1, null, -1.0, 1e-6, 0, 0, null) == 1  # tau <= 0
    assert f(null, null, 0, 1, null, 1.0, 1e-6, 0, 0, null) == 0  # empty: nothing to do
    assert kernel.lib.gpcl_abi_version() == 1
    with pytest.raises(GpclError, match="contiguous CUDA"):
        kernel.forward(torch.ones(8), 1.0)
