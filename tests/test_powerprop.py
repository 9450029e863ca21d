import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lowlearn.models import MLP, LeNet5
from lowlearn.powerprop import PowerProp, PowerPropOptimizer, powerprop, powerprop_layers, routes_theta_gradients
from lowlearn.sparse.mask import attach_masks, masks_of, prunable_layers, raw_weight, squash
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.scores import magnitude
from lowlearn.sparse.topkast import TopKAST
from lowlearn.train import load_checkpoint, save_checkpoint


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 12), out_features=4)


def batch(seed=1, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def test_alpha_one_is_exactly_the_baseline():
    base = small_mlp()
    model = powerprop(copy.deepcopy(base), 1)
    x, y = batch()
    assert torch.equal(model(x), base(x))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(base(x), y).backward()
    for (name, layer), plain in zip(prunable_layers(model).items(), prunable_layers(base).values()):
        assert torch.equal(raw_weight(layer).grad, plain.weight.grad), name
        assert torch.equal(layer.bias.grad, plain.bias.grad)


@pytest.mark.parametrize("alpha", [1.5, 2, 3, 5])
def test_initialisation_keeps_the_baseline_function(alpha):
    torch.manual_seed(0)
    base = LeNet5()
    model = powerprop(copy.deepcopy(base), alpha)
    x = torch.randn(3, 1, 28, 28)
    # θ = Ψ(Ψ⁻¹(θ₀)) up to float32 rounding of the two powers.
    assert torch.allclose(model(x), base(x), rtol=1e-5, atol=1e-6)
    for layer, plain in zip(prunable_layers(model).values(), prunable_layers(base).values()):
        assert torch.allclose(layer.weight, plain.weight, rtol=1e-5, atol=1e-7)
        phi = raw_weight(layer)
        assert torch.allclose(phi, plain.weight.sign() * plain.weight.abs() ** (1 / alpha), rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.5, 2, 3, 4])
def test_gradient_is_scaled_by_alpha_phi_to_the_alpha_minus_one(alpha):
    model = powerprop(small_mlp(), alpha)
    x, y = batch()
    effective = {name: layer.weight for name, layer in prunable_layers(model).items()}
    # ∂L/∂θ from a plain network holding the same effective weights.
    plain = small_mlp()
    with torch.no_grad():
        for name, layer in prunable_layers(plain).items():
            layer.weight.copy_(effective[name])
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    for name, layer in prunable_layers(model).items():
        phi = raw_weight(layer)
        expected = prunable_layers(plain)[name].weight.grad * alpha * phi.detach().abs() ** (alpha - 1)
        assert torch.allclose(phi.grad, expected, rtol=1e-5, atol=1e-8), name


@pytest.mark.parametrize("alpha", [1.5, 2, 2.5, 3, 4, 5])
def test_the_fast_paths_equal_the_general_formula(alpha):
    # Ψ is computed as φ^α for odd integer α (φ·φ·φ for 3), without abs for even α − 1, and its gradient
    # α|φ|^(α−1) ∂L/∂θ from φ in the backward pass: all against φ|φ|^(α−1) by autograd, in float64.
    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(30, 20, dtype=torch.float64, generator=generator)
    phi[0, :5] = 0.0
    upstream = torch.randn(30, 20, dtype=torch.float64, generator=generator)
    fast, general = phi.clone().requires_grad_(), phi.clone().requires_grad_()
    theta = PowerProp(alpha)(fast)
    reference = general * general.abs() ** (alpha - 1)
    if alpha == 3:
        assert torch.equal(theta, reference)
    assert torch.allclose(theta, reference, rtol=1e-14, atol=0)
    (theta * upstream).sum().backward()
    (reference * upstream).sum().backward()
    nonzero = phi != 0                                   # autograd's own rule is NaN at 0 for α < 2
    assert torch.allclose(fast.grad[nonzero], general.grad[nonzero], rtol=1e-14, atol=0)
    assert torch.equal(fast.grad[~nonzero], torch.zeros_like(fast.grad[~nonzero]))
    # The backward is differentiable: second-order gradients are right too (away from 0 for α < 2).
    away = (phi[1:6, :4] + 0.5 * phi[1:6, :4].sign()).requires_grad_()
    assert torch.autograd.gradgradcheck(PowerProp(alpha), (away,))


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.9, 2, 2.5, 3])
def test_second_order_gradients_of_a_masked_powerprop_layer_equal_those_without_the_pruned_weights(alpha):
    """Pruned weights (φ = 0 under a mask after Powerprop) do not enter the loss: the Hessian-vector product is 0
    there and, elsewhere, that of the loss as a function of the kept weights alone. For α < 2 the slope of
    |φ|^(α−1) at 0 is infinite, and autograd's product with the zero upstream gradient used to give NaN."""
    model = powerprop(small_mlp(), alpha).double()
    prune(model, magnitude(model), 0.5)
    x, y = batch()
    x = x.double()
    name = next(iter(powerprop_layers(model)))
    key = f"{name}.parametrizations.weight.original"
    phi, keep = dict(model.named_parameters())[key], masks_of(model)[name]
    assert (phi[~keep] == 0).all() and (~keep).any()
    vector = torch.randn(phi.shape, dtype=phi.dtype, generator=torch.Generator().manual_seed(2))

    def loss_of(weights):
        return F.cross_entropy(torch.func.functional_call(model, {key: weights}, (x,)), y)

    (grad,) = torch.autograd.grad(loss_of(phi), phi, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, phi, vector)
    assert torch.isfinite(hvp).all() and torch.equal(hvp[~keep], torch.zeros_like(hvp[~keep]))

    def loss_of_kept(kept):
        return loss_of(torch.zeros_like(phi).masked_scatter(keep, kept))

    _, reference = torch.autograd.functional.hvp(loss_of_kept, phi[keep].detach(), vector[keep])
    assert torch.allclose(hvp[keep], reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.5, 2, 3])
