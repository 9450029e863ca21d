"""Argument types for lowlearn's command lines (``python -m lowlearn.bench``, ``python -m lowlearn.eval``).

Each is an ``argparse`` ``type=``: a bad value becomes the usual usage message that
names the option and says what it takes, before anything runs. :func:`subcommand`
picks the benchmark or evaluation that a command line names.
"""

from __future__ import annotations

import argparse
import decimal
import functools
import math
import sys
from collections.abc import Callable, Mapping

import torch

from .train import available_device


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _int_at_least(text, 1)


def natural_int(text: str) -> int:
    """An integer of at least 0."""
    return _int_at_least(text, 0)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """The argument type of an integer of at least ``minimum``."""
    return lambda text: _int_at_least(text, minimum)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**63 − 1, which Python's, NumPy's and torch's generators all take."""
    value = _int_at_least(text, 0)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {value}")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0, such as a learning rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {_shown(text, value)}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1], such as a density."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {_shown(text, value)}")
    return value


def _shown(text: str, value: float) -> str:
    """``value`` for a message, with what was typed where a float rounds it to 0 or to infinity."""
    try:
        typed = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        return str(value)
    if typed.is_finite() and (math.isinf(value) or (value == 0 and typed != 0)):
        return f"{text.strip()[:20]}{'...' if len(text.strip()) > 20 else ''}, which a float rounds to {value}"
    return str(value)


def fractions(text: str) -> tuple[float, ...]:
    """Comma-separated numbers in (0, 1], such as ``0.5,0.1``."""
    return tuple(fraction(part) for part in text.split(","))


def device(text: str) -> torch.device:
    """A torch device that this machine has (:func:`lowlearn.train.available_device`)."""
    try:
        return available_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def subcommand(commands: Mapping[str, Callable[[list[str]], None]], argv: list[str], usage: str,
               noun: str) -> Callable[[], None] | None:
    """The command that ``argv`` names, bound to the rest of ``argv``; ``None`` once ``--help`` printed ``usage``.

    A missing or unknown name exits with ``usage`` (``noun`` says what the names are, e.g. "benchmark").
    """
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return None
    if not argv:
        sys.exit(usage)
    if argv[0] not in commands:
        sys.exit(f"{argv[0]!r} is not a {noun}\n{usage}")
    return functools.partial(commands[argv[0]], argv[1:])
