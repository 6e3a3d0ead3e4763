"""Optimisation profile defaults and --shapes parsing (pure Python, no build)."""

from __future__ import annotations

import pytest

from gpcl_trt.common import GpclError
from gpcl_trt.engines.profiles import make_profiles, parse_shapes

ENCODER = [("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
DECODER_WITH_PAST = [
    ("input_ids", ["batch", "sequence"]),
    ("attention_mask", ["batch", "total_sequence"]),
    ("past_key_values.0.key", ["batch", 2, "past_sequence", 16]),
]


def test_defaults_for_named_axes():
    p = make_profiles(ENCODER, {})
    assert p["input_ids"] == p["attention_mask"] == {"min": [1, 1], "opt": [4, 128], "max": [8, 512]}


def test_total_sequence_is_past_plus_sequence_at_every_point():
    p = make_profiles(DECODER_WITH_PAST, {})
    assert p["attention_mask"] == {"min": [1, 2], "opt": [4, 256], "max": [8, 1024]}
    assert p["past_key_values.0.key"] == {"min": [1, 2, 1, 16], "opt": [4, 2, 128, 16], "max": [8, 2, 512, 16]}
    # Overriding sequence on input_ids moves total_sequence with it.
    p = make_profiles(DECODER_WITH_PAST, parse_shapes(["input_ids:1x1,1x1,2x1"]))
    assert p["attention_mask"] == {"min": [1, 2], "opt": [1, 129], "max": [2, 513]}


def test_override_on_one_input_moves_the_axes_it_shares():
    p = make_profiles(ENCODER, parse_shapes(["input_ids:2x8,2x16,2x32"]))
    assert p["attention_mask"] == p["input_ids"] == {"min": [2, 8], "opt": [2, 16], "max": [2, 32]}


def test_agreeing_overrides_on_a_shared_axis_are_fine():
    p = make_profiles(ENCODER, parse_shapes(["input_ids:1x8,2x16,4x32", "attention_mask:1x8,2x16,4x32"]))
    assert p["input_ids"] == p["attention_mask"] == {"min": [1, 8], "opt": [2, 16], "max": [4, 32]}


def test_single_shape_means_fixed():
    assert parse_shapes(["x:3x4"]) == {"x": ((3, 4), (3, 4), (3, 4))}


@pytest.mark.parametrize(
    "inputs, specs, message",
    [
        (ENCODER, ["nope:1x1"], "unknown input(s) nope"),
        (ENCODER, ["input_ids:8x1,4x1,1x1"], "axis 0 needs MIN <= OPT <= MAX, got 8, 4, 1"),
        (ENCODER, ["input_ids1x1"], "write NAME:MIN,OPT,MAX"),
        (ENCODER, ["input_ids:1xa"], "bad shape '1xa'"),
        (ENCODER, ["input_ids:1x-1"], "dimensions must be >= 0"),
        ([("x", ["", 8])], [], "input x axis 0 is dynamic (unnamed) with no default range"),
        ([("x", ["frames", 8])], [], "axis 0 is dynamic (frames)"),
        (
            ENCODER,
            ["input_ids:1x8,2x16,4x32", "attention_mask:1x8,2x16,8x32"],
            "axis 'batch' is min 1, opt 2, max 8 here but min 1, opt 2, max 4 for input_ids",
        ),
    ],
)
def test_bad_shapes_are_clear_errors(inputs, specs, message):
    with pytest.raises(GpclError) as err:
        make_profiles(inputs, parse_shapes(specs))
    assert message in str(err.value)


def test_unknown_axis_can_be_given_explicitly():
    p = make_profiles([("x", ["frames", 8])], parse_shapes(["x:1x8,10x8,100x8"]))
    assert p == {"x": {"min": [1, 8], "opt": [10, 8], "max": [100, 8]}}
