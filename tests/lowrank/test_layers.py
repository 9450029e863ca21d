import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowlearn.cost import count_flops
from lowlearn.lowrank import (LowRankConv2d, LowRankLinear, compression, count_low_rank_parameters,
                              dense_parameter_count, dense_parameters, low_rank_layers, to_dense, to_low_rank,
                              truncation_rank)
from lowlearn.lowrank.layers import truncation_ranks
from lowlearn.models import MLP, LeNet5


def matrix_with_singular_values(sigma, n, m, seed=0):
    generator = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(n, len(sigma), generator=generator, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(m, len(sigma), generator=generator, dtype=torch.float64)).Q
    return Q1 @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ Q2.T


def test_truncation_rank_by_hand():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])          # ‖σ‖ = √30 ≈ 5.477
    assert truncation_rank(sigma, 0.2) == 3              # tail ‖(1)‖ = 1 ≤ 1.095 < ‖(2, 1)‖ = 2.236
    assert truncation_rank(sigma, 0.5) == 2              # ‖(2, 1)‖ = 2.236 ≤ 2.739 < ‖(3, 2, 1)‖ = 3.742
    assert truncation_rank(sigma, 0.0) == 4
    assert truncation_rank(torch.tensor([4.0, 3.0, 0.0]), 0.0) == 2
    assert truncation_rank(sigma, 0.99) == 1
    # ‖(3, 2, 2, 2)‖ = √21 ≈ 4.583, ϑ = 0.5: tail ‖(2)‖ = 2 ≤ 2.291 < ‖(2, 2)‖ = 2.828 (sums, not norms, would give 2)
    assert truncation_rank(torch.tensor([3.0, 2.0, 2.0, 2.0]), 0.5) == 3
    for diverged in ([float("nan"), 1.0, 0.5], [2.0, 1.0, float("nan")], [float("inf"), 1.0, 0.5]):
        with pytest.raises(ValueError, match="not finite"):      # (a GPU's SVD returns NaN rather than raising)
            truncation_rank(torch.tensor(diverged), 0.1)
    with pytest.raises(ValueError, match="no singular values"):
        truncation_rank(torch.tensor([]), 0.1)


def test_truncation_ranks_of_several_spectra_are_each_one_s_rank_and_none_where_not_finite():
    nan, inf = float("nan"), float("inf")
    spectra = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([3.0, 2.0, 2.0, 2.0]), torch.tensor([nan, 1.0]),
               torch.tensor([5.0]), torch.tensor([inf, 0.5])]
    assert truncation_ranks(spectra, 0.5) == [2, 3, None, 1, None]
    assert truncation_ranks(spectra[:2], 0.2) == [truncation_rank(spectra[0], 0.2), truncation_rank(spectra[1], 0.2)]
    with pytest.raises(ValueError, match="no singular values"):
        truncation_ranks([spectra[0], torch.tensor([])], 0.1)


def test_a_zero_matrix_truncates_to_rank_one_not_zero():
    assert truncation_rank(torch.zeros(3), 0.2) == 1                   # ‖σ‖ = 0: the rank is at least 1
    assert truncation_rank(torch.zeros(3), 0.0) == 1
    dense = nn.Linear(5, 4)
    with torch.no_grad():
        dense.weight.zero_()
    layer = LowRankLinear.from_linear(dense, tol=0.1)
    assert layer.rank == 1 and torch.equal(layer.matrix(), torch.zeros(4, 5))


