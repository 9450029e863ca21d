"""Sparse execution: turn a pruned or sparsely trained model into one that skips the zeros.

A masked layer computes ``(θ ⊙ m) x`` with a dense kernel: it does all the
arithmetic of the dense layer, so sparsity saves nothing at run time. For
inference, :func:`export` replaces each layer by one whose storage and kernel
match its sparsity:

* ``"csr"``: unstructured sparsity in compressed sparse row format
  (:class:`CSRLinear`, :class:`CSRConv2d`), multiplied by ``torch.sparse``
  kernels on CPU and CUDA. It pays off only at high sparsity: every stored weight
  costs an index read, and the memory accesses are irregular.
* ``"2:4"``: PyTorch's semi-structured sparse tensors
  (:func:`torch.sparse.to_sparse_semi_structured`), whose matrix products run on
  the sparse tensor cores of NVIDIA Ampere and later GPUs (cuSPARSELt/CUTLASS)
  in fp16/bf16. Elsewhere the layer stays dense and a warning says why.
* :func:`compact`: channel (neuron) pruning made physical: the removed units are
  cut out of the weight tensors, giving a smaller dense model.

Low-rank layers (:mod:`lowlearn.lowrank`) already run as two thin matrix
products; :func:`export` turns them into two plain ``nn.Linear`` (or a
convolution and a 1×1 convolution).

Every exported model is for inference: the sparse layers hold their weights as
buffers, every remaining parameter is frozen (``requires_grad=False``), and its
outputs equal the masked model's up to floating-point rounding (the sums run in
another order). Export a copy: the model given is not changed.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..lowrank.layers import LowRankLayer, LowRankLinear, integer_padding
from .mask import kept_fraction, squash

FORMATS = ("csr", "2:4", "dense")


class _CSRWeight(nn.Module):
    """A layer whose weight matrix is kept in CSR: three plain buffers, the sparse tensor built from them.

    The buffers (``crow_indices``, ``col_indices``, ``values``) are ordinary dense
    tensors, so the layer survives ``copy.deepcopy`` (torch cannot copy a sparse CSR
    tensor's storage), ``state_dict`` and ``.to()`` like any module; :attr:`weight`
    wraps them without copying.
    """

    def _store(self, matrix: Tensor, bias: Tensor | None) -> None:
        with warnings.catch_warnings():          # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = matrix.detach().to_sparse_csr()
        self.shape = tuple(matrix.shape)
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """The weight matrix as a sparse CSR tensor (the buffers came from ``to_sparse_csr``: no checks needed)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape,
                                       check_invariants=False)

    def count_macs(self, output: Tensor) -> int:
        """Multiply-accumulates that produced ``output``: one per stored weight and output position
        (:func:`lowlearn.cost.count_flops`)."""
        return self.values.numel() * (output.numel() // self.shape[0])


class CSRLinear(_CSRWeight):
    """``y = x Wᵀ + b`` with ``W`` stored in CSR: ``W @ xᵀ`` skips the zeros.

    Args:
        linear: the (squashed) dense layer; its zeros are dropped.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[:-1].numel(), self.in_features)     # also for an input width of 0
        out = (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


class CSRConv2d(_CSRWeight):
    """A convolution as a CSR matrix times the unfolded input (im2col).

    The ``(n, c·k_h·k_w)`` weight matrix multiplies the ``(c·k_h·k_w, B·L)`` patches
    of the input; grouped convolutions are not supported, nor padding that is not the
    same on both sides of a dimension (``"same"`` with an even kernel).

    Args:
        conv: the (squashed) dense convolution, ``groups == 1``, with zero padding given in
            pixels, ``"valid"`` or ``"same"``.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        reason = csr_unavailable(conv)
        if reason is not None:
            raise ValueError(reason)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, integer_padding(conv), conv.dilation
        self._store(conv.weight.flatten(1), conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:                               # one unbatched image, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        batch, _, height, width = x.shape
        out_h, out_w = (
            (size + 2 * pad - dil * (k - 1) - 1) // s + 1
            for size, pad, dil, k, s in zip((height, width), self.padding, self.dilation, self.kernel_size,
                                            self.stride))
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)    # (B, c·k·k, L)
        out = self.weight @ patches.transpose(0, 1).flatten(1)                               # (n, B·L)
        out = out.view(self.out_channels, batch, out_h * out_w).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, nnz={self.values.numel()}")


def csr_unavailable(layer: nn.Linear | nn.Conv2d) -> str | None:
    """Why :class:`CSRLinear` or :class:`CSRConv2d` cannot take a layer, or ``None`` if it can."""
    if layer.weight.dtype in (torch.float16, torch.bfloat16) and layer.weight.device.type == "cpu":
        return (f"torch's CSR matrix product has no {layer.weight.dtype} kernel on the CPU; export a float32 copy "
                "(model.float())")
    if not isinstance(layer, nn.Conv2d):
        return None
    if layer.groups != 1 or layer.padding_mode != "zeros":
        return ("CSRConv2d supports convolutions with groups=1 and zero padding; got "
                f"groups={layer.groups}, padding_mode={layer.padding_mode!r}")
    try:
        integer_padding(layer)                      # "same" or "valid" as pixels, if it can be
    except ValueError as error:
        return f"CSRConv2d pads both sides alike: {error}"
    return None


class SemiStructuredLinear(nn.Module):
    """``y = x Wᵀ + b`` with a 2:4-sparse ``W`` on the GPU's sparse tensor cores.

    Args:
        linear: the (squashed) layer, CUDA, fp16 or bf16, with a 2:4 pattern along
            its input dimension (:func:`lowlearn.sparse.structured.prune_nm`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.register_buffer("weight", torch.sparse.to_sparse_semi_structured(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        # torch's 2:4 linear (reached as such under inference_mode) folds the leading dimensions with view, which a
        # non-contiguous input (a transposed batch of sequences) does not allow
        return F.linear(x.contiguous(), self.weight, self.bias)

    def count_macs(self, output: Tensor) -> int:
        """Multiply-accumulates that produced ``output``: half the dense layer's (two of every four weights)."""
        return output.numel() * self.in_features // 2


def semi_structured_unavailable(layer: nn.Linear) -> str | None:
    """Why a layer cannot run on 2:4 sparse kernels here, or ``None`` if it can."""
    weight = layer.weight
    if weight.device.type != "cuda":
        return f"2:4 sparse kernels need a CUDA device; the layer is on {weight.device.type}"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "2:4 sparse kernels need an NVIDIA GPU of compute capability 8.0 (Ampere) or later"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse kernels need fp16 or bf16 weights; convert the model with .half() (got {weight.dtype})"
    if weight.shape[1] % 4 or bool((weight.detach().reshape(weight.shape[0], -1, 4).ne(0).sum(-1) > 2).any()):
        return "the weight is not 2:4 sparse along its input dimension; prune it with prune_nm(model, 2, 4) first"
    return None


def _low_rank_factors(layer: LowRankLayer) -> nn.Sequential:
    """``x ↦ (U S)(Vᵀ x)``: a low-rank layer as two plain thin layers (the bias on the second)."""
    us, v = (layer.U @ layer.S).detach(), layer.V.detach()           # (n, r), (m, r)
    (n, m), rank, bias = layer.dense_shape, v.shape[1], layer.bias is not None
    where = {"device": us.device, "dtype": us.dtype}         # built there: float64 factors stay float64
    if isinstance(layer, LowRankLinear):
        first, second = nn.Linear(m, rank, bias=False, **where), nn.Linear(rank, n, bias=bias, **where)
        first_weight, second_weight = v.T, us
    else:
        c, kh, kw = layer.kernel
        first = nn.Conv2d(c, rank, (kh, kw), bias=False, **layer.conv, **where)
        second = nn.Conv2d(rank, n, 1, bias=bias, **where)
        first_weight, second_weight = v.T.reshape(rank, c, kh, kw), us[:, :, None, None]
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if bias:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def export(model: nn.Module, format: str = "csr", *, min_sparsity: float = 0.0) -> nn.Module:
    """An inference copy of ``model`` whose sparse layers run on sparse kernels.

    Masks are squashed first (:func:`lowlearn.sparse.mask.squash`), so every zero
    of a weight counts, whether a mask or training put it there.

    Args:
        model: a trained model with masked (or simply sparse) Linear/Conv2d layers,
            and possibly low-rank layers; not changed.
        format: ``"csr"``: Linear and Conv2d layers to :class:`CSRLinear` /
            :class:`CSRConv2d`; ``"2:4"``: Linear layers to
            :class:`SemiStructuredLinear` where the GPU supports it; ``"dense"``: masks
            squashed only. A layer the format cannot take (a grouped convolution for
            CSR, a convolution or a shape torch's 2:4 kernels refuse, a subclass of
            ``nn.Linear`` or ``nn.Conv2d`` with its own ``forward``) stays dense, and a
            warning names it and says why. Low-rank layers become two thin layers in every format.
        min_sparsity: convert only layers with at least this fraction of zeros
            (CSR is slower than dense for mostly dense weights); others stay dense.

    Returns:
        The new model, in evaluation mode.

    Raises:
        ValueError: an unknown ``format``, or a ``min_sparsity`` outside [0, 1].
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be in [0, 1]; got {min_sparsity}")
    exported = squash(copy.deepcopy(model))
    fused = {name: type(module).__name__ for name, module in exported.named_modules() if isinstance(module, _FUSED)}
    replacements = {}                                  # a module used at several places stays shared
    for name, layer in list(exported.named_modules(remove_duplicate=False)):
        if id(layer) not in replacements:
            inside = next((kind for prefix, kind in fused.items()          # "" (the model itself) holds all
                           if prefix == "" or name.startswith(prefix + ".")), None)
            replacements[id(layer)] = _exported_layer(name, layer, format, min_sparsity, inside)
        replacement = replacements[id(layer)]
        if replacement is None:
            continue
        if not name:                                   # the model is itself one layer
            exported = replacement
            break
        exported.set_submodule(name, replacement)
    for param in exported.parameters():
        param.requires_grad_(False)
    return exported.eval()


_FUSED = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
"""Modules that pass their layers' weights to fused kernels instead of calling the layers (a
``TransformerDecoderLayer`` has no fused path: it calls its feed-forward layers, and only the
``MultiheadAttention`` modules in it keep their output projections)."""


def _exported_layer(name: str, layer: nn.Module, format: str, min_sparsity: float,
                    inside: str | None = None) -> nn.Module | None:
    """The replacement of one layer (part of a module of the class ``inside``, one of ``_FUSED``), or ``None``."""
    if isinstance(layer, LowRankLayer):
        return _low_rank_factors(layer)
    if format == "dense" or not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return None
    sparsity = 1 - kept_fraction(layer.weight.count_nonzero().item(), layer.weight.numel())
    if sparsity < min_sparsity:
        return None
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    if inside is not None:
        reason = f"it is part of a {inside}, which passes its weights to fused attention kernels"
    elif type(layer).forward is not base.forward:
        reason = (f"it is a {parametrize.type_before_parametrizations(layer).__name__}, whose own forward a sparse "
                  f"layer would not reproduce (it computes nn.{base.__name__}'s)")
    elif format == "csr":
        reason = csr_unavailable(layer)
        if reason is None:
            return CSRLinear(layer) if isinstance(layer, nn.Linear) else CSRConv2d(layer)
    elif isinstance(layer, nn.Linear):
        reason = semi_structured_unavailable(layer)
        if reason is None:
            try:
                return SemiStructuredLinear(layer)
            except (RuntimeError, ValueError) as error:   # e.g. a shape the sparse kernels do not tile
                reason = f"torch's 2:4 kernels refuse it: {error}"
    else:
        reason = "torch's 2:4 kernels take nn.Linear layers only (export it as 'csr')"
    warnings.warn(f"layer {name!r} stays dense: {reason}", stacklevel=3)
    return None


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Mish, nn.SELU, nn.CELU, nn.Softplus, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d)
_UNCHANGED = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.modules.dropout._DropoutNd)
"""Layers that pass a constant channel on unchanged: pooling, and dropout of every kind (in evaluation mode)."""


def is_chain(module: nn.Module) -> bool:
    """Whether ``module`` applies its children one after another: an ``nn.Sequential`` with Sequential's ``forward``.

    A subclass with its own ``forward`` (a residual block, say) may combine its
    children otherwise, so it is not one.
    """
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def check_chain(model: nn.Module, user: str) -> None:
    """Raise a ValueError that names ``user`` (``"compact"``) unless ``model`` is a chain (:func:`is_chain`)."""
    if not is_chain(model):
        own = ", whose own forward may not apply its layers in order" if isinstance(model, nn.Sequential) else ""
        raise ValueError(f"{user} needs an nn.Sequential (a chain of layers); got {type(model).__name__}{own}")


def chain(module: nn.Module) -> list[nn.Module]:
    """The layers of nested chains (:func:`is_chain`) in the order they apply them; any other module is one layer."""
    if not is_chain(module):
        return [module]
    return [leaf for child in module for leaf in chain(child)]


def compact(model: nn.Sequential) -> nn.Sequential:
    """A smaller dense copy of a channel- or neuron-pruned ``nn.Sequential``: removed units are cut out.

    A unit (a row of a Linear weight, a filter of a Conv2d) whose weights are all
    zero is removed from its layer, from the batch norm that follows it, and from
    the input of the next Linear/Conv2d. Its output was the constant ``b`` (its
    bias, zero after :func:`lowlearn.sparse.structured.prune_channels`) passed
    through the layers in between (activations, batch norm in evaluation mode,
    pooling, flatten): a non-zero constant is folded into the next layer's bias,
    so the outputs do not change. The last Linear/Conv2d keeps all its outputs, and
    a layer whose units are all removed keeps one, so that it still runs.

    Args:
        model: an ``nn.Sequential`` (nested ones are read in order) of Linear,
            Conv2d, batch norm, activation, dropout, pooling and flatten layers,
            such as :class:`lowlearn.models.MLP`; not changed. A subclass with its own
            ``forward`` (a residual block) is a layer compact cannot see through.

    Returns:
        The compact copy, in evaluation mode, its parameters as trainable as the
        model's (to fine-tune it).

    Raises:
        ValueError: a grouped convolution, a Linear/Conv2d used at several places,
            another kind of layer between a layer with removed units and the next
            prunable one (a Flatten other than ``Flatten()`` too), a batch norm after a
            flatten of feature maps, or a non-zero constant feeding a padded convolution,
            passing a padded average pooling that counts the padding (either makes it
            position-dependent, so it cannot be folded exactly) or an average pooling
            with a ``divisor_override``.
    """
    check_chain(model, "compact")
    grouped = [layer for layer in chain(model) if isinstance(layer, nn.Conv2d) and layer.groups != 1]
    if grouped:
        raise ValueError(f"compact supports convolutions with groups=1 only; the model has {grouped[0]} (cutting "
                         "units out of a grouped convolution would move its channels into other groups)")
    compacted = squash(copy.deepcopy(model)).eval()                  # deepcopy keeps shared layers shared
    layers = chain(compacted)
    prunable = [i for i, layer in enumerate(layers) if isinstance(layer, (nn.Linear, nn.Conv2d))]
    if len({id(layers[i]) for i in prunable}) < len(prunable):
        raise ValueError("the model uses a Linear/Conv2d layer at several places; compact cannot cut units out of it "
                         "for one place without changing the others")
    for producer, consumer in zip(prunable, prunable[1:]):
        _cut_units(layers[producer], layers[producer + 1:consumer], layers[consumer])
    return compacted


def _cut_units(producer: nn.Module, between: list[nn.Module], consumer: nn.Module) -> None:
    """Remove the producer's all-zero units from it, the layers ``between`` and the consumer's input."""
    weight = producer.weight.detach()
    keep = weight.flatten(1).ne(0).any(dim=1)
    if bool(keep.all()):
        return
    if not bool(keep.any()):            # every unit removed: keep one (it outputs its constant), so the layer runs
        keep[0] = True
    constant = producer.bias.detach().clone() if producer.bias is not None else weight.new_zeros(weight.shape[0])
    spread = 1                                     # consumer inputs per unit (more after a flatten of feature maps)
    for layer in between:
        if isinstance(layer, nn.Flatten):
            if (layer.start_dim, layer.end_dim) != (1, -1):
                raise ValueError(f"compact supports Flatten() of all but the batch dimension only; the model has "
                                 f"{layer}")
            spread = consumer.weight.shape[1] // weight.shape[0]
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and spread > 1:
            raise ValueError(f"compact cannot cut removed channels out of a {type(layer).__name__} after a Flatten "
                             "of feature maps, which normalises every position of a channel separately")
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.running_mean is None:
            # Batch statistics: a channel that is constant over the batch normalises to 0, then shifts by β.
            constant = layer.bias.detach().clone() if layer.affine else torch.zeros_like(constant)
        elif isinstance(layer, _ELEMENTWISE):
            shape = (1, -1, 1, 1) if isinstance(layer, nn.BatchNorm2d) else (1, -1)
            constant = layer(constant.view(shape)).flatten()
        elif not isinstance(layer, _UNCHANGED):
            raise ValueError(f"compact cannot see through a {type(layer).__name__} between two prunable layers; "
                             "it supports activations, dropout, batch norm, pooling and flatten")
    removed = _flattened(~keep, producer, spread)
    folded = _flattened(constant, producer, spread) * removed
    with torch.no_grad():
        if bool(folded.ne(0).any()):
            if isinstance(consumer, nn.Conv2d) and consumer.padding not in ("valid", (0, 0)):
                raise ValueError("a removed channel feeds a non-zero constant into a padded convolution; "
                                 "compact cannot fold it exactly (mask the batch norm's shift, or keep the channel)")
            if any(isinstance(layer, nn.AvgPool2d) and layer.padding not in (0, (0, 0)) and layer.count_include_pad
                   for layer in between):
                raise ValueError("a removed channel's non-zero constant passes a padded AvgPool2d that averages the "
                                 "zero padding in (count_include_pad=True), so it is not constant near the border; "
                                 "compact cannot fold it exactly (use count_include_pad=False, or keep the channel)")
            if any(isinstance(layer, nn.AvgPool2d) and layer.divisor_override is not None for layer in between):
                raise ValueError("a removed channel's non-zero constant passes an AvgPool2d with a divisor_override, "
                                 "which divides the window's sum by another number than its size, so the constant "
                                 "changes; compact cannot fold it (keep the channel)")
            if consumer.bias is None:
                consumer.bias = nn.Parameter(consumer.weight.new_zeros(consumer.weight.shape[0]),
                                             requires_grad=consumer.weight.requires_grad)
            contribution = consumer.weight.flatten(2).sum(-1) if isinstance(consumer, nn.Conv2d) else consumer.weight
            consumer.bias += contribution @ folded
        _slice(producer, keep, dim=0)
        for layer in between:
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                _slice(layer, keep, dim=0)
        _slice(consumer, _flattened(keep, producer, spread), dim=1)


def _flattened(per_unit: Tensor, producer: nn.Module, spread: int) -> Tensor:
    """``per_unit`` (one entry per unit of ``producer``) at each of the ``spread`` places a Flatten puts each unit.

    A Conv2d's channel is the slowest dimension of its flattened output (``c·HW + p``); a
    Linear's unit, applied along the last dimension of a sequence, the fastest
    (``t·C + c``).
    """
    return per_unit.repeat(spread) if isinstance(producer, nn.Linear) else per_unit.repeat_interleave(spread)


def _slice(layer: nn.Module, keep: Tensor, dim: int) -> None:
    """Keep only the entries ``keep`` of the layer's tensors along ``dim`` (0: outputs, 1: inputs)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(layer, name, None)
        if tensor is None or (dim == 1 and name != "weight"):
            continue
        kept = tensor.detach().index_select(dim, keep.nonzero().squeeze(1)).clone()
        is_parameter = isinstance(tensor, nn.Parameter)
        setattr(layer, name, nn.Parameter(kept, requires_grad=tensor.requires_grad) if is_parameter else kept)
    count = int(keep.count_nonzero())
    if isinstance(layer, nn.Linear):
        if dim == 0:
            layer.out_features = count
        else:
            layer.in_features = count
    elif isinstance(layer, nn.Conv2d):
        if dim == 0:
            layer.out_channels = count
        else:
            layer.in_channels = count
    else:
        layer.num_features = count
