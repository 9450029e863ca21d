"""Many tasks in one pass: a network run with its own parameters for every task.

MAML's inner loop adapts a separate copy of the parameters to each task, so a
meta-batch of ``T`` tasks is ``T`` small networks. Run one after another, each
layer of each task is its own kernel launch; on a GPU, launches and tiny
kernels then dominate. :func:`task_batched` runs all ``T`` networks as one:

* the tasks are packed into the channel dimension: ``(T, B, C, ...)`` becomes
  ``(B, T·C, ...)``, task-major, so channel ``t·C + c`` is channel ``c`` of task ``t``;
* a convolution with weights ``(T, C_out, C_in, k, k)`` is one grouped convolution
  with ``groups = T`` (each group sees only its own task's channels);
* a linear layer with weights ``(T, n_out, n_in)`` is one batched matrix product;
* batch norm without running statistics (MAML's transductive batch norm) needs
  nothing new: normalising each of the ``T·C`` channels over the batch is
  normalising each task's channels by that task's own statistics;
* ReLU acts per feature, and a flatten that keeps the batch dimension
  (``flatten(1)``, ``nn.Flatten(start_dim, end_dim)`` with ``start_dim >= 1``) keeps
  the task-major order: the tasks are the outermost part of dimension 1, so
  flattening it with the dimensions after it, or flattening only later ones, leaves
  each task's features a contiguous block of their own; pooling acts per channel on
  inputs with a channel dimension (:class:`TaskPool` refuses others). The model's own
  ``forward`` thus runs unchanged on the packed tensor.

This is written out with ordinary operations, so autograd's second derivatives are
those of the per-task loop; ``torch.func.vmap`` is not used (on torch 2.13 its
second-order gradients through batch norm are wrong).

A parameter passed with a leading task dimension is per task; one passed with its
usual shape is shared by all tasks (ANIL's body, which does not adapt).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .functional import LossFn


def pack(x: Tensor) -> Tensor:
    """``(T, B, C, ...)`` → ``(B, T·C, ...)``, task-major."""
    return x.transpose(0, 1).flatten(1, 2)


def unpack(x: Tensor, tasks: int) -> Tensor:
    """``(B, T·C, ...)`` → ``(T, B, C, ...)``: the inverse of :func:`pack` for ``tasks`` tasks."""
    return x.unflatten(1, (tasks, -1)).transpose(0, 1)


def flat_per_task(value: Tensor | None, tasks: int, dims: int) -> Tensor | None:
    """A shared (``dims`` dimensions) or per-task (``dims + 1``) ``value`` for all tasks, task dimension flattened."""
    if value is None:
        return None
    return (value if value.dim() == dims + 1 else value.expand(tasks, *value.shape)).flatten(0, 1)


def _check_tasks(layer: str, params: tuple[tuple[str, Tensor | None, int], ...], tasks: int, packed: str) -> None:
    """Refuse per-task ``params`` (``(name, value, dimensions when shared)``) stacked for other than ``tasks`` tasks.

    Those of one task would broadcast over all the tasks' inputs, and a grouped
    convolution would group the wrong channels.
    """
    for name, value, shared_dims in params:
        if value is not None and value.dim() > shared_dims and value.shape[0] != tasks:
            raise ValueError(f"a task-batched {layer} got {name} for {value.shape[0]} tasks and inputs of {tasks} "
                             f"tasks ({packed}): stack one set of weights per task")


class TaskConv2d(nn.Module):
    """A ``Conv2d`` on packed tasks: one grouped convolution, or one plain one over ``B·T`` images if shared."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{conv} cannot run task-batched: only ungrouped convolutions with numeric zero padding "
                             "can (the tasks become the groups)")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x: Tensor) -> Tensor:
        batch, tasks = x.shape[0], x.shape[1] // self.weight.shape[-3]
        _check_tasks("Conv2d", (("weights", self.weight, 4), ("biases", self.bias, 1)), tasks,
                    f"{x.shape[1]} packed channels")
        bias = flat_per_task(self.bias, tasks, 1)
        if self.weight.dim() == 4:                   # shared by every task: the tasks' images are one batch
            images = x.reshape(batch * tasks, -1, *x.shape[2:])
            out = F.conv2d(images, self.weight, None, self.stride, self.padding, self.dilation)
            out = out.reshape(batch, -1, *out.shape[2:])
            return out if bias is None else out + bias[:, None, None]
        return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation, groups=tasks)


