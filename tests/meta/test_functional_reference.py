"""lowlearn.meta.functional against torch.func: inner loops and meta-gradients written with torch.func.grad."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from lowlearn.meta.functional import inner_loop, parameters_of, run


def small_convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 3, 3)).double()      # input (B, 1, 6, 8)


def task(seed=0):
    generator = torch.Generator().manual_seed(seed)
    sx, qx = (torch.randn(n, 1, 6, 8, generator=generator, dtype=torch.float64) for n in (5, 4))
    sy, qy = torch.randint(0, 3, (5,), generator=generator), torch.randint(0, 3, (4,), generator=generator)
    return sx, sy, qx, qy


def functorch_adapt(model, theta, x, y, steps, lr, adapt):
    """θ_{k+1} = θ_k − α ⊙ ∇L(θ_k) on the named parameters, gradients by torch.func.grad (a functional transform)."""
    def support_loss(adapted, fixed):
        return F.cross_entropy(functional_call(model, {**fixed, **adapted}, (x,)), y)

    for _ in range(steps):
        adapted = {n: theta[n] for n in adapt}
        fixed = {n: p for n, p in theta.items() if n not in adapt}
        g = grad(support_loss)(adapted, fixed)
        theta = {**theta, **{n: theta[n] - (lr[n] if isinstance(lr, dict) else lr) * g[n] for n in adapt}}
    return theta


@pytest.mark.parametrize("adapt", [None, ["5.weight", "5.bias"]], ids=["all", "head only"])
def test_second_order_meta_gradient_of_inner_loop_equals_nested_torch_func_grad(adapt):
    """∇_θ₀ L_q(θ₃) by autograd through ``inner_loop`` equals the same composite differentiated by torch.func.grad
    with a torch.func.grad inner loop (batch norm without running statistics included)."""
    model = small_convnet()
    sx, sy, qx, qy = task()
    names = [n for n, _ in model.named_parameters()] if adapt is None else adapt

    def meta_loss(theta):
        adapted = functorch_adapt(model, theta, sx, sy, 3, 0.2, names)
        return F.cross_entropy(functional_call(model, adapted, (qx,)), qy)

    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = grad(meta_loss)(theta)
    params = parameters_of(model)
    adapted = inner_loop(model, params, sx, sy, F.cross_entropy, 3, 0.2, adapt=adapt)
    loss = F.cross_entropy(run(model, adapted, qx), qy)
    got = torch.autograd.grad(loss, list(params.values()))
    for (name, e), g in zip(expected.items(), got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    if adapt is not None:                       # the body is not adapted, but the meta-gradient still reaches it
        assert all(adapted[n] is params[n] for n in params if n not in adapt)


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters():
    """First-order MAML: dθ_k/dθ₀ is taken as the identity, so the meta-gradient is ∇L_q at θ_k (computed here with
    torch.func.grad at the θ_k of a torch.func inner loop)."""
    model = small_convnet()
    sx, sy, qx, qy = task(1)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted_ref = functorch_adapt(model, theta, sx, sy, 2, 0.3, list(theta))
    expected = grad(lambda p: F.cross_entropy(functional_call(model, p, (qx,)), qy))(adapted_ref)
    params = parameters_of(model)
    adapted = inner_loop(model, params, sx, sy, F.cross_entropy, 2, 0.3, first_order=True)
    for name in params:
        torch.testing.assert_close(adapted[name], adapted_ref[name], rtol=1e-12, atol=1e-13, msg=name)
    got = torch.autograd.grad(F.cross_entropy(run(model, adapted, qx), qy), list(params.values()))
    for (name, e), g in zip(expected.items(), got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_meta_sgd_rates_get_the_gradient_of_the_nested_torch_func_composite():
    """Per-parameter learned rates (a Mapping): ∇ with respect to θ₀ and to every α, against torch.func.grad."""
    model = small_convnet()
    sx, sy, qx, qy = task(2)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    rates = {n: 0.05 + 0.2 * torch.rand(p.shape, generator=generator, dtype=p.dtype) for n, p in theta.items()}

    def meta_loss(theta, rates):
        adapted = functorch_adapt(model, theta, sx, sy, 2, rates, list(theta))
        return F.cross_entropy(functional_call(model, adapted, (qx,)), qy)

    expected_theta, expected_rates = grad(meta_loss, argnums=(0, 1))(theta, rates)
    params = {n: p.clone().requires_grad_() for n, p in theta.items()}
    lrs = {n: r.clone().requires_grad_() for n, r in rates.items()}
    adapted = inner_loop(model, params, sx, sy, F.cross_entropy, 2, lrs)
    got = torch.autograd.grad(F.cross_entropy(run(model, adapted, qx), qy), list(params.values()) + list(lrs.values()))
    expected = list(expected_theta.values()) + list(expected_rates.values())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_run_keeps_the_models_buffers_and_replaces_only_the_parameters_given():
    """``run`` equals ``functional_call`` with the model's buffers and the given parameters (running statistics of a
    batch norm in evaluation mode included), and the model itself with its own parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(run(model, parameters_of(model), x), model(x))
    other = {"0.weight": torch.randn(4, 3, dtype=torch.float64)}
    w, b = other["0.weight"], model[0].bias
    hidden = (x @ w.T + b - model[1].running_mean) / (model[1].running_var + model[1].eps).sqrt()
    expected = (hidden * model[1].weight + model[1].bias) @ model[2].weight.T + model[2].bias
    torch.testing.assert_close(run(model, other, x), expected, rtol=1e-12, atol=1e-12)


