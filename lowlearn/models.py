"""The architectures of the course, each with its paper's layers.

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
* :class:`SmallCNN` with :class:`DepthwiseSeparableConv2d` (MobileNet),
  :class:`Bottleneck` (ResNet) or :class:`InvertedResidual` (MobileNetV2) blocks:
  MNIST ``(B, 1, 28, 28)``; hand-designed efficient architectures against learned
  sparsity.

A convolution that feeds a batch norm has no bias here (``bias=False``): the batch
norm subtracts the per-channel mean, which cancels any bias, so the bias would be a
parameter that does nothing.

The weights keep PyTorch's default initialisation (uniform in ``±1/√fan_in``) unless a
class says otherwise (:class:`CifarResNet`: Kaiming normal, as He et al.). The
papers often drew them differently: Frankle & Carbin's LeNet-300-100 and Conv-2/4/6,
for one, use Gaussian Glorot weights (in LeNet-300-100 about twice as large).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import as_float, check_count, check_flag, is_integer


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
        hidden = tuple(hidden)                     # read twice: a generator would be empty the second time
        _check_channels(in_features=in_features, out_features=out_features,
                        **{f"hidden[{i}]": width for i, width in enumerate(hidden)})
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

    ``LeNet5(channels=(20, 50), hidden=(500,), padding=0)`` has the layer sizes of
    Caffe's LeNet (which has no ReLU after its convolutions; this class keeps them),
    the network pruned by Han et al. (2015), "Learning both weights and connections for
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
        ValueError: ``channels`` that are not two counts, a size below 1, or an
            ``image_size`` too small for two convolutions and poolings.
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
        if len(channels) != 2:
            raise ValueError(f"channels must give the output channels of LeNet5's two convolutions, e.g. (6, 16); "
                             f"got {channels!r}")
        c1, c2 = channels
        hidden = tuple(hidden)
        _check_channels(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                        **{"channels[0]": c1, "channels[1]": c2},
                        **{f"hidden[{i}]": width for i, width in enumerate(hidden)})
        check_count("padding", padding, 0)
        self.image_size, self.padding = image_size, padding
        size = self._side(image_size)
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

    def _side(self, side: int) -> int:
        """The side of the last feature map for an input side: two 5×5 convolutions, each followed by a 2×2 pooling."""
        return ((side + 2 * self.padding - 4) // 2 - 4) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(self, x, self.image_size, self._side)
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
    used unchanged by Snell et al. (2017), "Prototypical networks for few-shot
    learning" (NeurIPS), and by Finn et al. (2017), "Model-agnostic meta-learning
    for fast adaptation of deep networks" (ICML, MAML), with two changes: strided
    convolutions instead of max pooling on Omniglot, and 32 channels on
    mini-ImageNet. Four blocks of
    [3×3 convolution (padding 1) → BatchNorm2d → ReLU → 2×2 max pooling], then a
    linear classifier. Each block halves the image (rounding down): 28→14→7→3→1
    for Omniglot gives ``hidden`` = 64 features, 84→42→21→10→5 for mini-ImageNet
    gives 64·5·5 = 1600.

    The blocks pool before the ReLU (``features`` holds convolution, batch norm,
    pooling, ReLU). The two orders compute the same values and gradients, bit for
    bit: a ReLU is monotone, so the largest of four ReLUs is the ReLU of the
    largest, and the gradient reaches the same element. Pooling first runs the ReLU
    and its backward pass on a quarter of the values; on a CPU these passes over the
    first block's activations take a large share of a meta-training step.

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
        TypeError: ``running_stats`` other than ``True`` or ``False``.
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
        _check_channels(in_channels=in_channels, hidden=hidden, image_size=image_size,
                        **({} if num_classes is None else {"num_classes": num_classes}))
        running_stats = check_flag("running_stats", running_stats)
        self.image_size = image_size
        size = image_size // 16
        if size < 1:
            raise ValueError(
                f"image_size={image_size} is too small for Conv4: four 2×2 poolings "
                "need at least 16×16 images"
            )
        blocks: list[nn.Module] = []
        for block_in in (in_channels, hidden, hidden, hidden):
            conv, norm, relu = _conv_bn_relu(block_in, hidden, track_running_stats=running_stats)
            blocks += [conv, norm, nn.MaxPool2d(2), relu]
        self.features = nn.Sequential(*blocks)
        self.feature_dim = hidden * size * size
        self.head = (
            nn.Identity() if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.head, nn.Identity):            # an embedding (no head) takes any size
            _check_input_size(self, x, self.image_size, lambda side: side // 16)
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

    Four 2×2 max poolings take a 32×32 image to 2×2, and the fifth pooling
    averages what is left, as in the CIFAR-10 VGG of Frankle & Carbin ("4×512,
    avg-pool") and of open_lth: here a global average pooling, the same at 32×32,
    which lets larger images through too.

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
        input ``(B, in_channels, H, W)`` with ``H, W >= 16`` (four 2×2 max-poolings come
        before the global average; CIFAR-10's are 32); output ``(B, num_classes)``.

    Raises:
        ValueError: unknown ``depth`` or non-positive ``width``.
    """

    def __init__(
        self, depth: int = 11, num_classes: int = 10, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth not in _VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(_VGG_CONFIGS)}, got {depth}")
        _check_channels(num_classes=num_classes, in_channels=in_channels)
        _check_width(width, "VGG")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG_CONFIGS[depth][:-1]:          # the last pooling is the classifier's average
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

    Raises:
        ValueError: a ``depth`` other than 2, 4 or 6, or an ``image_size`` below
            ``2^(depth/2)``, so that the poolings leave no pixel.
    """

    def __init__(self, depth: int = 2, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if depth not in (2, 4, 6):
            raise ValueError(f"ConvNet depth must be 2, 4 or 6 (Conv-2/4/6), got {depth}")
        _check_channels(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        poolings = depth // 2
        if image_size < 2 ** poolings:
            raise ValueError(f"image_size={image_size} is too small for Conv-{depth}: {poolings} 2×2 poolings "
                             f"need images of at least {2 ** poolings}×{2 ** poolings} pixels")
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in (64, 128, 256)[:poolings]:
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = out_channels
        self.image_size, self.poolings = image_size, poolings
        size = image_size // 2 ** poolings
        self.features = nn.Sequential(*layers)
        self.classifier = MLP(channels * size * size, (256, 256), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(self, x, self.image_size, lambda side: side // 2 ** self.poolings)
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
        if not is_integer(depth) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        _check_channels(num_classes=num_classes, width=width, in_channels=in_channels)
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the convolutions' weights afresh, Kaiming-normal (the rest keep theirs).

        Called by the constructor, and by :func:`lowlearn.sparse.lottery.random_reinit`
        after each layer's own ``reset_parameters``, so that its fresh draw comes from
        the distribution of the network's initialisation.
        """
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


