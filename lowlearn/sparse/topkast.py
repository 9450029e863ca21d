"""Top-KAST: sparse forward pass, slightly less sparse backward pass.

Jayakumar, Pascanu, Rae, Osindero & Elsen (2020), "Top-KAST: Top-K always sparse
training" (NeurIPS). The dense parameters ``θ`` are kept, but no step ever uses all
of them:

* the forward pass uses the set ``A`` of the ``D`` largest-magnitude weights of
  each layer (``forward_density`` ``D``): ``w = θ ⊙ 1_A``;
* the backward pass updates the larger set ``B ⊇ A`` of the ``D + M`` largest
  (``backward_density`` ``D + M``): ``∂L/∂θ = ∂L/∂w ⊙ 1_B``, so weights just
  outside ``A`` keep learning and can earn their way in;
* weights outside ``B`` are frozen (no gradient, their optimizer state reset to a new parameter's):
  they keep their values and can re-enter when others shrink past them;
* an *exploration penalty* keeps the sets from freezing: ``|θ_i|`` for ``i ∈ A``,
  ``|θ_i| / D`` for ``i ∈ B \\ A`` (:meth:`TopKAST.penalty`; add it to the loss), so a
  weight that only the backward pass uses must be worth ``1/D`` times more to
  stay.

The sets are chosen by ``topk`` of ``|θ|``, not by dropping and growing (the
sets follow the weights, whatever moved them), so Top-KAST does not use
:func:`~lowlearn.sparse.update.drop_and_grow`; it shares the step counting and
checkpointing of :class:`~lowlearn.sparse.dst.Sparsifier`. Refreshing the sets every
step costs a ``topk`` over every layer; ``every`` refreshes them less often.

``A`` is the layer's :class:`~lowlearn.sparse.mask.Mask` (a :class:`~lowlearn.sparse.mask.SplitMask`),
so :func:`~lowlearn.sparse.mask.masks_of`, :func:`~lowlearn.sparse.mask.density` and
:func:`~lowlearn.sparse.mask.squash` see the forward network. Unlike the other
methods the weights outside ``A`` are not zero, and do not become zero: use the
penalty rather than the optimizer's weight decay, which would shrink the frozen
weights too (a non-zero weight decay is refused).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checks import check_count
from ..optim_state import reset_optimizer_state
from ..reparam import register
from .dst import Distribution, Sparsifier, layer_densities_for, sparse_layers
from .mask import SplitMask, find_mask, raw_weight, refuse_weight_decay, unchanged_since, version_stamp
from .prune import check_density, kept_count, top_k_mask


class TopKAST(Sparsifier):
    """Top-K Always Sparse Training (Jayakumar et al. 2020): see the module docstring.

    Args:
        model: the model; every ``nn.Linear``/``nn.Conv2d`` weight (or ``layers``)
            gets a :class:`~lowlearn.sparse.mask.SplitMask`. Its biases and norm layers stay dense.
        optimizer: any ``torch.optim`` optimizer, with weight decay 0. ``None`` only for
            an optimizer without state (SGD without momentum): a weight that leaves ``B``
            would go on moving by the momentum or moments nobody zeroed.
        forward_density: ``D``, the global fraction of weights in ``A``.
        backward_density: ``D + M``, the global fraction in ``B`` (at least ``D``).
        every: steps between refreshes of ``A`` and ``B``.
        end: the last step that refreshes them (default: never stop).
        distribution: layer-wise densities of both sets, a name or a function (see
            :func:`~lowlearn.sparse.dst.layer_densities_for`); default ``"uniform"``,
            as in the paper.
        layers: qualified names of the layers to sparsify.
        seed: seeds the generator (Top-KAST itself draws nothing at random).

    Raises:
        ValueError: densities outside (0, 1] or ``backward_density < forward_density``,
            ``every < 1``, ``end < every``, no layer to sparsify, a frozen layer (``requires_grad=False``),
            a layer that already has a mask, an optimizer with weight decay on a sparsified weight, or a
            ``seed`` that is not an int >= 0.
        KeyError: a name in ``layers`` that is not a module of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        forward_density: float,
        backward_density: float,
        *,
        every: int = 100,
        end: int | None = None,
        distribution: Distribution = "uniform",
        layers: list[str] | None = None,
        seed: int = 0,
    ):
        check_density(forward_density, "forward_density")
        check_density(backward_density, "backward_density")
        if backward_density < forward_density:
            raise ValueError(f"backward_density ({backward_density}) must be at least forward_density "
                             f"({forward_density}): the backward set B contains the forward set A")
        check_count("every (steps between refreshes of the sets)", every, 1)
        if end is not None:
            check_count("end (the last step that refreshes the sets, or None)", end, 1)
            if end < every:
                raise ValueError(f"end ({end}) comes before the first refresh, at step every ({every}): the sets "
                                 "would never change (static sparsity); raise end or lower every")
        check_count("seed", seed, 0)
        chosen = sparse_layers(model, layers, "Top-KAST", "chooses their sets A and B by the magnitudes that "
                               "training moves (frozen, they would keep their first sets: a one-off magnitude pruning)")
        for name, layer in chosen.items():
            if find_mask(layer) is not None:
                raise ValueError(f"layer {name!r} already has a mask; Top-KAST needs an unmasked model")
        if optimizer is not None:
            refuse_weight_decay(optimizer, [raw_weight(layer) for layer in chosen.values()],
                                "Top-KAST keeps the weights outside B frozen (add sparsifier.penalty() to the loss "
                                "instead)")
        if isinstance(distribution, Mapping):
            raise ValueError("Top-KAST needs the layer-wise densities of two sets, A and B: pass a distribution "
                             "name or a function (model, density) -> {layer: density}, not one mapping")
        names = list(chosen)
        self._penalty_cache: dict[str, tuple] = {}
        self.forward_densities = layer_densities_for(model, forward_density, distribution, names)
        self.backward_densities = layer_densities_for(model, backward_density, distribution, names)
        for layer in chosen.values():
            keep = torch.ones_like(layer.weight, dtype=torch.bool)
            register(layer, "weight", SplitMask(keep, keep, layer.weight.dtype))
        super().__init__(model, optimizer, chosen, seed)
        self.forward_density, self.backward_density = forward_density, backward_density
        self.every, self.end = every, end
        self.refresh()

    @staticmethod
    def dense_weight(layer: nn.Module) -> Tensor:
        """The layer's weight ``θ`` before the Top-KAST mask: the raw weight through any earlier
        parametrization (e.g. Powerpropagation's ``θ = φ|φ|^(α−1)``), differentiable."""
        weight = raw_weight(layer)
        for parametrization in layer.parametrizations.weight:
            if isinstance(parametrization, SplitMask):
                return weight
            weight = parametrization(weight)
        return weight

    def refresh(self) -> None:
        """Choose ``A`` and ``B`` anew: the top ``D`` and ``D + M`` of every layer's ``|θ|``.

        The optimizer state outside ``B`` is reset to a new parameter's (zero momentum and moments), so frozen
        weights stay where they are.
        """
        with torch.no_grad():
            for name, layer in self.layers().items():
                theta, mask = raw_weight(layer), find_mask(layer)
                magnitude = self.dense_weight(layer).abs()
                k_forward = kept_count(self.forward_densities[name], theta.numel())
                k_backward = max(k_forward, kept_count(self.backward_densities[name], theta.numel()))
                backward = top_k_mask(magnitude, k_backward)
                # A ⊆ B: the top-k_forward of |θ| restricted to B are the top-k_forward overall.
                forward = top_k_mask(magnitude.masked_fill(~backward, -1.0), k_forward)
                mask.mask.copy_(forward)
                mask.backward_mask.copy_(backward)
                if self.optimizer is not None:
                    reset_optimizer_state(self.optimizer, theta, backward)

    def _after_step(self) -> None:
        if self.steps % self.every == 0 and (self.end is None or self.steps <= self.end):
            self.refresh()

    def penalty(self, p: int = 1) -> Tensor:
        """The exploration penalty ``Σ_{i∈A} |θ_i|^p + Σ_{i∈B\\A} |θ_i|^p / D``.

        Add it to the loss, times a small coefficient. ``D`` is each layer's forward
        density; ``θ`` is :meth:`dense_weight` (under Powerpropagation the effective
        weight, not ``φ``). ``p=1`` is the penalty as the paper writes it; ``p=2`` its
        squared (weight-decay) form. Outside ``B`` the penalty is zero, like the gradient.
        For a half-precision model it is computed in float32: ``1/D`` and the sum would
        overflow. The per-weight factors (``1``, ``1/D``, ``0``) are kept between calls, one
        tensor of the weight's size per layer, and made again when the sets change: a
        call then costs three passes over the weights instead of six.

        Raises:
            ValueError: ``p`` other than 1 or 2.
        """
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        total = None
        for name, layer in self.layers().items():
            theta = self.dense_weight(layer)
            size = theta.abs() if p == 1 else theta.square()
            term = (size * self._penalty_weights(name, find_mask(layer))).sum()
            total = term if total is None else total + term
        return total

    def _penalty_weights(self, name: str, mask: SplitMask) -> Tensor:
        """``1`` on ``A``, ``1/D`` on ``B \\ A``, ``0`` elsewhere: float32 at least (``1/D`` overflows in fp16).

        Kept until the masks change: a refresh or a loaded ``state_dict`` writes them in place,
        and moving the model replaces them (:func:`~lowlearn.sparse.mask.unchanged_since`).
        """
        a, b = mask.mask, mask.backward_mask
        cached = self._penalty_cache.get(name)
        if cached is not None and unchanged_since(a, cached[0]) and unchanged_since(b, cached[1]):
            return cached[2]
        weights = a.to(torch.promote_types(a.dtype, torch.float32))
        weights = weights + (b.to(weights.dtype) - weights) / self.forward_densities[name]
        self._penalty_cache[name] = (version_stamp(a), version_stamp(b), weights)
        return weights

    def backward_masks(self) -> dict[str, Tensor]:
        """``{name: boolean B}`` (the forward sets are :func:`~lowlearn.sparse.mask.masks_of`)."""
        return {name: find_mask(layer).backward_mask != 0 for name, layer in self.layers().items()}

    def state_dict(self) -> dict:
        """Steps and generator, and the layer-wise densities of ``A`` and ``B`` (the sets are in the model's
        ``state_dict``)."""
        return {**super().state_dict(), "forward_densities": dict(self.forward_densities),
                "backward_densities": dict(self.backward_densities)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; load the model's state (the sets) too.

        Raises:
            ValueError: a state another method saved, or one of other layers or other densities of ``A`` or
                ``B`` (the next refresh and the penalty would silently switch to this one's); nothing is
                restored then. A state that holds no densities (of earlier versions) is not checked.
        """
        self._check_saved_by(state)
        for key, own in (("forward_densities", self.forward_densities),
                         ("backward_densities", self.backward_densities)):
            if key in state and dict(state[key]) != own:
                raise ValueError(f"the state's {key} are {dict(state[key])}, but this TopKAST's are {own}: build "
                                 "it with the forward_density, backward_density, distribution and layers of the "
                                 "TopKAST that saved it")
        super().load_state_dict(state)
