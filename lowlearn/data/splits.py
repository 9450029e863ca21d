"""The train/test pair that every dataset loader in :mod:`lowlearn.data` returns."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch.utils.data import TensorDataset


class Splits(NamedTuple):
    """A dataset's train and test parts.

    Each part is a :class:`~torch.utils.data.TensorDataset` over ``(x, y)``:
    ``part.tensors`` is the pair of tensors, ``part[i]`` the ``i``-th example.
    """

    train: TensorDataset
    test: TensorDataset


def make_splits(x_train: torch.Tensor, y_train: torch.Tensor,
                x_test: torch.Tensor, y_test: torch.Tensor) -> Splits:
    """Wrap inputs and labels of shape ``(N, ...)`` and ``(N,)`` into :class:`Splits`.

    Raises:
        ValueError: inputs and labels of a part have different lengths.
    """
    return Splits(_dataset("train", x_train, y_train), _dataset("test", x_test, y_test))


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


def _dataset(part: str, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """A :class:`TensorDataset` over ``(x, y)``, after checking that they have one row per example."""
    if len(x) != len(y):
        raise ValueError(f"the {part} part has {len(x)} inputs but {len(y)} labels; "
                         "they must have the same first dimension")
    return TensorDataset(x, y)
