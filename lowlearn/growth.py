"""Growing networks: add units to a hidden layer without changing what the network computes.

A grown layer ``l`` gets ``k`` new units (rows of a Linear weight, filters of a
Conv2d); the next layer ``l+1`` gets the matching new input weights. Three ways to
choose them, each leaving the network's function unchanged at the moment of
growth:

* ``"random"``: zero incoming weights and bias, random outgoing weights. The new
  units output ``f(0) = 0``, so nothing changes, whatever their outgoing weights.
* ``"split"``: the ``k`` units with the largest outgoing weights are duplicated
  (incoming weights and bias copied) and their outgoing weights ``u`` shared as
  ``(½ + η)u`` and ``(½ − η)u`` with a small random ``η`` that breaks the symmetry
  (splitting, as in Net2Net, Chen, Goodfellow & Shlens 2016, and Firefly, Wu et
  al. 2020): two equal activations times weights that sum to ``u``.
* ``"gradmax"``: GradMax (Evci et al. 2022, "GradMax: growing neural networks using
  gradient information", ICLR). Zero incoming weights ``W_new``, and outgoing
  weights ``U_new`` that maximise the gradient of the loss with respect to
  ``W_new`` on a batch, under a norm constraint. For a Linear pair, with layer
  inputs ``x`` and back-propagated errors ``δ = ∂L/∂z_{l+1}`` at the next layer's
  output, ``∂L/∂W_new = f'(0) · U_newᵀ M`` with ``M = Σ_batch δ xᵀ``: the first-order
  Taylor argument of the paper. Among ``k`` new units whose outgoing weights are
  orthogonal and of one norm ``c``, ``‖∂L/∂W_new‖_F`` is largest when they are ``c``
  times the top-``k`` left singular vectors of ``M`` (their eq. 6;
  :func:`gradmax_directions`); under a bound on ``‖U_new‖_F`` alone, the maximiser
  would put all the weight on the first singular vector. For convolutions, where
  the paper builds ``M`` from image patches, ``"gradmax"`` finds the same subspace
  by subspace iteration on the map ``U ↦ ∂L/∂W_new``, with autograd's double
  backward (:func:`gradmax_directions` with ``closed_form=False``; the paper's
  GradMax-Opt maximises the same norm by gradient ascent). The choice does not
  depend on ``f'(0)``, a constant factor of the map, except when it is 0 (ReLU):
  then it is made with ``f'(0) = 1``, as the closed form and the authors' code
  (their "relu1") do.

Outgoing weights of new units get, per unit, the mean norm of the existing units'
outgoing weights (times ``scale``), for random and GradMax alike; where those are all
zero, the norm of PyTorch's default initialisation of the next layer. The gradient that
reaches zero incoming weights carries the factor ``f'(0)``: use an activation with
``f(0) = 0`` and ``f'(0)`` well away from 0, such as tanh (``f'(0) = 1``). PyTorch
gives leaky ReLU the gradient of its negative slope at 0 (0.01 by default), so new
units start learning a hundred times more slowly than under tanh, and ReLU the
gradient 0, so they never start; grow with ``epsilon > 0`` small random incoming
weights then, at the price of changing the function by ``O(ε)``.

Supported pairs: two Linear layers, or two Conv2d layers, of an ``nn.Sequential``
(nested ones are read in order), with only activations, dropout and pooling
between them.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .checks import check_batch, check_count, check_flag, check_non_negative
from .distributed import world
from .optim_state import fresh_state, group_of, torch_optimizer
from .sparse.export import chain, check_chain
from .train import buffers_restored, eval_mode, generator_on

STRATEGIES = ("random", "split", "gradmax")
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BETWEEN = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Identity, *_DROPOUT, nn.MaxPool2d,
            nn.AvgPool2d)
LossFn = Callable[[Tensor, Tensor], Tensor]


def layer_pair(model: nn.Sequential, layer: int) -> tuple[nn.Module, nn.Module]:
    """The layer at position ``layer`` among the model's Linear/Conv2d layers, and the next one.

    Raises:
        ValueError: no next layer, layers of different kinds, a layer used at several
            places (tied), grouped convolutions, or something between them that growth
            cannot see through.
    """
    check_chain(model, "growth")
    leaves = chain(model)
    positions = [i for i, m in enumerate(leaves) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not 0 <= layer < len(positions) - 1:
        raise ValueError(f"layer must index a hidden Linear/Conv2d layer, 0 .. {len(positions) - 2}; got {layer}")
    first, second = positions[layer], positions[layer + 1]
    grown, consumer = leaves[first], leaves[second]
    tied = [i for i, m in zip((layer, layer + 1), (grown, consumer)) if sum(leaf is m for leaf in leaves) > 1]
    if tied:
        raise ValueError(f"cannot grow layers used at several places of the chain (layers {tied}): a new unit "
                         "would change the shapes of every use; give each place its own layer")
    parametrized = [i for i, m in zip((layer, layer + 1), (grown, consumer)) if parametrize.is_parametrized(m)]
    if parametrized:
        raise ValueError(f"cannot grow between parametrized layers (layers {parametrized} carry masks or Powerprop): "
                         "growth edits the weight tensors themselves; grow first, then mask or reparameterise")
    if type(grown) is not type(consumer):
        raise ValueError(f"growth supports Linear→Linear and Conv2d→Conv2d pairs; got {type(grown).__name__}→"
                         f"{type(consumer).__name__}")
    grouped = [type(m).__name__ for m in (grown, consumer) if getattr(m, "groups", 1) != 1]
    if grouped:
        raise ValueError(f"cannot grow grouped convolutions ({grouped} with groups > 1): a new channel would "
                         "have to join one group of each; grow between ungrouped layers")
    odd = [type(m).__name__ for m in leaves[first + 1:second] if not isinstance(m, _BETWEEN)]
    if odd:
        raise ValueError(f"cannot grow through {odd}: only activations, dropout and pooling may sit between the "
                         "grown layer and the next")
    return grown, consumer


def width(model: nn.Sequential, layer: int) -> int:
    """Units of the ``layer``-th Linear/Conv2d layer (its output features or channels)."""
    return layer_pair(model, layer)[0].weight.shape[0]


def _batch_signals(model: nn.Module, grown: nn.Module, consumer: nn.Module, batch: tuple[Tensor, Tensor],
                   loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """``(x, δ)``: the grown layer's input and ``∂L/∂`` the next layer's output, on ``batch``.

    The model's buffers (batch-norm statistics) are left as they were. Backward starts
    from the grown layer's output, so frozen layers (``requires_grad=False``) need no gradient.
    """
    seen: dict[str, Tensor] = {}

    def keep_input(module, inputs, output):
        seen["x"] = inputs[0].detach()
        seen["h"] = output.detach().requires_grad_()
        return seen["h"].clone()                   # not the leaf itself, which an in-place activation would overwrite

    def keep_error(module, inputs, output):
        output.register_hook(lambda grad: seen.__setitem__("delta", grad.detach()))

    handles = [grown.register_forward_hook(keep_input), consumer.register_forward_hook(keep_error)]
    try:
        with torch.enable_grad(), buffers_restored(model):
            loss = loss_fn(model(batch[0]), batch[1])
            torch.autograd.grad(loss, seen["h"])
    finally:
        for handle in handles:
            handle.remove()
    return seen["x"], seen["delta"]


def gradmax_directions(model: nn.Sequential, layer: int, k: int, batch: tuple[Tensor, Tensor],
                       loss_fn: LossFn = F.cross_entropy, *, closed_form: bool | None = None, iterations: int = 50,
                       generator: torch.Generator | None = None) -> Tensor:
    """Orthonormal outgoing weights of ``k`` new units that maximise ``‖∂L/∂W_new‖_F`` (GradMax).

    Args:
        model, layer: the grown layer (see :func:`layer_pair`).
        k: new units.
        batch: ``(inputs, targets)`` the gradient is measured on, with dropout off
            (the model's modes are restored).
        loss_fn: the training loss.
        closed_form: the top-``k`` left singular vectors of ``M = Σ δ xᵀ`` (Linear
            pairs only), or subspace iteration on ``U ↦ ∂L/∂W_new`` (any pair).
            Default: the closed form where there is one.
        iterations: subspace iterations.
        generator: the iteration's random start (one on another device than the model
            seeds one on the model's device: :func:`lowlearn.train.generator_on`).

    Returns:
        ``(k, *shape)``: the new units' outgoing weights, one per row, flattened
        columns of unit Frobenius norm that are orthogonal to each other, shaped
        like ``consumer.weight[:, i]`` (``(n_{l+1},)`` or ``(n_{l+1}, k_h, k_w)``).

    Raises:
        ValueError: ``k`` or ``iterations`` below 1, ``closed_form=True`` for a
            convolution, more directions ``k`` than the outgoing weights have
            dimensions, or a pair :func:`layer_pair` refuses.
        TypeError: ``closed_form`` other than ``None``, ``True`` or ``False``.
    """
    check_count("k (directions)", k, 1)
    check_count("iterations", iterations, 1)
    grown, consumer = layer_pair(model, layer)
    generator = generator_on(generator, grown.weight.device)
    closed_form = isinstance(grown, nn.Linear) if closed_form is None else check_flag("closed_form", closed_form)
    if closed_form and not isinstance(grown, nn.Linear):
        raise ValueError("GradMax's closed form is for Linear pairs; use closed_form=False for convolutions")
    with _without_dropout(model):
        if not closed_form:
            return _subspace_iteration(model, layer, k, batch, loss_fn, iterations, generator)
        x, delta = _batch_signals(model, grown, consumer, batch, loss_fn)
    m = delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])              # (n_{l+1}, n_{l-1})
    if k > m.shape[0]:
        raise ValueError(f"GradMax finds at most {m.shape[0]} orthogonal outgoing directions here; got k={k}")
    # Past rank M ≤ min(n_{l+1}, n_{l-1}), the remaining left singular vectors (σ = 0) complete the basis.
    left = torch.linalg.svd(m.to(_linalg_dtype(m)), full_matrices=k > min(m.shape))[0]
    return left[:, :k].T.to(m.dtype).contiguous()


def _linalg_dtype(x: Tensor) -> torch.dtype:
    """float32 at least: torch's SVD and QR have no half-precision kernels."""
    return torch.promote_types(x.dtype, torch.float32)


@contextmanager
def _without_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout in eval mode (restored afterwards): ``M`` is then a function of the batch, not of random masks."""
    with ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, _DROPOUT):
                stack.enter_context(eval_mode(module))
        yield


def _subspace_iteration(model: nn.Sequential, layer: int, k: int, batch: tuple[Tensor, Tensor], loss_fn: LossFn,
                        iterations: int, generator: torch.Generator | None) -> Tensor:
    """Top-``k`` right singular subspace of ``A: U ↦ ∂L/∂W_new`` by ``U ← orth(AᵀA U)`` (autograd double backward)."""
    probe = copy.deepcopy(model)
    grown, consumer = layer_pair(probe, layer)
    leaves = chain(probe)
    relus = [m for m in leaves[leaves.index(grown) + 1:leaves.index(consumer)] if isinstance(m, nn.ReLU)]
    gap = [False]            # between the two layers' calls: a ReLU module may be used at other places of the model too
    grown.register_forward_hook(lambda *_: gap.__setitem__(0, True))
    consumer.register_forward_pre_hook(lambda *_: gap.__setitem__(0, False))
    for relu in relus:
        relu.inplace = False                       # the hook reads the ReLU's input, which in place it overwrites
        relu.register_forward_hook(lambda module, inputs, output: _gradient_one_at_zero(inputs[0], output)
                                   if gap[0] else None)
    size = consumer.weight[:, 0].numel()
    if k > size:
        raise ValueError(f"GradMax finds at most {size} orthogonal outgoing directions here (a unit's outgoing "
                         f"weights, {tuple(consumer.weight[:, 0].shape)}); got k={k}")
    old = grown.weight.shape[0]
    _add_units(grown, consumer, grown.weight.new_zeros((k, *grown.weight.shape[1:])), None,
               consumer.weight.new_zeros((consumer.weight.shape[0], k, *consumer.weight.shape[2:])))
    for weight in (grown.weight, consumer.weight):  # differentiated here even where the model's are frozen
        weight.requires_grad_(True)
    shape = consumer.weight[:, 0].shape
    directions = torch.randn(k, shape.numel(), generator=generator, device=grown.weight.device,
                             dtype=_linalg_dtype(grown.weight))
    for _ in range(iterations):
        directions = torch.linalg.qr(directions.T)[0].T                                 # orthonormal rows
        with torch.no_grad():
            consumer.weight[:, old:] = directions.reshape(k, *shape).transpose(0, 1)
        with torch.enable_grad():
            loss = loss_fn(probe(batch[0]), batch[1])
            (grad,) = torch.autograd.grad(loss, grown.weight, create_graph=True)
            (ata,) = torch.autograd.grad(grad[old:].square().sum() / 2, consumer.weight)
        directions = ata[:, old:].transpose(0, 1).reshape(k, -1).detach().to(directions.dtype)
    return torch.linalg.qr(directions.T)[0].T.reshape(k, *shape).to(grown.weight.dtype).contiguous()


def _gradient_one_at_zero(inputs: Tensor, output: Tensor) -> Tensor:
    """A ReLU's output whose gradient is 1: at the new units' zero inputs, ``f'(0) = 1`` instead of 0."""
    return inputs + (output - inputs).detach()


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def grow(model: nn.Sequential, layer: int, k: int, strategy: str = "gradmax", *,
         batch: tuple[Tensor, Tensor] | None = None, loss_fn: LossFn = F.cross_entropy,
         optimizer: torch.optim.Optimizer | None = None, max_width: int | None = None, scale: float = 1.0,
         epsilon: float = 0.0, noise: float = 0.01, generator: torch.Generator | None = None) -> Tensor:
    """Add ``k`` units to a hidden layer, in place, without changing the network's function.

    Args:
        model: an ``nn.Sequential`` (see the module docstring).
        layer: which Linear/Conv2d layer grows, counting from 0 (not the last).
        k: new units, ``> 0``.
        strategy: ``"random"``, ``"split"`` or ``"gradmax"``.
        batch: ``(inputs, targets)``, needed by GradMax.
        loss_fn: the loss GradMax maximises the gradient of.
        optimizer: the model's optimizer (a ``torch.optim`` optimizer, or a wrapper of one
            with an ``optimizer`` attribute, such as
            :class:`~lowlearn.powerprop.PowerPropOptimizer`): the grown parameters
            replace the old ones in it (those it holds), and their per-parameter state
            (momentum, Adam's moments) is extended for the new weights with the values a
            new parameter starts from (zeros for these). Adam's step count is one per
            tensor and is kept, so the new weights' first steps are larger than a new
            parameter's (:func:`lowlearn.optim_state.reset_optimizer_state` says how much).
        max_width: refuse to grow beyond this many units.
        scale: new outgoing weights get ``scale`` times the mean norm of the existing
            units' outgoing weights (random and GradMax), or, where those are all zero (a
            next layer initialised at zero) or there are no units yet, times the norm
            PyTorch's default initialisation of the next layer gives a unit's outgoing
            weights: new units with zero weights both ways would never learn.
        epsilon: standard deviation of random incoming weights of new units
            (random and GradMax; 0 keeps the function exactly).
        noise: splitting's symmetry-breaking ``η``, uniform in ``±noise``.
        generator: for the random choices (one on another device than the model, e.g.
            made before :func:`lowlearn.train.fit` moved the model to a GPU, seeds one on
            the model's device: :func:`lowlearn.train.generator_on`).

    Returns:
        The indices of the new units in the grown layer.

    Raises:
        ValueError: ``k <= 0``, growth past ``max_width``, an unknown strategy,
            GradMax without a batch, splitting more units than the layer has, a
            pair of layers growth does not support, a ``scale``, ``epsilon`` or ``noise``
            that is negative or not finite, or optimizer state growth cannot extend
            (not shaped like its parameter, such as Adafactor's, or L-BFGS's
            flattened history); the model is then left as it was.
        TypeError: an ``optimizer`` that is not a ``torch.optim`` optimizer (nor wraps one), or
            a ``batch`` that is not a pair of tensors.
    """
    check_count("k (units to grow)", k, 1)
    _check_strategy(strategy)
    _check_options(scale=scale, epsilon=epsilon, noise=noise)
    if batch is not None:
        batch = check_batch(batch)
    grown, consumer = layer_pair(model, layer)
    old = grown.weight.shape[0]
    if max_width is not None and old + k > max_width:
        raise ValueError(f"layer {layer} has {old} units: growing {k} more would pass max_width={max_width}")
    if optimizer is not None:                   # before anything changes (splitting rewrites the consumer in place)
        changed = [grown.weight, grown.bias, consumer.weight]
        optimizer = torch_optimizer(optimizer, holding=changed)
        _check_state_layouts(optimizer, changed)
        fresh = _new_units_states(optimizer, [(grown.weight, 0), (grown.bias, 0), (consumer.weight, 1)], k)
    weight, out = grown.weight.detach(), consumer.weight.detach()
    device, dtype = weight.device, weight.dtype
    generator = generator_on(generator, device)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    kernel = math.prod(out.shape[2:])                           # 1 for a Linear consumer
    outgoing_norms = out.transpose(0, 1).reshape(old, out.shape[0] * kernel).norm(dim=1)   # one per existing unit
    # PyTorch's default initialisation of the consumer, U(±1/√fan_in) after growth: E‖column‖² = size / (3 fan_in).
    default_norm = (out.shape[0] / (3 * (old + k))) ** 0.5
    mean_norm = outgoing_norms.mean()                                               # NaN without units
    target = scale * torch.where(mean_norm > 0, mean_norm, default_norm)
    incoming = epsilon * randn(k, *weight.shape[1:])
    bias = None
    if strategy == "split":
        if k > old:
            raise ValueError(f"splitting copies {k} distinct units, but layer {layer} has only {old}: grow in steps "
                             f"of at most {old}")
        chosen = outgoing_norms.topk(k).indices
        incoming = weight[chosen].clone()
        bias = None if grown.bias is None else grown.bias.detach()[chosen].clone()
        share = 0.5 + noise * (2 * torch.rand(k, generator=generator, device=device, dtype=dtype) - 1)
        share = share.view(1, k, *[1] * (out.dim() - 2))
        outgoing = out[:, chosen] * share
        with torch.no_grad():
            consumer.weight[:, chosen] = out[:, chosen] * (1 - share)
    elif strategy == "random":
        directions = randn(k, out.shape[0] * kernel)
        outgoing = _as_columns(directions / directions.norm(dim=1, keepdim=True), out) * target
    else:
        if batch is None:
            raise ValueError("GradMax needs a batch (inputs, targets) to measure the gradient on")
        directions = gradmax_directions(model, layer, k, batch, loss_fn, generator=generator)
        outgoing = _as_columns(directions.reshape(k, -1), out) * target
    params = _add_units(grown, consumer, incoming, bias, outgoing)
    if optimizer is not None:
        for old_param, new_param, dim in params:
            _extend_state(optimizer, old_param, new_param, dim, fresh.get(old_param))
    return torch.arange(old, old + k, device=device)


def _check_options(**options: float) -> None:
    """Refuse a growth option (``scale``, ``epsilon``, ``noise``) that is not a finite number ≥ 0."""
    for name, value in options.items():
        check_non_negative(name, value)


def _as_columns(directions: Tensor, out: Tensor) -> Tensor:
    """``(k, D)`` flat directions as outgoing weights shaped like ``out[:, new]``: ``(n_{l+1}, k, ...)``."""
    return directions.reshape(directions.shape[0], out.shape[0], *out.shape[2:]).transpose(0, 1)


def _add_units(grown: nn.Module, consumer: nn.Module, incoming: Tensor, bias: Tensor | None,
               outgoing: Tensor) -> list[tuple[nn.Parameter, nn.Parameter, int]]:
    """Append units to both layers as new parameters; ``[(old, new, grown dim)]`` for the optimizer."""
    k = incoming.shape[0]
    changes = []

    def replace(module: nn.Module, name: str, value: Tensor, dim: int) -> None:
        old = getattr(module, name)
        layout = torch.channels_last if old.dim() == 4 and old.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format           # a channels_last model stays channels_last
        new = nn.Parameter(value.detach().clone(memory_format=layout), requires_grad=old.requires_grad)
        setattr(module, name, new)
        changes.append((old, new, dim))

    replace(grown, "weight", torch.cat([grown.weight.detach(), incoming.to(grown.weight)]), 0)
    if grown.bias is not None:
        extra = grown.bias.new_zeros((k,)) if bias is None else bias
        replace(grown, "bias", torch.cat([grown.bias.detach(), extra]), 0)
    replace(consumer, "weight", torch.cat([consumer.weight.detach(), outgoing.to(consumer.weight)], dim=1), 1)
    if isinstance(grown, nn.Linear):
        grown.out_features += k
        consumer.in_features += k
    else:
        grown.out_channels += k
        consumer.in_channels += k
    return changes


def _check_state_layouts(optimizer: torch.optim.Optimizer, params: list[nn.Parameter | None]) -> None:
    """Refuse, before anything grows, per-parameter state that :func:`_extend_state` cannot extend.

    It extends state shaped like its parameter (SGD's momentum, Adam's moments) and
    keeps numbers and scalar tensors (Adam's step count); other shapes, such as
    Adafactor's factored moments, it does not know how to grow. An optimizer whose
    step needs a closure (L-BFGS) keeps a history of all its parameters flattened
    together, which it cannot grow either.
    """
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"{type(optimizer).__name__} keeps a history of its parameters flattened together, which "
                         "grow cannot extend; grow without optimizer= and build a new optimizer for the grown model")
    for param in params:                                   # a missing bias (None) has no state either
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for a "
                                 f"parameter of shape {tuple(param.shape)}, which grow cannot extend (it extends "
                                 "state shaped like the parameter, as SGD's and Adam's); grow without optimizer= "
                                 "and build a new optimizer for the grown model")


