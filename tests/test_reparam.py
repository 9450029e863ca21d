import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from lowlearn.powerprop import PowerProp
from lowlearn.reparam import OutputGradients, register, remove
from lowlearn.sparse.mask import Mask, attach_masks, masks_of, squash
from lowlearn.models import MLP


class Double(nn.Module):
    def forward(self, x):
        return 2 * x


class Shift(nn.Module):
    """``θ ↦ θ + 1``, with its inverse."""

    def forward(self, x):
        return x + 1

    def right_inverse(self, x):
        return x - 1


class Halve(nn.Module):
    """``θ ↦ θ / 2``, with its inverse."""

    def forward(self, x):
        return x / 2

    def right_inverse(self, x):
        return 2 * x


def test_a_deep_copy_gets_its_own_class():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    twin = copy.deepcopy(layer)
    assert type(twin) is not type(layer) and type(twin).__name__ == type(layer).__name__
    assert torch.equal(twin.weight, layer.weight)
    remove(twin, "weight")                        # would break `layer` with a shared class
    register(twin, "bias", Double())              # would add a property to `layer`'s class
    x = torch.randn(4, 3)
    assert torch.allclose(layer(x), x @ (2 * layer.parametrizations.weight.original).T + layer.bias)
    assert "bias" not in type(layer).__dict__ and "bias" not in layer.parametrizations
    assert isinstance(layer.bias, nn.Parameter)


def test_the_parametrized_tensor_is_the_chain_of_parametrizations_with_their_hooks_and_caching():
    layer = nn.Linear(3, 2)
    mask = Mask(torch.tensor([[True, False, True], [False, True, True]]))
    register(layer, "weight", Double())
    register(layer, "weight", mask)
    calls = []
    mask.register_forward_hook(lambda module, inputs, output: calls.append(output))
    weight = layer.weight
    assert torch.equal(weight, 2 * layer.parametrizations.weight.original * mask.mask)
    assert calls == [weight]
    assert layer.weight is not weight                                # computed afresh on each read ...
    with parametrize.cached():
        assert layer.weight is layer.weight                          # ... but once inside cached()
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.parametrizations.weight.original.add_(1.0)
    assert torch.equal(twin.weight, 2 * twin.parametrizations.weight.original * mask.mask)
    assert torch.equal(layer.weight, weight)
    with parametrize.cached():                    # each its own cached value, also when read in one block
        assert torch.equal(twin.weight, 2 * twin.parametrizations.weight.original * mask.mask)
        assert torch.equal(layer.weight, weight) and twin.weight is not layer.weight


def test_a_deep_copy_does_not_keep_its_original_alive():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    twin, gone = copy.deepcopy(layer), weakref.ref(layer)
    del layer
    gc.collect()
    assert gone() is None and twin.weight.shape == (2, 3)


def test_squash_of_a_copy_leaves_the_original_masked():
    model = MLP(hidden=(8,))
    attach_masks(model)
    x = torch.randn(2, 784)
    out = model(x)
    squash(copy.deepcopy(model))
    assert torch.equal(model(x), out)
    assert list(masks_of(model)) == ["1", "3"]
    copy_of_copy = copy.deepcopy(copy.deepcopy(model))
    squash(copy_of_copy)
    assert torch.equal(copy_of_copy(x), out) and list(masks_of(model)) == ["1", "3"]


def test_remove_keeps_the_parametrized_value():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Mask(torch.tensor([[True, False, True], [False, True, True]])))
    value = layer.weight.detach().clone()
    remove(layer, "weight")
    assert type(layer) is nn.Linear and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, value)


def test_output_gradients_are_the_gradients_of_the_effective_weight():
    layer = nn.Linear(3, 2)
    mask = Mask(torch.tensor([[True, False, True], [False, True, True]]))
    register(layer, "weight", mask)
    recorder = OutputGradients({"w": layer}, Mask)
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    assert recorder.grads == {} and not recorder.active            # nothing before start()
    recorder.start()
    with torch.no_grad():
        layer(x)                                                    # no gradient: ignored
    layer(x).sum().backward()
    expected = torch.ones(5, 2).T @ x                               # ∂(Σ xWᵀ)/∂W, at every position
    assert torch.allclose(recorder.grads["w"], expected)
    assert torch.allclose(layer.parametrizations.weight.original.grad, 2 * expected * mask.mask)
    layer(x).sum().backward()                                       # a second backward adds up
    assert torch.allclose(recorder.grads["w"], 2 * expected)
    recorder.clear()
    recorder.stop()
    layer(x).sum().backward()
    assert recorder.grads == {} and not recorder.active and not mask._forward_hooks


