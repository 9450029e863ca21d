"""Powerpropagation: a reparameterisation that makes networks sparse by themselves.

Schwarz, Jayakumar, Pascanu, Latham & Teh (2021), "Powerpropagation: a sparsity
inducing weight reparameterisation" (NeurIPS). Every weight ``θ`` of a layer is
written as a function of a new parameter ``φ``:

    ``θ = Ψ(φ) = φ · |φ|^(α−1),    α ≥ 1,``

and the network is trained on ``φ``. By the chain rule

    ``∂L/∂φ = ∂L/∂θ · α |φ|^(α−1),``

so a weight's gradient is scaled by its own magnitude: large weights learn fast, small
ones barely move ("rich get richer"), zero is a critical point, and weights rarely
cross zero. Training therefore leaves many weights near zero, and magnitude pruning
removes them at little cost. ``α = 1`` is the ordinary network.

* :class:`PowerProp`: the parametrization (``torch.nn.utils.parametrize``), whose
  ``right_inverse`` ``φ = sign(θ) |θ|^(1/α)`` turns the usual initialisation of ``θ``
  into ``φ``, so the network computes the same function at initialisation.
* :func:`powerprop`: apply it to a model's layers in one call.
* :class:`PowerPropOptimizer`: the optimiser-aware update of the paper, for any
  ``torch.optim`` optimizer.

Powerprop composes with :mod:`lowlearn.sparse`: apply it *before* masking, so that
the mask comes last, ``w = Ψ(φ) ⊙ m``, and every score sees the effective weight.
Pruning and Top-KAST suit it; methods that grow connections from zero (SET, RigL,
SNFS) do not, since ``φ = 0`` is a critical point and a grown weight would stay there.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .autograd import Function
from .checks import as_float
from .reparam import register
from .sparse.mask import resolve_layers


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it is a finite number ≥ 1, else raise a ValueError that says so."""
    value = as_float(alpha)
    if not 1 <= value < math.inf:                                        # NaN compares False
        raise ValueError(f"alpha must be a finite number >= 1 (1 is the ordinary network; the paper uses "
                         f"2 to 5), got {alpha!r}")
    return value


def _magnitude_power(phi: Tensor, exponent: float, out: Tensor | None = None) -> Tensor:
    """``|φ|^exponent`` written into ``out`` (default: a new tensor), in as few passes as the exponent allows."""
    if exponent == 1.0:
        return torch.abs(phi, out=out)
    if exponent.is_integer() and exponent % 2 == 0:        # no abs for even integers; φ·φ for 2
        return torch.pow(phi, int(exponent), out=out)
    return torch.abs(phi, out=out).pow_(exponent)


