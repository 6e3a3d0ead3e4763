"""Optimisation profiles: one (min, opt, max) shape per network input, from the model's named
dynamic axes (``batch``, ``sequence``, ``past_sequence``, ``total_sequence``) with defaults,
overridden by ``--shapes NAME:MIN,OPT,MAX`` (each a shape like ``4x128``).

An override also fixes the axes it names, so ``--shapes input_ids:1x1,2x64,4x256`` moves
``attention_mask`` (same ``batch``/``sequence`` axes) along with it."""

from __future__ import annotations

from typing import Iterable, Sequence

from gpcl_trt.common import GpclError

Range = tuple[int, int, int]
Shape = tuple[int, ...]

# One entry per axis name of the naming convention (docs/architecture.md). opt is the point
# TensorRT tunes for: a small serving batch and a typical sentence length.
AXIS_DEFAULTS: dict[str, Range] = {
    "batch": (1, 4, 8),
    "sequence": (1, 128, 512),
    "past_sequence": (1, 128, 512),
    # an encoder-decoder's source length (encoder inputs, the decoder's cross KV and encoder_attention_mask)
    "encoder_sequence": (1, 128, 512),
    "text_batch": (1, 4, 8),  # a dual encoder's labels and images (CLIP, SigLIP)
    "image_batch": (1, 4, 8),
    "samples": (400, 16000, 80000),  # 16 kHz waveform samples: 25 ms .. 5 s (wav2vec2-style encoders)
}
# total_sequence = past_sequence + sequence at every profile point, so the shapes agree.
DERIVED_AXES = {"total_sequence": ("past_sequence", "sequence")}


def parse_shape(text: str) -> Shape:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise GpclError(f"bad shape {text!r}: write dimensions like 4x128") from None
    if any(d < 0 for d in dims):
        raise GpclError(f"bad shape {text!r}: dimensions must be >= 0")
    return dims


def parse_shapes(specs: Iterable[str]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``NAME:MIN,OPT,MAX`` (or ``NAME:SHAPE`` for a fixed shape) -> {name: (min, opt, max)}."""
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in specs or ():
        name, sep, rest = spec.rpartition(":")
        if not sep or not name:
            raise GpclError(f"bad --shapes {spec!r}: write NAME:MIN,OPT,MAX, e.g. input_ids:1x1,4x128,8x512")
        parts = [parse_shape(p) for p in rest.split(",")]
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise GpclError(f"bad --shapes {spec!r}: give one shape or three (MIN,OPT,MAX)")
        lo, opt, hi = parts
        if not len(lo) == len(opt) == len(hi):
            raise GpclError(f"--shapes {name}: MIN, OPT and MAX have different ranks")
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi)):
            if not a <= b <= c:
                raise GpclError(f"--shapes {name}: axis {axis} needs MIN <= OPT <= MAX, got {a}, {b}, {c}")
        out[name] = (lo, opt, hi)
    return out


def _axis_range(name: str, known: dict[str, Range]) -> Range | None:
    if name in known:
        return known[name]
    if name in DERIVED_AXES:
        parts = [_axis_range(p, known) for p in DERIVED_AXES[name]]
        if all(parts):
            return tuple(sum(p[i] for p in parts) for i in range(3))  # type: ignore[return-value]
    return None


def make_profiles(
    inputs: Sequence[tuple[str, Sequence[int | str]]], shapes: dict[str, tuple[Shape, Shape, Shape]]
) -> dict[str, dict[str, list[int]]]:
    """``inputs``: (name, dims) with an int for a static axis and the axis name (or "" for an
    unnamed one) for a dynamic axis. Returns {input: {"min": [...], "opt": [...], "max": [...]}}."""
    names = {n for n, _ in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise GpclError(
            f"--shapes names unknown input(s) {', '.join(unknown)}; the model's inputs are {', '.join(sorted(names))}"
        )
    axes: dict[str, Range] = dict(AXIS_DEFAULTS)
    if any(n.startswith("past_key_values.") and ".decoder." in n for n, _ in inputs):
        # an encoder-decoder's merged decoder takes its first step with an empty self-attention cache
        # (TensorRT-RTX builds and runs zero-size dims): past_sequence starts at 0
        axes["past_sequence"] = (0, *axes["past_sequence"][1:])
    # Axes fixed by an override apply to every input that shares the axis name.
    overridden: dict[str, tuple[str, Range]] = {}
    for name, dims in inputs:
        if name not in shapes:
            continue
        lo, opt, hi = shapes[name]
        if len(lo) != len(dims):
            raise GpclError(f"--shapes {name}: rank {len(lo)}, but the input has rank {len(dims)} ({_fmt(dims)})")
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d >= 0 and not lo[axis] == opt[axis] == hi[axis] == d:
                raise GpclError(f"--shapes {name}: axis {axis} is fixed at {d} in the model")
            if isinstance(d, str) and d:
                given = (lo[axis], opt[axis], hi[axis])
                if d in overridden and overridden[d][1] != given:
                    raise GpclError(
                        f"--shapes {name}: axis {d!r} is {_fmt_range(given)} here but "
                        f"{_fmt_range(overridden[d][1])} for {overridden[d][0]}"
                    )
                overridden[d] = (name, given)
                axes[d] = given
    out: dict[str, dict[str, list[int]]] = {}
    for name, dims in inputs:
        if name in shapes:
            lo, opt, hi = shapes[name]
            out[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
            continue
        points: list[Range] = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d >= 0:
                points.append((d, d, d))
                continue
            rng = _axis_range(d, axes) if d else None
            if rng is None:
                raise GpclError(
                    f"input {name} axis {axis} is dynamic ({d or 'unnamed'}) with no default range; "
                    f"give it with --shapes {name}:MIN,OPT,MAX"
                )
            points.append(rng)
        out[name] = {k: [p[i] for p in points] for i, k in enumerate(("min", "opt", "max"))}
    return out


def _fmt(dims: Sequence[int | str]) -> str:
    return "x".join(str(d) if d != "" else "?" for d in dims)


def _fmt_range(r: Range) -> str:
    return "min {}, opt {}, max {}".format(*r)
