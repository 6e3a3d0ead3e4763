"""The GPCL effect report on the real MiniLM: a small sweep (two modes, one calibrated and two
fixed taus, short sequences) through the CLI, checked for real numbers in every section."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from gpcl_trt.cli import main


def test_study_minilm(minilm_dir, minilm_onnx, tmp_path):
    out = tmp_path / "study"
    args = [
        "study",
        str(minilm_dir),
        "-o",
        str(out),
        "--onnx",
        str(minilm_onnx),
        "--modes",
        "clamp,hopf",
        "--taus",
        "1e9,0.5",
        "--percentiles",
        "99.99",
        "--samples",
        "2",
        "--calib-samples",
        "4",
        "--seq",
        "16",
        "--latency-seqs",
        "8,32",
        "--latency-reps",
        "3",
        "--json",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)

    v = {x["label"]: x for x in r["variants"]}
    assert set(v) == {
        "clamp P99.99",
        "hopf P99.99",
        "clamp tau=1e+09",
        "hopf tau=1e+09",
        "clamp tau=0.5",
        "hopf tau=0.5",
    }
    for x in v.values():
        for key in ("cosine", "max_abs", "frac_groups_changed", "max_radius_after", "tau_min"):
            assert isinstance(x[key], float) and math.isfinite(x[key]), (x["label"], key)
        assert x["bounded"] and len(x["sites"]) == 12
    # The spec's claims, measured: calibrated clamp and huge-tau clamp change nothing ...
    assert v["clamp P99.99"]["frac_groups_changed"] == 0 and v["clamp P99.99"]["max_abs"] == 0
    assert v["clamp tau=1e+09"]["max_abs"] == 0 and v["clamp tau=1e+09"]["cosine"] > 0.999999
    # ... a small tau clamps some groups and changes the output; hopf changes every group.
    assert 0 < v["clamp tau=0.5"]["frac_groups_changed"] < 1 and v["clamp tau=0.5"]["max_abs"] > 0
    assert v["clamp tau=0.5"]["max_radius_after"] <= 0.5 * (1 + 1e-5)
    assert v["hopf P99.99"]["frac_groups_changed"] == 1.0 and v["hopf P99.99"]["cosine"] < 0.9
    claims = {c["claim"]: c for c in r["claims"]}
    assert len(claims) == 6 and all(c["status"] in ("held", "not held", "inconclusive") for c in claims.values())
    assert [c["status"] for c in r["claims"][:4]] == ["held"] * 4

    lat = r["latency"]
    assert {(x["variant"], x["seq"]) for x in lat} == {(m, s) for m in ("clamp P99.99", "hopf P99.99") for s in (8, 32)}
    # The derived columns follow from the measured ones (no claim on how fast this machine is).
    for x in lat:
        assert x["tokens"] % x["seq"] == 0 and math.isfinite(x["t_original_ms"]) and math.isfinite(x["t_gpcl_ms"])
        assert x["overhead_ms"] == pytest.approx(x["t_gpcl_ms"] - x["t_original_ms"], abs=1e-9)
        assert x["overhead_us_per_token"] == pytest.approx(x["overhead_ms"] * 1e3 / x["tokens"], rel=1e-9, abs=1e-12)

    md = (out / "report.md").read_text()
    for section in (
        "## Claims",
        "## Accuracy and effect per variant",
        "## Latency overhead per token",
        "## Radius distribution",
    ):
        assert section in md
    for png in ("cosine_vs_tau.png", "changed_vs_tau.png", "latency_per_token.png", "radii.png"):
        assert (out / png).stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["variants"][0]["label"] == "clamp P99.99"
    # No partial or overwritten output: a second run without --force is refused.
    again = CliRunner().invoke(main, args[:-1])
    assert again.exit_code == 2 and "--force" in again.output


def test_study_refuses_bad_options_before_any_work(minilm_dir, tmp_path):
    """Bad sites, modes or taus are refused at once (no export first), leaving nothing."""
    import pytest

    from gpcl_trt.accuracy import study
    from gpcl_trt.common import GpclError

    for kwargs, message in [
        ({"sites": ("nowhere",)}, "--sites must be"),
        ({"modes": ("cubic",)}, "unknown GPCL mode"),
        ({"taus": [-1.0]}, "taus must be > 0"),
    ]:
        with pytest.raises(GpclError, match=message):
            study(minilm_dir, tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()
