"""Learning the update rule: a coordinate-wise LSTM optimiser trained by gradient descent.

Andrychowicz, Denil, Gómez, Hoffman, Pfau, Schaul, Shillingford & de Freitas (2016),
"Learning to learn by gradient descent by gradient descent" (NeurIPS). The update of
an optimisee's parameters ``θ`` is the output of a recurrent network ``m_φ``:

    θ_{t+1} = θ_t + g_t,    [g_t, h_{t+1}] = m_φ(∇f(θ_t), h_t),

and ``φ`` is trained to minimise the loss along the trajectory,
``L(φ) = E_f [Σ_{t=1}^{T} w_t f(θ_t)]`` (here ``w_t = 1``, each truncated segment's sum divided
by its length), by backpropagation through the unrolled optimisation, truncated every
``truncation`` steps. As in the paper:

* the LSTM is **coordinate-wise**: every coordinate of ``θ`` is a row of one batch,
  with its own hidden state and the same weights ``φ``, so one small network
  optimises any number of parameters, and the update does not depend on the order
  of the coordinates;
* two LSTM layers of 20 units; the gradient enters preprocessed as
  ``(log|∇|/p, sign ∇)`` (clamped for tiny gradients; the paper's appendix A);
* the second derivatives ``∂∇f/∂φ`` are dropped: gradients enter as constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..checks import check_count, check_flag, check_positive
from ..lowrank.layers import refuse_integrator_factors
from ..train import draw_with, generator_on

State = list[tuple[Tensor, Tensor]]
Objective = Callable[[Tensor], Tensor]


def preprocess_gradient(grad: Tensor, p: float = 10.0) -> Tensor:
    """``(n,)`` gradients to ``(n, 2)`` inputs: ``(log|g|/p, sign g)`` if ``|g| ≥ e^{−p}``, else ``(−1, e^p g)``."""
    big = grad.abs() >= math.exp(-p)
    first = torch.where(big, grad.abs().clamp_min(1e-38).log() / p, torch.full_like(grad, -1.0))
    second = torch.where(big, grad.sign(), math.exp(p) * grad)
    return torch.stack([first, second], dim=-1)


class LSTMOptimizer(nn.Module):
    """The coordinate-wise LSTM optimiser ``m_φ``.

    Args:
        hidden: units per LSTM layer (the paper: 20).
        layers: stacked LSTM layers (the paper: 2).
        output_scale: the LSTM's output times this is the update. The default coordinate-wise
            network of the authors' released code (the one its MNIST problem uses) has 0.01
            (and ``p = 5`` in the preprocessing, where the paper gives 10); the default here,
            0.1, is what the optimisation_based chapter meta-trains with.
        preprocess: feed ``(log|∇|/p, sign ∇)`` instead of the raw gradient.

    Raises:
        ValueError: a ``hidden`` or ``layers`` below 1, or an ``output_scale`` that is not
            a positive, finite number.
        TypeError: ``preprocess`` other than ``True`` or ``False``.
    """

    def __init__(self, hidden: int = 20, layers: int = 2, output_scale: float = 0.1, preprocess: bool = True):
        super().__init__()
        hidden, layers = check_count("hidden", hidden, 1), check_count("layers", layers, 1)
        preprocess = check_flag("preprocess", preprocess)
        self.preprocess, self.output_scale = preprocess, check_positive("output_scale", output_scale)
        sizes = [2 if preprocess else 1] + [hidden] * layers
        self.cells = nn.ModuleList([nn.LSTMCell(a, b) for a, b in zip(sizes, sizes[1:])])
        self.out = nn.Linear(hidden, 1)

    def initial_state(self, n: int, like: Tensor) -> State:
        """Zero hidden and cell states for ``n`` coordinates, with ``like``'s dtype and device."""
        return [(like.new_zeros(n, cell.hidden_size), like.new_zeros(n, cell.hidden_size)) for cell in self.cells]

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        """The update ``g_t`` (``grad``'s shape, one coordinate per element) and the next state.

        ``state`` holds one row per element of ``grad`` (:meth:`initial_state` of ``grad.numel()``).

        Raises:
            ValueError: a ``state`` with another number of layers or of rows.
        """
        flat = grad.reshape(-1)
        rows = {h.shape[0] for h, _ in state}
        if len(state) != len(self.cells) or rows != {flat.numel()}:
            raise ValueError(f"the state holds {len(state)} layer(s) of {sorted(rows)} row(s), but the optimiser has "
                             f"{len(self.cells)} layer(s) and the gradient {flat.numel()} element(s): start from "
                             "initial_state(grad.numel(), grad) and pass on the state that each call returns")
        inputs = preprocess_gradient(flat) if self.preprocess else flat.unsqueeze(-1)
        new_state = []
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(inputs, (h, c))
            new_state.append((h, c))
            inputs = h
        return (self.out(inputs).squeeze(-1) * self.output_scale).view_as(grad), new_state