def _same_padding(kernel_size: int) -> int:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number (for 'same' padding), got {kernel_size}")
    return kernel_size // 2


def _check_input_size(model: nn.Module, x: torch.Tensor, image_size: int, side: Callable[[int], int]) -> None:
    """A clear error for an input whose height or width gives the classifier another number of features.

    ``side`` maps an input side to the side of the last feature map; inputs of any size
    that gives the same feature map as ``image_size`` pass.
    """
    if x.dim() != 4:
        channels = next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))
        fix = ("give a single image a batch dimension, x.unsqueeze(0)" if x.dim() == 3 else
               f"reshape flat ones, e.g. x.view(-1, {channels}, {image_size}, {image_size})")
        raise ValueError(f"{type(model).__name__} takes images (B, C, H, W), got inputs of shape {tuple(x.shape)}: "
                         f"{fix}")
    height, width = x.shape[-2:]
    if side(height) != side(image_size) or side(width) != side(image_size):
        raise ValueError(f"{type(model).__name__} was built for {image_size}×{image_size} inputs (image_size="
                         f"{image_size} sizes its classifier), got {height}×{width}: build it with the "
                         f"image_size of your images")


def _check_channels(**channels: int) -> None:
    for name, value in channels.items():
        check_count(name, value, 1)


def _check_width(width: float, model: str) -> None:
    if not 0 < as_float(width) < math.inf:                          # NaN compares False
        raise ValueError(f"the {model} width multiplier must be a positive finite number, got {width!r}")