def test_starting_a_recording_recorder_again_adds_no_hooks():
    # dynamic sparse training calls start() before every step that needs the dense gradient (SNFS: every step):
    # each call must not add another pair of hooks, which would pile up, one pair per step, for the whole run
    layer = nn.Linear(3, 2)
    mask = Mask(torch.ones(2, 3, dtype=torch.bool))
    register(layer, "weight", mask)
    recorder = OutputGradients({"w": layer}, Mask)
    for _ in range(3):
        recorder.start()
    assert len(mask._forward_pre_hooks) == 1 and len(mask._forward_hooks) == 1
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    assert torch.allclose(recorder.grads["w"], torch.ones(4, 2).T @ x)
    recorder.stop()
    assert not mask._forward_pre_hooks and not mask._forward_hooks


def test_a_deep_copy_does_not_record_into_the_original():
    layer = nn.Linear(3, 2)
    mask = Mask(torch.ones(2, 3, dtype=torch.bool))
    register(layer, "weight", mask)
    recorder = OutputGradients({"w": layer}, Mask)
    recorder.start()
    twin = copy.deepcopy(layer)                                     # takes the forward hook along
    twin(torch.randn(5, 3)).sum().backward()
    assert recorder.grads == {}
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    assert torch.allclose(recorder.grads["w"], torch.ones(5, 2).T @ x)


def test_passes_that_compute_the_weight_from_other_tensors_are_not_recorded():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    register(layer, "weight", Mask(torch.tensor([[True, False, True], [False, True, True]])))
    recorder = OutputGradients({"w": layer}, Mask)
    recorder.start()
    x = torch.randn(5, 3)
    other = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    functional_call(layer, other, (x,)).sum().backward()                    # MAML-like: other parameters
    per_example = vmap(grad(lambda p, xi: functional_call(layer, p, (xi,)).sum()), in_dims=(None, 0))(other, x)
    assert recorder.grads == {} and per_example["parametrizations.weight.original"].shape == (5, 2, 3)
    layer(x).sum().backward()                                               # the layer's own pass is recorded
    assert torch.allclose(recorder.grads["w"], torch.ones(5, 2).T @ x)


def test_output_gradients_of_a_layer_without_the_parametrization_is_a_clear_error():
    plain, doubled = nn.Linear(3, 2), nn.Linear(3, 2)
    register(doubled, "weight", Double())
    with pytest.raises(ValueError, match=r"layers \['a', 'b'\] have no Mask parametrization"):
        OutputGradients({"a": plain, "b": doubled}, Mask)


def test_register_refuses_a_missing_tensor_and_a_parametrization_that_is_not_a_module():
    conv = nn.Conv2d(1, 2, 3, bias=False)
    with pytest.raises(ValueError, match=r"Conv2d.bias is None \(e.g. the bias of a layer built with bias=False\)"):
        register(conv, "bias", Double())
    with pytest.raises(TypeError, match="a parametrization must be an nn.Module.*got function"):
        register(conv, "weight", lambda w: 2 * w)
    with pytest.raises(ValueError, match="does not have a parameter, a buffer, or a parametrized element"):
        register(conv, "wieght", Double())                                     # PyTorch's own message
    assert type(conv) is nn.Conv2d and not parametrize.is_parametrized(conv)   # nothing changed


def test_register_refuses_a_buffer_that_is_none():
    norm = nn.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchNorm1d.running_mean is None"):
        register(norm, "running_mean", Double())
    assert type(norm) is nn.BatchNorm1d


def test_assigning_a_parametrized_tensor_stores_its_raw_value():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Halve())
    value = torch.arange(6.0).view(2, 3)
    layer.weight = value
    assert torch.equal(layer.parametrizations.weight.original, 2 * value) and torch.equal(layer.weight, value)


