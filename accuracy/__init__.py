"""Accuracy: ``diff`` (reference vs candidate through polygraphy, golden outputs, per-layer
divergence) and ``study`` (the GPCL effect report)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpcl_trt.common import lazy_exports

if TYPE_CHECKING:
    from gpcl_trt.accuracy.comparison import diff as diff
    from gpcl_trt.accuracy.effect_study import study as study

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "diff": "comparison",
        "study": "effect_study",
    },
)
