"""Schedules: iterative and gradual pruning, and the mask updates of dynamic sparse training.

* :func:`geometric_densities`: the densities of iterative magnitude pruning, which
  removes the same fraction ``p`` of the surviving weights every round (Frankle &
  Carbin 2019, "The lottery ticket hypothesis", ICLR).
* :func:`iterative_pruning`: Han et al.'s (2015) prune-and-fine-tune rounds along those
  densities (Han et al. prune by a threshold per layer instead: a quality parameter
  times the standard deviation of the layer's weights).
* :func:`cubic_density` and :class:`GradualPruning`: the gradual schedule of Zhu &
  Gupta (2017), applied every few steps during :func:`lowlearn.train.fit`.
* :class:`UpdateSchedule`: when dynamic sparse training drops and regrows weights,
  and what fraction (RigL's cosine decay; Evci et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_count, check_flag, is_integer, is_real
from ..distributed import world
from .mask import find_mask, masks_or_ones, nonzero_counts
from .prune import check_density, prune
from .scores import check_score_function, magnitude

Allocation = Callable[[nn.Module, float], Mapping[str, float]]


def geometric_densities(final_density: float, rounds: int) -> list[float]:
    """Densities after each of ``rounds`` rounds that each remove a fraction ``p`` of the survivors.

    ``d_r = (1 − p)^r`` for ``r = 1, ..., R`` with ``(1 − p)^R = final_density``, i.e.
    ``p = 1 − final_density^(1/R)`` and ``d_r = final_density^(r/R)``. The last entry
    is ``final_density`` exactly. For example ``geometric_densities(0.2**3, 3)`` is
    ``[0.2, 0.04, 0.008]`` up to rounding (Frankle & Carbin prune ``p = 20%`` per
    round: ``geometric_densities(0.8**R, R)``).

    Raises:
        ValueError: ``final_density`` outside (0, 1] or ``rounds`` not a positive integer.
    """
    final_density = check_density(final_density, "final_density")
    check_count("rounds", rounds, 1)
    return [final_density ** (r / rounds) for r in range(1, rounds)] + [final_density]


def _check_scope(scope: str, allocation: Allocation | None) -> None:
    """Raise a ValueError for an unknown ``scope``, or an ``allocation`` with ``scope="global"``."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if allocation is not None and scope != "layer":
        raise ValueError("an allocation gives one density per layer: use it with scope='layer'")