class TaskLinear(nn.Module):
    """A ``Linear`` on packed tasks ``(B, T·n_in)``: one batched matrix product (one plain one if shared)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"a task-batched Linear takes packed inputs (batch, tasks·features), got shape "
                             f"{tuple(x.shape)}: flatten the features before the linear layer")
        x = x.unflatten(1, (-1, self.weight.shape[-1]))                 # (B, T, n_in)
        _check_tasks("Linear", (("weights", self.weight, 2), ("biases", self.bias, 1)), x.shape[1],
                    f"{x.shape[1] * x.shape[2]} packed features")
        out = x @ self.weight.T if self.weight.dim() == 2 else torch.einsum("bti,toi->bto", x, self.weight)
        return (out if self.bias is None else out + self.bias).flatten(1)


class TaskBatchNorm(nn.Module):
    """Batch norm without running statistics on packed tasks: each task normalised by its own statistics."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if norm.running_mean is not None:
            raise ValueError(f"{norm} tracks running statistics, which all tasks would share: task-batched runs "
                             "need batch norm with track_running_stats=False (transductive batch norm, "
                             "e.g. Conv4(running_stats=False))")
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        tasks = x.shape[1] // self.weight.shape[-1] if self.weight is not None else 1
        return F.batch_norm(x, None, None, flat_per_task(self.weight, tasks, 1), flat_per_task(self.bias, tasks, 1),
                            training=True, eps=self.eps)


#: parameter-free layers that act on each feature alone, so packed tasks never meet
PER_FEATURE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
               nn.Dropout, nn.Dropout1d, nn.Dropout2d)

#: pooling layers and the number of spatial dimensions they pool: per channel, given (batch, channels, *spatial)
POOLS = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveAvgPool1d: 1,
         nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveAvgPool2d: 2}


class TaskPool(nn.Module):
    """A pooling layer on packed tasks, which refuses an input it would pool across channels.

    A pool acts on each channel's own map when its input has a batch and a channel
    dimension. Given one dimension fewer, PyTorch reads the input as one unbatched
    example, and the pool slides along the packed channels, where the tasks sit
    side by side: ``MaxPool1d`` after a ``Linear`` (``(B, T·F)``) would mix the tasks.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool, self.spatial = pool, POOLS[type(pool)]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial + 2:
            raise ValueError(f"{self.pool} got an input of shape {tuple(x.shape)} on packed tasks: task-batched "
                             f"pooling needs (batch, channels, {self.spatial} spatial dimensions), since without "
                             "a channel dimension it would pool across the tasks' features")
        return self.pool(x)


class _TaskBatchedRoot:
    """Mixed into the copied root module: packs the tasks before its ``forward`` and unpacks after."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(pack(x))
        if out.dim() < 2:
            raise ValueError(f"on packed tasks the model's forward returned shape {tuple(out.shape)}: a task-batched "
                             "model must return (batch, tasks·features, ...), so its forward may not squeeze or "
                             "reshape its output (leave that to the loss, or adapt one task at a time)")
        return unpack(out, x.shape[0])


