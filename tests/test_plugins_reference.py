"""Property tests of the GPCL reference: every invariant of docs/gpcl-spec.md, numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpcl_trt.plugins.reference import MODES, gpcl_numpy, gpcl_torch

SETTINGS = settings(max_examples=40, deadline=None)
F32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def tensors(draw, elements=F32):
    """(x, tau): x float32 of rank 1..4 with D = 4*G, tau scalar or per-group."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    g = draw(st.integers(1, 6))
    x = draw(hnp.arrays(np.float32, (*lead, 4 * g), elements=elements))
    taus = st.floats(0.0625, 50, width=32)
    tau = draw(st.one_of(taus, hnp.arrays(np.float32, (g,), elements=taus)))
    return x, tau


def groups(a):
    return np.asarray(a, dtype=np.float32).reshape(-1, 4)


def radius(a):
    return np.linalg.norm(groups(a).astype(np.float64), axis=1)


def group_tau(x, tau):
    """tau broadcast to one value per group of x (flattened like ``groups``)."""
    return np.broadcast_to(np.asarray(tau, np.float64).reshape(-1), (*x.shape[:-1], x.shape[-1] // 4)).reshape(-1)


@SETTINGS
@given(tensors(), st.sampled_from(MODES))
def test_bounded_and_shape_preserved(xt, mode):
    """Invariants 1 and 5: ||Y_g|| <= t in every mode; shape and dtype preserved."""
    x, tau = xt
    y = gpcl_numpy(x, tau, mode)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.all(radius(y) <= group_tau(x, tau) * (1 + 4e-7) + 1e-30)


@SETTINGS
@given(tensors(), st.sampled_from([np.float32, np.float16, "bfloat16"]))
def test_clamp_identity_inside_ball(xt, dtype):
    """Invariant 2: clamp is bit-exact identity on groups with r <= t (after one rounding)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    x, tau = xt
    xd = x.astype(dtype)
    y = gpcl_numpy(xd, tau, "clamp")
    inside = radius(xd) <= group_tau(x, tau)
    bits = {2: np.uint16, 4: np.uint32}[xd.dtype.itemsize]
    assert np.array_equal(y.view(bits).reshape(-1, 4)[inside], xd.view(bits).reshape(-1, 4)[inside])


@SETTINGS
@given(tensors())
def test_soft_radius_and_small_groups(xt):
    """Invariant 3: ||Y_g|| = t*tanh(r/t) within rounding; groups with r <= t/10 change <= 0.4%."""
    x, tau = xt
    y = gpcl_numpy(x, tau, "soft")
    r, t = radius(x), group_tau(x, tau)
    np.testing.assert_allclose(radius(y), t * np.tanh(r / t), rtol=2e-6, atol=1e-6)
    small = r <= t / 10
    change = np.linalg.norm(groups(y) - groups(x), axis=1)[small]
    assert np.all(change <= 0.004 * r[small] + 1e-12)


def _rotate(q, theta):
    """Rotate (q0,q1) and (q2,q3) by the same angle: a move along the Hopf fiber."""
    c, s = np.cos(theta), np.sin(theta)
    out = q.astype(np.float64).copy()
    out[..., 0] = c * q[..., 0] - s * q[..., 1]
    out[..., 1] = s * q[..., 0] + c * q[..., 1]
    out[..., 2] = c * q[..., 2] - s * q[..., 3]
    out[..., 3] = s * q[..., 2] + c * q[..., 3]
    return out.astype(np.float32)


@SETTINGS
@given(tensors(st.floats(-100, 100, width=32)), st.floats(0, 2 * np.pi))
def test_hopf_invariants(xt, theta):
    """Invariant 4: ||Y|| = rho, Y(-q) = Y(q), fiber invariance, unit-norm p."""
    x, tau = xt
    y = gpcl_numpy(x, tau, "hopf")
    r, t = radius(x), group_tau(x, tau)
    big = r >= 1e-3  # well clear of eps, where u = q/r is well conditioned
    rho = np.minimum(r, t)
    np.testing.assert_allclose(radius(y)[big], rho[big], rtol=3e-6)
    assert np.all(groups(y)[r < np.float32(1e-6)] == 0)  # eps as the float32 value the op compares with
    np.testing.assert_array_equal(gpcl_numpy(-x, tau, "hopf"), y)
    y_rot = gpcl_numpy(_rotate(x.reshape(-1, 4), theta).reshape(x.shape), tau, "hopf")
    np.testing.assert_allclose(groups(y_rot)[big], groups(y)[big], atol=1e-5 * float(np.max(t)))
    g = groups(y)[big].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(g[:, :3] / g[:, 3:], axis=1), 1, rtol=1e-5)


@SETTINGS
@given(tensors(), st.sampled_from(MODES), st.data())
def test_groups_never_mix(xt, mode, data):
    """Invariant 5: changing one group changes only that group's output."""
    x, tau = xt
    y = gpcl_numpy(x, tau, mode)
    flat = x.reshape(-1, 4).copy()
    k = data.draw(st.integers(0, flat.shape[0] - 1))
    flat[k] = data.draw(hnp.arrays(np.float32, 4, elements=F32))
    y2 = groups(gpcl_numpy(flat.reshape(x.shape), tau, mode))
    others = np.arange(flat.shape[0]) != k
    np.testing.assert_array_equal(y2[others], groups(y)[others])


@SETTINGS
@given(tensors(), st.sampled_from(MODES), st.data())
def test_non_finite_groups_are_nan(xt, mode, data):
    """Invariant 6: a NaN/Inf channel makes its whole group NaN; other groups are unaffected."""
    x, tau = xt
    flat = x.reshape(-1, 4).copy()
    bad = data.draw(st.lists(st.integers(0, flat.shape[0] - 1), min_size=1, max_size=3, unique=True))
    for k in bad:
        flat[k, data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    y = groups(gpcl_numpy(flat.reshape(x.shape), tau, mode))
    mask = np.zeros(flat.shape[0], bool)
    mask[bad] = True
    assert np.all(np.isnan(y[mask]))
    np.testing.assert_array_equal(y[~mask], groups(gpcl_numpy(x, tau, mode))[~mask])


@SETTINGS
@given(
    tensors(st.floats(2.0**63, 2.0**122, width=32) | st.floats(-(2.0**122), -(2.0**63), width=32)),
    st.sampled_from(MODES),
)
def test_groups_whose_sum_of_squares_overflows_stay_exact(xt, mode):
    """Invariants 1 and 4 hold where the float32 sum of squares overflows (|q| > ~1.8e19):
    finite, ||Y|| = t (clamp, soft: the ball's radius; hopf: rho), clamp and soft keep q's
    direction, hopf's p is a unit vector."""
    x, tau = xt
    y = gpcl_numpy(x, tau, mode)
    assert np.all(np.isfinite(y))
    t = group_tau(x, tau)
    np.testing.assert_allclose(radius(y), t, rtol=2e-6)
    g = groups(y).astype(np.float64)
    if mode != "hopf":
        u = groups(x).astype(np.float64) / radius(x)[:, None]
        np.testing.assert_allclose(g / t[:, None], u, rtol=3e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(np.linalg.norm(g[:, :3] / g[:, 3:], axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_edge_of_the_float32_range(mode):
    """Where r / t underflows (soft: identity, not 0/0), and where the true radius exceeds
    FLT_MAX (r = +Inf in float32: bounded and finite, the documented limit)."""
    x = np.array([[1e-5, 0, 0, 0, 3e38, -3e38, 3e38, 0, 2e-30, 0, 0, 0]], np.float32)
    y = gpcl_numpy(x, 1e33, mode, eps=1e-32).reshape(-1, 4)
    assert np.all(np.isfinite(y))
    assert np.all(np.linalg.norm(y.astype(np.float64), axis=1) <= 1e33 * (1 + 1e-6))
    if mode != "hopf":  # far inside the ball: clamp and soft are the identity
        np.testing.assert_array_equal(y[[0, 2]], x.reshape(-1, 4)[[0, 2]])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_matches_numpy(mode, dtype):
    import ml_dtypes  # noqa: F401
    import torch

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 7, 32)) * 3).astype(np.float32)
    x[0, 0, :4] = 0
    x[1, 2, 5] = np.inf
    x[2, 1, 9] = np.nan
    tau = rng.uniform(0.5, 4, 8).astype(np.float32)
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    got = gpcl_torch(xt, torch.from_numpy(tau), mode)
    assert got.dtype == xt.dtype and got.shape == xt.shape
    want = gpcl_numpy(x.astype(dtype), tau, mode).astype(np.float32)
    # One float32 ulp of difference (torch vs numpy sqrt/div) can flip one output rounding.
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(got.float().numpy(), want, rtol=tol, atol=tol)
    assert torch.equal(torch.isnan(got), torch.from_numpy(np.isnan(want)))


def test_torch_is_differentiable():
    import torch

    x = torch.randn(2, 8, requires_grad=True)
    gpcl_torch(x, 0.5, "soft").sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "x, tau, mode, match",
    [
        (np.zeros((2, 6), np.float32), 1.0, "clamp", "multiple of 4"),
        (np.zeros((2, 8), np.float32), np.ones(3, np.float32), "clamp", "shape"),
        (np.zeros((2, 8), np.float32), 0.0, "clamp", "> 0"),
        (np.zeros((2, 8), np.float32), np.array([1.0, np.nan], np.float32), "clamp", "> 0"),
        (np.zeros((2, 8), np.float32), 1.0, "tanh", "mode"),
        (np.zeros((2, 8), np.int32), 1.0, "clamp", "floating"),
    ],
)
def test_bad_input_is_refused(x, tau, mode, match):
    import torch

    with pytest.raises(ValueError, match=match):
        gpcl_numpy(x, tau, mode)
    if x.dtype == np.float32:
        with pytest.raises(ValueError, match=match):
            gpcl_torch(torch.from_numpy(x), torch.as_tensor(tau), mode)
