"""Accuracy: ``diff`` (reference vs candidate through polygraphy, golden outputs, per-layer
divergence) and ``study`` (the GPCL effect report). Imports are deferred so that the CLI stays
fast; the functions have the signatures of ``diff.diff`` and ``study.study``."""

from __future__ import annotations

from typing import Any


def diff(*args: Any, **kwargs: Any) -> dict:
    from gpcl_trt.accuracy.diff import diff as _diff

    return _diff(*args, **kwargs)


def study(*args: Any, **kwargs: Any) -> dict:
    from gpcl_trt.accuracy.study import study as _study

    return _study(*args, **kwargs)


__all__ = ["diff", "study"]