def test_from_linear_keeps_the_rank_the_tolerance_implies():
    weight = matrix_with_singular_values([5.0, 4.0, 3.0, 0.5, 0.1], 12, 9)
    dense = nn.Linear(9, 12).double()
    with torch.no_grad():
        dense.weight.copy_(weight)
    # ‖σ‖ = √50.26 ≈ 7.09; ϑ = 0.1: tail ‖(0.5, 0.1)‖ = 0.51 ≤ 0.709 < ‖(3, 0.5, 0.1)‖.
    layer = LowRankLinear.from_linear(dense, tol=0.1)
    assert layer.rank == 3
    assert torch.allclose(torch.diag(layer.S), torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64))
    # Eckart–Young: the error of the best rank-3 approximation is the discarded tail.
    error = torch.linalg.matrix_norm(layer.matrix() - weight)
    assert error.item() == pytest.approx((0.5 ** 2 + 0.1 ** 2) ** 0.5, rel=1e-9)
    assert LowRankLinear.from_linear(dense, tol=0.0).rank == 9      # rounding leaves no exact zeros
    assert LowRankLinear.from_linear(dense, 2).rank == 2


def test_factors_are_orthonormal_and_forward_equals_the_dense_layer():
    torch.manual_seed(0)
    linear = LowRankLinear(20, 15, 6)
    eye = torch.eye(6)
    assert torch.allclose(linear.U.T @ linear.U, eye, atol=1e-5)
    assert torch.allclose(linear.V.T @ linear.V, eye, atol=1e-5)
    x = torch.randn(4, 20)
    assert torch.allclose(linear(x), linear.to_dense()(x), atol=1e-6)
    x3 = torch.randn(2, 3, 20)                                          # extra leading dimensions
    assert torch.allclose(linear(x3), linear.to_dense()(x3), atol=1e-6)
    conv = LowRankConv2d(nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1), 4)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(conv(x), conv.to_dense()(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_one_backward_gives_the_k_l_and_s_gradients(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LowRankLinear(7, 5, 3).double(), torch.randn(4, 7, dtype=torch.float64)
    else:
        layer = LowRankConv2d(nn.Conv2d(3, 6, 3, padding=1, stride=2), 2).double()
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x.requires_grad_()
    U, S, V = (p.detach() for p in (layer.U, layer.S, layer.V))
    W = (U @ S @ V.T).requires_grad_()
    dense = layer.to_dense()
    if kind == "linear":
        y = nn.functional.linear(x, W, layer.bias)
    else:
        y = nn.functional.conv2d(x, W.reshape(dense.weight.shape), layer.bias, **layer.conv)
    g = torch.randn_like(y)
    grad_x, grad_W = torch.autograd.grad(y, (x, W), g)
    layer(x).backward(g)
    assert torch.allclose(x.grad, grad_x)
    assert torch.allclose(layer.U.grad, grad_W @ V)              # ∇_K = ∂L/∂W V
    assert torch.allclose(layer.V.grad, grad_W.T @ U)            # ∇_L = (∂L/∂W)ᵀ U
    assert torch.allclose(layer.S.grad, U.T @ grad_W @ V)        # ∂L/∂S


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_under_bfloat16_autocast(kind):
    # The forward pass may run in bfloat16 while the factors stay float32: the backward pass works in the
    # factors' dtype, and the gradients agree with those of the float32 pass to bfloat16's precision.
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LowRankLinear(16, 12, 4), torch.randn(8, 16)
    else:
        layer, x = LowRankConv2d(nn.Conv2d(3, 6, 3, padding=1), 2), torch.randn(2, 3, 6, 6)
    x.requires_grad_()
    layer(x).square().sum().backward()
    reference = [t.grad.clone() for t in (x, layer.U, layer.S, layer.V)]
    for t in (x, layer.U, layer.S, layer.V):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.to(torch.bfloat16))
    out.float().square().sum().backward()
    for t, expected in zip((x, layer.U, layer.S, layer.V), reference):
        assert t.grad.dtype == torch.float32
        assert torch.allclose(t.grad, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


def test_model_conversion_round_trip_and_costs():
    torch.manual_seed(0)
    model = LeNet5(channels=(20, 50), hidden=(500,), padding=0)
    names = ["features.0", "features.3", "classifier.1"]
    x = torch.randn(3, 1, 28, 28)
    dense_flops = count_flops(model, x)
    to_low_rank(model, names, rank=10)
    assert list(low_rank_layers(model)) == names
    ranks = {name: layer.rank for name, layer in low_rank_layers(model).items()}
    assert ranks == {"features.0": 10, "features.3": 10, "classifier.1": 10}
    layer = low_rank_layers(model)["classifier.1"]
    assert count_low_rank_parameters(layer) == 10 * (500 + 800) + 100 + 500
    assert dense_parameter_count(layer) == 500 * 800 + 500
    flops = count_flops(model, x)
    assert flops.per_layer["classifier.1"] == 10 * 800 + 100 + 500 * 10
    assert flops.per_layer["features.3"] == 8 * 8 * (10 * 500 + 50 * 10)   # 10 filters of 20·5·5, then U S
    assert flops.per_layer["classifier.3"] == dense_flops.per_layer["classifier.3"]
    factors = {id(p) for layer in low_rank_layers(model).values() for p in (layer.U, layer.S, layer.V)}
    assert factors.isdisjoint(id(p) for p in dense_parameters(model))
    assert len(dense_parameters(model)) == 3 + 2                  # the low-rank layers' biases, the dense layer's two
    out = model(x)
    to_dense(model)
    assert not low_rank_layers(model) and torch.allclose(model(x), out, atol=1e-5)


def test_state_dict_round_trip_keeps_ranks_and_factors():
    torch.manual_seed(0)
    model = to_low_rank(MLP(hidden=(30, 20)), ["1", "3"], rank=4)
    low_rank_layers(model)["1"].set_factors(*(torch.randn(s) for s in ((30, 7), (7, 7), (784, 7))))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = to_low_rank(MLP(hidden=(30, 20)), ["1", "3"], rank=2)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert {name: layer.rank for name, layer in low_rank_layers(other).items()} == {"1": 7, "3": 4}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 784)
    assert torch.equal(model(x), other(x))


def test_a_checkpoint_of_another_layer_is_refused_and_the_factors_keep_their_shapes():
    torch.manual_seed(0)
    layer = LowRankLinear(8, 20, 2, r_max=4)
    before = {name: p.detach().clone() for name, p in layer.state_dict().items()}
    wrong_width = LowRankLinear(6, 20, 2).state_dict()
    too_high = LowRankLinear(8, 20, 6).state_dict()
    misfit = {**layer.state_dict(), "S": torch.randn(2, 3)}
    for state, message in ((wrong_width, "not those of a 20×8 weight"), (misfit, "not those of a 20×8 weight"),
                           (too_high, "rank 6 is outside this layer's ranks 1 to r_max = 4")):
        with pytest.raises(RuntimeError, match=message):
            layer.load_state_dict(state)
        # The factors keep their shapes (as in any torch load, tensors that fit are still copied) and still work.
        assert all(getattr(layer, name).shape == before[name].shape for name in ("U", "S", "V"))
        assert layer(torch.randn(2, 8)).shape == (2, 20)
    layer.load_state_dict(LowRankLinear(8, 20, 3).state_dict())       # another rank of the same weight: fine
    assert layer.rank == 3
    rank_zero = {"U": torch.zeros(20, 0), "S": torch.zeros(0, 0), "V": torch.zeros(8, 0), "bias": layer.bias}
    rectangular = {"U": torch.zeros(20, 2), "S": torch.zeros(2, 3), "V": torch.zeros(8, 3), "bias": layer.bias}
    for state, message in ((rank_zero, "rank 0 is outside this layer's ranks 1 to r_max = 4"),
                           (rectangular, "not those of a 20×8 weight")):
        with pytest.raises(RuntimeError, match=message):
            layer.load_state_dict(state)
        assert layer.rank == 3


def test_loading_a_checkpoint_keeps_frozen_factors_frozen():
    torch.manual_seed(0)
    model = to_low_rank(MLP(hidden=(30, 20)), ["1", "3"], rank=4)
    for p in low_rank_layers(model)["1"].parameters():
        p.requires_grad_(False)
    same_rank, higher_rank = (to_low_rank(MLP(hidden=(30, 20)), ["1", "3"], rank=r).state_dict() for r in (4, 6))
    parameters = [id(p) for p in model.parameters()]
    model.load_state_dict(same_rank)
    assert [id(p) for p in model.parameters()] == parameters          # the same rank: loaded in place
    model.load_state_dict(higher_rank)                                  # new shapes: new parameters, still frozen
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"1.U", "1.S", "1.V", "1.bias"} and low_rank_layers(model)["1"].rank == 6
    layer = low_rank_layers(model)["3"]
    layer.S.requires_grad_(False)
    layer.set_factors(layer.U, layer.S, layer.V)
    assert (layer.U.requires_grad, layer.S.requires_grad, layer.V.requires_grad) == (True, False, True)


def test_conversions_keep_frozen_weights_and_biases_frozen():
    # a frozen dense layer converted to low rank is not trained by DLRT (which leaves frozen layers as they are), and
    # converted back it is still frozen; a frozen bias alone stays frozen alone
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.ReLU(),
                          nn.Linear(6, 2))
    model[0].requires_grad_(False)
    model[3].bias.requires_grad_(False)
    trained = {"0": (False, False), "3": (True, False), "5": (True, True)}       # (weight, bias)
    to_low_rank(model, ["0", "3", "5"], rank=2)
    for name, (weight, bias) in trained.items():
        layer = low_rank_layers(model)[name]
        assert [p.requires_grad for p in (layer.U, layer.S, layer.V, layer.bias)] == [weight] * 3 + [bias], name
    to_dense(model)
    for name, (weight, bias) in trained.items():
        assert (model.get_submodule(name).weight.requires_grad, model.get_submodule(name).bias.requires_grad) == (
            weight, bias), name


