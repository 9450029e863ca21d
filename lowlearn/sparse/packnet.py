"""Continual learning by packing tasks into one network: each task owns a sparse subset of the weights.

Mallya & Lazebnik (2018), "PackNet: adding multiple tasks to a single network by
iterative pruning" (CVPR). Tasks arrive one after another; the network must not
forget the earlier ones. PackNet gives every task its own weights:

1. **train** task ``t`` on the *free* weights, with the weights of tasks ``1..t−1``
   used in the forward pass but frozen (:meth:`PackNet.start_task`);
2. **assign** the largest-magnitude free weights (a fraction of each layer) to task
   ``t``; the other free weights leave the network and are re-initialised for the
   next task (:meth:`PackNet.assign`); optionally retrain task ``t``'s weights alone;
3. **evaluate** task ``s`` with the weights of tasks ``1..s`` only
   (:meth:`PackNet.use_task`), exactly the network that task ``s`` was trained with.

Earlier tasks are therefore never forgotten (given the optimizer, whose state of
their weights PackNet resets), and the network holds as many tasks as its weights
allow. A method that leaves fewer weights doing the work, such as
Powerpropagation (:mod:`lowlearn.powerprop`), loses less at step 2 and so packs tasks
with less capacity: this is the paper's second use of Powerprop (Schwarz et al.
2021, section 5).

The masks are :class:`~lowlearn.sparse.mask.SplitMask` parametrizations (forward:
the weights in use; backward: the weights that learn). The other parameters
(biases, norm layers, and batch norm's running statistics) learn with the first
task only and are frozen afterwards, as in PackNet; a task's own parameters, such as
its output head, learn in that task (``start_task(own=...)``). The optimizer must
not decay the shared layers' weights: their gradient is zero where an earlier task
owns them, and weight decay would shrink them regardless. The other parameters may
be decayed while they learn; frozen, they have no gradient, and ``torch.optim``
optimizers leave a parameter without a gradient (and so its decay) alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..checks import check_count, is_integer
from ..optim_state import reset_optimizer_state
from ..reparam import raw_value, register
from ..train import generator_on, restore_generator, seeded_generator
from .mask import (SplitMask, find_mask, raw_weight, refuse_weight_decay, resolve_layers, saved_weights,
                   weights_device)
from .prune import check_density, kept_count, top_k_mask

FREE = 0


def _module_of(parameter: str) -> str:
    """The qualified name of the module that holds the parameter named ``parameter``."""
    return parameter.rpartition(".")[0]


def _first_task_statistics(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: normalise with the running statistics and leave them as they are."""
    module.training = False