def _power(phi: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """``Ψ(φ) = φ |φ|^(α−1)`` written into ``out`` (default: a new tensor).

    For an odd integer ``α`` that is ``φ^α``, one pass (``φ·φ·φ`` for ``α = 3``, the
    same rounding as ``φ · φ²``); otherwise ``|φ|^(α−1)``, then a multiplication in place.
    """
    if alpha % 2 == 1:
        return torch.pow(phi, alpha, out=out)
    return _magnitude_power(phi, alpha - 1, out).mul_(phi)


def _times_derivative(upstream: Tensor, phi: Tensor, alpha: float) -> Tensor:
    """``dΨ/dφ · upstream = α |φ|^(α−1) · upstream`` (element-wise), in a new tensor made from ``upstream``.

    Made from ``upstream`` (``new_zeros``), so that :func:`torch.vmap` batches it whenever
    anything is.

    Differentiated again (second-order gradients), ``|φ|^(α−1)`` has an infinite slope at
    ``φ = 0`` for ``1 < α < 2``, which autograd multiplies by the upstream gradient: a masked
    weight's zero gradient would turn its second derivative into NaN, where the loss does
    not depend on it at all and the true value is 0. For those ``α`` the factor is computed
    at ``φ = 1`` and replaced by 0 where ``φ = 0``, so its derivative there is 0 (an
    unmasked weight at exactly 0, whose second derivative is infinite, gets 0 too).
    """
    if 1 < alpha < 2:
        nonzero = phi != 0
        power = torch.where(nonzero, _magnitude_power(torch.where(nonzero, phi, 1.0), alpha - 1), 0.0)
    else:
        power = _magnitude_power(phi, alpha - 1)
    return torch.addcmul(upstream.new_zeros(()), upstream, power, value=alpha)


class _Power(Function):
    """``θ = Ψ(φ)`` (:func:`_power`) with the gradient ``∂L/∂φ = α |φ|^(α−1) ∂L/∂θ`` written out.

    For every ``α`` but the odd integers (:meth:`PowerProp.forward`). Autograd's own
    derivative of ``φ · |φ|^(α−1)`` goes through ``|φ|^(α−2)``, which is infinite at
    ``φ = 0`` for ``1 < α < 2`` and turns masked (zero) weights into NaN gradients, and
    for even ``α`` it takes several passes more; the closed form has neither problem.

    Only ``φ`` is saved (the parameter itself: no memory), and the backward recomputes
    ``|φ|^(α−1)`` (:func:`_times_derivative`). Keeping ``|φ|^(α−1)`` from the forward
    pass instead takes about as many passes over the weight, since the forward must then
    compute it apart from ``θ``, plus a weight-sized tensor held from forward to backward.
    The backward is made of differentiable operations on ``φ``, so second-order gradients
    are right too, masked weights at ``φ = 0`` included (:func:`_times_derivative`).

    ``forward`` and ``setup_context`` are separate, as :mod:`torch.func`'s transforms
    (``grad``, ``vmap``, ``jvp``, ...) require; ``generate_vmap_rule`` lets ``vmap`` batch
    the element-wise code as it is, and ``jvp`` gives forward-mode derivatives.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(phi: Tensor, alpha: float) -> Tensor:
        return _power(phi, alpha)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        phi, ctx.alpha = inputs
        ctx.save_for_backward(phi)
        ctx.save_for_forward(phi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (phi,) = ctx.saved_tensors
        return _times_derivative(grad, phi, ctx.alpha), None

    @staticmethod
    def jvp(ctx, phi_tangent: Tensor, alpha_tangent: None) -> Tensor:
        (phi,) = ctx.saved_tensors
        return _times_derivative(phi_tangent, phi, ctx.alpha)


class _GradientOfTheta(Function):
    """``θ`` passed on unchanged, with ``∂L/∂θ`` handed to ``φ`` as its gradient (no chain rule).

    What :class:`PowerPropOptimizer` puts after a Powerprop layer's own forward pass:
    the update it takes needs ``∂L/∂θ``, and backward then computes nothing more
    (``α |φ|^(α−1) ∂L/∂θ`` would be thrown away).
    """

    @staticmethod
    def forward(phi: Tensor, theta: Tensor) -> Tensor:
        return theta

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


_FLOATING_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""The dtypes a model (and so ``PowerProp.saved_alpha``) may be converted to."""


class PowerProp(nn.Module):
    """Parametrization ``θ = Ψ(φ) = φ · |φ|^(α−1)`` (Schwarz et al. 2021, eq. 1).

    Registered on a weight (see :func:`powerprop`), the weight's trainable tensor
    becomes ``φ`` and the layer computes with ``θ``. ``right_inverse`` maps a weight
    to ``φ = sign(θ) |θ|^(1/α)``, which PyTorch applies at registration: the layer's
    current (initialised) weights are kept, up to floating-point rounding. A Powerprop
    model works under :func:`torch.func.functional_call` and :mod:`torch.func`'s
    transforms (``grad``, ``vmap`` for per-example gradients, ``jvp``), with ``φ`` passed
    under its raw name (``"0.parametrizations.weight.original"``, as ``named_parameters``
    gives it): a tensor passed as ``"0.weight"`` is written into the model's own ``φ``
    through ``right_inverse`` for the call (``φ`` is restored after it, up to rounding),
    and a backward pass through that call fails.

    ``α`` is saved with the weights: the buffer ``saved_alpha`` puts it in the model's
    ``state_dict``, and ``load_state_dict`` refuses weights saved with another ``α``
    (its ``φ`` would give other weights ``θ`` here); a ``state_dict`` without it (of
    earlier versions) loads as before.

    Args:
        alpha: ``α ≥ 1``; ``1`` leaves the weight exactly as it was.
        device: where ``saved_alpha`` lives: that of the weight it goes on (:func:`powerprop`
            passes it), as for the layer's other tensors (default: torch's default device).

    Raises:
        ValueError: ``alpha`` below 1, or not finite.
    """

    def __init__(self, alpha: float, *, device: torch.device | str | None = None):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.register_buffer("saved_alpha", torch.tensor(float(self.alpha), device=device))

    def _load_from_state_dict(self, state_dict: Mapping, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Refuse ``α`` of another value; accept a ``state_dict`` without it (as ``BatchNorm`` does its
        ``num_batches_tracked``).

        The buffer follows the model's dtype, so it holds ``α`` rounded to the lowest precision
        the model passed through (``.half()``, then ``.float()``): a saved ``α`` equal to this
        layer's in any floating dtype is this layer's.
        """
        key = prefix + "saved_alpha"
        if key in state_dict:
            saved = float(state_dict[key])
            if saved not in {float(torch.tensor(self.alpha, dtype=dtype, device="cpu")) for dtype in _FLOATING_DTYPES}:
                error_msgs.append(f"{key}: the weights were saved with Powerprop's alpha = {saved:g}, this layer has "
                                  f"alpha = {self.alpha:g}, for which their φ would be other weights θ: build the "
                                  f"model with powerprop(model, {saved:g}) to load them")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys:
            missing_keys.remove(key)

    def forward(self, phi: Tensor) -> Tensor:
        if self.alpha == 1.0:
            return phi.view_as(phi)   # the same values and gradient; a view, so that hooks see a new tensor
        if self.alpha % 2 == 1:
            # Ψ(φ) = φ^α, and torch's own derivative α φ^(α−1) = α |φ|^(α−1) is the closed form. No Python
            # runs in its backward pass, which saves more time than its one pass more costs (bench powerprop).
            return torch.pow(phi, int(self.alpha))
        return _Power.apply(phi, self.alpha)

    def right_inverse(self, theta: Tensor) -> Tensor:
        if self.alpha == 1.0:
            return theta
        return theta.sign() * theta.abs().pow(1.0 / self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"

    def __deepcopy__(self, memo: dict) -> PowerProp:
        """A copy without the hook by which a live :class:`PowerPropOptimizer` routes ``∂L/∂θ`` to this ``φ``.

        The copy's passes are never routed (they start from the copy's ``φ``), so the
        hook would only run idle on every pass of the copy, and keep this layer's
        ``φ`` alive for as long as the copy lives, wrapper removed or not.
        """
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.__dict__ = copy.deepcopy(self.__dict__, memo)
        if (handle := _ROUTERS.get(self)) is not None:
            del replica._forward_hooks[handle.id]
        return replica


def powerprop(model: nn.Module, alpha: float, layers: Iterable[str] | None = None) -> nn.Module:
    """Reparameterise the weights of ``layers`` (default: every Linear/Conv2d) with :class:`PowerProp`.

    Biases and normalisation layers stay as they are, as in the paper. The model
    computes the same function afterwards (up to rounding). Masks go on afterwards
    (:func:`lowlearn.sparse.mask.attach_masks`), so that they act on ``θ``. Returns
    the model, changed in place.

    Raises:
        ValueError: a bad ``alpha``, no layer to reparameterise (``layers`` empty, or a
            model without Linear/Conv2d layers), or a chosen weight that already carries a
            parametrization (e.g. a mask): Powerprop must come first.
        KeyError: an unknown layer name.
    """
    alpha = check_alpha(alpha)
    chosen = resolve_layers(model, layers)
    if not chosen:
        raise ValueError("no layers to reparameterise: layers is empty, or the model has no nn.Linear or nn.Conv2d "
                         "(name other layers with a weight in layers=)")
    for name, layer in chosen.items():               # every layer checked first: a refused call changes nothing
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"layer {name!r} already has a parametrization (e.g. a mask); apply powerprop() "
                             "before masking, so that the mask acts on the effective weight")
    for layer in chosen.values():
        register(layer, "weight", PowerProp(alpha, device=layer.weight.device))
    return model


def powerprop_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the layers whose weight is reparameterised by :class:`PowerProp`."""
    return {name: layer for name, layer in model.named_modules()
            if parametrize.is_parametrized(layer, "weight")
            and any(isinstance(p, PowerProp) for p in layer.parametrizations.weight)}


def _powerprop_of(layer: nn.Module) -> PowerProp:
    return next(p for p in layer.parametrizations.weight if isinstance(p, PowerProp))


_ROUTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``{PowerProp module: the hook of the live PowerPropOptimizer that routes ∂L/∂θ to its φ}``."""


def routes_theta_gradients(model: nn.Module) -> bool:
    """Whether a live :class:`PowerPropOptimizer` routes ``∂L/∂θ`` to ``φ`` in some layer of ``model``.

    Code that differentiates the model itself with respect to ``φ`` (a meta-learning
    inner loop) must then refuse to run: it would get ``∂L/∂θ``. Without any live
    wrapper (the usual case) this looks at no module.
    """
    return bool(_ROUTERS) and any(module in _ROUTERS for module in model.modules())


def _stop_routing(hooks: dict) -> None:
    """Remove the hooks of ``{PowerProp module: hook}`` that still route (not taken over by a newer wrapper)."""
    for module, handle in hooks.items():
        if _ROUTERS.get(module) is handle:
            handle.remove()
            del _ROUTERS[module]


class PowerPropOptimizer:
    """The optimiser-aware update: the optimizer acts on ``θ``, and its step is mapped back to ``φ``.

    Schwarz et al. (2021), section 3: "pretend that the exponentiated parameters are
    the de-facto parameters", i.e.

        ``Δφ = optim(∂L/∂Ψ(φ)) · α |φ|^(α−1).``

    From the wrapper's construction on, backward gives each reparameterised weight's
    ``φ`` the gradient ``∂L/∂θ`` of its effective weight ``θ = Ψ(φ)``, the gradient the
    update uses, instead of ``∂L/∂φ`` (a forward hook on the layer's :class:`PowerProp`,
    for passes that start from the layer's own ``φ``: not a deep copy's, nor
    :func:`torch.func.functional_call`'s with other tensors). :meth:`step` hands the
    wrapped optimizer ``θ`` with that gradient, lets it take its usual step
    ``θ → θ + Δθ`` (with its own state: momentum, Adam's moments, weight decay on
    ``θ``), and sets ``φ ← φ + Δθ · α |φ|^(α−1)``. Other parameters (biases) take the
    plain step. Since the gradients are ``∂L/∂θ``,
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` between backward
    and :meth:`step` clips them as the update needs, and ``DistributedDataParallel``
    averages them across processes.

    Why: Adam divides each gradient by a running estimate of its magnitude. On ``φ``
    directly that normalisation cancels the factor ``α |φ|^(α−1)``: a small weight,
    whose gradient is tiny, gets as large a step as a big one, and the rich-get-richer
    effect is lost. Here Adam normalises ``∂L/∂θ``, and the factor is applied after.
    With plain SGD (no momentum, no weight decay) both updates are the same.

    The step keeps two tensors the size of each Powerprop weight between calls (for
    ``φ`` and ``|φ|^(α−1)``), so that it allocates no weight-sized memory: glibc's
    allocator hands freed memory back to the system, and a large tensor allocated
    afresh then costs a page fault per 4 KiB, more than the passes over it.

    Use it like the optimizer it wraps (``zero_grad``, ``step``, ``state_dict``; give
    a learning-rate scheduler the wrapped ``.optimizer``). Build it *after*
    :func:`powerprop` and any masks, around an optimizer over ``model.parameters()``,
    and train the model with it alone: another optimizer would take ``∂L/∂θ`` for
    ``∂L/∂φ``, and the inner loops of :mod:`lowlearn.meta`, which differentiate the
    model in ``φ``, refuse to run (:func:`routes_theta_gradients`). It routes the layers
    it finds when built: a Powerprop layer added later (a new head whose parameters join
    the wrapped optimizer through ``add_param_group``) would take the plain step on
    ``∂L/∂φ``, unnoticed; then wrap the optimizer anew (its state is kept),
    ``PowerPropOptimizer(wrapper.optimizer, model)``. A new wrapper for the same model
    takes the routing of the gradients over from the previous one;
    :meth:`remove`, or dropping the wrapper, ends it, after which backward gives
    ``∂L/∂φ`` again (for another optimizer, or for gradient-based scores of ``φ``).
    ``copy.deepcopy((model, wrapper))`` gives a model and a wrapper that train as these do.

    Args:
        optimizer: a ``torch.optim`` optimizer over the model's parameters that steps
            without a closure (not L-BFGS, whose closure would evaluate the model while
            the parameters hold ``θ``).
        model: the model with :class:`PowerProp` layers.

    Raises:
        ValueError: the model has no Powerprop layer, or the optimizer is L-BFGS.
        TypeError: the arguments swapped (the model first).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        if isinstance(optimizer, nn.Module) or not isinstance(model, nn.Module):
            raise TypeError(f"PowerPropOptimizer(optimizer, model) takes the optimizer first, then the model; got "
                            f"{type(optimizer).__name__} and {type(model).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("PowerPropOptimizer cannot wrap L-BFGS: its closure would evaluate the model while the "
                             "parameters hold θ instead of φ; use an optimizer that steps without a closure")
        self.optimizer = optimizer
        layers = powerprop_layers(model)
        if not layers:
            raise ValueError("the model has no Powerprop layer: call lowlearn.powerprop.powerprop(model, alpha) first")
        self._route(layers)

    def _route(self, layers: dict[str, nn.Module]) -> None:
        """Route ``∂L/∂θ`` to the ``φ`` of ``layers`` (taking it over from a previous wrapper) until :meth:`remove`."""
        self.layers = layers
        self._weights: list[tuple[str, Tensor, float]] = []   # (name, φ, α): the wrapped optimizer holds φ too
        self._seen: set[str] = set()       # the layers whose ∂L/∂θ this wrapper routed since the last step
        self._hooks = {}                   # {PowerProp module: this wrapper's hook on it}
        for name, layer in self.layers.items():
            module, phi = _powerprop_of(layer), layer.parametrizations.weight.original
            self._weights.append((name, phi, module.alpha))
            if module in _ROUTERS:         # the layer's previous wrapper stops routing: one wrapper per model
                _ROUTERS[module].remove()
            # First among the module's forward hooks, so that hooks registered earlier (a recorder of θ's
            # gradient, lowlearn.reparam.OutputGradients) see the θ that backward reaches.
            _ROUTERS[module] = self._hooks[module] = module.register_forward_hook(self._theta_gradient_hook(name, phi),
                                                                                   prepend=True)
        self._release = weakref.finalize(self, _stop_routing, self._hooks)   # also when the wrapper is dropped
        self._scratch: dict[str, tuple[Tensor, Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> PowerPropOptimizer:
        """A wrapper of a copy of the optimizer that routes the gradients of copies of the layers.

        In ``copy.deepcopy((model, wrapper))`` those are the copied model's, which then
        trains with the copied wrapper as the original does with its own. (The copied
        layers carry no hook of this wrapper: :meth:`PowerProp.__deepcopy__`.)
        """
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.optimizer = copy.deepcopy(self.optimizer, memo)
        replica._route(copy.deepcopy(self.layers, memo))
        return replica

    def remove(self) -> None:
        """Stop routing ``∂L/∂θ`` to the layers' ``φ`` where this wrapper still does: backward gives ``∂L/∂φ`` again."""
        self._release()

    def _theta_gradient_hook(self, name: str, phi: Tensor):
        wrapper = weakref.ref(self)            # the hook does not keep a dropped wrapper alive, nor its routing

        def hook(module: nn.Module, inputs: tuple, theta: Tensor) -> Tensor | None:
            # Not for a deep copy's pass, another tensor's, or after the wrapper is gone.
            if inputs[0] is not phi or not theta.requires_grad or (owner := wrapper()) is None:
                return None
            owner._seen.add(name)
            return _GradientOfTheta.apply(phi, theta.detach())

        return hook

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's per-parameter state (its moments track ``θ``'s gradients)."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """One optimiser-aware step (see the class docstring).

        Raises:
            RuntimeError: a layer has a nonzero gradient that did not come through this
                wrapper (a backward pass of a forward pass before it was built), or has lost
                its Powerprop parametrization (squashed).
        """
        # Every layer is checked before any φ is swapped for θ: a refused step changes nothing.
        for name, phi, _ in self._weights:
            if phi.grad is None or name in self._seen:
                continue
            layer = self.layers[name]
            if not parametrize.is_parametrized(layer, "weight") or \
                    not any(module in self._hooks for module in layer.parametrizations.weight):
                # Its parameter holds θ now: the step would take it for φ (even with a zero gradient, under momentum).
                raise RuntimeError(f"layer {name!r} no longer has the Powerprop parametrization this "
                                   "PowerPropOptimizer was built for (squash() or remove_parametrizations made "
                                   "its weight the plain parameter θ, or it was replaced): step the wrapped "
                                   ".optimizer itself, whose state already tracks θ, or wrap it anew, "
                                   "PowerPropOptimizer(wrapper.optimizer, model), if Powerprop layers remain")
            # A zero gradient (zero_grad(set_to_none=False)) of a layer that took no part in the loss is
            # ∂L/∂θ = 0 too. Anything else came from a forward pass this wrapper did not see.
            if phi.grad.any():
                raise RuntimeError(f"the gradient of {name!r} did not come through this PowerPropOptimizer: build "
                                   "it before the forward pass, then zero_grad(), forward, backward and step()")
        swapped = []
        for name, phi, alpha in self._weights:
            if phi.grad is None or alpha == 1:                    # α = 1: φ is θ, and the step is the optimizer's
                continue
            old, theta = self._scratch_like(name, phi)
            old.copy_(phi)
            _power(old, alpha, out=theta)
            phi.copy_(theta)                                      # the parameter holds θ = φ |φ|^(α−1)
            swapped.append((phi, old, theta, alpha))
        try:
            self.optimizer.step()
        except BaseException:
            for phi, old, _, _ in swapped:                        # the parameters hold φ again, as before the step
                phi.copy_(old)
            raise
        for phi, old, theta, alpha in swapped:
            phi.sub_(theta)            # Δθ = θ_new − θ exactly: 0 wherever the optimizer left θ alone (frozen weights)
            power = _magnitude_power(old, alpha - 1, out=theta)   # |φ|^(α−1)
            torch.addcmul(old, phi, power, value=alpha, out=phi)  # φ ← φ + Δθ · α |φ|^(α−1)
        self._seen.clear()

    def _scratch_like(self, name: str, phi: Tensor) -> tuple[Tensor, Tensor]:
        """The step's two tensors like ``φ`` (made anew if ``φ`` has moved to another dtype or device)."""
        scratch = self._scratch.get(name)
        if scratch is None or scratch[0].dtype != phi.dtype or scratch[0].device != phi.device:
            scratch = self._scratch[name] = (torch.empty_like(phi), torch.empty_like(phi))
        return scratch

    def scratch_tensors(self) -> list[Tensor]:
        """The working tensors the step keeps from one step to the next: two like each ``φ``, after the first step.

        :func:`lowlearn.cost.training_memory` counts them with the optimizer's state.
        """
        return [tensor for pair in self._scratch.values() for tensor in pair]

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        """Load the wrapped optimizer's state."""
        self.optimizer.load_state_dict(state)