def test_an_unbatched_image_goes_through_a_low_rank_convolution_as_through_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = LowRankConv2d(conv, 3)
    x = torch.randn(3, 6, 6)
    assert layer(x).shape == conv(x).shape == (4, 6, 6)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0))[0])
    outputs = []                                  # a forward hook sees the call once, with its unbatched output
    layer.register_forward_hook(lambda module, inputs, output: outputs.append(tuple(output.shape)))
    layer(x)
    assert outputs == [(4, 6, 6)]


def test_a_low_rank_convolution_returns_contiguous_nchw_like_nn_conv2d():
    # code written for nn.Conv2d views its output (x.view(batch, -1)); a channels-last result cannot be viewed so
    conv = nn.Conv2d(3, 8, 3)
    out = LowRankConv2d(conv, 2)(torch.randn(2, 3, 6, 6))
    assert out.is_contiguous() and out.view(2, -1).shape == (2, 8 * 4 * 4)


@pytest.mark.parametrize("padding, pixels", [("same", (1, 2)), ("valid", (0, 0))])
def test_string_padding_becomes_pixels(padding, pixels):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 5), padding=padding)
    layer = LowRankConv2d(conv, 3)
    assert layer.conv["padding"] == pixels
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    out = layer(x)
    assert out.shape == conv(x).shape
    out.sum().backward()                                          # the backward takes integer padding only
    assert x.grad.shape == x.shape and layer.U.grad is not None
    with pytest.raises(ValueError, match="pads one side more than the other"):
        LowRankConv2d(nn.Conv2d(3, 4, 2, padding="same"), 1)