def test_raw_value_inverts_the_parametrizations_last_first_and_skips_those_without_an_inverse():
    from lowlearn.reparam import raw_value

    layer = nn.Linear(3, 2)
    register(layer, "weight", Shift())
    register(layer, "weight", Halve())
    register(layer, "weight", Mask(torch.ones(2, 3, dtype=torch.bool)))
    value = torch.tensor([[2.0, 4.0, 6.0], [0.0, -2.0, 1.0]])
    raw = raw_value(layer, "weight", value)                       # (θ + 1) / 2 = v  ⇔  θ = 2v − 1
    assert torch.equal(raw, 2 * value - 1)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(raw)
    assert torch.equal(layer.weight, value)
    bias = torch.ones(2)
    assert raw_value(layer, "bias", bias) is bias                 # the bias is not parametrized


def test_a_parametrization_of_several_original_tensors_is_computed_from_all_of_them():
    class Sum(nn.Module):
        def forward(self, a, b):
            return a + b

        def right_inverse(self, w):
            return w, torch.zeros_like(w)

    layer = nn.Linear(3, 2)
    weight = layer.weight.detach().clone()
    register(layer, "weight", Sum())
    assert torch.equal(layer.weight, weight)
    with torch.no_grad():
        layer.parametrizations.weight.original1.fill_(1.0)
    assert torch.equal(layer.weight, weight + 1)


def test_a_deep_copy_of_a_second_parametrized_tensor_caches_its_own_value():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    register(layer, "bias", Double())
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.parametrizations.bias.original.add_(1.0)
    with parametrize.cached():
        assert torch.equal(layer.bias, 2 * layer.parametrizations.bias.original)
        assert torch.equal(twin.bias, 2 * twin.parametrizations.bias.original)


def test_a_deep_copy_of_a_layer_that_refers_to_itself_refers_to_the_copy():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    object.__setattr__(layer.parametrizations.weight[0], "owner", layer)      # a plain reference, no submodule
    twin = copy.deepcopy(layer)
    assert twin.parametrizations.weight[0].owner is twin


def test_output_gradients_read_the_first_parametrization_of_the_kind_in_a_chain():
    # As with Powerprop then a mask: the recorder hooks the mask, the second in the chain.
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    register(layer, "weight", Mask(torch.tensor([[True, False, True], [False, True, True]])))
    register(layer, "weight", Double())
    recorder = OutputGradients({"w": layer}, Mask)
    recorder.start()
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    expected = 2 * torch.ones(5, 2).T @ x                           # ∂L/∂(mask output): through the last doubling
    assert torch.allclose(recorder.grads["w"], expected)


def test_output_gradients_ignore_a_direct_call_of_the_parametrization_after_the_layers_own_pass():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Double())
    register(layer, "weight", Mask(torch.ones(2, 3, dtype=torch.bool)))
    recorder = OutputGradients({"w": layer}, Mask)
    recorder.start()
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    recorded = recorder.grads["w"].clone()
    other = torch.randn(2, 3, requires_grad=True)
    (layer.parametrizations.weight[1](other * 1.0) * 7).sum().backward()    # not the layer's pass
    assert torch.equal(recorder.grads["w"], recorded)


def test_output_gradients_stop_when_the_parametrization_returns_its_leaf_input():
    class Same(nn.Module):
        def forward(self, x):
            return x

    layer = nn.Linear(3, 2)
    register(layer, "weight", Same())
    recorder = OutputGradients({"w": layer}, Same)
    recorder.start()
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    recorder.stop()
    before = {name: g.clone() for name, g in recorder.grads.items()}
    layer(x).sum().backward()                                        # stopped: nothing may be added
    assert recorder.grads.keys() == before.keys()
    assert all(torch.equal(recorder.grads[name], before[name]) for name in before)


def test_a_deep_copy_of_a_recording_recorder_records_its_own_layers_only():
    layer = nn.Linear(3, 2)
    register(layer, "weight", Mask(torch.ones(2, 3, dtype=torch.bool)))
    recorder = OutputGradients({"w": layer}, Mask)
    recorder.start()
    x = torch.randn(5, 3)
    layer(x).sum().backward()
    twin_layer, twin = copy.deepcopy((layer, recorder))
    assert twin.active and twin.chains["w"] is twin_layer.parametrizations.weight
    twin_layer(2 * x).sum().backward()
    expected = torch.ones(5, 2).T @ x
    assert torch.allclose(recorder.grads["w"], expected)                # the original's are its own
    assert torch.allclose(twin.grads["w"], 3 * expected)               # the copied gradient, plus the copy's pass
    gone = weakref.ref(recorder)
    del recorder, layer
    gc.collect()
    assert gone() is None                                              # the copy's layer keeps no hook of it


