"""Structured sparsity: N:M patterns, and whole neurons or channels.

Unstructured sparsity saves arithmetic only with sparse kernels; structured
patterns map to hardware and dense kernels:

* :func:`nm_mask` / :func:`prune_nm`: N:M fine-grained sparsity, ``N`` of every ``M``
  consecutive weights of the reduction dimension kept (2:4 on NVIDIA Ampere and
  later GPUs runs its matrix products at up to twice the dense rate: a Linear
  layer's as masked here, a convolution's when its groups run along input channels,
  which :func:`nm_mask` says how to get).
* :func:`channel_scores` / :func:`prune_channels`: remove whole output units (rows of
  a Linear weight, filters of a Conv2d), which can later be cut out of the dense
  tensors.

Both install :class:`~lowlearn.sparse.mask.Mask` parametrizations like every other
pruning routine; :func:`prune_channels` also masks the bias of removed units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..checks import is_integer, is_real
from ..reparam import register
from .mask import (PRUNABLE, Mask, attach_masks, find_mask, masks_or_ones, nonzero_counts, prunable_layers,
                   set_masks, zero_where_masked)
from .prune import alive_scores, check_some_layer, kept_count, target_densities, top_k_mask
from .scores import magnitude, scored_layers


def _check_nm(n: int, m: int) -> None:
    if not (is_integer(n) and is_integer(m)) or not 1 <= n <= m:
        raise ValueError(f"N:M sparsity keeps n of every m weights, so it needs integers 1 <= n <= m; "
                         f"got n={n!r}, m={m!r} (e.g. n=2, m=4)")


def _nm_top(scores: Tensor, n: int, m: int, what: str = "the weight") -> Tensor:
    """Boolean tensor of ``scores``' shape, ``True`` at the ``n`` largest of every group of ``m``."""
    if scores.dim() < 2:
        raise ValueError(f"{what} has shape {tuple(scores.shape)}; N:M sparsity needs an "
                         "(out, in) or (out, in, k_h, k_w) weight")
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"{what} has shape {tuple(scores.shape)}: its reduction dimension of "
                         f"{rows.shape[1]} weights does not split into groups of m={m}; choose an m that divides "
                         "it" + (", or leave the layer out (pass scores= without it)" if what != "the weight" else ""))
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1, sorted=False).indices, True)
    return keep.view(scores.shape)


