"""Shapes and exact parameter counts of the course's architectures."""

import copy

import pytest
import torch
from torch import nn

from lowlearn.cost import count_flops, count_parameters
from lowlearn.models import (BLOCKS, MLP, VGG, Bottleneck, CifarResNet, Conv4, ConvNet, DepthwiseSeparableConv2d,
                             InvertedResidual, LeNet5, ResNet20, SmallCNN)


def linear(n_in, n_out):
    """Parameters of a linear layer with bias."""
    return n_in * n_out + n_out


def conv(c_in, c_out, k, bias=True):
    """Parameters of a k×k convolution."""
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c):
    """Parameters of a batch norm (weight and bias)."""
    return 2 * c


@pytest.mark.parametrize(
    "model, x, out_shape",
    [
        (MLP(), torch.randn(4, 1, 28, 28), (4, 10)),
        (MLP(), torch.randn(4, 784), (4, 10)),
        (LeNet5(), torch.randn(4, 1, 28, 28), (4, 10)),
        (LeNet5(channels=(20, 50), hidden=(500,), padding=0), torch.randn(4, 1, 28, 28), (4, 10)),
        (LeNet5(in_channels=3, image_size=32, padding=0), torch.randn(4, 3, 32, 32), (4, 10)),
        (Conv4(), torch.randn(4, 1, 28, 28), (4, 5)),
        (Conv4(in_channels=3, image_size=84), torch.randn(4, 3, 84, 84), (4, 5)),
        (Conv4(num_classes=None), torch.randn(4, 1, 28, 28), (4, 64)),
        (Conv4(3, num_classes=None, image_size=84), torch.randn(2, 3, 84, 84), (2, 1600)),
        (VGG(), torch.randn(2, 3, 32, 32), (2, 10)),
        (VGG(depth=16, width=0.25, num_classes=100), torch.randn(2, 3, 32, 32), (2, 100)),
        (ResNet20(), torch.randn(2, 3, 32, 32), (2, 10)),
        (CifarResNet(depth=8, width=4), torch.randn(2, 3, 32, 32), (2, 10)),
    ],
)
def test_output_shapes(model, x, out_shape):
    assert model(x).shape == out_shape


def test_mlp_is_lenet_300_100():
    model = MLP()
    assert [m.weight.shape for m in model if isinstance(m, nn.Linear)] == [
        (300, 784), (100, 300), (10, 100)
    ]
    assert count_parameters(model) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610


def test_mlp_without_hidden_layers_is_logistic_regression():
    model = MLP(hidden=())
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear]
    assert count_parameters(model) == linear(784, 10)


def test_hidden_widths_may_come_from_a_generator():
    # the widths are checked, then used: a generator read twice would leave logistic regression, silently
    assert count_parameters(MLP(hidden=(w for w in (300, 100)))) == count_parameters(MLP()) == 266_610
    assert count_parameters(LeNet5(hidden=(w for w in (120, 84)))) == count_parameters(LeNet5()) == 61_706


def test_mlp_activation_is_configurable():
    assert sum(isinstance(m, nn.Tanh) for m in MLP(activation=nn.Tanh)) == 2


def test_lenet5_parameter_counts():
    # 28 -conv(pad 2)-> 28 -pool-> 14 -conv-> 10 -pool-> 5
    classic = (conv(1, 6, 5) + conv(6, 16, 5)
               + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, 10))
    assert classic == 61_706
    assert count_parameters(LeNet5()) == classic
    # Caffe variant: 28 -conv-> 24 -pool-> 12 -conv-> 8 -pool-> 4
    caffe = conv(1, 20, 5) + conv(20, 50, 5) + linear(50 * 4 * 4, 500) + linear(500, 10)
    assert caffe == 431_080
    assert count_parameters(LeNet5(channels=(20, 50), hidden=(500,), padding=0)) == caffe


def test_lenet5_rejects_too_small_images():
    with pytest.raises(ValueError, match="too small"):
        LeNet5(image_size=12, padding=0)


