"""The architectures of the course, each as its paper describes it.

Every model is an ordinary :class:`torch.nn.Module` built from ``nn.Linear``,
``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and pooling layers, so code that
prunes or factorizes weights finds them with ``isinstance`` over
``model.modules()``. Forward passes take a float batch ``(B, C, H, W)`` and return
logits ``(B, num_classes)``; :class:`MLP` also accepts flat ``(B, in_features)``.

* :class:`MLP` (LeNet-300-100) and :class:`LeNet5`: MNIST ``(B, 1, 28, 28)``;
  pruning, lottery tickets, low-rank training.
* :class:`Conv4`: Omniglot ``(B, 1, 28, 28)`` and mini-ImageNet
  ``(B, 3, 84, 84)``; few-shot learning (Matching Networks, MAML, ProtoNets).
* :class:`ConvNet` (Conv-2/4/6), :class:`VGG` and :class:`CifarResNet`
  (:class:`ResNet20`): CIFAR-10 ``(B, 3, 32, 32)``; lottery tickets and pruning at
  scale.

A convolution that feeds a batch norm has no bias here (``bias=False``): the batch
norm subtracts the per-channel mean, which cancels any bias, so the bias would be a
parameter that does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """Fully connected network; LeNet-300-100 by default.

    LeNet-300-100 is the MNIST multilayer perceptron of LeCun et al. (1998),
    "Gradient-based learning applied to document recognition", Proc. IEEE 86(11),
    the network pruned by Han et al. (2015), "Learning both weights and connections
    for efficient neural networks" (NeurIPS), and by Frankle & Carbin (2019), "The
    lottery ticket hypothesis" (ICLR). It has 266,610 parameters.

    The layers are, in order: ``nn.Flatten``, then ``nn.Linear`` and ``activation``
    alternately, ending with a ``nn.Linear`` (no activation on the logits). Index
    them like any ``nn.Sequential``: ``MLP()[1]`` is the first linear layer.

    Args:
        in_features: size of one flattened input (784 for 28×28 images).
        hidden: widths of the hidden layers; ``()`` gives logistic regression
            (a single linear layer).
        out_features: number of outputs (classes).
        activation: module class called with no arguments to make each
            nonlinearity.

    Shapes:
        input ``(B, *)`` with ``in_features`` elements per example, e.g.
        ``(B, 1, 28, 28)`` or ``(B, 784)``; output ``(B, out_features)``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (300, 100),
        out_features: int = 10,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        widths = (in_features, *hidden, out_features)
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(n_in, n_out), activation()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        super().__init__(*layers)


class LeNet5(nn.Module):
    """LeNet-5 convolutional network, with ReLU and max pooling.

    LeCun et al. (1998), "Gradient-based learning applied to document
    recognition", Proc. IEEE 86(11): two 5×5 convolutions, each followed by a
    nonlinearity and 2×2 subsampling, then fully connected layers. As in modern
    reimplementations, the nonlinearity is ReLU and subsampling is max pooling.
    The paper feeds 32×32 images to the first convolution; ``padding=2`` lets a
    28×28 MNIST digit take the same path (28→28→14→10→5, 16·5·5 = 400 features,
    then 120 → 84 → 10: 61,706 parameters).

    ``LeNet5(channels=(20, 50), hidden=(500,), padding=0)`` is the Caffe variant
    pruned by Han et al. (2015), "Learning both weights and connections for
    efficient neural networks" (NeurIPS), and trained in low rank by Schotthöfer
    et al. (2022), "Low-rank lottery tickets: finding efficient low-rank neural
    networks via matrix differential equations" (NeurIPS, DLRT). Its convolutions
    are unpadded: 28→24→12→8→4, 50·4·4 = 800 features, then 500 → 10: 431,080
    parameters.

    Attributes:
        features: the convolutions, ReLUs and poolings.
        classifier: an :class:`MLP` on the flattened features.

    Args:
        in_channels: channels of the input images.
        num_classes: number of outputs.
        channels: output channels of the two convolutions.
        hidden: widths of the hidden fully connected layers.
        image_size: height and width of the (square) input images.
        padding: zero padding of the first convolution (the second is unpadded).

    Shapes:
        input ``(B, in_channels, image_size, image_size)``; output
        ``(B, num_classes)``.

    Raises:
        ValueError: ``image_size`` is too small for two convolutions and poolings.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        image_size: int = 28,
        padding: int = 2,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        size = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        if size < 1:
            raise ValueError(
                f"image_size={image_size} with padding={padding} is too small for LeNet5: "
                "two 5×5 convolutions and 2×2 poolings leave no pixel"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = MLP(c2 * size * size, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn_relu(in_channels: int, out_channels: int, **bn_options: bool) -> list[nn.Module]:
    """3×3 convolution (padding 1, size-preserving), batch norm, ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels, **bn_options),
        nn.ReLU(),
    ]