def loss_and_gradient(objective: Objective, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``f(θ)`` and ``∇f(θ)`` from one evaluation of ``f`` (one mini-batch), both constants.

    The gradient is the optimiser's input, with no path back to ``φ`` (the paper's simplification).
    """
    with torch.enable_grad():
        point = theta.detach().requires_grad_()
        value = objective(point)
        return value.detach(), torch.autograd.grad(value, point)[0]


def unroll(optimizer: LSTMOptimizer, objective: Objective, theta: Tensor, state: State, steps: int,
           grad: Tensor | None = None) -> tuple[Tensor, Tensor, State, Tensor]:
    """``steps`` updates of ``theta``: ``(Σ_{t=1}^{steps} f(θ_t), θ_T, state, ∇_T)``, the sum differentiable in ``φ``.

    Each ``f(θ_t)`` is evaluated once: the meta-loss term and the gradient ``∇_t`` fed to
    the next update come from the same evaluation (the same mini-batch of a stochastic
    ``f``), as in the paper's computational graph. ``grad`` is ``∇_0``, the gradient at
    ``theta`` that a previous segment returned; without it ``∇_0`` comes from an
    evaluation of its own (``f(θ_0)`` does not depend on ``φ``). ``∇_T``, a constant,
    continues a truncated unroll from ``θ_T``.

    Raises:
        ValueError: ``steps`` below 1 (no update: the sum would be a zero with no path to ``φ``).
    """
    steps = check_count("steps", steps, 1)
    total = theta.new_zeros(())
    if grad is None:
        _, grad = loss_and_gradient(objective, theta)
    for _ in range(steps):
        update, state = optimizer(grad, state)
        theta = theta + update
        value = objective(theta)
        total = total + value
        grad = torch.autograd.grad(value, theta, retain_graph=True)[0]   # a constant; θ_t's graph stays
    return total, theta, state, grad


def meta_train(optimizer: LSTMOptimizer, make_problem: Callable[[], tuple[Objective, Tensor]],
               meta_optimizer: torch.optim.Optimizer, *, problems: int, horizon: int, truncation: int) -> list[float]:
    """Meta-train ``optimizer`` by truncated backpropagation through unrolled optimisations.

    For each of ``problems`` fresh problems ``(f, θ_0) = make_problem()``, run
    ``horizon`` steps in segments of ``truncation``: after each segment, back-propagate
    the segment's mean loss ``Σ f(θ_t) / truncation`` into ``φ`` (a constant factor on the
    paper's sum: Adam, the paper's meta-optimiser, does not see it; SGD's learning rate absorbs
    it), step ``meta_optimizer``, and carry ``θ``, the
    LSTM state and the last gradient on, detached (:func:`unroll`).

    Returns:
        The mean ``f(θ_t)`` over each problem's trajectory (to watch meta-training progress).

    Raises:
        ValueError: ``problems`` below 0, ``horizon`` or ``truncation`` below 1, or a
            ``horizon`` that is not a multiple of ``truncation``.
    """
    check_count("problems", problems, 0)
    check_count("horizon", horizon, 1)
    check_count("truncation", truncation, 1)
    if horizon % truncation:
        raise ValueError(f"horizon ({horizon}) must be a multiple of truncation ({truncation})")
    history = []
    for _ in range(problems):
        objective, theta = make_problem()
        state = optimizer.initial_state(theta.numel(), theta)
        total, grad = theta.new_zeros(()), None
        for _ in range(horizon // truncation):
            loss, theta, state, grad = unroll(optimizer, objective, theta, state, truncation, grad)
            meta_optimizer.zero_grad()
            (loss / truncation).backward()
            meta_optimizer.step()
            theta = theta.detach()
            state = [(h.detach(), c.detach()) for h, c in state]
            total += loss.detach()
        history.append(total.item() / horizon)
    return history


@torch.no_grad()
def optimize(optimizer: LSTMOptimizer, objective: Objective, theta: Tensor, steps: int) -> list[float]:
    """Run the learned optimiser for ``steps`` steps (no meta-gradient); return ``f(θ_t)`` for ``t = 0..steps``.

    ``f(θ_t)`` is the value whose gradient made step ``t`` (for a stochastic ``f``, on that
    step's mini-batch); the last one is evaluated on its own.

    Raises:
        ValueError: ``steps`` below 0.
    """
    check_count("steps", steps, 0)
    state = optimizer.initial_state(theta.numel(), theta)
    losses = []
    for _ in range(steps):
        value, grad = loss_and_gradient(objective, theta)
        losses.append(value)
        update, state = optimizer(grad, state)
        theta = theta + update
    losses.append(objective(theta))
    return torch.stack(losses).tolist()


def quadratic(dim: int = 10, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> tuple[Objective, Tensor]:
    """A random quadratic ``f(θ) = ‖Wθ − y‖²`` with ``W, y`` standard normal (the paper's section 3.1: IID
    Gaussian entries) and a standard normal start ``θ_0`` (the paper does not say how ``θ_0`` is drawn).

    Drawn with ``generator`` on its own device and moved to ``device`` (by default the
    generator's, else torch's default device): one seed gives the same problem on every device.

    Raises:
        ValueError: ``dim`` below 1.
    """
    check_count("dim", dim, 1)
    W, y, theta_0 = (draw_with(torch.randn, shape, generator, device) for shape in ((dim, dim), (dim,), (dim,)))
    return (lambda theta: (W @ theta - y).square().sum()), theta_0


def network_problem(model: nn.Module, x: Tensor, y: Tensor, *,
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, batch_size: int = 128,
                    generator: torch.Generator | None = None) -> tuple[Objective, Tensor]:
    """Training ``model`` on ``(x, y)`` as a problem for a learned optimiser (the paper's MNIST experiment).

    Returns ``(f, θ_0)``: ``θ_0`` is the model's trainable parameters (those that require
    gradients) flattened into one vector, and ``f(θ)`` the loss of the model with
    parameters ``θ`` (frozen ones as they are) on a fresh random mini-batch of
    ``batch_size`` examples at every call (drawn with ``generator``, or with a generator on
    ``x``'s device that it seeds, if it draws elsewhere: :func:`lowlearn.train.generator_on`).

    Raises:
        ValueError: a ``batch_size`` below 1 (an empty mini-batch's loss is NaN), ``x`` and ``y``
            of different lengths or empty, a model without trainable parameters, or one with
            trainable factors ``U``, ``V`` of low-rank layers, whose backward gives DLRT's
            gradients (:func:`~lowlearn.lowrank.layers.integrator_factors`).
    """
    batch_size = check_count("batch_size", batch_size, 1)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same examples, at least one: got {len(x)} inputs and {len(y)} "
                         "targets")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError("every parameter of the model is frozen, so there is nothing to optimise: unfreeze some "
                         "(requires_grad_(True))")
    refuse_integrator_factors(model, trained, "freeze them (requires_grad_(False)) or convert the layers with "
                              "lowlearn.lowrank.to_dense")
    generator = generator_on(generator, x.device)
    names = list(trained)
    shapes = [p.shape for p in trained.values()]
    sizes = [p.numel() for p in trained.values()]
    theta = torch.cat([p.detach().flatten() for p in trained.values()])

    def objective(flat: Tensor) -> Tensor:
        params = {name: part.view(shape) for name, part, shape in zip(names, flat.split(sizes), shapes)}
        index = torch.randint(len(x), (batch_size,), generator=generator, device=x.device)
        return loss_fn(functional_call(model, params, (x[index],)), y[index])

    return objective, theta
