"""Pruning: keep the highest-scoring weights of each layer, or of the whole model.

:func:`prune` is the one routine every pruning method of lowlearn ends in. A method
only supplies *scores* (a tensor per layer, higher = more important: see
:mod:`lowlearn.sparse.scores`) and a *target density* (fraction of weights kept,
globally or per layer: see :mod:`lowlearn.sparse.allocation`); :func:`prune` picks the
weights with ``topk``, so the model (global scope) or every layer (layer scope) keeps
exactly ``round(density · n)`` of its ``n`` weights, at least one (in global scope a
layer can lose all of its), and installs the new masks with
:func:`~lowlearn.sparse.mask.set_masks`.
Weights that are already pruned stay pruned: masks only shrink.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..checks import as_float
from .mask import attach_masks, masks_or_ones, nonzero_counts, read_scalars, resolve_layers, set_masks


def check_density(value: float, what: str = "density") -> float:
    """Return ``value`` as a float if it is a real number in (0, 1], else raise a ValueError that says so.

    NumPy scalars count as numbers; ``bool`` and tensors do not (pass ``float(t)``).
    """
    if isinstance(value, Tensor):
        raise ValueError(f"{what} must be a number, got a tensor ({value!r}): pass float(t)")
    density = as_float(value)
    if not 0.0 < density <= 1.0:                                         # NaN compares False
        raise ValueError(f"{what} must be in (0, 1] (the fraction of weights kept), got {value!r}; "
                         "for a sparsity s (fraction removed) pass 1 - s")
    return density


def check_some_layer(layers: Mapping[str, object] | Iterable[str]) -> None:
    """Raise a ValueError if ``layers`` (scores by layer name, or layer names) names no layer to prune, and a
    TypeError for a score function or a tensor in their place."""
    if callable(layers) or isinstance(layers, Tensor):
        given = getattr(layers, "__name__", type(layers).__name__)
        raise TypeError(f"pass scores by layer name, such as lowlearn.sparse.scores.magnitude(model) (a dictionary "
                        f"{{layer name: scores}}), not {given}")
    if not layers:
        raise ValueError("no layer to prune: pass scores by layer name, e.g. lowlearn.sparse.scores.magnitude(model) "
                         "(or layer names), for a model with Linear/Conv2d layers")


def target_densities(model: nn.Module, density: float | Mapping[str, float],
                     layers: Iterable[str]) -> dict[str, float]:
    """``{layer name: density}`` for ``layers``, from one density or from a mapping that covers them.

    The mapping may name more of the model's layers than ``layers`` (a whole
    :func:`~lowlearn.sparse.allocation.erk` allocation, say); a name the model lacks
    is a typo, and an error.

    Raises:
        KeyError: a layer of ``layers`` without a density, or a name in the mapping
            that is not a layer of the model.
        ValueError: a density outside (0, 1].
    """
    layers = list(layers)
    densities = density if isinstance(density, Mapping) else dict.fromkeys(layers, density)
    missing = set(layers) - set(densities)
    if missing:
        raise KeyError(f"no density given for layers {sorted(missing)}")
    resolve_layers(model, sorted(set(densities) - set(layers)))
    return {name: check_density(densities[name], f"density of {name!r}") for name in layers}


def kept_count(density: float, numel: int) -> int:
    """Weights a layer of ``numel`` weights keeps at ``density``: ``round(density · numel)``, at least 1
    (0 for a layer of no weights).

    Python's ``round``: an exact half goes to the even neighbour (``round(2.5) = 2``), and
    the product is a float (``0.29 · 50`` is just below 14.5, so 14).
    """
    return min(numel, max(1, round(density * numel)))


def finite_scores(scores: Tensor) -> Tensor:
    """``scores``, detached, as float (float32 at least, float64 kept), with ``±inf`` clamped to the finite range.

    An infinite score then still ranks above (or below) every finite one, but never
    ties with the ``±inf`` that the ranking routines write over the entries they exclude.
    A NaN (a diverged weight or gradient) becomes the lowest finite score: dropped
    first, grown last (``topk`` would rank it above ``+inf``, and counts would be off).
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)     # float64 scores keep their precision
    info = torch.finfo(dtype)
    return torch.nan_to_num(scores.detach().to(dtype), nan=info.min, posinf=info.max, neginf=info.min)


