"""Data-parallel training across processes, on PyTorch's own engine (``torch.distributed``).

Launch one process per device with ``torchrun --nproc-per-node N script.py``; in
the script, call ``torch.distributed.init_process_group()`` (backend ``"nccl"`` on
GPUs, ``"gloo"`` on CPUs) and then train as usual with :func:`lowlearn.train.fit`:
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
  averages the gradients of the effective weights ``θ`` it steps on.

DistributedDataParallel holds the parameters it was given, so give a model its
masks before training (the sparsifiers attach them when they are built; before a
:class:`~lowlearn.sparse.schedule.GradualPruning` run, call
:func:`~lowlearn.sparse.mask.attach_masks`). This module holds the two helpers
the methods share.
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


def average_across_processes(tensors: Iterable[Tensor | None]) -> None:
    """Replace each tensor, in place, by its mean over the processes (nothing outside a process group).

    Every process must call this with the same tensors in the same order.
    """
    _, size = world()
    if size == 1:
        return
    for tensor in tensors:
        if tensor is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(size)