def _convert(module: nn.Module) -> nn.Module:
    hooks = [kind for kind, registered in (("forward hooks", module._forward_hooks),
                                          ("forward pre-hooks", module._forward_pre_hooks),
                                          ("backward hooks", module._backward_hooks),
                                          ("backward pre-hooks", module._backward_pre_hooks)) if registered]
    if hooks:
        raise ValueError(f"{type(module).__name__} has {' and '.join(hooks)} (weight_norm and spectral_norm add "
                         "a forward pre-hook), which its task-batched form would not run: remove them, or adapt one "
                         "task at a time")
    if parametrize.is_parametrized(module):
        raise ValueError(f"{type(module).__name__} is parametrized (masks, Powerprop, ...): its weights are computed, "
                         "and task-batched runs take the parameters themselves; remove the parametrization first")
    if type(module) is nn.Conv2d:            # exact types: a subclass may compute something else in forward
        return TaskConv2d(module)
    if type(module) is nn.Linear:
        return TaskLinear(module)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return TaskBatchNorm(module)
    own = [name for name, _ in module.named_parameters(recurse=False)] + \
          [name for name, _ in module.named_buffers(recurse=False)]
    if own:
        raise ValueError(f"{type(module).__name__} holds {own} and has no task-batched form; supported: Conv2d, "
                         "Linear and batch norm without running statistics, in containers and parameter-free "
                         "layers (activations, pooling, flatten)")
    if type(module) in POOLS:
        return TaskPool(module)
    if not module._modules:                                             # a parameter-free layer, shared as it is
        flattens_within_examples = type(module) is nn.Flatten and module.start_dim >= 1   # see the module docstring
        if type(module) not in PER_FEATURE and not flattens_within_examples:
            raise ValueError(f"{module} has no task-batched form: on packed tasks (B, T·C, ...) it could mix the "
                             "tasks' features (a softmax or a norm over the features would); supported "
                             "parameter-free layers act element-wise or per channel (activations, dropout, "
                             "pooling) or are Flatten with a start_dim of 1 or more (a negative one could "
                             "reach the batch dimension)")
        return module
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else _convert(child) for name, child in module._modules.items()}
    return clone


def task_batched(model: nn.Module) -> nn.Module:
    """A version of ``model`` that runs a batch of tasks at once, each with its own parameters.

    The result shares ``model``'s parameters under the same names, and leaves ``model``
    itself unchanged. Call it through :func:`lowlearn.meta.functional.run` (or
    ``torch.func.functional_call``) with parameters stacked along a leading task
    dimension, ``{name: (T, *shape)}``, on inputs ``(T, B, ...)``; the output is
    ``(T, B, ...)``, task ``t`` computed with parameters ``[t]``. A parameter given
    with its own shape is shared by all tasks.

    The model's ``forward`` runs on packed tensors ``(B, T·C, ...)`` (see the module
    docstring), so it must address features only through its layers, ``flatten(1)``
    and element-wise operations (as :class:`lowlearn.models.Conv4` and
    :class:`lowlearn.models.MLP` do): an operation mixing the features of one example,
    such as a mean over channels, would mix the tasks.

    Raises:
        ValueError: a layer that has no task-batched form: with parameters or buffers
            (batch norm with running statistics, layer norm, grouped convolutions,
            parametrized layers such as masks, ...), or parameter-free but not known to
            keep the tasks apart (softmax over the features, group norm without affine
            parameters, ...; the layers known to keep them apart are in ``PER_FEATURE`` and ``POOLS``),
            or with forward hooks, which the task-batched form would not run.
    """
    batched = _convert(model)
    if batched is model:
        batched = copy.copy(model)
    batched.__class__ = type(f"TaskBatched{type(model).__name__}", (_TaskBatchedRoot, type(batched)), {})
    return batched


def summed_over_tasks(loss_fn: LossFn) -> LossFn:
    """``Σ_t loss_fn(out[t], y[t])`` for outputs and targets ``(T, B, ...)``, in one call of ``loss_fn``.

    ``loss_fn`` must average over its examples (the default reduction of
    ``F.cross_entropy`` and ``F.mse_loss``): every task has ``B`` of them, so the
    mean over all ``T·B`` times ``T`` is the sum of the per-task means.
    """
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out.flatten(0, 1), y.flatten(0, 1)) * out.shape[0]
    return loss
