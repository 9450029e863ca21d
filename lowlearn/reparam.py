"""Register and remove parametrizations so that copies of a model stay independent.

lowlearn expresses masks (:mod:`lowlearn.sparse.mask`) and other
reparameterisations as :mod:`torch.nn.utils.parametrize` parametrizations. PyTorch
implements a parametrized module by giving it a class of its own that holds a
property per parametrized tensor, but ``copy.deepcopy`` gives the copy the *same*
class. Removing a parametrization from the copy (or adding one to it) would then
change the original's class too, and the original would lose its ``weight``.

:func:`register` and :func:`remove` wrap PyTorch's functions and make every deep
copy of a module they touched take its own class, so the two never share one.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize


def _deepcopy_with_own_class(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a parametrized module whose result gets a fresh copy of its class."""
    cls = type(self)
    own_class = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    replica = own_class.__new__(own_class)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica


def register(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """:func:`torch.nn.utils.parametrize.register_parametrization`, safe under ``copy.deepcopy``."""
    parametrize.register_parametrization(module, tensor_name, parametrization)
    type(module).__deepcopy__ = _deepcopy_with_own_class


def remove(module: nn.Module, tensor_name: str) -> None:
    """Remove the parametrizations of ``module.<tensor_name>``, keeping its current value as a plain parameter."""
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
