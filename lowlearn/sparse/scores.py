"""Saliency scores: how important is each weight? Higher means keep.

Every score is a plain function of a model (and, for data-dependent scores, a
batch) that returns ``{layer name: tensor of the weight's shape}``, ready for
:func:`lowlearn.sparse.prune.prune`. Scores are computed on the *effective* weight
``layer.weight``: the masked weight, and the exponentiated one under
Powerpropagation.

The layers scored are the masked layers of the model, or, in a model without
masks, every ``nn.Linear`` and ``nn.Conv2d`` (:func:`~lowlearn.sparse.mask.prunable_layers`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .mask import masked_layers, prunable_layers


def scored_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a score covers: the masked layers, or every prunable layer if none is masked."""
    return masked_layers(model) or prunable_layers(model)


@torch.no_grad()
def magnitude(model: nn.Module) -> dict[str, Tensor]:
    """``|w|``: the data-oblivious criterion of Han et al. (2015), "Learning both weights
    and connections for efficient neural networks" (NeurIPS), and of the lottery-ticket
    procedure (Frankle & Carbin 2019)."""
    return {name: layer.weight.abs() for name, layer in scored_layers(model).items()}


@torch.no_grad()
def random(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Uniform random scores: the baseline every criterion must beat.

    ``generator`` (on the model's device) makes the scores reproducible.
    """
    return {name: torch.rand(layer.weight.shape, generator=generator, device=layer.weight.device)
            for name, layer in scored_layers(model).items()}
