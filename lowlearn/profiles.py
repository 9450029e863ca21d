"""Experiment profiles: one place that holds every experiment size of the course.

Every chapter runs in three sizes, chosen by the environment variable
``LOWLEARN_PROFILE``:

``smoke``
    Seconds per chapter. Continuous integration and ``pytest --nbval-lax`` use it:
    the same code path as the real experiments, on tiny sizes.
``cpu``
    Minutes per chapter on a laptop CPU, with offline data (MNIST-5k, digits).
    The default when no CUDA device is present.
``gpu``
    The full experiments (MNIST, CIFAR-10, Omniglot at paper scale), minutes per
    chapter on one modern GPU. The default when CUDA is available.

Chapters never hard-code a size: they read it from :func:`get_profile`, so the
printed results always say which profile made them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV_VAR = "LOWLEARN_PROFILE"


@dataclass(frozen=True)
class BudgetSizes:
    """Sizes for the chapter "Training on a budget" (LeNet-300-100 on MNIST).

    Attributes:
        dataset: ``"mnist5k"`` (embedded, offline) or ``"mnist"`` (downloaded).
        train_limit: keep only this many training examples (``None``: all).
        epochs: passes over the training set (the data-size sweep trains for the
            same number of steps).
        batch_size: examples per optimizer step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        widths: multipliers of the hidden widths (300, 100) for the size sweep.
        data_sizes: training-set sizes for the data sweep.
        seeds: independent runs per configuration (for error bars).
        min_accuracy: the test accuracy the chapter asserts LeNet-300-100 reaches.
    """

    dataset: str
    train_limit: int | None
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    widths: tuple[float, ...]
    data_sizes: tuple[int, ...]
    seeds: int
    min_accuracy: float


@dataclass(frozen=True)
class Profile:
    """All experiment sizes of one profile, one field per chapter."""

    name: str
    budget: BudgetSizes


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        budget=BudgetSizes(dataset="mnist5k", train_limit=1000, epochs=3, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(0.25, 1.0), data_sizes=(250, 1000), seeds=2, min_accuracy=0.6),
    ),
    "cpu": Profile(
        name="cpu",
        budget=BudgetSizes(dataset="mnist5k", train_limit=None, epochs=30, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0),
                           data_sizes=(125, 250, 500, 1000, 2000, 4000), seeds=5, min_accuracy=0.92),
    ),
    "gpu": Profile(
        name="gpu",
        budget=BudgetSizes(dataset="mnist", train_limit=None, epochs=20, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0),
                           data_sizes=(250, 1000, 4000, 15000, 60000), seeds=5, min_accuracy=0.975),
    ),
}


def default_profile_name() -> str:
    """``"gpu"`` when a CUDA device is available, else ``"cpu"``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """Return the experiment sizes of a profile.

    Args:
        name: ``"smoke"``, ``"cpu"`` or ``"gpu"``. ``None`` reads the environment
            variable ``LOWLEARN_PROFILE`` and falls back to
            :func:`default_profile_name`.

    Raises:
        ValueError: the name is not a known profile.
    """
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or default_profile_name()
    key = name.strip().lower()
    if key not in PROFILES:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(
            f"unknown experiment profile {name!r}; choose one of {known} "
            f"(set {ENV_VAR}={sorted(PROFILES)[0]} for example, or unset it for the default)"
        )
    return PROFILES[key]


def banner(profile: Profile | None = None) -> str:
    """One line that says which profile and device make a chapter's results.

    Chapters print it first, so every printed number can be traced to its setting.
    """
    profile = profile or get_profile()
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name()})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    return f"profile: {profile.name} | device: {device} | torch {torch.__version__}"