def test_bad_input():
    with pytest.raises(ValueError, match=r"ϑ must be in \[0, 1\)"):
        LowRankLinear(5, 4, tol=1.0)
    with pytest.raises(ValueError, match=r"ϑ must be in \[0, 1\)"):
        truncation_rank(torch.ones(3), -0.1)
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match=r"rank must be an integer from 1 to min\(n, m\) = 4"):
            LowRankLinear(5, 4, bad)
    with pytest.raises(ValueError, match="rank 3 is above r_max = 2"):
        LowRankLinear(5, 4, 3, r_max=2)
    assert LowRankLinear(5, 4, tol=0.0, r_max=2).rank == 2             # a tolerance's rank is capped at r_max
    with pytest.raises(ValueError, match="exactly one of rank= and tol="):
        LowRankLinear(5, 4)
    with pytest.raises(ValueError, match="exactly one of rank= and tol="):
        LowRankLinear(5, 4, 2, tol=0.1)
    with pytest.raises(ValueError, match="ungrouped"):
        LowRankConv2d(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(KeyError, match="'0' is a Flatten"):
        to_low_rank(MLP(), ["0"], rank=2)
    with pytest.raises(KeyError, match="not a module of the model"):
        to_low_rank(MLP(), ["9"], rank=2)
    with pytest.raises(ValueError, match=r"not one string \('1'\): pass \['1'\]"):
        to_low_rank(MLP(), "1", rank=2)
    for empty in ([], (), iter([])):                                    # it returned the model unchanged
        with pytest.raises(ValueError, match="no layers to convert: layers is empty"):
            to_low_rank(MLP(), empty, rank=2)
    attention = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(KeyError, match="NonDynamicallyQuantizableLinear"):     # its owner reads .weight
        to_low_rank(attention, ["self_attn.out_proj"], rank=2)
    with pytest.raises(KeyError, match="names the model itself.*LowRankLinear.from_linear"):
        to_low_rank(nn.Linear(5, 4), [""], rank=2)
    with pytest.raises(TypeError, match=r"itself a LowRankLinear.*use model.to_dense\(\)"):
        to_dense(LowRankLinear(5, 4, 2))
    model = MLP(hidden=(8, 6))
    with pytest.raises(KeyError, match=r"no rank for layers \['3'\]"):
        to_low_rank(model, ["1", "3"], rank={"1": 2})
    with pytest.raises(KeyError, match=r"rank names \['3'\], which are not in layers \['1'\]"):
        to_low_rank(model, ["1"], rank={"1": 2, "3": 3})                # "3" would have stayed dense unnoticed
    assert not low_rank_layers(model)                                   # refused before any layer changed
    assert LowRankLinear(5, 4, np.int64(2), r_max=np.int64(3)).rank == 2
    assert LowRankLinear(5, 4, tol=np.float32(0.5)).rank >= 1


@pytest.mark.parametrize("conv", [nn.ConvTranspose2d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 3)])
def test_a_low_rank_convolution_is_built_from_a_conv2d_only(conv):
    # A transposed convolution with as many inputs as outputs became a Conv2d of its weight, which computes another
    # function of the same shapes; 1-D and 3-D convolutions failed only in the forward pass, with torch's errors.
    with pytest.raises(TypeError, match=f"built from an nn.Conv2d, got a {type(conv).__name__}"):
        LowRankConv2d(conv, 2)