def test_torch_func_transforms_give_autograds_derivatives(alpha):
    model = powerprop(small_mlp(), alpha).double()
    x, y = batch()
    x = x.double()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x, y):
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    loss(dict(model.named_parameters()), x, y).backward()
    grads = torch.func.grad(loss)(params, x, y)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-12, atol=1e-15), name
        assert torch.allclose(per_example[name].mean(0), p.grad, rtol=1e-10, atol=1e-15), name
    # Forward mode and batched gradients of Ψ itself, against finite differences.
    phi = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    phi = (phi + 0.5 * phi.sign()).requires_grad_()         # away from 0, where |φ|^(α−1) has a kink for α < 2
    assert torch.autograd.gradcheck(PowerProp(alpha), (phi,), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    tangent = torch.ones_like(phi)
    _, derivative = torch.func.jvp(PowerProp(alpha), (phi.detach(),), (tangent,))
    assert torch.allclose(derivative, alpha * phi.detach().abs() ** (alpha - 1), rtol=1e-14)


def test_zero_is_a_critical_point_without_nan():
    layer = torch.nn.Linear(3, 2)
    powerprop(torch.nn.Sequential(layer), 1.5)
    with torch.no_grad():
        raw_weight(layer).zero_()
    layer(torch.randn(4, 3)).sum().backward()
    assert torch.equal(raw_weight(layer).grad, torch.zeros(2, 3))   # autograd's own pow rule gives NaN here


def test_under_the_wrapper_phi_gets_the_gradient_of_theta_and_the_usual_clipping_scales_the_step():
    model = powerprop(small_mlp(), 3)
    x, y = batch()
    plain = copy.deepcopy(model)                          # a plain network with weights θ: its gradients are ∂L/∂θ
    for layer in powerprop_layers(plain).values():
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    F.cross_entropy(plain(x), y).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()]))
    max_norm = 0.1 * norm.item()
    scale = max_norm / (norm.item() + 1e-6)
    clipped, scaled = copy.deepcopy(model), copy.deepcopy(model)
    # With plain SGD, clipping by a factor c is a step with the learning rate times c.
    for net, lr, limit in ((clipped, 0.5, max_norm), (scaled, 0.5 * scale, None)):
        optimizer = PowerPropOptimizer(torch.optim.SGD(net.parameters(), lr=lr), net)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for p, expected in zip(net.parameters(), plain.parameters()):      # ∂L/∂θ, and the biases' own
            assert torch.allclose(p.grad, expected.grad, rtol=1e-5, atol=1e-8)
        if limit is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), limit)
        optimizer.step()
    for a, b, start in zip(clipped.parameters(), scaled.parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7) and not torch.equal(a, start)
    # Without the wrapper, φ gets its own gradient ∂L/∂φ = α|φ|^(α−1) ∂L/∂θ ...
    F.cross_entropy(model(x), y).backward()
    phi = raw_weight(prunable_layers(model)["1"])
    assert torch.allclose(phi.grad, prunable_layers(plain)["1"].weight.grad * 3 * phi.detach() ** 2,
                          rtol=1e-5, atol=1e-9)
    # ... and so does a deep copy of a wrapped model: the gradients of the same model never wrapped.
    copied, never_wrapped = copy.deepcopy(clipped), powerprop(small_mlp(), 3)
    never_wrapped.load_state_dict(clipped.state_dict())
    copied.zero_grad()
    for net in (copied, never_wrapped):
        F.cross_entropy(net(x), y).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(copied.parameters(), never_wrapped.parameters()))
    copied_phi, clipped_phi = (raw_weight(prunable_layers(net)["1"]) for net in (copied, clipped))
    assert not torch.equal(copied_phi.grad, clipped_phi.grad)


def test_bad_alpha_and_order():
    for bad in (0.5, 0, -2, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="alpha must be a finite number >= 1"):
            PowerProp(bad)
    assert PowerProp(np.int64(2)).alpha == 2.0
    model = small_mlp()
    attach_masks(model)
    with pytest.raises(ValueError, match="apply powerprop\\(\\) before masking"):
        powerprop(model, 2)
    with pytest.raises(ValueError, match="no Powerprop layer"):
        PowerPropOptimizer(torch.optim.SGD(small_mlp().parameters(), lr=0.1), small_mlp())
    model = powerprop(small_mlp(), 2)
    with pytest.raises(ValueError, match="cannot wrap L-BFGS"):
        PowerPropOptimizer(torch.optim.LBFGS(model.parameters()), model)
    model = small_mlp()
    attach_masks(model, ["3"])
    with pytest.raises(ValueError, match="layer '3' already has a parametrization"):
        powerprop(model, 2)
    assert not powerprop_layers(model)                            # the refused call changed no layer


def test_powerprop_on_a_layer_without_a_weight_names_the_layers_that_have_one():
    model = small_mlp()
    with pytest.raises(ValueError, match=r"layer '2' \(ReLU\) has no weight tensor; its Linear/Conv2d layers are"):
        powerprop(model, 2, ["2"])
    assert not powerprop_layers(model)