def _new_units_states(optimizer: torch.optim.Optimizer, params: list[tuple[nn.Parameter | None, int]],
                      k: int) -> dict[nn.Parameter, dict]:
    """``{param: the state of its k new slices along dim}`` for each ``(param, dim)`` with optimizer state.

    The new weights get the state that a new parameter gets from the optimizer's
    first step with a zero gradient: zeros for SGD's momentum and Adam's moments,
    Adagrad's ``initial_accumulator_value``, Rprop's learning rate as the step size.
    Computed before the model changes, so an optimizer that cannot be probed so fails
    while the model is as it was.
    """
    states = {}
    for param, dim in params:
        group = group_of(optimizer, param)
        if group is not None and param in optimizer.state:
            pad = list(param.shape)
            pad[dim] = k
            states[param] = fresh_state(optimizer, group, param.detach().new_zeros(pad))
    return states


def _extend_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int,
                  fresh: dict | None) -> None:
    """Swap ``old`` for ``new`` in the optimizer; extend its per-weight state along ``dim`` by ``fresh``.

    ``fresh`` is :func:`_new_units_states`' entry for ``old``. A parameter the
    optimizer does not hold (one it was not given to train) stays out of it.
    """
    group = group_of(optimizer, old)
    if group is None:
        return
    group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    pad = list(old.shape)
    pad[dim] = new.shape[dim] - old.shape[dim]
    optimizer.state[new] = {key: torch.cat([value, fresh.get(key, value.new_zeros(pad))], dim=dim)
                            if torch.is_tensor(value) and value.shape == old.shape else value
                            for key, value in state.items()}


