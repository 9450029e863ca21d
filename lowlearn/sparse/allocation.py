"""Layer-wise density allocations: how a global budget of weights is shared among layers.

Each function takes a model and a global target density ``d ∈ (0, 1]`` (the
fraction of weights kept) and returns ``{layer name: density d_l}`` with

    Σ_l d_l · n_l = d · N,    N = Σ_l n_l,

``n_l`` the number of weights of layer ``l``. Pass the result to
:func:`lowlearn.sparse.prune.prune` (``scope="layer"``), which keeps
``round(d_l · n_l)`` weights per layer, so the model keeps ``d · N`` weights to
within one weight per layer.

The layers are :func:`~lowlearn.sparse.scores.scored_layers`: the masked layers, or
every ``nn.Linear`` and ``nn.Conv2d`` of a model without masks (or the ``layers``
named). A layer's weight has shape ``(n_out, n_in)`` (Linear) or
``(n_out, n_in, k_h, k_w)`` (Conv2d; ``n_in`` is per group for grouped convolutions).

* :func:`uniform`: the same density everywhere, optionally with a dense first layer.
* :func:`erdos_renyi`: ``d_l ∝ (n_in + n_out) / (n_in · n_out)`` (Mocanu et al. 2018).
* :func:`erk`: ``d_l ∝ (n_in + n_out + k_h + k_w) / (n_in · n_out · k_h · k_w)``
  (Evci et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from ..checks import check_flag
from .mask import raw_weight
from .prune import check_density
from .scores import scored_layers


def _shapes(model: nn.Module, layers: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(raw_weight(layer).shape) for name, layer in scored_layers(model, layers).items()}
    if not shapes:
        raise ValueError("the model has no Linear or Conv2d layer to allocate a density to")
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"layer {name!r} has a weight of shape {shape}; an allocation needs "
                             "(n_out, n_in, ...) weights: pass layers= without it")
    return shapes


def uniform(
    model: nn.Module,
    density: float,
    dense_first: bool = False,
    layers: Iterable[str] | None = None,
) -> dict[str, float]:
    """Every layer at density ``d``; or the first layer dense and the others at ``d'``.

    With ``dense_first=True`` the first layer (in ``model.named_modules()`` order, the
    input layer of the models of :mod:`lowlearn.models`) keeps all its ``n_1`` weights,
    as in the uniform allocation of Evci et al. (2020, RigL; see :func:`erk`): pruning
    it hurts accuracy much and saves little. Unlike there, the others share what is
    left of the budget, ``d' = (d·N − n_1) / (N − n_1)``, so the model still keeps
    ``d · N`` weights.

    Raises:
        ValueError: ``density`` outside (0, 1]; with ``dense_first``, a budget ``d · N``
            that the first layer alone already uses up; a layer whose weight is not at least
            2-D (e.g. a norm layer named in ``layers``), or no layer at all.
        KeyError: a name in ``layers`` that is not a module of the model.
        TypeError: ``dense_first`` other than ``True`` or ``False``.
    """
    density = check_density(density)
    dense_first = check_flag("dense_first", dense_first)
    shapes = _shapes(model, layers)
    if not dense_first:
        return dict.fromkeys(shapes, density)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    first, total = next(iter(sizes)), sum(sizes.values())
    rest = total - sizes[first]
    if density == 1.0:
        return dict.fromkeys(sizes, 1.0)
    if density * total <= sizes[first]:
        raise ValueError(f"at density {density:.4g} the model keeps {density * total:.0f} of {total} weights, "
                         f"but its first layer {first!r} alone has {sizes[first]}: raise the density to more "
                         f"than {sizes[first] / total:.4g}, or pass dense_first=False")
    others = (density * total - sizes[first]) / rest
    return {name: 1.0 if name == first else others for name in sizes}


def _proportional(sizes: dict[str, int], raw: dict[str, float], density: float) -> dict[str, float]:
    """Densities ``d_l = min(1, ε · r_l)`` with ``Σ_l d_l · n_l = d · N``.

    ``r_l`` (``raw``) is the layer's shape score. Solve ``ε`` for the layers not yet
    dense, ``ε = (d·N − Σ_dense n_l) / Σ_rest r_l n_l``; make every layer with
    ``ε · r_l > 1`` dense and solve again, until none exceeds 1. Each round raises ``ε``
    (a layer made dense takes ``n_l < ε r_l n_l`` weights from the budget), so a layer
    over 1 stays over 1, and making all of them dense at once gives the same result as
    the one-at-a-time loop of Evci et al.'s ``sparse_utils.py``.
    """
    dense: set[str] = set()
    total = sum(sizes.values())
    while True:
        rest = [name for name in sizes if name not in dense]
        if not rest:   # d = 1, up to rounding
            return dict.fromkeys(sizes, 1.0)
        eps = (density * total - sum(sizes[name] for name in dense)) / sum(raw[name] * sizes[name] for name in rest)
        over = {name for name in rest if eps * raw[name] > 1.0}
        if not over:
            return {name: 1.0 if name in dense else eps * raw[name] for name in sizes}
        dense |= over


def erdos_renyi(model: nn.Module, density: float, layers: Iterable[str] | None = None) -> dict[str, float]:
    """Erdős–Rényi allocation: ``d_l = ε · (n_in + n_out) / (n_in · n_out)``, kernel size ignored.

    Mocanu et al. (2018), "Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science" (Nature
    Communications, SET), eq. 1, where ``ε`` sets the density; here ``ε`` is solved so
    that the model keeps ``d · N`` weights, and layers that would exceed density 1 are
    made dense, with ``ε`` solved again for the others (as in :func:`erk`). Small
    layers keep more of their weights than large ones.

    Raises:
        ValueError: ``density`` outside (0, 1], a layer whose weight is not at least 2-D
            (e.g. a norm layer named in ``layers``), or no layer at all.
        KeyError: a name in ``layers`` that is not a module of the model.
    """
    density = check_density(density)
    shapes = _shapes(model, layers)
    raw = {name: (shape[0] + shape[1]) / (shape[0] * shape[1]) for name, shape in shapes.items()}
    return _proportional({name: math.prod(shape) for name, shape in shapes.items()}, raw, density)


def erk(model: nn.Module, density: float, layers: Iterable[str] | None = None) -> dict[str, float]:
    """Erdős–Rényi-Kernel allocation of RigL.

    Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the lottery: making all tickets
    winners" (ICML), section 3 and ``get_sparsities_erdos_renyi`` of
    ``google-research/rigl/rigl/sparse_utils.py``: the density of a layer scales with

        r_l = (n_in + n_out + k_h + k_w) / (n_in · n_out · k_h · k_w)   (Conv2d),
        r_l = (n_in + n_out) / (n_in · n_out)                           (Linear),

    i.e. the sum of the weight's dimensions over their product. ``d_l = ε · r_l`` with
    ``ε`` chosen so that ``Σ_l d_l · n_l = d · N`` exactly; a layer whose density would
    exceed 1 is made dense and ``ε`` is solved again for the others, repeatedly, until
    no density exceeds 1.

    Raises:
        ValueError: ``density`` outside (0, 1], a layer whose weight is not at least 2-D
            (e.g. a norm layer named in ``layers``), or no layer at all.
        KeyError: a name in ``layers`` that is not a module of the model.
    """
    density = check_density(density)
    shapes = _shapes(model, layers)
    raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    return _proportional({name: math.prod(shape) for name, shape in shapes.items()}, raw, density)