def test_from_linear_converts_an_nn_linear_only():
    # Other layers failed with an AttributeError for in_features, whatever they were.
    with pytest.raises(TypeError, match=r"converts an nn.Linear, got a Conv2d: use LowRankConv2d\(layer, ...\)"):
        LowRankLinear.from_linear(nn.Conv2d(3, 4, 3), 2)
    with pytest.raises(TypeError, match="converts an nn.Linear, got a Bilinear$"):
        LowRankLinear.from_linear(nn.Bilinear(3, 3, 4), 2)


def test_counts_refuse_ranks_a_layer_cannot_have_and_models_without_weights():
    layer = LowRankLinear(6, 5, 2)
    assert count_low_rank_parameters(layer, 5) == 5 * (5 + 6) + 25 + 5
    for rank in (-1, 0, 6, 2.5):
        with pytest.raises(ValueError, match=r"rank must be an integer from 1 to min\(n, m\) = 5"):
            count_low_rank_parameters(layer, rank)
    with pytest.raises(ValueError, match="has no nn.Linear, nn.Conv2d or low-rank layer"):
        compression(nn.Sequential(nn.ReLU()))


def test_compression_by_hand():
    model = to_low_rank(MLP(hidden=(100,)), ["1"], rank=5)            # 784 → 100 (rank 5) → 10 (dense)
    counts = compression(model)
    dense = 784 * 100 + 100 * 10
    assert counts["dense"] == dense
    assert counts["eval"] == 5 * (784 + 100) + 25 + 1000
    assert counts["train"] == 3 * 5 * (784 + 100) + 4 * 25 + 1000
    assert counts["cr_eval"] == pytest.approx(1 - counts["eval"] / dense)
    assert counts["cr_train"] == pytest.approx(1 - counts["train"] / dense)
    # 2r above a side: the augmented bases have min(2r, n) and min(2r, m) columns.
    narrow = to_low_rank(nn.Sequential(nn.Linear(6, 20, bias=False)), ["0"], rank=6)
    a, b = min(12, 20), min(12, 6)
    assert compression(narrow)["train"] == a * 20 + b * 6 + a * b + 6 * (20 + 6) == 504


