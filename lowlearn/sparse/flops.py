"""The arithmetic cost of sparse networks, as Evci et al. (2020) count it.

Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the lottery: making all
tickets winners" (RigL, ICML), compare sparse training methods by their FLOPs
(the ResNet-50 table, and the appendix that explains the counts). With ``F_l`` the dense cost of layer ``l`` for one
example (:func:`lowlearn.cost.count_flops`) and ``d_l`` its density:

* inference ``f_S = Σ_l d_l · F_l``; a layer without a density counts dense;
* static sparse training (fixed mask: SET's and RigL's steps between mask
  updates, a lottery ticket's retraining) costs ``3 · f_S`` per example: the
  forward pass, and the two backward products (for the activations and for the
  weights), all sparse (:func:`lowlearn.cost.training_flops` for the dense case);
* dense-to-sparse pruning costs the average of ``3 · f_S(d_t)`` over the training
  steps ``t``, as the density ``d_t`` falls;
* dynamic sparse training (:func:`dst_training_flops`) adds what each method's
  mask updates cost: RigL a dense weight gradient every ``ΔT`` steps, SNFS one
  every step, Top-KAST a backward pass over its larger set ``B``.

Units: multiply-accumulates (MACs) per example, as in :mod:`lowlearn.cost`; one
``a += w · x`` is one operation. RigL counts the multiply and the add apart, so
its tables are about ``2 ×`` these numbers; ratios to the dense model
(``relative_to_dense=True``), which is how RigL reports training FLOPs, are the
same in both conventions, up to RigL's counter also counting one operation per
activation output, which no sparsity removes (its ratios at high sparsity are
slightly higher).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..checks import as_float, check_count, check_flag, is_real
from ..cost import FlopCount, count_flops, recurrent_weights, training_flops
from .mask import kept_fraction, layer_densities

Densities = float | Mapping[str, float]


def _check_densities(flop_count: FlopCount, densities: Densities) -> Mapping[str, float]:
    if not isinstance(flop_count, FlopCount):
        raise TypeError(f"flop_count must be the dense costs lowlearn.cost.count_flops(model, example_input), got "
                        f"{type(flop_count).__name__} (for a masked model, model_sparse_flops counts both)")
    if not isinstance(densities, Mapping):
        densities = dict.fromkeys(flop_count.per_layer, densities)
    unknown = set(densities) - set(flop_count.per_layer)
    if unknown:
        raise KeyError(f"no FLOPs counted for layers {sorted(unknown)}; the counted layers are: "
                       f"{', '.join(flop_count.per_layer) or 'none'}")
    for name, d in densities.items():
        if not is_real(d) or not 0.0 <= d <= 1.0:
            raise ValueError(f"the density of {name!r} must be in [0, 1] (the fraction of weights kept), got {d!r}")
    return densities


def _relative(macs: float, dense: float) -> float:
    """``macs / dense``, refusing a model whose dense count is zero (no layer was counted)."""
    if dense == 0:
        raise ValueError("the FLOP count has no counted layer (its dense total is 0), so there is nothing to compare "
                         "with: count a model with layers that lowlearn.cost.count_flops counts, or pass "
                         "relative_to_dense=False")
    return macs / dense


def sparse_inference_flops(flop_count: FlopCount, densities: Densities, *,
                           relative_to_dense: bool = False) -> float:
    """``f_S = Σ_l d_l · F_l``: MACs of one sparse forward pass per example.

    Args:
        flop_count: the dense costs ``F_l`` from :func:`lowlearn.cost.count_flops`.
        densities: ``{layer name: d_l}`` (e.g. :func:`~lowlearn.sparse.mask.layer_densities`),
            or one density for every counted layer. Layers not named count dense.
        relative_to_dense: return ``f_S / f_D`` instead, with ``f_D`` the dense total.

    Raises:
        KeyError: a layer that ``flop_count`` does not count.
        ValueError: a density outside [0, 1], or ``relative_to_dense`` for a count without layers.
        TypeError: ``relative_to_dense`` other than ``True`` or ``False``.
    """
    relative_to_dense = check_flag("relative_to_dense", relative_to_dense)
    densities = _check_densities(flop_count, densities)
    sparse = sum(densities.get(name, 1.0) * macs for name, macs in flop_count.per_layer.items())
    return _relative(sparse, flop_count.total) if relative_to_dense else sparse


def sparse_training_flops(flop_count: FlopCount, densities: Densities, *,
                          relative_to_dense: bool = False) -> float:
    """``3 · f_S``: MACs of one static sparse training step per example (as RigL counts SET and static sparse training).

    Arguments as for :func:`sparse_inference_flops`; relative to dense training
    (``3 · f_D``) the ratio equals the inference ratio.
    """
    relative_to_dense = check_flag("relative_to_dense", relative_to_dense)
    sparse = 3 * sparse_inference_flops(flop_count, densities)
    return _relative(sparse, training_flops(flop_count)) if relative_to_dense else sparse


def pruning_training_flops(
    flop_count: FlopCount,
    density_schedule: Sequence[Densities],
    steps: Sequence[int] | None = None,
    *,
    relative_to_dense: bool = False,
) -> float:
    """Mean MACs per example of a training step while pruning from dense to sparse.

    ``Σ_t s_t · 3 f_S(d_t) / Σ_t s_t``: the densities ``d_t`` of a pruning run
    (e.g. gradual magnitude pruning, Zhu & Gupta 2017, "To prune, or not to
    prune", arXiv:1710.01878), each held for ``s_t`` steps, weigh the static cost at
    that density; RigL counts its pruning baselines this way. A
    constant schedule costs what :func:`sparse_training_flops` gives.

    Args:
        flop_count: the dense costs from :func:`lowlearn.cost.count_flops`.
        density_schedule: the densities of each step, or of each segment of
            ``steps`` steps: a ``{layer name: d}`` (``{}`` = dense) or one
            number per entry.
        steps: how many steps each entry lasts; default one each.
        relative_to_dense: divide by the cost of dense training, ``3 · f_D``.

    Raises:
        ValueError: an empty schedule, ``steps`` of another length, ``steps`` that are
            negative, not finite or all zero, or a density outside [0, 1].
        KeyError: a layer that ``flop_count`` does not count.
        TypeError: ``relative_to_dense`` other than ``True`` or ``False``.
    """
    relative_to_dense = check_flag("relative_to_dense", relative_to_dense)
    if len(density_schedule) == 0:
        raise ValueError("the density schedule is empty")
    steps = [1] * len(density_schedule) if steps is None else list(steps)
    if (len(steps) != len(density_schedule) or not all(0 <= as_float(s) < math.inf for s in steps)
            or sum(steps) == 0):
        raise ValueError(f"steps must give a non-negative length to each of the {len(density_schedule)} "
                         f"schedule entries, not all zero; got {steps}")
    total = sum(s * sparse_training_flops(flop_count, d) for s, d in zip(steps, density_schedule))
    mean = total / sum(steps)
    return _relative(mean, training_flops(flop_count)) if relative_to_dense else mean


def model_sparse_flops(model: nn.Module, example_input: torch.Tensor | PackedSequence | tuple[torch.Tensor, ...], *,
                       batch_dim: int | tuple[int, ...] = 0, relative_to_dense: bool = False) -> float:
    """:func:`sparse_inference_flops` of a sparse model: its masks, or the zeros of its weights.

    The dense costs come from :func:`lowlearn.cost.count_flops` on
    ``example_input`` (a batch on the model's device, a ``PackedSequence``, or a tuple of the
    model's inputs, each such a batch, its examples along ``batch_dim`` as there). A masked
    layer's density is its mask's (:func:`~lowlearn.sparse.mask.layer_densities`); any other counted
    layer with a ``weight`` counts its nonzero weights, so a model whose masks were
    made permanent (:func:`~lowlearn.sparse.mask.squash`) or pruned with
    ``torch.nn.utils.prune`` costs what its zeros save; so does a recurrent layer
    (``nn.LSTM``, ...), which takes no mask, by the nonzero entries of its weight
    matrices (:func:`~lowlearn.cost.recurrent_weights`). A layer that counts its own
    MACs (``count_macs``, e.g. the exported layers of :mod:`lowlearn.sparse.export`)
    is taken at its count. Multiply by 3 (:func:`sparse_training_flops`) for a
    training step.

    Raises:
        KeyError: a masked layer whose FLOPs :func:`~lowlearn.cost.count_flops` does not
            count (it counts the layers of :data:`~lowlearn.cost.COUNTED` and those with
            ``count_macs`` that the example runs through).
        TypeError: ``relative_to_dense`` other than ``True`` or ``False``.
    """
    relative_to_dense = check_flag("relative_to_dense", relative_to_dense)
    flop_count, densities = count_flops(model, example_input, batch_dim=batch_dim), layer_densities(model)
    modules = dict(model.named_modules())
    for name in flop_count.per_layer.keys() - densities.keys():
        module = modules[name]
        weights = recurrent_weights(module) if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) else \
            [getattr(module, "weight", None)]
        if all(isinstance(weight, torch.Tensor) for weight in weights) and not hasattr(module, "count_macs"):
            densities[name] = kept_fraction(int(sum(weight.count_nonzero() for weight in weights)),
                                            sum(weight.numel() for weight in weights))
    return sparse_inference_flops(flop_count, densities, relative_to_dense=relative_to_dense)


DST_METHODS = ("dense", "static", "set", "rigl", "snfs", "topkast")


def dst_training_flops(
    flop_count: FlopCount,
    densities: Densities,
    method: str,
    *,
    every: int = 100,
    backward_densities: Densities | None = None,
    relative_to_dense: bool = False,
) -> float:
    """MACs per example of one training step of a dynamic sparse training method, averaged over steps.

    With ``f_S`` the sparse forward cost (:func:`sparse_inference_flops` at
    ``densities``) and ``f_D`` the dense one, a training step is a forward pass, the
    gradient with respect to the activations and the gradient with respect to the
    weights (Evci et al. 2020, appendix H):

    * ``"dense"``: ``3 f_D``;
    * ``"static"`` and ``"set"``: ``3 f_S`` (SET's random growth costs no FLOPs);
    * ``"rigl"``: ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``: every ``ΔT`` steps
      (``every``) one step computes the weight gradient densely, to grow by it;
    * ``"snfs"``: ``2 f_S + f_D``: the momentum needs the dense weight gradient at
      every step (Dettmers & Zettlemoyer 2019);
    * ``"topkast"``: ``2 f_A + f_B``: forward and activation gradient with the
      forward set ``A`` (``densities``), weight gradient over the backward set ``B``
      (``backward_densities``; Jayakumar et al. 2020).

    The costs of sorting (``topk``) and of the element-wise updates are left out,
    as in the papers; they do not grow with the batch.

    Args:
        flop_count: dense costs from :func:`lowlearn.cost.count_flops`.
        densities: ``{layer: d_l}`` or one density (the forward densities for Top-KAST).
        method: one of ``"dense"``, ``"static"``, ``"set"``, ``"rigl"``, ``"snfs"``, ``"topkast"``.
        every: RigL's ``ΔT``.
        backward_densities: Top-KAST's ``B`` densities (required for it).
        relative_to_dense: divide by dense training, ``3 f_D``.

    Raises:
        ValueError: an unknown method, ``every < 1``, Top-KAST without ``backward_densities``
            or with a backward density below the forward one, ``backward_densities``
            for another method, a density outside [0, 1], or ``relative_to_dense`` for a
            count without layers.
        KeyError: a layer that ``flop_count`` does not count.
        TypeError: ``relative_to_dense`` other than ``True`` or ``False``.
    """
    relative_to_dense = check_flag("relative_to_dense", relative_to_dense)
    if method not in DST_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DST_METHODS)}")
    if backward_densities is not None and method != "topkast":
        raise ValueError(f"backward_densities are the densities of Top-KAST's backward set; {method!r} has none "
                         "(its weight gradient is as sparse as its forward pass, or dense): leave them out")
    check_count("every (ΔT)", every, 1)
    f_s = sparse_inference_flops(flop_count, densities)          # checks flop_count's type first
    f_d = flop_count.total
    if method == "dense":
        macs = 3 * f_d
    elif method in ("static", "set"):
        macs = 3 * f_s
    elif method == "rigl":
        macs = (3 * f_s * every + 2 * f_s + f_d) / (every + 1)
    elif method == "snfs":
        macs = 2 * f_s + f_d
    else:
        if backward_densities is None:
            raise ValueError("Top-KAST's cost needs backward_densities (the densities of the backward set B)")
        forward, backward = _check_densities(flop_count, densities), _check_densities(flop_count, backward_densities)
        thinner = [name for name in flop_count.per_layer if backward.get(name, 1.0) < forward.get(name, 1.0)]
        if thinner:
            raise ValueError(f"Top-KAST's backward set B contains its forward set A, so a layer's backward density "
                             f"is at least its forward density; not so for {thinner}")
        macs = 2 * f_s + sparse_inference_flops(flop_count, backward)
    return _relative(macs, training_flops(flop_count)) if relative_to_dense else macs