def test_conv4_structure_and_parameter_count():
    model = Conv4()
    assert model.feature_dim == 64 and isinstance(model.head, nn.Linear)
    trunk = conv(1, 64, 3, bias=False) + 3 * conv(64, 64, 3, bias=False) + 4 * bn(64)
    assert count_parameters(model.features) == trunk
    assert count_parameters(model) == trunk + linear(64, 5) == 112_005
    assert Conv4(in_channels=3, image_size=84).feature_dim == 64 * 5 * 5
    assert count_parameters(Conv4(num_classes=None)) == trunk


def test_conv4_pools_before_the_relu_with_the_papers_values_and_gradients():
    """Conv4 runs [conv → BN → pool → ReLU]; the papers' [conv → BN → ReLU → pool] gives identical bits."""
    torch.manual_seed(0)
    model = Conv4(hidden=8)
    kinds = [type(m) for m in model.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU] * 4
    papers_order = copy.deepcopy(model)
    blocks = range(0, 16, 4)
    papers_order.features = nn.Sequential(*[papers_order.features[i + j] for i in blocks for j in (0, 1, 3, 2)])
    x = torch.randn(6, 1, 28, 28)      # after batch norm, about one pooling window in 16 is all negative
    outputs = []
    for net in (model, papers_order):
        out = net(x)
        out.square().sum().backward()
        outputs.append((out, [p.grad for p in net.parameters()]))
    (out, grads), (papers_out, papers_grads) = outputs
    assert torch.equal(out, papers_out)
    assert all(torch.equal(g, h) for g, h in zip(grads, papers_grads, strict=True))


def test_conv4_without_running_stats_is_transductive():
    torch.manual_seed(0)
    model = Conv4(running_stats=False)
    assert not any("running" in name for name, _ in model.named_buffers())
    assert list(model.buffers()) == []
    x = torch.randn(6, 1, 28, 28)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out)


def test_conv4_with_running_stats_has_buffers():
    names = [name for name, _ in Conv4().named_buffers()]
    assert sum(name.endswith("running_mean") for name in names) == 4


def test_conv4_rejects_too_small_images():
    with pytest.raises(ValueError, match="16"):
        Conv4(image_size=15)


def test_vgg11_parameter_count():
    convs = (conv(3, 64, 3, False) + conv(64, 128, 3, False) + conv(128, 256, 3, False)
             + conv(256, 256, 3, False) + conv(256, 512, 3, False) + 3 * conv(512, 512, 3, False))
    bns = bn(64) + bn(128) + 2 * bn(256) + 4 * bn(512)
    assert count_parameters(VGG(11)) == convs + bns + linear(512, 10) == 9_228_362


