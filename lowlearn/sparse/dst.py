"""Dynamic sparse training: sparse from the first step to the last.

Pruning a trained network (:mod:`lowlearn.sparse.prune`) pays for a dense training
run first. Sparse-to-sparse training keeps the network at its target density
throughout, and lets the *connectivity* change while the weights train: every
``ΔT`` steps each layer drops some active weights and grows as many new ones
(:func:`~lowlearn.sparse.update.drop_and_grow`), on the schedule of
:class:`~lowlearn.sparse.schedule.UpdateSchedule`.

========================  =====================  ===================================
method                    drop                   grow
========================  =====================  ===================================
:class:`StaticSparse`     never                  never
:class:`SET`              smallest ``|θ|``       at random
:class:`RigL`             smallest ``|θ|``       largest dense ``|∂L/∂w|``
:class:`SNFS`             smallest ``|θ|``       largest ``|momentum of ∂L/∂w|``,
                                                 layers sharing the growth by
                                                 their mean momentum
========================  =====================  ===================================

Top-KAST, which selects its sets by magnitude instead of dropping and growing, is in
:mod:`lowlearn.sparse.topkast`.

Use a sparsifier like a learning-rate scheduler::

    sparsifier = RigL(model, optimizer, density=0.1, end=int(0.75 * steps))
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        sparsifier.step()

or pass it to :func:`lowlearn.train.fit` as a callback. It works with any
``torch.optim`` optimizer (with an element-wise one, such as SGD or Adam, the
dropped weights stay exactly zero underneath their masks too: see
:mod:`lowlearn.sparse.mask`), and its :meth:`~Sparsifier.state_dict` (step count,
random generator, SNFS's momentum) together with the model's and the optimizer's
lets training resume exactly from a checkpoint: build the model, the optimizer and
the sparsifier, then load the three states. (A sparsifier built on a model that
already has masks, loaded or pruned, replaces them with its own random ones.)

The initial masks are random at the layer-wise densities of an allocation
(:mod:`lowlearn.sparse.allocation`: ``"erk"``, ``"er"`` or ``"uniform"``), as in
Evci et al. (2020). Masked weights stay exactly zero (:mod:`lowlearn.sparse.mask`);
dropped and grown weights are set to zero and get a new parameter's optimizer state
(:func:`lowlearn.optim_state.reset_optimizer_state`: zero momentum and moments).
Under Powerpropagation (:mod:`lowlearn.powerprop`) a weight at ``φ = 0`` has zero
gradient (``∂L/∂φ = α|φ|^(α−1) ∂L/∂θ``), so a grown weight never learns: combine
Powerprop with Top-KAST (:mod:`lowlearn.sparse.topkast`), whose
weights keep their values outside the forward set, rather than with these methods.

The dense gradient ``∂L/∂w`` of the masked weight ``w = θ ⊙ m`` is what backward
computes anyway before multiplying by ``m``; RigL and SNFS read it with a hook on
the :class:`~lowlearn.sparse.mask.Mask` parametrization, RigL only on the steps that
update the masks, so that the other steps run exactly as static sparse training.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from fractions import Fraction

import torch
from torch import Tensor, nn

from ..checks import all_finite, check_count, check_flag, is_real
from ..distributed import average_across_processes
from ..reparam import OutputGradients
from ..train import generator_on, restore_generator, seeded_generator
from .allocation import erdos_renyi, erk, uniform
from .mask import (Mask, attach_masks, find_mask, nonzero_counts, raw_weight, resolve_layers, saved_weights,
                   set_masks, unchanged_since, version_stamp, weights_device, zero_where_masked)
from .prune import check_density, kept_count, top_k_mask
from .schedule import UpdateSchedule
from .update import drop_and_grow

Distribution = str | Callable[[nn.Module, float], Mapping[str, float]] | Mapping[str, float]

DISTRIBUTIONS = {"erk": erk, "er": erdos_renyi, "uniform": uniform}


def layer_densities_for(model: nn.Module, density: float, distribution: Distribution,
                        layers: list[str] | None = None) -> dict[str, float]:
    """``{layer name: density}`` of ``distribution`` at global ``density``.

    ``distribution`` is ``"erk"``, ``"er"``, ``"uniform"``, a function
    ``(model, density) → {name: density}``, or such a mapping itself. A function or a
    mapping sets every layer's density as it says: the global density is then theirs
    (a function receives ``density`` and may aim at it; a mapping ignores it).

    Raises:
        ValueError: an unknown distribution name, a density outside (0, 1], or (given
            ``layers``) a function's or mapping's result that leaves out one of
            ``layers`` or names another layer.
    """
    check_density(density)
    if isinstance(distribution, str):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}, "
                             "or pass a function (model, density) -> {layer: density}")
        return DISTRIBUTIONS[distribution](model, density, layers=layers)
    given = dict(distribution if isinstance(distribution, Mapping) else distribution(model, density))
    if layers is not None and set(given) != set(layers):
        problems = [f"{what} {names}" for what, names in (("missing", sorted(set(layers) - set(given))),
                                                           ("not sparse layers:", sorted(set(given) - set(layers))))
                    if names]
        raise ValueError(f"the layer densities must name exactly the sparse layers {list(layers)}; "
                         + ", ".join(problems))
    return {name: check_density(d, f"density of {name!r}") for name, d in given.items()}


def sparse_layers(model: nn.Module, layers: list[str] | None, method: str, needs_training: str
                  ) -> dict[str, nn.Module]:
    """``{name: layer}`` that a sparsifier trains: :func:`~lowlearn.sparse.mask.resolve_layers`, but never none.

    ``needs_training`` says why ``method`` cannot sparsify a frozen layer (one whose weight does not require grad).

    Raises:
        ValueError: ``layers`` is empty, or (``None``) the model has no ``nn.Linear`` or ``nn.Conv2d``; a frozen
            layer; or as :func:`~lowlearn.sparse.mask.resolve_layers`.
        KeyError: a name in ``layers`` that is not a module of the model.
    """
    chosen = resolve_layers(model, layers)
    if not chosen:
        raise ValueError("no layers to train sparsely: layers is empty, or the model has no nn.Linear or "
                         "nn.Conv2d")
    if frozen := [name for name, layer in chosen.items() if not raw_weight(layer).requires_grad]:
        raise ValueError(f"the layers {frozen} are frozen (requires_grad=False), but {method} {needs_training}: "
                         "leave them out of layers= (they stay dense), or unfreeze them")
    return chosen


class Sparsifier(ABC):
    """What every sparse-training method shares: the model's layers, a step count, a generator, checkpoints.

    Subclasses implement ``_after_step``. Call :meth:`step` once after every
    ``optimizer.step()``, or pass the sparsifier to :func:`lowlearn.train.fit` as a
    callback.

    Attributes:
        model: the model, changed in place.
        optimizer: its optimizer; the state of masked weights is kept at zero.
        steps: optimizer steps seen so far.
        generator: the random generator of the method, ``seeded_generator(seed, "sparse training")``
            (:func:`lowlearn.train.seeded_generator`) on the weights' device; a new one, seeded
            from it, if the model has moved when the method next draws.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, layers: Mapping[str, nn.Module],
                 seed: int = 0):
        self.model, self.optimizer, self.steps = model, optimizer, 0
        self._layers = dict(layers)
        self.generator = seeded_generator(seed, "sparse training", weights_device(self._layers))

    def layers(self) -> dict[str, nn.Module]:
        """``{name: layer}`` of the layers this sparsifier trains sparsely (others, even masked, are left alone)."""
        return dict(self._layers)

    def masks(self) -> dict[str, Tensor]:
        """``{name: boolean mask}`` of :meth:`layers` (copies, as :func:`~lowlearn.sparse.mask.masks_of`)."""
        return {name: find_mask(layer).mask != 0 for name, layer in self._layers.items()}

    def step(self) -> None:
        """Advance one optimizer step; update the masks when the schedule says so."""
        self.steps += 1
        self._after_step()

    def __call__(self, state: object) -> None:
        """Callback form for :func:`lowlearn.train.fit`.

        The sparsifier keeps its own step count (a second ``fit`` call, whose steps count
        from 1 again, goes on with the schedule). A ``fit`` resumed with ``start_step``
        must find the sparsifier at that step, its :meth:`state_dict` loaded from the
        checkpoint; one found elsewhere is refused, since its schedule would restart.

        Raises:
            RuntimeError: ``fit``'s step is neither 1 nor the one after this sparsifier's.
        """
        if state.step not in (1, self.steps + 1):
            raise RuntimeError(f"fit is at step {state.step} but this {type(self).__name__} has seen {self.steps} "
                               "optimizer steps: to resume a run, load the sparsifier's state_dict saved with the "
                               "checkpoint (sparsifier.load_state_dict(...)) before calling fit with start_step")
        self.step()

    @abstractmethod
    def _after_step(self) -> None:
        """What the method does after optimizer step ``self.steps``."""

    def _check_saved_by(self, state: Mapping) -> None:
        """Raise a ValueError if ``state`` was saved by another method (states saved before they were named pass)."""
        method = state.get("method", type(self).__name__)
        if method != type(self).__name__:
            raise ValueError(f"this state was saved by {method}, not {type(self).__name__}: load it into the "
                             f"{method} it came from, built on a model like the one it trained")

    def state_dict(self) -> dict:
        """The method's name, step count and generator state (the masks are in the model's ``state_dict``)."""
        return {"method": type(self).__name__, "steps": self.steps, "generator": self.generator.get_state(),
                "generator_device": str(self.generator.device)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (load the model's and optimizer's state too).

        A generator state saved on CUDA continues on a CUDA generator where there is a
        GPU, and seeds the generator where there is none
        (:func:`lowlearn.train.restore_generator`).

        Raises:
            ValueError: a state another method saved (e.g. SET's given to SNFS); nothing is restored then.
        """
        self._check_saved_by(state)
        self.steps = int(state["steps"])
        self.generator = restore_generator(self.generator, state["generator"], state.get("generator_device"))


class DynamicSparsity(Sparsifier):
    """Sparse training by drop and grow: the shared engine of :class:`SET`, :class:`RigL` and :class:`SNFS`.

    A subclass supplies :meth:`drop_scores` and :meth:`grow_scores` (and may
    override :meth:`grow_counts` to move weights between layers); this class masks
    the model at ``density`` with random initial masks, runs the schedule, applies
    :func:`~lowlearn.sparse.update.drop_and_grow` to every layer, zeroes dropped
    weights and resets grown ones, with their optimizer state. A mask update follows
    the optimizer step of its training step (RigL's released code takes no optimizer
    step on an update step; the difference is one step of the kept weights every ``ΔT``).

    Args:
        model: the model; every ``nn.Linear``/``nn.Conv2d`` weight (or ``layers``)
            gets a random mask, in place of any mask it has (an earlier pruning's,
            or that of a sparsifier this one takes over from; Top-KAST's and
            PackNet's split masks are refused: squash them first). Its biases and
            norm layers stay dense.
        optimizer: any ``torch.optim`` optimizer over the model's parameters. ``None``
            only for an optimizer without state (SGD without momentum): a grown weight
            would start from the momentum or moments it had when it was dropped.
        density: the global fraction of weights kept, in (0, 1] (sparsity ``1 − d``).
        end: ``T_end``, the last step that may update the masks (RigL: ¾ of training;
            the cosine reaches 0 there, so the last change is at the update before it);
            ``None``: no schedule, the masks change only when :meth:`update` is called
            (SET and SNFS; RigL needs a schedule), and ``every``, ``drop_fraction``
            and ``cosine`` are unused.
        every: ``ΔT``, steps between mask updates (RigL: 100).
        drop_fraction: ``α`` in ``f(t) = α/2 · (1 + cos(π t / T_end))``, the fraction of
            active weights replaced at step ``t`` (RigL: 0.3); the first update, at
            ``t = ΔT``, replaces slightly less than ``α``.
        cosine: decay ``α`` with RigL's cosine (default); ``False`` replaces the
            fraction ``α`` at every update up to ``T_end``, SET's constant rate ``ζ``
            (see :class:`~lowlearn.sparse.schedule.UpdateSchedule`).
        distribution: layer-wise densities: ``"erk"`` (default), ``"er"``,
            ``"uniform"``, a function or a mapping (see :func:`layer_densities_for`).
        layers: qualified names of the layers to sparsify (default: every
            Linear/Conv2d).
        regrow_dropped: may a weight dropped in an update be grown back in the same
            update (see :mod:`lowlearn.sparse.update`)? Default: no.
        seed: seeds the initial masks and any random growth (one stream for every method:
            at the same seed, all start from the same masks). Its draws differ from
            those of ``torch.manual_seed(seed)``, which may have drawn the model's
            weights (:func:`lowlearn.train.seeded_generator`).

    Raises:
        ValueError: a density outside (0, 1], a bad schedule or distribution, no
            layer to sparsify, a frozen layer, a layer with a split mask, or a ``seed`` that
            is not an int >= 0.
        TypeError: ``cosine`` or ``regrow_dropped`` other than ``True`` or ``False``.
        KeyError: a name in ``layers`` that is not a module of the model.
    """

    #: when the dense gradient ``∂L/∂w`` is read: ``"never"``, ``"update"`` (steps that
    #: update the masks) or ``"always"``.
    dense_gradient = "never"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        density: float,
        *,
        end: int | None = None,
        every: int = 100,
        drop_fraction: float = 0.3,
        cosine: bool = True,
        distribution: Distribution = "erk",
        layers: list[str] | None = None,
        regrow_dropped: bool = False,
        seed: int = 0,
    ):
        check_density(density)
        check_count("seed", seed, 0)
        cosine, regrow_dropped = check_flag("cosine", cosine), check_flag("regrow_dropped", regrow_dropped)
        self.schedule = None if end is None else UpdateSchedule(end, every, drop_fraction, cosine)
        chosen = sparse_layers(model, layers, type(self).__name__, "moves their connections and grows new ones at "
                               "zero, which only training can move")
        self.densities = layer_densities_for(model, density, distribution, list(chosen))
        self.density, self.regrow_dropped = density, regrow_dropped
        sizes = {name: raw_weight(layer).numel() for name, layer in chosen.items()}
        self.active = {name: kept_count(self.densities[name], size) for name, size in sizes.items()}
        self._check_capacity(sizes)                                   # all checked before the model changes
        attach_masks(model, list(chosen))
        super().__init__(model, optimizer, chosen, seed)
        self._averaged = False                  # the processes' gradient lists are compared at the first average
        initial = {}
        for name, layer in self.layers().items():
            weight = raw_weight(layer)
            noise = torch.rand(weight.shape, generator=self.generator, device=weight.device)
            initial[name] = top_k_mask(noise, self.active[name])
        set_masks(model, initial, optimizer)
        self._counted = self._mask_stamps()
        self._gradients = OutputGradients(self.layers(), Mask)
        self._arm()

    # ----------------------------------------------------------------- the method's part
    def drop_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: scores}``; the lowest-scoring active weights are dropped. Default: ``|θ|``."""
        return {name: raw_weight(layer).detach().abs() for name, layer in self.layers().items()}

    @abstractmethod
    def grow_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: scores}``; the highest-scoring inactive weights are grown."""

    def grow_counts(self, dropped: Mapping[str, int], masks: Mapping[str, Tensor]) -> dict[str, int]:
        """How many weights each layer grows, given how many it dropped. Default: as many (exact layer density)."""
        return dict(dropped)

    # ----------------------------------------------------------------- the engine
    def _after_step(self) -> None:
        grads = self._recorder().grads
        if grads:                                                             # the same scores on every process
            average_across_processes((grads[name] for name in sorted(grads)), check=not self._averaged)
            self._averaged = True
        if self.dense_gradient == "always" and self._needs_gradient(self.steps):
            self._observe_gradients()
        if self.schedule is not None and self.schedule.updates_at(self.steps) and self._gradients_usable():
            self.update(self.schedule.fraction(self.steps))
        self._gradients.clear()
        self._arm()

    def _observe_gradients(self) -> None:
        """Called after every step until ``T_end`` when ``dense_gradient == "always"`` (SNFS's momentum)."""

    def _gradients_usable(self) -> bool:
        """May a scheduled update grow by this step's dense gradient? Not if it holds a NaN or an infinity.

        That is a ``torch.amp.GradScaler``'s overflow step, which the optimizer skips;
        the update is skipped with it (one host synchronisation, on update steps only).
        Methods that grow without it (``dense_gradient != "update"``) always update.
        """
        if self.dense_gradient != "update":
            return True
        return bool(all_finite(self.dense_gradients().values()))

    def close(self) -> None:
        """Take this sparsifier's gradient hooks off the model for good; the masks stay.

        Call it before another sparsifier trains the same model (when the notebook cell
        that built this one runs again, say): otherwise the hooks of this one go on
        recording dense gradients that nothing reads. ``step()`` is then an error. (A
        deep copy of the model made while this one was recording keeps inert copies of
        the hooks, which record nothing.)
        """
        if self._gradients is not None:
            self._gradients.stop()
            self._gradients = None

    def _recorder(self) -> OutputGradients:
        """The dense-gradient recorder, or a RuntimeError once :meth:`close` took it off."""
        if self._gradients is None:
            raise RuntimeError(f"this {type(self).__name__} was closed (close()): build a new one to train "
                               "sparsely again")
        return self._gradients

    def update(self, fraction: float) -> dict[str, Tensor]:
        """Drop ``fraction`` of every layer's active weights (rounded down) and grow as many; return the grown sets.

        The schedule calls this. A one-off update by hand suits methods whose growth
        needs no gradient of the current step (SET, SNFS); RigL's needs the dense
        gradient, which only the steps its schedule updates at record.

        The layers' active counts are kept on the host, so that an update need not read
        them from the device; masks written since the last update by anything else (a model
        ``state_dict`` loaded without this sparsifier's, :func:`~lowlearn.sparse.mask.set_masks`)
        are counted again first, in one read.

        Raises:
            ValueError: a ``fraction`` outside [0, 1], or an update some layer cannot
                make; nothing has changed then.
        """
        if not is_real(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1] (the share of each layer's active weights to replace), "
                             f"got {fraction!r}")
        masks = self.masks()
        if self._masks_written_elsewhere():
            self.active = nonzero_counts(masks)
        layers = self.layers()
        dropped = {name: self.drop_count(name, raw_weight(layer).numel(), fraction) for name, layer in layers.items()}
        counts = self.grow_counts(dropped, masks)
        drawn_from = self.generator.get_state()        # scores may draw (SET's random growth)
        drop, grow = self.drop_scores(masks), self.grow_scores(masks)
        new, grown = {}, {}
        try:
            for name in layers:              # every layer's sets first: a refused update changes nothing
                new[name], grown[name] = drop_and_grow(masks[name], drop[name], grow[name], dropped[name],
                                                       counts[name], regrow_dropped=self.regrow_dropped,
                                                       active=self.active[name])
        except ValueError:
            self.generator.set_state(drawn_from)      # nor the random stream
            raise
        for name in layers:
            self.active[name] += counts[name] - dropped[name]
        set_masks(self.model, new, self.optimizer)
        self._counted = self._mask_stamps()
        for name, layer in layers.items():             # grown weights start at zero, with a new one's state
            zero_where_masked(raw_weight(layer), ~grown[name], self.optimizer)
        return grown

    def _mask_stamps(self) -> list[tuple]:
        """:func:`~lowlearn.sparse.mask.version_stamp` of every layer's mask, to tell whether it was written (or
        replaced, by a move of the model) since."""
        return [version_stamp(find_mask(layer).mask) for layer in self._layers.values()]

    def _masks_written_elsewhere(self) -> bool:
        """Whether a mask changed since this sparsifier last wrote them, so that ``self.active`` may not count it."""
        return not all(unchanged_since(find_mask(layer).mask, stamp)
                       for layer, stamp in zip(self._layers.values(), self._counted))

    def _check_capacity(self, sizes: Mapping[str, int]) -> None:
        """Raise a ValueError if the method cannot work on layers of ``sizes`` weights at ``self.active``.

        Called before the model changes; every layer-wise method can (see :meth:`drop_count`).
        """

    def drop_count(self, name: str, size: int, fraction: float) -> int:
        """Weights layer ``name`` (of ``size`` weights) drops at ``fraction``: ``⌊fraction · active⌋``.

        Without ``regrow_dropped`` a layer can regrow only its inactive weights, so
        it drops no more than it has (``size − active``) to keep its density.
        """
        n = math.floor(fraction * self.active[name])
        return n if self.regrow_dropped else min(n, size - self.active[name])

    # ----------------------------------------------------------------- dense gradients
    def _needs_gradient(self, step: int) -> bool:
        if self.dense_gradient == "always":     # every step that an update may still follow
            return self.schedule is None or step <= self.schedule.end
        return self.dense_gradient == "update" and self.schedule is not None and self.schedule.updates_at(step)

    def _arm(self) -> None:
        """Record ``∂L/∂w`` during the next step if it needs it; stop recording otherwise."""
        if self._needs_gradient(self.steps + 1):
            self._recorder().start()
        else:
            self._recorder().stop()

    def dense_gradients(self) -> dict[str, Tensor]:
        """``{name: ∂L/∂w}`` of the step just taken (summed over its backward passes).

        Raises:
            RuntimeError: no gradient was seen for a layer: it took no part in the loss,
                or ``step()`` was not called once per optimizer step after a backward pass
                through the model.
        """
        grads = self._recorder().grads
        missing = [name for name in self.layers() if name not in grads]
        if missing:
            if self.dense_gradient == "always":
                until = "" if self.schedule is None else f" up to end={self.schedule.end}"
                when, recorded = f"every step{until}, whose dense gradients its momentum sums", ""
            else:
                when = "an update step"
                recorded = (" The gradient is recorded only for the steps the schedule updates at, so update() by "
                            "hand cannot use it")
            raise RuntimeError(
                f"{type(self).__name__} needs the dense gradient of this step, but saw none for {missing}: "
                f"every sparsified layer must take part in the loss of {when} (leave out of layers= "
                "one that may sit a step out), and sparsifier.step() must be called exactly once after every "
                "optimizer.step(), each after a backward pass through the model (a checkpoint restored mid-run "
                f"resumes correctly too).{recorded}")
        return dict(grads)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Steps, generator, and the active counts (the masks are in the model's ``state_dict``)."""
        return {**super().state_dict(), "active": dict(self.active)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; load the model's state (masks) too.

        Raises:
            ValueError: a state another method saved, or one of other layers than this method trains;
                nothing is restored then.
        """
        self._check_saved_by(state)
        if set(state["active"]) != set(self.active):
            raise ValueError(f"the state is of the layers {sorted(state['active'])}, but this {type(self).__name__} "
                             f"trains {sorted(self.active)}: build it on a model like the one the saved method "
                             "trained")
        super().load_state_dict(state)
        self.active = dict(state["active"])
        self._recorder().clear()
        self._arm()


class StaticSparse(DynamicSparsity):
    """Static sparse training: a random mask at the allocation's densities, never changed.

    The baseline of every dynamic method (Evci et al. 2020, "Static" in their tables;
    with ``distribution="er"`` it is the random Erdős–Rényi network of Mocanu et al.
    2018 without evolution). Arguments as for :class:`DynamicSparsity`; no schedule.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, density: float, *,
                 distribution: Distribution = "erk", layers: list[str] | None = None, seed: int = 0):
        super().__init__(model, optimizer, density, distribution=distribution, layers=layers, seed=seed)

    def grow_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise RuntimeError("static sparse training never changes its masks")


class SET(DynamicSparsity):
    """Sparse Evolutionary Training: drop the smallest weights, grow at random.

    Mocanu, Mocanu, Stone, Nguyen, Gibescu & Liotta (2018), "Scalable training of
    artificial neural networks with adaptive sparse connectivity inspired by network
    science" (Nature Communications). The paper removes a fraction ``ζ`` (0.3) of
    the smallest weights after every epoch; here ``ζ`` is ``drop_fraction`` on the
    :class:`~lowlearn.sparse.schedule.UpdateSchedule`, which decays it with a cosine as
    Evci et al. (2020) do for their SET runs (``cosine=False`` keeps it constant, as
    the paper does). Grown weights start at zero (the
    paper draws them at random). The dropped weights are the smallest ``|θ|`` of a
    layer, as in Evci et al.'s version; Mocanu et al. drop the fraction ``ζ`` of the
    positive weights and of the negative weights closest to zero, separately. Arguments as for
    :class:`DynamicSparsity`; the paper starts from ``distribution="er"``.
    """

    def grow_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.generator = generator_on(self.generator, weights_device(self.layers()))   # the model may have moved
        return {name: torch.rand(mask.shape, generator=self.generator, device=mask.device)
                for name, mask in masks.items()}


class RigL(DynamicSparsity):
    """Rigged Lottery: drop the smallest weights, grow where the dense gradient is largest.

    Evci, Gale, Menick, Castro & Elsen (2020), "Rigging the lottery: making all tickets
    winners" (ICML), Algorithm 1: at every ``ΔT``-th step ``t < T_end``, each layer
    drops the ``f(t) · |active|`` active weights of smallest ``|θ|`` and grows the same
    number of inactive weights with the largest ``|∂L/∂w|``, the gradient of the
    step's mini-batch loss with respect to the *masked* weight, i.e. what the
    gradient would be if the connection existed. New weights start at zero, so
    growth leaves the network's function unchanged.

    Algorithm 1 and the authors' code may grow back a weight in the update that drops
    it (``regrow_dropped=True``). By default the grow step picks only among the weights
    that were inactive before the update, so that each update replaces ``f(t) · |active|``
    connections; a layer denser than ``1 / (1 + f(t))`` then drops only as many weights as
    it has inactive ones (:meth:`~DynamicSparsity.drop_count`), and grows all of them.

    The gradient is read only on update steps (a hook on the mask's output); the
    other ``ΔT − 1`` steps run as plain static sparse training. An update step whose
    dense gradient holds a NaN or an infinity (the overflow steps of a
    ``torch.amp.GradScaler``, which the optimizer skips) changes no mask: the update
    is skipped with the optimizer's step. Arguments as for :class:`DynamicSparsity`.

    Raises:
        ValueError: as :class:`DynamicSparsity`, or no ``end`` (RigL needs its schedule).
    """

    dense_gradient = "update"

    def __init__(self, *args, **kwargs):
        if kwargs.get("end") is None:
            raise ValueError("RigL changes its masks on its schedule only (it reads the dense gradient on those "
                             "steps), so without end it would be static sparse training: give end (T_end, e.g. "
                             "3/4 of the training steps)")
        super().__init__(*args, **kwargs)

    def grow_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: grad.abs() for name, grad in self.dense_gradients().items()}


class SNFS(DynamicSparsity):
    """Sparse momentum (Sparse Networks From Scratch): grow by momentum, shared out across layers.

    Dettmers & Zettlemoyer (2019), "Sparse networks from scratch: faster training
    without losing performance" (arXiv:1907.04840), Algorithm 1. Every step the
    dense gradient updates an exponentially smoothed momentum
    ``M_t = β M_{t−1} + ∂L/∂w`` (``beta``, the paper's SGD momentum 0.9). At an
    update each layer drops the ``f(t) · |active|`` weights of smallest ``|θ|`` (the
    paper's prune rate ``p``, decayed with a cosine); the total ``K`` removed is then
    *redistributed*: layer ``l`` regrows a share of ``K`` proportional to the mean
    ``|M|`` of its active weights (the paper's ``m_l``), at its inactive weights of
    largest ``|M|``. A layer that cannot take its share passes the rest to the others,
    in proportion to their ``m_l`` (:func:`share`). Layer densities therefore drift
    towards the layers whose weights the loss still pushes on, while the global
    density stays exact.

    With the default ``regrow_dropped=False`` a layer regrows only at weights that
    were inactive before the update, so a layer near density 1 hands most of what it
    drops to the others, however large its momentum; the authors' code
    (``sparselearning/core.py``) regrows among all zeros after pruning, as
    ``regrow_dropped=True`` does. Details of that code lowlearn does not follow: it
    spreads a full layer's surplus equally over all layers, caps a layer's regrowth
    at 0.99 of its zeros, lowers the prune rate of a layer above 80% density, prunes
    ``⌈p · n⌉`` once per epoch under a cosine that stops at 0.005, and reads the
    optimizer's own momentum buffer (under Adam, the first moment over the root of
    the second) rather than a momentum of its own. That buffer accumulates the dense
    gradient at inactive weights too, and a grown weight keeps its entry there (only
    the inactive ones are reset, to the mean of the active ones'): it starts at zero
    but moves off by the momentum that chose it at the next step. Here a grown weight
    starts with a new parameter's optimizer state, as in RigL.

    Since the momentum needs ``∂L/∂w`` of every step, SNFS records the dense weight
    gradient at every step up to ``T_end`` (at every step without a schedule; under
    the cosine the last update comes at the last multiple of ``ΔT`` before ``T_end``,
    and the steps after it record a momentum only an :meth:`update` by hand would
    use), see :func:`lowlearn.sparse.flops.dst_training_flops`. A step whose dense
    gradient holds a NaN or an infinity in any layer (the overflow steps of a
    ``torch.amp.GradScaler``, which the optimizer skips as a whole) leaves every layer's
    ``M`` as it was. The recorded gradients are those of the loss the backward pass saw, so
    under a ``GradScaler`` they carry its scale ``s``: a constant ``s`` scales ``M``
    as a whole, which changes neither the ranking in a layer nor the shares ``m_l``,
    but after ``s`` changes (halved at an overflow, doubled after ``growth_interval``
    good steps) ``M`` weighs the gradients before and after unequally until the older
    ones decay (by ``β`` per step). The authors' code reads the optimizer's momentum,
    which sees unscaled gradients. Mixed precision in bfloat16 (:func:`~lowlearn.train.fit`'s
    ``bf16``) needs no scaler and has no such effect. ``M`` is kept in float32 for a model
    in half precision (``.to(torch.bfloat16)``), whose gradients it then sums in float32.

    ``beta`` is the momentum coefficient ``β`` of ``M``; the other arguments are those
    of :class:`DynamicSparsity` (the initial densities come from ``distribution``; the
    paper starts uniform).
    """

    dense_gradient = "always"

    def __init__(self, *args, beta: float = 0.9, **kwargs):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.momentum: dict[str, Tensor] = {}
        super().__init__(*args, **kwargs)

    def _check_capacity(self, sizes: Mapping[str, int]) -> None:
        active, size = sum(self.active.values()), sum(sizes.values())
        if self.schedule is not None and not self.regrow_dropped \
                and math.floor(self.schedule.drop_fraction * active) > size - active:
            fix = ("lower drop_fraction to at most (1 - density) / density, or the density" if size > active else
                   "at density 1 nothing is inactive: pass regrow_dropped=True, or end=None for no mask updates")
            raise ValueError(f"SNFS at density {self.density} drops up to {self.schedule.drop_fraction} of its "
                             f"{active} active weights at an update, more than the {size - active} inactive ones "
                             f"it can regrow into: {fix}")

    def _observe_gradients(self) -> None:
        grads = self.dense_gradients()
        # A gradient that is not finite in any layer (a GradScaler's overflow step, which the optimizer skips as a
        # whole) leaves every layer's momentum as it was, M ← 1·M + 0·g, decided on the device without a host
        # synchronisation; non-finite entries are zeroed first, since 0·NaN is NaN (a finite g passes unchanged).
        finite = all_finite(grads.values())
        for name, grad in grads.items():
            grad = torch.nan_to_num(grad.detach().to(_momentum_dtype(grad.dtype)), nan=0.0, posinf=0.0, neginf=0.0)
            if name in self.momentum:
                # the model may have moved, or been cast: M follows it (in its dtype, float32 at least)
                momentum = self.momentum[name] = self.momentum[name].to(grad)
                beta = torch.full((), self.beta, dtype=momentum.dtype, device=momentum.device)   # β in its dtype
                momentum.mul_(torch.where(finite, beta, 1)).addcmul_(grad, finite)
            else:
                self.momentum[name] = grad * finite

    def grow_scores(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: m.abs() for name, m in self.momentum.items()}

    def update(self, fraction: float) -> dict[str, Tensor]:
        """As :meth:`DynamicSparsity.update`; SNFS grows by its momentum, so it needs one training step first.

        Raises:
            RuntimeError: no step has been taken yet, so there is no momentum to grow by.
        """
        if not self.momentum:
            raise RuntimeError("SNFS grows where the momentum of the dense gradients is largest, and it has seen "
                               "no gradient yet: take a training step (optimizer.step()) before update()")
        return super().update(fraction)

    def drop_count(self, name: str, size: int, fraction: float) -> int:
        """``⌊fraction · active⌋``: the growth goes wherever :func:`share` puts it."""
        return math.floor(fraction * self.active[name])

    def grow_counts(self, dropped: Mapping[str, int], masks: Mapping[str, Tensor]) -> dict[str, int]:
        # The mean |M| over each layer's active weights (the paper's m_l), read from the device at once; summed
        # in float32 at least, since a half-precision sum overflows.
        means = []
        for name, mask in masks.items():
            momentum = self.momentum[name]
            total = torch.where(mask, momentum.abs(), 0).sum(dtype=torch.promote_types(momentum.dtype, torch.float32))
            means.append(total / max(self.active[name], 1))
        means = torch.stack(means).tolist()
        capacity = {}
        for name, mask in masks.items():
            left = self.active[name] - dropped[name]
            capacity[name] = mask.numel() - left - (0 if self.regrow_dropped else dropped[name])
        return share(sum(dropped.values()), dict(zip(masks, means)), capacity)

    def state_dict(self) -> dict:
        """As :meth:`DynamicSparsity.state_dict`, with the momentum ``M``."""
        return {**super().state_dict(), "momentum": {name: m.clone() for name, m in self.momentum.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """As :meth:`DynamicSparsity.load_state_dict`; the momentum goes to its layer's device, in its layer's dtype
        (float32 at least).

        Raises:
            ValueError: a state another method saved, a state of other layers, or a momentum of other
                shapes; nothing is restored then.
        """
        self._check_saved_by(state)
        momentum = (saved_weights("SNFS", "momentum", state["momentum"], self.layers())
                    if state["momentum"] else {})                  # none before the first step
        super().load_state_dict(state)
        self.momentum = {name: m.to(_momentum_dtype(raw_weight(self._layers[name]).dtype))
                         for name, m in momentum.items()}


def _momentum_dtype(dtype: torch.dtype) -> torch.dtype:
    """SNFS's momentum is kept in float32 at least: in a half-precision dtype β = 0.9 rounds (to 0.898 in
    bfloat16), and adding a gradient to the sum of the last ten rounds it to the sum's 8 bits."""
    return torch.promote_types(dtype, torch.float32)


def share(total: int, weights: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` items among names in proportion to ``weights``, no name above its ``capacity``.

    First the exact shares: in proportion to the weights, a name whose share would
    exceed its capacity gets its capacity and the rest goes to the others, again in
    proportion (equally where all their weights are zero). Then one rounding, by
    largest remainders (ties to the earlier name): the integer shares sum to ``total``
    exactly, each within one of its exact share, so equal weights get equal shares
    but for one item.

    Raises:
        ValueError: ``total`` exceeds the summed capacity, or a negative weight.
    """
    if total > sum(capacity.values()):
        raise ValueError(f"cannot place {total} weights: the layers have room for {sum(capacity.values())}; "
                         "lower the density or the drop fraction")
    if any(not 0 <= w < math.inf for w in weights.values()):        # NaN fails both comparisons
        raise ValueError(f"weights must be non-negative finite numbers, got {dict(weights)}")
    exact: dict[str, Fraction] = {}
    while open_ := [name for name in weights if name not in exact]:
        remaining = Fraction(total) - sum(exact.values())
        norm = sum(Fraction(weights[name]) for name in open_)
        quota = {name: remaining * Fraction(weights[name]) / norm if norm > 0 else remaining / len(open_)
                 for name in open_}
        full = {name: Fraction(capacity[name]) for name in open_ if quota[name] > capacity[name]}
        exact.update(full or quota)
    floors = {name: math.floor(exact[name]) for name in weights}
    by_remainder = sorted(weights, key=lambda name: floors[name] - exact[name])       # stable: ties keep order
    for name in by_remainder[:total - sum(floors.values())]:
        floors[name] += 1
    return floors