_REDRAWN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""The layers whose default initialisation (uniform in ±1/√fan_in) :meth:`PackNet.assign` re-draws released weights
from: the layers PackNet shares."""


class PackNet:
    """Weights owned by tasks: see the module docstring.

    Args:
        model: the model; every ``nn.Linear``/``nn.Conv2d`` weight (or ``layers``)
            gets a :class:`~lowlearn.sparse.mask.SplitMask`. Apply
            :func:`lowlearn.powerprop.powerprop` before, if wanted.
        layers: qualified names of the layers to share among tasks: linear and
            convolution layers (transposed too).
        seed: seeds the re-initialisation of released weights (through
            :func:`lowlearn.train.seeded_generator`, so that it does not repeat the
            initial weights that ``torch.manual_seed(seed)`` drew).

    Attributes:
        owner: ``{name: int tensor}``, the task (1, 2, ...) owning each weight, 0 if free.
        tasks: the number of tasks assigned so far.
        frozen: whether the parameters outside the shared weights are frozen (from
            the second task on).
        own: qualified names of the parameters of the task being trained alone
            (``start_task(own=...)``).
        own_modules: qualified names of the modules that hold them (those named in
            ``own=``, and each own parameter's module): their batch norms learn
            their running statistics in the task.
        started: whether :meth:`start_task` began a task that :meth:`assign` has not
            yet given its weights.

    Raises:
        ValueError: no layer to share, a chosen layer that already has a mask or is not a linear or
            convolution layer, or a ``seed`` that is not an int >= 0.
        KeyError: a name in ``layers`` that is not a module of the model.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None, seed: int = 0):
        check_count("seed", seed, 0)
        self.model, self.tasks, self.frozen, self.started = model, 0, False, False
        self.own: tuple[str, ...] = ()
        self.own_modules: tuple[str, ...] = ()
        self.layers = resolve_layers(model, layers)
        if not self.layers:
            raise ValueError("no layers to share among the tasks: the model has no nn.Linear or nn.Conv2d, or "
                             "layers is empty")
        for name, layer in self.layers.items():       # every layer checked first: a refused call changes nothing
            if find_mask(layer) is not None:
                raise ValueError(f"layer {name!r} already has a mask; PackNet needs an unmasked model")
            if not isinstance(layer, _REDRAWN):
                raise ValueError(f"layer {name!r} is a {type(layer).__name__}: PackNet re-draws the weights a task "
                                 "releases from the default initialisation of linear and convolution layers "
                                 "(uniform in ±1/√fan_in), which is not this layer's; share only nn.Linear and "
                                 "convolution layers")
        for layer in self.layers.values():
            keep = torch.ones_like(layer.weight, dtype=torch.bool)
            register(layer, "weight", SplitMask(keep, keep, layer.weight.dtype))
        self.owner = {name: torch.zeros_like(layer.weight, dtype=torch.int16) for name, layer in self.layers.items()}
        self.generator = seeded_generator(seed, "PackNet", weights_device(self.layers))

    def _follow_model(self) -> None:
        """Move each layer's owners to the device of its weight (the model may have moved since)."""
        for name, layer in self.layers.items():
            self.owner[name] = self.owner[name].to(raw_weight(layer).device)

    def _set(self, forward: Mapping[str, Tensor], backward: Mapping[str, Tensor]) -> None:
        for name, layer in self.layers.items():
            mask = find_mask(layer)
            mask.mask.copy_(forward[name])
            mask.backward_mask.copy_(backward[name])

    def free_fraction(self) -> dict[str, float]:
        """``{name: fraction of the layer's weights not yet owned by a task}``."""
        self._follow_model()
        return {name: (owner == FREE).float().mean().item() for name, owner in self.owner.items()}

    def start_task(self, optimizer: torch.optim.Optimizer | None = None, *, own: Iterable[str] = ()) -> int:
        """Train task ``tasks + 1`` next: all weights in the forward pass, only the free ones learn.

        From the second task on, every parameter outside the shared layers' weights
        (biases, norm layers) is frozen (``requires_grad = False``, its gradient and
        optimizer state dropped), and the optimizer's state of the earlier tasks'
        weights is reset to a new parameter's (zero momentum and moments). Norm
        layers with running statistics (batch norm) then always run in evaluation
        mode, so that they keep normalising with the first task's statistics, as
        PackNet's code does: in training mode they would replace them with the later
        tasks'. Only the batch norms of the task's ``own`` modules learn theirs, in
        the task. Returns the task's number.

        Args:
            optimizer: the optimizer that trains the task, whose state is kept in step.
                Leave it out only for one without per-weight state (plain SGD): an
                earlier task's momentum or Adam moments would go on moving its frozen
                weights, and the task would be forgotten.
            own: names of parameters or modules that belong to this task alone and
                learn in it whatever its number, such as its output head
                (``"heads.2"``); they are frozen from the next task on. Leave out
                the shared layers.

        Raises:
            ValueError: no free weights are left, the optimizer decays the shared layers'
                weights (see the module docstring), or ``own`` names something the
                model lacks or a shared layer's weight.
        """
        self._follow_model()
        if optimizer is not None:
            refuse_weight_decay(optimizer, [raw_weight(layer) for layer in self.layers.values()],
                                "PackNet keeps the earlier tasks' weights in the shared layers frozen (only the other "
                                "parameters may be decayed)")
        if not any((owner == FREE).any() for owner in self.owner.values()):
            raise ValueError(f"the network is full: all its weights belong to the {self.tasks} tasks so far")
        self.own, self.own_modules = self._own_parameters(own)
        free = {name: owner == FREE for name, owner in self.owner.items()}
        self._set({name: torch.ones_like(f) for name, f in free.items()}, free)
        if self.tasks >= 1:
            self._freeze_the_first_tasks_parameters(optimizer)
        if optimizer is not None:
            for name, layer in self.layers.items():
                reset_optimizer_state(optimizer, raw_weight(layer), free[name])
        self.started = True
        return self.tasks + 1

    def _shared_weight_ids(self) -> set[int]:
        """The ``id`` of each shared layer's raw weight, the parameters PackNet divides among the tasks."""
        return {id(raw_weight(layer)) for layer in self.layers.values()}

    def _own_parameters(self, names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The qualified names of the parameters that ``names`` (parameters or modules) stand for, and of the modules
        that hold them."""
        if isinstance(names, str):
            names = (names,)
        params, modules = dict(self.model.named_parameters()), dict(self.model.named_modules())
        shared = self._shared_weight_ids()
        own, holders = [], []
        for name in names:
            if name in params:
                found = [name]
                holders.append(_module_of(name))
            elif name in modules:
                holders.append(name)
                prefix = f"{name}." if name else ""
                found = [f"{prefix}{p}" for p, _ in modules[name].named_parameters()]
            else:
                raise ValueError(f"own={name!r} is neither a parameter nor a module of the model")
            if any(id(params[p]) in shared for p in found):
                raise ValueError(f"own={name!r} holds a shared layer's weight, which PackNet divides among the "
                                 "tasks: name only the task's own parameters, such as its output head")
            own += found
        return tuple(own), tuple(holders)

    def _freeze_the_first_tasks_parameters(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Freeze every parameter outside the shared weights and :attr:`own`, and the running statistics of the batch
        norms outside :attr:`own_modules`.

        A frozen parameter loses its gradient and its optimizer state, so that no
        momentum moves it (also with ``zero_grad(set_to_none=False)``).
        """
        shared = self._shared_weight_ids()
        for name, param in self.model.named_parameters():
            if name in self.own:
                param.requires_grad_(True)
            elif id(param) not in shared:
                param.requires_grad_(False)
                param.grad = None
                if optimizer is not None:
                    optimizer.state.pop(param, None)
        for name, module in self.model.named_modules():
            if not (isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats):
                continue
            hooks = [key for key, hook in module._forward_pre_hooks.items() if hook is _first_task_statistics]
            if any(name == own or name.startswith(f"{own}.") for own in self.own_modules):
                for key in hooks:       # it learns in this task; registered without kwargs, only this dict holds it
                    del module._forward_pre_hooks[key]
            elif not hooks:
                module.register_forward_pre_hook(_first_task_statistics)
        self.frozen = True

    @torch.no_grad()
    def assign(self, fraction: float, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Give the new task the ``fraction`` largest free weights of each layer; release the rest.

        ``fraction`` is a share of each layer's *total* size (e.g. ``0.1`` for ten
        equal tasks), rounded, and at least one weight of a layer that has any free;
        a layer with fewer free weights gives all it has. (Mallya & Lazebnik's code
        prunes a share ``q`` of the weights the task trained, the free ones, instead:
        that is ``fraction = (1 − q) · f`` for a layer whose free share is ``f``,
        :meth:`free_fraction`.) The released
        free weights are re-drawn from PyTorch's default initialisation of the layer
        (uniform in ``±1/√fan_in``), mapped to the raw parameter through the layer's
        parametrizations. (PackNet's code leaves them at zero, where the next task
        starts them; under Powerpropagation a weight at zero has no gradient and
        would never learn.) Their optimizer state is a new parameter's
        (:func:`lowlearn.optim_state.reset_optimizer_state`). Afterwards the network
        computes with tasks ``1..t`` and only task ``t``'s weights learn (for an
        optional retraining). Returns the task's number ``t``. Pass the ``optimizer``
        that trained the task (see :meth:`start_task`).

        Raises:
            ValueError: ``fraction`` outside (0, 1].
            RuntimeError: no task was begun with :meth:`start_task`: the weights it would
                give away were never trained for a new task, and training without it
                moves the earlier tasks' weights.
        """
        self._follow_model()
        check_density(fraction, "fraction")
        if not self.started:
            raise RuntimeError(f"no task to assign: call start_task() before training task {self.tasks + 1}, then "
                               "assign() its weights (without start_task the earlier tasks' weights learn too)")
        task = self.tasks + 1
        for name, layer in self.layers.items():
            owner, theta = self.owner[name], layer.weight.detach()
            free = owner == FREE
            k = min(kept_count(fraction, owner.numel()), int(free.sum()))
            if k:
                chosen = top_k_mask(theta.abs().masked_fill(~free, -1.0), k)
                owner[chosen] = task
            released = owner == FREE
            self._reinitialise(layer, released)
            if optimizer is not None:
                reset_optimizer_state(optimizer, raw_weight(layer), ~released)
        self.tasks, self.started = task, False
        self._set({name: (owner != FREE) for name, owner in self.owner.items()},
                  {name: owner == task for name, owner in self.owner.items()})
        return task

    def _reinitialise(self, layer: nn.Module, where: Tensor) -> None:
        raw = raw_weight(layer)
        if not raw.numel():              # a layer of no weights (zero inputs or outputs) has none to re-draw
            return
        bound = 1.0 / raw[0].numel() ** 0.5
        self.generator = generator_on(self.generator, raw.device)      # the model may have moved
        fresh = torch.empty_like(raw).uniform_(-bound, bound, generator=self.generator)
        raw.copy_(torch.where(where, raw_value(layer, "weight", fresh), raw))

    @contextmanager
    def use_task(self, task: int) -> Iterator[None]:
        """Inside the block the network computes task ``task`` (weights of tasks ``1..task``), for evaluation.

        No shared weight learns there; the parameters that learn in the task being trained
        (in the first task the biases and norm layers, later its ``own``) still would.

        Raises:
            ValueError: a task that has not been assigned, or one that is not an integer.
        """
        self._follow_model()
        if not is_integer(task) or not 1 <= task <= self.tasks:
            raise ValueError(f"task must be one of the {self.tasks} assigned tasks (1..{self.tasks}), got {task}")
        forward = {name: find_mask(layer).mask != 0 for name, layer in self.layers.items()}
        backward = {name: find_mask(layer).backward_mask != 0 for name, layer in self.layers.items()}
        self._set({name: (owner != FREE) & (owner <= task) for name, owner in self.owner.items()},
                  {name: torch.zeros_like(owner, dtype=torch.bool) for name, owner in self.owner.items()})
        try:
            yield
        finally:
            self._set(forward, backward)

    def state_dict(self) -> dict:
        """Owners, task count, the frozen and started flags, the task's own parameters, and the generator.

        The weights and masks are in the model's ``state_dict``.
        """
        return {"owner": {name: o.clone() for name, o in self.owner.items()}, "tasks": self.tasks,
                "frozen": self.frozen, "started": self.started, "own": list(self.own),
                "own_modules": list(self.own_modules),
                "generator": self.generator.get_state(), "generator_device": str(self.generator.device)}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from :meth:`state_dict`; from the second task on, the model's other parameters are frozen again.

        Raises:
            ValueError: a state of other layers, or of weights of other shapes; a state saved before the
                second task into a PackNet that has frozen the model's other parameters (they would stay
                frozen in the first task); nothing is restored then.
        """
        owner = saved_weights("PackNet", "owner", state["owner"], self.layers)
        tasks = int(state["tasks"])
        frozen = bool(state.get("frozen", tasks >= 2))
        if self.frozen and not frozen:
            raise ValueError("this PackNet has frozen the model's parameters outside the shared weights (from its "
                             "second task on), but the state was saved before the second task began, when they "
                             "still learn: load it into a new model and a new PackNet")
        self.owner, self.tasks = owner, tasks
        self.started, self.own = bool(state.get("started", False)), tuple(state.get("own", ()))
        self.own_modules = tuple(state.get("own_modules", dict.fromkeys(map(_module_of, self.own))))
        self.generator = restore_generator(self.generator, state["generator"], state.get("generator_device"))
        if frozen:
            self._freeze_the_first_tasks_parameters()
