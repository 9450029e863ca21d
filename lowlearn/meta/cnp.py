"""Conditional Neural Processes: a learned map from a context set to a predictive distribution.

Garnelo et al. (2018), "Conditional neural processes" (ICML). A CNP is a
black-box meta-learner for regression: given a *context* set
``O = {(x_i, y_i)}_{i=1..n}`` of one function, it predicts a Gaussian over ``y`` at
any *target* input ``x_T``:

* encoder ``h``: ``r_i = h_θ(x_i, y_i)`` for every context pair;
* aggregator: ``r = (1/n) Σ_i r_i``, the mean (the paper's commutative ``a``),
  which makes the prediction invariant to the order of the context set;
* decoder ``g``: ``(μ_T, σ_T) = g_θ(x_T, r)``.

It is trained by maximising ``log N(y_T; μ_T, σ_T²)`` over random context/target
splits of functions from the training distribution
(:func:`lowlearn.data.tasks.context_target_split`); nothing is fitted at test
time, so "learning" a new function is one forward pass, and the predicted ``σ``
says where the context leaves the function uncertain. Following the authors'
code, ``σ = σ_min + (1 − σ_min)·softplus(·)`` keeps it away from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from ..checks import check_count


def _mlp(sizes: list[int], first: Callable[[int, int], nn.Linear] = nn.Linear) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last); ``first`` builds the first."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [(first if not layers else nn.Linear)(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _ConditionedLinear(nn.Linear):
    """The decoder's first layer, ``W [r; x_T] + b`` on the representation ``r`` and a target input ``x_T``.

    It computes ``(W_r r + b) + W_x x_T``: the product with ``r`` once per function rather
    than once per target, and ``[r, x_T]`` is never materialised. ``weight`` is ``W``, its
    last ``x_dim`` columns ``W_x``.
    """

    def __init__(self, in_features: int, out_features: int, x_dim: int):
        super().__init__(in_features, out_features)
        self.x_dim = x_dim

    def forward(self, r: Tensor, target_x: Tensor) -> Tensor:
        """``r (B, in − x_dim)`` and ``target_x (B, m, x_dim)`` (or both without ``B``) to ``(B, m, out)``."""
        w_r, w_x = self.weight.split([self.in_features - self.x_dim, self.x_dim], dim=-1)
        return F.linear(r, w_r, self.bias).unsqueeze(-2) + F.linear(target_x, w_x)

    def count_macs(self, output: Tensor) -> int:
        """Multiply-accumulates that gave ``output``: ``out·(in − x_dim)`` per function and ``out·x_dim`` per
        target. Used by :func:`lowlearn.cost.count_flops`."""
        functions, targets = math.prod(output.shape[:-2]), math.prod(output.shape[:-1])
        return self.out_features * (functions * (self.in_features - self.x_dim) + targets * self.x_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, x_dim={self.x_dim}"


class CNP(nn.Module):
    """A Conditional Neural Process (Garnelo et al. 2018).

    Args:
        x_dim, y_dim: sizes of one input and one output (1 and 1 for 1-D
            regression; 2 and 1 for image completion, pixel coordinates to intensity).
        hidden: width of every hidden layer and of the representation ``r``
            (128 in the paper's 1-D experiments).
        encoder_layers: linear layers of ``h``.
        decoder_layers: linear layers of ``g``, the last giving ``μ`` and the raw ``σ``.
        min_std: ``σ_min``, the smallest predicted standard deviation (the authors' code: 0.1).

    Shapes:
        ``context_x (B, n, x_dim)``, ``context_y (B, n, y_dim)``, ``target_x (B, m, x_dim)``,
        or the same without the batch dimension ``B``.

    Raises:
        ValueError: a size below 1 (``x_dim``, ``y_dim``, ``hidden``, the layer counts),
            or ``min_std`` outside ``(0, 1)``.
    """

    def __init__(self, x_dim: int = 1, y_dim: int = 1, hidden: int = 128, encoder_layers: int = 3,
                 decoder_layers: int = 3, min_std: float = 0.1):
        super().__init__()
        x_dim, y_dim, hidden, encoder_layers, decoder_layers = (
            check_count(name, value, 1) for name, value in (("x_dim", x_dim), ("y_dim", y_dim), ("hidden", hidden),
                                                             ("encoder_layers", encoder_layers),
                                                             ("decoder_layers", decoder_layers)))
        if not 0 < min_std < 1:
            raise ValueError(f"min_std must be in (0, 1), above 0 so that σ never rounds to 0 (a NaN loss); got "
                             f"{min_std}")
        self.x_dim, self.y_dim, self.min_std = x_dim, y_dim, min_std
        self.encoder = _mlp([x_dim + y_dim] + [hidden] * encoder_layers)
        self.decoder = _mlp([hidden + x_dim] + [hidden] * (decoder_layers - 1) + [2 * y_dim],
                            first=lambda n_in, n_out: _ConditionedLinear(n_in, n_out, x_dim))

    def represent(self, context_x: Tensor, context_y: Tensor) -> Tensor:
        """``r``: the mean of the encoded context pairs, ``(B, hidden)``.

        Raises:
            ValueError: an empty context set, or shapes that do not fit.
        """
        if context_x.dim() < 2 or context_x.shape[:-1] != context_y.shape[:-1] or context_x.shape[-1] != self.x_dim \
                or context_y.shape[-1] != self.y_dim:
            raise ValueError(f"context_x {tuple(context_x.shape)} and context_y {tuple(context_y.shape)} must be "
                             f"(B, n, {self.x_dim}) and (B, n, {self.y_dim}), or (n, {self.x_dim}) and "
                             f"(n, {self.y_dim})")
        if context_x.shape[-2] == 0:
            raise ValueError("the context set is empty: a CNP needs at least one (x, y) pair to condition on")
        return self.encoder(torch.cat([context_x, context_y], dim=-1)).mean(dim=-2)

    def forward(self, context_x: Tensor, context_y: Tensor, target_x: Tensor) -> Normal:
        """The predictive distribution ``N(μ_T, σ_T²)`` at the targets, one independent Gaussian per output."""
        if target_x.dim() < 2 or target_x.shape[-1] != self.x_dim or target_x.shape[:-2] != context_x.shape[:-2]:
            raise ValueError(f"target_x {tuple(target_x.shape)} must be (B, m, {self.x_dim}) with the batch of "
                             f"context_x {tuple(context_x.shape)}")
        hidden = self.decoder[0](self.represent(context_x, context_y), target_x)     # g's first layer on [r, x_T]
        mean, raw_std = self.decoder[1:](hidden).split(self.y_dim, dim=-1)
        # σ ≥ σ_min > 0 by construction: Normal's checks of its arguments would read them back from the device.
        return Normal(mean, self.min_std + (1 - self.min_std) * F.softplus(raw_std), validate_args=False)

    def loss(self, context_x: Tensor, context_y: Tensor, target_x: Tensor, target_y: Tensor) -> Tensor:
        """``−mean log N(y_T; μ_T, σ_T²)`` over targets, outputs and functions: the training objective.

        Raises:
            ValueError: an empty context or target set, or shapes that do not fit.
        """
        if target_x.dim() < 2 or target_y.shape[:-1] != target_x.shape[:-1] or target_y.shape[-1] != self.y_dim:
            raise ValueError(f"target_y {tuple(target_y.shape)} must be (B, m, {self.y_dim}) like target_x "
                             f"{tuple(target_x.shape)}")
        if target_x.shape[-2] == 0:
            raise ValueError("the target set is empty: the loss is a mean over target points, so give at least one")
        return -self(context_x, context_y, target_x).log_prob(target_y).mean()


ContextAndTargets = tuple[Tensor, Tensor, Tensor, Tensor]


def fit_cnp(model: CNP, sample: Callable[[], ContextAndTargets], optimizer: torch.optim.Optimizer,
            steps: int) -> list[float]:
    """Train a CNP for ``steps`` optimizer steps on freshly sampled functions.

    Each step draws ``(context_x, context_y, target_x, target_y)`` from ``sample()``
    (a batch of functions, split at random into a context and a target set that
    includes it, as Garnelo et al. train; see
    :func:`lowlearn.data.tasks.context_target_split`) and takes one step on
    :meth:`CNP.loss`. The model is left in training mode.

    Returns:
        The loss of every step, read from the device once, at the end.

    Raises:
        ValueError: ``steps`` below 0.
        FloatingPointError: the loss became NaN or infinite (checked at the end).
    """
    check_count("steps", steps, 0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(*sample())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    history = torch.stack(losses).tolist() if losses else []
    bad = next((step for step, value in enumerate(history, start=1) if not math.isfinite(value)), None)
    if bad is not None:
        raise FloatingPointError(f"the CNP's training loss became {history[bad - 1]} at step {bad}; lower the "
                                 "learning rate")
    return history
