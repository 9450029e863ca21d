"""Saliency scores: how important is each weight? Higher means keep.

Every score is a plain function of a model (and, for data-dependent scores, a
batch) that returns ``{layer name: tensor of the weight's shape}``, ready for
:func:`lowlearn.sparse.prune.prune`. Scores are computed on the *effective* weight
``layer.weight``: the masked weight, and the exponentiated one under
Powerpropagation. A pruned weight is zero there, so every score below except
:func:`random` is zero (or, for :class:`MovementScores`, unchanged) at pruned weights.

The layers scored are the masked layers of the model, or, in a model without
masks, every ``nn.Linear`` and ``nn.Conv2d`` (:func:`~lowlearn.sparse.mask.prunable_layers`).

* :func:`magnitude` and :func:`random`: data-oblivious.
* :func:`synflow`: synaptic flow ``|w ⊙ ∂R/∂w|`` of the network's absolute values on an
  input of ones, data-free (Tanaka et al. 2020).
* :func:`snip`: connection sensitivity ``|w ⊙ ∂L/∂w|`` on one batch (Lee et al. 2019).
* :func:`grasp`: gradient signal preservation ``w ⊙ Hg`` on one batch (Wang et al. 2020):
  keep the weights whose removal would shrink the gradient the most.
* :func:`obd`: Optimal Brain Damage saliency ``½ h_ii w_i²`` (LeCun et al. 1990), with
  the Hessian diagonal estimated by Hutchinson's method.
* :class:`MovementScores`: a training callback accumulating ``−Σ_t w ⊙ ∂L/∂w``
  (Sanh et al. 2020).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..checks import check_batch, check_count, check_positive, is_integer
from ..train import eval_mode, generator_on
from .mask import (masked_layers, masks_of, prunable_layers, raw_weight, resolve_layers, saved_weights,
                   weights_device)

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def scored_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The layers a score covers: the masked layers, or every prunable layer if none is masked.

    ``layers`` (qualified module names) chooses the layers instead; an unknown name
    raises a KeyError that lists the model's layers.
    """
    if layers is not None:
        return resolve_layers(model, layers)
    return masked_layers(model) or prunable_layers(model)


def _on_the_layers_device(generator: torch.Generator | None, layers: dict[str, nn.Module]) -> torch.Generator | None:
    """``generator``, or one seeded from it on the layers' device where it draws elsewhere (:func:`generator_on`)."""
    return generator_on(generator, weights_device(layers)) if layers else generator


def check_score_function(name: str, score: object) -> None:
    """Raise a TypeError unless ``score`` is a function ``score(model) -> {layer name: scores}`` (not the scores)."""
    if not callable(score):
        raise TypeError(f"{name} must be a function {name}(model) -> {{layer name: scores}}, such as "
                        f"lowlearn.sparse.scores.magnitude, got {type(score).__name__}")


@torch.no_grad()
def magnitude(model: nn.Module) -> dict[str, Tensor]:
    """``|w|``: the data-oblivious criterion of Han et al. (2015), "Learning both weights
    and connections for efficient neural networks" (NeurIPS), and of the lottery-ticket
    procedure (Frankle & Carbin 2019)."""
    return {name: layer.weight.abs() for name, layer in scored_layers(model).items()}


