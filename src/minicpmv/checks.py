"""Type checks for user-supplied numbers, shared by every layer that validates arguments.

``bool`` is an ``int`` subclass in Python, and NaN compares false with everything, so the
naive ``isinstance(x, int)`` / ``x > 0`` checks accept ``True`` and ``nan``. These helpers do
not; they raise nothing themselves (callers word their own errors).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite real number (int or float, Python or numpy), not a bool."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))
