"""Checks of argument types that every part of lowlearn shares.

NumPy scalars count as numbers, so values read from arrays or configuration files pass;
``bool`` does not (``True`` is an ``int`` to Python, but never a density or a count), nor does a
tensor (pass ``float(t)`` or ``int(t)``).
"""

from __future__ import annotations

import math
import numbers


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy int, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError unless ``value`` is an integer of at least ``minimum`` (a number of examples, tasks, ...)."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def check_rate(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a positive, finite number (a step size), else raise a ValueError.

    Checked after the conversion, so an int or fraction beyond the float range (``10**400``) is refused
    rather than overflowing, and one that rounds to ``0.0`` is refused too.
    """
    try:
        rate = float(value) if is_real(value) else math.nan
    except OverflowError:
        rate = math.inf
    if not 0 < rate < math.inf:                          # NaN compares False
        raise ValueError(f"{name} must be a positive, finite step size, got {value!r}")
    return rate