@pytest.mark.parametrize("model, layers", [(torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3)), None), (None, [])])
def test_powerprop_without_a_layer_to_reparameterise_is_an_error(model, layers):
    # returned unchanged, the model would train as the ordinary network while its caller believes it is Powerprop
    model = small_mlp() if model is None else model
    with pytest.raises(ValueError, match="no layers to reparameterise: layers is empty, or the model has no "):
        powerprop(model, 2, layers)
    assert not powerprop_layers(model)


def test_the_optimiser_aware_update_is_an_adam_step_on_theta_mapped_back():
    alpha, lr = 3.0, 0.01
    model = powerprop(small_mlp(), alpha)
    optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=lr), model)
    layer = prunable_layers(model)["1"]
    phi0, b0 = raw_weight(layer).detach().clone(), layer.bias.detach().clone()
    x, y = batch()

    # ∂L/∂θ by autograd on a plain copy holding θ₀.
    plain = small_mlp()
    with torch.no_grad():
        for name, plain_layer in prunable_layers(plain).items():
            plain_layer.weight.copy_(prunable_layers(model)[name].weight)
    F.cross_entropy(plain(x), y).backward()
    g = prunable_layers(plain)["1"].weight.grad

    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    # Adam's first step by hand: m = (1−β₁)g, v = (1−β₂)g², m̂ = g, v̂ = g², Δθ = −lr · m̂ / (√v̂ + ε).
    delta_theta = -lr * g / (g.abs() + 1e-8)
    expected = phi0 + delta_theta * alpha * phi0.abs() ** (alpha - 1)
    assert torch.allclose(raw_weight(layer), expected, rtol=1e-5, atol=1e-9)
    # The biases take the plain Adam step, with their own gradient (the plain copy's: the same function).
    g_bias = prunable_layers(plain)["1"].bias.grad
    assert torch.allclose(layer.bias, b0 - lr * g_bias / (g_bias.abs() + 1e-8), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("alpha", [2, 2.5, 3, 5])
def test_a_step_that_leaves_theta_alone_leaves_phi_exactly_alone(alpha):
    # Δθ must be θ_new − θ exactly: recomputing θ afterwards with other rounding (a fused multiply-add)
    # moved about one weight in ten of a frozen layer by an ulp per step before.
    torch.manual_seed(0)
    model = powerprop(small_mlp(), alpha)
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            raw_weight(layer).uniform_(0.5, 1.5)                    # where α|φ|^(α−1) amplifies rounding most
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model)
    x, y = batch()
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("alpha", [2, 2.5, 3])
def test_plain_sgd_and_the_optimiser_aware_sgd_agree(alpha):
    model_a = powerprop(small_mlp(), alpha)
    model_b = copy.deepcopy(model_a)
    plain = torch.optim.SGD(model_a.parameters(), lr=0.1)
    aware = PowerPropOptimizer(torch.optim.SGD(model_b.parameters(), lr=0.1), model_b)
    for seed in range(3):
        x, y = batch(seed)
        for model, optimizer in ((model_a, plain), (model_b, aware)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_aware_step_follows_the_model_to_another_dtype():
    model_a = powerprop(small_mlp(), 3)
    model_b = copy.deepcopy(model_a)
    plain = torch.optim.SGD(model_a.parameters(), lr=0.1)
    aware = PowerPropOptimizer(torch.optim.SGD(model_b.parameters(), lr=0.1), model_b)
    for step in range(2):
        if step == 1:                       # after a float32 step: float64, from the same weights
            model_a.double(), model_b.double()
            model_b.load_state_dict(model_a.state_dict())
        x, y = batch(step)
        for model, optimizer in ((model_a, plain), (model_b, aware)):
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
            optimizer.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert b.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-12, atol=0)


def test_a_layer_that_sat_out_a_pass_takes_a_zero_gradient_step_after_zero_grad_without_none():
    torch.manual_seed(0)
    model = powerprop(torch.nn.ModuleDict({"trunk": torch.nn.Linear(20, 8), "a": torch.nn.Linear(8, 4),
                                           "b": torch.nn.Linear(8, 4)}), 3)
    reference = copy.deepcopy(model)
    x, y = batch()
    for net, explicit_zero in ((model, False), (reference, True)):
        aware = PowerPropOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), net)
        for head in ("a", "b", "b"):                 # head a sits out the last two passes ...
            aware.zero_grad(set_to_none=False)
            features = net["trunk"](x).relu()
            loss = F.cross_entropy(net[head](features), y)
            if explicit_zero and head == "b":        # ... or, for the reference, takes part with weight 0
                loss = loss + 0 * net["a"](features).sum()
            loss.backward()
            aware.step()
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


def test_a_gradient_the_wrapper_did_not_see_is_an_error():
    x, y = batch()
    model = powerprop(small_mlp(), 3)
    F.cross_entropy(model(x), y).backward()                     # before the wrapper exists: ∂L/∂φ
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(RuntimeError, match="did not come through this PowerPropOptimizer"):
        aware.step()
    model = powerprop(small_mlp(), 3)
    loss = F.cross_entropy(model(x), y)                         # a forward pass before the wrapper, ...
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    loss.backward()                                             # ... whose backward gives φ ∂L/∂φ
    with pytest.raises(RuntimeError, match="did not come through this PowerPropOptimizer"):
        aware.step()


