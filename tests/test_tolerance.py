"""gpcl_trt.tolerance: the one pass rule (polygraphy's elementwise comparator, rtol read against
the candidate) and the defaults per dtype; checked against polygraphy's own comparator."""

from __future__ import annotations

import numpy as np
import pytest

from gpcl_trt import tolerance


def _polygraphy_passes(ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> bool:
    from polygraphy.comparator import IterationResult
    from polygraphy.comparator.compare import SimpleCompareFunc

    from gpcl_trt.accuracy.polyutil import quiet_polygraphy

    func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise", check_shapes=True)
    with quiet_polygraphy(), np.errstate(invalid="ignore"):
        res = func(
            IterationResult({"y": ref}, runner_name="reference"), IterationResult({"y": cand}, runner_name="candidate")
        )
    return bool(res["y"])


def test_the_rule_is_polygraphys_elementwise_verdict():
    """On arrays straddling the bound, every verdict equals polygraphy's comparator's (reference
    first, candidate second, as `diff` and validation pass them)."""
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(200):
        ref = rng.normal(0, rng.choice([0.01, 1.0, 50.0]), size=(3, 7)).astype(np.float32)
        cand = (ref + rng.normal(0, 1, size=ref.shape) * rng.choice([1e-4, 1e-2, 0.3])).astype(np.float32)
        atol, rtol = float(rng.choice([0.0, 1e-3, 1e-2, 1e-1])), float(rng.choice([0.0, 1e-3, 1e-2, 0.1]))
        expect = _polygraphy_passes(ref, cand, atol, rtol)
        assert tolerance.within(ref, cand, atol, rtol) == expect, (atol, rtol)
        assert (tolerance.used(ref, cand, atol, rtol) <= 1.0) == expect, (atol, rtol)
        cases += expect
    assert 20 < cases < 180  # both verdicts were exercised


def test_rtol_is_read_against_the_candidate():
    # |1 - 2| = 1 <= 0.5 * |2|: passes; the same pair the other way round does not (0.5 * |1|)
    assert tolerance.within(np.array([1.0]), np.array([2.0]), 0.0, 0.5)
    assert tolerance.used(np.array([1.0]), np.array([2.0]), 0.0, 0.5) == pytest.approx(1.0)
    assert not tolerance.within(np.array([2.0]), np.array([1.0]), 0.0, 0.5)
    assert tolerance.used(np.array([2.0]), np.array([1.0]), 0.0, 0.5) == pytest.approx(2.0)


def test_an_element_gets_no_slack_from_its_larger_neighbours():
    """Elementwise: a small element next to large ones is judged on its own |candidate| (the
    earlier rule read rtol against the output's largest |reference| and passed this)."""
    ref, cand = np.array([100.0, 0.001]), np.array([100.0, 0.5])
    assert tolerance.used(ref, cand, 1e-2, 1e-2) == pytest.approx(0.499 / 1e-2)
    assert not tolerance.within(ref, cand, 1e-2, 1e-2)
    # an element passes on either bound: the larger of atol and rtol * |cand|
    assert tolerance.used(np.array([10.0]), np.array([10.05]), 1e-2, 1e-2) == pytest.approx(0.05 / 0.1005)
    assert tolerance.used(np.array([0.0]), np.array([0.005]), 1e-2, 1e-2) == pytest.approx(0.5)


def test_non_finite_and_shapes_fail_and_equal_arrays_pass_at_zero_tolerance():
    y = np.array([1.0, -2.0, 3.5], np.float32)
    assert tolerance.used(y, y.copy(), 0.0, 0.0) == 0.0 and tolerance.within(y, y.copy(), 0.0, 0.0)
    assert tolerance.used(y, y + 1e-6, 0.0, 0.0) == float("inf")
    for bad in (np.array([np.nan, -2.0, 3.5]), np.array([np.inf, -2.0, 3.5])):
        assert tolerance.used(y, bad, 1.0, 1.0) == float("inf") and not tolerance.within(y, bad, 1.0, 1.0)
        assert not _polygraphy_passes(y, bad.astype(np.float32), 1.0, 1.0)
    both_inf = np.array([np.inf, 1.0])
    assert not tolerance.within(both_inf, both_inf, 1.0, 1.0)  # polygraphy: inf - inf is NaN
    assert not _polygraphy_passes(both_inf, both_inf, 1.0, 1.0)
    assert tolerance.used(y, y[:2], 1.0, 1.0) == float("inf") and not tolerance.within(y, y[:2], 1.0, 1.0)
    assert tolerance.used(np.zeros((0, 4)), np.zeros((0, 4)), 0.0, 0.0) == 0.0
    mask = tolerance.failing(np.array([0.0, 1.0, 5.0]), np.array([0.0, 1.2, 5.01]), 1e-2, 1e-2)
    assert mask.tolist() == [False, True, False]


def test_defaults_per_dtype():
    assert tolerance.defaults("fp32") == (1e-4, 0.0)
    atol16, rtol16 = tolerance.defaults("fp16")
    # the 32-layer fp16 Llama of BENCHMARKS.md (0.045 on a logit of 0.18) passes by default
    assert tolerance.within(np.array([0.18]), np.array([0.18 + 0.045]), atol16, rtol16)
    assert set(tolerance.DEFAULT_ATOL) == set(tolerance.DEFAULT_RTOL) == {"fp32", "fp16", "bf16"}


def test_per_layer_checks_use_the_same_rule():
    """`diff --per-layer` judges every intermediate tensor with the same rule (it read rtol
    against the reference before)."""
    from gpcl_trt.accuracy.metrics import array_metrics

    assert array_metrics(np.array([1.0]), np.array([2.0]), 0.0, 0.5)["within_tol"] is True
    assert array_metrics(np.array([2.0]), np.array([1.0]), 0.0, 0.5)["within_tol"] is False
    assert array_metrics(np.array([1.0, np.nan]), np.array([1.0, np.nan]), 1.0, 1.0)["within_tol"] is False


def test_diff_defaults_come_from_here():
    from gpcl_trt.accuracy import comparison

    assert (comparison.DEFAULT_ATOL, comparison.DEFAULT_RTOL) == (tolerance.DIFF_ATOL, tolerance.DIFF_RTOL)
