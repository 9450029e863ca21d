"""Data-parallel training across processes, on PyTorch's own engine (``torch.distributed``).

Launch one process per device with ``torchrun --nproc-per-node N script.py``; in
the script, on GPUs first give each process its own device,
``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`` (otherwise ``"cuda"``
means GPU 0 in every process, and NCCL refuses two processes on one GPU), then call
``torch.distributed.init_process_group()`` (backend ``"nccl"`` on GPUs, ``"gloo"``
on CPUs) and train as usual with :func:`lowlearn.train.fit`:
it notices the process group, wraps the model in
:class:`~torch.nn.parallel.DistributedDataParallel`, and gives each process its
share of every batch. What a method computes from more than the averaged
parameter gradients is made identical on every process:

* dynamic sparse training (:mod:`lowlearn.sparse.dst`) averages the dense
  gradients that RigL and SNFS score, and seeds random growth identically, so
  every process holds the same masks;
* DLRT (:mod:`lowlearn.lowrank.dlrt`) averages the gradients of its factors
  itself, since DistributedDataParallel cannot follow parameters whose shapes
  change with the rank;
* Powerpropagation's optimiser-aware update (:class:`~lowlearn.powerprop.PowerPropOptimizer`)
  needs nothing of its own: it gives each ``φ`` the gradient of its effective weight
  ``θ``, the one it steps on, and ``DistributedDataParallel`` averages that.

DistributedDataParallel holds the parameters it was given, so give a model its
masks before training (the sparsifiers attach them when they are built; before a
:class:`~lowlearn.sparse.schedule.GradualPruning` run, call
:func:`~lowlearn.sparse.mask.attach_masks`). Growing a network
(:class:`~lowlearn.growth.GrowthSchedule`) replaces parameters during training, which
it cannot follow: growth is refused in a process group.

This module holds the two helpers the methods share, and the one that
:func:`~lowlearn.train.fit` uses to start every process from the first process's
weights when it does not wrap the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_the_first_process(tensors: Iterable[Tensor]) -> None:
    """Give each tensor, in place, the value it has on the process of rank 0 (nothing outside a process group).

    What :class:`~torch.nn.parallel.DistributedDataParallel` does with a model's
    parameters and buffers when it wraps it, for the methods that average their own
    gradients instead: every process then starts from the same weights. Every process
    must call this with the same tensors in the same order.

    Raises:
        ValueError: on every process, if the processes' tensors differ in shape or
            dtype (a model built differently on each process), before anything is sent.
    """
    if world()[1] == 1:
        return
    tensors = list(tensors)
    _check_alike(tensors, "the processes built different models",
                 "build the model the same way on every process, e.g. seed every process alike before to_low_rank "
                 "chooses ranks from the weights")
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def average_across_processes(tensors: Iterable[Tensor | None], *, check: bool = True) -> None:
    """Replace each tensor, in place, by its mean over the processes (nothing outside a process group).

    Every process must call this with the same tensors in the same order, each one
    floating point or complex; a ``None`` (a gradient that was not computed) is skipped,
    and must be ``None`` on every process. The collectives pair the tensors by their
    order, so with ``check`` this first compares the processes' lists and refuses lists
    that differ, rather than average a tensor with the wrong partner. That comparison
    is a gather through the host, which waits for the device: a method that averages
    the same kind of list at every step checks it at its first step only.

    Raises:
        TypeError: a tensor that is neither floating point nor complex (its mean would
            not fit it).
        ValueError: with ``check``, on every process, if the processes' lists differ: a
            tensor ``None`` on some processes only (a parameter one process did not use),
            or of another shape or dtype.
    """
    tensors = list(tensors)
    integer = [tuple(t.shape) for t in tensors if t is not None and not (t.is_floating_point() or t.is_complex())]
    if integer:
        raise TypeError(f"the mean over processes of tensors of shape {integer} would not fit their integer dtype: "
                        "average floating-point tensors")
    _, size = world()
    if size == 1 or not tensors:
        return
    if check:
        _check_alike(tensors, "the processes hold different tensors to average",
                     "every process must compute the same gradients; a parameter that a process does not use in "
                     "its forward pass has no gradient there, so use every parameter on every process")
    for tensor in tensors:
        if tensor is not None:
            tensor.div_(size)       # before the sum, as DistributedDataParallel does: a float16 sum can overflow
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _check_alike(tensors: list[Tensor | None], problem: str, advice: str) -> None:
    """Raise ``ValueError`` on every process unless all hold tensors (or ``None``) of the same shapes and dtypes."""
    mine = [None if tensor is None else (tuple(tensor.shape), str(tensor.dtype)) for tensor in tensors]
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    other = next((i for i, theirs in enumerate(gathered) if theirs != gathered[0]), None)
    if other is None:
        return
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(gathered[0], gathered[other])) if a != b]
    if not differ:
        detail = f"{len(gathered[0])} tensors on process 0, {len(gathered[other])} on process {other}"
    else:
        i, first, theirs = differ[0]
        if first is None or theirs is None:
            missing, present = (0, other) if first is None else (other, 0)
            detail = f"tensor {i} is None on process {missing} but not on process {present}"
        elif first[0] != theirs[0]:
            detail = f"a tensor of shape {first[0]} on process 0 is {theirs[0]} on process {other}"
        else:
            detail = f"a tensor of dtype {first[1]} on process 0 is {theirs[1]} on process {other}"
    raise ValueError(f"{problem} ({detail}): {advice}")
