"""Learning an initialisation: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.

Finn, Abbeel & Levine (2017), "Model-agnostic meta-learning for fast adaptation of
deep networks" (ICML). Each task ``T_j`` adapts the shared initialisation ``θ`` (what
the meta-learning chapter calls ``η``, how to learn) by a few gradient steps on its support set,

    θ'_j = θ − α ∇_θ L_{T_j}^{support}(θ)        (repeated ``inner_steps`` times),

and ``θ`` is meta-trained so that the *adapted* parameters do well on the query set:

    min_θ mean_j L_{T_j}^{query}(θ'_j).

The meta-gradient goes through the inner update, ``∂θ'/∂θ = I − α ∇²L``: a
Hessian–vector product per step (autograd's double backward). Variants:

* ``first_order=True``: drop ``∇²L`` (first-order MAML, Finn et al. section 5.2):
  the meta-gradient is the query gradient at ``θ'``.
* :class:`ANIL` (Raghu et al. 2020, "Rapid learning or feature reuse?"): only the
  head adapts; the body is meta-learned but fixed within a task.
* :class:`MetaSGD` (Li et al. 2017, "Meta-SGD: learning to learn quickly for few-shot
  learning"): the inner learning rate is a learned tensor ``α`` per parameter,
  ``θ' = θ − α ⊙ ∇L``, meta-trained with ``θ``.
* :class:`Reptile` (Nichol, Achiam & Schulman 2018, "On first-order meta-learning
  algorithms"): no query loss and no meta-gradient; move ``θ`` towards the weights
  each task reaches, ``θ ← θ + ε · mean_j (θ̃_j − θ)``.

Tasks come in batches with a leading task dimension, such as
:class:`lowlearn.data.episodes.Episode` or :class:`lowlearn.data.tasks.RegressionBatch`
(``support_x``, ``support_y``, ``query_x``, ``query_y``). :meth:`MAML.meta_step`
back-propagates each task's query loss before adapting to the next one, so memory
does not grow with the number of tasks. With ``tasks_at_once=T`` it adapts ``T``
tasks together instead, each layer of all ``T`` networks one kernel
(:mod:`lowlearn.meta.batched`): fewer, larger kernels for a GPU, for ``T`` times
the memory. On a CPU this pays only while the ``T`` tasks' activations fit in the
caches (``python -m lowlearn.bench maml`` measures both ways).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_count, check_flag, check_rate, check_scalar_loss
from ..train import buffers_restored
from .batched import summed_over_tasks, task_batched
from .functional import (LossFn, Params, check_adapt_names, check_labels, check_step_sizes, check_task, inner_loop,
                         parameters_of, run, values_are_free_to_read)


class TaskBatch(Protocol):
    """Tasks stacked along a leading dimension: ``support_x, support_y, query_x, query_y``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the model's parameters that require gradients (a frozen body's are left out)."""
    return [name for name, p in parameters_of(model).items() if p.requires_grad]


def adapted_names(model: nn.Module, adapt: list[str] | None, steps: int) -> list[str]:
    """The names of the parameters an inner loop of ``steps`` steps adapts: ``adapt``, by default the trainable ones.

    Raises:
        ValueError: ``adapt`` names a parameter the model lacks, a frozen one
            (``requires_grad=False``) or one twice, or nothing would adapt in
            ``steps >= 1`` steps.
    """
    trainable = trainable_names(model)
    adapt = trainable if adapt is None else list(adapt)
    check_adapt_names(adapt, parameters_of(model))
    frozen = [name for name in adapt if name not in trainable]
    if frozen:
        raise ValueError(f"adapt names frozen parameters (requires_grad=False): {frozen}; unfreeze them, or "
                         "leave them out of adapt")
    if steps and not adapt:
        raise ValueError("nothing adapts in the inner loop: adapt is empty (or every parameter is frozen); name "
                         "the parameters that adapt, or unfreeze them (MAML also takes inner_steps=0)")
    return adapt


def head_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the ``nn.Linear`` registered last in the model (its head, e.g. for ANIL).

    That is the layer that runs last in a model that registers its layers in the order
    it applies them, as an ``nn.Sequential`` does; for another, name the head's
    parameters in ``adapt=`` of :class:`MAML`.
    """
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ValueError("the model has no nn.Linear layer to use as the head")
    prefix = heads[-1] + "." if heads[-1] else ""
    return [prefix + name for name, _ in dict(model.named_modules())[heads[-1]].named_parameters()]