def test_per_layer_ranks_and_input_gradients_only_when_needed():
    torch.manual_seed(0)
    model = to_low_rank(LeNet5(channels=(20, 50), hidden=(500,), padding=0), ["features.0", "classifier.1"],
                        rank={"features.0": 3, "classifier.1": 7})
    assert {name: layer.rank for name, layer in low_rank_layers(model).items()} == {"features.0": 3,
                                                                                    "classifier.1": 7}
    x = torch.randn(2, 1, 28, 28)                       # no gradient needed for the input
    real_conv2d_input = torch.nn.grad.conv2d_input

    def conv2d_input(*args, **kwargs):                  # the first layer's input gradient: never needed here
        raise AssertionError("computed the gradient of an input that needs none")

    torch.nn.grad.conv2d_input = conv2d_input
    try:
        model(x).sum().backward()
    finally:
        torch.nn.grad.conv2d_input = real_conv2d_input
    assert all(p.grad is not None for layer in low_rank_layers(model).values() for p in (layer.U, layer.S, layer.V))
    model.zero_grad()
    x.requires_grad_()                                  # ... and computed when it is
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_frozen_layer_backward_computes_the_input_gradient_alone(kind, monkeypatch):
    # A frozen layer inside a trained model: no factor gradient is computed (for a convolution, no conv2d_weight).
    layer, x = full_core_case(kind)
    x.requires_grad_()
    (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    trained_flops = FlopCounterMode(display=False)
    with trained_flops:
        layer(x).square().sum().backward()
    layer.requires_grad_(False)

    def conv2d_weight(*args, **kwargs):
        raise AssertionError("computed ∇_L of a frozen layer")

    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", conv2d_weight)
    x.grad = None
    frozen_flops = FlopCounterMode(display=False)
    with frozen_flops:
        layer(x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected)
    assert frozen_flops.get_total_flops() < trained_flops.get_total_flops()
    if kind == "linear":
        # By hand: forward x V, · Sᵀ, · Uᵀ and backward δ U, · S, · Vᵀ are the same three products (B rows
        # through m, r, r, n), so the frozen layer's forward and backward cost exactly twice its forward; no x V.
        b, (n, m), r = x.shape[0], layer.dense_shape, layer.rank
        assert frozen_flops.get_total_flops() == 2 * 2 * b * (m * r + r * r + r * n)


def full_core(layer, seed=0):
    """Give ``layer`` a full (non-diagonal, non-symmetric) S, as training makes it."""
    generator = torch.Generator().manual_seed(seed)
    r = layer.rank
    layer.set_factors(layer.U, torch.randn(r, r, generator=generator, dtype=layer.S.dtype), layer.V)
    return layer


def full_core_case(kind, stride=1):
    """A rank-3 linear (7 → 5) or convolutional (3 → 6 channels) layer with a full core, and an input for it."""
    torch.manual_seed(0)
    if kind == "linear":
        return full_core(LowRankLinear(7, 5, 3).double()), torch.randn(4, 7, dtype=torch.float64)
    layer = full_core(LowRankConv2d(nn.Conv2d(3, 6, 3, padding=1, stride=stride), 3).double())
    return layer, torch.randn(2, 3, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_and_gradients_with_a_full_core_match_the_dense_weight_u_s_vt(kind):
    layer, x = full_core_case(kind, stride=2)
    x.requires_grad_()
    U, S, V = (p.detach() for p in (layer.U, layer.S, layer.V))
    W = (U @ S @ V.T).requires_grad_()                           # by hand, not layer.matrix()
    if kind == "linear":
        y = nn.functional.linear(x, W, layer.bias)
    else:
        y = nn.functional.conv2d(x, W.reshape(6, 3, 3, 3), layer.bias, **layer.conv)
    out = layer(x)
    assert torch.allclose(out, y)
    assert torch.allclose(layer.matrix(), W) and torch.allclose(layer.to_dense()(x), y)
    g = torch.randn_like(y)
    grad_x, grad_W = torch.autograd.grad(y, (x, W), g)
    out.backward(g)
    assert torch.allclose(x.grad, grad_x)
    assert torch.allclose(layer.U.grad, grad_W @ V)
    assert torch.allclose(layer.V.grad, grad_W.T @ U)
    assert torch.allclose(layer.S.grad, U.T @ grad_W @ V)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_without_k_and_l_gradients_backward_gives_only_the_s_gradient(kind):
    layer, x = full_core_case(kind)
    layer.kl_gradients = False
    layer(x).square().sum().backward()
    assert layer.U.grad is None and layer.V.grad is None
    W = layer.matrix().detach().requires_grad_()
    dense = layer.to_dense()
    if kind == "linear":
        y = nn.functional.linear(x, W, layer.bias)
    else:
        y = nn.functional.conv2d(x, W.reshape(dense.weight.shape), layer.bias, **layer.conv)
    (grad_W,) = torch.autograd.grad(y.square().sum(), W)
    assert torch.allclose(layer.S.grad, layer.U.detach().T @ grad_W @ layer.V.detach())


def test_a_dilated_convolution_with_uneven_padding_matches_the_dense_one_and_its_gradients():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, (3, 5), padding=(1, 3), dilation=(2, 1), stride=(1, 2)),
                 nn.Conv2d(3, 4, 3, padding="same", dilation=2)):
        conv = conv.double()
        layer = LowRankConv2d(conv, 4)                             # full rank: the same weight
        x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
        out = layer(x)
        assert torch.allclose(out, conv(x)) and torch.allclose(layer.to_dense()(x), conv(x))
        W = layer.matrix().detach().requires_grad_()
        y = nn.functional.conv2d(x, W.reshape(conv.weight.shape), conv.bias, conv.stride, conv.padding, conv.dilation)
        g = torch.randn_like(y)
        grad_x, grad_W = torch.autograd.grad(y, (x, W), g)
        out.backward(g)
        assert torch.allclose(x.grad, grad_x) and torch.allclose(layer.V.grad, grad_W.T @ layer.U.detach())