class DepthwiseSeparableConv2d(nn.Sequential):
    """A k×k convolution factored into a depthwise and a pointwise convolution (MobileNet v1).

    Howard et al. (2017), "MobileNets: efficient convolutional neural networks for
    mobile vision applications" (arXiv:1704.04861), section 3.1: a standard
    convolution filters and combines channels in one step, at a cost of
    ``D_K² · M · N · D_F²`` multiply-adds (``M`` input and ``N`` output channels,
    ``D_K × D_K`` kernel, ``D_F × D_F`` output). The depthwise separable
    convolution splits the two:

    * **depthwise**: one ``D_K × D_K`` filter per input channel
      (``nn.Conv2d(M, M, D_K, groups=M)``), ``D_K² · M · D_F²`` multiply-adds;
    * **pointwise**: a 1×1 convolution that mixes the channels, ``M · N · D_F²``.

    Together they cost ``D_K² · M · D_F² + M · N · D_F²``, a fraction
    ``1/N + 1/D_K²`` of the standard convolution (eq. 5), and have
    ``D_K² · M + M · N`` weights instead of ``D_K² · M · N``.

    With ``norm=True`` (default) this is the MobileNet block of the paper's Figure 3:
    depthwise → BatchNorm2d → ReLU → pointwise → BatchNorm2d → ReLU, a drop-in
    replacement for "3×3 convolution → BatchNorm2d → ReLU". With ``norm=False`` it
    is the bare factorisation, depthwise → pointwise, a drop-in replacement for a
    single ``nn.Conv2d`` (with ``bias=True`` for one that has a bias); Chollet
    (2017), "Xception: deep learning with depthwise separable convolutions" (CVPR),
    found no nonlinearity between the two to work best. The depthwise convolution
    never has a bias: a batch norm would cancel it, and without one it would pass
    linearly through the pointwise convolution, which has a bias of its own.

    The layers are ``depthwise``, then (with ``norm``) ``bn1``, ``relu1``, then
    ``pointwise`` and (with ``norm``) ``bn2``, ``relu2``: attributes, and the order
    of the ``nn.Sequential``.

    Args:
        in_channels: ``M``.
        out_channels: ``N``.
        kernel_size: ``D_K``, odd; the padding is ``D_K // 2`` (the output has the
            input's size at stride 1).
        stride: stride of the depthwise convolution.
        norm: batch norms and ReLUs after each convolution (MobileNet), or none.
        bias: give the pointwise convolution a bias (only without ``norm``).

    Shapes:
        input ``(B, M, H, W)``; output ``(B, N, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Raises:
        ValueError: a channel count below 1, an even or non-positive kernel size,
            a stride below 1, or ``bias`` together with ``norm``.
        TypeError: ``norm`` or ``bias`` other than ``True`` or ``False``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 norm: bool = True, bias: bool = False) -> None:
        _check_channels(in_channels=in_channels, out_channels=out_channels, stride=stride)
        norm = check_flag("norm", norm)
        bias = check_flag("bias", bias)
        padding = _same_padding(kernel_size)
        if bias and norm:
            raise ValueError("bias=True needs norm=False: the batch norm after the pointwise convolution "
                             "would cancel the bias")
        layers: dict[str, nn.Module] = {
            "depthwise": nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=padding,
                                   groups=in_channels, bias=False)}
        if norm:
            layers |= {"bn1": nn.BatchNorm2d(in_channels), "relu1": nn.ReLU()}
        layers["pointwise"] = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        if norm:
            layers |= {"bn2": nn.BatchNorm2d(out_channels), "relu2": nn.ReLU()}
        super().__init__(OrderedDict(layers))


class Bottleneck(nn.Module):
    """The bottleneck block of deep ResNets: 1×1 reduce → k×k → 1×1 expand.

    He et al. (2016), "Deep residual learning for image recognition" (CVPR),
    section 4.1 and Figure 5 (right): a 1×1 convolution reduces the ``in_channels``
    to ``mid = out_channels // reduction`` channels (the paper: ``reduction`` 4), a
    k×k convolution works in that narrow space, and a 1×1 convolution expands to
    ``out_channels``. Each convolution is followed by a batch norm, the first two by
    a ReLU; the last ReLU comes after the shortcut is added. The expensive k×k
    convolution then costs ``k² · mid²`` weights per output position instead of
    ``k² · in_channels · out_channels``.

    The identity shortcut is added when it fits (``stride == 1`` and
    ``in_channels == out_channels``); a block that changes the shape has no shortcut
    here (He et al. use a 1×1 projection there, which this block leaves out to stay
    cheap; set ``residual=False`` to drop the shortcut everywhere).

    Attributes:
        branch: the three convolutions with their batch norms and the inner ReLUs.
        residual: whether the identity shortcut is added.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        reduction: ``out_channels / mid``; ``mid`` is at least 1.
        kernel_size: of the middle convolution, odd (padding ``k // 2``).
        stride: of the middle convolution.
        residual: add the identity shortcut where the shapes allow it.

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Raises:
        ValueError: a channel count, ``reduction`` or stride below 1, or a bad kernel size.
        TypeError: ``residual`` other than ``True`` or ``False``.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, kernel_size: int = 3,
                 stride: int = 1, residual: bool = True) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels, reduction=reduction, stride=stride)
        residual = check_flag("residual", residual)
        padding = _same_padding(kernel_size)
        mid = max(1, out_channels // reduction)
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.residual = residual and stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return F.relu(out + x if self.residual else out)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual with a linear bottleneck: 1×1 expand → depthwise k×k → 1×1 project.

    Sandler et al. (2018), "MobileNetV2: inverted residuals and linear bottlenecks"
    (CVPR), Table 1: a 1×1 convolution expands the ``in_channels`` by the factor
    ``t`` (``expansion``; the paper: 6), a depthwise k×k convolution filters in the
    wide space, and a 1×1 convolution projects to ``out_channels``, with a batch norm
    after each convolution and ReLU6 after the first two only: the projection is
    *linear*, because a ReLU in the narrow bottleneck destroys information (section
    3.2). The shortcut connects the narrow ends ("inverted" compared with
    :class:`Bottleneck`) and is added when ``stride == 1`` and
    ``in_channels == out_channels``, as in the paper. With ``expansion=1`` the
    expanding convolution is left out (the paper's first block).

    Attributes:
        branch: the convolutions, batch norms and ReLU6s.
        residual: whether the identity shortcut is added.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        expansion: ``t``, the width of the hidden layer in multiples of ``in_channels``.
        kernel_size: of the depthwise convolution, odd (padding ``k // 2``).
        stride: of the depthwise convolution.

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, out_channels, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Raises:
        ValueError: a channel count, ``expansion`` or stride below 1, or a bad kernel size.
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 6, kernel_size: int = 3,
                 stride: int = 1) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels, expansion=expansion, stride=stride)
        padding = _same_padding(kernel_size)
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel_size, stride=stride, padding=padding, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        ]
        self.branch = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return out + x if self.residual else out


