"""Reference checks of the course's architectures against the papers' tables and stated conventions."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.cost import count_parameters
from lowlearn.models import (MLP, VGG, Bottleneck, CifarResNet, ConvNet, Conv4, DepthwiseSeparableConv2d, LeNet5,
                             SmallCNN)


def cifar_resnet_parameters(depth, width=16, classes=10):
    """He et al. (2016) §4.2 by hand: 3×3 stem, 3 stages of n basic blocks (2 convs + 2 BNs), option-A shortcuts."""
    n = (depth - 2) // 6
    total = 3 * width * 9 + 2 * width                        # stem conv (no bias) + BN
    c_in = width
    for stage in range(3):
        c = width * 2**stage
        for _ in range(n):
            total += c_in * c * 9 + c * c * 9 + 4 * c        # conv1, conv2, two BNs (weight and bias)
            c_in = c
    return total + c_in * classes + classes


@pytest.mark.parametrize("depth, paper_millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnets_match_table_6_of_he_et_al(depth, paper_millions):
    """He et al. (2016), Table 6: #params 0.27M, 0.46M, 0.66M, 0.85M, 1.7M for depths 20 … 110."""
    count = count_parameters(CifarResNet(depth))
    assert count == cifar_resnet_parameters(depth)
    assert float(f"{count / 1e6:.2g}") == paper_millions      # the table's two significant digits


def test_layers_keep_pytorch_default_init_and_glorot_would_be_about_twice_as_large():
    """Module docstring: default init is uniform in ±1/√fan_in; Frankle & Carbin's Gaussian Glorot weights
    (std √(2/(fan_in + fan_out))) are 'about twice as large' in LeNet-300-100."""
    torch.manual_seed(0)
    for model in (MLP(), ConvNet(2), LeNet5()):
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                bound = fan_in ** -0.5
                assert m.weight.abs().max().item() <= bound and m.bias.abs().max().item() <= bound
                if m.weight.numel() > 20_000:              # enough draws to see a uniform's spread
                    assert m.weight.abs().max().item() > 0.99 * bound
                    assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    ratios = []
    for layer in (m for m in MLP() if isinstance(m, nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        ratios.append(math.sqrt(2 / (fan_in + fan_out)) / (1 / math.sqrt(3 * fan_in)))
    assert all(2.0 < r < 2.4 for r in ratios)                # 2.08, 2.12, 2.33


def test_lenet5_and_conv_nets_layer_shapes_follow_the_papers():
    """LeCun et al. (1998) C1 6@5×5, C3 16@5×5, F5 120, F6 84; Frankle & Carbin (2019) Fig. 2 Conv-6:
    64, 64, pool, 128, 128, pool, 256, 256, pool, FC 256, 256, 10 (3×3 convolutions)."""
    shapes = [tuple(m.weight.shape) for m in LeNet5().modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert shapes == [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84)]
    shapes = [tuple(m.weight.shape) for m in ConvNet(6).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert shapes == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3),
                      (256, 256, 3, 3), (256, 4 * 4 * 256), (256, 256), (10, 256)]


def test_cifar_resnet_stages_run_at_32_16_and_8_pixels():
    """He et al. (2016), section 4.2: "feature maps of sizes {32, 16, 8}", with 16, 32 and 64 filters; only the
    first blocks of stages 2 and 3 subsample (a stride in stage 1 would keep the parameter count and output shape)."""
    net = CifarResNet(20).eval()
    shapes = []
    for block in net.features[3:]:                       # after the first convolution, batch norm and ReLU
        block.register_forward_hook(lambda module, inputs, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        net(torch.zeros(2, 3, 32, 32))
    assert shapes == [(16, 32, 32)] * 3 + [(32, 16, 16)] * 3 + [(64, 8, 8)] * 3


def batch_norm_by_hand(t, norm):
    """``norm`` applied with this batch's statistics (training mode), through the functional form."""
    return F.batch_norm(t, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)


# Simonyan & Zisserman (2015), Table 1: convolutions per stage (stages at 32, 16, 8, 4, 2 pixels for CIFAR-10,
# channels 64, 128, 256, 512, 512), configurations A (11), B (13), D (16) and E (19).
TABLE_1 = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def test_vgg_convolutions_run_at_the_stage_sizes_of_table_1():
    """Reference: Table 1 of the VGG paper, written out as convolutions per stage; each convolution's
    (input channels, output channels, input side) is recorded by hooks on a 32×32 forward pass."""
    for depth, per_stage in TABLE_1.items():
        model = VGG(depth, width=1 / 16).eval()
        seen = []
        for module in model.features:
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(
                    lambda m, inputs, out: seen.append((m.in_channels, m.out_channels, inputs[0].shape[-1])))
        model(torch.zeros(1, 3, 32, 32))
        expected, channels = [], 3
        for count, width, side in zip(per_stage, (4, 8, 16, 32, 32), (32, 16, 8, 4, 2)):
            for _ in range(count):
                expected.append((channels, width, side))
                channels = width
        assert seen == expected, depth


def test_conv4_without_running_stats_keeps_the_batch_norms_learnable_scale_and_shift():
    """Reference: the docstring, ``running_stats=False`` only changes ``track_running_stats``: the same
    parameters (γ = 1, β = 0 per channel, adapted by MAML) and no running buffers."""
    plain, transductive = Conv4(), Conv4(running_stats=False)
    assert ([(n, p.shape) for n, p in transductive.named_parameters()]
            == [(n, p.shape) for n, p in plain.named_parameters()])
    norms = [m for m in transductive.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
        assert norm.running_mean is None and norm.running_var is None


def test_cifar_resnet_batch_norms_start_at_weight_one_and_bias_zero():
    """Reference: the CifarResNet docstring ("Batch norms start at weight 1, bias 0"), PyTorch's default,
    not a zero-initialised last batch norm per block (Goyal et al.) nor a random scale."""
    model = CifarResNet(20)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 2 * 9
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_a_strided_bottleneck_strides_its_middle_convolution():
    """Reference: a hand computation of the branch with F.conv2d / F.batch_norm (training-mode statistics),
    the stride on the k×k convolution (docstring: "stride: of the middle convolution"), the 1×1 convolutions
    unstrided."""
    torch.manual_seed(0)
    block = Bottleneck(8, 16, reduction=4, stride=2)
    c1, b1, _, c2, b2, _, c3, b3 = block.branch
    x = torch.randn(2, 8, 9, 9)
    h = F.relu(batch_norm_by_hand(F.conv2d(x, c1.weight), b1))
    assert h.shape[-1] == 9                                   # the reduction runs at full resolution
    h = F.relu(batch_norm_by_hand(F.conv2d(h, c2.weight, stride=2, padding=1), b2))
    expected = F.relu(batch_norm_by_hand(F.conv2d(h, c3.weight), b3))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_small_cnn_stem_is_convolution_batch_norm_relu():
    """Reference: the docstring's stem (3×3 convolution → BatchNorm2d → ReLU), computed by hand: the first block
    receives relu(bn(conv(x))), hence non-negative inputs."""
    torch.manual_seed(0)
    model = SmallCNN("separable", channels=(4, 6, 8))
    first = next(m for m in model.modules() if isinstance(m, DepthwiseSeparableConv2d))
    received = []
    first.register_forward_pre_hook(lambda m, inputs: received.append(inputs[0]))
    x = torch.randn(3, 1, 28, 28)
    model(x)
    conv, norm = model.features[0], model.features[1]
    expected = F.relu(batch_norm_by_hand(F.conv2d(x, conv.weight, stride=2, padding=1), norm))
    assert torch.allclose(received[0], expected, atol=1e-5)
