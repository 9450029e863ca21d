"""lowlearn.sparse.flops against independent references: torch's FlopCounterMode on a full training step,
MACs counted by running the convolution itself on its 0/1 mask, and the limits of the RigL / Top-KAST formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowlearn.cost import count_flops, training_flops
from lowlearn.sparse.flops import dst_training_flops, model_sparse_flops, sparse_inference_flops
from lowlearn.sparse.mask import masks_of
from lowlearn.sparse.prune import prune
from lowlearn.sparse.scores import magnitude


def conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 2 * 2, 10))


def torch_training_flops(model, x):
    """FLOPs (2 per MAC) that FlopCounterMode counts for one forward and backward pass."""
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def test_training_flops_is_torchs_count_of_a_forward_and_backward_pass():
    """RigL's 3·f_D per example is exactly what FlopCounterMode counts for forward + backward (mm, addmm,
    convolution, convolution_backward; BN, ReLU, pooling and biases count nothing in either) when the input needs
    a gradient; without one torch skips the first layer's input gradient, F_0, as training_flops' docstring says."""
    model, x = conv_bn_net().train(), torch.randn(4, 3, 8, 8)
    count = count_flops(model, x)
    # by hand: 3·3·3·8·8·8 + 8·3·3·16·2·2 + 64·10 MACs per example
    assert count.per_layer == {"0": 13_824, "4": 4_608, "7": 640}
    assert torch_training_flops(model, x.clone().requires_grad_(True)) == 2 * 4 * training_flops(count)
    model.zero_grad()
    first = count.per_layer["0"]
    assert torch_training_flops(model, x) == 2 * 4 * (training_flops(count) - first)


def macs_by_convolving_the_mask(conv, mask, in_shape):
    """Independent count: run the layer's own convolution on an all-ones input (its padding filled with ones too)
    with the 0/1 mask as weight; each output sums the kept weights it used, so the sum is the MACs per example."""
    c, h, w = in_shape
    ph, pw = conv.padding
    ones = torch.ones(1, c, h + 2 * ph, w + 2 * pw)
    out = F.conv2d(ones, mask.float(), stride=conv.stride, padding=0, dilation=conv.dilation, groups=conv.groups)
    return int(out.sum())


def test_sparse_conv_macs_with_stride_dilation_and_groups_match_running_the_mask():
    """f_S of a pruned grouped, dilated, strided, padded Conv2d (and the Linear after it) equals the MACs obtained
    by convolving the layer's mask with ones: d_l · F_l counts every kept weight at every output position."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3))
    x = torch.zeros(2, 4, 9, 9)
    prune(model, magnitude(model), {"0": 0.4, "3": 0.3})
    masks = masks_of(model)
    expected = macs_by_convolving_the_mask(conv, masks["0"], (4, 9, 9)) + int(masks["3"].sum())
    assert model_sparse_flops(model, x) == pytest.approx(expected)
    dense = count_flops(model, x)
    assert dense.per_layer["0"] == macs_by_convolving_the_mask(conv, torch.ones_like(masks["0"]), (4, 9, 9))


def test_a_linear_layer_on_sequences_costs_its_kept_weights_once_per_row():
    """A masked Linear applied to (B, T, F) uses each kept weight once per row: T · kept MACs per example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    prune(model, magnitude(model), 0.5)
    kept = sum(int(m.sum()) for m in masks_of(model).values())
    assert model_sparse_flops(model, torch.zeros(3, 11, 5)) == pytest.approx(11 * kept)


def test_dst_formulas_reduce_to_each_other_at_their_limits():
    """Evci et al. (2020): RigL's (3 f_S ΔT + 2 f_S + f_D)/(ΔT + 1) lies between static 3 f_S and SNFS 2 f_S + f_D,
    equals their mean at ΔT = 1 and tends to static as ΔT grows; Top-KAST's 2 f_A + f_B is static when B = A and
    SNFS when B is dense."""
    count = count_flops(conv_bn_net(), torch.zeros(1, 3, 8, 8))
    d = {"0": 0.5, "4": 0.1, "7": 0.2}
    static, snfs = (dst_training_flops(count, d, m) for m in ("static", "snfs"))
    assert static == pytest.approx(3 * sparse_inference_flops(count, d))
    assert dst_training_flops(count, d, "rigl", every=1) == pytest.approx((static + snfs) / 2)
    big = dst_training_flops(count, d, "rigl", every=10**6)
    assert static < big < static + (snfs - static) * 1e-5
    assert dst_training_flops(count, d, "topkast", backward_densities=d) == pytest.approx(static)
    assert dst_training_flops(count, d, "topkast", backward_densities=1.0) == pytest.approx(snfs)
