"""Lottery tickets: iterative magnitude pruning with resetting or rewinding, its controls, early-bird tickets.

The lottery ticket hypothesis (Frankle & Carbin 2019, "The lottery ticket
hypothesis: finding sparse, trainable neural networks", ICLR): a dense network
``f(x; θ_0)`` contains a subnetwork ``f(x; m ⊙ θ_0)`` that, trained in isolation
from the *same* initialisation ``θ_0``, matches the dense network's accuracy in at
most as many iterations. The paper finds the mask ``m`` by iterative magnitude
pruning (IMP, the paper's §1):

1. initialise ``θ_0`` and train for ``j`` iterations to ``θ_j``;
2. prune ``p%`` of the surviving weights of each layer, those of smallest ``|θ_j|``;
3. reset the surviving weights to ``θ_0`` and train again; repeat ``n`` rounds.

After ``r`` rounds a layer keeps ``(1 − p)^r`` of its weights. For LeNet-300-100
the paper prunes ``p = 20%`` of each hidden layer and ``10%`` of the output layer
per round: :func:`iterative_magnitude_pruning` with ``prune_fraction=0.2,
output_fraction=0.1``. *Rewinding* resets to ``θ_k``, the weights after ``k``
iterations of the first (dense) training run, instead of ``θ_0``: Frankle,
Dziugaite, Roy & Carbin (2020), "Linear mode connectivity and the lottery ticket
hypothesis" (ICML), find that larger networks need it (``rewind_step=k``).

A ticket is a winner only in comparison with controls at the same density
(Frankle & Carbin 2019, Figure 1 and §2; Zhou, Lan, Liu & Yosinski 2019,
"Deconstructing lottery tickets: zeros, signs, and the supermask", NeurIPS). Each
control keeps the ticket's per-layer weight counts and changes one thing:

* :func:`random_reinit`: the ticket's mask, a fresh random initialisation;
* :func:`reshuffle`: the ticket's mask, its kept initial values permuted within each layer;
* :func:`constant_init`: the ticket's mask, every kept weight ``sign(θ_0) · σ_l``;
* :func:`random_mask`: a random mask with the ticket's per-layer counts, the initialisation ``θ_0``.

With rewinding, ``θ_k`` takes the place of ``θ_0`` in every control. A model that came
to IMP already masked keeps its own starting mask as the limit of every control: the
random mask is drawn inside it, and ``σ_l`` is taken over its weights.

Evaluate them with :func:`train_control`, once per IMP round, at that round's
masks::

    def train(model, callbacks):
        optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)   # fresh every round
        return fit(model, data.train, optimizer, steps=5000, callbacks=callbacks,
                   eval_data=data.test, eval_every=100)

    lottery = iterative_magnitude_pruning(MLP(), train, rounds=10, prune_fraction=0.2,
                                          output_fraction=0.1)
    model = MLP()  # any model of the same architecture: train_control copies it
    reinit = [train_control(model, lottery, ticket, train, "reinit", seed=1)
              for ticket in lottery.rounds]

Early-bird tickets (You et al. 2020, "Drawing early-bird tickets: towards more
efficient training of deep networks", ICLR): the mask that pruning *would* give
stops changing early in training. :class:`EarlyBird` watches it during :func:`~lowlearn.train.fit`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..checks import check_count, check_flag, is_integer, is_real
from ..reparam import raw_value
from ..train import History, StopTraining, TrainState, seeded_generator, stream_seed
from .mask import (Mask, all_masks, attach_masks, density, kept_weights, layer_densities, masked_layers, masks_of,
                   nonzero_counts, prunable_layers, raw_weight, set_masks, weights_device, zero_under_masks)
from .prune import alive_scores, top_k_mask, check_density, kept_count, prune
from .scores import check_score_function, magnitude, random

Train = Callable[[nn.Module, list], History]
CONTROLS = ("reinit", "reshuffle", "constant", "random_mask")


class Snapshot:
    """A :func:`~lowlearn.train.fit` callback that keeps a copy of the model's ``state_dict`` at one step.

    ``Snapshot(k)`` stores ``θ_k``, the weights after ``k`` optimizer steps, the
    rewind point of Frankle et al. (2020). The copy is the full ``state_dict``:
    raw weights, biases, mask buffers and batch-norm statistics, cloned on the
    model's device (no host transfer). Step 0, the initialisation, is before any
    callback runs: take it with :meth:`capture` before training.

    Attributes:
        step: the step ``k``.
        state: the copy, or ``None`` before step ``k``. A second run through step
            ``k`` replaces it.

    Raises:
        ValueError: a ``step`` that is not an int >= 0.
        RuntimeError: (when called by ``fit``) training passed step ``k`` and
            nothing was captured, e.g. ``Snapshot(0)`` without :meth:`capture`, or a run
            resumed after step ``k`` without its ``state`` (save it with the checkpoint).
    """

    def __init__(self, step: int):
        check_count("the snapshot step", step, 0)
        self.step = step
        self.state: dict[str, Tensor] | None = None

    def capture(self, model: nn.Module) -> None:
        """Store a copy of ``model.state_dict()`` now."""
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    def __call__(self, state: TrainState) -> None:
        if state.step == self.step:
            self.capture(state.model)
        elif self.state is None and state.step > self.step:
            first = "for the initialisation (step 0) call capture(model) before training; " if self.step == 0 else ""
            raise RuntimeError(f"Snapshot(step={self.step}) was first called at step {state.step}: {first}to resume "
                               f"a run that passed step {self.step} (fit's start_step), set snapshot.state to the "
                               "copy saved with its checkpoint")


def rewind(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Load ``weights`` (a ``state_dict``, e.g. ``Snapshot.state``) but keep the model's masks.

    Every parameter and buffer (biases, batch-norm statistics) takes its value
    from ``weights``; then every current :class:`~lowlearn.sparse.mask.Mask` (of
    weights, and of biases that :func:`~lowlearn.sparse.structured.prune_channels`
    masked) is installed again and the raw values under its zeros are set to zero,
    so the surviving weights equal their values in ``weights`` and the pruned ones
    are exactly zero. This is the reset step of IMP. Build a fresh optimizer
    afterwards: its old state belongs to the weights before the reset.
    """
    kept = [(mask, mask.mask.clone()) for _, _, mask in all_masks(model)]
    model.load_state_dict(weights)
    with torch.no_grad():
        for mask, buffer in kept:
            mask.mask.copy_(buffer)
    zero_under_masks(model)


