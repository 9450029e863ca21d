"""Synthetic task distributions for meta-learning regression.

* :class:`SinusoidTasks`: the sine-wave regression tasks of MAML (Finn, Abbeel
  and Levine, 2017, "Model-agnostic meta-learning for fast adaptation of deep
  networks", ICML, section 5.1).
* :class:`GPCurves`: functions drawn from a Gaussian process, the 1-D regression
  tasks of Conditional Neural Processes (Garnelo et al., 2018, "Conditional
  neural processes", ICML, section 4.1).

Every sampler takes an optional ``torch.Generator`` (for reproducible tasks)
and ``device``, and draws whole batches of tasks with tensor operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import check_count, check_positive
from ..train import draw_with

Range = tuple[float, float]


class RegressionBatch(NamedTuple):
    """A batch of ``B`` regression tasks with ``K`` support and ``Q`` query points each.

    Attributes:
        support_x: float32 ``(B, K, 1)`` support inputs.
        support_y: float32 ``(B, K, 1)`` support targets.
        query_x: float32 ``(B, Q, 1)`` query inputs.
        query_y: float32 ``(B, Q, 1)`` query targets.
        amplitude: float32 ``(B,)``, each task's sine amplitude.
        phase: float32 ``(B,)``, each task's sine phase.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    amplitude: Tensor
    phase: Tensor


class Curves(NamedTuple):
    """A batch of ``B`` functions observed at ``P`` points each.

    Attributes:
        x: float32 ``(B, P, 1)`` inputs.
        y: float32 ``(B, P, 1)`` outputs.
    """

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class TaskSampler:
    """Draws batches of regression tasks of one shape (see :meth:`SinusoidTasks.sampler`)."""

    tasks: SinusoidTasks
    shots: int
    queries: int
    generator: torch.Generator | None = None
    device: torch.device | str | None = None

    def sample(self, batch: int) -> RegressionBatch:
        """``batch`` tasks of ``shots`` support and ``queries`` query points."""
        return self.tasks.sample(batch, self.shots, self.queries, self.generator, self.device)


