"""A small, explicit training loop: :func:`fit`, :func:`evaluate` and checkpoints.

The loop is what a reader would write by hand, plus the things that are easy to
get wrong:

* the data are moved to the device once and batched by index, so a GPU never
  waits on a Python data loader;
* the loss is accumulated on the device and read back only every ``log_every``
  steps, so the hot loop has no host synchronisation;
* a NaN or infinite loss stops training with an error naming the first bad step;
* callbacks are plain callables run after every ``optimizer.step()`` (a sparsifier,
  a rank truncation, a learning-rate scheduler, a logger); raising
  :class:`StopTraining` in one ends training early;
* the same seed gives the same history on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import math
import operator
import os
import pickle
import random
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parameter import UninitializedTensorMixin
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .atomic import atomic_file
from .checks import check_count, check_flag, check_scalar_loss
from .distributed import broadcast_from_the_first_process, world

Data = TensorDataset | tuple[Tensor, Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of :func:`save_checkpoint` (damaged, cut off, or something else)."""


class StopTraining(Exception):
    """Raise from a callback to end :func:`fit` early (the history is kept)."""


def default_device() -> torch.device:
    """The CUDA device when one is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer; ``None`` for a model without any."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else None


def available_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch device if this machine has it: ``cpu``, ``cuda`` / ``cuda:N`` with a GPU ``N``, ``mps``.

    Raises:
        ValueError: a name torch does not know, a device lowlearn does not run on, or
            one this machine lacks; the message says which devices to use.
    """
    try:
        value = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; e.g. cpu or cuda") from None
    if value.type == "mps" and torch.backends.mps.is_available():
        return value
    if value.type not in ("cpu", "cuda") or (value.type == "cpu" and value.index not in (None, 0)):
        raise ValueError(f"{str(device)!r} is not a device lowlearn runs on here; use cpu or cuda")
    if value.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{str(device)!r} was asked for, but CUDA is not available here; use cpu")
    if value.type == "cuda" and (value.index or 0) >= torch.cuda.device_count():
        last = torch.cuda.device_count() - 1
        raise ValueError(f"{str(device)!r} was asked for, but this machine's GPUs are cuda:0 to cuda:{last}")
    return value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in eval mode, then give each its own mode back.

    Both go through ``Module.train``, so a module that overrides it is told of each change: one that merges a
    low-rank update into its weight for evaluation (loralib's ``Linear``) takes it out again, rather than train on
    with the update merged, and no gradient for its factors.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:          # parents first: train() sets a module's children too
            if module.training != training:
                module.train(training)


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Give every buffer of ``model`` its value back afterwards.

    A batch norm in training mode updates its running statistics on every forward
    pass; code that only measures or evaluates should leave no trace in them. A
    buffer that the block replaced (``self.count = self.count + 1``) gets its own
    tensor back, with its old value.

    The values are written back as batch norm writes its running statistics: unseen
    by autograd (no version bump). A graph made in the block that saved a buffer, such
    as the second-order inner loop that :meth:`lowlearn.meta.maml.MAML.adapt` returns, can
    then still be differentiated after it.
    """
    saved = [(module, name, buffer, buffer.clone()) for module in model.modules()
             for name, buffer in module.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for module, name, buffer, value in saved:
            module._buffers[name] = buffer
            buffer.data.copy_(value)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) random number generators.

    NumPy takes seeds in ``0 .. 2**32 − 1`` only; it gets ``seed`` modulo ``2**32``. torch's CPU
    generator (a Mersenne twister) keeps only the low 32 bits of any seed, so seeds ``2**32``
    apart draw alike there: for runs that differ, use seeds below ``2**32``. A NumPy integer is
    taken as the Python int it holds (torch and Python's ``random`` refuse it).
    """
    seed = operator.index(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, stream: str) -> int:
    """The seed of the random stream named ``stream`` (a method's draws) under the user's ``seed``.

    ``seed`` hashed with ``stream`` (SHA-256, 63 bits), not ``seed`` itself. A CPU
    generator seeded with ``seed`` would repeat, number for number, what
    ``torch.manual_seed(seed)`` (:func:`seed_everything`) drew for the model's initial
    weights: both are the same Mersenne twister, and ``torch.rand`` and
    ``nn.init.uniform_`` map its numbers alike. A "random" mask drawn from it keeps
    the first layer's largest *initial* weights, all of them positive; a "fresh"
    initialisation repeats the first one. Streams of different names are
    independent, and each is the same on every run and machine.

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    digest = hashlib.sha256(f"{stream}/{check_count('seed', seed, 0)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded_generator(seed: int, stream: str, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` (default: the CPU) seeded with :func:`stream_seed` ``(seed, stream)``."""
    return torch.Generator(device=device or "cpu").manual_seed(stream_seed(seed, stream))


def draws_on(generator: torch.Generator, device: torch.device | str) -> bool:
    """Whether ``generator`` draws on ``device``; a device without an index (``"cuda"``) is any device of its type."""
    device, index = torch.device(device), generator.device.index
    return generator.device.type == device.type and (index == device.index or None in (index, device.index))


def check_draws_on(generator: torch.Generator | None, device: torch.device | str, what: str) -> None:
    """Raise a ValueError unless ``generator`` is ``None`` or draws on ``device``, where ``what`` (plural, such as
    "the images") are."""
    if generator is not None and not draws_on(generator, device):
        raise ValueError(f"the generator is on {generator.device} but {what} are on {device}; create it with "
                         f"torch.Generator(device={str(device)!r})")


def draw_with(draw: Callable[..., Tensor], shape: tuple[int, ...], generator: torch.Generator | None,
              device: torch.device | str | None, dtype: torch.dtype | None = None) -> Tensor:
    """``draw(shape)`` (``torch.rand``, ``torch.randn``) from ``generator``, on ``device``.

    The numbers are drawn on the generator's own device and moved: a CPU generator
    gives the same numbers on every device (a generator cannot draw on another
    device). ``device=None`` leaves them where they were drawn: the generator's device,
    or torch's default device (the CPU unless set) without one.
    """
    where = device if generator is None else generator.device
    values = draw(shape, generator=generator, device=where, dtype=dtype)
    return values if device is None else values.to(device)


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` if it draws on ``device``; otherwise a new generator there, seeded by a draw from ``generator``.

    For methods that make their generator with the model and draw later, after
    the model may have moved (:func:`fit` moves it to ``device``): a CPU generator
    cannot draw on a GPU. The draws stay reproducible for the same moves. A device
    without an index (``"cuda"``) is any device of its type (:func:`draws_on`). ``None`` (PyTorch's
    default generator of each device) stays ``None``.
    """
    if generator is None:
        return None
    if draws_on(generator, device):
        return generator
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def restore_generator(generator: torch.Generator, state: Tensor,
                      device: torch.device | str | None = None) -> torch.Generator:
    """The generator that continues from a ``state`` saved by ``get_state()`` of a generator on ``device``.

    CPU and CUDA generators use different algorithms, with states of different sizes.
    A state saved on another kind of device than ``generator``'s continues on a new
    generator of the saved kind where this machine has one: a method rebuilt with a
    CPU generator (as it is before :func:`fit` moves the model) then draws exactly
    what the uninterrupted run drew on the GPU, and the other way round. Where the
    saved kind of device is missing (or ``device`` is unknown), a state of the other
    kind seeds ``generator`` from its bytes instead: the resumed draws stay
    reproducible, though not those of the uninterrupted run. Otherwise ``generator``
    is set to the state and returned.
    """
    state = state.to(device="cpu", dtype=torch.uint8)
    saved = None if device is None else torch.device(device)
    target = generator
    if saved is not None and saved.type != generator.device.type:
        if saved.type == "cpu":
            target = torch.Generator()
        elif saved.type == "cuda" and torch.cuda.is_available():
            index = saved.index or 0
            target = torch.Generator(device=torch.device("cuda", index if index < torch.cuda.device_count() else 0))
    if state.numel() == target.get_state().numel():
        target.set_state(state)
        return target
    generator.manual_seed(zlib.crc32(state.numpy().tobytes()))
    return generator


@dataclass
class TrainState:
    """What a callback sees after each optimizer step.

    Attributes:
        step: optimizer steps taken so far (1 after the first step).
        epoch: the current pass over the data, from 0.
        loss: the last batch's loss, a 0-d tensor still on the device, in float32 (float64 for a
            float64 model's loss; call ``.item()`` only when you need the number: it waits for the device).
        model: the model being trained.
        optimizer: its optimizer.
    """

    step: int
    epoch: int
    loss: Tensor
    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class History:
    """What :func:`fit` records.

    Attributes:
        steps: the step at the end of each logging interval.
        loss: mean training loss over each logging interval: the mean of its steps' batch
            losses (a short last batch of an epoch counts as one step, like a full one).
        eval_steps: the steps at which ``eval_data`` was evaluated.
        eval: the metrics of each evaluation (``{"loss": ..., "accuracy": ...}``).
        seconds: wall-clock time of the whole run, evaluations included.
        train_seconds: wall-clock time spent in training steps only.
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0

    def metric(self, name: str) -> list[float]:
        """One evaluation metric over time, e.g. ``history.metric("accuracy")``."""
        return [e[name] for e in self.eval]

    def to_dict(self) -> dict:
        """Plain lists and numbers (copies), e.g. to store in a checkpoint's ``extra``."""
        return {"steps": list(self.steps), "loss": list(self.loss), "eval_steps": list(self.eval_steps),
                "eval": [dict(e) for e in self.eval], "seconds": self.seconds, "train_seconds": self.train_seconds}


def _pair(data: Data, what: str = "the data") -> tuple[Tensor, Tensor]:
    """``(x, y)`` of ``data``, or a ValueError naming ``what`` if it is not a pair of tensors, or they differ in
    length or are empty."""
    pair = data.tensors if isinstance(data, TensorDataset) else data
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        kind = type(data).__name__
        if isinstance(pair, (tuple, list)):
            kind += f" of {len(pair)}: " + ", ".join(type(t).__name__ for t in pair[:3]) + (", ..." * (len(pair) > 3))
        raise ValueError(f"{what} must be a pair of tensors (inputs, targets) or a TensorDataset of two tensors, "
                         f"not a {kind}; e.g. stack the examples of a Subset or a DataLoader into two tensors")
    x, y = pair
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"the inputs and targets of {what} must have one entry per example along their first "
                         f"dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"the inputs and targets of {what} differ in length: {len(x)} vs {len(y)}")
    if len(x) == 0:
        raise ValueError(f"{what} are empty")
    return x, y


def _as_tensors(data: Data, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = _pair(data)
    return x.to(device), y.to(device)


def _check_bf16(device: torch.device, bf16: bool) -> None:
    if bf16 and device.type != "cuda":
        raise ValueError(f"bf16 autocast is supported on CUDA only; the device is {device}. "
                         "Pass bf16=torch.cuda.is_available() to use it where it helps.")


def _autocast(device: torch.device, bf16: bool):
    _check_bf16(device, bf16)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_optimizer_holds(optimizer: object, model: nn.Module) -> None:
    """Refuse an optimizer that holds parameters, none of them ``model``'s: it would step them, and the model
    would train silently not at all (an optimizer built on a copy of the model, or on a model built again)."""
    held = {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}
    if held and held.isdisjoint(id(p) for p in model.parameters()):
        raise ValueError("the optimizer holds none of the model's parameters (was it built on a copy of the model, "
                         "or on a model built again since?): build it on this model's parameters, "
                         "e.g. torch.optim.SGD(model.parameters(), ...)")


def state_to_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Move each tensor of the optimizer's state (momentum, Adam's moments) to its parameter's device.

    ``Module.to`` moves a model's parameters in place and leaves the optimizer's state
    where it was: a checkpoint loaded on the CPU (:func:`load_checkpoint`) and then
    trained on a GPU would mix devices in the first step. :func:`fit` calls this when
    it moves the model. The optimizer's own ``load_state_dict`` does the moving, with
    PyTorch's rules for what stays on the CPU (Adam's step count, unless ``capturable``
    or ``fused``); wrappers such as :class:`~lowlearn.powerprop.PowerPropOptimizer`
    and :class:`~lowlearn.lowrank.dlrt.DLRT` pass it on to the optimizers they hold.
    """
    optimizer.load_state_dict(optimizer.state_dict())


def fit(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    drop_last: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    callbacks: Sequence[Callable[[TrainState], object]] = (),
    eval_data: Data | None = None,
    eval_every: int | None = None,
    log_every: int = 50,
    device: torch.device | str | None = None,
    seed: int = 0,
    bf16: bool = False,
    batch_transform: Callable[[Tensor], Tensor] | None = None,
    progress: bool | None = None,
    start_step: int = 0,
) -> History:
    """Train ``model`` on ``data`` with mini-batch ``optimizer`` steps.

    Args:
        model: the network; it is moved to ``device``.
        data: training inputs and targets, a ``TensorDataset`` or ``(x, y)``.
        optimizer: built on ``model.parameters()`` (before or after the move; a state
            it loaded before moves too, see :func:`state_to_parameters`). An
            optimizer with ``needs_closure = True`` (:class:`lowlearn.lowrank.dlrt.DLRT` at
            fixed rank) gets ``step(closure)``, the closure recomputing the batch's loss.
        epochs: passes over the data. Give exactly one of ``epochs`` and ``steps``.
        steps: optimizer steps.
        batch_size: examples per step; the last batch of an epoch may be smaller.
        drop_last: leave out the last batch of every epoch when it is smaller (as
            ``DataLoader(drop_last=True)``): batch norm in training mode cannot
            normalise a batch of one example, which ``len(data) % batch_size == 1``
            leaves. The examples left out differ from epoch to epoch.
        loss_fn: ``loss_fn(model(x), y)`` is minimised.
        callbacks: called as ``callback(state)`` after every optimizer step, in order.
            One that raises :class:`StopTraining` ends training after this step; the
            callbacks after it still see the step (a sparsifier keeps its step count).
            In a process group it must do so on every process, at the same step.
        eval_data: evaluated with :func:`evaluate` every ``eval_every`` steps and
            at the end.
        eval_every: steps between evaluations (default: once per epoch).
        log_every: steps between reads of the training loss (each read waits for
            the device, and checks that the loss is finite).
        device: default: the model's device when that is not the CPU (a model on ``cuda:1``
            or ``mps`` stays there), else :func:`default_device` (a model on the CPU moves to
            the GPU when there is one).
        seed: the run's random draws, in streams of their own (:func:`stream_seed`),
            so that none repeats the numbers ``seed_everything(seed)`` drew for the
            model's initial weights: the batch order from
            ``seeded_generator(seed, "batch order")``, and the global generators
            (dropout, ``batch_transform``) seeded with
            ``seed_everything(stream_seed(seed + rank, "training draws"))``, with the
            ``rank`` of the process in a process group (0 otherwise).
        bf16: run forward passes under bfloat16 autocast (CUDA only).
        batch_transform: applied to each input batch on the device (e.g. data
            augmentation).
        progress: show a progress bar; ``None`` shows it only on a terminal.
        start_step: the optimizer steps an interrupted run of the same call has taken
            (with the model and optimizer restored from its checkpoint, see
            :func:`save_checkpoint`): training goes on from step ``start_step + 1``
            with the batches that run would have drawn next, to the same end. The
            global generators are seeded only when ``start_step`` is 0; for the same
            random draws in the model (dropout) and in ``batch_transform`` as well,
            save ``torch.get_rng_state()`` with the checkpoint and restore it before
            resuming (``torch.cuda.get_rng_state_all()`` on GPUs). The first logged
            loss of a resumed run averages only the steps after ``start_step``, so it
            differs from the uninterrupted run's where ``start_step`` is not a
            multiple of ``log_every``; the later ones are the same.

    In a ``torch.distributed`` process group (see :mod:`lowlearn.distributed`),
    every process draws the same batches and trains on its share of each
    (``batch_size`` is the batch of all processes together), through
    ``DistributedDataParallel`` (unless the optimizer says it ``averages_gradients``
    itself; the processes then start from the weights of process 0, as under
    ``DistributedDataParallel``): the steps are those of one process on the whole
    batch, up to rounding, for models without batch norm or random draws and a loss
    that is the plain mean of the examples' losses: the shares' losses are weighed
    as such means, which a loss with ``reduction="sum"``, class weights or an
    ``ignore_index`` is not. Batch norm
    normalises each process's share by the share's own statistics and keeps the
    running statistics of process 0, which every process evaluates with and ends with
    (``DistributedDataParallel``'s behaviour; on
    GPUs, ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` normalises by the whole
    batch), and dropout and ``batch_transform`` draw on each process's own generator
    (seeded from ``seed + rank``). The logged loss is each process's own share; a NaN
    or infinite loss on any process stops them all at the same read of the loss.
    Attach masks before calling ``fit`` (see :mod:`lowlearn.distributed`), and let
    every parameter that requires a gradient take part in every step's loss:
    ``DistributedDataParallel`` fails at the next step otherwise (its advice,
    ``find_unused_parameters=True``, is not open to ``fit``); freeze the others (the
    heads of tasks still to come, say) with ``requires_grad_(False)``.

    ``fit`` puts the model in training mode (``model.train()``) before the first
    step; evaluations during training restore every module's mode after them.

    Returns:
        The :class:`History` of the run.

    Raises:
        ValueError: both or neither of ``epochs`` and ``steps``, a count that is not a
            positive integer, a ``seed`` that is not an integer >= 0, data
            that are not an ``(inputs, targets)`` pair of tensors of one length,
            ``drop_last`` with fewer examples than ``batch_size``,
            ``eval_every`` without ``eval_data``, a ``start_step`` at or after the end, an
            ``optimizer`` that holds none of the model's parameters, ``bf16`` off CUDA, a
            ``device`` this machine lacks, or, in a process group, batches smaller than the
            number of processes or models of different shapes on the processes; all before
            the first step, and all but the last two before the generators are seeded or
            the model moves. At the first step: a
            ``loss_fn`` that does not return one number per batch (e.g. ``reduction="none"``).
        TypeError: ``drop_last`` or ``bf16`` other than ``True`` or ``False``, or ``callbacks``
            that are not a list of callables; at the first step, a ``loss_fn`` that returns no
            tensor (a float from ``.item()``).
        NonFiniteLossError: the loss became NaN or infinite; the message names the
            first such step.
    """
    drop_last = check_flag("drop_last", drop_last)
    bf16 = check_flag("bf16", bf16)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= and steps=")
    # as Python ints (a NumPy integer too): torch takes Python ints only for sizes and seeds
    epochs, steps, batch_size, log_every, eval_every = (
        None if value is None else check_count(name, value, 1)
        for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size),
                            ("log_every", log_every), ("eval_every", eval_every)))
    start_step, seed = check_count("start_step", start_step, 0), check_count("seed", seed, 0)
    rank, processes = world()
    n = len(_pair(data)[0])               # all checked now, before the generators are seeded or the model moves
    batches_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"drop_last=True with {n} examples, fewer than batch_size={batch_size}, leaves no batch: "
                         "lower batch_size, or keep the last batch (drop_last=False)")
    total = steps if steps is not None else epochs * batches_per_epoch
    if start_step >= total:
        raise ValueError(f"start_step={start_step}, but the run ends after step {total}: nothing is left to train")
    if eval_data is not None:
        _pair(eval_data, "the evaluation data (eval_data)")
    elif eval_every is not None:
        raise ValueError("eval_every needs eval_data: pass the data to evaluate on, or leave eval_every out")
    if not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes)):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    if not all(callable(callback) for callback in callbacks):
        raise TypeError(f"callbacks must be a list of functions callback(state), got {callbacks!r}: pass [callback] "
                        "for one")
    _check_optimizer_holds(optimizer, model)

    if device is None:
        device = _model_device(model)
        device = device if device is not None and device.type != "cpu" else default_device()
    device = available_device(device)
    _check_bf16(device, bf16)
    if start_step == 0:
        seed_everything(stream_seed(seed + rank, "training draws"))   # each process its own dropout ...
    order = seeded_generator(seed, "batch order")                        # ... and all the same batches
    devices = [p.device for p in model.parameters()]
    model.to(device)
    if any(p.device != before for p, before in zip(model.parameters(), devices)) and hasattr(optimizer, "state_dict"):
        state_to_parameters(optimizer)
    x, y = _as_tensors(data, device)
    if eval_data is not None:
        eval_data = _as_tensors(eval_data, device)    # moved once, not at every evaluation
    smallest = batch_size if drop_last else n % batch_size or batch_size
    if processes > 1 and smallest < processes:
        last = "" if drop_last else f" from {n} examples leave {smallest} for the last one"
        raise ValueError(f"with {processes} processes every batch needs at least {processes} examples, but batches "
                         f"of {batch_size}{last}: change batch_size (or the data size)")
    trained = model
    if processes > 1 and not getattr(optimizer, "averages_gradients", False):
        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    elif processes > 1:                  # the optimizer averages the gradients; the weights start equal here
        with torch.no_grad():
            broadcast_from_the_first_process([*model.parameters(), *model.buffers()])
    eval_every = eval_every or batches_per_epoch

    history = History()
    running = torch.zeros((), device=device)        # float32; a float64 model's losses make it float64
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    since_log = 0
    start = time.perf_counter()
    eval_time = 0.0

    def log(step: int) -> None:
        nonlocal running, since_log
        bad_step = first_bad
        if processes > 1:      # all stop at the first bad step of any process, or none does: one process alone
            never = torch.iinfo(torch.long).max                       # would leave the others waiting for it
            bad_step = torch.where(first_bad < 0, never, first_bad)
            dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
            bad_step = torch.where(bad_step == never, -1, bad_step)
        # One read for both. A float32 holds integers exactly up to 2**24 only: the step goes in two parts.
        high, low = torch.div(bad_step, 2**24, rounding_mode="floor"), torch.remainder(bad_step, 2**24)
        mean_loss, high, low = torch.stack([running / max(since_log, 1), high.to(running.dtype),
                                            low.to(running.dtype)]).tolist()
        bad = int(high) * 2**24 + int(low)
        if bad >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {int(bad)} "
                f"(epoch {(int(bad) - 1) // batches_per_epoch}); lower the learning rate, "
                "check the inputs for NaNs, or clip gradients")
        history.steps.append(step)
        history.loss.append(mean_loss)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        running = torch.zeros((), device=device)
        since_log = 0

    def first_process_buffers() -> None:
        """Give every process the buffers of process 0: each updated its batch norms' running statistics on its
        own share (DistributedDataParallel hands process 0's out only at the start of each forward pass)."""
        if processes > 1:
            with torch.no_grad():
                broadcast_from_the_first_process(list(model.buffers()))

    def run_eval(step: int) -> None:
        nonlocal eval_time
        _sync(device)                   # the training steps queued on a GPU count as training, not evaluation
        first_process_buffers()         # every process evaluates the same model
        t0 = time.perf_counter()
        history.eval_steps.append(step)
        history.eval.append(evaluate(model, eval_data, loss_fn=loss_fn, device=device, bf16=bf16))   # modes restored
        eval_time += time.perf_counter() - t0

    model.train()
    step = start_step
    bar = tqdm(total=total, initial=start_step, disable=None if progress is None else not progress, leave=False)
    try:
        for epoch in range(math.ceil(total / batches_per_epoch)):
            # drawn for every epoch, so the order goes on as before; on the CPU, where its generator draws
            perm = torch.randperm(n, generator=order, device="cpu")
            done = start_step - epoch * batches_per_epoch    # batches of this epoch an interrupted run took
            if done >= batches_per_epoch:
                continue
            for idx in perm.to(device, non_blocking=True).split(batch_size)[max(done, 0):batches_per_epoch]:
                share = idx.tensor_split(processes)[rank]
                xb, yb = x[share], y[share]
                if batch_transform is not None:
                    xb = batch_transform(xb)
                # With P processes, the mean over processes of scale·(mean loss over a share) is the
                # batch's mean loss, so the averaged gradients are those of the whole batch.
                scale = processes * len(share) / len(idx)

                def batch_loss(xb=xb, yb=yb, scale=scale) -> Tensor:
                    with _autocast(device, bf16):
                        loss = loss_fn(trained(xb), yb)
                        return loss if scale == 1 else loss * scale

                loss = batch_loss()
                check_scalar_loss(loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if getattr(optimizer, "needs_closure", False):
                    optimizer.step(batch_loss)    # a second pass on the batch: fixed-rank DLRT's S-step
                else:
                    optimizer.step()
                step += 1
                # this process's own share's mean loss; a float64 one stays float64 (in float32 it would lose
                # its digits, and a loss above 3.4e38 would read as infinite)
                loss = loss.detach().to(torch.promote_types(loss.dtype, torch.float32)) / scale
                running = running + loss
                since_log += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                bar.update()
                state = TrainState(step=step, epoch=epoch, loss=loss, model=model, optimizer=optimizer)
                stop = False
                for callback in callbacks:      # all of them see the step, also after one asked to stop
                    try:
                        callback(state)
                    except StopTraining:
                        stop = True
                if stop:
                    total = step
                if step % log_every == 0 or step == total:
                    log(step)
                if eval_data is not None and (step % eval_every == 0 or step == total):
                    run_eval(step)
                if step == total:
                    break
            if step == total:
                break
    finally:
        bar.close()
    if history.eval_steps[-1:] != [step]:       # an evaluation after the last step handed them out already
        first_process_buffers()
    _sync(device)
    history.seconds = time.perf_counter() - start
    history.train_seconds = history.seconds - eval_time
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    *,
    batch_size: int = 1000,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    device: torch.device | str | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``data``, in eval mode.

    The loss is the mean of the batches' losses weighted by their sizes: the mean
    over all examples for a loss that averages over its batch (a loss with class
    weights or an ``ignore_index`` averages with other weights, so that is an
    approximation of its value on all the data at once).

    Accuracy is reported for integer class targets, as the fraction of target entries
    predicted right, among those that are classes: entries below 0 (the padding that a
    loss's ``ignore_index`` leaves out, ``-100`` by default) are not counted. The class
    dimension is 1 where the outputs have the targets' shape with it inserted there
    (``F.cross_entropy``'s layout, e.g. ``(N, C, L)`` for ``(N, L)``), else the last. A
    model with one output per target (``(N,)`` or ``(N, 1)``) is a binary classifier
    whose output is a logit: it predicts class 1 where the output is positive. For other
    targets (e.g. regression) only the loss is returned. The model's train/eval mode is
    restored. ``device`` is where the data go for the passes; the model is not moved
    (default: the device of the model's first parameter or buffer,
    :func:`default_device` for a model without any).

    Raises:
        ValueError: a ``batch_size`` that is not a positive integer, data that are not a
            non-empty ``(inputs, targets)`` pair of tensors of one length, ``bf16`` off CUDA, a
            ``device`` this machine lacks, or a ``loss_fn`` that does not return one number
            per batch (e.g. ``reduction="none"``).
        TypeError: ``bf16`` other than ``True`` or ``False``, or a ``loss_fn`` that returns no
            tensor (a float from ``.item()``).
    """
    batch_size = check_count("batch_size", batch_size, 1)
    bf16 = check_flag("bf16", bf16)
    device = available_device(device if device is not None else _model_device(model) or default_device())
    x, y = _as_tensors(data, device)
    total_loss: Tensor | float = 0.0          # in the loss's dtype: float32, or float64 for a float64 model
    correct = torch.zeros((), device=device, dtype=torch.long)
    classify = not torch.is_floating_point(y)
    with eval_mode(model):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            with _autocast(device, bf16):
                out = model(xb)
            loss = loss_fn(out.to(torch.promote_types(out.dtype, torch.float32)), yb)   # half and bf16 in float32
            check_scalar_loss(loss)
            total_loss = total_loss + loss * len(xb)
            if classify:
                if out.numel() == yb.numel():          # one logit per target: a binary classifier
                    predicted = out.reshape(yb.shape) > 0
                else:
                    classes = 1 if out.dim() > 2 and out.shape[2:] == yb.shape[1:] else -1
                    predicted = out.argmax(classes).reshape(yb.shape)
                correct += ((predicted == yb) & (yb >= 0)).sum()
    metrics = {"loss": total_loss.item() / len(x)}
    if classify:
        scored = int((y >= 0).sum())
        metrics["accuracy"] = correct.item() / scored if scored else math.nan
    return metrics


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    overwrite: bool = False,
    **extra,
) -> Path:
    """Save the model's and optimizer's ``state_dict`` (and ``extra`` values) to ``path``.

    The file is written to a temporary name and published when complete
    (:func:`lowlearn.atomic.atomic_file`), so a crash never leaves a half-written
    checkpoint, and an existing file is never replaced unless ``overwrite=True``.
    ``extra`` values must be tensors, numbers, strings, or lists/dicts of them (what
    :func:`load_checkpoint` can read back with ``weights_only=True``), e.g.
    ``history=history.to_dict()``.

    Raises:
        FileExistsError: ``path`` exists (or appears while writing) and ``overwrite`` is ``False``.
        NotADirectoryError: a file stands where ``path``'s folder should be.
        TypeError: an ``extra`` value, or something in the model's or optimizer's state
            (e.g. a learning rate that is a NumPy number), that ``weights_only=True``
            could not load, found before anything is written; ``overwrite`` other than ``True``
            or ``False``.
    """
    overwrite = check_flag("overwrite", overwrite)
    for key, value in extra.items():
        _loadable_bytes(value, f"the extra value {key}={value!r} ({type(value).__name__})")
    payload = {"model": model.state_dict(), "extra": extra}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["optimizer_class"] = _class_name(optimizer)
    data = _loadable_bytes(payload, "the model's or the optimizer's state_dict")
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)
    return Path(path)


def _class_name(optimizer: object) -> str:
    """``module.QualifiedName`` of the optimizer's class, which its ``state_dict`` is for, and of the optimizer it wraps
    (``optimizer.optimizer``: :class:`~lowlearn.lowrank.dlrt.DLRT`'s, :class:`~lowlearn.powerprop.PowerPropOptimizer`'s)
    if any: ``"<wrapper> around <wrapped>"``."""
    name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    inner = getattr(optimizer, "optimizer", None)
    return name if inner is None else f"{name} around {_class_name(inner)}"


def _loadable_bytes(value: object, what: str) -> bytes:
    """``value`` serialised by ``torch.save``, once ``torch.load(weights_only=True)`` has read it back.

    It is read back onto the ``meta`` device, which runs the same restricted unpickler
    without reading the tensors' data (a copy of the whole state otherwise), and onto
    the CPU only if a tensor kind has no meta form (quantized and nested tensors).

    Raises:
        TypeError: naming ``what``, if it cannot be read back so.
    """
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
    except (pickle.PicklingError, AttributeError, TypeError) as error:      # e.g. a lambda, a local class, a lock
        raise TypeError(f"{what} cannot be saved ({error}); save tensors, numbers, strings, or lists and dicts "
                        "of them") from None
    try:
        buffer.seek(0)
        try:
            torch.load(buffer, map_location="meta", weights_only=True)
        except NotImplementedError:                         # a tensor kind without a meta form
            buffer.seek(0)
            torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise TypeError(f"{what} could not be loaded back with weights_only=True; save tensors, numbers, strings, "
                        f"or lists and dicts of them (e.g. float(x) for a NumPy number). {_culprit(error)}") from None
    return buffer.getvalue()


def _culprit(error: Exception) -> str:
    """The line of a ``weights_only`` unpickling error that names what it refused.

    "Unsupported global: GLOBAL print ..." for most objects, "Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked" for those of modules such as ``os``.
    """
    return next((line.strip() for line in str(error).splitlines() if "unsupported" in line.lower()), "")


_MISSING = object()


def _shape_only_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose tensors are on the meta device: their shapes without memory.

    Parameters and buffers (a lazy module's uninitialised ones stay uninitialised), and
    tensors that modules keep as plain attributes too, alone or in lists, tuples and
    dictionaries: one computed in a graph (a cached output or activation, the ``weight``
    that ``torch.nn.utils.prune`` writes) cannot be deep-copied.
    """
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        memo[id(tensor)] = _meta_twin(tensor)
    for module in model.modules():
        for tensor in tensors_in(vars(module)):
            if id(tensor) not in memo:
                memo[id(tensor)] = torch.empty_like(tensor.detach(), device="meta")
    return copy.deepcopy(model, memo)


def _meta_twin(tensor: Tensor) -> Tensor:
    """A parameter's or buffer's stand-in on the meta device, of its kind (shapeless if it is a lazy one)."""
    if isinstance(tensor, UninitializedTensorMixin):
        return type(tensor)(requires_grad=tensor.requires_grad, device="meta", dtype=tensor.dtype)
    empty = torch.empty_like(tensor, device="meta")
    return nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def tensors_in(value: object) -> Iterator[Tensor]:
    """The tensors in ``value``: itself if it is one, else those inside it if it is a list, tuple or dictionary (its
    values), at any depth; other values are skipped."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from tensors_in(item)


def _read_checkpoint(path: str | os.PathLike, map_location: torch.device | str | None) -> object:
    """``torch.load(path, weights_only=True)``; a file it cannot read is a :class:`CheckpointError`.

    A path that leads to no readable file (missing, a folder, no read permission, a
    name too long) keeps the ``OSError`` of opening it, and running out of memory its
    ``torch.OutOfMemoryError``; a checkpoint whose tensors are mapped to a device this
    machine lacks is a RuntimeError that says so.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        if "deserialize object on" not in str(error):         # torch's words for a device that is not here
            raise CheckpointError(_damaged(path, error)) from None
        raise RuntimeError(f"{path} holds tensors saved on a device this machine does not have "
                           f"({next(iter(str(error).splitlines()), '')}); load it with map_location='cpu' "
                           "(load_checkpoint's default) or a device that is here") from None
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
        if isinstance(error, OSError) and error.filename is not None:     # opening the path failed, not reading
            raise
        culprit = _culprit(error)
        if "unsupported global" in culprit.lower():        # a pickled object other than tensors and plain values
            raise CheckpointError(f"{path} is not a checkpoint that save_checkpoint wrote: torch.load(weights_only="
                                  f"True) refuses what it holds ({culprit}). If you trust where it came from, "
                                  "torch.load(weights_only=False) reads it, but unpickling can run code") from None
        raise CheckpointError(_damaged(path, error)) from None


def _damaged(path: str | os.PathLike, error: Exception) -> str:
    """The message for a file that torch reports as cut off or foreign, in one of the ways it does."""
    detail = _culprit(error) or next(iter(str(error).splitlines()), "")
    return (f"{path} is damaged or cut off, or is not a file that torch.save wrote ({type(error).__name__}: "
            f"{detail}); save the checkpoint again, or train anew")


def _same(saved: object, expected: object) -> bool:
    """Whether a saved ``extra`` value is the expected one (tensors: the same dtype, shape and values; lists,
    tuples and dicts: the same kind, each item the same, tensors in them too)."""
    if torch.is_tensor(saved) or torch.is_tensor(expected):
        return (torch.is_tensor(saved) and torch.is_tensor(expected) and saved.dtype == expected.dtype
                and saved.shape == expected.shape and torch.equal(saved.cpu(), expected.cpu()))
    if isinstance(expected, dict):
        return (isinstance(saved, dict) and saved.keys() == expected.keys()
                and all(_same(saved[key], value) for key, value in expected.items()))
    if isinstance(expected, (list, tuple)):
        return (isinstance(saved, list if isinstance(expected, list) else tuple) and len(saved) == len(expected)
                and all(_same(a, b) for a, b in zip(saved, expected)))
    return bool(saved == expected)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_location: torch.device | str | None = "cpu",
    expect: Mapping[str, object] | None = None,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    The file is read with ``torch.load(weights_only=True)``: it cannot run code.
    Returns the ``extra`` values that were saved with it.

    Args:
        path: a file written by :func:`save_checkpoint`.
        model: the model to load the saved ``state_dict`` into, built like the saved one.
        optimizer: the optimizer to load the saved state into, of the saved optimizer's
            class; ``None`` loads the model alone (also from a checkpoint with an optimizer).
        map_location: where the file's tensors are read to before they are copied into
            the model and optimizer, which keep their own devices. The default,
            ``"cpu"``, reads a checkpoint saved on a GPU on a machine without one.
        expect: extra values the checkpoint must have been saved with (e.g.
            ``{"method": "protonet"}``), checked before anything is loaded.

    Raises:
        CheckpointError: a file that :func:`save_checkpoint` did not write (e.g. a
            plain ``state_dict``, a file with objects ``weights_only=True`` refuses), or
            one that is damaged or cut off; a :class:`ValueError`.
        ValueError: an ``expect`` value that the checkpoint lacks or holds
            differently, an ``optimizer`` for a checkpoint saved without one, or one of
            another class than the checkpoint's (an Adam state in SGD, also inside a
            :class:`~lowlearn.lowrank.dlrt.DLRT` or a :class:`~lowlearn.powerprop.PowerPropOptimizer`);
            these and the errors above all found before anything is loaded.
        RuntimeError, ValueError: a state that does not fit the model (other keys or
            shapes) or the optimizer (other parameter groups); the model and the
            optimizer are left as they were. A RuntimeError too for a ``map_location``
            (or a saved device, with ``map_location=None``) that this machine lacks.
    """
    payload = _read_checkpoint(path, map_location)
    if not isinstance(payload, dict) or not {"model", "extra"} <= payload.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by lowlearn.train.save_checkpoint (a dict with "
                              "'model' and 'extra'); for a plain state_dict use model.load_state_dict(torch.load(path, "
                              "weights_only=True))")
    saved = payload["extra"]
    for key, what in (("model", "the model's state_dict"), ("extra", "the values saved with it")):
        if not isinstance(payload[key], dict):
            raise CheckpointError(f"{path} is not a checkpoint written by lowlearn.train.save_checkpoint: its "
                                  f"{key!r} is a {type(payload[key]).__name__}, not a dict of {what}")
    if expect and not all(_same(saved.get(key, _MISSING), value) for key, value in expect.items()):
        found = {key: saved.get(key, "(not saved)") for key in expect}
        raise ValueError(f"{path} was saved with {found}, not {dict(expect)}")
    if optimizer is not None and "optimizer" not in payload:
        raise ValueError(f"{path} holds no optimizer state; load it without optimizer=")
    saved_class = payload.get("optimizer_class")
    current = None if optimizer is None else _class_name(optimizer)
    # Older checkpoints recorded no class, or a wrapper's without the optimizer it wraps.
    if current is not None and saved_class not in (None, current, current.split(" around ")[0]):
        raise ValueError(f"{path} holds the state of a {saved_class}, which does not fit a {current} "
                         "(its settings and per-weight state differ): build the optimizer it was saved with, or "
                         "load the model alone (without optimizer=) and start a new optimizer")
    # load_state_dict copies tensor by tensor and reports mismatches at the end; a storage-free copy of the
    # model takes the first try, and the optimizer checks its groups before it changes anything, so a
    # refused checkpoint leaves both as they were.
    # (assign=True would be quieter, but torch records it in the state dict's own metadata, so the real load
    # below would assign too.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* to a meta parameter .* is a no-op")
        _shape_only_copy(model).load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    model.load_state_dict(payload["model"])
    return payload["extra"]
