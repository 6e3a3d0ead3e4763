"""Accuracy: ``diff`` (reference vs candidate through polygraphy, golden outputs, per-layer
divergence) and ``study`` (the GPCL effect report). Imports are deferred so that the CLI stays
fast; the functions have the signatures of ``comparison.diff`` and ``effect_study.study``
(module names differ from the function names so that importing a submodule never rebinds them)."""

from __future__ import annotations

from typing import Any


def diff(*args: Any, **kwargs: Any) -> dict:
    from gpcl_trt.accuracy.comparison import diff as _diff

    return _diff(*args, **kwargs)


def study(*args: Any, **kwargs: Any) -> dict:
    from gpcl_trt.accuracy.effect_study import study as _study

    return _study(*args, **kwargs)


__all__ = ["diff", "study"]
