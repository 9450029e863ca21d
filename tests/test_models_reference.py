"""Reference checks of the course's architectures against the papers' tables and stated conventions."""

import math

import pytest
import torch
from torch import nn

from lowlearn.cost import count_parameters
from lowlearn.models import MLP, CifarResNet, ConvNet, LeNet5


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