def iterative_pruning(
    model: nn.Module,
    final_density: float,
    rounds: int,
    fine_tune: Callable[[nn.Module, int], Any],
    *,
    score: Callable[[nn.Module], Mapping[str, Tensor]] = magnitude,
    scope: str = "global",
    allocation: Allocation | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Any:
    """Prune and fine-tune in ``rounds`` rounds, each removing the same fraction of the survivors.

    Han, Pool, Tran & Dally (2015), "Learning both weights and connections for
    efficient neural networks" (NeurIPS): prune the trained network a little, retrain
    the survivors, and repeat. Round ``r = 1, ..., R`` prunes the model with
    :func:`~lowlearn.sparse.prune.prune` to ``d_r = final_density^(r/R)``
    (:func:`geometric_densities`) by ``score(model)``, then calls ``fine_tune(model, r)``,
    which trains the model in place. The weights carry over from round to round;
    :func:`~lowlearn.sparse.lottery.iterative_magnitude_pruning` instead rewinds them
    every round (lottery tickets). Masks only shrink, and after the last round the
    model keeps exactly what ``prune`` keeps at ``final_density``.

    Args:
        model: the trained network; pruned in place (masks are attached if it has none).
        final_density: ``d_R``, the fraction of weights kept at the end.
        rounds: ``R``.
        fine_tune: ``fine_tune(model, r)`` trains the pruned model after round ``r``
            (with a fresh optimizer, or with the one passed as ``optimizer``); what it
            returns after the last round is returned.
        score: ``score(model) → {layer name: scores}``, default magnitude.
        scope: ``"layer"`` or ``"global"`` (see :func:`~lowlearn.sparse.prune.prune`).
        allocation: ``allocation(model, d_r) → {layer name: density}`` for each round
            (e.g. :func:`~lowlearn.sparse.allocation.erk`); layer scope only.
        optimizer: an optimizer that ``fine_tune`` keeps across rounds; its state for
            the weights each round prunes (momentum, Adam's moments) is zeroed then.

    Raises:
        ValueError: ``final_density`` outside (0, 1], ``rounds`` below 1, an unknown
            ``scope``, an ``allocation`` with ``scope="global"``, or one that refuses
            ``final_density``; before anything is pruned.
        TypeError: a ``score`` that is not a function (e.g. scores computed once).
    """
    densities = geometric_densities(final_density, rounds)
    _check_scope(scope, allocation)
    check_score_function("score", score)
    if allocation is not None:
        allocation(model, final_density)           # one it refuses fails now, not after rounds of fine-tuning
    for r, d_r in enumerate(densities, start=1):
        prune(model, score(model), d_r if allocation is None else allocation(model, d_r), scope=scope,
              optimizer=optimizer)
        result = fine_tune(model, r)
    return result


def cubic_density(
    step: int,
    final_density: float,
    begin: int,
    end: int,
    initial_density: float = 1.0,
) -> float:
    """Density at ``step`` of the gradual pruning schedule of Zhu & Gupta (2017).

    Zhu & Gupta (2017), "To prune, or not to prune: exploring the efficacy of pruning
    for model compression" (arXiv:1710.01878), eq. 1, in sparsities ``s = 1 − d``:

        s_t = s_f + (s_i − s_f) · (1 − (t − t_0) / (n Δt))³,

    with ``t = step``, ``t_0 = begin``, ``t_0 + n Δt = end``, ``s_i = 1 − initial_density``,
    ``s_f = 1 − final_density``. Before ``begin`` the density is ``initial_density``,
    from ``end`` on it is ``final_density``; in between it falls fast at first and
    slowly near the end, when fewer weights are left to remove.

    Raises:
        ValueError: a density outside (0, 1], ``final_density > initial_density``,
            a ``step`` that is not an integer, ``begin`` or ``end`` not an integer >= 0,
            or ``end < begin``.
    """
    if not is_integer(step):
        raise ValueError(f"step must be an int; got {step!r}")
    check_count("begin", begin, 0)
    check_count("end", end, 0)
    final_density = check_density(final_density, "final_density")
    initial_density = check_density(initial_density, "initial_density")
    if final_density > initial_density:
        raise ValueError(f"final_density ({final_density}) must not exceed initial_density "
                         f"({initial_density}): pruning only removes weights")
    if end < begin:
        raise ValueError(f"end ({end}) must not come before begin ({begin})")
    if step >= end:                 # first: with begin == end, the schedule is one pruning step at end
        return final_density
    if step <= begin:
        return initial_density
    s_i, s_f = 1.0 - initial_density, 1.0 - final_density
    return 1.0 - (s_f + (s_i - s_f) * (1.0 - (step - begin) / (end - begin)) ** 3)


class GradualPruning:
    """Prune during training along :func:`cubic_density`: a callback for :func:`lowlearn.train.fit`.

    At steps ``begin, begin + every, begin + 2·every, ...`` up to ``end``, and at
    ``end`` itself, the model is pruned with :func:`~lowlearn.sparse.prune.prune` to
    ``cubic_density(step, final_density, begin, end, initial_density)`` by
    ``score(model)``; the optimizer's state of the removed weights is zeroed
    (``state.optimizer``). Masks only shrink, and at step ``end`` the model keeps
    exactly what :func:`~lowlearn.sparse.prune.prune` keeps at ``final_density``. ``end`` must not exceed the
    number of training steps for that last pruning to happen. On other steps the
    callback compares two integers: no device work and no host synchronisation.
    (A pruning step reads the device three times, each one transfer for all layers:
    the kept counts, for the schedule and again in :func:`~lowlearn.sparse.prune.prune`,
    and whether any score is NaN.)

    Args:
        final_density: ``d_f = 1 − s_f``.
        begin: ``t_0``, the first pruning step, at least 1 (:func:`~lowlearn.train.fit`
            calls its callbacks after each optimizer step, the first being step 1).
        end: ``t_0 + n Δt``, the last pruning step.
        every: ``Δt``, steps between prunings (Zhu & Gupta use 100 to 1000).
        score: ``score(model) → {layer name: scores}``, default :func:`~lowlearn.sparse.scores.magnitude`;
            for data-dependent scores pass a closure, e.g.
            ``lambda model: snip(model, batch)``, or ``lambda model: movement.scores()``.
        scope: ``"layer"`` or ``"global"`` (see :func:`~lowlearn.sparse.prune.prune`).
        allocation: ``allocation(model, density) → {layer name: density}``, e.g.
            :func:`~lowlearn.sparse.allocation.erk`; layer scope only.
        initial_density: ``d_i = 1 − s_i``.

    A layer (with ``scope="global"``: the scored layers together) already sparser than
    the schedule asks is not pruned further at that step: masks only shrink, so a model
    pruned before, or a run resumed with a fresh step count, goes on from its density.
    A layer that keeps no weight at all (emptied by an earlier global pruning) is left
    out of layer-wise pruning. To resume from a checkpoint, build the model and call
    :func:`~lowlearn.sparse.mask.attach_masks` on it before ``load_state_dict``: the
    saved state holds the masks, which a model without them has no place for. In a
    ``torch.distributed`` process group, attach them before :func:`~lowlearn.train.fit`
    too (see :mod:`lowlearn.distributed`).

    Raises:
        ValueError: bad densities or steps (see :func:`cubic_density`), ``begin`` or
            ``end`` not an integer, ``begin < 1``, ``every < 1``, or an ``allocation`` with
            ``scope="global"``; at the first pruning step, a ``final_density`` the
            ``allocation`` refuses (rather than later in training, when it is reached).
        TypeError: a ``score`` that is not a function (scores themselves, say).
        RuntimeError: at the first pruning step, in a ``torch.distributed`` process group
            of more than one process, a scored layer without a mask: attaching one during
            training gives its weight a new gradient accumulator, which
            ``DistributedDataParallel`` (hooked on the old one) would no longer average.
    """

    def __init__(
        self,
        final_density: float,
        begin: int,
        end: int,
        every: int = 100,
        *,
        score: Callable[[nn.Module], Mapping[str, Tensor]] = magnitude,
        scope: str = "layer",
        allocation: Allocation | None = None,
        initial_density: float = 1.0,
    ):
        check_count("begin (an optimizer step; fit calls its callbacks after steps 1, 2, ...)", begin, 1)
        check_count("end (an optimizer step)", end, 0)
        cubic_density(begin, final_density, begin, end, initial_density)   # validates the arguments
        check_count("every (steps between prunings)", every, 1)
        _check_scope(scope, allocation)
        check_score_function("score", score)
        self.final_density, self.initial_density = final_density, initial_density
        self.begin, self.end, self.every = begin, end, every
        self.score, self.scope, self.allocation = score, scope, allocation

    def prunes_at(self, step: int) -> bool:
        """Whether the model is pruned after optimizer step ``step``."""
        return self.begin <= step <= self.end and ((step - self.begin) % self.every == 0 or step == self.end)

    def __call__(self, state) -> None:
        if not self.prunes_at(state.step):
            return
        if self.allocation is not None and state.step == self.begin:
            self.allocation(state.model, self.final_density)   # a final density it cannot allocate fails now
        d = cubic_density(state.step, self.final_density, self.begin, self.end, self.initial_density)
        scores = self.score(state.model)
        # Masks only shrink: never ask a layer (or, global, the layers together) for more than it keeps.
        left = nonzero_counts(masks_or_ones(state.model, scores))
        if world()[1] > 1 and (unmasked := [name for name in scores
                                            if find_mask(state.model.get_submodule(name)) is None]):
            raise RuntimeError(f"the layers {unmasked} have no mask, and DistributedDataParallel cannot follow a "
                               "mask attached during training: call lowlearn.sparse.attach_masks(model) before fit")
        if self.scope == "global":
            target = min(d, sum(left.values()) / sum(s.numel() for s in scores.values()))
        else:
            wanted = dict.fromkeys(scores, d) if self.allocation is None else self.allocation(state.model, d)
            scores = {name: s for name, s in scores.items() if left[name] > 0}   # an empty layer has nothing to prune
            target = {name: min(density, left[name] / scores[name].numel()) if name in left else density
                      for name, density in wanted.items() if left.get(name) != 0}
        prune(state.model, scores, target, scope=self.scope, optimizer=state.optimizer)


class UpdateSchedule:
    """When dynamic sparse training changes its masks, and how much: RigL's cosine schedule.

    Evci et al. (2020), "Rigging the lottery: making all tickets winners" (ICML),
    eq. 1: the masks change after every ``ΔT`` optimizer steps until ``T_end``, each
    time dropping (and regrowing) a fraction

        f(t) = α/2 · (1 + cos(π t / T_end))

    of every layer's active weights: ``α`` at the start, falling to 0 at ``T_end``.
    The paper's defaults are ``ΔT = 100``, ``α = 0.3`` and ``T_end = ¾`` of training.
    With ``cosine=False`` the fraction stays ``α`` (SET's constant rate; Mocanu et
    al. 2018). A step whose fraction is 0 makes no update: under the cosine the
    masks change while ``t < T_end``, as in the paper's Algorithm 1.

    Args:
        end: ``T_end``, the last step that may update the masks.
        every: ``ΔT``, optimizer steps between mask updates.
        drop_fraction: ``α``, in (0, 1) (with 0 the masks would never change:
            :class:`~lowlearn.sparse.dst.StaticSparse` trains that way).
        cosine: decay the fraction with the cosine above.

    Raises:
        ValueError: ``every`` or ``end`` not a positive integer, ``every > end``
            (``every ≥ end`` with the cosine: no update at all), or ``α`` outside (0, 1).
        TypeError: ``cosine`` other than ``True`` or ``False``.
    """

    def __init__(self, end: int, every: int = 100, drop_fraction: float = 0.3, cosine: bool = True):
        cosine = check_flag("cosine", cosine)
        check_count("every (steps between updates)", every, 1)
        check_count("end (the last step that may update)", end, 1)
        if every > end or (cosine and every == end):
            limit = "more than" if every > end else "no fewer than, under the cosine whose f(end) = 0,"
            raise ValueError(f"every={every} steps between updates is {limit} end={end}, the last step that may "
                             "update: the masks would never change; lower every or raise end")
        if not is_real(drop_fraction) or not 0.0 < drop_fraction < 1.0:
            raise ValueError(f"drop_fraction (α) must be in (0, 1), got {drop_fraction!r}; with 0 the masks would "
                             "never change (StaticSparse trains that way)")
        self.every, self.end, self.drop_fraction, self.cosine = every, end, float(drop_fraction), cosine

    def __repr__(self) -> str:
        return (f"UpdateSchedule(end={self.end}, every={self.every}, drop_fraction={self.drop_fraction}, "
                f"cosine={self.cosine})")

    def updates_at(self, step: int) -> bool:
        """Whether the masks change after optimizer step ``step``.

        They do at multiples of ``ΔT`` in ``1 ≤ step ≤ T_end`` whose fraction is above 0.
        """
        return 1 <= step <= self.end and step % self.every == 0 and self.fraction(step) > 0

    def fraction(self, step: int) -> float:
        """``f(step)``: the fraction of each layer's active weights replaced at ``step``."""
        if not self.cosine:
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * min(step, self.end) / self.end))