def test_a_refused_step_changes_no_layer_even_if_an_earlier_layer_was_routed():
    # The head's gradient came through the wrapper, the trunk's (a pass before it was built) did not: the step
    # is refused, and the head's φ must not be left holding θ = φ|φ|^(α−1) (nor any other layer's).
    torch.manual_seed(0)
    model = powerprop(torch.nn.ModuleDict({"head": torch.nn.Linear(8, 4), "trunk": torch.nn.Linear(20, 8)}), 3)
    x, y = batch()
    features = model["trunk"](x).relu()                         # before the wrapper: the trunk's gradient is ∂L/∂φ
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    F.cross_entropy(model["head"](features), y).backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="gradient of 'trunk' did not come through"):
        aware.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_each_step_needs_a_gradient_routed_since_the_last_step():
    x, y = batch()
    model = powerprop(small_mlp(), 3)
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    aware.zero_grad()
    F.cross_entropy(model(x), y).backward()
    aware.step()                                                # routed: fine
    aware.remove()
    aware.zero_grad()
    F.cross_entropy(model(x), y).backward()                     # no longer routed: ∂L/∂φ, not ∂L/∂θ
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="did not come through this PowerPropOptimizer"):
        aware.step()                                            # the first step's routing does not count again
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_step_after_squash_names_the_squash_and_the_wrapped_optimizer_trains_on():
    # the step blamed a forward pass before the wrapper was built
    x, y = batch()
    model = powerprop(small_mlp(), 3)
    attach_masks(model)
    aware = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
    F.cross_entropy(model(x), y).backward()
    aware.step()
    aware.zero_grad()
    squash(model)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no longer has the Powerprop parametrization.*squash"):
        aware.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    aware.optimizer.step()                                      # what the error proposes


def test_a_step_after_squash_is_refused_with_zero_gradients_too():
    # With gradients cleared to zero (set_to_none=False) the step took the squashed θ for φ, and SGD's momentum moved
    # the weights by Δθ · α |θ|^(α−1)
    x, y = batch()
    model = powerprop(small_mlp(), 3)
    attach_masks(model)                                         # squash folds Powerprop in with the masks
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    F.cross_entropy(model(x), y).backward()
    aware.step()
    squash(model)
    aware.zero_grad(set_to_none=False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no longer has the Powerprop parametrization.*squash"):
        aware.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_new_wrapper_takes_the_routing_over():
    model = powerprop(small_mlp(), 3)
    first = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    second = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for layer in powerprop_layers(model).values():
        assert len(layer.parametrizations.weight[0]._forward_hooks) == 1
    x, y = batch()
    second.zero_grad()
    F.cross_entropy(model(x), y).backward()
    second.step()
    with pytest.raises(RuntimeError, match="did not come through this PowerPropOptimizer"):
        first.step()


def test_removing_or_dropping_the_wrapper_gives_backward_its_own_gradient_again():
    x, y = batch()
    model = powerprop(small_mlp(), 3)
    phi = raw_weight(model[1])
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0]          # ∂L/∂φ
    first = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    routed = torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0]         # ∂L/∂θ
    assert torch.allclose(routed * 3 * phi.detach() ** 2, plain, atol=1e-7)
    second = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    first.remove()                                              # taken over: the second wrapper keeps routing
    assert torch.equal(torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0], routed)
    second.remove()
    assert torch.equal(torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0], plain)
    third = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert routes_theta_gradients(model)
    del third                                                   # a dropped wrapper routes nothing
    assert torch.equal(torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0], plain)
    assert not routes_theta_gradients(model)
    for layer in powerprop_layers(model).values():              # and its hooks are gone, not just idle
        assert not layer.parametrizations.weight[0]._forward_hooks


def test_a_meta_learning_inner_loop_refuses_a_model_whose_gradients_a_wrapper_routes():
    """MAML's inner loop differentiates the model in its own φ (functional_call with the very parameters): under a
    live wrapper it would get ∂L/∂θ for the first step, with the second-order path cut. It refuses instead, and
    runs as on a bare model once the wrapper is removed."""
    from lowlearn.meta.functional import inner_loop, parameters_of
    x, y = batch()
    model = powerprop(small_mlp(), 2).double()
    bare = copy.deepcopy(model)
    wrapper = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    with pytest.raises(ValueError, match="PowerPropOptimizer routes .*plain torch.optim optimizer.*remove"):
        inner_loop(model, parameters_of(model), x.double(), y, F.cross_entropy, steps=1, lr=0.1)
    assert inner_loop(model, parameters_of(model), x.double(), y, F.cross_entropy, steps=0, lr=0.1)   # no gradient
    wrapper.remove()
    adapted = inner_loop(model, parameters_of(model), x.double(), y, F.cross_entropy, steps=1, lr=0.1)
    expected = inner_loop(bare, parameters_of(bare), x.double(), y, F.cross_entropy, steps=1, lr=0.1)
    assert all(torch.equal(adapted[name], expected[name]) for name in expected)


class _FailingStep(torch.optim.SGD):
    def step(self, closure=None):
        super().step(closure)                                   # the parameters move, then the step fails
        raise RuntimeError("out of memory in the middle of the step")


def test_a_failed_wrapped_step_leaves_phi_as_it_was():
    x, y = batch()
    model = powerprop(small_mlp(), 2)
    aware = PowerPropOptimizer(_FailingStep(model.parameters(), lr=0.1), model)
    phi = {name: raw_weight(layer).detach().clone() for name, layer in powerprop_layers(model).items()}
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="out of memory"):
        aware.step()
    for name, layer in powerprop_layers(model).items():
        assert torch.equal(raw_weight(layer), phi[name]), name


