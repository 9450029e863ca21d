"""The functional core of optimisation-based meta-learning: parameters as dicts, inner loops as code.

A model's parameters are a ``{name: tensor}`` dict, and
:func:`torch.func.functional_call` runs the model with any such dict. An inner loop
then produces *new* tensors from the old ones, ``θ' = θ − α ∇_θ L_support(θ)``, and
autograd can differentiate a query loss at ``θ'`` back to the initial ``θ``: through
the gradient itself (second order, ``create_graph=True``) or, detaching it, only
through the identity path (first order).

Memory grows with the inner steps (each keeps its graph for the outer backward
pass) and with the tasks adapted together (``tasks_at_once``), not with the number
of tasks: the meta-learners of :mod:`lowlearn.meta.maml` back-propagate each group's
query loss before they adapt to the next group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..checks import check_count, check_flag, check_rate, check_scalar_loss
from ..lowrank.layers import refuse_integrator_factors
from ..powerprop import routes_theta_gradients

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def parameters_of(model: nn.Module) -> Params:
    """``{name: parameter}`` of the model: the very parameters, so that gradients reach them."""
    return dict(model.named_parameters())


def run(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` computed with ``params`` in place of the model's parameters (buffers are the model's own)."""
    return functional_call(model, ({**dict(model.named_buffers()), **params},), (x,))


def inner_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: float | Mapping[str, Tensor],
    *,
    first_order: bool = False,
    adapt: Iterable[str] | None = None,
    losses: list[Tensor] | None = None,
) -> Params:
    """``steps`` steps of gradient descent on ``loss_fn(model(x), y)``, differentiable in the initial ``params``.

    ``θ_{k+1} = θ_k − α ⊙ ∇_θ L(θ_k)`` for the parameters named in ``adapt`` (default:
    all); the others are used as they are (ANIL adapts only the head).

    Args:
        model: the network (its own parameters are not used unless passed in ``params``).
        params: the initial parameters ``θ_0``.
        x, y: the support set.
        loss_fn: the task loss.
        steps: inner steps (0 returns ``params`` unchanged).
        lr: ``α``, one number, or a tensor per adapted parameter (Meta-SGD's learned rates).
        first_order: detach the inner gradients (first-order MAML): the result depends on
            ``θ_0`` only through the identity, and no second-order graph is kept.
        adapt: names of the parameters that adapt (default: every one in ``params``;
            name them when some do not require gradients).
        losses: a list to which each step's support loss ``L(θ_k)`` is appended, detached
            (``steps`` of them; the first is the loss before adapting).

    Returns:
        The adapted parameters ``θ_steps`` (all of them, adapted or not).

    Raises:
        ValueError: negative ``steps``; an ``adapt`` that names a parameter twice or one not in
            ``params``; an ``lr`` that is not a positive, finite number, or a
            dictionary of rates without one for an adapted parameter or with one whose shape
            would broadcast the parameter to a larger one; an adapted parameter that
            does not require gradients or that the loss does not use (leave it out of
            ``adapt``, or freeze it), or that is the factor ``U`` or ``V`` of a low-rank layer
            (:func:`~lowlearn.lowrank.layers.integrator_factors`); or a model whose gradients a
            live :class:`~lowlearn.powerprop.PowerPropOptimizer` routes.
        TypeError: ``first_order`` other than ``True`` or ``False``.
        RuntimeError: gradients turned off (:func:`torch.no_grad`, :func:`torch.inference_mode`).
    """
    check_count("steps (inner steps)", steps, 0)
    first_order = check_flag("first_order", first_order)
    params = dict(params)
    names = list(params) if adapt is None else list(adapt)
    check_adapt_names(names, params)
    check_step_sizes(lr, names)
    if isinstance(lr, Mapping):
        check_rate_shapes(lr, {name: params[name] for name in names})
    if steps:
        check_gradients_allowed()
        if routes_theta_gradients(model):
            raise ValueError("a PowerPropOptimizer routes ∂L/∂θ to the Powerprop weights φ of this model, so the inner "
                             "loop would not get its gradients ∂L/∂φ: meta-train with a plain torch.optim optimizer, "
                             "and call .remove() on the PowerPropOptimizer (or drop it)")
        if frozen := [name for name in names if not params[name].requires_grad]:
            raise ValueError(f"the parameters {frozen} do not require gradients, so the inner loop cannot adapt them: "
                             "name the parameters that adapt in adapt= (or pass ones that require gradients)")
        refuse_integrator_factors(model, names, "gradient steps on them would be wrong: leave them out of adapt= "
                                  "or freeze them (requires_grad_(False)); S and the other parameters adapt correctly")
    for _ in range(steps):
        loss = loss_fn(run(model, params, x), y)
        check_scalar_loss(loss)
        if losses is not None:
            losses.append(loss.detach())
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
        if unused := [name for name, grad in zip(names, grads) if grad is None]:
            raise ValueError(f"the support loss does not use the parameters {unused}, so the inner loop cannot adapt "
                             "them: leave them out of adapt= (or freeze them, requires_grad_(False))")
        for name, grad in zip(names, grads):
            step = lr[name] * grad if isinstance(lr, Mapping) else lr * grad
            params[name] = params[name] - step
    return params


