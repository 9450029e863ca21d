import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowlearn.reparam import OutputGradients, register, remove
from lowlearn.sparse.mask import Mask, attach_masks, masks_of, squash
from lowlearn.models import MLP


class Double(nn.Module):
    def forward(self, x):
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
