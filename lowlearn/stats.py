"""Summaries of repeated measurements: the mean and its 95% confidence interval.

Accuracies over test episodes and test tasks, and every result a chapter records
(:mod:`lowlearn.results`), are given as ``mean ± half-width of the 95% interval of the
mean``, the way few-shot papers report them. :func:`mean_and_ci` is that computation;
:func:`summarize` is the same for results that may come from a single run (a profile
with one seed), where no interval exists; :func:`curve_mean_and_ci` is it for every
point of a curve measured in several runs (an error band). Curves and tables over a
handful of training seeds show instead the spread between seeds, ``mean ± one standard
deviation`` (:func:`lowlearn.plot.mean_and_spread`), and say so.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats
import torch
from numpy.typing import ArrayLike


def _float64(values: ArrayLike | torch.Tensor) -> torch.Tensor:
    """``values`` as a float64 CPU tensor of their shape: from a tensor of any dtype (bfloat16 too, which NumPy
    lacks), on any device, requiring gradients or not; or from an array, or a list of numbers, tensors or arrays
    (of one shape)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    if isinstance(values, (list, tuple)):
        values = [v.detach().to("cpu", torch.float64).numpy() if isinstance(v, torch.Tensor) else v for v in values]
        shapes = sorted({np.shape(v) for v in values})
        if len(shapes) > 1:
            raise ValueError(f"the values' parts have different shapes ({shapes}): concatenate them (torch.cat, "
                             "np.concatenate) or pass one flat list of numbers")
    return torch.as_tensor(np.asarray(values, dtype=np.float64), device="cpu")


def _as_float64(values: ArrayLike | torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · values`` as a flat float64 CPU tensor (see :func:`_float64`), or a ValueError if one is not
    finite."""
    return _finite(scale * _float64(values).flatten())


def _finite(values: torch.Tensor) -> torch.Tensor:
    """``values``, or a ValueError if any is NaN or infinite (a diverged run would make the summary meaningless)."""
    bad = values[~torch.isfinite(values)]
    if bad.numel():
        raise ValueError(f"the values include {bad.numel()} that are not finite (such as {bad[0].item()}): a run "
                         "diverged or a measurement failed; summarise the finite runs and say how many failed")
    return values


def mean_and_ci(values: ArrayLike | torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean, ``t · s / √n``.

    ``s`` is the sample standard deviation of the ``n`` values and ``t`` the 97.5%
    quantile of Student's t distribution with ``n − 1`` degrees of freedom: 1.98 for
    100 episodes, 1.96 in the limit, but 4.30 for three seeds, where the normal
    quantile would make the interval less than half as wide as it should be.

    Args:
        values: the measurements (a tensor, array or list of numbers), flattened.

    Raises:
        ValueError: fewer than two values (use :func:`summarize` where one run is possible),
            or a value that is NaN or infinite.
    """
    mean, half = curve_mean_and_ci(_as_float64(values, 1.0)[:, None])
    return mean.item(), half.item()


def curve_mean_and_ci(runs: ArrayLike | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mean_and_ci` of every column of ``runs`` ``(n, points)``: a curve's mean and its 95% band.

    Row ``i`` is run ``i`` (a seed, a test problem) measured at the same ``points``
    (training steps, sparsities); the band is ``mean ± half`` at every point. ``runs``
    may be a tensor, an array, or a list of one curve per run (numbers, arrays, or
    tensors of any dtype and device).

    Raises:
        ValueError: ``runs`` is not two-dimensional, has fewer than two rows, or holds a
            value that is NaN or infinite.
    """
    runs = _float64(runs)
    if runs.dim() != 2:
        raise ValueError(f"runs must be (runs, points), got shape {tuple(runs.shape)}")
    _finite(runs)
    n = runs.shape[0]
    if n < 2:
        raise ValueError(f"a confidence interval needs at least two values, got {n}; "
                         "summarize() gives the mean alone for a single run")
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * runs.std(0) / math.sqrt(n)
    return runs.mean(0).numpy(), half.numpy()


def summarize(values: ArrayLike | torch.Tensor, scale: float = 1.0) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% interval)`` of ``scale · values``, the interval ``None`` for one value.

    For results over seeds, where a small profile may run one seed: the mean is
    still reported, and :func:`lowlearn.results.record` stores it without an
    interval. ``scale`` converts units on the way, e.g. ``100`` for accuracies in %.

    Raises:
        ValueError: no values at all, or a value that is NaN or infinite.
    """
    values = _as_float64(values, scale)
    if values.numel() == 0:
        raise ValueError("summarize() needs at least one value")
    if values.numel() == 1:
        return values.item(), None
    return mean_and_ci(values)