@torch.no_grad()
def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M mask: in every group of ``m`` consecutive weights along the reduction dimension, the ``n`` largest ``|w|``.

    Mishra et al. (2021), "Accelerating sparse deep neural networks"
    (arXiv:2104.08378): the 2:4 pattern of NVIDIA's sparse tensor cores. The
    reduction dimension of a Linear weight ``(out, in)`` is ``in``; for a Conv2d
    weight ``(out, in, k_h, k_w)`` it is the flattened ``in · k_h · k_w`` in the order
    of the weight's dimensions (the memory order of a contiguous weight, and that of
    ``torch.nn.functional.unfold``, NCHW im2col), so groups run along ``k_w``, then
    ``k_h``, then ``in``. (NVIDIA's ASP library and cuDNN
    work in NHWC, where the reduction order is ``(k_h, k_w, in)`` and groups run
    along input channels; for that layout permute the weight to ``(out, k_h, k_w, in)``
    first and permute the mask back.)

    Args:
        weight: ``(out, ...)``; ties are broken arbitrarily.
        n: weights kept per group, ``1 <= n <= m``.
        m: group size; must divide the reduction dimension.

    Returns:
        Boolean mask of ``weight``'s shape with exactly ``n`` of every ``m`` set.

    Raises:
        ValueError: bad ``n``/``m``, a weight of fewer than two dimensions or whose reduction
            dimension ``m`` does not divide, or a NaN weight (``topk`` would rank it above every
            other and keep it).
    """
    _check_nm(n, m)
    if torch.isnan(weight).any():
        raise ValueError("the weight contains NaN (a diverged weight), which has no magnitude to rank; "
                         "restore or re-initialise the weight first")
    return _nm_top(weight.abs(), n, m)


def prune_nm(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    scores: Mapping[str, Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Tensor]:
    """Prune every scored layer to the N:M pattern of :func:`nm_mask`.

    In every group of ``m`` the ``n`` highest-scoring weights are kept among those not
    yet pruned; weights already pruned stay pruned (masks only shrink), so a group
    that had fewer than ``n`` weights left keeps just those.

    Args:
        model: the model; layers named in ``scores`` get a mask if they have none.
        n, m: keep ``n`` of every ``m``.
        scores: ``{layer name: scores}`` (higher = keep), default
            :func:`~lowlearn.sparse.scores.magnitude` of the scored layers. Only the
            layers named are pruned, so leave out a layer whose reduction dimension
            ``m`` does not divide (e.g. a first convolution with one input channel).
        optimizer: its state for the pruned weights is zeroed too.

    Returns:
        The new ``{layer name: boolean mask}``.

    Raises:
        ValueError: bad ``n``/``m``, no scores (or a model without Linear/Conv2d
            layers), a scored layer that is not an ``nn.Linear`` or ``nn.Conv2d``, a layer
            whose reduction dimension ``m`` does not divide, or scores of the wrong shape
            or with NaN.
        KeyError: a layer name that is not in the model.
    """
    _check_nm(n, m)
    if scores is None:
        scores = magnitude(model)
    check_some_layer(scores)
    _with_known_layout(scored_layers(model, scores), "N:M pruning")
    current = masks_or_ones(model, scores)               # the model is changed only once the input is checked
    new = {name: _nm_top(s, n, m, f"layer {name!r}") & current[name]
           for name, s in alive_scores(scores, current).items()}
    attach_masks(model, new)
    set_masks(model, new, optimizer)
    return new


def _channel_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    if layers is None:
        chosen = dict(list(prunable_layers(model).items())[:-1])
        if not chosen:
            raise ValueError("the model's only Linear/Conv2d layer is its output layer, which channel pruning "
                             "leaves alone by default; pass layers=[...] to prune it anyway")
        return chosen
    chosen = scored_layers(model, layers)
    check_some_layer(chosen)
    return _with_known_layout(chosen, "channel pruning")


def _with_known_layout(layers: dict[str, nn.Module], method: str) -> dict[str, nn.Module]:
    """``layers``, or a ValueError naming one that is not an ``nn.Linear`` or ``nn.Conv2d``.

    Structured patterns need to know which weight dimension holds the output units and
    which the inputs; a transposed convolution, for one, has them the other way round.
    """
    for name, layer in layers.items():
        if not isinstance(layer, PRUNABLE):
            raise ValueError(f"layer {name!r} is a {parametrize.type_before_parametrizations(layer).__name__}; "
                             f"{method} is defined for nn.Linear and nn.Conv2d layers only")
    return layers


@torch.no_grad()
def channel_scores(model: nn.Module, norm: float = 1, layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The ``norm``-norm of each output unit's weights: rows of a Linear weight, filters of a Conv2d.

    Li, Kadav, Durdanovic, Samet & Graf (2017), "Pruning filters for efficient
    ConvNets" (ICLR), section 3.1: the filter ``F_j`` with the smallest ``Σ|F_j|``
    (``norm=1``) is pruned first. Computed on the effective (masked) weight.

    Args:
        model: the model.
        norm: ``p`` of the ``p``-norm, positive (1 as in the paper, or 2).
        layers: qualified names; default the scored layers (masked, else every
            Linear/Conv2d).

    Returns:
        ``{layer name: tensor (n_out,)}``.

    Raises:
        ValueError: a ``norm`` that is not positive, or a layer that is not an
            ``nn.Linear`` or ``nn.Conv2d`` (a normalisation layer, a transposed convolution).
        KeyError: a layer name that is not in the model.
    """
    if not is_real(norm) or not norm > 0:
        raise ValueError(f"norm is the p of a p-norm and must be positive (1 or 2), got {norm!r}")
    return {name: torch.linalg.vector_norm(layer.weight.flatten(1), ord=norm, dim=1)
            for name, layer in _with_known_layout(scored_layers(model, layers), "channel scoring").items()}