def test_full_rank_layers_compute_what_the_dense_layers_did_bias_included():
    torch.manual_seed(0)
    linear, conv = nn.Linear(6, 4).double(), nn.Conv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        linear.bias.uniform_(1, 2)
        conv.bias.uniform_(1, 2)
    x, image = torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert torch.allclose(LowRankLinear.from_linear(linear, 4)(x), linear(x))
    assert torch.allclose(LowRankConv2d.from_conv(conv, 3)(image), conv(image))
    with pytest.raises(ValueError, match="zero padding"):
        LowRankConv2d(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), 2)


def test_r_max_must_be_a_rank_the_layer_can_have():
    for bad in (0, 5, 2.5):
        with pytest.raises(ValueError, match=r"r_max must be an integer from 1 to min\(n, m\) = 4"):
            LowRankLinear(5, 4, 2, r_max=bad)


def test_to_low_rank_caps_ranks_and_r_max_at_each_layers_size():
    torch.manual_seed(0)
    model = to_low_rank(MLP(in_features=12, hidden=(8,), out_features=3), ["1", "3"], rank=50, r_max=100)
    layers = low_rank_layers(model)
    assert {name: (layer.rank, layer.r_max) for name, layer in layers.items()} == {"1": (8, 8), "3": (3, 3)}


