"""Per-weight optimizer state: the values a new parameter starts from, and resetting weights to them.

Methods that change which weights train (pruning and dynamic sparse training,
PackNet's tasks, growing networks) must give a weight that leaves or (re)joins
training the optimizer state of a new parameter, so that no stale momentum moves it.
For SGD's momentum and Adam's moments that state is zero; for others it is not:
Rprop's step sizes start at the learning rate (at zero they would be clamped to
its minimum step and the weight would barely move), Adagrad's sums at
``initial_accumulator_value``. :func:`fresh_state` asks the optimizer's own class.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import Tensor

#: The options with which ``torch.optim`` optimizers shrink a weight whatever its gradient:
#: ``weight_decay`` in most, and ``lambd`` in ASGD's (``θ ← θ·(1 − λη)``).
WEIGHT_DECAY_OPTIONS = ("weight_decay", "lambd")


def torch_optimizer(optimizer, holding: Iterable[Tensor | None] = ()) -> torch.optim.Optimizer:
    """``optimizer`` itself, or the ``torch.optim`` optimizer that a wrapper (``.optimizer``) steps with.

    Where both are ``torch.optim`` optimizers (DLRT steps the low-rank factors itself and
    the other parameters with the one it wraps, if given, whose parameters its groups list
    as well), the wrapped one if its groups hold a parameter of ``holding`` (``None``
    entries skipped), else ``optimizer`` itself.

    Raises:
        TypeError: neither is a ``torch.optim.Optimizer``.
    """
    levels = [o for o in (optimizer, getattr(optimizer, "optimizer", None)) if isinstance(o, torch.optim.Optimizer)]
    if not levels:
        raise TypeError(f"optimizer must be a torch.optim optimizer (or wrap one as .optimizer), got "
                        f"{type(optimizer).__name__}")
    held = [p for p in holding if p is not None]
    return next((level for level in reversed(levels) if any(group_of(level, p) is not None for p in held)), levels[0])


def group_of(optimizer: torch.optim.Optimizer, param: Tensor | None) -> dict | None:
    """The parameter group that holds ``param``, or ``None``."""
    return next((group for group in optimizer.param_groups if any(p is param for p in group["params"])), None)


def fresh_state(optimizer: torch.optim.Optimizer, group: dict, like: Tensor) -> dict:
    """The state that ``optimizer``'s class, with ``group``'s settings, gives a parameter like ``like``
    in a first step with a zero gradient.

    The step runs without weight decay (:data:`WEIGHT_DECAY_OPTIONS`), which would add
    ``λθ`` to the zero gradient or shrink the weight: a reset weight's momentum and
    moments do not depend on its value, and state that is meant to, such as ASGD's
    average of the weight, starts from the weight itself.
    """
    cls = type(optimizer)
    probe = like.detach().clone().requires_grad_()
    probe.grad = torch.zeros_like(probe)
    if isinstance(optimizer, torch.optim.SparseAdam):   # takes sparse gradients only (nn.Embedding(sparse=True))
        probe.grad = probe.grad.to_sparse()
    settings = inspect.signature(cls).parameters
    options = {key: value for key, value in group.items() if key in settings and key != "params"}
    options.update({option: 0.0 for option in WEIGHT_DECAY_OPTIONS if option in options})
    fresh = cls([probe], **options)
    fresh.step()
    return fresh.state[probe]


@torch.no_grad()
def reset_optimizer_state(optimizer, param: Tensor, keep: Tensor) -> None:
    """Give ``param``'s per-weight optimizer state, wherever ``keep`` is ``False`` (or 0), a new parameter's values.

    ``optimizer`` is a ``torch.optim`` optimizer or a wrapper of one (``.optimizer``; of
    the two, the one that holds ``param``, see :func:`torch_optimizer`).
    Every state tensor with ``param``'s shape is treated as per-weight (momentum,
    moments, accumulators, step sizes) and takes the value :func:`fresh_state`
    gives; scalars such as Adam's step count are left alone. That count is one per
    tensor, so for a reset weight Adam's bias correction does not start again.
    Under a steady gradient, its ``k``-th step is ``(1 − β₁^k)/√(1 − β₂^k)`` times
    the learning rate where a fresh Adam's is 1×: with the default betas 3.2× at
    first, up to 6.6× (``k = 12``), and still 1.3× after 1000 steps.
    ``torch.optim.Adam`` has no per-weight step counts. Other per-tensor quantities
    follow the tensor, not the weight, alike: Adagrad's ``lr_decay``, NAdam's
    ``mu_product`` and RAdam's rectification; and SGD starts a new momentum buffer at
    ``g`` but a reset weight's at ``(1 − dampening)·g`` (the same with ``dampening=0``,
    the default).

    Raises:
        ValueError: ``keep`` not of ``param``'s shape (one that broadcasts, such as a
            row's pattern, would reset the same entries of every row).
    """
    if keep.shape != param.shape:
        raise ValueError(f"keep must have the parameter's shape {tuple(param.shape)}, one entry per weight, got "
                         f"{tuple(keep.shape)}")
    inner = torch_optimizer(optimizer, holding=[param])
    state = inner.state.get(param, {})
    per_weight = [key for key, value in state.items() if isinstance(value, Tensor) and value.shape == param.shape]
    if not per_weight:
        return
    fresh = fresh_state(inner, group_of(inner, param), param)
    reset = keep == 0
    for key in per_weight:
        start = fresh.get(key)
        if isinstance(start, Tensor) and start.shape == param.shape:
            state[key].copy_(torch.where(reset, start.to(state[key].dtype), state[key]))
        else:
            state[key].masked_fill_(reset, 0)
