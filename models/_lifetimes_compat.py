"""The one place that imports ``lifetimes`` and tames its side effects.

lifetimes 0.11.3 is archived. On import it sets pandas options and warning filters, its
fitters print the optimizer output to stdout when they do not converge, and its formulas
overflow (numpy warnings) for extreme customers. Everything that calls it goes through
:func:`quiet`, which restores the warning filters, silences numpy floating-point warnings and
captures stdout (logged at DEBUG).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lifetimes  # noqa: F401  (imported for its side effects once, under the filter)
    from lifetimes import BetaGeoFitter, GammaGammaFitter, ModifiedBetaGeoFitter, ParetoNBDFitter
    from lifetimes.utils import ConvergenceError

__all__ = ["BetaGeoFitter", "GammaGammaFitter", "ModifiedBetaGeoFitter", "ParetoNBDFitter",
           "ConvergenceError", "quiet", "LIFETIMES_VERSION"]

LIFETIMES_VERSION = getattr(lifetimes, "__version__", "unknown")


@contextlib.contextmanager
def quiet(label: str = "lifetimes") -> Iterator[None]:
    """Run lifetimes code without its prints, warnings and numpy floating-point chatter."""
    buffer = io.StringIO()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        printed = buffer.getvalue().strip()
        if printed:
            logger.debug("%s printed:\n%s", label, printed)