def test_set_factors_keeps_the_dtype_and_rank_is_the_smaller_side_of_s():
    layer = LowRankLinear(6, 5, 2)
    U, S, V = (torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
               torch.randn(6, 2, dtype=torch.float64))
    layer.set_factors(U, S, V)                                    # an augmented, rectangular S, as mid-step
    assert all(p.dtype == torch.float32 for p in (layer.U, layer.S, layer.V))
    assert layer.rank == 2 and layer.dense_shape == (5, 6)
    x = torch.randn(4, 6)
    assert torch.allclose(layer(x), x @ (U @ S @ V.T).float().T + layer.bias, atol=1e-5)


def test_a_checkpoint_whose_v_has_another_rank_than_u_is_refused():
    layer = LowRankLinear(8, 20, 2)
    state = {"U": torch.zeros(20, 3), "S": torch.zeros(3, 3), "V": torch.zeros(8, 4), "bias": layer.bias}
    with pytest.raises(RuntimeError, match="not those of a 20×8 weight"):
        layer.load_state_dict(state)
    assert (layer.U.shape, layer.S.shape, layer.V.shape) == ((20, 2), (2, 2), (8, 2))


def test_a_low_rank_linear_counts_its_macs_at_every_position_of_a_sequence():
    layer = LowRankLinear(20, 8, 3)
    count = count_flops(nn.Sequential(layer), torch.randn(2, 5, 20))
    assert count.per_layer == {"0": 5 * (3 * 20 + 3 * 3 + 8 * 3)}              # per example: 5 positions


def test_a_layer_used_at_two_places_is_converted_at_both_and_stays_shared():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 8)
    to_low_rank(model, ["0"], rank=8)
    assert isinstance(model[0], LowRankLinear) and model[2] is model[0]
    torch.testing.assert_close(model(x), shared(torch.relu(shared(x))), rtol=1e-5, atol=1e-5)


def test_a_layer_tied_to_a_module_left_dense_is_refused_and_nothing_changes():
    """An output layer that shares its weight with an embedding (Press & Wolf 2017), or with a Linear left out of
    layers=: converted, it would compute with its factors while the other module kept the dense weight and trained
    it, the two silently untied."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = embed.weight
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    for model, layer, other in ((nn.ModuleDict({"embed": embed, "head": head}), "head", "embed.weight"),
                                (nn.Sequential(first, nn.Tanh(), second), "0", "2.weight")):
        with pytest.raises(ValueError, match=f"layer '{layer}' shares its weight with '{other}' \\(tied weights\\), "
                                             "which would keep using and training the dense weight.*untie them"):
            to_low_rank(model, [layer], rank=4)
        assert not low_rank_layers(model) and type(dict(model.named_modules())[layer]) is nn.Linear


def test_a_low_rank_layer_used_at_two_places_becomes_one_dense_layer_at_both():
    torch.manual_seed(0)
    shared = LowRankLinear(8, 8, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 8)
    out = model(x)
    to_dense(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0] and not low_rank_layers(model)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


def test_to_low_rank_changes_nothing_when_a_layer_cannot_be_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="ungrouped"):
        to_low_rank(model, ["0", "2"], rank=1)
    assert not low_rank_layers(model) and type(model[0]) is nn.Conv2d


def test_a_low_rank_layer_owns_its_bias_and_describes_its_shape():
    linear, conv = nn.Linear(20, 8), nn.Conv2d(3, 4, 3)
    layers = (LowRankLinear.from_linear(linear, 3), LowRankConv2d(conv, 2))
    with torch.no_grad():
        for layer in layers:
            layer.bias.add_(1.0)                                    # training the copy
    assert not torch.equal(layers[0].bias, linear.bias) and not torch.equal(layers[1].bias, conv.bias)
    assert "20 -> 8, rank=3, r_max=8, bias=True" in repr(layers[0])
    assert "27 -> 4, rank=2, r_max=4, bias=True" in repr(layers[1])