@dataclass
class TicketRound:
    """One training run of IMP (or of a control at that round's density).

    Attributes:
        index: the round ``r``; round 0 trains the unpruned network.
        density: fraction of the masked layers' weights kept, all layers together.
        layer_densities: ``{layer name: fraction kept}``.
        masks: ``{layer name: boolean mask}`` the run trained with, on the CPU.
        eval: the last evaluation of the run (``{"loss": ..., "accuracy": ...}``),
            ``{}`` if ``train`` evaluated nothing.
        early_stop_step: the step of the lowest evaluation loss, the
            "early-stopping iteration" of Frankle & Carbin (2019, §2 and Figure 1), or
            ``None`` without evaluations (NaN losses, of a run that diverged, do not count).
        history: the run's :class:`~lowlearn.train.History`.
    """

    index: int
    density: float
    layer_densities: dict[str, float]
    masks: dict[str, Tensor]
    eval: dict[str, float]
    early_stop_step: int | None
    history: History


@dataclass
class Lottery:
    """What :func:`iterative_magnitude_pruning` returns.

    Attributes:
        rounds: one :class:`TicketRound` per training run, densest first.
        rewind_state: the ``state_dict`` every round was reset to (``θ_0`` or
            ``θ_k``), on the device the model had when it was taken (``θ_0`` before
            ``fit`` moves a CPU model to the GPU, say); the controls start from it.
        rewind_step: ``k``, 0 for resetting to the initialisation.
    """

    rounds: list[TicketRound]
    rewind_state: dict[str, Tensor]
    rewind_step: int


def _record(index: int, model: nn.Module, history: History) -> TicketRound:
    if not isinstance(history, History):
        raise TypeError(f"train(model, callbacks) must return the History of fit, got {type(history).__name__}")
    losses = [e["loss"] for e in history.eval]
    compared = [i for i, loss in enumerate(losses) if not math.isnan(loss)]   # a NaN compares as neither
    best = min(compared, key=losses.__getitem__) if compared else None
    return TicketRound(
        index=index,
        density=density(model),
        layer_densities=layer_densities(model),
        masks={name: m.cpu() for name, m in masks_of(model).items()},
        eval=dict(history.eval[-1]) if history.eval else {},
        early_stop_step=history.eval_steps[best] if best is not None else None,
        history=history,
    )


