"""Register and remove parametrizations so that copies of a model stay independent.

lowlearn expresses masks (:mod:`lowlearn.sparse.mask`) and other
reparameterisations as :mod:`torch.nn.utils.parametrize` parametrizations. PyTorch
implements a parametrized module by giving it a class of its own that holds a
property per parametrized tensor, but ``copy.deepcopy`` gives the copy the *same*
class. Removing a parametrization from the copy (or adding one to it) would then
change the original's class too, and the original would lose its ``weight``.

:func:`register` and :func:`remove` wrap PyTorch's functions and make every deep
copy of a module they touched take its own class, so the two never share one.
:func:`register` also gives the class a leaner property for the parametrized tensor
(see ``_lean_property``): a training step reads it once per layer.
:class:`OutputGradients` reads the gradient of a parametrization's output (the
effective weight), such as the dense gradient of a masked weight that dynamic sparse
training grows connections by.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.utils import parametrize


def _deepcopy_with_own_class(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a parametrized module whose result gets a fresh copy of its class."""
    cls = type(self)
    own_class = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    replica = own_class.__new__(own_class)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica


def _lean_property(tensor_name: str, pytorch_property: property) -> property:
    """PyTorch's property for a parametrized tensor, computed with less Python overhead.

    PyTorch's getter calls the ``ParametrizationList`` as a module, whose ``forward``
    indexes it and ends the chain on an ``AttributeError``: about 10 µs per read, as
    long as the forward pass of a small layer. This getter calls the same
    parametrizations (as modules, so their hooks run) on the same original tensor, in
    the same order. For a parametrization with several original tensors, or a
    ``ParametrizationList`` with hooks of its own, it calls the list itself. Inside
    :func:`torch.nn.utils.parametrize.cached` it caches the value under the module it
    is read from, as PyTorch does; PyTorch's own getter keys the cache by the module it
    was registered on, which a deep copy would share.
    """
    def get(module: nn.Module):
        chain = module._modules["parametrizations"][tensor_name]
        if parametrize._cache_enabled:
            key = (id(module), tensor_name)
            value = parametrize._cache.get(key)
            if value is None:
                value = parametrize._cache[key] = chain()
            return value
        if not chain.is_tensor or chain._forward_hooks or chain._forward_pre_hooks:
            return chain()
        value = chain.original
        for parametrization in chain:
            value = parametrization(value)
        return value

    return property(get, pytorch_property.fset)


def register(module: nn.Module, tensor_name: str, parametrization: nn.Module) -> None:
    """:func:`torch.nn.utils.parametrize.register_parametrization`, safe under ``copy.deepcopy``, with a lean getter.

    Raises:
        TypeError: a ``parametrization`` that is not an ``nn.Module``.
        ValueError: a tensor the module does not have, or one that is ``None`` (a bias of a
            layer built with ``bias=False``).
    """
    if not isinstance(parametrization, nn.Module):
        raise TypeError(f"a parametrization must be an nn.Module whose forward computes the tensor from the "
                        f"original one, got {type(parametrization).__name__}: wrap the function in a module")
    if tensor_name in (*module._parameters, *module._buffers) and getattr(module, tensor_name) is None:
        raise ValueError(f"{parametrize.type_before_parametrizations(module).__name__}.{tensor_name} is None (e.g. "
                         "the bias of a layer built with bias=False): there is no tensor to parametrize")
    first = not parametrize.is_parametrized(module, tensor_name)
    parametrize.register_parametrization(module, tensor_name, parametrization)
    cls = type(module)
    if first:
        setattr(cls, tensor_name, _lean_property(tensor_name, cls.__dict__[tensor_name]))
    cls.__deepcopy__ = _deepcopy_with_own_class


def raw_value(module: nn.Module, tensor_name: str, value: Tensor) -> Tensor:
    """The raw (original) tensor under which ``module.<tensor_name>`` would compute ``value``.

    Applies the ``right_inverse`` of every parametrization of the tensor, last first,
    and skips those without one (a mask's: the raw weight keeps the value, and the
    mask zeroes it where it applies). E.g. Powerprop's ``φ = sign(θ)|θ|^(1/α)`` for an
    effective weight ``θ``. A tensor without parametrizations is its own raw value.
    """
    if not parametrize.is_parametrized(module, tensor_name):
        return value
    for parametrization in reversed(list(module.parametrizations[tensor_name])):
        if hasattr(parametrization, "right_inverse"):
            value = parametrization.right_inverse(value)
    return value