BLOCKS = ("standard", "separable", "bottleneck", "inverted")
"""The block types of :class:`SmallCNN`."""


class SmallCNN(nn.Module):
    """A small convolutional network whose blocks are standard, depthwise separable or bottleneck convolutions.

    The network of the closing chapter's comparison of hand-designed efficient
    architectures with learned sparsity. A stem (3×3 convolution with stride
    ``stem_stride`` → BatchNorm2d → ReLU, ``channels[0]`` channels, standard in every
    variant, as the strided first layer of MobileNet v1 and v2 is), then one block for
    each further entry of ``channels``, the second and later ones after a 2×2 max
    pooling, then global average pooling and a linear classifier. The block is
    chosen by ``block``:

    * ``"standard"``: 3×3 convolution → BatchNorm2d → ReLU;
    * ``"separable"``: :class:`DepthwiseSeparableConv2d` (MobileNet v1, Howard et
      al. 2017);
    * ``"bottleneck"``: :class:`Bottleneck` (ResNet, He et al. 2016) with
      ``reduction``;
    * ``"inverted"``: :class:`InvertedResidual` (MobileNetV2, Sandler et al. 2018)
      with ``expansion``; as in MobileNetV2, no nonlinearity follows the block (its
      output is the linear bottleneck).

    A bottleneck or inverted residual block adds its identity shortcut only where its
    input and output channels agree. With channels that grow at every stage, as the
    defaults and the closing chapter's do, none does: those networks are stacks of the
    blocks' factorised branches, without residual connections.

    ``width`` is MobileNet's width multiplier ``α``: every channel count becomes
    ``max(1, round(α · c))``, which scales the parameters and multiply-adds by about
    ``α²``. With ``channels=(16, 32, 64, 128)``, the default stride 2 and 28×28
    MNIST digits, the three blocks run at 14×14, 7×7 and 3×3.

    Attributes:
        features: the stem, poolings and blocks.
        classifier: global average pooling, flattening and ``nn.Linear``.
        channels: the channel counts after the width multiplier.

    Args:
        block: one of :data:`BLOCKS`.
        channels: output channels of the stem and of each block.
        in_channels: channels of the input images.
        num_classes: number of outputs.
        width: the width multiplier ``α > 0``.
        expansion: ``t`` of the inverted residual blocks.
        reduction: channel reduction of the bottleneck blocks.
        stem_stride: stride of the stem convolution.
        image_size: height and width of the (square) input images.

    Shapes:
        input ``(B, in_channels, image_size, image_size)``; output ``(B, num_classes)``.

    Raises:
        ValueError: an unknown block, no channels or a channel count below 1, a
            width that is not a positive finite number, a stem stride or image size
            below 1, or images too small for the poolings.
    """

    def __init__(self, block: str = "standard", channels: Sequence[int] = (16, 32, 64, 128), in_channels: int = 1,
                 num_classes: int = 10, width: float = 1.0, expansion: int = 2, reduction: int = 4,
                 stem_stride: int = 2, image_size: int = 28) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {', '.join(BLOCKS)}")
        if len(channels) == 0:
            raise ValueError("channels must name at least one stage's width, got none")
        _check_channels(**{f"channels[{i}]": c for i, c in enumerate(channels)})
        _check_width(width, "SmallCNN")
        _check_channels(in_channels=in_channels, num_classes=num_classes, stem_stride=stem_stride,
                        image_size=image_size)
        size = (image_size - 1) // stem_stride + 1
        if size // 2 ** max(len(channels) - 2, 0) < 1:
            raise ValueError(f"image_size={image_size} is too small for a stem of stride {stem_stride} and "
                             f"{max(len(channels) - 2, 0)} 2×2 poolings")
        self.channels = tuple(max(1, round(c * width)) for c in channels)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, self.channels[0], 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(self.channels[0]), nn.ReLU()]
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            if block == "standard":
                layers += _conv_bn_relu(c_in, c_out)
            elif block == "separable":
                layers.append(DepthwiseSeparableConv2d(c_in, c_out))
            elif block == "bottleneck":
                layers.append(Bottleneck(c_in, c_out, reduction=reduction))
            else:
                layers.append(InvertedResidual(c_in, c_out, expansion=expansion))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(self.channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