@pytest.mark.parametrize("depth, n_convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_depth_counts_weight_layers(depth, n_convs):
    model = VGG(depth, width=0.125)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_vgg_averages_its_last_feature_map_where_imagenet_vgg_max_pools():
    model = VGG(11, width=0.125).eval()
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = model.features(x)
        assert last.shape[-2:] == (2, 2)
        torch.testing.assert_close(model(x), model.classifier[2](last.mean((2, 3))))


def test_vgg_width_keeps_at_least_one_channel():
    model = VGG(width=0.001)
    assert all(m.out_channels == 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("kwargs, message", [({"depth": 12}, r"VGG depth must be one of \[11, 13, 16, 19\], got 12"),
                                             ({"width": 0}, "width")])
def test_vgg_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VGG(**kwargs)


def test_resnet20_parameter_count():
    stem = conv(3, 16, 3, False) + bn(16)

    def block(c_in, c_out):
        return conv(c_in, c_out, 3, False) + conv(c_out, c_out, 3, False) + 2 * bn(c_out)

    stages = (3 * block(16, 16) + block(16, 32) + 2 * block(32, 32)
              + block(32, 64) + 2 * block(64, 64))
    expected = stem + stages + linear(64, 10)
    assert expected == 269_722
    assert count_parameters(ResNet20()) == expected
    assert count_parameters(CifarResNet(depth=20)) == expected


def test_resnet_depth_is_6n_plus_2():
    convs = [m for m in CifarResNet(depth=32, width=4).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # + the linear layer
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_resnet_option_a_shortcut_is_parameter_free():
    model = ResNet20()
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 19 + 1  # 19 convolutions, no projection shortcuts
    block = model.features[6]  # first block of stage 2: 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 32, 32)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 16, 16)
    torch.testing.assert_close(shortcut[:, :16], x[:, :, ::2, ::2])
    assert shortcut[:, 16:].abs().sum() == 0


def test_resnet_convolutions_have_kaiming_init():
    torch.manual_seed(0)
    conv_layer = ResNet20().features[10].conv1  # 64 -> 64, 3×3: fan_in 576
    expected_std = (2 / (64 * 9)) ** 0.5
    assert conv_layer.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    conv_layer = ResNet20().features[6].conv1   # 16 -> 32: fan_in 144, not fan_out 288
    assert conv_layer.weight.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)


def test_a_residual_block_adds_its_shortcut():
    # y = relu(F(x) + shortcut(x)): with the last batch norm's scale at zero, F(x) = 0 and y = relu(shortcut(x))
    torch.manual_seed(0)
    for block in (ResNet20().features[3], ResNet20().features[6]):     # identity and zero-padded shortcuts
        with torch.no_grad():
            block.bn2.weight.zero_()
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
        assert block(x).abs().sum() > 0


def test_convnet_conv2_parameters_by_hand_and_shapes():
    from lowlearn.models import ConvNet

    conv = (3 * 9 * 64 + 64) + (64 * 9 * 64 + 64)
    fc = (16 * 16 * 64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert count_parameters(ConvNet(2)) == conv + fc == 4_301_642
    for depth in (2, 4, 6):
        assert ConvNet(depth)(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="2, 4 or 6"):
        ConvNet(3)
    assert ConvNet(6, image_size=8)(torch.zeros(2, 3, 8, 8)).shape == (2, 10)     # the smallest Conv-6 input
    with pytest.raises(ValueError, match="image_size=4 is too small for Conv-6: 3 2×2 poolings need images of at "
                                         "least 8×8"):
        ConvNet(6, image_size=4)


@pytest.mark.parametrize("model, image", [(LeNet5(), (1, 28, 28)), (ConvNet(2), (3, 32, 32)), (Conv4(), (1, 28, 28))])
def test_a_single_image_without_a_batch_dimension_is_a_clear_error(model, image):
    # the models take (B, C, H, W); one image (C, H, W) would reach the classifier with a wrong number of features
    with pytest.raises(ValueError, match=r"takes images \(B, C, H, W\), got inputs of shape \(\d+, \d+, \d+\): give a "
                                         r"single image a batch dimension, x.unsqueeze\(0\)"):
        model(torch.zeros(image))
    assert model(torch.zeros(image).unsqueeze(0)).shape == (1, 10 if not isinstance(model, Conv4) else 5)


# --- Efficient blocks: MobileNet's depthwise separable convolution, bottlenecks, SmallCNN ---

@pytest.mark.parametrize("m, n, k, d_f, stride", [(16, 32, 3, 14, 1), (8, 24, 5, 7, 1), (3, 5, 3, 5, 2)])
def test_depthwise_separable_cost_is_the_mobilenet_formula(m, n, k, d_f, stride):
    # Howard et al. (2017), eq. (4): D_K²·M·D_F² + M·N·D_F² multiply-adds, D_F the output size.
    block = DepthwiseSeparableConv2d(m, n, kernel_size=k, stride=stride)
    x = torch.randn(2, m, d_f * stride, d_f * stride)
    assert block(x).shape == (2, n, d_f, d_f)
    flops = count_flops(block, x)
    assert flops.per_layer == {"depthwise": k * k * m * d_f * d_f, "pointwise": m * n * d_f * d_f}
    assert flops.total == k * k * m * d_f ** 2 + m * n * d_f ** 2
    standard = count_flops(nn.Conv2d(m, n, k, stride=stride, padding=k // 2), x).total
    assert standard == k * k * m * n * d_f ** 2
    assert flops.total / standard == pytest.approx(1 / n + 1 / k ** 2)      # eq. (5)


def test_depthwise_separable_parameters_and_layers():
    block = DepthwiseSeparableConv2d(16, 32)
    assert [name for name, _ in block.named_children()] == ["depthwise", "bn1", "relu1", "pointwise", "bn2", "relu2"]
    assert block.depthwise.groups == 16 and block.depthwise.bias is None and block.pointwise.bias is None
    assert count_parameters(block) == 9 * 16 + bn(16) + 16 * 32 + bn(32)
    bare = DepthwiseSeparableConv2d(16, 32, norm=False, bias=True)
    assert [name for name, _ in bare.named_children()] == ["depthwise", "pointwise"]
    assert count_parameters(bare) == 9 * 16 + conv(16, 32, 1)


def test_bare_depthwise_separable_is_a_rank_structured_convolution():
    # Without norm it is linear: the same as one k×k convolution whose weight is the product of the two.
    torch.manual_seed(0)
    block = DepthwiseSeparableConv2d(4, 6, norm=False)
    full = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        # W[n, m, i, j] = P[n, m] · D[m, i, j]
        full.weight.copy_(block.pointwise.weight[:, :, 0, 0, None, None] * block.depthwise.weight[:, 0][None])
    x = torch.randn(3, 4, 9, 9)
    torch.testing.assert_close(block(x), full(x), rtol=1e-5, atol=1e-5)


def test_bottleneck_parameters_shapes_and_shortcut():
    block = Bottleneck(16, 32, reduction=4)            # mid = 8; shapes differ: no shortcut
    assert count_parameters(block) == (conv(16, 8, 1, False) + bn(8) + conv(8, 8, 3, False) + bn(8)
                                       + conv(8, 32, 1, False) + bn(32))
    assert not block.residual and block(torch.randn(2, 16, 7, 7)).shape == (2, 32, 7, 7)
    same = Bottleneck(32, 32)
    assert same.residual
    with torch.no_grad():                               # a zero branch leaves relu(x): the identity shortcut
        same.branch[-1].weight.zero_()
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(same.eval()(x), torch.relu(x))
    assert Bottleneck(32, 32, stride=2)(torch.randn(1, 32, 8, 8)).shape == (1, 32, 4, 4)
    assert not Bottleneck(32, 32, residual=False).residual


def test_inverted_residual_parameters_shapes_and_shortcut():
    block = InvertedResidual(16, 24, expansion=6)       # hidden 96
    assert count_parameters(block) == (conv(16, 96, 1, False) + bn(96) + 9 * 96 + bn(96)
                                       + conv(96, 24, 1, False) + bn(24))
    assert not block.residual and block(torch.randn(2, 16, 7, 7)).shape == (2, 24, 7, 7)
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in list(block.branch)[-2:])   # linear bottleneck
    no_expand = InvertedResidual(16, 16, expansion=1)
    assert no_expand.residual and len([m for m in no_expand.modules() if isinstance(m, nn.Conv2d)]) == 2
    with torch.no_grad():
        no_expand.branch[-1].weight.zero_()
        no_expand.branch[-1].bias.zero_()
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(no_expand.eval()(x), x)
    assert InvertedResidual(16, 16, stride=2)(torch.randn(1, 16, 8, 8)).shape == (1, 16, 4, 4)


def test_small_cnn_parameter_counts_by_hand():
    # stem (stride 2): 28 -> 14; blocks at 14, 7 and 3 (after 2×2 poolings); global average pooling.
    stem = conv(1, 16, 3, False) + bn(16)
    head = linear(128, 10)
    pairs = [(16, 32), (32, 64), (64, 128)]
    standard = sum(conv(a, b, 3, False) + bn(b) for a, b in pairs)
    separable = sum(9 * a + bn(a) + a * b + bn(b) for a, b in pairs)
    bottleneck = sum(a * (b // 4) + bn(b // 4) + conv(b // 4, b // 4, 3, False) + bn(b // 4) + (b // 4) * b + bn(b)
                     for a, b in pairs)
    inverted = sum(a * 2 * a + bn(2 * a) + 9 * 2 * a + bn(2 * a) + 2 * a * b + bn(b) for a, b in pairs)
    expected = {"standard": standard, "separable": separable, "bottleneck": bottleneck, "inverted": inverted}
    for block in BLOCKS:
        model = SmallCNN(block, channels=(16, 32, 64, 128))
        assert count_parameters(model) == stem + expected[block] + head, block
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(SmallCNN("standard", channels=(16, 32, 64, 128))) == 98_682


def test_small_cnn_flops_of_separable_blocks():
    model = SmallCNN("separable", channels=(16, 32, 64, 128))
    flops = count_flops(model, torch.zeros(1, 1, 28, 28))
    blocks = sum(9 * a * d * d + a * b * d * d for (a, b), d in zip([(16, 32), (32, 64), (64, 128)], (14, 7, 3)))
    assert flops.total == 9 * 16 * 14 * 14 + blocks + 128 * 10


def test_small_cnn_width_multiplier_and_options():
    model = SmallCNN(channels=(16, 32), width=0.5, in_channels=3, num_classes=7, stem_stride=1, image_size=32)
    assert model.channels == (8, 16)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert SmallCNN(channels=(16, 32), width=0.01).channels == (1, 1)
    assert SmallCNN(channels=(8,))(torch.randn(1, 1, 28, 28)).shape == (1, 10)     # the stem alone


@pytest.mark.parametrize("make, message", [
    (lambda: SmallCNN("mobilenet"), "unknown block"),
    (lambda: SmallCNN(channels=()), "channels"),
    (lambda: SmallCNN(channels=(16, 0)), r"channels\[1\] must be an int >= 1; got 0"),
    (lambda: SmallCNN(channels=(16, True)), r"channels\[1\] must be an int"),
    (lambda: SmallCNN(width=0), "width"),
    (lambda: SmallCNN(channels=(8, 8, 8, 8, 8, 8), image_size=28), "too small"),
    (lambda: SmallCNN(stem_stride=0), "stem_stride"),
    (lambda: DepthwiseSeparableConv2d(16, 32, kernel_size=2), "odd"),
    (lambda: DepthwiseSeparableConv2d(0, 32), "in_channels"),
    (lambda: DepthwiseSeparableConv2d(16, 32, stride=0), "stride"),
    (lambda: DepthwiseSeparableConv2d(16, 32, bias=True), "bias"),
    (lambda: Bottleneck(16, 32, reduction=0), "reduction"),
    (lambda: InvertedResidual(16, 32, expansion=0), "expansion"),
    (lambda: InvertedResidual(16, 32, kernel_size=4), "odd"),
])
def test_efficient_blocks_reject_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: MLP(out_features=0), r"out_features must be an int >= 1; got 0"),
    (lambda: MLP(hidden=(300, 0)), r"hidden\[1\] must be an int >= 1"),
    (lambda: LeNet5(channels=(6, 0)), r"channels\[1\] must be an int >= 1"),
    (lambda: LeNet5(padding=-1), "padding must be an int >= 0"),
    (lambda: LeNet5(channels=(6, 16, 32)), r"channels must give the output channels of LeNet5's two convolutions, "
                                           r"e.g. \(6, 16\); got \(6, 16, 32\)"),
    (lambda: CifarResNet(depth=20.0), r"CifarResNet depth must be 6n \+ 2 \(20, 32, 44, 56, 110\), got 20.0"),
    (lambda: Conv4(hidden=0), "hidden must be an int >= 1"),
    (lambda: Conv4(image_size=28.0), "image_size must be an int >= 1; got 28.0"),
    (lambda: ConvNet(num_classes=0), "num_classes must be an int >= 1"),
    (lambda: VGG(in_channels=0), "in_channels must be an int >= 1"),
    (lambda: CifarResNet(width=0), "width must be an int >= 1"),
    (lambda: SmallCNN(in_channels=0), "in_channels must be an int >= 1"),
    (lambda: SmallCNN(num_classes=0), "num_classes must be an int >= 1"),
    (lambda: SmallCNN(image_size=30.5), "image_size must be an int >= 1"),
    (lambda: SmallCNN(width=float("inf")), "SmallCNN width multiplier must be a positive finite number"),
    (lambda: VGG(width=float("nan")), "VGG width multiplier must be a positive finite number"),
    (lambda: VGG(width=10**400), "VGG width multiplier must be a positive finite number"),     # beyond a float
])
def test_networks_reject_sizes_that_build_nothing(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_blocks_reject_inputs_with_the_wrong_channels():
    with pytest.raises(RuntimeError):
        DepthwiseSeparableConv2d(16, 32)(torch.randn(1, 8, 7, 7))
    with pytest.raises(RuntimeError):
        SmallCNN("separable")(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("model, good, bad", [
    (LeNet5(), (28, 28), (32, 32)),
    (LeNet5(in_channels=3, image_size=32, padding=0), (32, 32), (28, 28)),
    (Conv4(), (31, 31), (84, 84)),                    # 31 and 28 both leave one pixel after four poolings
    (ConvNet(4, image_size=32), (32, 33), (32, 28)),
])
def test_an_input_of_another_size_than_the_model_was_built_for_gets_a_clear_error(model, good, bad):
    channels = model.features[0].in_channels
    model(torch.zeros(2, channels, *good))
    with pytest.raises(ValueError, match=rf"built for \d+×\d+ inputs .*got {bad[0]}×{bad[1]}: build it with the "
                                         "image_size of your images"):
        model(torch.zeros(2, channels, *bad))


@pytest.mark.parametrize("model, channels, size",
                         [(LeNet5(), 1, 28), (ConvNet(2), 3, 32), (Conv4(3, image_size=84), 3, 84)])
def test_the_hint_for_flat_inputs_reshapes_them_to_the_models_channels(model, channels, size):
    """Following the hint gives the model the images back: a 3-channel model's hint said one channel, which turned a
    batch of 4 into 12 one-channel images and a second, more confusing error."""
    images = torch.randn(4, channels, size, size)
    with pytest.raises(ValueError, match=rf"x.view\(-1, {channels}, {size}, {size}\)"):
        model(images.flatten(1))
    assert model(images.flatten(1).view(-1, channels, size, size)).shape[0] == 4


def test_a_conv4_embedding_takes_any_size():
    assert Conv4(num_classes=None)(torch.zeros(2, 1, 84, 84)).shape == (2, 64 * 5 * 5)


def test_lenet5_layers_are_convolutions_relus_and_max_poolings():
    kinds = [type(m) for m in LeNet5().features]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    pools = [m for m in LeNet5().features if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 2 and p.stride == 2 for p in pools)


def test_conv4_batch_norms_have_pytorch_defaults():
    norms = [m for m in Conv4().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4
    assert all(n.momentum == 0.1 and n.eps == 1e-5 and n.affine and n.track_running_stats for n in norms)


def test_conv4_accepts_the_smallest_images_that_leave_one_pixel():
    assert Conv4()(torch.zeros(2, 1, 16, 16)).shape == (2, 5)          # 16 -> 8 -> 4 -> 2 -> 1, as 28 does


def test_vgg_has_four_max_poolings_and_a_2x2_last_map_at_every_depth():
    for depth in (11, 13, 16, 19):
        model = VGG(depth, width=0.125)
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4, depth
        assert model.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (2, 2), depth


def vgg_parameters(config):
    """Parameters of the CIFAR VGG by hand: 3×3 convolutions without bias, batch norms, one 512 → 10 layer."""
    total, c_in = 0, 3
    for c_out in config:
        total += conv(c_in, c_out, 3, False) + bn(c_out)
        c_in = c_out
    return total + linear(512, 10)


def test_vgg_13_16_19_parameter_counts_follow_table_1_of_the_paper():
    b = (64, 64, 128, 128, 256, 256, 512, 512, 512, 512)
    d = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    e = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
    assert count_parameters(VGG(13)) == vgg_parameters(b)
    assert count_parameters(VGG(16)) == vgg_parameters(d)
    assert count_parameters(VGG(19)) == vgg_parameters(e) == 20_035_018      # Frankle & Carbin: 20.0M


def test_width_multipliers_round_to_the_nearest_channel_count():
    convs = [m.out_channels for m in VGG(11, width=0.7).modules() if isinstance(m, nn.Conv2d)]
    assert convs == [45, 90, 179, 179, 358, 358, 358, 358]          # 44.8, 89.6, 179.2, 358.4
    assert SmallCNN(width=0.7).channels == (11, 22, 45, 90)          # 11.2, 22.4, 44.8, 89.6


def test_convnet_layers_and_conv4_conv6_parameter_counts():
    for depth in (2, 4, 6):
        model = ConvNet(depth)
        pair = [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d]
        assert [type(m) for m in model.features] == pair * (depth // 2)
        assert [type(m) for m in model.classifier][1:] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    conv4 = (conv(3, 64, 3) + conv(64, 64, 3) + conv(64, 128, 3) + conv(128, 128, 3)
             + linear(8 * 8 * 128, 256) + linear(256, 256) + linear(256, 10))
    conv6 = (conv(3, 64, 3) + conv(64, 64, 3) + conv(64, 128, 3) + conv(128, 128, 3) + conv(128, 256, 3)
             + conv(256, 256, 3) + linear(4 * 4 * 256, 256) + linear(256, 256) + linear(256, 10))
    assert count_parameters(ConvNet(4)) == conv4 == 2_425_930
    assert count_parameters(ConvNet(6)) == conv6 == 2_262_602


def test_a_residual_block_computes_relu_of_its_branch_plus_shortcut():
    torch.manual_seed(0)
    for block in (ResNet20().features[3].eval(), ResNet20().features[6].eval()):
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        torch.testing.assert_close(block(x), torch.relu(branch + block.shortcut(x)))


def test_resnet_convolutions_are_gaussian_and_the_linear_layer_keeps_the_default_init():
    torch.manual_seed(0)
    model = ResNet20()
    weight = model.features[10].conv1.weight                # 36,864 draws: a Gaussian reaches 4 std, a uniform 1.73
    assert weight.abs().max().item() > 3 * (2 / (64 * 9)) ** 0.5
    assert model.classifier[2].weight.abs().max().item() <= 64 ** -0.5            # uniform in ±1/√fan_in


def test_resnet_needs_at_least_one_block_per_stage():
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=2)


def test_a_negative_kernel_size_is_refused():
    with pytest.raises(ValueError, match="positive odd"):
        DepthwiseSeparableConv2d(16, 32, kernel_size=-1)


def test_efficient_blocks_use_the_papers_nonlinearities():
    block = DepthwiseSeparableConv2d(4, 8)
    assert type(block.relu1) is nn.ReLU and type(block.relu2) is nn.ReLU
    assert [type(m) for m in Bottleneck(16, 32).branch] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [
        nn.Conv2d, nn.BatchNorm2d]
    assert [type(m) for m in InvertedResidual(16, 24).branch] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6] * 2 + [
        nn.Conv2d, nn.BatchNorm2d]
    features = list(SmallCNN("inverted").features)
    after = [type(features[i + 1]) for i, m in enumerate(features[:-1]) if isinstance(m, InvertedResidual)]
    assert after == [nn.MaxPool2d, nn.MaxPool2d] and isinstance(features[-1], InvertedResidual)   # no ReLU after


def test_small_cnn_accepts_the_smallest_images_its_poolings_allow():
    # 3 -> stem (stride 2, padding 1) -> 2 -> block -> pooling -> 1 -> block
    model = SmallCNN(channels=(8, 8, 8), image_size=3)
    assert model(torch.zeros(2, 1, 3, 3)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        SmallCNN(channels=(8, 8, 8, 8), image_size=3)