def test_plain_adam_on_phi_weakens_rich_get_richer():
    # Two weights, one large and one small, with the same gradient ∂L/∂θ = 1.
    alpha, lr = 2.0, 1e-3
    effective = {}
    for aware in (False, True):
        layer = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, 0.01]]))
        model = powerprop(torch.nn.Sequential(layer), alpha)
        inner = torch.optim.Adam(model.parameters(), lr=lr)
        optimizer = PowerPropOptimizer(inner, model) if aware else inner
        before = layer.weight.detach().clone()
        optimizer.zero_grad()
        layer(torch.ones(1, 2)).sum().backward()          # ∂L/∂θ = (1, 1)
        optimizer.step()
        effective[aware] = (before - layer.weight.detach()).flatten()
    # φ = (1, 0.1). Plain Adam normalises ∂L/∂φ = α|φ|^(α−1) away: both φ move by lr, so θ moves by
    # α|φ|^(α−1) · lr: 0.2 lr for the small weight, 2 lr for the large one (ratio 0.1).
    ratio_plain = (effective[False][1] / effective[False][0]).item()
    # Optimiser-aware: Adam normalises ∂L/∂θ (step lr for both), then α|φ|^(α−1) multiplies φ's step, so
    # θ moves by (α|φ|^(α−1))² · lr, as under SGD: the small weight moves 0.1² = 0.01 as much.
    ratio_aware = (effective[True][1] / effective[True][0]).item()
    assert ratio_plain == pytest.approx(0.1, rel=0.02)
    assert ratio_aware == pytest.approx(0.01, rel=0.05)
    assert ratio_aware < ratio_plain / 5