def remove(module: nn.Module, tensor_name: str) -> None:
    """Remove the parametrizations of ``module.<tensor_name>``, keeping its current value as a plain tensor.

    A parameter stays a parameter and a buffer a buffer.
    """
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)


class OutputGradients:
    """Read ``∂L/∂(output)`` of chosen parametrizations, e.g. the dense gradient of a masked weight.

    A parametrization's output is the tensor the layer computes with (the masked
    weight ``w = θ ⊙ m``, the exponentiated weight ``θ = Ψ(φ)``); backward computes
    its gradient before the chain rule takes it back to the raw parameter. While
    :meth:`start` is in effect, a forward hook on every parametrization marks that
    output, and backward stores its gradient in ``grads`` (summed over several
    backward passes). Ignored: forward passes without gradients (evaluation), and
    passes that compute the weight from another tensor than the layer's own raw
    parameter, such as :func:`torch.func.functional_call` with other parameters
    (MAML's adapted ones) or :mod:`torch.func`'s transforms (per-example gradients).
    A pass from the raw parameter itself is recorded whatever differentiates it,
    :func:`torch.autograd.grad` included: MAML's first inner step starts from the
    model's own parameters, so a MAML step recorded here holds the tasks' support
    gradients there, and its query loss reaches the weight only through the
    second-order term (with ``first_order=True``, not at all): not the meta-gradient.

    Args:
        layers: ``{name: layer}``.
        kind: the parametrization class whose output is read: the first of that class
            on each layer's ``weight``.

    Attributes:
        grads: ``{name: ∂L/∂output}`` seen since the last :meth:`clear`.

    Raises:
        ValueError: a layer without a ``kind`` parametrization on its weight.
    """

    def __init__(self, layers: Mapping[str, nn.Module], kind: type[nn.Module]):
        bare = [name for name, layer in layers.items()
                if not parametrize.is_parametrized(layer, "weight")
                or not any(isinstance(p, kind) for p in layer.parametrizations.weight)]
        if bare:
            raise ValueError(f"layers {bare} have no {kind.__name__} parametrization on their weight to read the "
                             "gradient of")
        self.chains = {name: layer.parametrizations.weight for name, layer in layers.items()}
        self.modules = {name: next(p for p in chain if isinstance(p, kind)) for name, chain in self.chains.items()}
        self._raw = {name: chain.original for name, chain in self.chains.items()}
        self._own_pass: dict[str, bool] = {}
        self.grads: dict = {}
        self._handles: list = []

    @property
    def active(self) -> bool:
        """Whether gradients are being recorded."""
        return bool(self._handles)

    def start(self) -> None:
        """Record from the next forward pass on (no effect if already recording)."""
        if not self._handles:
            for name, chain in self.chains.items():
                self._handles += [chain[0].register_forward_pre_hook(self._pass_hook(name)),
                                  self.modules[name].register_forward_hook(self._hook(name))]

    def stop(self) -> None:
        """Stop recording; the gradients already stored stay in ``grads``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the stored gradients."""
        self.grads = {}

    def __deepcopy__(self, memo: dict) -> OutputGradients:
        """A recorder of the copied layers (copied with it, as in a deep copy of a sparsifier and its model).

        The copied layers carry copies of this recorder's hooks, which would feed this
        one: they are taken off, and the copy records with hooks of its own if this
        one is recording.
        """
        new = copy.copy(self)
        memo[id(self)] = new
        new.chains, new.modules, new._raw = (copy.deepcopy(part, memo) for part in (self.chains, self.modules,
                                                                                     self._raw))
        new.grads, new._own_pass, new._handles = copy.deepcopy(self.grads, memo), {}, []
        ids = {handle.id for handle in self._handles}
        for name, chain in new.chains.items():
            for module in (chain[0], new.modules[name]):
                for hooks in (module._forward_pre_hooks, module._forward_hooks):
                    for key in ids & hooks.keys():
                        del hooks[key]
        if self.active:
            new.start()
        return new

    def _pass_hook(self, name: str):
        def hook(first: nn.Module, inputs: tuple) -> None:    # does this pass start from the layer's raw parameter?
            self._own_pass[name] = first is self.chains[name][0] and inputs[0] is self._raw[name]

        return hook

    def _hook(self, name: str):
        def store(grad):
            self.grads[name] = grad if name not in self.grads else self.grads[name] + grad

        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if module is not self.modules[name] or not self._own_pass.pop(name, False):   # a deep copy's, or
                return                                                   # another tensor's pass
            if output.requires_grad and not output.is_leaf:   # a leaf would keep the hook for good
                output.register_hook(store)

        return hook