class Conv4(nn.Module):
    """The four-block convolutional backbone of few-shot learning.

    Vinyals et al. (2016), "Matching networks for one shot learning" (NeurIPS);
    used unchanged by Finn et al. (2017), "Model-agnostic meta-learning for fast
    adaptation of deep networks" (ICML, MAML) and Snell et al. (2017),
    "Prototypical networks for few-shot learning" (NeurIPS). Four blocks of
    [3×3 convolution (padding 1) → BatchNorm2d → ReLU → 2×2 max pooling], then a
    linear classifier. Each block halves the image (rounding down): 28→14→7→3→1
    for Omniglot gives ``hidden`` = 64 features, 84→42→21→10→5 for mini-ImageNet
    gives 64·5·5 = 1600.

    ``running_stats=False`` builds ``BatchNorm2d(track_running_stats=False)``: the
    batch norms always normalize with the statistics of the current batch, in
    training and evaluation mode alike, and keep no running buffers. This is the
    transductive batch norm of MAML, where each task's query set is normalized
    by its own statistics.

    Attributes:
        features: the four convolutional blocks.
        head: ``nn.Linear(feature_dim, num_classes)``, or ``nn.Identity`` when
            ``num_classes`` is ``None``.
        feature_dim: number of features after flattening the last block.

    Args:
        in_channels: channels of the input images (1 for Omniglot, 3 for
            mini-ImageNet).
        num_classes: ways of the classifier; ``None`` leaves out the head, giving
            the embedding network of Prototypical Networks.
        hidden: channels of every convolution.
        image_size: height and width of the (square) input images.
        running_stats: whether the batch norms track running statistics.

    Shapes:
        input ``(B, in_channels, image_size, image_size)``; output
        ``(B, num_classes)``, or ``(B, feature_dim)`` when ``num_classes`` is
        ``None``.

    Raises:
        ValueError: ``image_size`` is below 16, so four poolings leave no pixel.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int | None = 5,
        hidden: int = 64,
        image_size: int = 28,
        running_stats: bool = True,
    ) -> None:
        super().__init__()
        size = image_size // 16
        if size < 1:
            raise ValueError(
                f"image_size={image_size} is too small for Conv4: four 2×2 poolings "
                "need at least 16×16 images"
            )
        blocks: list[nn.Module] = []
        for block_in in (in_channels, hidden, hidden, hidden):
            blocks += _conv_bn_relu(block_in, hidden, track_running_stats=running_stats)
            blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.feature_dim = hidden * size * size
        self.head = (
            nn.Identity() if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


# Output channels of the 3×3 convolutions, "M" for a 2×2 max pooling
# (Simonyan & Zisserman 2015, Table 1, configurations A, B, D and E).
_VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG for CIFAR-10, with batch norm and a single linear classifier.

    Simonyan & Zisserman (2015), "Very deep convolutional networks for large-scale
    image recognition" (ICLR): stacks of 3×3 convolutions separated by 2×2 max
    poolings, ``depth`` counting the weight layers of the ImageNet network. The
    CIFAR-10 variant of the pruning literature (e.g. VGG-19 in Frankle & Carbin
    2019, "The lottery ticket hypothesis", ICLR) adds batch norm after
    every convolution and replaces the three large fully connected layers by a
    single linear layer, so VGG-11 has 8 convolutions and 1 linear layer
    (9,228,362 parameters at ``width=1``).

    Five poolings take a 32×32 image to 1×1; a global average pooling then
    flattens it. At 32×32 this is the same as flattening, and it lets larger
    images through unchanged.

    Attributes:
        features: the convolution, batch norm, ReLU and pooling layers.
        classifier: global average pooling, flattening and ``nn.Linear``.

    Args:
        depth: 11, 13, 16 or 19 (configurations A, B, D, E of the paper).
        num_classes: number of outputs.
        width: multiplier of every convolution's channels (each rounded, at
            least 1).
        in_channels: channels of the input images.

    Shapes:
        input ``(B, in_channels, H, W)`` with ``H, W >= 32``; output
        ``(B, num_classes)``.

    Raises:
        ValueError: unknown ``depth`` or non-positive ``width``.
    """

    def __init__(
        self, depth: int = 11, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth not in _VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(_VGG_CONFIGS)}, got {depth}")
        if width <= 0:
            raise ValueError(f"VGG width must be positive, got {width}")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_channels = max(1, round(item * width))
                layers += _conv_bn_relu(channels, out_channels)
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """Conv-2, Conv-4 and Conv-6: the CIFAR-10 networks of the lottery-ticket paper.

    Frankle & Carbin (2019), "The lottery ticket hypothesis: finding sparse,
    trainable neural networks" (ICLR), Figure 2, scaled-down VGG networks: pairs of
    3×3 convolutions (padding 1, ReLU) with 64, 128 and 256 channels, each pair
    followed by 2×2 max pooling, then fully connected layers 256 → 256 → 10 with
    ReLU. ``depth`` counts the convolutions (2, 4 or 6); there is no batch norm.
    Conv-2 has 4,301,642 parameters, Conv-4 2,425,930 and Conv-6 2,262,602 for
    32×32 inputs (the paper rounds to 4.3M, 2.4M and 1.7M; its Conv-6 figure
    appears to count differently).

    Attributes:
        features: the convolutions, ReLUs and poolings.
        classifier: an :class:`MLP` on the flattened features.

    Args:
        depth: 2, 4 or 6.
        num_classes: number of outputs.
        in_channels: channels of the input images.
        image_size: height and width of the (square) input images.

    Shapes:
        input ``(B, in_channels, image_size, image_size)``; output ``(B, num_classes)``.
    """

    def __init__(self, depth: int = 2, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if depth not in (2, 4, 6):
            raise ValueError(f"ConvNet depth must be 2, 4 or 6 (Conv-2/4/6), got {depth}")
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in (64, 128, 256)[: depth // 2]:
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out_channels
        size = image_size // 2 ** (depth // 2)
        self.features = nn.Sequential(*layers)
        self.classifier = MLP(channels * size * size, (256, 256), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut (He et al. 2016, option A).

    Subsamples the input with ``stride`` (keeping every ``stride``-th pixel) and
    appends ``extra_channels`` channels of zeros, so the identity path matches a
    residual branch that is smaller and wider.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity shortcut (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = _ZeroPadShortcut(stride, out_channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for CIFAR-10 with ``depth = 6n + 2`` layers.

    He et al. (2016), "Deep residual learning for image recognition" (CVPR),
    section 4.2: a 3×3 convolution with ``width`` channels, then three stages of
    ``n`` basic blocks (two 3×3 convolutions each) with ``width``, ``2·width`` and
    ``4·width`` channels, the first block of stages 2 and 3 halving the image
    (32→16→8), then global average pooling and a linear layer. Shortcuts are
    option A: identity, with stride-2 subsampling and zero channels appended where
    the shape changes, so they have no parameters. Depths 20, 32, 44, 56 and 110
    give the networks of the paper's Table 6 (0.27M to 1.7M parameters).

    Convolution weights are initialized as in the paper, with He et al. (2015),
    "Delving deep into rectifiers" (ICCV): normal with standard deviation
    ``sqrt(2 / fan_in)``. Batch norms start at weight 1, bias 0; the linear layer
    keeps PyTorch's default initialization.

    Attributes:
        features: the first convolution, batch norm, ReLU and the three stages.
        classifier: global average pooling, flattening and ``nn.Linear``.

    Args:
        depth: number of weight layers, ``6n + 2`` for ``n >= 1``.
        num_classes: number of outputs.
        width: channels of the first stage (16 in the paper).
        in_channels: channels of the input images.

    Shapes:
        input ``(B, in_channels, H, W)`` (``32×32`` for CIFAR-10); output
        ``(B, num_classes)``.

    Raises:
        ValueError: ``depth`` is not ``6n + 2`` or ``width`` is below 1.
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        if width < 1:
            raise ValueError(f"CifarResNet width must be at least 1, got {width}")
        blocks_per_stage = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage in range(3):
            out_channels = width * 2**stage
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNet20(CifarResNet):
    """ResNet-20 of He et al. (2016), section 4.2: :class:`CifarResNet` with depth 20.

    Three stages of three basic blocks, 16/32/64 channels, option-A shortcuts:
    269,722 parameters (the paper's "0.27M"), batch-norm weights and biases
    included.

    Args:
        num_classes, width, in_channels: as for :class:`CifarResNet`.

    Shapes:
        input ``(B, in_channels, 32, 32)``; output ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__(20, num_classes, width, in_channels)
