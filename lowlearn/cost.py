"""What a model costs: parameters, arithmetic and training memory.

* :func:`count_parameters`: how many numbers the model stores.
* :func:`count_flops` and :func:`training_flops`: how much arithmetic one example
  costs, for inference and for one training step.
* :func:`training_memory`: how many bytes one training step keeps alive, split
  into parameters, gradients, optimizer state, saved activations and buffers (a pruned
  model's masks).
* :func:`saved_tensor_bytes`: how many bytes autograd saves for the backward pass
  of any code run inside it (e.g. a MAML inner loop, whose graph grows with its steps).

All counts are of the dense model: a weight that a mask sets to zero still
counts. The sparse costs of a pruned model follow from these by the density of
each layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .checks import check_flag, is_integer
from .train import buffers_restored, eval_mode, tensors_in

_MIB = 2**20


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model``, each shared parameter counted once.

    Args:
        model: the model.
        trainable_only: count only parameters with ``requires_grad``.
    """
    trainable_only = check_flag("trainable_only", trainable_only)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class FlopCount:
    """Multiply-accumulate operations (MACs) of one forward pass, per example.

    Attributes:
        total: MACs of all counted layers.
        per_layer: MACs of each layer, keyed by its qualified module name (as in
            ``model.named_modules()``; ``""`` is the model itself).
    """

    total: int
    per_layer: dict[str, int]

    @property
    def macs(self) -> int:
        """Same as ``total``: the count is in multiply-accumulates."""
        return self.total

    def table(self) -> str:
        """The per-layer counts as a text table, with each layer's share of the total."""
        rows = [(name or "(model)", f"{macs:,}", f"{macs / max(self.total, 1):.1%}")
                for name, macs in self.per_layer.items()]
        rows.append(("total", f"{self.total:,}", "100.0%"))
        name_width = max(len("layer"), *(len(row[0]) for row in rows))
        macs_width = max(len("MACs"), *(len(row[1]) for row in rows))
        lines = [f"{'layer':<{name_width}}  {'MACs':>{macs_width}}   share"]
        lines += [f"{name:<{name_width}}  {macs:>{macs_width}}  {share:>6}"
                  for name, macs, share in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
COUNTED = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED, *_RECURRENT)
"""The layers :func:`count_flops` counts (besides ``nn.MultiheadAttention`` and those with a ``count_macs`` method)."""


