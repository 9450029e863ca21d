"""Figures that several chapters share, and the numbers they show.

Every function that draws does so on a given matplotlib ``Axes`` (or a new one) and
returns it, so chapters can arrange panels freely; :func:`mean_and_spread` and
:func:`kept_per_input` give what is drawn (a curve's spread over seeds, a mask as an image).
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter

from .checks import check_flag
from .train import History


def _axes(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=(5, 3.5))[1]


def _on_host(numbers: object) -> object:
    """``numbers`` with every tensor in it (at any depth of lists and tuples) detached and copied to the CPU, a
    bfloat16 one as float32 (NumPy has no bfloat16).

    Raises:
        ValueError: a tensor on the ``meta`` device, which holds no values.
    """
    if isinstance(numbers, torch.Tensor):
        if numbers.is_meta:
            raise ValueError("a tensor on the meta device holds no values to plot: pass the results themselves")
        numbers = numbers.detach().cpu()
        return numbers.float() if numbers.dtype == torch.bfloat16 else numbers
    if isinstance(numbers, (list, tuple)):
        return [_on_host(value) for value in numbers]
    return numbers


def mean_and_spread(runs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over runs (axis 0) of equally long result lists.

    ``runs`` holds one result per run: a number, or a list of numbers. Tensors among them
    (or ``runs`` itself a tensor), on any device and requiring gradients or not, count as
    their values. The standard deviation uses ``ddof=1`` (the sample estimate); one run gives 0.

    Raises:
        ValueError: no runs, runs of different lengths, or results that are not numbers
            (or tensors on the ``meta`` device, which hold none).
    """
    try:
        arr = np.asarray(_on_host(runs))
        if arr.dtype.kind not in "biuf":          # text such as "0.9" would otherwise be parsed as a number
            raise TypeError(f"results of type {arr.dtype} are not numbers")
        arr = arr.astype(float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the runs must be equally long lists of numbers, one per run ({error})") from None
    if arr.ndim == 0 or len(arr) == 0:
        raise ValueError(f"no runs to average in {runs!r}: pass one result, or one list of results, per run")
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1:])
    return arr.mean(axis=0), std


def errorbar_curve(x: Sequence[float], runs: Sequence[Sequence[float]], *, label: str | None = None,
                   logx: bool = False, ax: Axes | None = None, **kwargs) -> Axes:
    """Plot the mean over ``runs`` (one list per seed, aligned with ``x``) with ±1 std bars.

    ``x`` and ``runs`` may hold tensors, as :func:`mean_and_spread`'s ``runs`` may.
    A single run is drawn without bars: it shows no spread. ``logx`` puts ``x`` on a
    logarithmic axis labelled at powers of ten only. Other keyword arguments go to
    :meth:`matplotlib.axes.Axes.errorbar`, and may replace the defaults ``marker="o"`` and ``capsize=3``.

    Raises:
        ValueError: runs that are not equally long lists aligned with ``x``, or ``logx`` with an
            ``x`` that is not positive (a log axis cannot show it), before any figure is made.
        TypeError: ``logx`` other than ``True`` or ``False``.
    """
    logx = check_flag("logx", logx)
    mean, std = mean_and_spread(runs)
    x = _on_host(x)
    if mean.ndim != 1 or len(mean) != len(x):
        raise ValueError(f"runs must be one list per run, each aligned with the {len(x)} values of x; got runs of "
                         f"shape {np.shape(runs)} (put a single run in a list: [run])")
    if logx:
        not_positive = [value for value in np.asarray(x, dtype=float) if not value > 0]
        if not_positive:
            raise ValueError(f"logx=True needs positive x values, and x holds {not_positive[0]:g}: "
                             "leave such points out, or plot with logx=False")
    ax = _axes(ax)
    style = {"marker": "o", "capsize": 3, **kwargs}
    ax.errorbar(x, mean, yerr=std if len(runs) > 1 else None, label=label, **style)
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    return ax


def kept_per_input(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """How many weights each input of a masked Linear layer keeps, laid out like the input: the mask as an image.

    Args:
        mask: the layer's mask, ``(out_features, in_features)``, nonzero where kept: booleans, or the 0/1
            buffer of a :class:`~lowlearn.sparse.mask.Mask` in its weight's dtype.
        shape: the input's shape, e.g. ``(28, 28)`` for MNIST's pixels; its size is ``in_features``.

    Returns:
        A float32 CPU tensor of ``shape``: per input, the number of units that keep its weight (counted
        exactly, also for a bfloat16 mask, whose own sums would round counts above 256).

    Raises:
        ValueError: a mask that is not two-dimensional, or a ``shape`` of another size than its inputs.
    """
    if mask.dim() != 2 or math.prod(shape) != mask.shape[1]:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not have one column per input of shape "
                         f"{tuple(shape)}: give the first Linear layer's (out_features, in_features) mask")
    return mask.detach().ne(0).sum(0).reshape(*shape).float().cpu()


def density_axis(ax: Axes, kept: Sequence[float], *, percent: bool = False, label: str = "weights kept") -> Axes:
    """Put the fraction of weights kept on the x axis: a log scale, dense on the left, sparse on the right.

    Args:
        ax: the axes.
        kept: the densities to label, fractions in (0, 1] (percentages with ``percent=True``);
            the axis spans them with a margin on both sides. Numbers, or tensors on any device.
        percent: whether the plotted x values are percentages.
        label: the axis label, before "(log scale; sparsity grows →)".

    Raises:
        ValueError: no densities, or one outside (0, 1] (outside (0, 100] with ``percent=True``),
            before the axes change.
        TypeError: ``percent`` other than ``True`` or ``False``.
    """
    percent = check_flag("percent", percent)
    top = 100 if percent else 1
    values = np.asarray(_on_host(kept), dtype=float)
    if values.ndim != 1 or len(values) == 0 or not np.all((values > 0) & (values <= top)):
        what = "percentages in (0, 100]" if percent else "fractions in (0, 1] (pass percent=True for percentages)"
        raise ValueError(f"kept must be densities to label on a log axis, {what}; got {kept!r}")
    to_percent = 1 if percent else 100
    ax.set_xscale("log")
    ax.set_xticks(values, labels=[f"{to_percent * k:.3g}%" for k in values])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(values.max() * 1.3, values.min() / 1.3)
    ax.set_xlabel(f"{label} (log scale; sparsity grows →)")
    return ax


def plot_history(history: History, *, metric: str = "accuracy", label: str | None = None,
                 axes: Sequence[Axes] | None = None) -> Sequence[Axes]:
    """Training loss (left) and an evaluation metric (right) against optimizer steps.

    The loss axis is logarithmic when every loss is positive, else linear (a negative
    log-likelihood can be negative, and a log axis would hide it).

    Raises:
        ValueError: a ``metric`` that the evaluations do not hold (a regression's hold
            only ``"loss"``), before anything is drawn.
    """
    if history.eval and metric not in history.eval[0]:
        raise ValueError(f"the history's evaluations hold {sorted(history.eval[0])}, not {metric!r}: pass one of "
                         "them as metric=")
    if axes is None:
        axes = plt.subplots(1, 2, figsize=(10, 3.5))[1]
    loss_ax, metric_ax = axes
    loss_ax.plot(history.steps, history.loss, label=label)
    positive = all(loss > 0 for loss in history.loss)
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log" if positive else "linear")
    if history.eval:
        metric_ax.plot(history.eval_steps, history.metric(metric), marker=".", label=label)
        metric_ax.set(xlabel="optimizer step", ylabel=f"test {metric}")
    return axes
