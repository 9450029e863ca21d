"""The train/test pair that every dataset loader in :mod:`lowlearn.data` returns."""

from __future__ import annotations

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


def _dataset(part: str, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """A :class:`TensorDataset` over ``(x, y)``, after checking that they have one row per example."""
    if len(x) != len(y):
        raise ValueError(f"the {part} part has {len(x)} inputs but {len(y)} labels; "
                         "they must have the same first dimension")
    return TensorDataset(x, y)
