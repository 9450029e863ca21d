"""Low-rank layers: ``W = U S Vᵀ`` with orthonormal ``U`` and ``V``, never formed densely.

A dense layer stores ``W ∈ ℝ^{n×m}`` (``n`` outputs, ``m`` inputs): ``n·m`` numbers.
A rank-``r`` layer stores ``U ∈ ℝ^{n×r}``, ``S ∈ ℝ^{r×r}`` and ``V ∈ ℝ^{m×r}``:
``r(n + m) + r²`` numbers, and applies them one after the other,

    y = x Wᵀ + b = ((x V) Sᵀ) Uᵀ + b,

``r(n + m) + r²`` multiply-accumulates per example instead of ``n·m``. A
convolution's weight ``(n, c, k_h, k_w)`` is the matrix ``n × m`` with ``m = c·k_h·k_w``
(Schotthöfer et al. 2022, section 4): ``V`` holds ``r`` filters, applied as a
convolution with ``r`` output channels, and ``U S`` mixes them into ``n`` channels
like a 1×1 convolution.

:class:`LowRankLinear` and :class:`LowRankConv2d` hold ``U``, ``S`` and ``V`` as
parameters whose *shapes change* when the rank does; they are trained by the
dynamical low-rank integrator :class:`lowlearn.lowrank.dlrt.DLRT`, not by torch's
SGD or Adam: ``U.grad`` and ``V.grad`` are not ``∂L/∂U`` and ``∂L/∂V``. Their
backward pass gives, in one pass, the three gradients the integrator needs
(Schotthöfer et al. 2022, Algorithm 1):

* ``U.grad`` ← ``∇_K L = ∂L/∂W · V``, the gradient of the K-step (``K = U S``);
* ``V.grad`` ← ``∇_L L = (∂L/∂W)ᵀ · U``, the gradient of the L-step (``L = V Sᵀ``);
* ``S.grad`` ← ``∂L/∂S = Uᵀ · ∂L/∂W · V``,

each computed from the layer's input and output gradient without forming
``∂L/∂W``. (So ``U.grad`` and ``V.grad`` are *not* ``∂L/∂U`` and ``∂L/∂V``: give a torch
optimizer only :func:`dense_parameters`.) With ``keeps_signals`` on (rank-adaptive DLRT
turns it on), the layer also keeps that input and output gradient, from which
:meth:`LowRankLayer.galerkin_gradient` forms ``Ûᵀ (∂L/∂W) V̂`` in the new bases of the
S-step, and a copy of the ``∂L/∂S`` it gave ``S.grad`` (:class:`BackwardSignals`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..autograd import Function
from ..checks import check_flag, check_not_shared, check_untied, is_integer, is_real


def check_rank(rank: int, n: int, m: int, what: str = "rank") -> int:
    """Return ``rank`` if it is an integer in [1, min(n, m)], else raise a ValueError that says so."""
    if not is_integer(rank) or not 1 <= rank <= min(n, m):
        raise ValueError(f"{what} must be an integer from 1 to min(n, m) = {min(n, m)} for a {n}×{m} weight, "
                         f"got {rank!r}")
    return int(rank)


def check_tolerance(tol: float) -> float:
    """Return ``tol`` if it is a relative tolerance in [0, 1), else raise a ValueError that says so."""
    if not is_real(tol) or not 0.0 <= tol < 1.0:
        raise ValueError(f"the relative tolerance ϑ must be in [0, 1) (0 keeps every singular value), got {tol!r}")
    return float(tol)


def truncation_rank(singular_values: Tensor, tol: float) -> int:
    """The smallest ``r`` with ``‖σ_{r+1:}‖ ≤ ϑ ‖σ‖`` (at least 1).

    ``singular_values`` in decreasing order, as :func:`torch.linalg.svd` returns
    them; ``tol`` is the relative tolerance ``ϑ`` (Schotthöfer et al. 2022, Algorithm
    1, "truncation"). ``ϑ = 0`` keeps every singular value that is not exactly zero.
    Reads two numbers from the device, in one transfer.

    Raises:
        ValueError: no singular values, or ones that are not finite (on a GPU the SVD
            of a diverged matrix returns NaN instead of raising).
    """
    (rank,) = truncation_ranks([singular_values], tol)
    if rank is None:
        raise ValueError("the singular values are not finite: the matrix diverged")
    return rank


def truncation_ranks(spectra: Sequence[Tensor], tol: float) -> list[int | None]:
    """:func:`truncation_rank` of each of several spectra, read from the device in one transfer.

    What :class:`~lowlearn.lowrank.dlrt.DLRT` truncates every layer with: one transfer
    of the ranks per step, not one per layer. (On a GPU each layer's SVD waits for the
    device as well: ``torch.linalg.svd`` synchronises there.)

    Returns:
        The rank of each spectrum, ``None`` for one whose singular values are not finite
        (no spectra: an empty list, as when every low-rank layer is frozen).

    Raises:
        ValueError: a spectrum without singular values.
    """
    tol = check_tolerance(tol)
    if any(sigma.numel() == 0 for sigma in spectra):
        raise ValueError("no singular values to truncate")
    counts = []
    for sigma in spectra:
        # tail[r] = ‖σ_r, σ_{r+1}, ...‖ (0-based): the error of keeping the first r values.
        tail = sigma.detach().double().flip(0).square().cumsum(0).flip(0).sqrt()
        tail = torch.cat([tail, tail.new_zeros(1)])
        counts.append(torch.stack([tail[0], (tail > tol * tail[0]).sum().double()]))
    if not counts:
        return []
    return [max(1, int(kept)) if math.isfinite(norm) else None for norm, kept in torch.stack(counts).tolist()]


class BackwardSignals(list):
    """A low-rank layer's ``(input, output gradient)`` pairs, one per backward pass since its gradients were cleared.

    ``∂L/∂W`` is made of them (``Σ δᵀ x`` over the examples, for a linear layer), so
    :meth:`LowRankLayer.galerkin_gradient` forms ``Ûᵀ (∂L/∂W) V̂`` in any bases from them,
    without another pass through the network. A backward pass adds its pair only while
    ``keeping`` is on (:attr:`LowRankLayer.keeps_signals`), as it is when the pass runs,
    and adds the ``∂L/∂S`` it gave ``S.grad`` to :attr:`core_gradient` (a copy: what is done
    to ``S.grad`` afterwards does not reach it).
    A copy or a pickle of the layer starts with none, keeping as the original does: they
    belong to the batch in training, not to the layer.
    """

    keeping = False
    #: the sum of ``∂L/∂S`` over the kept passes, as their backward passes computed it (``None``: no pass kept one)
    core_gradient: Tensor | None = None

    def add(self, x: Tensor, delta: Tensor, core_gradient: Tensor | None) -> None:
        """Keep one backward pass's input ``x`` and output gradient ``delta`` (without copies or graphs), and the
        ``∂L/∂S`` it computed."""
        self.append((x.detach(), delta.detach()))
        if core_gradient is not None:
            kept = self.core_gradient
            self.core_gradient = core_gradient.detach().clone() if kept is None else kept + core_gradient.detach()

    def clear(self) -> None:
        super().clear()
        self.core_gradient = None

    def __deepcopy__(self, memo) -> BackwardSignals:
        replica = type(self)()
        replica.keeping = self.keeping
        return replica

    def __reduce__(self):
        return type(self), (), {"keeping": self.keeping}


def _factor_gradients_needed(ctx) -> tuple[bool, bool, bool]:
    """``(need ∇_K, need ∂L/∂S, need ∇_L)`` of a backward pass."""
    _, need_K, need_S, need_L = ctx.needs_input_grad[:4]
    return ctx.kl and need_K, need_S, ctx.kl and need_L


def _keep(ctx, x: Tensor, delta: Tensor, grad_S: Tensor | None, kl_computed: bool) -> None:
    """A backward pass that computed ``∇_K`` or ``∇_L`` (``kl_computed``) gives the layer's input, output gradient
    and ``∂L/∂S`` to ``ctx.sink`` if it is keeping them."""
    if kl_computed and ctx.sink.keeping:
        ctx.sink.add(x, delta, grad_S)


class _LowRankLinearFunction(Function):
    """``y = ((x V) Sᵀ) Uᵀ``; backward gives ``∂L/∂x`` and the integrator's ``∇_K``, ``∂L/∂S``, ``∇_L``.

    ``kl=False`` (the fixed-rank S-step pass, where ``S`` may be rectangular) skips ``∇_K``
    and ``∇_L``; a frozen factor gets no gradient, so a frozen layer's backward computes
    only ``∂L/∂x``. With ``∇_K`` and ``∇_L``, the input and ``δ`` go to ``sink`` if it is keeping them.
    """

    @staticmethod
    def forward(x: Tensor, U: Tensor, S: Tensor, V: Tensor, kl: bool, sink: BackwardSignals) -> Tensor:
        return (x @ V) @ S.T @ U.T

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, U, S, V, ctx.kl, ctx.sink = inputs
        ctx.save_for_backward(x, U, S, V)

    @staticmethod
    def backward(ctx, delta: Tensor):
        x, U, S, V = ctx.saved_tensors
        # In the factors' dtype: under autocast the input and δ may be bfloat16, the factors float32.
        rows_x = x.reshape(-1, x.shape[-1]).to(U.dtype)
        rows_d = delta.reshape(-1, delta.shape[-1]).to(U.dtype)
        need_K, need_S, need_L = _factor_gradients_needed(ctx)
        a = rows_x @ V if need_S or need_K else None     # x V        (B × r_v)
        c = rows_d @ U                                   # δ U        (B × r_u)
        grad_x = ((c @ S) @ V.T).view_as(x).to(x.dtype) if ctx.needs_input_grad[0] else None   # δ W = δ U S Vᵀ
        grad_S = c.T @ a if need_S else None             # ∂L/∂S = Uᵀ δᵀ x V
        grad_K = rows_d.T @ a if need_K else None        # ∇_K = δᵀ x V
        grad_L = rows_x.T @ c if need_L else None        # ∇_L = xᵀ δ U
        _keep(ctx, x, delta, grad_S, need_K or need_L)
        return grad_x, grad_K, grad_S, grad_L, None, None


def _filters(V: Tensor, kernel: tuple) -> Tensor:
    """The columns of ``V`` as ``r_v`` convolution filters ``(r_v, c, k_h, k_w)``."""
    return V.T.reshape(V.shape[1], *kernel)


class _LowRankConvFunction(Function):
    """The convolution ``V`` (``r_v`` filters), then the channel mixing ``U S``; backward as for the linear case."""

    @staticmethod
    def forward(x: Tensor, U: Tensor, S: Tensor, V: Tensor, kl: bool, sink: BackwardSignals, kernel: tuple,
                conv: dict):
        a = F.conv2d(x, _filters(V, kernel), **conv)                          # (B, r_v, H, W)
        return F.conv2d(a, (U @ S)[:, :, None, None]), a                      # U S as 1×1 filters: NCHW out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, U, S, V, ctx.kl, ctx.sink, ctx.kernel, ctx.conv = inputs
        ctx.save_for_backward(x, U, S, V, output[1])       # the r_v thin feature maps, not recomputed
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, delta: Tensor, _):
        x_in, U, S, V, a = ctx.saved_tensors
        need_K, need_S, need_L = _factor_gradients_needed(ctx)
        # In the factors' dtype: under autocast x, a and δ may be bfloat16, the factors float32.
        x, a, d = (t.to(U.dtype) for t in (x_in, a, delta))
        c = torch.einsum("bnhw,nr->brhw", d, U)                               # δ U
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.einsum("brhw,rs->bshw", c, S)
            grad_x = torch.nn.grad.conv2d_input(x.shape, _filters(V, ctx.kernel), grad_a, **ctx.conv).to(x_in.dtype)
        grad_S = torch.einsum("brhw,bshw->rs", c, a) if need_S else None
        grad_K = torch.einsum("bnhw,brhw->nr", d, a) if need_K else None
        grad_L = None
        if need_L:
            grad_L = torch.nn.grad.conv2d_weight(x, (U.shape[1], *ctx.kernel), c, **ctx.conv).reshape(U.shape[1], -1).T
        _keep(ctx, x_in, delta, grad_S, need_K or need_L)
        return grad_x, grad_K, grad_S, grad_L, None, None, None, None


def integer_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv.padding`` in pixels per side, ``"valid"`` and ``"same"`` too, for code that takes numbers only.

    The low-rank convolution's backward (``conv2d_input``, ``conv2d_weight``) and
    :class:`~lowlearn.sparse.export.CSRConv2d`'s ``F.unfold`` do.

    Raises:
        ValueError: ``padding="same"`` that would pad one side more than the other (an even
            effective kernel), which one padding per dimension cannot express.
    """
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding != "same":
        return conv.padding
    spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(span % 2 for span in spans):
        raise ValueError(f"padding='same' with kernel {conv.kernel_size} and dilation {conv.dilation} pads one side "
                         "more than the other; give the convolution integer padding")
    return tuple(span // 2 for span in spans)


class LowRankLayer(nn.Module):
    """What the low-rank layers share: the factors ``U``, ``S``, ``V``, their conversion and checkpoints.

    Use :class:`LowRankLinear` or :class:`LowRankConv2d`.
    """

    #: compute ``∇_K`` and ``∇_L`` in backward (fixed-rank DLRT turns it off for its S-step pass)
    kl_gradients = True

    def _init_from(self, weight: Tensor, bias: Tensor | None, rank: int | None, tol: float | None,
                   r_max: int | None) -> None:
        """The factors of the dense ``weight``'s truncated SVD and a copy of ``bias``, each trained where its
        dense tensor is (``requires_grad``)."""
        n, m = weight.shape[0], weight[0].numel()
        if (rank is None) == (tol is None):
            raise ValueError("give exactly one of rank= and tol= (a fixed rank, or a relative tolerance ϑ)")
        self.r_max = check_rank(r_max if r_max is not None else min(n, m), n, m, "r_max")
        U, sigma, Vh = torch.linalg.svd(weight.detach().reshape(n, m).double(), full_matrices=False)
        if rank is not None and check_rank(rank, n, m) > self.r_max:
            raise ValueError(f"rank {rank} is above r_max = {self.r_max}: give a rank of at most r_max")
        r = rank if rank is not None else min(truncation_rank(sigma, tol), self.r_max)   # ϑ's rank, capped
        dtype, trained = weight.dtype, weight.requires_grad           # a frozen weight gives frozen factors
        self.U = nn.Parameter(U[:, :r].to(dtype).contiguous(), requires_grad=trained)
        self.S = nn.Parameter(torch.diag(sigma[:r]).to(dtype), requires_grad=trained)
        self.V = nn.Parameter(Vh[:r].T.to(dtype).contiguous(), requires_grad=trained)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.signals = BackwardSignals()

    @property
    def keeps_signals(self) -> bool:
        """Whether a backward pass keeps its input and output gradient in ``signals``, read when it runs.

        Rank-adaptive DLRT turns it on from its ``zero_grad`` to its ``step``.
        """
        return self.signals.keeping

    @keeps_signals.setter
    def keeps_signals(self, keep: bool) -> None:
        self.signals.keeping = bool(keep)

    def _sink(self) -> BackwardSignals:
        """Where the backward pass of this forward pass keeps its signals, if :attr:`keeps_signals` is on then.

        The signals follow the factors' gradients: a forward pass finds them cleared
        when it finds ``U.grad`` cleared (``zero_grad``, or new factors after a DLRT
        step), and kept, to be added to, where the gradients are accumulating. (A
        backward pass by :func:`torch.autograd.grad`, which leaves ``.grad`` alone, is
        kept as well: nothing tells the two apart.)
        """
        if self.U.grad is None:
            self.signals.clear()
        return self.signals

    def galerkin_gradient(self) -> Tensor:
        """``Uᵀ (∂L/∂W) V`` in the current factors, from the backward passes kept in ``signals``.

        ``∂L/∂W`` is the gradient of the dense weight at the point where those passes
        ran; after DLRT's basis augmentation ``U`` and ``V`` are ``Û`` and ``V̂``, and the
        network is the same (``Û S̃ V̂ᵀ = U S Vᵀ``), so this is the S-step's ``∇_S L``
        without a second pass (Schotthöfer et al. 2022, Algorithm 1). It costs, per kept
        pass, the products of the input with ``V`` (for :class:`LowRankConv2d`, a
        convolution with ``V``'s filters) and of ``δ`` with ``U``, in bases of up to ``2r``
        columns, and no pass through the rest of the network.

        Raises:
            RuntimeError: no backward pass was kept (``keeps_signals`` off, or no
                backward through this layer since its gradients were cleared).
        """
        if not self.signals:
            raise RuntimeError("this low-rank layer kept no backward pass to form Uᵀ (∂L/∂W) V from: run forward "
                               "and backward with keeps_signals on (rank-adaptive DLRT turns it on)")
        # _core_gradient(x, δ), of each subclass: Uᵀ (∂L/∂W) V from one pass's input x and output gradient δ.
        return sum(self._core_gradient(x.to(self.U.dtype), delta.to(self.U.dtype)) for x, delta in self.signals)

    @property
    def rank(self) -> int:
        """The current rank (``S`` is ``rank × rank`` between training steps)."""
        return min(self.S.shape)

    @property
    def dense_shape(self) -> tuple[int, int]:
        """``(n, m)`` of the weight as a matrix."""
        return self.U.shape[0], self.V.shape[0]

    def matrix(self) -> Tensor:
        """``U S Vᵀ`` as a dense ``n × m`` matrix (for conversion and tests; training never forms it)."""
        return self.U @ self.S @ self.V.T

    def _filled(self, layer: nn.Linear | nn.Conv2d) -> nn.Linear | nn.Conv2d:
        """A new dense ``layer`` with weight ``U S Vᵀ`` and this bias, frozen where this layer is."""
        with torch.no_grad():
            layer.weight.copy_(self.matrix().reshape(layer.weight.shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        layer.weight.requires_grad_(any(factor.requires_grad for factor in (self.U, self.S, self.V)))
        if self.bias is not None:
            layer.bias.requires_grad_(self.bias.requires_grad)
        return layer

    def set_factors(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        """Replace the factors by new parameters (shapes may change; autograd caches a
        parameter's shape, so a shape change needs a new parameter, not new ``.data``).

        Each new parameter keeps its predecessor's dtype and ``requires_grad`` (a frozen
        layer stays frozen).
        """
        for name, value in (("U", U), ("S", S), ("V", V)):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(value.detach().to(old.dtype).contiguous(),
                                             requires_grad=old.requires_grad))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint may hold another rank: take its shapes before loading the values, if they are factors
        # of this layer's n × m weight; otherwise keep the factors, and the load reports the mismatch.
        shapes = {name: state_dict[prefix + name].shape for name in ("U", "S", "V") if prefix + name in state_dict}
        if len(shapes) == 3:
            (n, m), (U, S, V) = self.dense_shape, (shapes["U"], shapes["S"], shapes["V"])
            if len(U) != 2 or len(V) != 2 or (U[0], V[0]) != (n, m) or tuple(S) != (U[1], U[1]) or V[1] != U[1]:
                error_msgs.append(f"the factors U {tuple(U)}, S {tuple(S)}, V {tuple(V)} in the checkpoint are not "
                                  f"those of a {n}×{m} weight (U: (n, r), S: (r, r), V: (m, r)); it was saved from "
                                  "another layer")
            elif not 1 <= S[0] <= self.r_max:
                error_msgs.append(f"the checkpoint's rank {S[0]} is outside this layer's ranks 1 to r_max = "
                                  f"{self.r_max}")
            elif S[0] != self.rank:
                self.set_factors(*(self.U.new_empty(shapes[name]) for name in ("U", "S", "V")))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        n, m = self.dense_shape
        return f"{m} -> {n}, rank={self.rank}, r_max={self.r_max}, bias={self.bias is not None}"


class LowRankLinear(LowRankLayer):
    """``y = x (U S Vᵀ)ᵀ + b``: a linear layer of rank ``r``.

    Build it from a dense layer with :meth:`from_linear`, or from scratch (the
    truncated SVD of PyTorch's default initialisation of a ``nn.Linear``).

    Args:
        in_features: ``m``.
        out_features: ``n``.
        rank: the initial rank ``r`` (give this or ``tol``).
        tol: keep the singular values of the initial weight that the relative
            tolerance ``ϑ`` implies (see :func:`truncation_rank`).
        r_max: the largest rank the integrator may reach (default ``min(n, m)``).
        bias: learn an additive bias (a dense parameter).

    Raises:
        ValueError: a rank outside [1, min(n, m)] or above ``r_max``, ``ϑ`` outside
            [0, 1), or both or neither of ``rank`` and ``tol``.
        TypeError: ``bias`` other than ``True`` or ``False``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, *, tol: float | None = None,
                 r_max: int | None = None, bias: bool = True, _weight: Tensor | None = None,
                 _bias: Tensor | None = None):
        super().__init__()
        bias = check_flag("bias", bias)
        if _weight is None:
            dense = nn.Linear(in_features, out_features, bias=bias)
            _weight, _bias = dense.weight, dense.bias
        self._init_from(_weight, _bias if bias else None, rank, tol, r_max)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int | None = None, *, tol: float | None = None,
                    r_max: int | None = None) -> LowRankLinear:
        """The truncated SVD of ``layer``'s weight, at ``rank`` or at tolerance ``tol``; the bias is copied.

        A frozen weight (``requires_grad=False``) gives frozen factors, and a frozen bias stays frozen.

        Raises:
            TypeError: ``layer`` is not an ``nn.Linear`` (for an ``nn.Conv2d``, use :class:`LowRankConv2d`).
        """
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"from_linear converts an nn.Linear, got a {type(layer).__name__}"
                            + (": use LowRankConv2d(layer, ...)" if isinstance(layer, nn.Conv2d) else ""))
        return cls(layer.in_features, layer.out_features, rank, tol=tol, r_max=r_max, bias=layer.bias is not None,
                   _weight=layer.weight, _bias=layer.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``U S Vᵀ`` (and the same bias), frozen where this layer is."""
        n, m = self.dense_shape
        return self._filled(nn.Linear(m, n, bias=self.bias is not None, device=self.U.device, dtype=self.U.dtype))

    def count_macs(self, output: Tensor) -> int:
        """Multiply-accumulates that produced ``output``: ``r_v·m + r_u·r_v + n·r_u`` per output row.

        (``x V``, then ``Sᵀ``, then ``Uᵀ``.) Used by :func:`lowlearn.cost.count_flops`.
        """
        n, m = self.dense_shape
        r_u, r_v = self.S.shape
        positions = output.numel() // n
        return positions * (r_v * m + r_u * r_v + n * r_u)

    def forward(self, x: Tensor) -> Tensor:
        y = _LowRankLinearFunction.apply(x, self.U, self.S, self.V, self.kl_gradients, self._sink())
        return y if self.bias is None else y + self.bias

    def _core_gradient(self, x: Tensor, delta: Tensor) -> Tensor:
        rows_x, rows_d = x.reshape(-1, x.shape[-1]), delta.reshape(-1, delta.shape[-1])
        return (rows_d @ self.U).T @ (rows_x @ self.V)              # Uᵀ δᵀ x V


class LowRankConv2d(LowRankLayer):
    """A convolution of rank ``r``: ``r`` filters (``V``), then the 1×1 channel mixing ``U S``.

    Built from an ``nn.Conv2d`` (without groups) by :meth:`from_conv`; the weight
    ``(n, c, k_h, k_w)`` is the ``n × (c·k_h·k_w)`` matrix ``U S Vᵀ``.

    Args:
        conv: the dense convolution whose shape, stride, padding and dilation it takes.
        rank, tol, r_max: as for :class:`LowRankLinear`.

    Raises:
        ValueError: a grouped convolution, or bad rank arguments.
        TypeError: ``conv`` is not an ``nn.Conv2d`` (a transposed, 1-D or 3-D convolution, whose
            weight is another matrix and which computes another function).
    """

    def __init__(self, conv: nn.Conv2d, rank: int | None = None, *, tol: float | None = None,
                 r_max: int | None = None):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"LowRankConv2d is built from an nn.Conv2d, got a {type(conv).__name__}: its weight would "
                            "be taken for a Conv2d's, and the layer would compute another function")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only ungrouped convolutions with zero padding have a low-rank version here")
        self.kernel = (conv.in_channels, *conv.kernel_size)
        self.conv = {"stride": conv.stride, "padding": integer_padding(conv), "dilation": conv.dilation}
        self._init_from(conv.weight, conv.bias, rank, tol, r_max)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None, *, tol: float | None = None,
                  r_max: int | None = None) -> LowRankConv2d:
        """The truncated SVD of ``conv``'s weight as a matrix; the bias is copied (frozen as in
        :meth:`LowRankLinear.from_linear`)."""
        return cls(conv, rank, tol=tol, r_max=r_max)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with weight ``U S Vᵀ`` reshaped (and the same bias), frozen where this layer is."""
        c, kh, kw = self.kernel
        return self._filled(nn.Conv2d(c, self.U.shape[0], (kh, kw), bias=self.bias is not None,
                                      device=self.U.device, dtype=self.U.dtype, **self.conv))

    def count_macs(self, output: Tensor) -> int:
        """Multiply-accumulates that produced ``output``: ``r_v·m + n·r_v`` per output position.

        (The convolution with ``r_v`` filters of ``m = c·k_h·k_w`` weights, then the 1×1
        mixing by ``U S``, a product of the weights alone that is formed once per call and,
        like any computation on weights alone, not counted.) Used by :func:`lowlearn.cost.count_flops`.
        """
        n, m = self.dense_shape
        r_v = self.S.shape[1]
        return output.numel() // n * (r_v * m + n * r_v)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3                          # one image (C, H, W), as nn.Conv2d takes it
        y = _LowRankConvFunction.apply(x.unsqueeze(0) if unbatched else x, self.U, self.S, self.V,
                                       self.kl_gradients, self._sink(), self.kernel, self.conv)[0]
        y = y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def _core_gradient(self, x: Tensor, delta: Tensor) -> Tensor:
        a = F.conv2d(x, _filters(self.V, self.kernel), **self.conv)           # the V-filtered maps (B, r_v, H, W)
        return torch.einsum("bnhw,nr,bshw->rs", delta, self.U, a)           # Uᵀ δ · a, summed over positions


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLayer]:
    """``{qualified name: layer}`` of the model's low-rank layers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLayer)}


def integrator_factors(model: nn.Module) -> set[str]:
    """The names of the factors ``U`` and ``V`` of the model's low-rank layers: the parameters whose backward
    gradient is DLRT's ``∇_K`` or ``∇_L``, not their own ``∂L/∂U`` or ``∂L/∂V`` (``S``'s is ``∂L/∂S``)."""
    return {f"{name}.{factor}" for name, layer in low_rank_layers(model).items() for factor in ("U", "V")}


def refuse_integrator_factors(model: nn.Module, names: Iterable[str], fix: str) -> None:
    """Raise a ValueError, ending with ``fix``, if ``names`` include :func:`integrator_factors` of ``model``: a
    gradient method that takes their ``.grad`` or ``autograd.grad`` for ``∂L/∂U`` and ``∂L/∂V`` would be wrong."""
    if factors := sorted(integrator_factors(model).intersection(names)):
        raise ValueError(f"the parameters {factors} are factors U, V of low-rank layers, whose backward gives DLRT's "
                         f"gradients, not ∂L/∂U and ∂L/∂V: {fix}")


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a torch optimizer should train: all but the low-rank factors (biases included)."""
    factors = {id(p) for layer in low_rank_layers(model).values() for p in (layer.U, layer.S, layer.V)}
    return [p for p in model.parameters() if id(p) not in factors]


def _replace(model: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Put ``replacements[id(m)]`` at every place of ``model`` that holds a module ``m`` it names.

    A module used at several places (tied layers) is replaced at each, by the one
    replacement, so the places stay tied.
    """
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in replacements:
            model.set_submodule(name, replacements[id(module)])


def to_low_rank(model: nn.Module, layers: Iterable[str], rank: int | Mapping[str, int] | None = None, *,
                tol: float | None = None, r_max: int | None = None) -> nn.Module:
    """Replace the named ``nn.Linear``/``nn.Conv2d`` modules by their truncated SVDs, in place; return the model.

    A module the model uses at several places is replaced at each by one low-rank
    layer. The model is changed only once every named layer is converted.

    Args:
        model: the model.
        layers: qualified module names (e.g. ``["1", "3"]`` for the hidden layers of
            :class:`lowlearn.models.MLP`); keep the output layer dense, as
            Schotthöfer et al. (2022) do, by leaving it out.
        rank: one rank for every layer, or ``{name: rank}`` (each capped at the layer's
            ``min(n, m)``).
        tol, r_max: as for :class:`LowRankLinear` (``r_max`` is capped at each
            layer's ``min(n, m)``).

    Raises:
        KeyError: a name that is not an ``nn.Linear`` or ``nn.Conv2d`` module of the model
            (a subclass is refused too: its owner may read ``.weight``, which a
            low-rank layer does not have), or ``""``, the model itself; a ``rank``
            mapping without one of ``layers``, or with a name that is not in ``layers``.
        ValueError: ``layers`` is one string, not a list of names, or empty; a convolution without
            a low-rank version (grouped, or not zero-padded), two layers that share their
            weight, a layer whose weight another module of the model uses too (an embedding
            tied to an output layer), or bad rank arguments.
    """
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of layer names, not one string ({layers!r}): pass [{layers!r}]")
    modules, layers, new_layers = dict(model.named_modules()), list(layers), {}
    if not layers:
        raise ValueError("no layers to convert: layers is empty; name the nn.Linear/nn.Conv2d modules to make low "
                         "rank (e.g. ['1', '3'] for the hidden layers of lowlearn.models.MLP)")
    weights = {name: getattr(modules.get(name), "weight", None) for name in layers}
    check_untied({name: weight for name, weight in weights.items() if isinstance(weight, Tensor)})
    check_not_shared(model, {name: (modules[name], weight) for name, weight in weights.items()
                             if isinstance(weight, Tensor)},
                     "keep using and training the dense weight while the layer computes with its factors U S Vᵀ")
    if isinstance(rank, Mapping) and (missing := [name for name in layers if name not in rank]):
        raise KeyError(f"rank gives no rank for layers {missing}: name every layer of layers in it")
    if isinstance(rank, Mapping) and (extra := sorted(set(rank) - set(layers))):
        raise KeyError(f"rank names {extra}, which are not in layers {layers}: add them to layers to convert them, "
                       "or leave them out of rank")
    for name in layers:
        layer = modules.get(name)
        if name == "":
            raise KeyError("'' names the model itself, which to_low_rank cannot replace in place: for a single "
                           "layer, use LowRankLinear.from_linear(layer, ...) or LowRankConv2d(layer, ...)")
        if layer is not None and parametrize.is_parametrized(layer):
            raise KeyError(f"{name!r} carries parametrizations (masks, Powerprop) of {sorted(layer.parametrizations)}, "
                           "which its low-rank factors would lose: convert before masking or Powerprop, or make "
                           "them permanent first (lowlearn.sparse.mask.squash for masks, "
                           "torch.nn.utils.parametrize.remove_parametrizations otherwise)")
        if type(layer) not in (nn.Linear, nn.Conv2d):
            kind = "not a module of the model" if layer is None else f"a {type(layer).__name__}"
            raise KeyError(f"{name!r} is {kind}; to_low_rank converts nn.Linear and nn.Conv2d modules (not their "
                           "subclasses, such as attention's projections, whose owners read .weight)")
        n, m = layer.weight.shape[0], layer.weight[0].numel()
        cap = None if r_max is None else min(r_max, n, m)
        r = rank[name] if isinstance(rank, Mapping) else rank
        r = None if r is None else min(r, n, m)
        if isinstance(layer, nn.Linear):
            new_layers[id(layer)] = LowRankLinear.from_linear(layer, r, tol=tol, r_max=cap)
        else:
            new_layers[id(layer)] = LowRankConv2d(layer, r, tol=tol, r_max=cap)
    _replace(model, new_layers)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every low-rank layer by the dense layer it computes, in place; return the model.

    A low-rank layer the model uses at several places becomes one dense layer at each.

    Raises:
        TypeError: ``model`` is itself a low-rank layer (use its ``to_dense()``).
    """
    if isinstance(model, LowRankLayer):
        raise TypeError(f"the model is itself a {type(model).__name__}, which to_dense cannot replace in place: "
                        "use model.to_dense()")
    _replace(model, {id(layer): layer.to_dense() for layer in low_rank_layers(model).values()})
    return model


def count_low_rank_parameters(layer: LowRankLayer, rank: int | None = None) -> int:
    """``r(n + m) + r²`` (+ the bias): numbers a rank-``r`` layer stores (default: its current rank).

    Raises:
        ValueError: a ``rank`` outside [1, min(n, m)].
    """
    n, m = layer.dense_shape
    r = layer.rank if rank is None else check_rank(rank, n, m)
    return r * (n + m) + r * r + (layer.bias.numel() if layer.bias is not None else 0)


def dense_parameter_count(layer: LowRankLayer) -> int:
    """``n·m`` (+ the bias): numbers the dense layer would store."""
    n, m = layer.dense_shape
    return n * m + (layer.bias.numel() if layer.bias is not None else 0)


def compression(model: nn.Module) -> dict[str, float]:
    """Weights stored by the model, at evaluation and during DLRT training, against its dense version.

    Counts weight matrices only (no biases), as Schotthöfer et al. (2022) do in their
    tables: a dense ``nn.Linear``/``nn.Conv2d`` counts ``n·m``; a low-rank layer of rank
    ``r`` counts ``r(n + m) + r²`` at evaluation, and during training what an
    integrator step holds at once: the augmented factors ``Û (n × a)``, ``V̂ (m × b)``
    and ``S̃ (a × b)``, with ``a = min(2r, n)`` and ``b = min(2r, m)``, plus ``K`` and
    ``L``, i.e. ``a·n + b·m + a·b + r(n + m)`` (``2r(n + m) + 4r² + r(n + m)`` when
    ``2r`` fits; the rank-adaptive integrator; the fixed-rank one holds less). The
    compression rate ("c.r.") is
    ``1 − stored / dense``.

    Returns:
        ``{"dense": n_dense, "eval": n_eval, "train": n_train, "cr_eval": ..., "cr_train": ...}``.

    Raises:
        ValueError: the model has no ``nn.Linear``, ``nn.Conv2d`` or low-rank layer.
    """
    dense = evaluation = training = 0
    for module in model.modules():
        if isinstance(module, LowRankLayer):
            n, m = module.dense_shape
            r = module.rank
            dense += n * m
            evaluation += r * (n + m) + r * r
            a, b = min(2 * r, n), min(2 * r, m)              # the augmented bases' columns
            training += a * n + b * m + a * b + r * (n + m)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            dense += module.weight.numel()
            evaluation += module.weight.numel()
            training += module.weight.numel()
    if dense == 0:
        raise ValueError("the model has no nn.Linear, nn.Conv2d or low-rank layer, so it has no weights to compress")
    return {"dense": dense, "eval": evaluation, "train": training,
            "cr_eval": 1 - evaluation / dense, "cr_train": 1 - training / dense}