def count_flops(model: nn.Module, example_input: torch.Tensor | PackedSequence | tuple[torch.Tensor, ...], *,
                batch_dim: int | tuple[int, ...] = 0) -> FlopCount:
    """Dense multiply-accumulates per example of every linear, convolutional, attention and recurrent layer.

    The layers are :data:`COUNTED` (``nn.Linear`` and ``nn.Bilinear``; 1-, 2- and 3-D
    convolutions, transposed too; ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and their cells) and
    ``nn.MultiheadAttention``. One multiply-accumulate (MAC),
    ``a += w * x``, counts as one operation. This is
    what He et al. (2016) report as "FLOPs (multiply-adds)" and what most pruning
    papers call FLOPs. Other papers count the multiply and the add separately,
    i.e. ``2 × MACs``: Evci et al. (2020), "Rigging the lottery: making all tickets
    winners" (RigL, ICML), counts this way (8.2e9 FLOPs for a dense ResNet-50), so
    double these numbers before comparing with its tables; ratios between models
    are the same in both conventions.

    A convolution costs ``output elements × (in_channels / groups) × kh × kw`` (in 1-D
    and 3-D the kernel's other sizes); a transposed convolution, which scatters each
    input element, ``input elements × (out_channels / groups) × kh × kw``; a linear
    layer ``out_features × in_features`` for every row it is applied to (one row per
    example for a ``(B, F)`` input, ``T`` rows for ``(B, T, F)``), a bilinear layer
    ``out_features × in1_features × in2_features`` per row.
    An ``nn.MultiheadAttention`` passes its weights to functional code, so it is
    counted as a whole, with ``E`` its width and ``S`` the keys each query attends to (a
    key added by ``add_bias_kv`` or ``add_zero_attn`` included): its out-projection,
    ``E²`` per query, under ``"<name>.out_proj"``; under its own name its in-projections
    (``E²`` per query, ``E · kdim`` per key, ``E · vdim`` per value) and the two products of
    attention, ``Q Kᵀ`` and its weights times ``V`` (``2 S E`` per query).
    A recurrent layer passes its weights to a fused kernel too, so it is counted as a
    whole: every weight matrix once per time step of every sequence, which with ``H``
    its ``hidden_size``, ``P`` its ``proj_size`` (``H`` without projection) and ``g`` its
    gates (1 for ``nn.RNN``, 4 for ``nn.LSTM``, 3 for ``nn.GRU``; the equations of
    torch's documentation of these layers) is ``g H (I + P)`` per step, direction
    and layer, ``I`` the layer's input size (``input_size`` for the first, ``P`` times the
    directions above it), plus ``H P`` for an LSTM's projection. Each row of its input
    is a step: ``T B`` for a batch of ``B`` sequences of length ``T`` (``batch_first`` or
    not), ``T`` for one unbatched sequence ``(T, I)`` that a model passes it (``example_input``
    itself must be a batch: one sequence ``x`` is ``x.unsqueeze(batch_dim)``), and the sum of
    the lengths for a ``PackedSequence``, whose padding is not computed; a cell
    (``nn.LSTMCell``, ...) counts ``g H (I + H)`` per row.
    Bias additions, normalization, activations, the elementwise products of the
    recurrent gates, softmax, pooling, lookups (``nn.Embedding``) and other functional
    operations outside these layers are not counted. A layer called twice is counted
    twice; one whose forward does not run (unused, or its owner passes its weight to
    functional code) is not counted, and a warning names it.
    A module with a method ``count_macs(output) -> int`` (the MACs of the batch that
    produced ``output``) is counted by it: the low-rank layers of
    :mod:`lowlearn.lowrank` count ``r(n + m) + r²`` per row (``LowRankLinear``) and
    ``r(n + m)`` per output position (``LowRankConv2d``, which mixes ``U S`` into one
    weight first).

    The count runs ``model`` once on ``example_input`` with forward hooks, in eval
    mode and without gradients, and divides by the batch size (``example_input``'s size
    along ``batch_dim``; for several inputs, the first one's). Afterwards the hooks
    are gone and every module is back in its own training or eval mode, even when
    the forward pass raises.

    Args:
        model: the model.
        example_input: a batch ``(B, ...)`` the model accepts, on the model's device, or a
            ``PackedSequence`` of ``B`` sequences (for a model that takes one, as ``nn.LSTM`` does);
            for a model of several inputs a tuple of them, each a batch of the same ``B`` examples
            along ``batch_dim``, and the model is called as ``model(*example_input)`` (e.g. a
            :class:`~lowlearn.meta.cnp.CNP`'s context inputs, context outputs and target inputs).
        batch_dim: the dimension of ``example_input`` (of each of its tensors) that holds the
            examples: 1 for a model that takes sequences first, ``(S, B, E)``, as ``nn.Transformer``
            and ``nn.MultiheadAttention`` do by default (``batch_first=False``); or a tuple, one
            dimension per input, e.g. ``(1, 0)`` for sequences first and their ``(B,)`` lengths.
            A ``PackedSequence`` holds its sequences whatever ``batch_dim`` says.

    Returns:
        The total and per-layer MACs of one example.

    Raises:
        TypeError: an ``example_input`` that is neither a tensor, a ``PackedSequence`` nor a tuple of them.
        ValueError: an ``example_input`` without a batch dimension, an empty batch, inputs
            whose batch sizes differ, or a tuple ``batch_dim`` without one integer per input.
    """
    # a PackedSequence is a (named) tuple too, but one input
    several = isinstance(example_input, tuple) and not isinstance(example_input, PackedSequence)
    inputs = example_input if several else (example_input,)
    batch_size = _batch_size(inputs, batch_dim)
    per_layer: dict[str, int] = {}

    def make_hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if hasattr(module, "count_macs"):
                macs = module.count_macs(output)
            elif isinstance(module, _RECURRENT):
                macs = _recurrent_macs(module, inputs[0])
            elif isinstance(module, _TRANSPOSED):
                # weight[0] holds what one input channel scatters to: out_channels / groups × kh × kw.
                macs = inputs[0].numel() * module.weight[0].numel()
            else:
                # weight[0] holds one output unit's inputs: in_features, in1_features × in2_features,
                # or in_channels / groups × kh × kw.
                macs = output.numel() * module.weight[0].numel()
            per_layer[name] = per_layer.get(name, 0) + macs
        return hook

    def attention_hook(name: str) -> Callable[[nn.MultiheadAttention, tuple, dict, object], None]:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: object) -> None:
            inputs = dict(zip(("query", "key", "value"), args)) | kwargs
            if not {"query", "key", "value"} <= inputs.keys():
                return                          # a subclass with a forward of its own: left to the warning below
            for part, macs in _attention_macs(module, inputs["query"], inputs["key"], inputs["value"]).items():
                part = _qualified(name, part)
                per_layer[part] = per_layer.get(part, 0) + macs
        return hook

    counted = {name: module for name, module in model.named_modules()
               if isinstance(module, COUNTED) or hasattr(module, "count_macs")}
    attentions = {name: module for name, module in model.named_modules()
                  if isinstance(module, nn.MultiheadAttention)}
    for name in attentions:
        counted.pop(_qualified(name, "out_proj"), None)             # counted with its attention
    handles = [module.register_forward_hook(make_hook(name)) for name, module in counted.items()]
    handles += [module.register_forward_hook(attention_hook(name), with_kwargs=True)
                for name, module in attentions.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name in (*counted, *attentions) if name not in per_layer]
    if unseen:
        warnings.warn(f"count_flops did not see the layers {unseen} run, so their MACs are not counted: they are "
                      "unused, or their owner passes their weights to functional code", stacklevel=2)
    per_example = {name: macs // batch_size for name, macs in per_layer.items()}
    return FlopCount(total=sum(per_example.values()), per_layer=per_example)


def _batch_size(inputs: tuple, batch_dim: int | tuple[int, ...]) -> int:
    """The number of examples in ``inputs``, the size of the first along its ``batch_dim``, which each must share
    along its own (``batch_dim``: one dimension for all inputs, or one per input; a ``PackedSequence`` holds
    its sequences).

    Raises:
        TypeError: an input that is neither a tensor nor a ``PackedSequence``.
        ValueError: a ``batch_dim`` tuple without one integer per input, a first input without
            a batch dimension (a single example of a linear layer, ``(F,)``), an empty batch,
            or an input of another batch size.
    """
    if not inputs or not all(isinstance(x, (torch.Tensor, PackedSequence)) for x in inputs):
        raise TypeError(f"example_input must be a tensor, a PackedSequence or a non-empty tuple of them (the model's "
                        f"inputs), got {', '.join(type(x).__name__ for x in inputs) or 'an empty tuple'}")
    dims = batch_dim if isinstance(batch_dim, tuple) else (batch_dim,) * len(inputs)
    if len(dims) != len(inputs) or not all(is_integer(d) for d in dims):
        raise ValueError(f"batch_dim must be one integer, or a tuple of one integer per input ({len(inputs)}), got "
                         f"{batch_dim!r}")
    first, dim = inputs[0], dims[0]
    batch_size = _examples(first, dim)
    if not batch_size or isinstance(first, torch.Tensor) and first.dim() < 2:
        raise ValueError(
            f"example_input must be a non-empty batch with a batch dimension (batch_dim={dim}; a single "
            f"example x is x.unsqueeze(0)), got shape {_shape(first)}"
        )
    if any(_examples(x, d) != batch_size for x, d in zip(inputs, dims)):
        raise ValueError(f"every input must hold the same {batch_size} examples along batch_dim={batch_dim} as the "
                         f"first, got shapes {[_shape(x) for x in inputs]}")
    return batch_size


def _examples(x: torch.Tensor | PackedSequence, dim: int) -> int | None:
    """How many examples ``x`` holds: a tensor its size along ``dim`` (``None`` without that dimension), a
    ``PackedSequence`` its sequences."""
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes[0])                # on the CPU whatever the data's device: no device sync
    return x.shape[dim] if -x.dim() <= dim < x.dim() else None