def check_adapt_names(adapt: list[str], names: Iterable[str]) -> None:
    """Raise a ValueError if ``adapt`` names a parameter more than once (it would take as many steps at once) or
    one that is not among ``names``."""
    names, named = list(names), set(adapt)
    if len(named) < len(adapt):
        repeated = sorted({name for name in adapt if adapt.count(name) > 1})
        raise ValueError(f"adapt names {repeated} more than once; each parameter adapts once per step")
    unknown = named - set(names)
    if unknown:
        raise ValueError(f"unknown parameters in adapt: {sorted(unknown)}; the parameters are {names}")


def check_step_sizes(lr: float | Mapping[str, Tensor], names: Iterable[str]) -> None:
    """Raise a ValueError unless ``lr`` is a positive, finite number or a mapping with a rate for each of ``names``."""
    if not isinstance(lr, Mapping):
        check_rate("lr", lr)
    elif missing := [name for name in names if name not in lr]:
        raise ValueError(f"lr has no step size for the adapted parameters {missing}: give one for each")


def check_rate_shapes(lr: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Raise a ValueError if a rate of ``lr`` would broadcast its parameter of ``params`` to a larger shape.

    ``θ − α ⊙ ∇L`` takes the shape of ``α`` and ``θ`` broadcast together: a rate with dimensions the
    parameter lacks would silently give the adapted parameter them (one bias per example, say).
    """
    for name, param in params.items():
        # Checked on the shapes alone, in Python: this runs at every inner loop (torch.broadcast_shapes costs
        # tens of microseconds a parameter). A number has the shape ().
        shape = tuple(getattr(lr[name], "shape", ()))
        if len(shape) > param.dim() or any(r not in (1, n) for r, n in zip(reversed(shape), reversed(param.shape))):
            raise ValueError(f"the step size of {name!r} has shape {shape}, which does not broadcast to "
                             f"the parameter's {tuple(param.shape)}: give one rate, or one per element of the "
                             "parameter")


def check_gradients_allowed() -> None:
    """Raise a RuntimeError that says what to do if gradients cannot be taken here: under :func:`torch.inference_mode`
    or :func:`torch.no_grad`.

    Adaptation takes gradients of the support loss even at test time. The learners
    turn them back on under :func:`torch.no_grad` (:func:`torch.enable_grad`) before
    they call :func:`inner_loop`; inference mode cannot be left that way.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("adapting to a task takes gradients of its support loss, which torch.inference_mode() "
                           "forbids: evaluate under torch.no_grad() instead (the learners turn gradients back on "
                           "for the inner steps)")
    if not torch.is_grad_enabled():
        raise RuntimeError("adapting to a task takes gradients of its support loss, which torch.no_grad() turns off: "
                           "call inner_loop under torch.enable_grad(), as the learners do")


def check_task(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *,
               scores_queries: bool = True) -> None:
    """Raise a ValueError naming the problem if a task's tensors do not fit together.

    Inputs and targets must agree in length, the query set must not be empty (unless
    nothing scores it: ``scores_queries=False``, as for Reptile), and support and query
    examples must agree in shape.
    """
    if support_x.shape[0] != support_y.shape[0]:
        raise ValueError(f"the support set has {support_x.shape[0]} inputs but {support_y.shape[0]} targets")
    if scores_queries and query_x.shape[0] == 0:
        raise ValueError("the query set is empty: the meta-objective and the evaluation score the query examples, "
                         "so sample tasks with queries >= 1")
    if query_x.shape[0] != query_y.shape[0]:
        raise ValueError(f"the query set has {query_x.shape[0]} inputs but {query_y.shape[0]} targets")
    if support_x.shape[1:] != query_x.shape[1:]:
        raise ValueError(f"support inputs have shape {tuple(support_x.shape[1:])} per example but query inputs "
                         f"{tuple(query_x.shape[1:])}: they must be the same task")
    if support_y.shape[1:] != query_y.shape[1:]:
        raise ValueError(f"support targets have shape {tuple(support_y.shape[1:])} per example but query targets "
                         f"{tuple(query_y.shape[1:])}")


def values_are_free_to_read(tensor: Tensor) -> bool:
    """Whether checking ``tensor``'s values costs no wait: it is on the CPU.

    Reading a value from an accelerator makes the host wait until every queued kernel
    has run, so that the next step cannot be queued while this one runs. The learners
    therefore check label values on the CPU only. On an accelerator they are left
    unchecked, as PyTorch's own losses leave them: a label out of range fails in the
    device's index check (``one_hot``, ``cross_entropy``) or, if it is −100
    (``cross_entropy``'s ``ignore_index``), drops its example, and a class without support
    examples gives a NaN loss. The episode samplers of :mod:`lowlearn.data.episodes`
    make their labels valid by construction.
    """
    return tensor.device.type == "cpu"


def check_labels(labels: Tensor, ways: int) -> None:
    """Raise a ValueError if integer ``labels`` fall outside ``0 .. ways − 1`` (one read of the device)."""
    if labels.dtype.is_floating_point or labels.numel() == 0:
        return
    low, high = torch.stack([labels.min(), labels.max()]).tolist()
    if low < 0 or high >= ways:
        raise ValueError(f"labels must be in 0 .. {ways - 1} for a {ways}-way model, got labels from {low} to {high}; "
                         "relabel each episode's classes 0 .. N-1")
