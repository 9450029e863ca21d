"""Masks as parametrizations: the one representation of sparsity in lowlearn.

A pruned or sparsely trained layer keeps its dense weight tensor ``θ`` and a
binary mask ``m`` of the same shape; the layer computes with ``θ ⊙ m``. The mask is
a :class:`Mask` module registered with :func:`lowlearn.reparam.register` (PyTorch's
:func:`~torch.nn.utils.parametrize.register_parametrization`, safe under ``copy.deepcopy``),
so that

* ``layer.weight`` *is* the masked weight, for every caller (forward passes,
  scores, plots) without hooks or monkeypatching;
* the mask is a buffer: it lives in ``state_dict``, moves with ``.to(device)``,
  survives ``copy.deepcopy`` and works under :func:`torch.func.functional_call`
  (keyed by the raw name, ``"0.parametrizations.weight.original"``, as
  ``named_parameters`` gives it; the effective name ``"0.weight"`` goes through the
  parametrization's setter, which a mask does not have);
* gradients reach the raw weight ``layer.parametrizations.weight.original`` only
  where the mask is one.

lowlearn also keeps the raw weight itself at exactly zero wherever the mask is
zero, and the optimizer's per-weight state there (SGD momentum, Adam's moments)
too: :func:`set_masks` zeroes both whenever a mask changes. From then on the
zeros stay exact, because the gradient there is zero (and a weight decay of zero
is zero), under every optimizer whose update of a weight depends on that weight's
own gradient and state alone (SGD, Adam, AdamW, RMSprop, ...). A layer's pruned
weights are therefore zero in every view of the model. Optimizers that mix
weights (L-BFGS's directions, Muon's orthogonalised matrices) move raw weights
under a zero mask; the masked weight ``θ ⊙ m``, which the layer computes with,
stays exact.

The life cycle, after PyTorch's own sparsifier (``torch.ao.pruning``): attach
(:func:`attach_masks`), update (:func:`set_masks`, usually through the pruning and
sparse-training routines), inspect (:func:`masks_of`, :func:`kept_weights`,
:func:`density`, :func:`layer_densities`), and make permanent (:func:`squash`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..autograd import Function
from ..checks import check_not_shared, check_untied
from ..optim_state import WEIGHT_DECAY_OPTIONS, reset_optimizer_state
from ..reparam import register, remove

PRUNABLE = (nn.Linear, nn.Conv2d)


def kept_fraction(kept: int, size: int) -> float:
    """``kept / size``, with 1.0 for a layer of no weights (nothing of it is pruned)."""
    return kept / size if size else 1.0


def _check_shape(mask: Tensor, weight: Tensor) -> None:
    """Refuse a mask that would broadcast against a weight of another shape instead of matching it."""
    if mask.shape != weight.shape:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} cannot mask a weight of shape {tuple(weight.shape)}: "
                         "build the mask with the weight's shape (e.g. torch.ones_like(weight, dtype=torch.bool))")


class Mask(nn.Module):
    """Parametrization ``θ ↦ θ ⊙ m`` with a buffer ``mask`` (``m``) of zeros and ones.

    The buffer holds 0.0/1.0 in the weight's floating dtype rather than booleans: a
    product of two tensors of one dtype is what the hardware does fastest, and a
    boolean mask would be converted on every forward pass. It follows the model
    through ``.to(dtype)`` like any floating buffer.

    Args:
        mask: boolean, ``True`` where the weight is kept.
        dtype: the weight's dtype.
    """

    def __init__(self, mask: Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        if mask.dtype != torch.bool:
            raise TypeError(f"a mask must be a boolean tensor (True = keep), got dtype {mask.dtype}")
        self.register_buffer("mask", mask.detach().to(dtype=dtype))

    def forward(self, weight: Tensor) -> Tensor:
        _check_shape(self.mask, weight)
        return weight * self.mask

    def extra_repr(self) -> str:
        return f"density={kept_fraction(self.mask.count_nonzero().item(), self.mask.numel()):.4f}"


class _SplitMaskFunction(Function):
    """``w = θ ⊙ a`` forward; ``∂L/∂θ = ∂L/∂w ⊙ b`` backward."""

    generate_vmap_rule = True     # element-wise: torch.func.vmap batches it as it is (per-example gradients)

    @staticmethod
    def forward(weight: Tensor, forward_mask: Tensor, backward_mask: Tensor) -> Tensor:
        return weight * forward_mask

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (backward_mask,) = ctx.saved_tensors
        return grad * backward_mask, None, None


class SplitMask(Mask):
    """A :class:`Mask` whose gradient passes through a second mask: ``w = θ ⊙ a``, ``∂L/∂θ = ∂L/∂w ⊙ b``.

    ``mask`` (``a``) chooses the weights the forward pass uses, ``backward_mask``
    (``b``) the weights that learn. Top-KAST uses ``b ⊇ a``
    (:mod:`lowlearn.sparse.topkast`: weights just outside the forward set keep
    learning); continual learning uses ``b ⊆ a`` (:mod:`lowlearn.sparse.packnet`:
    earlier tasks' weights are used but frozen). Unlike a plain :class:`Mask`, the
    raw weight is *not* kept at zero outside ``a``.

    Args:
        forward_mask: boolean ``a``.
        backward_mask: boolean ``b``.
        dtype: the weight's dtype.
    """

    def __init__(self, forward_mask: Tensor, backward_mask: Tensor, dtype: torch.dtype = torch.float32):
        super().__init__(forward_mask, dtype)
        if backward_mask.dtype != torch.bool or backward_mask.shape != forward_mask.shape:
            raise ValueError("the backward mask must be boolean with the forward mask's shape")
        self.register_buffer("backward_mask", backward_mask.detach().to(dtype=dtype))

    def forward(self, weight: Tensor) -> Tensor:
        _check_shape(self.mask, weight)
        return _SplitMaskFunction.apply(weight, self.mask, self.backward_mask)

    def extra_repr(self) -> str:
        backward = kept_fraction(self.backward_mask.count_nonzero().item(), self.backward_mask.numel())
        return f"{super().extra_repr()}, backward_density={backward:.4f}"


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights lowlearn masks by default: every ``nn.Linear`` and ``nn.Conv2d``.

    Returns ``{qualified name: module}`` in ``model.named_modules()`` order. Biases,
    batch norms and other layers stay dense.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def find_mask(layer: nn.Module, param: str = "weight") -> Mask | None:
    """The :class:`Mask` parametrization of ``layer.<param>``, or ``None``."""
    if not parametrize.is_parametrized(layer, param):
        return None
    found = [p for p in layer.parametrizations[param] if isinstance(p, Mask)]
    return found[0] if found else None


def all_masks(model: nn.Module) -> list[tuple[nn.Module, str, Mask]]:
    """``(module, tensor name, Mask)`` for every :class:`Mask` in the model: of weights, and of masked biases."""
    return [(module, name, mask) for module in model.modules() if parametrize.is_parametrized(module)
            for name in module.parametrizations if (mask := find_mask(module, name)) is not None]


@torch.no_grad()
def zero_where_masked(raw: Tensor, mask: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Set ``raw`` (a masked tensor's raw value) to zero where ``mask`` is zero, and reset its optimizer state there.

    The state takes a new parameter's values
    (:func:`lowlearn.optim_state.reset_optimizer_state`: zeros for SGD's momentum and
    Adam's moments). A fill, not a product: an infinite raw value times 0 would be NaN.
    """
    raw.masked_fill_(mask == 0, 0)
    if optimizer is not None:
        reset_optimizer_state(optimizer, raw, mask)


def version_stamp(tensor: Tensor) -> tuple:
    """What :func:`unchanged_since` compares with: a weak reference to ``tensor`` and its version counter.

    Every in-place write raises the counter (``Tensor._version``: ``copy_``, a loaded
    ``state_dict``), and moving the model replaces the buffer; the tensor is held weakly,
    so that one a move replaced is freed.
    """
    return weakref.ref(tensor), tensor._version


def unchanged_since(tensor: Tensor, stamp: tuple) -> bool:
    """Whether ``tensor`` is the tensor of :func:`version_stamp`'s ``stamp``, not written in place since."""
    held, version = stamp
    return held() is tensor and tensor._version == version


def zero_under_masks(model: nn.Module) -> None:
    """Set the raw values under every zero of every :class:`Mask` of the model to zero (weights and biases).

    What :func:`set_masks` does for the weights it is given, for a model whose raw
    values were overwritten (a checkpoint loaded, parameters re-initialised). A
    :class:`SplitMask`'s raw values are left as they are: they are not kept at zero
    outside its forward set (Top-KAST's weights there still learn).
    """
    for module, name, mask in all_masks(model):
        if not isinstance(mask, SplitMask):
            zero_where_masked(module.parametrizations[name].original, mask.mask)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of the layers whose weight carries a :class:`Mask`."""
    return {name: m for name, m in model.named_modules() if find_mask(m) is not None}


def raw_weight(layer: nn.Module) -> Tensor:
    """The trainable weight under a layer's parametrizations (``θ``), or the plain weight."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def weights_device(layers: Mapping[str, nn.Module]) -> torch.device:
    """The device of the first layer's trainable weight (:func:`raw_weight`): where a method's layers live."""
    return raw_weight(next(iter(layers.values()))).device


def saved_weights(owner: str, part: str, saved: Mapping[str, Tensor], layers: Mapping[str, nn.Module]
                  ) -> dict[str, Tensor]:
    """Copies of ``saved`` (the ``part`` of a loaded state), each on its layer's device.

    Raises:
        ValueError: ``saved`` does not hold a tensor of each layer's weight shape (:func:`raw_weight`) for
            exactly ``layers``: it is the state of an ``owner`` (a method or callback) built on another model.
    """
    shapes = {name: tuple(raw_weight(layer).shape) for name, layer in layers.items()}
    found = {name: tuple(tensor.shape) for name, tensor in saved.items()}
    if found != shapes:
        raise ValueError(f"the state's {part} are of layers {found}, but this {owner} has the layers {shapes}: build "
                         f"it on a model like the one the saved {owner} was built on")
    return {name: tensor.to(raw_weight(layers[name]).device, copy=True) for name, tensor in saved.items()}


def resolve_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """``{name: module}`` for the given qualified names (default: :func:`prunable_layers`), in the model's order.

    The order is that of ``model.named_modules()`` whatever the order of ``layers``, so
    "the first layer" is the model's (the input layer), not the first name listed.

    Raises:
        KeyError: a name that is not a module of the model, listing its prunable layers.
        ValueError: a module without a weight tensor, a weight that cannot take a mask (one
            that a parametrization computes from several tensors, such as weight norm's, or
            that a hook recomputes, as ``torch.nn.utils.prune`` does), two layers that share
            their weight, or a layer whose weight another module of the model uses too.
    """
    chosen = _named_layers(model, layers)
    _check_maskable(chosen)
    check_untied({name: raw_weight(layer) for name, layer in chosen.items()})
    check_not_shared(model, {name: (layer, raw_weight(layer)) for name, layer in chosen.items()},
                     "read the pruned weights unmasked and train them again")
    return chosen


def _check_maskable(layers: Mapping[str, nn.Module]) -> None:
    """Raise a ValueError naming the first of ``layers`` whose weight is not one trainable tensor under a mask.

    Two kinds are refused, before any layer is changed: a weight that a parametrization
    computes from several tensors (``torch.nn.utils.parametrizations.weight_norm``'s
    ``g`` and ``v``), which has no one raw weight to zero; and a weight that is a plain
    attribute recomputed by a forward pre-hook (``torch.nn.utils.prune``, the older
    ``torch.nn.utils.weight_norm``), which would overwrite the masked weight.
    """
    for name, layer in layers.items():
        if parametrize.is_parametrized(layer, "weight"):
            if not layer.parametrizations.weight.is_tensor:
                raise ValueError(f"the weight of layer {name!r} is computed from several tensors by a "
                                 "parametrization (such as torch.nn.utils.parametrizations.weight_norm), so it has no "
                                 "one raw weight to mask: remove it (torch.nn.utils.parametrize."
                                 f"remove_parametrizations), or leave {name!r} out of layers=")
        elif "weight" not in layer._parameters and "weight" not in layer._buffers:
            raise ValueError(f"the weight of layer {name!r} is not a parameter but recomputed by a hook (as "
                             "torch.nn.utils.prune and the older torch.nn.utils.weight_norm do), which would overwrite "
                             "a mask: remove it first (torch.nn.utils.prune.remove(layer, 'weight'), "
                             f"torch.nn.utils.remove_weight_norm), or leave {name!r} out of layers=")


def _named_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    if layers is None:
        return prunable_layers(model)
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of layer names, not one string ({layers!r}): pass [{layers!r}]")
    modules = dict(model.named_modules())
    chosen = {}
    for name in layers:
        if not isinstance(getattr(modules.get(name), "weight", None), Tensor):
            known = ", ".join(prunable_layers(model)) or "none"
            if name not in modules:
                raise KeyError(f"the model has no layer {name!r}; its Linear/Conv2d layers are: {known}")
            raise ValueError(f"layer {name!r} ({type(modules[name]).__name__}) has no weight tensor; its "
                             f"Linear/Conv2d layers are: {known}")
        chosen[name] = modules[name]
    order = {name: index for index, name in enumerate(modules)}
    return {name: chosen[name] for name in sorted(chosen, key=order.__getitem__)}   # the model's order, not the list's


def attach_masks(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Give every chosen layer's weight an all-ones :class:`Mask`, and return the masks.

    Args:
        model: the model; changed in place.
        layers: qualified module names (as in ``model.named_modules()``); default:
            :func:`prunable_layers`. Layers that already carry a mask keep it.

    Returns:
        ``{name: boolean mask}`` of every masked layer (see :func:`masks_of`).

    Raises:
        KeyError: a name that is not a module of the model.
        ValueError: a layer with a :class:`SplitMask` (see :func:`refuse_split_masks`);
            nothing is attached then.
    """
    chosen = resolve_layers(model, layers)
    refuse_split_masks(chosen)
    for layer in chosen.values():
        if find_mask(layer) is None:
            keep_all = torch.ones_like(layer.weight, dtype=torch.bool)
            register(layer, "weight", Mask(keep_all, layer.weight.dtype))
    return masks_of(model)


def refuse_split_masks(layers: Mapping[str, nn.Module]) -> None:
    """Raise a ValueError if a layer's weight carries a :class:`SplitMask` (Top-KAST's or PackNet's).

    Its gradient follows its own backward mask, so a plain mask written into it (a
    pruning, a dynamic sparsifier taking over) would let weights outside the new mask
    go on learning: they would no longer stay at zero.
    """
    for name, layer in layers.items():
        if isinstance(find_mask(layer), SplitMask):
            raise ValueError(f"layer {name!r} has a SplitMask (Top-KAST's or PackNet's), whose gradient follows its "
                             "own backward mask, not the mask set here: make it permanent first "
                             "(lowlearn.sparse.squash(model)), or start from an unmasked model")


def masks_or_ones(model: nn.Module, layers: Iterable[str]) -> dict[str, Tensor]:
    """``{name: boolean mask}`` of ``layers``: a masked layer's mask, all ``True`` for one without.

    Nothing is attached: pruning routines check their input on these masks first and
    change the model only once the input is known to be good.

    Raises:
        KeyError: a name that is not a module of the model.
    """
    masks = {}
    for name, layer in resolve_layers(model, layers).items():
        mask = find_mask(layer)
        masks[name] = torch.ones_like(layer.weight, dtype=torch.bool) if mask is None else mask.mask != 0
    return masks


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name: boolean mask}`` of every masked layer (``True`` = kept).

    The masks are copies: change a model's masks with :func:`set_masks`.
    """
    return {name: find_mask(layer).mask != 0 for name, layer in masked_layers(model).items()}


def set_masks(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Replace the masks of some layers, and zero what the new masks remove.

    For every ``name → mask`` the layer's mask buffer is overwritten in place, the
    raw weight ``θ`` is set to zero where the mask is zero, and there the
    optimizer's per-weight state for ``θ`` takes a new parameter's values (zeros for
    SGD's momentum buffer and Adam's moments; see
    :func:`lowlearn.optim_state.reset_optimizer_state`, also for Adam's step count).
    Positions where the mask turns from zero to one therefore start at weight zero
    with a new parameter's optimizer state. Every mask is checked before any
    changes, so a refused call changes nothing.

    Raises:
        KeyError: ``name`` is not a masked layer (call :func:`attach_masks` first).
        ValueError: a mask of the wrong shape, or a layer with a :class:`SplitMask`
            (see :func:`refuse_split_masks`).
        TypeError: a mask that is not boolean.
    """
    layers = masked_layers(model)
    for name, mask in masks.items():
        if name not in layers:
            known = ", ".join(layers) or "none (call attach_masks first)"
            raise KeyError(f"{name!r} is not a masked layer of the model; masked layers: {known}")
        refuse_split_masks({name: layers[name]})
        buffer = find_mask(layers[name]).mask
        if mask.dtype != torch.bool:
            raise TypeError(f"the mask for {name!r} must be boolean (True = keep), got dtype {mask.dtype}")
        if mask.shape != buffer.shape:
            raise ValueError(f"the mask for {name!r} has shape {tuple(mask.shape)}, "
                             f"but the layer's weight has shape {tuple(buffer.shape)}")
    for name, mask in masks.items():
        buffer = find_mask(layers[name]).mask
        buffer.copy_(mask)
        zero_where_masked(raw_weight(layers[name]), buffer, optimizer)


def refuse_weight_decay(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], reason: str) -> None:
    """Raise a ValueError if ``optimizer`` applies weight decay to any of ``params``.

    Methods that keep weights frozen by giving them a zero gradient (Top-KAST,
    PackNet) cannot allow it: weight decay shrinks a weight whatever its gradient.
    That is ``weight_decay`` in most optimizers, and also ``lambd`` in ASGD's
    (:data:`lowlearn.optim_state.WEIGHT_DECAY_OPTIONS`).
    ``reason`` says why in the message.
    """
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if not any(id(p) in ids for p in group["params"]):
            continue
        for option in WEIGHT_DECAY_OPTIONS:
            if group.get(option, 0):
                raise ValueError(f"{reason}, but the optimizer's weight decay ({option}={group[option]}) would "
                                 f"shrink frozen weights too: build it with {option}=0")


def read_scalars(values: Mapping[str, Tensor]) -> dict[str, bool | int | float]:
    """``{name: Python number}`` of one-element tensors of one dtype: one transfer per device that holds some."""
    by_device: dict[torch.device, dict[str, Tensor]] = {}
    for name, value in values.items():
        by_device.setdefault(value.device, {})[name] = value.reshape(())
    read = {}
    for on_device in by_device.values():
        read.update(zip(on_device, torch.stack(list(on_device.values())).tolist()))
    return {name: read[name] for name in values}


def nonzero_counts(masks: Mapping[str, Tensor]) -> dict[str, int]:
    """``{name: nonzero entries}`` of ``masks``, read as :func:`read_scalars` reads."""
    return read_scalars({name: mask.count_nonzero() for name, mask in masks.items()})


def kept_weights(model: nn.Module) -> dict[str, int]:
    """``{layer name: number of its weights kept}`` for every masked layer (see :func:`nonzero_counts`)."""
    return nonzero_counts(masks_of(model))


def density(model: nn.Module) -> float:
    """Fraction of weights kept, over all masked layers together (1.0 with no masks, or none of any size)."""
    masks = masks_of(model)
    return kept_fraction(sum(nonzero_counts(masks).values()), sum(m.numel() for m in masks.values()))


def layer_densities(model: nn.Module) -> dict[str, float]:
    """``{layer name: fraction of its weights kept}`` for every masked layer."""
    masks = masks_of(model)
    return {name: kept_fraction(k, masks[name].numel()) for name, k in nonzero_counts(masks).items()}


def squash(model: nn.Module) -> nn.Module:
    """Make the masks permanent: every masked weight becomes a plain parameter ``θ ⊙ m``.

    Masked biases (from :func:`lowlearn.sparse.structured.prune_channels`) become
    plain parameters too. Other parametrizations of a layer (e.g. Powerpropagation)
    are folded in as well, since PyTorch removes a parameter's parametrizations
    together. The model's outputs do not change. Returns the model.
    """
    for layer in list(model.modules()):
        for param in ("weight", "bias"):
            if find_mask(layer, param) is not None:
                remove(layer, param)
    return model