class GrowthSchedule:
    """Grow a layer by ``k`` units every ``every`` steps until it has ``target`` units: a callback for ``fit``.

    Args:
        layer: which Linear/Conv2d layer grows (see :func:`grow`).
        k: units per growth (the last growth may add fewer, to land on ``target``). The
            schedule does not see the model before training, so what :func:`grow` needs of
            ``k`` and the model is checked at the first growth: splitting copies ``k``
            distinct units, so ``"split"`` needs ``k`` at most the layer's width before
            it grows, and GradMax ``k`` orthogonal outgoing directions, at most the size
            of a unit's outgoing weights (the next layer's outputs, times its kernel
            size for a convolution).
        every: optimizer steps between growths.
        target: the final width.
        strategy: as for :func:`grow`.
        batch: ``batch() → (inputs, targets)``, called at each growth for GradMax.
        **options: passed on to :func:`grow` (``loss_fn``, ``scale``, ``epsilon``, ``generator`` ...).

    Raises:
        ValueError: ``k``, ``every`` or ``target`` not a positive integer, a ``layer`` that
            is not an integer >= 0, an unknown strategy, GradMax without ``batch``, or a
            ``scale``, ``epsilon`` or ``noise`` that :func:`grow` refuses.
        TypeError: an option that :func:`grow` does not take, or one the schedule sets
            itself (``max_width`` is ``target``, ``optimizer`` the training loop's).
        RuntimeError: at the first growth, in a ``torch.distributed`` process group of
            more than one process (growth in data-parallel training is not supported).

    At the first growth, during training, :func:`grow` raises its ValueErrors: a
    ``layer`` that is not a hidden Linear/Conv2d layer of the model (or a pair of
    layers growth does not support), a ``k`` that ``"split"`` or GradMax cannot grow
    (see ``k``), or optimizer state that growth cannot extend.
    """

    def __init__(self, layer: int, k: int, every: int, target: int, strategy: str = "gradmax", *,
                 batch: Callable[[], tuple[Tensor, Tensor]] | None = None, **options):
        check_count("layer (counting the Linear/Conv2d layers from 0)", layer, 0)
        for name, value in (("k (units per growth)", k), ("every (steps between growths)", every),
                            ("target (the layer's final width)", target)):
            check_count(name, value, 1)
        _check_strategy(strategy)
        allowed = set(inspect.signature(grow).parameters) - {"model", "layer", "k", "strategy", "batch", "optimizer",
                                                             "max_width"}
        wrong = sorted(options.keys() - allowed)
        if wrong:
            raise TypeError(f"GrowthSchedule cannot pass {wrong} on to grow(): its options are {sorted(allowed)} "
                            "(the schedule sets the others itself; max_width is target)")
        if strategy == "gradmax" and batch is None:
            raise ValueError("GradMax needs batch=, a function that returns a batch (inputs, targets)")
        _check_options(**{name: options[name] for name in ("scale", "epsilon", "noise") if name in options})
        self.layer, self.k, self.every, self.target = layer, k, every, target
        self.strategy, self.batch, self.options = strategy, batch, options
        self.grown_at: list[int] = []

    def __call__(self, state) -> None:
        if state.step % self.every:
            return
        current = width(state.model, self.layer)
        if current >= self.target:
            return
        if world()[1] > 1:
            raise RuntimeError("growth replaces the grown layers' parameters, which DistributedDataParallel cannot "
                               "follow during training: grow in a single process")
        batch = self.batch() if self.batch is not None else None
        grow(state.model, self.layer, min(self.k, self.target - current), self.strategy, batch=batch,
             optimizer=state.optimizer, max_width=self.target, **self.options)
        self.grown_at.append(state.step)