def test_a_state_dict_round_trip_through_register_and_remove_keeps_the_values():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    register(layer, "weight", Mask(torch.tensor([[True, False, True], [False, True, True]])))
    state = copy.deepcopy(layer.state_dict())
    assert set(state) == {"bias", "parametrizations.weight.original", "parametrizations.weight.0.mask"}
    fresh = nn.Linear(3, 2)
    register(fresh, "weight", Mask(torch.ones(2, 3, dtype=torch.bool)))
    fresh.load_state_dict(state)
    x = torch.randn(4, 3)
    assert torch.equal(fresh(x), layer(x))
    remove(fresh, "weight")
    plain = nn.Linear(3, 2)
    plain.load_state_dict(fresh.state_dict())                       # now an ordinary layer's state
    assert torch.equal(plain(x), layer(x)) and torch.equal(plain.weight[0, 1], torch.tensor(0.0))


def test_remove_keeps_a_buffer_a_buffer():
    norm = nn.BatchNorm1d(3)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    register(norm, "running_mean", Double())
    remove(norm, "running_mean")
    assert "running_mean" in norm._buffers and not isinstance(norm.running_mean, nn.Parameter)
    assert torch.equal(norm.running_mean, torch.tensor([2.0, -4.0, 1.0]))


def test_hooks_on_the_parametrization_list_run_on_every_read_as_with_pytorchs_property():
    lean, plain = nn.Linear(3, 2), nn.Linear(3, 2)
    register(lean, "weight", Double())
    parametrize.register_parametrization(plain, "weight", Double())
    calls = {"lean": 0, "plain": 0}
    for name, layer in (("lean", lean), ("plain", plain)):
        layer.parametrizations.weight.register_forward_hook(
            lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    lean.weight, plain.weight
    with parametrize.cached():
        lean.weight, plain.weight
    assert calls == {"lean": 2, "plain": 2}

# --- the lean property against PyTorch's own, and OutputGradients against autograd -----------------------------
# The reference for the lean getter is the same layer parametrized with torch.nn.utils.parametrize alone
# (PyTorch's property); the one for OutputGradients is torch.autograd.grad with respect to an explicitly built
# effective weight.


class Cube(nn.Module):
    def forward(self, x):
        return x * x.abs() ** 2

    def right_inverse(self, x):
        return x.sign() * x.abs() ** (1 / 3)


def twins(seed=0, masked=True):
    """The same Linear twice: lowlearn's register (lean getter) and PyTorch's register_parametrization."""
    torch.manual_seed(seed)
    lean = nn.Linear(4, 3).double()
    plain = copy.deepcopy(lean)
    mask = torch.rand(3, 4) > 0.4
    for parametrization in (Cube(), Shift()):
        register(lean, "weight", copy.deepcopy(parametrization))
        parametrize.register_parametrization(plain, "weight", copy.deepcopy(parametrization))
    if masked:
        register(lean, "weight", Mask(mask))
        parametrize.register_parametrization(plain, "weight", Mask(mask))
    return lean, plain


def test_the_lean_property_equals_pytorchs_in_value_gradient_and_state_dict():
    lean, plain = twins()
    assert type(lean).__dict__["weight"].fget is not type(plain).__dict__["weight"].fget     # really two getters
    assert list(lean.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 4, dtype=torch.double)
    assert torch.equal(lean.weight, plain.weight)
    (lean(x) ** 2).sum().backward()
    (plain(x) ** 2).sum().backward()
    assert torch.equal(lean.parametrizations.weight.original.grad, plain.parametrizations.weight.original.grad)


def test_assigning_the_weight_goes_through_every_right_inverse_as_in_pytorch():
    lean, plain = twins()
    for layer in (lean, plain):                    # a Mask has no right_inverse: both refuse alike
        with pytest.raises(RuntimeError, match="Mask does not implement right_inverse"):
            layer.weight = torch.zeros(3, 4, dtype=torch.double)
    lean, plain = twins(masked=False)
    value = torch.randn(3, 4, dtype=torch.double)
    lean.weight = value
    plain.weight = value
    assert torch.equal(lean.parametrizations.weight.original, plain.parametrizations.weight.original)
    assert torch.equal(lean.weight, plain.weight)


def test_inside_cached_each_layer_computes_once_and_gets_pytorchs_value():
    lean, plain = twins()
    calls = []
    lean.parametrizations.weight[0].register_forward_hook(lambda *args: calls.append(1))
    with parametrize.cached():
        first = lean.weight
        assert lean.weight is first and len(calls) == 1
        assert torch.equal(first, plain.weight)
    assert lean.weight is not first                          # recomputed once the block ends


def test_functional_call_on_the_original_key_equals_pytorchs():
    lean, plain = twins()
    x = torch.randn(5, 4, dtype=torch.double)
    other = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    key = "parametrizations.weight.original"
    out_lean = functional_call(lean, {key: other}, (x,))
    out_plain = functional_call(plain, {key: other}, (x,))
    assert torch.equal(out_lean, out_plain)
    g_lean, = torch.autograd.grad(out_lean.sum(), other)
    g_plain, = torch.autograd.grad(out_plain.sum(), other)
    assert torch.equal(g_lean, g_plain)
    assert torch.equal(lean.weight, plain.weight)            # the module's own tensor is back afterwards


def test_a_deep_copy_is_independent_after_remove_and_register():
    lean, _ = twins()
    twin = copy.deepcopy(lean)
    x = torch.randn(2, 4, dtype=torch.double)
    before = lean(x).detach().clone()
    remove(twin, "weight")
    register(twin, "bias", Shift())
    with torch.no_grad():
        twin.weight.mul_(0)
    assert torch.equal(lean(x), before) and "bias" not in type(lean).__dict__
    assert parametrize.is_parametrized(lean, "weight") and not parametrize.is_parametrized(twin, "weight")


def test_output_gradients_equal_autograd_for_a_conv_whose_weight_is_read_twice():
    """Two reads of the masked weight in one loss (two forward passes), with and without cached(): the recorded
    gradient is ∂L/∂w of the effective weight w = θ ⊙ m, from torch.autograd.grad on an explicit w."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).double()
    mask = torch.rand(3, 2, 3, 3) > 0.5
    register(conv, "weight", Mask(mask))
    recorder = OutputGradients({"c": conv}, Mask)
    recorder.start()
    x = torch.randn(4, 2, 6, 6, dtype=torch.double)
    target = torch.randn(4, 3, 4, 4, dtype=torch.double)

    def loss(forward):
        return ((forward(x) - target) ** 2).sum() + (forward(x.flip(-1)) ** 3).sum()

    w = (conv.parametrizations.weight.original.detach() * mask).requires_grad_()
    expected, = torch.autograd.grad(loss(lambda inputs: F.conv2d(inputs, w, conv.bias.detach())), w)
    loss(conv).backward()
    torch.testing.assert_close(recorder.grads["c"], expected, rtol=1e-12, atol=1e-12)
    recorder.clear()
    with parametrize.cached():
        value = loss(conv)
    value.backward()
    torch.testing.assert_close(recorder.grads["c"], expected, rtol=1e-12, atol=1e-12)
    # The raw parameter's gradient is the recorded one through the mask (chain rule).
    conv.zero_grad()
    recorder.clear()
    loss(conv).backward()
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, recorder.grads["c"] * mask)


def test_inside_cached_a_layers_weight_and_bias_each_keep_their_own_value():
    """Two parametrized tensors of one module (weight: Powerprop, bias: doubling) read inside
    torch.nn.utils.parametrize.cached(): each is cached under its own name, as PyTorch's own getter does.
    Reference: θ = φ|φ|^(α−1) and 2·b by hand, and the layer's output x θᵀ + 2b."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    register(layer, "weight", PowerProp(3))
    register(layer, "bias", Double())
    phi, b = layer.parametrizations.weight.original.detach(), layer.parametrizations.bias.original.detach()
    x = torch.randn(5, 3)
    expected = x @ (phi ** 3).T + 2 * b
    with parametrize.cached():
        assert torch.allclose(layer.weight, phi ** 3) and torch.equal(layer.bias, 2 * b)
        assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-7)
