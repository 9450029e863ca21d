"""Datasets, downloads and task samplers.

* Embedded, offline: :func:`~lowlearn.data.embedded.load_digits`,
  :func:`~lowlearn.data.embedded.load_mnist5k`, :func:`~lowlearn.data.embedded.load_mnist1d`.
* Downloaded into ``$LOWLEARN_DATA`` (default ``~/.cache/lowlearn``), sha256-checked:
  :func:`~lowlearn.data.mnist.load_mnist` (and :func:`~lowlearn.data.mnist.load_mnist_variant`,
  either MNIST by a profile's name), :func:`~lowlearn.data.cifar.load_cifar10`,
  :func:`~lowlearn.data.omniglot.load_omniglot`, :func:`~lowlearn.data.omniglot.load_omniglot_runs`.
* Few-shot learning: :class:`~lowlearn.data.episodes.EpisodeSampler` (N-way K-shot
  episodes over any class-indexed tensor), :class:`~lowlearn.data.tasks.SinusoidTasks`
  and :class:`~lowlearn.data.tasks.GPCurves`.

Every name above is importable from ``lowlearn.data`` directly.
"""

from .cache import (ChecksumError, DataError, DatasetNotFoundError, Resource, UnsafeArchiveError,
                    data_root, fetch, safe_extract)
from .cifar import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, augment_cifar, load_cifar10,
                    normalize_cifar)
from .embedded import load_digits, load_mnist1d, load_mnist5k
from .episodes import Episode, EpisodeSampler, group_by_class, random_episodes
from .mnist import MNIST_VARIANTS, load_mnist, load_mnist_variant, read_idx
from .omniglot import Omniglot, OneShotRun, load_omniglot, load_omniglot_runs
from .splits import Splits
from .tasks import Curves, GPCurves, RegressionBatch, SinusoidTasks, context_target_split

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "ChecksumError", "Curves", "DataError",
    "DatasetNotFoundError", "Episode", "EpisodeSampler", "GPCurves", "MNIST_VARIANTS", "Omniglot", "OneShotRun",
    "RegressionBatch", "Resource", "SinusoidTasks", "Splits", "UnsafeArchiveError",
    "augment_cifar", "context_target_split", "data_root", "fetch", "group_by_class",
    "load_cifar10", "load_digits", "load_mnist", "load_mnist1d", "load_mnist5k", "load_mnist_variant", "load_omniglot",
    "load_omniglot_runs", "normalize_cifar", "random_episodes", "read_idx", "safe_extract",
]