def _shape(x: torch.Tensor | PackedSequence) -> tuple[int, ...] | str:
    """``x``'s shape, for an error message."""
    return f"PackedSequence of {int(x.batch_sizes[0])} sequences" if isinstance(x, PackedSequence) else tuple(x.shape)


def _qualified(name: str, child: str) -> str:
    """The qualified name of ``child`` of the module ``name`` (``""`` is the model itself, or the module itself)."""
    return ".".join(filter(None, (name, child)))


def recurrent_weights(module: nn.RNNBase | nn.RNNCellBase) -> list[torch.Tensor]:
    """The weight matrices of a recurrent layer or cell, of every layer and direction, an LSTM's projection included
    (not the biases): :func:`count_flops` counts each once per time step."""
    if isinstance(module, nn.RNNCellBase):
        return [module.weight_ih, module.weight_hh]
    return [weight for layer in module.all_weights for weight in layer if weight.dim() == 2]


def _recurrent_macs(module: nn.RNNBase | nn.RNNCellBase, input: torch.Tensor | PackedSequence) -> int:
    """The MACs of one call of a recurrent layer or cell: each of its :func:`recurrent_weights` once per row of
    ``input``, a time step of one sequence."""
    steps = (input.data if isinstance(input, PackedSequence) else input).numel() // module.input_size
    return steps * sum(weight.numel() for weight in recurrent_weights(module))