def alive_scores(scores: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: scores}`` as float (float32 at least, float64 kept) with ``-inf`` where ``masks[name]`` is ``False``.

    Checks every layer's shape, then NaN in all of them with one read of the device
    (errors name the layers).
    """
    for name, s in scores.items():
        if s.shape != masks[name].shape:
            raise ValueError(f"the scores for {name!r} have shape {tuple(s.shape)}, "
                             f"but the layer's weight has shape {tuple(masks[name].shape)}")
    has_nan = read_scalars({name: torch.isnan(s).any() for name, s in scores.items()})
    if nan := [name for name, found in has_nan.items() if found]:
        raise ValueError(f"the scores for {', '.join(map(repr, nan))} contain NaN")
    # Pruned weights can never win a place back: a kept weight scored -inf (the log of a zero
    # magnitude) becomes the lowest finite float, above every pruned one.
    return {name: finite_scores(s).masked_fill(~masks[name], float("-inf")) for name, s in scores.items()}


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean tensor of ``scores``' shape, ``True`` at its ``k`` largest entries."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[scores.flatten().topk(k, sorted=False).indices] = True
    return keep.view_as(scores)


def prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    density: float | Mapping[str, float],
    *,
    scope: str = "layer",
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Tensor]:
    """Keep the highest-scoring weights and mask the rest.

    Args:
        model: the model; layers named in ``scores`` get a mask if they have none.
        scores: ``{layer name: scores}`` of the weight's shape; higher = keep.
        density: the fraction of weights to keep: one number, or ``{layer name:
            density}`` for layer-wise allocations (e.g. from
            :func:`lowlearn.sparse.allocation.erk`).
        scope: ``"layer"`` keeps ``round(d_l · n_l)`` weights in every layer;
            ``"global"`` ranks all layers' scores together and keeps
            ``round(d · Σ n_l)`` weights overall (``density`` must be one number),
            so layers with larger scores keep more.
        optimizer: its state for the pruned weights is zeroed too.

    Returns:
        The new ``{layer name: boolean mask}``.

    Raises:
        ValueError: no scores, a density outside (0, 1], a density above what a layer
            (or the model) still keeps (pruning cannot bring weights back), scores of
            the wrong shape or with NaN, or an unknown ``scope``.
        KeyError: a layer name (of ``scores`` or ``density``) that is not in the model.
        TypeError: a score function or one tensor in place of scores by layer name.
    """
    check_some_layer(scores)
    current = masks_or_ones(model, scores)               # the model is changed only once the input is checked
    alive = alive_scores(scores, current)
    remaining = nonzero_counts(current)

    if scope == "layer":
        densities = target_densities(model, density, alive)
        new = {}
        for name, s in alive.items():
            k = kept_count(densities[name], s.numel())
            if k > remaining[name]:
                raise ValueError(f"layer {name!r} keeps {remaining[name]} weights, so it cannot be pruned to "
                                 f"{k} ({densities[name]:.4g} of {s.numel()}): masks only shrink")
            new[name] = top_k_mask(s, k)
    elif scope == "global":
        if isinstance(density, Mapping):
            raise ValueError("scope='global' takes one density for the whole model, not one per layer")
        flat = torch.cat([s.flatten() for s in alive.values()])
        k = kept_count(check_density(density), flat.numel())
        if k > sum(remaining.values()):
            raise ValueError(f"the layers keep {sum(remaining.values())} weights, so they cannot be pruned to {k} "
                             f"({density:.4g} of {flat.numel()}): masks only shrink")
        keep = top_k_mask(flat, k)
        sizes = [s.numel() for s in alive.values()]
        new = {name: part.view_as(s) for (name, s), part in zip(alive.items(), keep.split(sizes))}
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")

    attach_masks(model, new)
    set_masks(model, new, optimizer)
    return new