def test_masks_compose_and_pruned_weights_stay_zero():
    model = powerprop(small_mlp(), 2)
    attach_masks(model)
    optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
    # Scores see the effective weight θ; global pruning keeps exactly round(0.3·N) of them.
    scores = magnitude(model)
    for name, layer in prunable_layers(model).items():
        phi = raw_weight(layer).detach()
        assert torch.allclose(scores[name], (phi * phi.abs()).abs())
    prune(model, scores, 0.3, scope="global", optimizer=optimizer)
    n = sum(m.numel() for m in masks_of(model).values())
    assert sum(int(m.sum()) for m in masks_of(model).values()) == kept_count(0.3, n)
    for seed in range(5):
        x, y = batch(seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        masks = masks_of(model)
        for name, layer in prunable_layers(model).items():
            phi = raw_weight(layer)
            assert (phi[~masks[name]] == 0).all() and (layer.weight[~masks[name]] == 0).all()
            for state in optimizer.state[phi].values():
                if state.shape == phi.shape:
                    assert (state[~masks[name]] == 0).all()
    # Iterative pruning on top, then squash: the function is kept.
    prune(model, magnitude(model), 0.1, scope="layer", optimizer=optimizer)
    x, _ = batch(9)
    out = model(x)
    assert torch.allclose(squash(copy.deepcopy(model))(x), out)


def test_topkast_on_powerprop_selects_by_effective_magnitude():
    model = powerprop(small_mlp(), 3)
    sparsifier = TopKAST(model, None, 0.2, 0.4)
    for name, layer in prunable_layers(model).items():
        forward = masks_of(model)[name]
        theta = layer.parametrizations.weight[0](raw_weight(layer)).detach()   # Ψ(φ), before the mask
        k = int(forward.sum())
        assert k == kept_count(0.2, forward.numel())
        assert theta.abs()[forward].min() >= theta.abs()[~forward].max()
    assert list(powerprop_layers(model)) == list(prunable_layers(model))
    x, y = batch()
    (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
    assert all(math.isfinite(raw_weight(layer).grad.abs().sum().item()) for layer in prunable_layers(model).values())


def test_state_dict_round_trip():
    model = powerprop(small_mlp(), 2)
    optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
    x, y = batch()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    other = powerprop(small_mlp(7), 2)
    other.load_state_dict(model.state_dict())
    other_optimizer = PowerPropOptimizer(torch.optim.Adam(other.parameters(), lr=0.01), other)
    other_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # a loaded state aliases its source
    assert torch.equal(other(x), model(x))
    for opt, net in ((optimizer, model), (other_optimizer, other)):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert torch.equal(other(x), model(x))


def test_weights_saved_with_another_alpha_are_refused_and_a_state_dict_without_alpha_still_loads(tmp_path):
    # φ of α = 3 in a layer of α = 2 would be other weights θ: loaded silently before alpha was saved
    model, x = powerprop(small_mlp(), 3), batch()[0]
    state = model.state_dict()
    assert {key for key in state if key.endswith("saved_alpha")} == {f"{name}.parametrizations.weight.0.saved_alpha"
                                                                     for name in powerprop_layers(model)}
    other = powerprop(small_mlp(7), 2)
    with pytest.raises(RuntimeError, match=r"saved with Powerprop's alpha = 3, this layer has alpha = 2.*"
                                           r"powerprop\(model, 3\)"):
        other.load_state_dict(state)
    # A state_dict of earlier versions, without alpha, loads as it did (strictly), and so does one read back.
    earlier = powerprop(small_mlp(7), 3)
    earlier.load_state_dict({key: value for key, value in state.items() if not key.endswith("saved_alpha")})
    assert torch.equal(earlier(x), model(x))
    torch.save(state, tmp_path / "model.pt")
    half = powerprop(small_mlp(7), 3).half()                      # alpha compared in the buffer's precision
    half.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert half.state_dict()["1.parametrizations.weight.0.saved_alpha"].dtype == torch.float16
    # A checkpoint of another alpha is refused before the model changes; one of the same alpha resumes.
    save_checkpoint(tmp_path / "run.pt", model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(RuntimeError, match="saved with Powerprop's alpha = 3, this layer has alpha = 2"):
        load_checkpoint(tmp_path / "run.pt", other, torch.optim.SGD(other.parameters(), lr=0.1))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), other.state_dict().values()))
    load_checkpoint(tmp_path / "run.pt", earlier, torch.optim.SGD(earlier.parameters(), lr=0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_an_alpha_without_an_exact_half_or_single_precision_loads_across_dtypes(dtype):
    # alpha = 1.1 was compared in the loading model's precision: the state of a float32 model was refused by the
    # same model in half (1.1 rounds to 1.0996) or double precision ("saved with alpha = 1.1, this layer has 1.1"),
    # and so was that of a model converted back and forth
    state = powerprop(small_mlp(), 1.1).state_dict()
    converted = powerprop(small_mlp(7), 1.1).to(dtype)
    converted.load_state_dict(state)
    back = powerprop(small_mlp(7), 1.1)
    back.load_state_dict(converted.state_dict())
    back.load_state_dict(powerprop(small_mlp(7), 1.1).to(dtype).double().state_dict())
    with pytest.raises(RuntimeError, match="saved with Powerprop's alpha = 1.2"):
        back.load_state_dict(powerprop(small_mlp(7), 1.2).to(dtype).state_dict())


def test_topkast_penalises_the_effective_weight_under_powerprop():
    model = powerprop(small_mlp(), 3)
    sparsifier = TopKAST(model, None, 0.25, 0.5)
    expected = 0.0
    for name, layer in prunable_layers(model).items():
        phi = raw_weight(layer).detach()
        theta = phi * phi.abs() ** 2
        forward, backward = masks_of(model)[name], sparsifier.backward_masks()[name]
        expected += theta[forward].abs().sum() + theta[backward & ~forward].abs().sum() / 0.25
    assert sparsifier.penalty().item() == pytest.approx(expected.item(), rel=1e-5)


def test_output_gradients_read_dtheta_of_a_powerprop_weight_at_every_alpha_including_one():
    """OutputGradients(kind=PowerProp) reads ∂L/∂θ, θ = Ψ(φ), also at α = 1, where Ψ is the identity: the
    parametrization then hands out a view of φ (a new tensor, which the hook sees), not the leaf φ itself.
    Reference: ∂L/∂θ by autograd on a plain tensor θ."""
    from torch import nn

    from lowlearn.reparam import OutputGradients
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for alpha in (1, 2, 1.5):
        torch.manual_seed(1)
        layer = powerprop(nn.Sequential(nn.Linear(4, 3)).double(), alpha)[0]
        recorder = OutputGradients({"w": layer}, PowerProp)
        recorder.start()
        layer(x).square().sum().backward()
        theta = layer.weight.detach().clone().requires_grad_()
        expected, = torch.autograd.grad(F.linear(x, theta, layer.bias.detach()).square().sum(), theta)
        assert "w" in recorder.grads, f"alpha={alpha}: no gradient recorded"
        torch.testing.assert_close(recorder.grads["w"], expected, rtol=1e-12, atol=1e-12)
    one = powerprop(nn.Sequential(nn.Linear(4, 3)), 1)[0]
    phi = one.parametrizations.weight.original
    assert torch.equal(one.weight, phi) and one.weight is not phi and not one.weight.is_leaf


def plain_theta_gradients(model, x, y):
    """∂L/∂θ of every Powerprop layer, by autograd on a plain copy whose weights are θ (parametrizations removed)."""
    plain = copy.deepcopy(model)
    for layer in powerprop_layers(plain).values():
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    F.cross_entropy(plain(x), y).backward()
    return {name: layer.weight.grad for name, layer in prunable_layers(plain).items()}


def test_with_a_live_wrapper_functional_call_with_other_tensors_gets_the_chain_rule_gradient_of_those_tensors():
    """While a PowerPropOptimizer routes ∂L/∂θ to the model's own φ, a torch.func.functional_call pass with *other*
    tensors φ' (MAML's inner loop) must be left alone (class docstring): its gradient is the chain rule's
    ∂L/∂φ' = α|φ'|^(α−1) ∂L/∂θ (paper, eq. 2), by hand from a plain network holding θ, and the model's φ gets none."""
    alpha = 3
    model = powerprop(small_mlp(), alpha)
    wrapper = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    x, y = batch()
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    expected = plain_theta_gradients(model, x, y)
    for name in prunable_layers(model):
        key = f"{name}.parametrizations.weight.original"
        phi = params[key].detach()
        assert torch.allclose(grads[key], alpha * phi.abs() ** (alpha - 1) * expected[name], rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    assert wrapper.layers                                     # the wrapper is alive (and routing) throughout


def test_with_a_live_wrapper_a_deep_copy_gets_its_own_chain_rule_gradient_and_the_original_none():
    """A deep copy of a model whose PowerPropOptimizer is alive carries a copy of the routing hook; its passes must
    not be routed (class docstring: "not a deep copy's"), so the copy's φ gets ∂L/∂φ = α|φ|^(α−1) ∂L/∂θ (by hand,
    from a plain network holding θ) and the wrapped model's φ no gradient at all."""
    alpha = 2.5
    model = powerprop(small_mlp(), alpha)
    wrapper = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    x, y = batch()
    copied = copy.deepcopy(model)
    F.cross_entropy(copied(x), y).backward()
    expected = plain_theta_gradients(model, x, y)
    for name, layer in prunable_layers(copied).items():
        phi = raw_weight(layer)
        assert torch.allclose(phi.grad, alpha * phi.detach().abs() ** (alpha - 1) * expected[name],
                              rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    # ... and the wrapped model itself is still routed: its φ gets ∂L/∂θ.
    F.cross_entropy(model(x), y).backward()
    for name, layer in prunable_layers(model).items():
        assert torch.allclose(raw_weight(layer).grad, expected[name], rtol=1e-5, atol=1e-9)
    assert wrapper.layers


def test_a_deep_copy_of_a_routed_model_carries_no_routing_hook_and_does_not_keep_the_originals_phi_alive():
    """The copy's passes are never routed, so it must not take the wrapper's hook along: the hook would run idle on
    every pass of the copy and, holding the original φ, keep the original's weights alive after it was dropped."""
    import gc
    import weakref

    model = powerprop(small_mlp(), 2)
    wrapper = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    snapshot = copy.deepcopy(model)
    assert all(not layer.parametrizations.weight[0]._forward_hooks for layer in powerprop_layers(snapshot).values())
    assert all(len(layer.parametrizations.weight[0]._forward_hooks) == 1 for layer in powerprop_layers(model).values())
    original_phi = weakref.ref(raw_weight(prunable_layers(model)["1"]))
    del model, wrapper
    gc.collect()
    assert original_phi() is None
    x, y = batch()
    F.cross_entropy(snapshot(x), y).backward()                  # the copy still trains by the chain rule
    assert all(p.grad is not None for p in snapshot.parameters())


def small_batch(n=8, features=6, classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def test_zero_grad_sets_gradients_to_none_by_default_so_a_layer_that_sits_out_is_not_decayed():
    """Reference: torch.optim's own default, ``zero_grad(set_to_none=True)``: a parameter that takes no part in the
    next loss has no gradient, and SGD with momentum and weight decay skips it, so its φ stays exactly as it was."""
    torch.manual_seed(0)
    model = powerprop(torch.nn.ModuleDict({"trunk": torch.nn.Linear(6, 5), "a": torch.nn.Linear(5, 3),
                                           "b": torch.nn.Linear(5, 3)}), 2)
    aware = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1), model)
    x, y = small_batch()
    for head in ("a", "b"):                     # head a takes part in the first pass only
        aware.zero_grad()
        if head == "b":
            assert all(p.grad is None for p in model.parameters())          # torch's default: None, not zeros
            before = {k: v.clone() for k, v in model["a"].state_dict().items()}
        F.cross_entropy(model[head](model["trunk"](x).relu()), y).backward()
        aware.step()
    for name, value in model["a"].state_dict().items():
        assert torch.equal(value, before[name]), name


def test_removing_a_taken_over_wrapper_does_not_keep_the_newer_ones_routing_alive():
    """Reference: the class docstring ("a new wrapper ... takes the routing over; remove() ... ends it, after which
    backward gives ∂L/∂φ again") and autograd's chain rule ∂L/∂φ = α|φ|^(α−1) ∂L/∂θ of the bare model. An old
    wrapper's remove() after a take-over must leave the registry to the newer one, so that a third wrapper takes the
    routing from the second and its remove() ends all routing, while the second wrapper is still alive."""
    torch.manual_seed(0)
    model = powerprop(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)), 3)
    x, y = small_batch()
    phi = raw_weight(model[2])
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0]                       # ∂L/∂φ
    first = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    second = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    first.remove()
    third = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for layer in powerprop_layers(model).values():
        assert len(layer.parametrizations.weight[0]._forward_hooks) == 1                     # only third's hook
    third.remove()
    assert torch.equal(torch.autograd.grad(F.cross_entropy(model(x), y), phi)[0], plain)
    assert second is not None                                                                # still alive here