def test_an_inner_loop_without_gradients_says_what_to_change():
    # both were torch's "does not require grad" RuntimeErrors, naming neither the parameters nor torch.no_grad()
    model = small_convnet()
    sx, sy, _, _ = task()
    params = parameters_of(model)
    frozen = {**params, "0.bias": params["0.bias"].detach()}
    with pytest.raises(ValueError, match=r"the parameters \['0.bias'\] do not require gradients"):
        inner_loop(model, frozen, sx, sy, F.cross_entropy, 1, 0.1)
    assert inner_loop(model, frozen, sx, sy, F.cross_entropy, 1, 0.1, adapt=["1.weight"])["0.bias"] is frozen["0.bias"]
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch.no_grad\(\) turns off: call inner_loop under "):
        inner_loop(model, params, sx, sy, F.cross_entropy, 1, 0.1)
    with torch.no_grad(), torch.enable_grad():
        inner_loop(model, params, sx, sy, F.cross_entropy, 1, 0.1)


def test_an_inner_loop_refuses_a_parameter_named_twice_or_not_given():
    # a name given twice took two steps in one (twice the step of the reference), and an unknown name was a KeyError
    model = small_convnet()
    sx, sy, _, _ = task()
    params = parameters_of(model)
    once = inner_loop(model, params, sx, sy, F.cross_entropy, 1, 0.1, adapt=["5.bias"])
    expected = functorch_adapt(model, params, sx, sy, 1, 0.1, ["5.bias"])
    torch.testing.assert_close(once["5.bias"], expected["5.bias"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"adapt names \['5.bias'\] more than once"):
        inner_loop(model, params, sx, sy, F.cross_entropy, 1, 0.1, adapt=["5.bias", "5.weight", "5.bias"])
    with pytest.raises(ValueError, match=r"unknown parameters in adapt: \['5.bais'\]; the parameters are \['0.weight'"):
        inner_loop(model, params, sx, sy, F.cross_entropy, 1, 0.1, adapt=["5.bais"])


def test_an_inner_loop_refuses_a_rate_that_would_broadcast_its_parameter_to_a_larger_shape():
    # a rate of shape (5, 3) for the bias (3,) gave an adapted bias of shape (5, 3), one per support example
    model = small_convnet()
    sx, sy, _, _ = task()
    params = parameters_of(model)
    rates = {name: torch.full_like(p, 0.1) for name, p in params.items()}
    with pytest.raises(ValueError, match=r"the step size of '5.bias' has shape \(5, 3\), which does not broadcast "
                                         r"to the parameter's \(3,\)"):
        inner_loop(model, params, sx, sy, F.cross_entropy, 1, {**rates, "5.bias": torch.full((5, 3), 0.1)})
    scalar_rates = {**rates, "5.bias": torch.tensor(0.1, dtype=torch.float64)}
    adapted = inner_loop(model, params, sx, sy, F.cross_entropy, 1, scalar_rates)
    expected = functorch_adapt(model, params, sx, sy, 1, 0.1, list(params))
    for name in params:
        torch.testing.assert_close(adapted[name], expected[name], rtol=1e-12, atol=1e-12)