@torch.no_grad()
def random(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Uniform random scores: the baseline every criterion must beat.

    ``generator`` makes the scores reproducible; one on another device than the
    model seeds one on the model's device (:func:`lowlearn.train.generator_on`).
    Make it with :func:`lowlearn.train.seeded_generator`, not with the seed that
    drew the model's weights: on a CPU, ``torch.Generator().manual_seed(s)`` repeats
    the draws of ``torch.manual_seed(s)``, and the first layer's "random" scores
    would rank its initial weights.
    """
    layers = scored_layers(model)
    generator = _on_the_layers_device(generator, layers)
    return {name: torch.rand(layer.weight.shape, generator=generator, device=layer.weight.device)
            for name, layer in layers.items()}


@contextmanager
def _effective_weights(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Yield ``{name: effective weight w}`` of the scored layers, the very tensors the
    model's forward passes use inside the block, so that ``torch.autograd.grad(loss, w)``
    is ``∂L/∂w``.

    Under a parametrization ``layer.weight`` is recomputed at every access;
    :func:`torch.nn.utils.parametrize.cached` computes it once for the whole block.
    The model runs in eval mode (no dropout noise; batch norm uses, and does not
    update, its running statistics), with gradients enabled; every module's mode is
    restored afterwards. Tanaka et al.'s code for pruning at initialisation (SynFlow,
    NeurIPS 2020) scores in eval mode too. At initialisation the running statistics
    are mean 0 and variance 1, so batch norm is then close to the identity, and the
    scores are nearly those of the network without it.

    A frozen layer (``requires_grad=False``) is scored too: a weight has a derivative
    whether or not it is trained. Its raw weight requires gradients inside the block
    only; ``torch.autograd.grad`` leaves every ``.grad`` as it was.
    """
    layers = scored_layers(model)
    frozen = [weight for weight in map(raw_weight, layers.values()) if not weight.requires_grad]
    try:
        for weight in frozen:
            weight.requires_grad_(True)
        with eval_mode(model), torch.enable_grad(), parametrize.cached():
            yield {name: layer.weight for name, layer in layers.items()}
    finally:
        for weight in frozen:
            weight.requires_grad_(False)


def _hessian_times(grads: Sequence[Tensor], weights: Sequence[Tensor]) -> Callable[[list[Tensor]], list[Tensor]] | None:
    """``v ↦ H v`` over ``weights``, by double back-propagation through ``grads = ∂L/∂w`` (taken with
    ``create_graph=True``); ``None`` when no gradient depends on the weights (``H = 0``).

    A gradient that does not depend on the weights (a loss linear in them, a layer it skips) adds no
    curvature and is left out. The graph is kept, so the product can be taken again with other ``v``.
    """
    curved = [i for i, g in enumerate(grads) if g.requires_grad]
    if not curved:
        return None
    return lambda vectors: list(torch.autograd.grad([grads[i] for i in curved], weights,
                                                    grad_outputs=[vectors[i] for i in curved], retain_graph=True,
                                                    materialize_grads=True))


def synflow(model: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Synaptic flow ``S = |∂R/∂w ⊙ w|``: a saliency that needs no data.

    Tanaka, Kunin, Yamins & Ganguli (2020), "Pruning neural networks without any data
    by iteratively conserving synaptic flow" (NeurIPS), Algorithm 1. Every weight
    ``θ^[l]`` is replaced by its absolute value and one input of ones ``𝟙`` is fed
    through; the sum of the outputs is the synaptic flow::

        R = 𝟙ᵀ (∏_l |θ^[l]|) 𝟙,

    and each weight scores ``∂R/∂θ ⊙ θ``. In a ReLU network the absolute values make
    every unit active, so ``R`` sums the products of weights along all paths from input
    to output, and a weight scores the flow through it. Without biases, every layer's
    scores sum to ``R`` (the paper's Theorem 2, network-wise conservation), so a layer
    with few weights gets high scores. Pruning globally in small enough steps by such
    a positive, conserved score, rescored after each step, keeps every layer until the
    network is down to its last paths from input to output (their Theorem 3, maximal
    critical compression); one-shot criteria at initialisation can instead remove a
    whole layer first ("layer collapse"). Tanaka et al. prune in 100 rounds with no data and no
    training between them, the density following ``d^(r/100)``; in lowlearn that is
    :func:`~lowlearn.sparse.schedule.iterative_pruning` with this score::

        iterative_pruning(model, d, 100, lambda model, r: None,
                          score=lambda model: synflow(model, (1, 28, 28)))

    As in the authors' code, *every* floating parameter and buffer is replaced by its
    absolute value (biases, batch-norm scales, shifts and running statistics too),
    and the model runs in eval mode. The computation runs on a copy of the model in
    ``dtype`` (float64 by default: ``R`` is a product over all layers and can overflow
    float32 in deep networks; the authors' code works in float32). The model itself is
    left unchanged: no weight, buffer, ``.grad`` or mode. Pruned weights score zero.

    Args:
        model: the network to score (Tanaka et al.: at initialisation).
        input_shape: the shape of one input, without the batch dimension (e.g.
            ``(1, 28, 28)``); the input is one example of ones of this shape.
        dtype: the floating dtype of the computation and of the scores.

    Returns:
        ``{layer name: |∂R/∂w ⊙ w|}`` for the scored layers, in ``dtype``.
    """
    shape = tuple(input_shape)
    if not shape or not all(is_integer(n) and n > 0 for n in shape):
        raise ValueError(f"input_shape must be the shape of one input, positive integers without the batch "
                         f"dimension (e.g. (1, 28, 28) for MNIST images), got {input_shape!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype such as torch.float64, got {dtype}")
    layers = scored_layers(model)
    if not layers:
        return {}
    net = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for tensor in itertools.chain(net.parameters(), net.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    ones = torch.ones((1, *map(int, shape)), dtype=dtype, device=weights_device(layers))
    with _effective_weights(net) as weights:
        flow = net(ones).sum()
        grads = torch.autograd.grad(flow, list(weights.values()), materialize_grads=True)
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights.items(), grads)}


def snip(model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy) -> dict[str, Tensor]:
    """Connection sensitivity ``|g ⊙ w|``, ``g = ∂L/∂w``, on one batch.

    Lee, Ajanthan & Torr (2019), "SNIP: single-shot network pruning based on
    connection sensitivity" (ICLR), eqs. 5–6: with an indicator ``c_j`` of each
    connection, ``w ↦ c ⊙ w``, the sensitivity is ``|∂L/∂c_j|`` at ``c = 1``, which is
    ``|g_j w_j|``. The paper normalises by ``Σ_k |g_k w_k|``; that changes no ranking,
    so it is left out. Pruned weights (``w_j = 0``) score zero.

    The gradient is taken with respect to the effective weights with
    :func:`torch.autograd.grad`: no parameter's ``.grad`` is touched, no weight or
    buffer changes, and the model runs in eval mode (its modes are restored). A
    layer that the eval-mode loss does not use (an auxiliary head that runs in
    training mode only) has ``g = 0`` and scores zero.

    Args:
        model: the network, at the weights to score (SNIP: at initialisation).
        batch: ``(x, y)`` on the model's device.
        loss_fn: ``L = loss_fn(model(x), y)``.

    Returns:
        ``{layer name: |g ⊙ w|}`` for the scored layers.
    """
    x, y = check_batch(batch)
    with _effective_weights(model) as weights:
        grads = torch.autograd.grad(loss_fn(model(x), y), list(weights.values()), materialize_grads=True)
    return {name: (g * w).abs().detach() for (name, w), g in zip(weights.items(), grads)}


def grasp(model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy, *,
          temperature: float = 200.0) -> dict[str, Tensor]:
    """Gradient signal preservation ``w ⊙ Hg``, on one batch: keep what carries the gradient.

    Wang, Zhang & Grosse (2020), "Picking winning tickets before training by
    preserving gradient flow" (ICLR). Gradient descent first lowers the loss at the
    rate ``‖g‖²``, ``g = ∂L/∂w``; a pruned network should keep that rate, not the
    loss itself (SNIP's view). Removing weights, ``w → w + δ`` with ``δ_i = −w_i`` on
    the removed ones, changes it by::

        ‖g(w + δ)‖² − ‖g(w)‖² ≈ 2 δᵀ H g,    H = ∂²L/∂w²,

    so removing weight ``i`` alone changes ``‖g‖²`` by about ``−2 w_i (Hg)_i``. The
    authors' code scores ``S = −w ⊙ Hg`` and removes the weights of *largest* ``S``,
    whose removal shrinks the gradient least or even grows it. This function returns
    ``w ⊙ Hg = −S``, so that, as for every score here, the highest are kept; unlike
    :func:`snip`'s, the scores are signed. ``Hg`` is one Hessian-vector product by
    double back-propagation, over the weights of all scored layers together (biases
    and other parameters held fixed).

    As in the authors' code, the outputs are divided by a temperature ``T`` before the
    loss, ``L = loss_fn(model(x) / T, y)``; ``temperature=1`` leaves them as they are.
    In a masked layer only the surviving weights train, so only their gradients count
    in ``‖g‖²``: ``g`` is masked before the product (the authors prune dense networks
    only, where this changes nothing). Pruned weights score zero.

    The authors' code departs from this in three ways that this function does not
    follow. It draws its batch as two halves and sums their products, which for
    halves of equal size scales ``Hg`` by 4 and changes no ranking. It runs the model
    in training mode; here, as for the other scores, the model runs in eval mode
    (modes restored), which differs only for batch norm and dropout. And by default
    it re-draws the ``nn.Linear`` weights of its copy of the network (Xavier-normal)
    before scoring; here the weights scored are the model's own.

    No ``.grad``, weight or buffer changes.

    Args:
        model: the network, at the weights to score (GraSP: at initialisation).
        batch: ``(x, y)`` on the model's device; the authors use 10 or 25 examples
            of each class.
        loss_fn: ``L = loss_fn(model(x) / temperature, y)``; must be twice
            differentiable.
        temperature: ``T > 0``.

    Returns:
        ``{layer name: w ⊙ Hg}`` for the scored layers.
    """
    temperature = check_positive("temperature", temperature)
    x, y = check_batch(batch)
    masks = masks_of(model)
    with _effective_weights(model) as weights:
        ws = list(weights.values())
        grads = torch.autograd.grad(loss_fn(model(x) / temperature, y), ws, create_graph=True,
                                    materialize_grads=True)
        hessian_times = _hessian_times(grads, ws)
        if hessian_times is None:
            hg = [torch.zeros_like(w) for w in ws]
        else:
            hg = hessian_times([(g * masks[name] if name in masks else g).detach() for name, g in zip(weights, grads)])
    return {name: (w * h).detach() for (name, w), h in zip(weights.items(), hg)}


def obd(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn = F.cross_entropy,
    *,
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Optimal Brain Damage saliency ``½ h_ii w_i²``, Hessian diagonal by Hutchinson's estimator.

    LeCun, Denker & Solla (1990), "Optimal Brain Damage" (NeurIPS): near a
    minimum, deleting weight ``w_i`` raises the loss by about ``s_i = ½ h_ii w_i²``,
    ``h_ii = ∂²L/∂w_i²``. The paper approximates ``h_ii`` by a positive
    Gauss-Newton-like back-propagation; here ``diag(H)`` of the loss on ``batch`` is
    estimated without bias by the method of Bekas, Kokiopoulou & Saad (2007), "An
    estimator for the diagonal of a matrix" (Applied Numerical Mathematics 57),
    after Hutchinson (1990):

        diag(H) ≈ (1/S) Σ_s z_s ⊙ (H z_s),   z_s with independent ±1 entries,

    ``S = samples``, each ``H z`` a Hessian-vector product by double back-propagation
    (about the cost of three backward passes) over the weights of all scored layers
    together. The estimate of ``h_ii`` has variance ``(1/S) Σ_{j≠i} H_ij²``: exact for
    any ``S`` when ``H`` is diagonal, and with standard error falling as ``1/√S``
    otherwise. In a masked layer ``z`` is zero at the pruned weights, whose saliency is
    0 anyway (``w_i = 0``): the sum then runs over surviving weights ``j`` only, which
    keeps the estimate unbiased and lowers its variance. Away from a minimum ``h_ii``
    (and so ``s_i``) may be negative.

    Biases and other parameters are held fixed (they get no ``z``). No ``.grad``,
    weight or buffer changes, and the model runs in eval mode (modes restored). A
    layer that the eval-mode loss does not use has ``H = 0`` there and scores zero.

    Args:
        model: the network.
        batch: ``(x, y)`` on the model's device.
        loss_fn: ``L = loss_fn(model(x), y)``; must be twice differentiable.
        samples: ``S``, the number of Rademacher vectors.
        generator: for reproducible ``z`` (one on another device than the model seeds
            one on the model's device: :func:`lowlearn.train.generator_on`); make it
            with :func:`lowlearn.train.seeded_generator`, as for :func:`random`.

    Returns:
        ``{layer name: ½ ĥ_ii w_i²}`` for the scored layers.
    """
    check_count("samples (Rademacher vectors)", samples, 1)
    x, y = check_batch(batch)
    generator = _on_the_layers_device(generator, scored_layers(model))
    masks = masks_of(model)
    with _effective_weights(model) as weights:
        ws = list(weights.values())
        kept = [masks[name].to(w.dtype) if name in masks else 1 for name, w in weights.items()]
        grads = torch.autograd.grad(loss_fn(model(x), y), ws, create_graph=True, materialize_grads=True)
        diag = [torch.zeros_like(w) for w in ws]
        hessian_times = _hessian_times(grads, ws)
        for _ in range(0 if hessian_times is None else samples):
            zs = [(torch.randint(0, 2, w.shape, generator=generator, device=w.device, dtype=w.dtype) * 2 - 1) * m
                  for w, m in zip(ws, kept)]
            for d, z, hz in zip(diag, zs, hessian_times(zs)):
                d.addcmul_(z, hz)
    return {name: d.div_(2 * samples).mul_(w.detach().square())
            for (name, w), d in zip(weights.items(), diag)}


def _summed_in(dtype: torch.dtype) -> torch.dtype:
    """The dtype :class:`MovementScores` sums in for weights of ``dtype``: float32 at least, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


class MovementScores:
    """Movement-pruning scores, accumulated during training: a callback for :func:`lowlearn.train.fit`.

    Sanh, Wolf & Rush (2020), "Movement pruning: adaptive sparsity by fine-tuning"
    (NeurIPS), section 3, with score learning rate ``α_S = 1``: after training steps
    ``t = 0, 1, ...``

        S = − Σ_t  w^(t) ⊙ ∂L/∂w^(t),

    positive for weights moving away from zero, negative for weights moving toward it.
    Each call (after an optimizer step) adds ``−θ ⊙ ∂L/∂θ`` of the layer's *raw* weight
    ``θ`` (:func:`~lowlearn.sparse.mask.raw_weight`), with its ``.grad`` from that step
    and ``θ`` *as it was when that gradient was taken* (before the step: a copy is
    kept from the previous call, or from construction). Under a mask,
    ``w = θ ⊙ m`` and ``∂L/∂θ = m ⊙ ∂L/∂w``, so with ``m² = m`` the increment is
    exactly ``−w ⊙ ∂L/∂w``; pruned weights (``θ = 0``) add nothing. Under another
    parametrization (e.g. Powerpropagation) it is the movement score of ``θ``.

    ``state`` (fit's :class:`~lowlearn.train.TrainState`) is not read: the layers are
    fixed at construction. Everything stays on the device: a call does no host
    synchronisation. Memory: two
    tensors of each scored weight's size (the scores and the copy of ``θ``). Put
    this callback after any callback that changes weights, so that the copy is what
    the next forward pass uses. A layer with no gradient in a step adds nothing.
    To resume an interrupted run (``fit``'s ``start_step``), save :meth:`state_dict`
    with the checkpoint and restore it with :meth:`load_state_dict`.

    Args:
        model: the network, before training starts; the layers are the scored
            layers at construction (masked layers, else every Linear/Conv2d). The
            model may be moved to another device afterwards (as :func:`~lowlearn.train.fit` does), or
            cast to another floating dtype: the scores follow the weights to their device, and are summed
            in the weights' dtype but never below float32 (in bfloat16, whose 8 significant bits hold
            about two decimal digits, a sum of thousands of small increments would stop growing).

    Example:
        ``movement = MovementScores(model); fit(model, data, opt, steps=1000, callbacks=[movement])``,
        then ``prune(model, movement.scores(), 0.1)``.
    """

    def __init__(self, model: nn.Module):
        self._layers = scored_layers(model)
        with torch.no_grad():
            self._before = {name: raw_weight(layer).detach().clone() for name, layer in self._layers.items()}
        self._scores = {name: torch.zeros_like(w, dtype=_summed_in(w.dtype)) for name, w in self._before.items()}

    @torch.no_grad()
    def __call__(self, state: object) -> None:
        for name, layer in self._layers.items():
            theta = raw_weight(layer)
            if (self._before[name].device, self._before[name].dtype) != (theta.device, theta.dtype):
                # the model was moved or cast since the last call: the scores follow it (float32 at least)
                self._before[name] = self._before[name].to(theta)
                self._scores[name] = self._scores[name].to(theta.device, _summed_in(theta.dtype))
            if theta.grad is not None:
                self._scores[name].addcmul_(self._before[name], theta.grad, value=-1)
            self._before[name].copy_(theta)

    def scores(self) -> dict[str, Tensor]:
        """``{layer name: S}`` so far (copies)."""
        return {name: s.clone() for name, s in self._scores.items()}

    def state_dict(self) -> dict:
        """The scores so far and the copies of ``θ`` the next call subtracts from (copies; save with the model's).

        ``torch.load(..., weights_only=True)`` reads it back.
        """
        return {"scores": self.scores(), "before": {name: b.clone() for name, b in self._before.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from :meth:`state_dict`: the tensors are copied to their layer's device.

        Raises:
            ValueError: a state of other layers, or of weights of other shapes, than
                this callback scores (build it on the model the saved one scored).
        """
        self._scores, self._before = (saved_weights("MovementScores", part, state[part], self._layers)
                                      for part in ("scores", "before"))    # both checked before either is set