def _check_fraction(value: float, what: str) -> float:
    if not is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (the fraction of surviving weights pruned per round), "
                         f"got {value!r}")
    return float(value)


def _layer_fractions(names: list[str], prune_fraction: float | Mapping[str, float],
                     output_fraction: float | None) -> dict[str, float]:
    if isinstance(prune_fraction, Mapping):
        if output_fraction is not None:
            raise ValueError(f"prune_fraction names the output layer {names[-1]!r} already: give its fraction "
                             "there and leave output_fraction out")
        missing, unknown = set(names) - set(prune_fraction), set(prune_fraction) - set(names)
        if missing or unknown:
            raise KeyError(f"prune_fraction must name every masked layer ({', '.join(names)}); "
                           f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        fractions = {name: _check_fraction(prune_fraction[name], f"prune_fraction[{name!r}]") for name in names}
    else:
        fractions = dict.fromkeys(names, _check_fraction(prune_fraction, "prune_fraction"))
    if output_fraction is not None:
        fractions[names[-1]] = _check_fraction(output_fraction, "output_fraction")
    return fractions


def iterative_magnitude_pruning(
    model: nn.Module,
    train: Train,
    rounds: int,
    prune_fraction: float | Mapping[str, float],
    *,
    output_fraction: float | None = None,
    rewind_step: int = 0,
    scope: str = "layer",
) -> Lottery:
    """Find lottery tickets by IMP with resetting (Frankle & Carbin 2019) or rewinding (Frankle et al. 2020).

    Round ``r = 0, ..., rounds``: train; record a :class:`TicketRound`; unless it
    is the last round, prune by magnitude (:func:`~lowlearn.sparse.scores.magnitude`
    through :func:`~lowlearn.sparse.prune.prune`) and :func:`rewind` the surviving
    weights, biases and batch-norm buffers to the rewind point, keeping the masks.
    Masks only shrink. After round ``r`` a layer that starts with density ``d_0``
    keeps exactly ``kept_count(d_0 · (1 − p_l)^r, n_l)`` weights (``scope="layer"``).
    The model is changed in place; it ends trained at the sparsest mask.

    Args:
        model: the network at its initialisation ``θ_0``. Its masked layers are
            pruned; a model without masks gets one on every ``nn.Linear`` and
            ``nn.Conv2d`` (attach masks yourself to prune fewer layers).
        train: ``train(model, callbacks) -> History`` trains the model in place
            with :func:`~lowlearn.train.fit`, passing ``callbacks`` on (in round
            0 they hold the :class:`Snapshot` of the rewind point), and builds a
            fresh optimizer on ``model.parameters()`` each time, as the paper
            does. Every round gets the same call; the paper's rewinding runs train
            ``T − k`` steps after rewinding to ``θ_k``, with the learning-rate
            schedule (a warm-up, say) taken up at step ``k`` and the batches the
            dense run drew after step ``k``, as Frankle et al.'s code does: a closure
            that counts its calls can do all three, calling ``fit(..., start_step=k)``
            after the first call (same ``seed``, same end).
        rounds: pruning rounds ``n``; ``rounds + 1`` trainings in all.
        prune_fraction: ``p``, the fraction of each layer's *surviving* weights
            pruned per round (0.2 for LeNet-300-100), or ``{layer name: p_l}``
            (Conv-2/4/6 of the paper prune convolutions and fully connected layers
            at different rates).
        output_fraction: ``p`` of the last masked layer, the output layer in
            ``named_modules`` order (0.1 in the paper); default ``prune_fraction``.
        rewind_step: ``k``: reset to the weights after ``k`` steps of round 0's
            training (0: the initialisation ``θ_0``).
        scope: ``"layer"`` prunes every layer by its own fraction; ``"global"``
            ranks the magnitudes of all layers together, keeping ``(1 − p)^r`` of
            them overall (Frankle & Carbin's VGG-19 and ResNet-18), with the output
            layer pruned on its own when ``output_fraction`` is given.

    Returns:
        A :class:`Lottery`: the ``rounds + 1`` records and the rewind weights.

    Raises:
        ValueError: a fraction outside [0, 1), a negative ``rounds`` or
            ``rewind_step``, an unknown ``scope``, ``scope="global"`` with
            per-layer fractions, ``output_fraction`` beside per-layer fractions, or
            a model without a layer to prune.
        KeyError: per-layer fractions that do not name every masked layer, or name another.
        TypeError: a ``train`` that does not return the :class:`~lowlearn.train.History` of ``fit``.
        RuntimeError: round 0 ended before step ``rewind_step``, or ``train`` did not pass
            ``callbacks`` on to ``fit``, so no snapshot was taken.
    """
    check_count("rounds", rounds, 0)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and isinstance(prune_fraction, Mapping):
        raise ValueError("scope='global' prunes one fraction of all layers together; give one prune_fraction")
    snapshot = Snapshot(rewind_step)
    masked = masked_layers(model)
    names = list(masked or prunable_layers(model))    # before masks are attached: a refused call changes nothing
    if not names:
        raise ValueError("the model has no masked layer and no nn.Linear or nn.Conv2d to mask, so IMP has nothing "
                         "to prune: attach masks to the layers to prune (lowlearn.sparse.attach_masks(model, layers))")
    fractions = _layer_fractions(names, prune_fraction, output_fraction)
    if not masked:
        attach_masks(model)
    start = layer_densities(model)
    pooled = [n for n in names if output_fraction is None or n != names[-1]] if scope == "global" else []
    if pooled:
        masks = masks_of(model)
        pooled_start = (sum(int(masks[n].count_nonzero()) for n in pooled)
                        / sum(masks[n].numel() for n in pooled))
    layerwise = [n for n in names if n not in pooled]
    if rewind_step == 0:
        snapshot.capture(model)

    records = []
    for r in range(rounds + 1):
        records.append(_record(r, model, train(model, [snapshot] if r == 0 else [])))
        if snapshot.state is None:
            history = records[0].history
            trained = history.steps[-1] if history.steps else 0
            if trained >= rewind_step:
                raise RuntimeError(f"round 0 trained {trained} steps but took no snapshot at the rewind step "
                                   f"{rewind_step}: train(model, callbacks) must pass callbacks on to fit "
                                   "(fit(..., callbacks=callbacks)); in round 0 they hold the Snapshot of that step")
            raise RuntimeError(f"round 0 trained {trained} steps, so it never reached the rewind step {rewind_step}")
        if r == rounds:
            break
        scores = magnitude(model)
        if layerwise:
            prune(model, {n: scores[n] for n in layerwise},
                  {n: start[n] * (1 - fractions[n]) ** (r + 1) for n in layerwise})
        if pooled:
            prune(model, {n: scores[n] for n in pooled},
                  pooled_start * (1 - prune_fraction) ** (r + 1), scope="global")
        rewind(model, snapshot.state)
    return Lottery(records, snapshot.state, rewind_step)


def _rewind_entry(weights: Mapping[str, Tensor], name: str, entry: str, like: Tensor) -> Tensor:
    """Entry ``parametrizations.weight.<entry>`` of masked layer ``name`` in ``weights``, on ``like``'s device."""
    key = f"{name}.parametrizations.weight.{entry}" if name else f"parametrizations.weight.{entry}"
    if key not in weights:
        raise KeyError(f"the rewind weights have no {key!r}: pass the state_dict of the masked model "
                       "(e.g. Lottery.rewind_state or Snapshot.state)")
    return weights[key].to(like.device)


def _rewind_weight(weights: Mapping[str, Tensor], name: str, like: Tensor) -> Tensor:
    """The raw weight of masked layer ``name`` in the ``state_dict`` ``weights``, on ``like``'s device."""
    return _rewind_entry(weights, name, "original", like)


def _rewind_mask(weights: Mapping[str, Tensor], name: str, layer: nn.Module) -> Tensor:
    """The boolean mask of masked layer ``name`` in ``weights``: the weights IMP started from."""
    index = next(i for i, p in enumerate(layer.parametrizations.weight) if isinstance(p, Mask))
    return _rewind_entry(weights, name, f"{index}.mask", raw_weight(layer)) != 0


def _unmasked_weight(layer: nn.Module, raw: Tensor) -> Tensor:
    """The weight that ``layer``'s parametrizations other than its mask compute from the raw weight ``raw``."""
    for parametrization in layer.parametrizations.weight:
        if not isinstance(parametrization, Mask):
            raw = parametrization(raw)
    return raw


@torch.no_grad()
def random_reinit(model: nn.Module, seed: int = 0) -> None:
    """Control: keep the masks, draw a fresh initialisation (Frankle & Carbin 2019, "random reinitialization").

    The fresh weights ``θ'₀`` must come from the distribution of the initialisation
    ``θ₀``. Every module with a ``reset_parameters`` method (``nn.Linear``, ``nn.Conv2d``,
    batch norms, ...; or ``_reset_parameters``, as ``nn.MultiheadAttention`` has) calls
    it after ``torch.manual_seed(stream_seed(seed, "random_reinit"))``
    (:func:`lowlearn.train.stream_seed`: not the initialisation that
    ``torch.manual_seed(seed)`` drew), each module after its submodules: a model that
    initialises its layers its own way (:class:`lowlearn.models.CifarResNet`'s
    Kaiming-normal convolutions) draws them that way again in its own
    ``reset_parameters``, which runs last. Give a model of yours with a custom
    initialisation such a method, or its layers get their defaults. The masks are
    then applied again, so pruned weights stay zero and each layer keeps its count.
    The global random state is restored afterwards.

    A masked layer's initialiser writes in place into ``layer.weight``, which is
    computed from the raw weight ``θ``: under :func:`torch.nn.utils.parametrize.cached`
    that computed tensor is one object, so the fresh values are read back from it
    and mapped to the raw weight (:func:`lowlearn.reparam.raw_value`: under Powerprop,
    ``φ = sign(θ)|θ|^(1/α)``, so that the layer computes the fresh draw).
    """
    modules = list(_submodules_first(model, set()))
    with torch.random.fork_rng(), parametrize.cached():
        torch.manual_seed(stream_seed(seed, "random_reinit"))
        for module in modules:
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()
        for module in modules:        # a parent's initialiser may have written into its layers' weights too
            if parametrize.is_parametrized(module):
                for name, chain in module.parametrizations.items():
                    chain.original.copy_(raw_value(module, name, getattr(module, name)))
    zero_under_masks(model)


def _submodules_first(module: nn.Module, seen: set[int]) -> Iterator[nn.Module]:
    """``module`` and its submodules, each once, every one after its own submodules (depth first, in order)."""
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _submodules_first(child, seen)
    yield module


@torch.no_grad()
def reshuffle(model: nn.Module, rewind_weights: Mapping[str, Tensor], seed: int = 0) -> None:
    """Control: keep the masks; each kept weight gets a kept initial value of its layer, permuted at random.

    The "reshuffle" mask-1 action of Zhou et al. (2019), "Deconstructing lottery
    tickets" (NeurIPS): within each masked layer ``l`` the values ``θ_0[m_l]`` are permuted uniformly
    at random (``torch.randperm`` on ``seeded_generator(seed, "reshuffle")``, on the CPU whatever the
    model's device or torch's default device, so a seed gives one permutation everywhere) and
    written back to the kept positions; pruned weights are zero. Only the masked
    layers' raw weights change: call :func:`rewind` first for the rest (as
    :func:`train_control` does). Indexing by a mask reads the kept count from the
    device, once per layer.
    """
    generator = seeded_generator(seed, "reshuffle")
    masks = masks_of(model)
    for name, layer in masked_layers(model).items():
        theta, keep = raw_weight(layer), masks[name]
        kept = _rewind_weight(rewind_weights, name, theta)[keep]
        order = torch.randperm(kept.numel(), generator=generator, device=generator.device).to(theta.device)
        theta.zero_().masked_scatter_(keep, kept[order])


@torch.no_grad()
def constant_init(model: nn.Module, rewind_weights: Mapping[str, Tensor]) -> None:
    """Control: keep the masks; every kept weight becomes ``sign(θ_0) · σ_l``.

    The "constant" mask-1 action of Zhou et al. (2019), "Deconstructing lottery
    tickets" (NeurIPS), keeps only the signs of the initial weights, with one
    magnitude per layer, ``σ_l``, the standard deviation of the layer's
    initialisation: here the population standard deviation of the layer's
    rewind weights, kept and pruned by IMP alike (for a model that came to IMP
    masked, those inside its starting mask). Zhou et al. report that the signs are
    enough to match the ticket. Only the masked layers' raw weights change: call
    :func:`rewind` first for the rest. Under another reparameterisation (Powerprop),
    ``θ_0`` and ``σ_l`` are those of the effective initial weights, and the raw weights
    are set so that the layer computes ``sign(θ_0) · σ_l``.
    """
    masks = masks_of(model)
    for name, layer in masked_layers(model).items():
        raw = raw_weight(layer)
        initial = _unmasked_weight(layer, _rewind_weight(rewind_weights, name, raw))
        # σ_l in float32 at least: a half-precision sum of the count overflows from 65504 weights on.
        wide = initial.to(torch.promote_types(initial.dtype, torch.float32))
        start = _rewind_mask(rewind_weights, name, layer).to(wide.dtype)
        count = start.sum().clamp(min=1)        # a layer that kept nothing: σ_l = 0, not 0/0
        mean = (wide * start).sum() / count
        sigma = (((wide - mean) * start).square().sum() / count).sqrt().to(initial.dtype)
        raw.copy_(raw_value(layer, "weight", initial.sign() * sigma) * masks[name])


@torch.no_grad()
def random_mask(model: nn.Module, rewind_weights: Mapping[str, Tensor], seed: int = 0) -> None:
    """Control: a uniformly random mask with the ticket's count in every layer, weights from ``rewind_weights``.

    Each masked layer keeps the same number of weights as now, at positions drawn
    uniformly without replacement (top-k of :func:`~lowlearn.sparse.scores.random`
    scores from ``seeded_generator(seed, "random_mask")`` on the model's device) among the
    weights of the mask in ``rewind_weights`` (all of them, unless the model came to
    IMP masked); the kept weights take their values from ``rewind_weights`` (``θ_0``,
    or ``θ_k`` when rewinding), so only the mask differs from the ticket. The model's
    masks are replaced. Frankle & Carbin's "randomly sampled sparse networks" (2019,
    Figure 1) also draw a new initialisation: follow this with
    :func:`random_reinit` for those.
    """
    layers = masked_layers(model)
    if not layers:
        return
    generator = seeded_generator(seed, "random_mask", weights_device(layers))
    counts = kept_weights(model)
    scores = random(model, generator)
    alive = alive_scores(scores, {name: _rewind_mask(rewind_weights, name, layers[name]) for name in scores})
    new = {name: top_k_mask(s, counts[name]) for name, s in alive.items()}
    for name, layer in layers.items():
        raw_weight(layer).copy_(_rewind_weight(rewind_weights, name, raw_weight(layer)))
    set_masks(model, new)


def train_control(
    model: nn.Module,
    lottery: Lottery,
    ticket: TicketRound | int,
    train: Train,
    control: str | None = None,
    *,
    seed: int = 0,
) -> TicketRound:
    """Train a control network at one IMP round's masks, and record it like the round.

    A copy of ``model`` loads ``lottery.rewind_state`` and gets the ticket's masks,
    the weights under them set to zero (as :func:`rewind` leaves the rounds); then
    ``control`` changes it (see the module's introduction) and ``train(copy, [])``
    trains it. ``control=None`` retrains the ticket itself (e.g. with another data
    order). The paper's controls reuse each round's masks: call this once per
    ``lottery.rounds`` entry and plot the results against ``TicketRound.density``,
    beside the tickets.

    Args:
        model: a network of the architecture the lottery was drawn on; it is
            copied, not changed. The copy gets masks on the ticket's layers. If
            :func:`~lowlearn.sparse.structured.prune_channels` masked biases of the
            lottery's model, ``model`` needs masks on those biases too (prune its
            channels, at any density): the copy takes the lottery's from ``lottery.rewind_state``.
        lottery: the result of :func:`iterative_magnitude_pruning`.
        ticket: a round of ``lottery``, or its index.
        train: as for :func:`iterative_magnitude_pruning`.
        control: ``"reinit"`` (:func:`random_reinit`), ``"reshuffle"``
            (:func:`reshuffle`), ``"constant"`` (:func:`constant_init`),
            ``"random_mask"`` (:func:`random_mask`), or ``None``.
        seed: the seed of the control's random draws.

    Returns:
        The control run's :class:`TicketRound`, with the ticket's ``index``.

    Raises:
        ValueError: an unknown ``control``, a ``ticket`` not of ``lottery``, or a ``model`` whose copy (with the
            ticket's masks) has other ``state_dict`` entries than ``lottery.rewind_state``: another architecture,
            or biases masked in one of them only.
    """
    if control is not None and control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(map(repr, CONTROLS))} or None, got {control!r}")
    rounds = len(lottery.rounds)
    if isinstance(ticket, TicketRound):
        if not any(ticket is own for own in lottery.rounds):
            raise ValueError(f"ticket is a TicketRound of round {ticket.index} but not one of lottery.rounds (another "
                             "lottery's, or a control run's): pass one of lottery.rounds, or its index")
    elif not is_integer(ticket) or not -rounds <= ticket < rounds:
        raise ValueError(f"ticket must be a TicketRound of the lottery or the index of one of its {rounds} "
                         f"rounds, got {ticket!r}")
    else:
        ticket = lottery.rounds[int(ticket)]
    net = copy.deepcopy(model)
    attach_masks(net, ticket.masks)
    _check_entries(net, lottery.rewind_state)
    net.load_state_dict(lottery.rewind_state)     # masked biases take the lottery's masks with their values
    set_masks(net, ticket.masks)
    zero_under_masks(net)
    if control == "reinit":
        random_reinit(net, seed)
    elif control == "reshuffle":
        reshuffle(net, lottery.rewind_state, seed)
    elif control == "constant":
        constant_init(net, lottery.rewind_state)
    elif control == "random_mask":
        random_mask(net, lottery.rewind_state, seed)
    return _record(ticket.index, net, train(net, []))