def _attention_macs(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> dict[str, int]:
    """The MACs of one call of ``module`` (all sequences), by :func:`count_flops`' names relative to the module:
    ``""`` for the in-projections and attention's products, ``"out_proj"`` for the out-projection."""
    e = module.embed_dim
    queries, keys, values = query.numel() // e, key.numel() // module.kdim, value.numel() // module.vdim
    keys_per_query = key.shape[1 if module.batch_first and key.dim() == 3 else 0]
    keys_per_query += (module.bias_k is not None) + module.add_zero_attn
    in_projections = e * (queries * e + keys * module.kdim + values * module.vdim)
    return {"": in_projections + 2 * queries * keys_per_query * e, "out_proj": queries * e * e}


def training_flops(flop_count: FlopCount) -> int:
    """MACs of one training step per example: three times the forward pass.

    The backward pass of a linear or convolutional layer costs about twice its
    forward pass: one product like the forward for the gradient with respect to
    its input, one for the gradient with respect to its weights. This is the
    convention of Evci et al. (2020), "Rigging the lottery" (RigL, ICML), which
    takes a training step to cost ``3 ×`` the forward FLOPs (the first layer needs
    no input gradient, a saving this estimate ignores).

    Args:
        flop_count: the forward cost from :func:`count_flops`.

    Returns:
        ``3 * flop_count.total``, in the same unit (MACs per example).
    """
    return 3 * flop_count.total


@dataclass(frozen=True)
class MemoryReport:
    """Bytes that one training step keeps alive, from :func:`training_memory`.

    Attributes:
        parameters: all parameters of the model.
        gradients: one gradient per parameter with ``requires_grad``, same dtype.
        optimizer_state: every tensor in ``optimizer.state`` (e.g. SGD momentum,
            Adam's two moments and step counters), in the state of an optimizer
            that ``optimizer`` holds as ``.optimizer`` (e.g. DLRT's for dense parameters),
            and the working tensors that ``optimizer.scratch_tensors()`` names, if it
            has that method (kept from step to step, e.g. by
            :class:`~lowlearn.powerprop.PowerPropOptimizer`).
        activations: tensors saved during the forward pass for the backward pass
            (the input batch included, parameters and buffers excluded).
        buffers: the model's buffers: a pruned model's masks (each the size of its
            weight, two for a :class:`~lowlearn.sparse.mask.SplitMask`), batch norm's
            running statistics.
        cuda_peak: peak bytes allocated on the model's CUDA device during one
            forward and backward pass (everything on that device, not only this
            model, except the copies of the buffers that the measurement keeps to
            restore them), or ``None`` when not measured.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    buffers: int = 0
    cuda_peak: int | None = None

    @property
    def total(self) -> int:
        """Sum of parameters, gradients, optimizer state, activations and buffers."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.buffers

    def __str__(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations", self.activations),
            ("buffers", self.buffers),
            ("total", self.total),
        ]
        if self.cuda_peak is not None:
            rows.append(("measured CUDA peak", self.cuda_peak))
        return "\n".join(f"{name:<18} {size / _MIB:10.2f} MiB" for name, size in rows)


def training_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    measure_cuda: bool = False,
) -> MemoryReport:
    """Bytes of what a training step holds in memory: parameters, gradients, optimizer state, activations, buffers.

    Parameters, gradients and optimizer state are summed from the tensors' sizes.
    Activations are measured: one forward pass of ``loss_fn(model(inputs),
    targets)`` runs under :func:`torch.autograd.graph.saved_tensors_hooks`, which
    sees every tensor that autograd saves for the backward pass. Each storage is
    counted once (a ReLU output saved by the ReLU and by the next layer is one
    tensor), over the span of elements the saved tensors reach (a batch that is a
    slice of a larger dataset tensor counts as the batch, not the dataset), and
    not at all when it belongs to a parameter or buffer of the model, which
    already exists.

    The forward pass runs in the mode the model is in (call ``model.train()``
    first to measure training) and with gradients enabled. Nothing is changed:
    no ``.grad`` is written, the optimizer is not stepped, and buffers such as
    batch-norm running statistics get their values back. Dropout does draw from
    the random number generator.

    Not counted: temporaries freed during the pass, the autograd graph's own
    bookkeeping, tensors a custom ``autograd.Function`` keeps as plain attributes
    instead of through ``save_for_backward``, and the allocator's overhead. Use
    ``measure_cuda=True`` on a GPU for the real peak.

    Args:
        model: the model, with its parameters on one device.
        optimizer: the optimizer of the model; its state is read (Adam's moments
            exist only after its first step).
        batch: ``(inputs, targets)`` on the model's device.
        loss_fn: ``loss_fn(model(inputs), targets)`` is the scalar loss.
        measure_cuda: also measure ``MemoryReport.cuda_peak``: reset the
            device's peak statistics, run the forward pass and a backward pass
            with :func:`torch.autograd.grad` (so ``.grad`` stays untouched), and
            read ``torch.cuda.max_memory_allocated``, less the ``.grad`` tensors
            already there (a training step frees them or adds into them; it does
            not hold two sets). Needs a model on CUDA.

    Raises:
        ValueError: inputs on another device than the model, or ``measure_cuda`` for a
            model that is not on a CUDA device.
        TypeError: ``measure_cuda`` other than ``True`` or ``False``.
    """
    measure_cuda = check_flag("measure_cuda", measure_cuda)
    inputs, targets = batch
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    device = params[0].device if params else inputs.device
    if inputs.device != device:
        raise ValueError(f"the batch is on {inputs.device} and the model on {device}: move the batch to the model's "
                         "device first, e.g. tuple(t.to(device) for t in batch)")
    if measure_cuda and device.type != "cuda":
        raise ValueError(f"measure_cuda=True needs a model on a CUDA device, not on {device}")

    model_storages = {_storage_key(part) for t in (*params, *model.buffers()) for part in _strided_parts(t)}
    spans: dict[int, tuple[int, int]] = {}  # storage -> (first, last + 1) byte the saved views reach

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for part in _strided_parts(tensor):
            key = _storage_key(part)
            if key not in model_storages and part.numel() > 0:
                first = part.storage_offset()
                last = first + sum((size - 1) * stride for size, stride in zip(part.shape, part.stride()))
                start, end = first * part.element_size(), (last + 1) * part.element_size()
                old_start, old_end = spans.get(key, (start, end))
                spans[key] = (min(start, old_start), max(end, old_end))
        return tensor

    cuda_peak = None
    with buffers_restored(model), torch.enable_grad():
        if measure_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn(model(inputs), targets)
        if measure_cuda:
            torch.autograd.grad(loss, trainable, allow_unused=True)
            # less the copies of the buffers that buffers_restored keeps and the gradients of an earlier backward
            # pass, which a training step does not hold on top of its own (it frees or accumulates into them)
            held = [*model.buffers(), *(p.grad for p in trainable if p.grad is not None)]
            cuda_peak = torch.cuda.max_memory_allocated(device) - sum(t.nbytes for t in held)

    return MemoryReport(
        parameters=sum(p.nbytes for p in params),
        gradients=sum(p.nbytes for p in trainable),
        optimizer_state=_state_bytes(optimizer),
        activations=sum(end - start for start, end in spans.values()),
        buffers=sum(b.nbytes for b in model.buffers()),
        cuda_peak=cuda_peak,
    )


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (also inside lists and dicts), in the state of an
    optimizer it holds as ``.optimizer``, and of its ``scratch_tensors()``.

    (DLRT's optimizer of the dense parameters; :class:`~lowlearn.powerprop.PowerPropOptimizer`
    shows the state of the optimizer it wraps as its own, and keeps working tensors.) Each
    tensor counts once.
    """
    tensors = {}
    for holder in (optimizer, getattr(optimizer, "optimizer", None)):
        for state in getattr(holder, "state", {}).values():      # leaves: also tensors in lists (L-BFGS' history)
            tensors.update((id(tensor), tensor) for tensor in tensors_in(state))
        if hasattr(holder, "scratch_tensors"):
            tensors.update((id(tensor), tensor) for tensor in holder.scratch_tensors())
    return sum(value.nbytes for value in tensors.values())


class SavedTensors:
    """What :func:`saved_tensor_bytes` measures: bytes that autograd holds for backward passes.

    Attributes:
        bytes: bytes of the distinct storages saved inside the block that are still held
            by a graph now (a backward pass that frees its graph lowers it again).
        peak: the largest ``bytes`` seen so far.
        tensors: how many times a tensor whose storage is not excluded was saved (a
            storage saved twice counts twice).
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.peak = 0
        self.tensors = 0
        self._live: dict[int, int] = {}   # storage key (_storage_key) -> saved references still held

    @property
    def mib(self) -> float:
        """``peak`` in MiB."""
        return self.peak / _MIB

    def _hold(self, key: int, nbytes: int) -> None:
        self._live[key] = self._live.get(key, 0) + 1
        if self._live[key] == 1:
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._live[key] -= 1
        if not self._live[key]:
            del self._live[key]
            self.bytes -= nbytes

    def __repr__(self) -> str:
        return f"SavedTensors(bytes={self.bytes}, peak={self.peak}, tensors={self.tensors})"