def test_two_layers_of_the_same_shape_each_take_their_own_aware_adam_step():
    """Reference: a plain torch.optim.Adam on a separate copy of each θ = φ|φ|^(α−1) with the gradient ∂L/∂θ (from
    autograd on an un-reparameterised copy of the model), mapped back as φ ← φ + Δθ · α|φ|^(α−1) (paper, section 3).
    Two Powerprop weights of the same shape must not share the step's working tensors."""
    torch.manual_seed(0)
    alpha = 2.0
    base = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 4, bias=False))
    x, y = small_batch(features=4, classes=4)
    model = powerprop(copy.deepcopy(base), alpha)
    phis = [raw_weight(model[i]).detach().clone() for i in (0, 2)]
    thetas = [torch.nn.Parameter(p * p.abs() ** (alpha - 1)) for p in phis]
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain[0].weight.copy_(thetas[0])
        plain[2].weight.copy_(thetas[1])
    F.cross_entropy(plain(x), y).backward()
    for theta, layer in zip(thetas, (plain[0], plain[2])):
        theta.grad = layer.weight.grad.clone()
    hand = torch.optim.Adam(thetas, lr=0.05)
    before = [t.detach().clone() for t in thetas]
    hand.step()
    expected = [p + (t.detach() - b) * alpha * p.abs() ** (alpha - 1) for p, t, b in zip(phis, thetas, before)]

    aware = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model)
    aware.zero_grad()
    F.cross_entropy(model(x), y).backward()
    aware.step()
    for i, e in zip((0, 2), expected):
        assert torch.allclose(raw_weight(model[i]), e, atol=1e-6), i
    assert len(aware.scratch_tensors()) == 4                     # two working tensors per Powerprop weight


