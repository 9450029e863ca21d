"""Checks that every part of lowlearn shares: of argument types, and whether tensors are finite.

NumPy scalars count as numbers, so values read from arrays or configuration files pass;
``bool`` does not (``True`` is an ``int`` to Python, but never a density or a count), nor does a
tensor (pass ``float(t)`` or ``int(t)``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np
import torch


def check_flag(name: str, value: bool) -> bool:
    """Return ``value`` as a Python bool if it is ``True`` or ``False`` (a NumPy bool too), else raise a TypeError.

    A switch takes no other value: a string such as ``"no"`` is true to Python, and ``0``/``1`` are numbers.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy int, not a bool (nor a tensor)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: int, minimum: int) -> int:
    """Return ``value`` as a Python int if it is an integer of at least ``minimum`` (a number of examples,
    tasks, ...), else raise a ValueError. (torch takes only Python ints for sizes and seeds.)"""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def check_scalar_loss(loss: torch.Tensor) -> None:
    """Raise a ValueError unless the tensor ``loss`` that a ``loss_fn`` returned is one number, the mean loss (and
    a TypeError if it is not a tensor, which has no gradient)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return the mean loss as a tensor, to differentiate; it returned a "
                        f"{type(loss).__name__} (.item() or float() taken inside it? return the tensor itself)")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return the mean loss, one number; it returned a tensor of shape "
                         f"{tuple(loss.shape)} (reduction='none'? keep the default, 'mean')")


def check_batch(batch: object) -> tuple:
    """Return ``batch`` if it is a pair ``(inputs, targets)`` of tensors (one batch), else raise a TypeError."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(part, torch.Tensor) for part in batch)):
        raise TypeError(f"batch must be one batch, a pair (inputs, targets) of tensors; got {type(batch).__name__} "
                        "(from a dataset's tensors x and y, take for example (x[:256], y[:256]))")
    return tuple(batch)


def check_untied(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError if two of the named layers' ``weights`` are one tensor (tied weights).

    A mask, a reparameterisation or a factorisation of each layer would each act on the
    shared tensor, and disagree about it.
    """
    seen: dict[int, str] = {}
    for name, weight in weights.items():
        if (first := seen.setdefault(id(weight), name)) != name:
            raise ValueError(f"layers {first!r} and {name!r} share one weight (tied weights), which a mask, "
                             "Powerprop or a low-rank factorisation of each would treat twice: leave one of them "
                             "out of layers=")


def check_not_shared(model: torch.nn.Module, weights: Mapping[str, tuple[torch.nn.Module, torch.Tensor]],
                     consequence: str) -> None:
    """Raise a ValueError if a named layer's trainable weight is also held by another module of ``model``.

    ``weights`` is ``{layer name: (layer, its trainable weight)}``. The layer itself, and
    the parametrizations registered on it (``layer.parametrizations``, which hold a masked
    or Powerprop weight), may hold it; any other module that does is tied to the layer, as
    an ``nn.Embedding`` and an output layer are, and would go on using the weight itself
    where the layer now computes something else (what ``consequence`` says). One layer used
    at two places is not tied: whatever is done to it acts on both uses.
    """
    owner = {id(weight): (name, layer) for name, (layer, weight) in weights.items()}
    for holder_name, holder in model.named_modules(remove_duplicate=False):
        for name, parameter in holder.named_parameters(recurse=False):
            if (entry := owner.get(id(parameter))) is None:
                continue
            layer_name, layer = entry
            chains = layer._modules.get("parametrizations")
            if holder is layer or (chains is not None and any(holder is chain for chain in chains.values())):
                continue
            held_as = f"{holder_name}.{name}" if holder_name else name
            raise ValueError(f"layer {layer_name!r} shares its weight with {held_as!r} (tied weights), which would "
                             f"{consequence}: untie them (give the layer a copy, "
                             f"nn.Parameter(weight.detach().clone())), or leave {layer_name!r} out of layers=")


def as_float(value: object) -> float:
    """``value`` as a float, to check ranges on: NaN if it is not a real number, ±inf beyond the float range.

    Range checks made on the float see what the computation will use: an int or
    fraction too large for a float (``10**400``) is infinite rather than an
    OverflowError, and one too small (``Fraction(1, 10**400)``) is ``0.0``.
    """
    if not is_real(value):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite number >= 0 (a range, an epsilon), else raise a ValueError."""
    number = as_float(value)
    if not 0 <= number < math.inf:                       # NaN compares False
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_positive(name: str, value: float, what: str = "number") -> float:
    """Return ``value`` as a float if it is a positive, finite number (a scale, a noise level), else raise a
    ValueError that calls it a positive, finite ``what``."""
    number = as_float(value)
    if not 0 < number < math.inf:                        # NaN compares False
        raise ValueError(f"{name} must be a positive, finite {what}, got {value!r}")
    return number


def check_rate(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a positive, finite number (a step size), else raise a ValueError."""
    return check_positive(name, value, "step size")


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a 0-d boolean tensor on their device.

    No host synchronisation: the answer stays on the device until it is read. A tensor's
    minimum and maximum are finite exactly when every entry is (a NaN makes both NaN), so
    each tensor takes one reduction, where ``torch.isfinite(t).all()`` takes several passes
    and on the CPU costs about ten times as much. Empty tensors, and no tensors at all,
    count as finite.
    """
    tensors = list(tensors)
    checks = [torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all() for t in tensors if t.numel()]
    if not checks:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    return torch.stack(checks).all()
