import torch

from lowlearn.autograd import Function
from lowlearn.lowrank.layers import _LowRankConvFunction, _LowRankLinearFunction
from lowlearn.powerprop import _GradientOfTheta, _Power
from lowlearn.sparse.mask import _SplitMaskFunction


class _Scale(Function):
    @staticmethod
    def forward(x, scale=2.0):
        return x * scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def test_apply_binds_the_arguments_to_the_signature_stored_at_the_definition():
    assert str(vars(_Scale.forward)["__signature__"]) == "(x, scale=2.0)"
    x = torch.ones(3, requires_grad=True)
    _Scale.apply(x).sum().backward()                     # the default, bound from the stored signature
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    # torch reads the stored signature, not the code: another default there is the one apply binds.
    stored = _Scale.forward.__signature__
    try:
        _Scale.forward.__signature__ = stored.replace(parameters=[stored.parameters["x"],
                                                                  stored.parameters["scale"].replace(default=3.0)])
        assert torch.equal(_Scale.apply(torch.ones(2)), torch.full((2,), 3.0))
    finally:
        _Scale.forward.__signature__ = stored


def test_the_library_s_functions_store_their_signatures():
    for function in (_Power, _GradientOfTheta, _SplitMaskFunction, _LowRankLinearFunction, _LowRankConvFunction):
        assert "__signature__" in vars(function.forward), function
