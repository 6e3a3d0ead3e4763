"""Living with polygraphy's logger: it prints to stdout (which --json needs clean) and raises
PolygraphyException on critical errors (which should read as one line, exit 2)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from gpcl_trt.common import GpclError, one_line


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Silence polygraphy (our report says what failed) and turn its errors into GpclError."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    # Above CRITICAL: polygraphy prints critical messages before raising them; the exception
    # still comes through and becomes our one line.
    G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except PolygraphyException as exc:
        raise GpclError(one_line(exc)) from None
    finally:
        G_LOGGER.module_severity = old