def test_learning_rates_set_through_the_wrappers_param_groups_drive_the_step_of_each_group():
    """Reference: hand SGD with momentum μ and weight decay λ on θ, ``b ← μ b + g + λ θ``, ``Δθ = −lr · b``, mapped
    back as φ ← φ + Δθ · α|φ|^(α−1), and the plain SGD step on the bias; the weight and the bias sit in two parameter
    groups whose learning rates are changed through ``PowerPropOptimizer.param_groups`` (the wrapped optimizer's own
    groups, as the property's docstring says) between the two steps."""
    torch.manual_seed(0)
    alpha, mu, lam = 3.0, 0.9, 0.05
    layer = torch.nn.Linear(3, 2)
    model = powerprop(torch.nn.Sequential(layer), alpha)
    x = torch.randn(5, 3)
    phi, bias = raw_weight(layer), layer.bias
    sgd = torch.optim.SGD([{"params": [phi], "lr": 0.1}, {"params": [bias], "lr": 0.2}], lr=0.1, momentum=mu,
                          weight_decay=lam)
    aware = PowerPropOptimizer(sgd, model)
    p, b = phi.detach().clone(), bias.detach().clone()
    buf_t = buf_b = None
    for lrs in ((0.1, 0.2), (0.03, 0.5)):
        for group, lr in zip(aware.param_groups, lrs):
            group["lr"] = lr
        theta = p * p.abs() ** (alpha - 1)
        # loss = sum((x θᵀ + b)²): ∂L/∂θ = 2 (xθᵀ+b)ᵀ x, ∂L/∂b = 2 Σ (xθᵀ+b)
        out = x @ theta.T + b
        g_t, g_b = 2 * out.T @ x, 2 * out.sum(0)
        d_t, d_b = g_t + lam * theta, g_b + lam * b
        buf_t = d_t if buf_t is None else mu * buf_t + d_t
        buf_b = d_b if buf_b is None else mu * buf_b + d_b
        p = p + (-lrs[0] * buf_t) * alpha * p.abs() ** (alpha - 1)
        b = b - lrs[1] * buf_b
        aware.zero_grad()
        (model(x) ** 2).sum().backward()
        aware.step()
        assert torch.allclose(phi, p, atol=1e-5, rtol=1e-5)
        assert torch.allclose(bias, b, atol=1e-5, rtol=1e-5)


def test_the_saved_alpha_lives_on_the_device_of_its_weight():
    # It was made on torch's default device (the CPU for a model on a GPU), away from the model's other tensors:
    # fit broadcasts every buffer of the model across processes, which NCCL does for CUDA tensors only.
    on_meta = powerprop(MLP(4, (3,), 2).to("meta"), 3)
    assert {buffer.device.type for buffer in on_meta.buffers()} == {"meta"}
    on_cpu = MLP(4, (3,), 2)
    with torch.device("meta"):                                   # a factory without device= would follow it
        powerprop(on_cpu, 3)
    assert {buffer.device.type for buffer in on_cpu.buffers()} == {"cpu"}


def test_a_printed_model_shows_each_layers_alpha():
    assert "(0): PowerProp(alpha=2.5)" in repr(powerprop(MLP(4, (3,), 2), 2.5))


def test_a_model_deep_copied_with_its_wrapper_trains_with_the_copied_wrapper_as_the_original_does():
    """copy.deepcopy((model, wrapper)): the copied wrapper routes the copied layers' ∂L/∂θ (its first step refused,
    saying the gradients had not come through it), and the two pairs train alike and apart."""
    model = powerprop(small_mlp(), 2.5)
    wrapper = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01), model)

    def train(model, wrapper, seeds):
        for seed in seeds:
            wrapper.zero_grad()
            F.cross_entropy(model(batch(seed)[0]), batch(seed)[1]).backward()
            wrapper.step()

    train(model, wrapper, (1, 2))
    copied_model, copied_wrapper = copy.deepcopy((model, wrapper))
    assert copied_wrapper.optimizer.param_groups[0]["params"][0] is next(copied_model.parameters())
    train(copied_model, copied_wrapper, (3, 4, 5))
    train(model, wrapper, (3, 4, 5))
    for (name, p), q in zip(model.state_dict().items(), copied_model.state_dict().values()):
        assert torch.equal(p, q), name
    assert routes_theta_gradients(model) and routes_theta_gradients(copied_model)
    wrapper.remove()                                                   # the copy's routing is its own
    assert not routes_theta_gradients(model) and routes_theta_gradients(copied_model)


def test_output_gradients_read_dtheta_whether_started_before_or_after_the_wrapper():
    """A recorder of ∂L/∂θ (OutputGradients(kind=PowerProp)) whose hook was registered before a PowerPropOptimizer
    was built sees the θ that backward reaches (the wrapper's hook runs first), as one registered after does.
    Reference: ∂L/∂θ by autograd on a plain copy of the network holding θ; φ.grad is that gradient too."""
    from lowlearn.reparam import OutputGradients
    x, y = batch()
    for order in ("recorder first", "wrapper first"):
        model = powerprop(small_mlp(), 3)
        layers = powerprop_layers(model)
        recorder = OutputGradients(layers, PowerProp)
        if order == "recorder first":
            recorder.start()
        wrapper = PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        recorder.start()
        F.cross_entropy(model(x), y).backward()
        expected = plain_theta_gradients(model, x, y)
        assert recorder.grads.keys() == expected.keys(), order
        for name, layer in layers.items():
            torch.testing.assert_close(recorder.grads[name], expected[name], msg=order)
            torch.testing.assert_close(layer.parametrizations.weight.original.grad, expected[name], msg=order)
        wrapper.remove()