def _storage_key(tensor: torch.Tensor) -> int:
    """What tells ``tensor``'s storage from every other live one, views of one storage alike.

    The storage object's own handle rather than its ``data_ptr()``: on the ``meta``
    device (shapes without data, a cheap way to size a large model) every storage's
    address is 0.
    """
    return tensor.untyped_storage()._cdata


def _strided_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The strided tensors that hold ``tensor``'s data: itself, or a sparse tensor's indices and values."""
    if tensor.layout == torch.strided:
        return (tensor,)
    if tensor.layout == torch.sparse_coo:
        return tensor._indices(), tensor._values()
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor.crow_indices(), tensor.col_indices(), tensor.values()
    return tensor.ccol_indices(), tensor.row_indices(), tensor.values()           # CSC, BSC


class _Held:
    """A saved tensor as autograd keeps it; tells the report when the graph lets it go."""

    __slots__ = ("tensor", "report", "storages")

    def __init__(self, tensor: torch.Tensor, report: SavedTensors, storages: list[tuple[int, int]]) -> None:
        # detached: a saved output would otherwise hold its own grad_fn, a cycle no collector frees (autograd
        # attaches the right grad_fn again when it unpacks the tensor)
        self.tensor, self.report, self.storages = tensor.detach(), report, storages    # (key, bytes) each
        report.tensors += bool(storages)
        for key, nbytes in storages:
            report._hold(key, nbytes)

    def __del__(self) -> None:
        for key, nbytes in self.storages:
            self.report._release(key, nbytes)


@contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Measure the bytes that autograd saves for backward passes of the code inside the block.

    Every tensor an operation saves for its backward pass goes through
    :func:`torch.autograd.graph.saved_tensors_hooks`. This context manager adds up
    the sizes of their storages, each storage once however often it is saved (a tensor
    saved by two operations, or two views of one tensor, count once; also on the
    ``meta`` device, where every storage's address is 0), and subtracts a storage
    again when no graph holds it any more (a backward pass without ``retain_graph``
    frees its graph; so does :func:`torch.autograd.grad` without ``create_graph``).
    ``peak`` is then the memory the graphs held at most: on any device, the memory
    that grows with the inner steps of second-order MAML (Finn et al. 2017), whose
    meta-gradient needs every inner step's graph and the graph of every inner
    gradient (``create_graph=True``).

    Whole storages are counted (a saved slice of a large tensor counts the large
    tensor, which the graph keeps alive). Not counted: tensors saved before the block,
    temporaries never saved, autograd's own bookkeeping, and the allocator's overhead;
    ``torch.cuda.max_memory_allocated`` gives the real peak on a GPU.

    Args:
        exclude: tensors whose storages are not counted, e.g. the model's parameters,
            its buffers (a pruned layer's product ``θ ⊙ m`` saves the mask ``m``) and the
            input batch, which exist anyway.

    Yields:
        A :class:`SavedTensors` whose ``bytes``, ``peak`` and ``tensors`` follow the
        graphs, also after the block (until they are freed).

    Example::

        with saved_tensor_bytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
            loss = model(x).square().sum()
        print(saved.mib, "MiB held for backward")
    """
    report = SavedTensors()
    excluded = {_storage_key(part) for t in exclude for part in _strided_parts(t)}

    def pack(tensor: torch.Tensor) -> _Held:
        return _Held(tensor, report, [(key, part.untyped_storage().nbytes()) for part in _strided_parts(tensor)
                                      if (key := _storage_key(part)) not in excluded])

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
        yield report