class MAML(nn.Module):
    """Model-agnostic meta-learning (see the module docstring for the variants).

    Args:
        model: the learner ``f_θ``; its parameters are the meta-learned ``θ``. For
            few-shot classification use batch norm without running statistics
            (:class:`lowlearn.models.Conv4` with ``running_stats=False``):
            transductive batch norm, each set normalised by its own statistics.
        inner_lr: ``α``, the inner learning rate (Finn et al.: 0.4 for Omniglot,
            0.01 for sinusoids); the initial value of the learned rates with ``learn_lr``.
        inner_steps: gradient steps on each support set during meta-training.
        first_order: first-order MAML (no second derivatives).
        adapt: names of the parameters that adapt in the inner loop (default: all that
            require gradients; frozen ones are used as they are).
        learn_lr: learn a rate per parameter element (Meta-SGD).
        loss_fn: the task loss (cross-entropy; ``F.mse_loss`` for regression); with
            ``tasks_at_once > 1`` it must average over its examples (see
            :func:`~lowlearn.meta.batched.summed_over_tasks`).
        tasks_at_once: tasks adapted together in meta-training and evaluation. 1 (the
            default) adapts one task after another and works with any model; more runs
            them through :func:`~lowlearn.meta.batched.task_batched` (Conv2d, Linear and
            batch norm without running statistics), with the same results (up to
            rounding; dropout draws other masks), fewer kernel launches and memory for
            that many tasks. The loss is then checked to average over its examples,
            and the model to give each task the output shape it gives one task alone
            (a ``forward`` that squeezes its output does not).

    Raises:
        ValueError: an ``inner_lr`` that is not a positive, finite number, a negative
            ``inner_steps``, or zero inner steps with second order
            (there would be nothing to differentiate through), an unknown name in
            ``adapt``, an ``adapt`` with no trainable parameter while there are inner
            steps, ``tasks_at_once`` below 1, or a model with layers that cannot run
            task-batched when ``tasks_at_once > 1``.
        TypeError: ``first_order`` or ``learn_lr`` other than ``True`` or ``False``.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int = 1, *, first_order: bool = False,
                 adapt: list[str] | None = None, learn_lr: bool = False, loss_fn: LossFn = F.cross_entropy,
                 tasks_at_once: int = 1):
        super().__init__()
        check_rate("inner_lr", inner_lr)
        check_count("inner_steps", inner_steps, 0)
        check_count("tasks_at_once", tasks_at_once, 1)
        first_order = check_flag("first_order", first_order)
        learn_lr = check_flag("learn_lr", learn_lr)
        if tasks_at_once > 1:
            task_batched(model)                     # raises now if a layer has no task-batched form
        if inner_steps == 0 and not first_order:
            raise ValueError("second-order MAML with 0 inner steps has no inner update to differentiate through: "
                             "use inner_steps >= 1 (or first_order=True to train the initialisation directly)")
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.first_order, self.loss_fn, self.tasks_at_once = first_order, loss_fn, tasks_at_once
        self.adapt_names = adapted_names(model, adapt, inner_steps)
        params = parameters_of(model)
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(params[n], inner_lr)) for n in self.adapt_names]
                                    if learn_lr else [])

    def learning_rates(self) -> float | dict[str, Tensor]:
        """``α``: the number, or ``{name: learned rate tensor}`` (Meta-SGD)."""
        if not len(self.lrs):
            return self.inner_lr
        return dict(zip(self.adapt_names, self.lrs))

    def adapt(self, x: Tensor, y: Tensor, steps: int | None = None, *, first_order: bool | None = None) -> Params:
        """The parameters adapted to one task's support set ``(x, y)`` (default: the meta-training steps).

        The model's buffers (batch-norm running statistics) are left as they were. With
        ``steps=0`` the result is the initialisation itself, and the support set may be
        empty, as in :func:`adapt_and_evaluate`.

        Raises:
            ValueError: inputs and targets of different lengths, an empty support set with
                ``steps >= 1``, (on the CPU) integer labels outside the model's classes,
                real-valued targets that would broadcast the outputs to a larger shape (see
                :func:`check_tasks`), or a negative ``steps``.
            TypeError: ``first_order`` other than ``None``, ``True`` or ``False``.
            RuntimeError: inner steps under :func:`torch.inference_mode`, which forbids their
                gradients (under :func:`torch.no_grad` they are turned back on).
        """
        steps = check_count("steps (inner steps)", self.inner_steps if steps is None else steps, 0)
        first_order = self.first_order if first_order is None else check_flag("first_order", first_order)
        if len(x) != len(y):
            raise ValueError(f"the support set must hold as many targets as inputs: got {len(x)} inputs and "
                             f"{len(y)} targets")
        if steps and not len(x):
            raise ValueError("the support set is empty, so the inner loop has nothing to adapt to (its loss would be "
                             "NaN, its gradient zero): give at least one example, or adapt with steps=0")
        params = parameters_of(self.model)
        if len(x):                                        # an empty support set (steps=0) has no targets to check
            if y.dtype.is_floating_point:
                _check_targets_fit(output_shape(self.model, params, x), y.shape, "support")
            elif values_are_free_to_read(y):
                check_labels(y, output_shape(self.model, params, x)[-1])
        with torch.enable_grad(), buffers_restored(self.model):   # the inner steps need gradients, also under no_grad
            return inner_loop(self.model, params, x, y, self.loss_fn, steps, self.learning_rates(),
                              first_order=first_order,
                              adapt=self.adapt_names)

    def forward(self, x: Tensor, params: Params | None = None) -> Tensor:
        """The learner's output with ``params`` (default: the meta-learned initialisation)."""
        return self.model(x) if params is None else run(self.model, params, x)

    def meta_backward(self, tasks: TaskBatch) -> dict[str, Tensor]:
        """Accumulate the meta-gradient of the mean query loss over ``tasks`` into ``.grad``.

        Each task is adapted, its query loss divided by the number of tasks is
        back-propagated, and its graph freed before the next task.

        Unlike :meth:`adapt`, this is a training pass: in training mode, batch norm
        that keeps running statistics updates them on every forward pass (each inner
        step and the query pass of each task, with that task's adapted weights).

        Returns:
            ``{"loss": mean query loss, "accuracy": mean query accuracy}`` (0-d
            tensors on the device; accuracy only for integer labels).

        Raises:
            ValueError: tasks whose tensors do not fit together (see :func:`check_tasks`),
                labels outside the model's ``0 .. N−1``, or, with ``tasks_at_once > 1``, a
                loss that is not the plain mean over its examples or a model that does not
                give each task the output shape it gives one task alone.
        """
        count = tasks.support_x.shape[0]
        params = parameters_of(self.model)
        check_tasks(self.model, params, tasks, adapts=self.inner_steps > 0)
        total, correct = 0.0, 0.0
        loss_fn = summed_over_tasks(self.loss_fn)
        with torch.enable_grad():                  # a meta-gradient, also when called under torch.no_grad()
            for part, forward, adapted in adapted_tasks(self.model, params, tasks, self.loss_fn, self.inner_steps,
                                                        self.learning_rates(), first_order=self.first_order,
                                                        adapt=self.adapt_names, tasks_at_once=self.tasks_at_once):
                query_y = tasks.query_y[part]
                out = forward(adapted, tasks.query_x[part])
                loss = loss_fn(out, query_y)
                (loss / count).backward()
                total = total + loss.detach()
                if not query_y.dtype.is_floating_point:
                    correct = correct + (out.argmax(-1) == query_y).float().mean(-1).sum().detach()
        stats = {"loss": total / count}
        if not tasks.query_y.dtype.is_floating_point:
            stats["accuracy"] = correct / count
        return stats

    def meta_step(self, tasks: TaskBatch, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """One meta-training step: zero the gradients, :meth:`meta_backward`, ``optimizer.step()``.

        Raises:
            ValueError: as :meth:`meta_backward`, before the optimizer steps.
        """
        optimizer.zero_grad(set_to_none=True)
        stats = self.meta_backward(tasks)
        optimizer.step()
        return stats

    def evaluate(self, tasks: TaskBatch, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to every task (``steps`` inner steps, default the meta-training ones) and score the query sets.

        See :func:`adapt_and_evaluate`.
        """
        return adapt_and_evaluate(self.model, tasks, self.loss_fn, self.inner_steps if steps is None else steps,
                                  self.learning_rates(), adapt=self.adapt_names, tasks_at_once=self.tasks_at_once)


def check_tasks(model: nn.Module, params: Params, tasks: TaskBatch, *, adapts: bool = True,
                scores_queries: bool = True) -> None:
    """Raise a ValueError before any loss uses ``tasks`` if they do not fit together or the model.

    The four tensors must hold the same number of tasks (at least one), every task
    must pass :func:`~lowlearn.meta.functional.check_task` (stacked tasks share their
    shapes, so the first stands for all), and integer labels must be classes of the
    model: ``0 .. N−1``, where ``N`` is the size of the model's output on the first
    query set (:func:`output_shape`: one forward pass with ``params`` the first time
    these shapes come). The labels are checked on the CPU only
    (:func:`~lowlearn.meta.functional.values_are_free_to_read`). Real-valued targets
    must not broadcast the model's output to a larger shape (targets ``(K,)`` against
    outputs ``(K, 1)`` would compare every output with every target); this uses the
    same output shape, on any device. With ``adapts`` (inner steps to come), the
    support sets must not be empty. With ``scores_queries=False``, for a learner that
    uses the support sets only (Reptile), the query sets may be empty, and the first
    support set takes the first query set's place.
    """
    flat = [name for name in ("support_x", "support_y", "query_x", "query_y") if getattr(tasks, name).dim() < 2]
    if flat:
        raise ValueError(f"{flat} have no task dimension: stack the tasks along dimension 0, (tasks, examples, ...); "
                         "for one task, x.unsqueeze(0)")
    counts = {name: getattr(tasks, name).shape[0] for name in ("support_x", "support_y", "query_x", "query_y")}
    if len(set(counts.values())) != 1 or not counts["support_x"]:
        raise ValueError(f"the tasks' tensors must stack the same number of tasks (at least one) along their first "
                         f"dimension, got {counts}")
    check_task(tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0],
               scores_queries=scores_queries)
    if adapts and tasks.support_x.shape[1] == 0:
        raise ValueError("the support sets are empty, so the inner loop has nothing to adapt to (its loss would be "
                         "NaN, its gradient zero): sample tasks with shots >= 1")
    regression = tasks.query_y.dtype.is_floating_point
    if not regression and not values_are_free_to_read(tasks.support_y):
        return
    probe_x, probe_y = (tasks.query_x, tasks.query_y) if scores_queries else (tasks.support_x, tasks.support_y)
    out = output_shape(model, params, probe_x[0])
    if regression:
        _check_targets_fit(out, probe_y.shape[1:], "query" if scores_queries else "support")
    else:
        check_labels(torch.cat([tasks.support_y.flatten(), tasks.query_y.flatten()]), out[-1])


_OUTPUT_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {(input, parameter shapes): output}


def output_shape(model: nn.Module, params: Params, x: Tensor) -> torch.Size:
    """The shape of ``model``'s output on the inputs ``x`` with ``params``, without a pass where it is known.

    One forward pass without gradients (the model's buffers left as they were) the
    first time; after that the shape is remembered for the model, the shape of ``x``
    and the names and shapes of ``params`` (a new head with more classes has a new
    weight shape, so it is run again). A meta-training step checks its labels or
    targets against this shape, and a step of the same shapes costs no extra pass.
    """
    key = (tuple(x.shape), tuple((name, tuple(p.shape)) for name, p in params.items()))
    known = _OUTPUT_SHAPES.setdefault(model, {})
    if key not in known:
        with torch.no_grad(), buffers_restored(model):
            known[key] = run(model, params, x).shape
    return known[key]


def _check_targets_fit(output: torch.Size, target: torch.Size, part: str) -> None:
    """Raise a ValueError if targets of shape ``target`` would broadcast ``output``-shaped outputs to more.

    ``part`` names the set, ``"support"`` or ``"query"``, in the message.
    """
    try:
        shape = torch.broadcast_shapes(output, target)
    except RuntimeError:
        return                                              # the loss function says what does not fit
    if shape != output:
        raise ValueError(f"the targets of a {part} set have shape {tuple(target)} but the model's outputs "
                         f"{tuple(output)}: a loss would broadcast them to {tuple(shape)}, comparing every output "
                         "with every target; give the targets the outputs' shape (e.g. y.unsqueeze(-1))")


Forward = Callable[[Params, Tensor], Tensor]


def adapted_tasks(model: nn.Module, params: Params, tasks: TaskBatch, loss_fn: LossFn, steps: int,
                  lr: float | Mapping[str, Tensor], *, first_order: bool, adapt: list[str] | None = None,
                  tasks_at_once: int = 1,
                  losses: list[Tensor] | None = None) -> Iterator[tuple[slice, Forward, Params]]:
    """Adapt ``params`` to the tasks' support sets, ``tasks_at_once`` tasks at a time, and yield each group.

    Each group comes as ``(part, forward, adapted)``: the slice of ``tasks`` it holds
    (``T`` tasks), and a ``forward(params, x)`` that maps inputs ``(T, B, ...)`` to
    outputs ``(T, B, ...)``, task ``t`` with its own parameters in ``adapted``
    (``forward`` also takes ``params`` themselves, shared by the ``T`` tasks). With
    ``tasks_at_once=1`` each task runs through ``model`` itself (``T = 1``); with more,
    through :func:`~lowlearn.meta.batched.task_batched`. A group is adapted when the
    caller asks for it, so a caller that back-propagates each group's loss before the
    next keeps one group's graph at a time. ``losses`` is
    :func:`~lowlearn.meta.functional.inner_loop`'s, for every group in turn: ``steps``
    losses per group, each the sum of its tasks' support losses.
    """
    count = tasks.support_x.shape[0]
    names = list(params) if adapt is None else list(adapt)
    if tasks_at_once == 1:
        def forward(adapted: Params, x: Tensor) -> Tensor:
            return run(model, adapted, x[0]).unsqueeze(0)

        for j in range(count):
            adapted = inner_loop(model, params, tasks.support_x[j], tasks.support_y[j], loss_fn, steps, lr,
                                 first_order=first_order, adapt=names, losses=losses)
            yield slice(j, j + 1), forward, adapted
        return
    if tasks.support_x.shape[1] > 1:
        check_mean_loss(model, params, tasks.support_x[0], tasks.support_y[0], loss_fn)
    else:                   # one example's loss is its weighted mean too: the first task's queries join the check
        check_mean_loss(model, params, torch.cat([tasks.support_x[0], tasks.query_x[0]]),
                        torch.cat([tasks.support_y[0], tasks.query_y[0]]), loss_fn)
    x = tasks.support_x if tasks.support_x.shape[1] else tasks.query_x
    batched, summed = task_batched(model), summed_over_tasks(loss_fn)
    check_task_outputs(model, batched, params, x[:2])
    for start in range(0, count, tasks_at_once):
        part = slice(start, start + tasks_at_once)
        size = tasks.support_x[part].shape[0]
        stacked = {name: p.expand(size, *p.shape) if name in names else p for name, p in params.items()}
        adapted = inner_loop(batched, stacked, tasks.support_x[part], tasks.support_y[part], summed, steps, lr,
                             first_order=first_order, adapt=names, losses=losses)
        yield part, partial(run, batched), adapted


_AVERAGING_LOSSES: weakref.WeakSet = weakref.WeakSet()      # loss functions found to average over their examples
_MATCHING_OUTPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → input shapes checked


def check_task_outputs(model: nn.Module, batched: nn.Module, params: Params, x: Tensor) -> None:
    """Raise a ValueError unless ``batched`` gives each of the tasks ``x`` the output shape ``model`` gives one.

    A ``forward`` that reshapes its output by the sizes it finds (``out.squeeze(-1)``)
    sees ``(B, T)`` on packed tasks where a single task gives ``(B, 1)``, keeps it, and
    each task's output comes back ``(B, 1)`` instead of ``(B,)``: against targets
    ``(B,)``, a loss such as ``F.mse_loss`` would broadcast to ``(B, B)`` and only
    warn. This runs both once without gradients (the model's buffers left as they
    were), once per model and task input shape.
    """
    shape = tuple(x.shape[1:])
    if shape in _MATCHING_OUTPUTS.get(model, ()):
        return
    alone = output_shape(model, params, x[0])
    with torch.no_grad(), buffers_restored(model):
        together = run(batched, params, x).shape[1:]
    if alone != together:
        raise ValueError(f"run task-batched, the model gives each task an output of shape {tuple(together)}, but "
                         f"{tuple(alone)} run alone: its forward reshapes the packed tasks' outputs (a squeeze, "
                         "view or reshape by the sizes it finds would); leave the output's shape to the loss "
                         "(e.g. squeeze the outputs in loss_fn), or use tasks_at_once=1")
    _MATCHING_OUTPUTS.setdefault(model, set()).add(shape)


def check_mean_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn) -> None:
    """Raise a ValueError unless ``loss_fn`` averages over its examples, as adapting tasks together needs.

    :func:`~lowlearn.meta.batched.summed_over_tasks` takes the loss over all ``T``
    tasks' examples at once, times ``T``: a loss that sums them (``reduction="sum"``)
    would make every inner step ``T`` times larger, and a weighted mean (cross-entropy
    with class ``weight=``) divides by the weights of all ``T`` tasks together. A mean
    does not change when every example is repeated, a sum doubles; and the mean over
    two halves of the examples is the mean of the halves' means, which a weighted mean
    of halves with other labels is not (with labels ``y`` of one dimension the examples
    are sorted by label first, so that the halves hold other labels however the examples
    were ordered). This compares both on ``(x, y)`` (one forward pass without gradients,
    the model's buffers left as they were), once per hashable loss function (one that
    is not hashable at every call), reading the device once.
    """
    try:
        if loss_fn in _AVERAGING_LOSSES:
            return
    except TypeError:                                   # not hashable: not remembered, checked every time
        pass
    with torch.no_grad(), buffers_restored(model):
        out = run(model, params, x)
        once, twice = loss_fn(out, y), loss_fn(torch.cat([out, out]), torch.cat([y, y]))
        if y.dim() == 1:                       # labels: sorted, so that the halves hold other ones
            order = y.argsort(stable=True)
            out, y = out[order], y[order]
        half = len(x) // 2                     # two halves of one size, whose means average to the whole's
        whole, halves = (loss_fn(out[:2 * half], y[:2 * half]),
                         (loss_fn(out[:half], y[:half]) + loss_fn(out[half:2 * half], y[half:2 * half])) / 2) \
            if half else (once, once)
    check_scalar_loss(once)
    once, twice, whole, halves = torch.stack([once, twice, whole, halves]).tolist()
    if abs(twice - once) > 1e-6 + 1e-4 * abs(once) or abs(halves - whole) > 1e-6 + 1e-4 * abs(whole):
        raise ValueError(f"with tasks_at_once > 1 the loss must be the plain mean over its examples (as "
                         f"reduction='mean' without class weights is): repeating every example changed it from "
                         f"{once:.4g} to {twice:.4g}, and the mean of two halves' losses is {halves:.4g} against "
                         f"{whole:.4g} for both together; pass a plain mean loss, or tasks_at_once=1")
    try:
        _AVERAGING_LOSSES.add(loss_fn)
    except TypeError:                                   # not weakly referable or not hashable
        pass


def adapt_and_evaluate(model: nn.Module, tasks: TaskBatch, loss_fn: LossFn, steps: int,
                       lr: float | dict[str, Tensor], adapt: list[str] | None = None,
                       tasks_at_once: int = 1) -> dict[str, Tensor]:
    """Fine-tune ``model`` on each task's support set by ``steps`` SGD steps, then score its query set.

    The meta-test protocol of every method here (and, with the initialisation of a
    model trained on all tasks at once, of the "pre-trained" baseline of Finn et al.).
    The model itself is not changed (its parameters, and its buffers: a batch norm's
    running statistics are restored afterwards) and no meta-gradient is kept. The
    caller picks train or eval mode. The parameters named in ``adapt`` are fine-tuned,
    by default those that require gradients: frozen ones are used as they are, as in
    :class:`MAML` and :class:`Reptile`. ``tasks_at_once`` tasks are adapted together
    (see :class:`MAML`).

    Returns:
        ``{"loss": ..., "per_task_loss": ..., "accuracy": ..., "per_task_accuracy": ...}``:
        the mean query loss, each task's query loss, and the mean and each task's query
        accuracy (integer labels only; per task, for confidence intervals over tasks).

    Raises:
        ValueError: tasks that fail :func:`check_tasks`, an ``adapt`` that
            :func:`adapted_names` refuses, a ``steps`` or ``tasks_at_once`` that is not a
            count (at least 0 and 1), an ``lr`` that is not a positive, finite number, or
            a dictionary of rates without one for an adapted parameter.
        RuntimeError: ``steps`` above 0 under :func:`torch.inference_mode`, which forbids the
            gradients of the inner steps (under :func:`torch.no_grad` they are turned back on).
    """
    losses, accuracies = [], []
    steps, tasks_at_once = check_count("steps (inner steps)", steps, 0), check_count("tasks_at_once", tasks_at_once, 1)
    adapt = adapted_names(model, adapt, steps)
    check_step_sizes(lr, adapt)
    start = {name: p.detach().requires_grad_(name in adapt) for name, p in parameters_of(model).items()}
    check_tasks(model, start, tasks, adapts=steps > 0)
    if isinstance(lr, Mapping):        # Meta-SGD's learned rates: no graph through them at test time
        lr = {name: rate.detach() for name, rate in lr.items()}
    with buffers_restored(model), torch.enable_grad():
        for part, forward, adapted in adapted_tasks(model, start, tasks, loss_fn, steps, lr, first_order=True,
                                                    adapt=adapt, tasks_at_once=tasks_at_once):
            query_y = tasks.query_y[part]
            with torch.no_grad():
                out = forward({name: p.detach() for name, p in adapted.items()}, tasks.query_x[part])
                losses += [loss_fn(task_out, task_y) for task_out, task_y in zip(out, query_y)]
                if not query_y.dtype.is_floating_point:
                    accuracies.append((out.argmax(-1) == query_y).float().mean(-1))
    per_task = torch.stack(losses)
    stats = {"loss": per_task.mean(), "per_task_loss": per_task}
    if accuracies:
        stats["per_task_accuracy"] = torch.cat(accuracies)
        stats["accuracy"] = stats["per_task_accuracy"].mean()
    return stats


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): MAML that adapts only the head (:func:`head_names`).

    Arguments as for :class:`MAML`, without ``adapt``.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int = 1, **kwargs):
        super().__init__(model, inner_lr, inner_steps, adapt=head_names(model), **kwargs)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per parameter element.

    The rates start at ``inner_lr`` and are meta-trained with the initialisation
    (give the meta-optimizer ``metasgd.parameters()``). Arguments as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int = 1, **kwargs):
        super().__init__(model, inner_lr, inner_steps, learn_lr=True, **kwargs)


class Reptile:
    """Reptile (Nichol, Achiam & Schulman 2018), batched form (their Algorithm 2).

    For each task, ``inner_steps`` steps of SGD (rate ``inner_lr``) from ``θ`` give
    ``θ̃_j`` (full-batch steps on the support set; Nichol et al. take minibatch Adam
    steps, and with one step Reptile is joint training on the mean support
    gradient); then ``θ ← θ + ε · mean_j (θ̃_j − θ)`` with ``ε = outer_lr``. No second
    derivatives and no query set: Reptile trains on the support set only (pass the
    task's whole data as support; :meth:`meta_step` accepts empty query sets, such as
    episodes sampled with ``queries=0``, and :meth:`evaluate` scores the query sets).

    Args:
        model: the learner; its parameters are updated in place by :meth:`meta_step`.
        inner_lr, inner_steps: the task-level SGD.
        outer_lr: ``ε``.
        loss_fn: the task loss.
        tasks_at_once: tasks adapted together, as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, outer_lr: float,
                 loss_fn: LossFn = F.cross_entropy, tasks_at_once: int = 1):
        check_rate("inner_lr", inner_lr)
        check_rate("outer_lr", outer_lr)
        check_count("inner_steps (Reptile needs at least one)", inner_steps, 1)
        check_count("tasks_at_once", tasks_at_once, 1)
        if tasks_at_once > 1:
            task_batched(model)                     # raises now if a layer has no task-batched form
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.outer_lr, self.loss_fn, self.tasks_at_once = outer_lr, loss_fn, tasks_at_once

    def evaluate(self, tasks: TaskBatch, steps: int | None = None) -> dict[str, Tensor]:
        """Fine-tune on each support set (``steps`` SGD steps, default ``inner_steps``), score the query sets."""
        return adapt_and_evaluate(self.model, tasks, self.loss_fn, self.inner_steps if steps is None else steps,
                                  self.inner_lr, tasks_at_once=self.tasks_at_once)

    def meta_step(self, tasks: TaskBatch, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
        """One Reptile update from a batch of tasks; returns ``{"loss": mean support loss before adapting}``.

        Without ``optimizer``: ``θ ← θ + ε · mean_j (θ̃_j − θ)``. With one (over the
        model's parameters, e.g. from :func:`lowlearn.meta.episodic.meta_train`), its step
        takes ``θ − mean_j θ̃_j`` as the gradient: plain SGD at rate ``ε`` is the same
        update (Nichol et al. suggest Adam as another choice; their experiments
        interpolate, as without an optimizer); ``outer_lr`` is then unused.

        Raises:
            ValueError: every parameter of the model is frozen, so nothing would adapt;
                tasks whose tensors do not fit together (see :func:`check_tasks`; the
                query sets may be empty) or whose support sets are empty; labels outside
                the model's ``0 .. N−1``; or, with ``tasks_at_once > 1``, a loss that is
                not the plain mean over its examples or a model that does not give each
                task the output shape it gives one task alone.
        """
        theta = {name: p.detach() for name, p in parameters_of(self.model).items()}
        trainable = adapted_names(self.model, None, self.inner_steps)   # frozen parameters are used as they are
        start = {name: p.detach().requires_grad_(name in trainable) for name, p in theta.items()}
        check_tasks(self.model, start, tasks, scores_queries=False)
        direction = {name: torch.zeros_like(theta[name]) for name in trainable}
        count = tasks.support_x.shape[0]
        losses = []                # each group's support loss at every inner step, summed over the group's tasks
        with torch.enable_grad():
            for _, _, adapted in adapted_tasks(self.model, start, tasks, self.loss_fn, self.inner_steps,
                                               self.inner_lr, first_order=True, adapt=trainable,
                                               tasks_at_once=self.tasks_at_once, losses=losses):
                with torch.no_grad():
                    for name, total in direction.items():     # Σ over the group's tasks of θ̃_j − θ
                        total += (adapted[name] - theta[name]).reshape(-1, *total.shape).sum(0)
        params = parameters_of(self.model)
        if optimizer is None:
            with torch.no_grad():
                for name, total in direction.items():
                    params[name].add_(total, alpha=self.outer_lr / count)
        else:
            optimizer.zero_grad(set_to_none=True)
            for name, total in direction.items():
                params[name].grad = total.div_(-count)
            optimizer.step()
        return {"loss": torch.stack(losses[::self.inner_steps]).sum() / count}   # each group's first step: at θ