def _check_entries(net: nn.Module, rewind_state: Mapping[str, Tensor]) -> None:
    """Raise a ValueError, rather than ``load_state_dict``'s list of keys, if ``net`` has other entries than
    ``rewind_state``."""
    own, saved = set(net.state_dict()), set(rewind_state)
    if own == saved:
        return
    biases = sorted({key.rsplit(".parametrizations.bias.", 1)[0] for key in saved - own
                     if ".parametrizations.bias." in key})
    hint = (f"; the lottery's model had masked biases in the layers {biases} (prune_channels masks the biases of "
            "the units it removes): prune the channels of model first, at any density (the copy takes the "
            "lottery's masks), or pass the model IMP pruned" if biases else "")
    raise ValueError(f"model is not of the architecture the lottery was drawn on: lottery.rewind_state has the "
                     f"entries {sorted(saved - own)} that a copy of model with the ticket's masks lacks, and lacks the "
                     f"copy's entries {sorted(own - saved)}" + hint)


def _same_layers(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    if not a:
        raise ValueError("no masks to compare: pass {layer name: boolean mask} dicts, e.g. masks_of(model)")
    if a.keys() != b.keys():
        raise KeyError(f"the masks cover different layers: {sorted(a)} vs {sorted(b)}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"the masks of {name!r} differ in shape: {tuple(a[name].shape)} vs {tuple(b[name].shape)}")
        if a[name].dtype != torch.bool or b[name].dtype != torch.bool:
            raise TypeError(f"the masks of {name!r} must be boolean, got {a[name].dtype} and {b[name].dtype}: "
                            "pass mask != 0")


def _intersection_union(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[int, int]:
    _same_layers(a, b)
    counts = torch.stack([torch.stack([(x & b[n].to(x.device)).count_nonzero(),
                                       (x | b[n].to(x.device)).count_nonzero()])
                          for n, x in a.items()])
    intersection, union = counts.sum(0).tolist()  # the one read from the device
    return intersection, union


def mask_overlap(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Jaccard index ``|a ∧ b| / |a ∨ b|`` of two mask dicts, all layers together.

    1 for equal masks, 0 for disjoint ones (and 1 when both keep nothing). For one
    layer pass one-entry dicts. Between IMP rounds the masks are nested, so the
    index is just the ratio of their densities; it is informative between tickets
    of different seeds, an early-bird mask and the final one, or a ticket and a
    control.
    """
    intersection, union = _intersection_union(a, b)
    return intersection / union if union else 1.0


def mask_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Normalised Hamming distance of two mask dicts: the fraction of all weights kept by exactly one.

    The mask distance of You et al. (2020), "Drawing early-bird tickets" (ICLR), §3.
    """
    intersection, union = _intersection_union(a, b)
    return (union - intersection) / sum(m.numel() for m in a.values())


class EarlyBird:
    """A :func:`~lowlearn.train.fit` callback that detects an early-bird ticket (You et al. 2020, ICLR).

    Every ``every`` steps it computes the masks that pruning to ``density`` *would*
    give now (layer-wise top-k of ``scores(model)``, exactly as
    :func:`~lowlearn.sparse.prune.prune` picks them; nothing is applied) and their
    :func:`mask_distance` to the previous such masks. When the largest of the last
    ``window`` distances is below ``threshold`` the ticket has emerged: ``found_at``
    and ``mask`` are set, and with ``stop=True`` training ends.

    You et al. prune channels by the batch-norm scales ``γ``, ranked over the whole
    network, and check once per epoch with a queue of ``l = 5`` distances and
    ``ε = 0.1``; this callback applies the same test to layer-wise unstructured
    masks of any score (magnitude by default). The paper's test, which this one
    follows, compares consecutive masks; the authors' code instead compares each of
    the last four masks with the newest. Each check reads a few numbers from the
    device (the distance, a NaN check of each layer's scores, and for a masked model
    each layer's count of surviving weights); other steps do no device work. Pass the
    steps per epoch, ``math.ceil(len(train_set) / batch_size)``, as ``every`` to
    check once per epoch, as the paper does. To resume an interrupted run (``fit``'s
    ``start_step``), save :meth:`state_dict` with the checkpoint and restore it with
    :meth:`load_state_dict`.

    Args:
        density: ``1 − p``, the fraction of weights the ticket keeps.
        every: steps between checks.
        threshold: ``ε``, in (0, 1] (a mask distance is at most 1).
        window: ``l``, how many consecutive distances must all be below ``ε``.
        scores: ``scores(model) -> {layer name: scores}``, higher = keep.
        stop: raise :class:`~lowlearn.train.StopTraining` when the ticket is found.

    Attributes:
        distances: the distance at each check after the first, as Python floats:
            ``distances[i]`` compares the masks of steps ``(i + 1) · every`` and
            ``(i + 2) · every``.
        found_at: the step at which the ticket was found, or ``None``.
        mask: the masks at ``found_at`` (``{layer name: boolean}``, on the
            model's device, or after :meth:`load_state_dict` on the device the state
            was read to), ready for :func:`~lowlearn.sparse.mask.set_masks`, which
            copies them to the model's device.

    Raises:
        ValueError: a bad ``density``, ``every``, ``threshold`` or ``window``.
        TypeError: ``scores`` that are not a function (scores themselves, say), or ``stop``
            other than ``True`` or ``False``.
    """

    def __init__(
        self,
        density: float,
        *,
        every: int,
        threshold: float = 0.1,
        window: int = 5,
        scores: Callable[[nn.Module], dict[str, Tensor]] = magnitude,
        stop: bool = False,
    ):
        check_count("every", every, 1)
        check_count("window", window, 1)
        if not is_real(threshold) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] (ε, a mask distance: the fraction of all weights that "
                             f"two masks disagree on), got {threshold!r}")
        check_score_function("scores", scores)
        self.density = check_density(density)
        self.every, self.threshold, self.window = every, threshold, window
        self.scores, self.stop = scores, check_flag("stop", stop)
        self.distances: list[float] = []
        self.found_at: int | None = None
        self.mask: dict[str, Tensor] | None = None
        self._previous: dict[str, Tensor] | None = None

    def would_keep(self, model: nn.Module) -> dict[str, Tensor]:
        """The masks pruning ``model`` to ``density`` by ``scores`` would install now.

        A layer already sparser than ``density`` keeps its surviving weights (masks only shrink).
        """
        current = masks_of(model)
        left = nonzero_counts(current)
        scores = self.scores(model)
        alive = alive_scores(scores, {name: current[name] if name in current else torch.ones_like(s, dtype=torch.bool)
                                      for name, s in scores.items()})
        return {name: top_k_mask(s, min(kept_count(self.density, s.numel()), left.get(name, s.numel())))
                for name, s in alive.items()}

    def __call__(self, state: TrainState) -> None:
        if state.step % self.every:
            return
        keep = self.would_keep(state.model)
        if self._previous is not None:       # (on keep's device: a loaded state may have been read to another)
            previous = {name: mask.to(keep[name].device) for name, mask in self._previous.items()}
            self.distances.append(mask_distance(previous, keep))
            recent = self.distances[-self.window:]
            if self.found_at is None and len(recent) == self.window and max(recent) < self.threshold:
                self.found_at, self.mask = state.step, keep
                if self.stop:
                    raise StopTraining
        self._previous = keep

    def state_dict(self) -> dict:
        """The distances so far, ``found_at``, ``mask`` and the masks of the last check (copies; save them with the
        model's, to resume an interrupted run with :meth:`load_state_dict`). ``torch.load(..., weights_only=True)``
        reads it back."""
        return {"distances": list(self.distances), "found_at": self.found_at, "mask": _copied(self.mask),
                "previous": _copied(self._previous)}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from :meth:`state_dict`: the next check compares with the masks of the saved one."""
        self.distances, self.found_at = [float(d) for d in state["distances"]], state["found_at"]
        self.mask, self._previous = _copied(state["mask"]), _copied(state["previous"])


def _copied(masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if masks is None else {name: mask.clone() for name, mask in masks.items()}