class SinusoidTasks:
    """Sine waves ``y = amplitude * sin(x - phase)`` with random amplitude and phase.

    The defaults are MAML's (Finn et al., 2017, section 5.1): amplitude uniform in
    [0.1, 5.0], phase uniform in [0, pi], inputs uniform in [-5, 5]. The sign of
    the phase follows the MAML code, ``amp * sin(x - phase)``; with a phase
    range of width pi, either sign gives an equally hard family of tasks.

    The *mean* task is not zero: with phases covering half a period,
    ``E[amp · sin(x − phase)] = −(2/π) E[amp] cos x ≈ −1.62 cos x`` for the default
    ranges. A network trained on all tasks pooled learns about this curve.

    Args:
        amplitude, phase, x_range: ``(low, high)`` ranges, each sampled uniformly; an
            amplitude or phase range with ``low == high`` is that fixed value.
    """

    def __init__(self, amplitude: Range = (0.1, 5.0), phase: Range = (0.0, math.pi),
                 x_range: Range = (-5.0, 5.0)):
        self.amplitude = _check_range("amplitude", amplitude, fixed_ok=True)
        self.phase = _check_range("phase", phase, fixed_ok=True)
        self.x_range = _check_range("x_range", x_range)

    def sample(self, batch: int, shots: int, queries: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> RegressionBatch:
        """``batch`` tasks, each with ``shots`` support and ``queries`` query points.

        Support and query inputs are independent uniform draws from ``x_range``.
        ``device`` defaults to the generator's device.
        """
        check_count("batch", batch, 1)
        check_count("shots", shots, 1)
        check_count("queries", queries, 0)
        device = _device(generator, device)
        amplitude = _uniform((batch,), self.amplitude, generator, device)
        phase = _uniform((batch,), self.phase, generator, device)
        x = _uniform((batch, shots + queries, 1), self.x_range, generator, device)
        y = self.curve(amplitude, phase, x)
        return RegressionBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amplitude, phase)

    def sampler(self, shots: int, queries: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> TaskSampler:
        """A sampler of tasks of one shape: ``sampler.sample(batch)`` is ``self.sample(batch, shots, queries, ...)``.

        It has the interface of :class:`~lowlearn.data.episodes.EpisodeSampler` that
        :func:`lowlearn.meta.episodic.meta_train` draws its batches from.
        """
        return TaskSampler(self, shots, queries, generator, device)

    @staticmethod
    def curve(amplitude: Tensor | float, phase: Tensor | float, x: Tensor) -> Tensor:
        """The true functions, e.g. to plot them.

        Args:
            amplitude, phase: ``(B,)`` tensors or floats (one task).
            x: ``(B, P, 1)``, or ``(P, 1)`` shared by all tasks.

        Returns:
            ``(B, P, 1)`` values ``amplitude * sin(x - phase)`` (``B = 1`` for floats).
        """
        amplitude = torch.as_tensor(amplitude, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        phase = torch.as_tensor(phase, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        return amplitude * torch.sin(x - phase)


class GPCurves:
    """Functions drawn from a Gaussian process with a squared-exponential kernel.

    ``k(x, x') = scale**2 * exp(-(x - x')**2 / (2 * length_scale**2))``, plus
    ``noise**2`` on the diagonal: observation noise, which also keeps the
    Cholesky factorisation stable when two inputs nearly coincide. The defaults
    are those of Conditional Neural Processes (Garnelo et al., 2018, section 4.1:
    length scale 0.4, scale 1.0, inputs in [-2, 2]) and of its reference code
    (noise 0.02).

    Args:
        length_scale: how far apart two inputs must be for their outputs to decorrelate.
        scale: standard deviation of the function values.
        noise: standard deviation of the observation noise, > 0.
        x_range: ``(low, high)`` range of the inputs, sampled uniformly.
    """

    def __init__(self, length_scale: float = 0.4, scale: float = 1.0, noise: float = 0.02,
                 x_range: Range = (-2.0, 2.0)):
        self.length_scale = check_positive("length_scale", length_scale)
        self.scale = check_positive("scale", scale)
        self.noise = check_positive("noise", noise)
        self.x_range = _check_range("x_range", x_range)

    def kernel(self, x: Tensor) -> Tensor:
        """Covariance ``(B, P, P)`` of the observations at inputs ``x`` ``(B, P, 1)``, noise included."""
        squared_distance = (x - x.transpose(-1, -2)) ** 2
        covariance = self.scale ** 2 * torch.exp(-squared_distance / (2 * self.length_scale ** 2))
        return covariance + self.noise ** 2 * torch.eye(x.shape[-2], dtype=x.dtype, device=x.device)

    def _cholesky(self, kernel: Tensor) -> Tensor:
        """Cholesky factors ``L`` of kernel matrices ``(B, P, P)``, or a ValueError where one has none.

        ``cholesky_ex`` leaves a factor that failed partial and says so only in ``info``
        (read here: one synchronisation); with inputs this close together and this little
        noise, a kernel matrix is not positive definite in floating point.
        """
        cholesky, info = torch.linalg.cholesky_ex(kernel)
        failed = int(info.count_nonzero())
        if failed and not torch.isfinite(kernel).all():
            raise ValueError("the inputs hold NaN or infinite values, so their kernel matrices are not finite: give "
                             "finite inputs x")
        if failed:
            raise ValueError(f"the kernel matrices of {failed} of {info.numel()} curves are not positive definite in "
                             f"floating point: noise={self.noise:g} is too small for inputs this close together; "
                             "raise noise (e.g. to 1e-3) or use fewer inputs, further apart")
        return cholesky

    def sample(self, batch: int, num_points: int | None = None, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, x: Tensor | None = None) -> Curves:
        """``batch`` curves, each observed at ``num_points`` inputs.

        The inputs are drawn uniformly from ``x_range``, or given as ``x`` of
        shape ``(P, 1)`` (shared by all curves) or ``(B, P, 1)``; give exactly
        one of ``num_points`` and ``x``. Outputs are ``L @ z`` with ``L L^T``
        the kernel matrix (batched Cholesky) and ``z`` standard normal, computed
        in float64 (float32 on Apple's MPS, which has no float64) and returned
        as float32. ``device`` defaults to the generator's device, or ``x``'s.

        Raises:
            ValueError: a kernel matrix that is not positive definite in floating point
                (``noise`` too small for inputs this close together).
        """
        check_count("batch", batch, 1)
        if (num_points is None) == (x is None):
            raise ValueError("give exactly one of num_points (random inputs) and x (given inputs)")
        if x is None:
            check_count("num_points", num_points, 1)
            device = _device(generator, device)
            x = _uniform((batch, num_points, 1), self.x_range, generator, device)
        else:
            x = self._given_inputs(x, batch, device)
        precise = _precise(x)
        cholesky = self._cholesky(self.kernel(x.to(precise)))
        z = draw_with(torch.randn, x.shape, generator, x.device, precise)
        return Curves(x, (cholesky @ z).float())

    def posterior(self, context_x: Tensor, context_y: Tensor, target_x: Tensor) -> tuple[Tensor, Tensor]:
        """The exact predictive mean and standard deviation of new observations at ``target_x``.

        Rasmussen & Williams (2006), "Gaussian processes for machine learning", eqs.
        2.23–2.24, with ``K`` the kernel of the context inputs (noise included), ``k_*`` the
        covariances between context and target inputs and ``k_**`` a target's variance
        (noise included: the prediction is of an observation, like the curves'):

            μ_* = k_*ᵀ K⁻¹ y,    σ_*² = k_** − k_*ᵀ K⁻¹ k_*.

        Computed in float64 (float32 on MPS) with one Cholesky factorisation per curve;
        returned as float32.

        Args:
            context_x, context_y: ``(B, n, 1)``, the observed points of each curve (with
                ``n = 0`` the prediction is the prior: mean 0, std ``sqrt(scale² + noise²)``).
            target_x: ``(B, m, 1)``.

        Returns:
            ``(mean, std)``, each ``(B, m, 1)``.

        Raises:
            ValueError: inputs of other shapes (a ``context_y`` that would broadcast over the
                curves, or turn the mean into a matrix, included), or a kernel matrix that is
                not positive definite in floating point (``noise`` too small for inputs this
                close together).
        """
        shapes = [tuple(t.shape) for t in (context_x, context_y, target_x)]
        if (any(len(s) != 3 or s[-1] != 1 for s in shapes) or shapes[0] != shapes[1]
                or shapes[2][0] != shapes[0][0]):
            raise ValueError(f"context_x, context_y and target_x must be (B, n, 1), (B, n, 1) and (B, m, 1), got "
                             f"{', '.join(map(str, shapes))}")
        n = context_x.shape[-2]
        precise = _precise(context_x)
        k = self.kernel(torch.cat([context_x, target_x], -2).to(precise))
        k_cc, k_ct = k[..., :n, :n], k[..., :n, n:]
        cholesky = self._cholesky(k_cc)
        half = torch.linalg.solve_triangular(cholesky, k_ct, upper=False)          # L⁻¹ k_*
        weights = torch.linalg.solve_triangular(cholesky, context_y.to(precise), upper=False)   # L⁻¹ y
        mean = half.transpose(-1, -2) @ weights
        variance = k[..., n:, n:].diagonal(dim1=-2, dim2=-1) - half.square().sum(-2)
        return mean.float(), variance.clamp_min(0).sqrt().unsqueeze(-1).float()

    def mahalanobis(self, curves: Curves) -> Tensor:
        """``yᵀ K⁻¹ y`` of each curve ``(B,)``: chi-squared with ``P`` degrees of freedom for curves of this GP.

        ``K`` is the kernel of the curve's ``P`` inputs (noise included). Curves drawn
        from a GP with another kernel give other values: a test of whether a task
        comes from this prior. Computed in float64 (float32 on MPS).

        Raises:
            ValueError: ``curves`` whose inputs and outputs are not both ``(B, P, 1)``, or a
                kernel matrix that is not positive definite in floating point (``noise`` too
                small for inputs this close together).
        """
        if curves.x.dim() != 3 or curves.x.shape[-1] != 1 or curves.y.shape != curves.x.shape:
            raise ValueError(f"curves must hold inputs and outputs of shape (B, P, 1), got {tuple(curves.x.shape)} "
                             f"and {tuple(curves.y.shape)}")
        precise = _precise(curves.x)
        cholesky = self._cholesky(self.kernel(curves.x.to(precise)))
        return torch.linalg.solve_triangular(cholesky, curves.y.to(precise), upper=False).square().sum(dim=(-2, -1))

    @staticmethod
    def _given_inputs(x: Tensor, batch: int, device: torch.device | str | None) -> Tensor:
        """Inputs ``(P, 1)`` or ``(B, P, 1)`` as a new float32 tensor ``(batch, P, 1)`` on ``device``."""
        if x.dim() == 2:
            x = x.expand(batch, *x.shape)
        if x.dim() != 3 or x.shape[0] != batch or x.shape[-1] != 1:
            raise ValueError(f"x must have shape (P, 1) or (batch={batch}, P, 1); got {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32, copy=True)


def context_target_split(curves: Curves, num_context: int,
                         generator: torch.Generator | None = None) -> tuple[Curves, Curves]:
    """Split curves into a random context set and the target set, as in CNP training.

    Garnelo et al. (2018) train by conditioning on a random subset of each curve's
    points (the *context*) and predicting *all* of its points (the *target*),
    so the target includes the context.

    Args:
        curves: ``(B, P, 1)`` curves.
        num_context: context points per curve, ``1 <= num_context <= P``.
        generator: for a reproducible choice of context points.

    Returns:
        ``(context, target)``: ``context`` holds, for each curve independently, the
        first ``num_context`` points of a random permutation (``(B, num_context, 1)``);
        ``target`` is ``curves`` itself.

    Raises:
        ValueError: curves that are not ``(B, P, 1)`` (one curve too: give it a batch
            dimension), or a ``num_context`` that is not a count from 1 to ``P``.
    """
    if curves.x.dim() != 3 or curves.y.dim() != 3 or curves.x.shape[:2] != curves.y.shape[:2]:
        raise ValueError(f"context_target_split takes curves of shape (B, P, 1); got x {tuple(curves.x.shape)} and y "
                         f"{tuple(curves.y.shape)} (for one curve of shape (P, 1), use x.unsqueeze(0))")
    batch, points = curves.x.shape[:2]
    check_count("num_context", num_context, 1)
    if num_context > points:
        raise ValueError(f"num_context must be <= the {points} points of each curve; got {num_context}")
    keys = draw_with(torch.rand, (batch, points), generator, curves.x.device)
    chosen = keys.argsort(dim=1)[:, :num_context]
    rows = torch.arange(batch, device=curves.x.device)[:, None]
    return Curves(curves.x[rows, chosen], curves.y[rows, chosen]), curves


def _check_range(name: str, bounds: Range, *, fixed_ok: bool = False) -> Range:
    """``(low, high)`` as finite floats, or a ValueError unless low < high (or, with ``fixed_ok``, low == high)."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a range (low, high) of two numbers; got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be a range (low, high) of two finite numbers; got {tuple(bounds)}")
    if not (low < high or (fixed_ok and low == high)):
        allowed = "low <= high (equal for a fixed value)" if fixed_ok else "low < high"
        raise ValueError(f"{name} must be a range (low, high) with {allowed}; got {tuple(bounds)}")
    return low, high


def _precise(x: Tensor) -> torch.dtype:
    """The dtype of the GP's linear algebra for inputs on ``x``'s device: float64, float32 on MPS (no float64)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | None:
    """``device`` if given, else the generator's device, else ``None`` (torch's default device)."""
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else None


def _uniform(shape: tuple[int, ...], bounds: Range, generator: torch.Generator | None,
             device: torch.device | None) -> Tensor:
    """float32 tensor of ``shape``, uniform in ``[low, high)``."""
    low, high = bounds
    return low + (high - low) * draw_with(torch.rand, shape, generator, device)
