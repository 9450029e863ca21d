"""lowlearn.reparam: the lean property against PyTorch's own, and OutputGradients against autograd.

The reference for the lean getter is the same layer parametrized with torch.nn.utils.parametrize alone
(PyTorch's property); the reference for OutputGradients is torch.autograd.grad with respect to an explicitly
built effective weight.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from lowlearn.reparam import OutputGradients, register, remove
from lowlearn.sparse.mask import Mask


class Shift(nn.Module):
    def forward(self, x):
        return x + 1

    def right_inverse(self, x):
        return x - 1


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