def _mask_bias(layer: nn.Module, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Give ``layer.bias`` a :class:`Mask` that keeps ``keep`` (and what it already kept), and zero the rest.

    The bias mask is a parametrization like the weight mask, zeroed in the raw bias
    and in the optimizer's state like :func:`set_masks` does for weights;
    :func:`~lowlearn.sparse.mask.squash` makes it permanent.
    """
    if layer.bias is None:
        return
    mask = find_mask(layer, "bias")
    if mask is None:
        register(layer, "bias", Mask(keep, layer.bias.dtype))
        mask = find_mask(layer, "bias")
    else:
        mask.mask.mul_(keep)
    zero_where_masked(layer.parametrizations.bias.original, mask.mask, optimizer)


def prune_channels(
    model: nn.Module,
    density: float | Mapping[str, float],
    layers: Iterable[str] | None = None,
    norm: float = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Tensor]:
    """Keep the ``round(d · n_out)`` output units of largest norm in each layer; mask whole rows or filters.

    Structured pruning after Li et al. (2017) (see :func:`channel_scores`), one layer
    at a time. A unit is alive while its weight row (filter) keeps a weight; the
    survivors are chosen among the alive units, so masks only shrink. A removed unit's
    weights are masked, and so is its bias (a second :class:`~lowlearn.sparse.mask.Mask`
    parametrization, on ``layer.bias``; :func:`~lowlearn.sparse.mask.masks_of` and
    :func:`~lowlearn.sparse.mask.density` count weights only): its output is exactly
    zero. The next layer's weights that read a removed unit are not masked here;
    they multiply zeros. A Conv2d followed by batch norm still passes a constant on
    for a removed channel: the shift ``β`` with batch statistics (normalised zeros
    are zero), ``β − γμ/√(σ² + ε)`` with running statistics; lowlearn leaves batch
    norms dense (:func:`~lowlearn.sparse.export.compact` folds the constant away).
    The bias masks are entries of the ``state_dict`` too: a fresh model takes a
    channel-pruned model's ``state_dict`` once its own channels are pruned (any
    density: the loaded masks replace its own), or after
    :func:`~lowlearn.sparse.mask.squash` of the saved model.

    Args:
        model: the model; changed in place.
        density: the fraction of output units kept, one number or ``{layer name:
            density}`` over ``layers``.
        layers: qualified names of Linear/Conv2d layers; default every
            :func:`~lowlearn.sparse.mask.prunable_layers` layer except the last (in
            ``model.named_modules()`` order: the output layer of the models of
            :mod:`lowlearn.models`), since removing output units would remove classes.
        norm: the norm that ranks units (:func:`channel_scores`).
        optimizer: its state for the removed weights and biases is zeroed too.

    Returns:
        ``{layer name: boolean (n_out,)}``, ``True`` for the units kept.

    Raises:
        ValueError: no layer (``layers=[]``), a density outside (0, 1], above the alive
            units' share (pruning cannot revive units), a layer that is not Linear/Conv2d,
            or a unit whose norm is NaN (a diverged weight).
        KeyError: a layer name (of ``layers`` or ``density``) that is not in the model, or
            no density for a layer.
    """
    chosen = _channel_layers(model, layers)
    densities = target_densities(model, density, chosen)
    scores = channel_scores(model, norm, chosen)
    current = masks_or_ones(model, chosen)               # the model is changed only once the input is checked
    alive = {name: current[name].flatten(1).any(dim=1) for name in chosen}
    remaining = nonzero_counts(alive)
    unit_scores = alive_scores({name: scores[name] for name in chosen}, alive)
    units, new = {}, {}
    for name in chosen:
        k = kept_count(densities[name], alive[name].numel())
        if k > remaining[name]:
            raise ValueError(f"layer {name!r} has {remaining[name]} units left, so it cannot keep {k} "
                             f"({densities[name]:.4g} of {alive[name].numel()}): units cannot be revived")
        units[name] = top_k_mask(unit_scores[name], k)
        new[name] = current[name] & units[name].view(-1, *[1] * (current[name].dim() - 1))
    attach_masks(model, new)
    for name, layer in chosen.items():
        _mask_bias(layer, units[name], optimizer)
    set_masks(model, new, optimizer)
    return units
