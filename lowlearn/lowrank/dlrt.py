"""DLRT: dynamical low-rank training, with a rank that adapts during training.

Schotthöfer, Zangrando, Kusch, Ceruti & Tudisco (2022), "Low-rank lottery tickets:
finding efficient low-rank neural networks via matrix differential equations"
(NeurIPS), Algorithm 1. Training follows the gradient flow ``Ẇ = −∇_W L`` restricted to
the manifold of rank-``r`` matrices ``W = U S Vᵀ``. Projecting a full gradient step
onto that manifold would need the dense ``∇_W L``; the *basis-update & Galerkin*
integrator (Ceruti, Kusch & Lubich 2022) needs only three thin gradients, one step
of size ``λ`` (``lr``) each:

1. **K-step** (new column space): ``K = U S``, ``K¹ = K − λ ∇_K L(K Vᵀ)``;
   **L-step** (new row space): ``L = V Sᵀ``, ``L¹ = L − λ ∇_L L(U Lᵀ)``. Both
   gradients come from one backward pass (:mod:`lowlearn.lowrank.layers`).
2. **Basis augmentation**: ``Û = orth([K¹, U])``, ``V̂ = orth([L¹, V])`` (QR), rank up
   to ``2r``; ``M = Ûᵀ U``, ``N = V̂ᵀ V``, and the layer becomes ``Û (M S Nᵀ) V̂ᵀ``, the
   same matrix in the larger basis.
3. **S-step** (Galerkin): ``S¹ = S̃ − λ ∇_S L(Û S̃ V̂ᵀ)``. The augmented bases contain
   the old ones, so ``Û S̃ V̂ᵀ = Û Ûᵀ U S Vᵀ V̂ V̂ᵀ = U S Vᵀ``: the network is the one
   the first pass ran, and ``∇_S L = Ûᵀ (∂L/∂W) V̂`` with that pass's ``∂L/∂W``. Each
   layer keeps its input ``x`` and output gradient ``δ`` from the backward pass and forms
   it as ``(δ Û)ᵀ (x V̂)`` (:meth:`~lowlearn.lowrank.layers.LowRankLayer.galerkin_gradient`),
   without forming ``∂L/∂W`` and without a second pass through the network. The price
   is memory: from its backward pass to the step, each layer holds ``δ``, the size of
   its output (its input ``x`` autograd saved already), which
   :func:`lowlearn.cost.training_memory` does not count.
4. **Truncation**: ``S¹ = P Σ Qᵀ`` (SVD of the small ``2r × 2r`` core); keep the
   smallest ``r₁`` with ``‖σ_{r₁+1:}‖ ≤ ϑ ‖σ‖`` (``tol``), within ``[r_min, r_max]``;
   ``U ← Û P_{:, :r₁}``, ``V ← V̂ Q_{:, :r₁}``, ``S ← Σ_{:r₁}``.

The rank adapts both ways, but not symmetrically: a new direction enters the
augmented basis with a singular value of the size of one gradient step, so it
survives the truncation only if ``ϑ‖σ‖`` is smaller than that, or once it has grown
over several steps. In practice the rank mostly falls from where it starts: start
at a rank at least as large as the one you expect.

With ``tol=None`` the rank stays fixed: ``Û = orth(K¹)``, ``V̂ = orth(L¹)`` and no
truncation (the fixed-rank integrator of the same paper). The new bases no longer
contain the old ones, ``Û S̃ V̂ᵀ`` is another network, and the S-step takes a second
forward and backward pass on the same batch: a closure that recomputes the loss.
No ``n × m`` matrix is formed at any point: every product involves a thin factor.
At the same rank the rank-adaptive step is still the dearer one: it saves the second
pass, but its QR factorisations are of ``n × 2r`` matrices and it adds the SVD of the
core, and on one CPU thread, at rank 32, these cost more than the pass at every width
measured, 256 to 4096 (``python -m lowlearn.bench lowrank --tol 0`` holds the rank).

The other parameters (biases, norm layers, dense layers) take plain gradient steps
of the same size ``λ``, or the steps of a torch ``optimizer`` of your choice, with the
gradients of the S-step's network (the first pass's, with ``tol``). The fixed-rank
second pass leaves the model's buffers as the first left them, so a batch norm's
running statistics take one update per batch, as with any other optimizer.
:class:`DLRT` is a ``torch.optim.Optimizer``::

    dlrt = DLRT(model, lr=0.1, tol=0.2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(dlrt, steps)   # schedules λ
    for x, y in batches:
        dlrt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        dlrt.step()                                # at fixed rank: dlrt.step(lambda: loss_fn(model(x), y))
        cosine.step()

:func:`lowlearn.train.fit` does this by itself (it passes a closure where
:attr:`DLRT.needs_closure` says so). With ``tol`` the layers keep their signals for the
S-step from ``dlrt.zero_grad()`` to ``dlrt.step()`` only: clear the gradients with the
DLRT's ``zero_grad``, as above, not the model's.

DLRT forms the S-step's gradient itself, from the kept signals with ``tol`` and from its
second pass at fixed rank (whose gradients the other parameters then take too), so what
is done to ``.grad`` between ``backward`` and :meth:`DLRT.step` does not reach it as it
is. With ``tol``, the S-step follows what was done to ``S.grad``: its gradient is scaled
by ``c = ⟨S.grad, g⟩ / ⟨g, g⟩``, with ``g`` the ``∂L/∂S`` that the backward passes gave
``S.grad`` (kept beside the signals, ``r × r``). ``c = 1`` when nothing touched the
gradients, and ``c`` is exact for anything that rescales them: ``clip_grad_norm_``, or a
``torch.amp.GradScaler`` for float16 mixed precision (``scaler.scale(loss).backward()``,
``scaler.step(dlrt)``: the scaler checks the gradients of DLRT's parameter groups, which
list the parameters of its ``optimizer`` argument too, and DLRT unscales them all, or
skips the whole step, the wrapped optimizer's included, when one is not finite). An
element-wise change (``clip_grad_value_``) reaches the S-step as its least-squares
rescaling. At fixed rank such changes reach the K- and L-steps only: the S-step and the
other parameters take the closure's pass. A GradScaler refuses ``closure=`` as a keyword;
give it positionally, ``scaler.step(dlrt, closure)``: the scaler leaves the unscaling to
DLRT, which scales the closure's loss by the same scale (float16 gradients would
underflow without it), unscales its gradients, and runs the pass again unscaled should
they overflow (in a process group, on every process if they overflow on one). After
``scaler.unscale_(dlrt)`` (to clip, say) DLRT is not told the scale, and the closure's
pass runs unscaled. In a process group DLRT averages the gradients across processes at
its step, after such changes: ``clip_grad_norm_`` before the step clips each process's
own gradients by their own norm (so the processes may clip by different factors), not
their average as under ``DistributedDataParallel``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..checks import all_finite, check_count, check_non_negative, check_rate, is_real
from ..distributed import average_across_processes
from ..train import NonFiniteLossError, buffers_restored
from .layers import check_tolerance, dense_parameters, low_rank_layers, truncation_ranks


def _factor_setting(key: str, doc: str) -> property:
    """A read-only attribute for ``param_groups[0][key]``, where torch's optimizers keep their hyperparameters."""
    return property(lambda self: self.param_groups[0][key], doc=doc)


class DLRT(torch.optim.Optimizer):
    """The rank-adaptive (or fixed-rank) DLRT integrator for a model's low-rank layers.

    A ``torch.optim.Optimizer``: ``param_groups[0]`` holds the factors ``U, S, V`` of
    every low-rank layer that trains, and its ``"lr"`` is ``λ``; without an ``optimizer``
    argument, ``param_groups[1]`` holds the other parameters, which take the plain gradient step
    ``p ← p − lr·∇_p L`` (``torch.optim.SGD`` without momentum). Learning-rate schedulers
    therefore work on DLRT as on any optimizer, and schedule both groups. An
    ``optimizer`` you pass keeps its own parameter groups: give it a scheduler of its own.
    Its parameters are listed in ``param_groups[1]`` as well, whose ``"lr"`` is then
    unused, so that what works on an optimizer's groups reaches them: a
    ``torch.amp.GradScaler`` checks their gradients too (and ``scaler.unscale_(dlrt)``
    unscales them).

    A frozen low-rank layer (``requires_grad`` off for its three factors, e.g. by
    ``layer.requires_grad_(False)``) is left as it is, at its rank; the others train.

    ``param_groups[0]`` also holds the settings of the factors' steps, ``"tol"``,
    ``"r_min"``, ``"r_max"``, ``"betas"`` and ``"eps"`` (read them as attributes): as
    torch's optimizers do with their hyperparameters, :meth:`state_dict` saves them and
    :meth:`load_state_dict` restores them (set one in ``param_groups[0]`` after loading
    to resume with another value).

    ``state[layer name]`` holds the Adam-style moments of that layer's factor gradients
    (with ``betas``): ``"step"`` and, for ``"K"``, ``"L"`` and ``"S"``, the first and second
    moments stacked in one tensor.

    Args:
        model: a model with :class:`~lowlearn.lowrank.layers.LowRankLinear` /
            :class:`~lowlearn.lowrank.layers.LowRankConv2d` layers (see
            :func:`~lowlearn.lowrank.layers.to_low_rank`), maybe mixed with dense ones.
        lr: ``λ``, the step size of the K-, L- and S-steps.
        tol: ``ϑ``, the relative truncation tolerance in [0, 1); ``None`` trains at fixed rank.
        r_min: the smallest rank a layer is truncated to (with ``tol``). A step keeps at
            most the ``2r`` columns of its augmented basis, so a layer below ``r_min``
            climbs to it over several steps; a layer whose largest rank is smaller
            stays below it.
        r_max: the largest (with ``tol``): a cap on each layer's own ``r_max``, which
            it never raises (default: those alone).
        betas: ``(β₁, β₂)`` for Adam-style steps of the factors (see :meth:`direction`);
            ``None`` (default) takes plain gradient steps, the integrator of the paper.
        eps: Adam's ``ε``.
        optimizer: trains the other parameters instead of the plain gradient steps
            (build it on :func:`~lowlearn.lowrank.layers.dense_parameters`).

    Raises:
        ValueError: no low-rank layer, ``ϑ`` outside [0, 1), an ``lr`` that is not a
            positive finite number, ``r_min < 1``, ``r_max < r_min``, ``r_max`` or an
            ``r_min`` other than 1 without ``tol`` (a fixed-rank run truncates
            nothing), ``betas`` that are not two numbers in [0, 1), a negative
            ``eps``, factors in a precision other than float32 and float64, or an
            ``optimizer`` that holds low-rank factors or lacks some of the other parameters
            that require gradients.
    """

    tol = _factor_setting("tol", "``ϑ``, or ``None`` at fixed rank.")
    r_min = _factor_setting("r_min", "The smallest rank a layer is truncated to.")
    r_max = _factor_setting("r_max", "The cap on each layer's own ``r_max`` (``None``: none).")
    betas = _factor_setting("betas", "``(β₁, β₂)`` of the Adam-style steps, or ``None`` for plain gradient steps.")
    eps = _factor_setting("eps", "Adam's ``ε``.")

    @property
    def needs_closure(self) -> bool:
        """Whether :meth:`step` needs a closure (at fixed rank): :func:`lowlearn.train.fit` then passes one."""
        return self.tol is None

    #: DLRT averages its gradients across processes itself (see :mod:`lowlearn.distributed`), so
    #: :func:`lowlearn.train.fit` does not wrap the model in DistributedDataParallel for it.
    averages_gradients = True
    #: A ``torch.amp.GradScaler`` hands :meth:`step` the loss scale and leaves the unscaling to it, so that the
    #: fixed-rank S-step's second pass is loss-scaled too.
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, lr: float, *, tol: float | None = None, r_min: int = 1,
                 r_max: int | None = None, betas: tuple[float, float] | None = None, eps: float = 1e-8,
                 optimizer: torch.optim.Optimizer | None = None):
        if not low_rank_layers(model):
            raise ValueError("the model has no low-rank layer: convert some with lowlearn.lowrank.to_low_rank")
        check_rate("lr", lr)
        # The settings are kept as Python numbers, which the state_dict must hold for torch.load(weights_only=True).
        r_min = check_count("r_min", r_min, 1)
        if r_max is not None:
            r_max = check_count("r_max (None or at least r_min)", r_max, r_min)
        if (r_max is not None or r_min != 1) and tol is None:
            raise ValueError("r_min and r_max bound the ranks that the truncation with tol= keeps; with tol=None the "
                             "ranks stay as the layers have them (set them with to_low_rank's rank=)")
        if betas is not None and not (isinstance(betas, (tuple, list)) and len(betas) == 2
                                      and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        betas = None if betas is None else (float(betas[0]), float(betas[1]))
        if low_precision := sorted({str(p.dtype) for p in _factors(model)} - {"torch.float32", "torch.float64"}):
            raise ValueError(f"the low-rank factors are {', '.join(low_precision)}, for which torch has no QR or SVD: "
                             "keep the low-rank layers in float32 (torch.autocast runs their products in lower "
                             "precision)")
        eps = check_non_negative("eps", eps)
        optimized = set() if optimizer is None else {id(p) for group in optimizer.param_groups for p in group["params"]}
        if held := {id(p) for p in _factors(model)} & optimized:
            raise ValueError(f"the optimizer holds {len(held)} low-rank factors, which DLRT steps itself: build it "
                             "on lowlearn.lowrank.dense_parameters(model) (the other parameters)")
        trained = {id(p) for p in dense_parameters(model) if p.requires_grad}     # a frozen one needs no optimizer
        if optimizer is not None and (missing := trained - optimized):
            raise ValueError(f"the optimizer lacks {len(missing)} of the model's other parameters (built before "
                             "to_low_rank, it holds the replaced layers' old biases): build it on "
                             "lowlearn.lowrank.dense_parameters(model) after converting")
        groups = [{"params": _factors(model, trained_only=True),    # raises now if a layer is frozen in part
                   "tol": None if tol is None else check_tolerance(tol), "r_min": r_min, "r_max": r_max,
                   "betas": betas, "eps": eps}]
        if dense := _other_parameters(model, optimizer):
            groups.append({"params": dense})
        super().__init__(groups, {"lr": float(lr)})
        self.model = model
        self._keep_signals()
        self.optimizer = optimizer
        self._averaged = False                  # the processes' gradient lists are compared at the first step

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters that take the plain gradient step (without an ``optimizer`` argument).

        Raises:
            ValueError: a DLRT built with an ``optimizer``, which would never step the group:
                add it to that optimizer (``dlrt.optimizer.add_param_group``), whose parameters
                DLRT lists in ``param_groups[1]`` at its next :meth:`zero_grad`.
        """
        if getattr(self, "optimizer", None) is not None:     # (none yet while torch's __init__ adds the groups)
            raise ValueError("this DLRT steps the parameters other than the factors with its optimizer argument, so a "
                             "group added to it would never step: add it to that optimizer instead, "
                             "dlrt.optimizer.add_param_group(...) (DLRT lists it at its next zero_grad)")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        """Every attribute: torch's optimizers keep only their defaults, groups and state, which would leave a copy
        (``copy.deepcopy((model, dlrt))``, which then trains as the original does) without its model and optimizer."""
        return dict(self.__dict__)

    @property
    def lr(self) -> float:
        """``λ``: the learning rate of the factors' parameter group (what a scheduler sets)."""
        return self.param_groups[0]["lr"]

    def ranks(self) -> dict[str, int]:
        """``{layer name: current rank}``."""
        return {name: layer.rank for name, layer in low_rank_layers(self.model).items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the factors and of the dense parameters, and the layers' kept signals.

        A wrapped ``optimizer``'s parameters are listed in ``param_groups[1]``, so this clears
        them too, once (its own ``zero_grad`` would clear them a second time).
        """
        if self.optimizer is not None:
            self.param_groups[1]["params"] = _other_parameters(self.model, self.optimizer)   # if it took more
        self.param_groups[0]["params"] = _factors(self.model, trained_only=True)   # the layers' current factors
        super().zero_grad(set_to_none=set_to_none)
        self._keep_signals()

    def _keep_signals(self, keep: bool = True) -> None:
        """Clear every low-rank layer's signals, and have it keep the next ones if ``keep`` and the S-step uses them
        (``tol``)."""
        for layer in low_rank_layers(self.model).values():
            layer.keeps_signals = keep and self.tol is not None
            layer.signals.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One DLRT step: K- and L-steps from the gradients already computed, then the S-step.

        Args:
            closure: at fixed rank (``tol=None``), recomputes the loss on the *same* batch
                and returns it (without calling ``backward``, which :meth:`step` does); it
                runs once, for the S-step's pass. Random layers draw anew in it: with
                dropout the S-step sees other masks than the K- and L-steps (as in the
                authors' code). With ``tol`` the S-step needs no pass, and a closure
                given is not called (so one loop can serve both kinds).

        Returns:
            The loss of the S-step's pass at fixed rank; ``None`` with ``tol``, or when a
            ``torch.amp.GradScaler`` found gradients that are not finite, on any process of a
            process group (nothing steps then, on every process).

        With ``tol``, the layers keep their inputs and output gradients for the S-step from
        :meth:`zero_grad` (or the construction) to this step, and no longer: a model trained
        on by another optimizer afterwards keeps none.

        Raises:
            RuntimeError: a low-rank layer that trains without gradients (no backward pass
                first), with ``tol`` one that kept no backward pass (no :meth:`zero_grad`
                since the last step), or, at fixed rank, one that the closure's loss does not use,
                or a closure that calls ``backward`` itself.
            TypeError: no closure at fixed rank.
            ValueError: a low-rank layer with some of its factors frozen and others not.
            lowlearn.train.NonFiniteLossError: the truncation met a core that is not
                finite (the fixed-rank version, which does not truncate, does not look).

        Whatever fails after the K- and L-steps (these errors, the closure's own, or a wrapped
        ``optimizer``'s that raises before it changes a parameter, as LBFGS without a closure
        does) leaves the factors and their moments as they were before the step, and no
        parameter stepped; the gradients of the first pass are gone: run it again. A failed step
        drops the loss scale a ``torch.amp.GradScaler`` gave it, so that the next step
        takes the scale of its own ``scaler.step``.
        """
        try:
            return self._step(closure)
        except BaseException:
            # The scaler removes its grad_scale and found_inf once the step returns, not when it raises; left here,
            # they would be the next step's (and the scaler would give that step the product of two scales).
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise

    def _step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        """The step itself; :meth:`step` drops a GradScaler's attributes when it fails."""
        if self.tol is None and closure is None:
            raise TypeError("fixed-rank DLRT (tol=None) takes its S-step from a second pass on the same batch: "
                            "pass step(closure), a closure that recomputes the loss, e.g. lambda: "
                            "loss_fn(model(x), y)")
        # Set by a GradScaler's step: the loss scale (None once scaler.unscale_(dlrt) has unscaled the gradients)
        # and whether the gradients of DLRT's groups, which it checked, are all finite.
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None:
            # It checked this process's gradients, which DLRT averages later: one process's skip is every one's.
            found_inf = found_inf.clone()
            average_across_processes([found_inf], check=False)
            if found_inf.item():                                   # the scaler's own step reads it on the host too
                self._keep_signals(False)
                return None
        if scale is not None:
            self._unscale(scale)
        layers = _trained_layers(self.model)
        for name, layer in layers.items():
            if layer.U.grad is None or layer.V.grad is None:
                raise RuntimeError(f"low-rank layer {name!r} has no gradient: run forward and backward on a "
                                   "batch before DLRT.step()")
            if self.tol is not None and not layer.signals:
                raise RuntimeError(f"low-rank layer {name!r} kept no backward pass for the S-step: rank-adaptive "
                                   "DLRT keeps them from its zero_grad() to its step(), so call dlrt.zero_grad() "
                                   "(not model.zero_grad()) before the forward pass")
        average_across_processes((grad for layer in layers.values() for grad in (layer.U.grad, layer.V.grad)),
                                 check=not self._averaged)
        start = {name: (layer.U.detach(), layer.S.detach(), layer.V.detach()) for name, layer in layers.items()}
        scales = {name: _scale_applied(layer) for name, layer in layers.items()} if self.tol is not None else {}
        moments = {name: dict(self.state[name]) for name in layers if name in self.state}  # replaced, never changed
        loss = None
        try:
            for name, layer in layers.items():
                self._basis_update(name, layer)
            if self.tol is None:
                loss = self._s_step_pass(layers, closure, scale)
            else:
                self._s_step_from_first_pass(layers, scales)
            self._galerkin_and_truncate(layers)
            if self.optimizer is not None:
                self.optimizer.step()
        except BaseException:   # a failed closure or optimizer, an interrupt, a diverged core: undo the factors' step
            for name, layer in layers.items():
                layer.set_factors(*start[name])
                self.state.pop(name, None)
                if name in moments:
                    self.state[name] = moments[name]
            self.zero_grad()
            raise
        if self.optimizer is None:
            for group in self.param_groups[1:]:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        for name, layer in layers.items():
            if name in self.state:                        # K's columns follow V, L's follow U
                U0, _, V0 = start[name]
                self._rotate(name, "K", None, V0.T @ layer.V)
                self._rotate(name, "L", None, U0.T @ layer.U)
        self._keep_signals(False)         # until the next zero_grad: another loop's passes would pile up
        self.param_groups[0]["params"] = _factors(self.model, trained_only=True)
        return None if loss is None else loss.detach()

    def _s_step_pass(self, layers: Mapping[str, nn.Module], closure: Callable[[], Tensor],
                     scale: Tensor | None) -> Tensor:
        """Run the closure's forward and backward pass in the new bases (fixed rank); return its loss.

        Leaves ``∇_S L`` in every layer's ``S.grad`` and the other parameters' gradients,
        averaged across processes. With a GradScaler's loss ``scale``, the backward pass
        is of the scaled loss and its gradients are unscaled; if they are not all finite
        on some process, the pass runs again without the scale on every process (whose
        forward passes may hold collectives, as ``SyncBatchNorm``'s do).
        """
        for layer in layers.values():
            layer.kl_gradients = False
        try:
            for factor in (scale, None) if scale is not None else (None,):
                self.zero_grad()
                # The batch's second pass: batch norms have updated their running statistics on the first.
                with torch.enable_grad(), buffers_restored(self.model):
                    loss = closure()
                    if any(layer.S.grad is not None for layer in layers.values()):
                        raise RuntimeError("the closure called backward itself (the S factors have gradients "
                                           "before DLRT's backward pass): it must only recompute and return the "
                                           "loss, e.g. lambda: loss_fn(model(x), y); DLRT.step runs its backward")
                    (loss if factor is None else loss * factor).backward()
                if factor is None:
                    break
                self._unscale(factor)
                gradients = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
                overflow = (~all_finite(gradients)).float()
                average_across_processes([overflow], check=False)          # above 0 if it overflowed on any process
                if not overflow.item():
                    break
        finally:
            for layer in layers.values():
                layer.kl_gradients = True
        unused = [name for name, layer in layers.items() if layer.S.grad is None]
        if unused:
            raise RuntimeError(f"the closure's loss does not depend on the low-rank layers {unused}, so they have "
                               "no S-step (the step is undone): the closure must recompute the loss of the first "
                               "backward pass, through every low-rank layer")
        self._average_s_step_gradients(layers)
        return loss

    def _unscale(self, scale: Tensor) -> None:
        """Divide the gradients of DLRT's groups by a GradScaler's loss ``scale`` (times its reciprocal in float32,
        as the scaler does)."""
        inverse = scale.double().reciprocal().float()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse.to(p.grad.device))

    def _s_step_from_first_pass(self, layers: Mapping[str, nn.Module], scales: Mapping[str, Tensor]) -> None:
        """Put ``∇_S L = Ûᵀ (∂L/∂W) V̂`` in every layer's ``S.grad``, from its kept signals, times its ``scales``
        (with ``tol``).

        The other parameters keep the first pass's gradients, which are those of the same
        network; all are averaged across processes.
        """
        for name, layer in layers.items():
            layer.S.grad = layer.galerkin_gradient() * scales[name]
        self._average_s_step_gradients(layers)

    def _average_s_step_gradients(self, layers: Mapping[str, nn.Module]) -> None:
        """Average the S-step's gradients (the cores' and the other parameters') across processes."""
        dense = [p for group in self.param_groups[1:] for p in group["params"]]
        average_across_processes([layer.S.grad for layer in layers.values()] + [p.grad for p in dense],
                                 check=not self._averaged)
        self._averaged = True

    def direction(self, name: str, key: str, grad: Tensor) -> Tensor:
        """The step direction for one factor gradient: ``grad`` itself, or Adam's ``m̂ / (√v̂ + ε)``.

        With ``betas``, each layer keeps Adam's first and second moments for its K-, L-
        and S-gradients (Kingma & Ba 2015), bias-corrected by the layer's step count.
        The moments are coordinates in the layer's bases, which change at every step:
        after each step they are carried into the new bases by the change-of-basis
        matrices (``m ← Cᵀ m D``; the second moments by the squared entries of ``C`` and
        ``D``, an approximation that keeps them non-negative). (The authors' code runs a
        torch optimizer on the factors and leaves its moments in the old coordinates.)
        Normalised steps give weak directions as large a step as strong ones, so at the
        same ``ϑ`` more of them survive the truncation: expect higher ranks than with
        plain steps.
        """
        if self.betas is None:
            return grad
        beta1, beta2 = self.betas
        state = self.state[name]
        if key == "K":
            state["step"] = state.get("step", 0) + 1
        m, v = state[key] if key in state else (torch.zeros_like(grad), torch.zeros_like(grad))
        if m.shape != grad.shape:
            raise RuntimeError(f"the {key}-moments of layer {name!r} have shape {tuple(m.shape)} and its gradient "
                               f"{tuple(grad.shape)}: the optimizer's state was loaded without the model's, which "
                               "holds the ranks (load both, as lowlearn.train.load_checkpoint does)")
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.square()
        state[key] = torch.stack([m, v])
        t = state["step"]
        return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + self.eps)

    def _rotate(self, name: str, key: str, left: Tensor | None, right: Tensor | None) -> None:
        """Carry the moments of ``key`` into new bases: ``m ← leftᵀ m right`` (``None``: unchanged side)."""
        if key not in self.state.get(name, {}):
            return
        m, v = self.state[name][key]
        if left is not None:
            m, v = left.T @ m, left.square().T @ v
        if right is not None:
            m, v = m @ right, v @ right.square()
        self.state[name][key] = torch.stack([m, v])

    def _basis_update(self, name: str, layer) -> None:
        U, S, V = layer.U, layer.S, layer.V
        K = U @ S - self.lr * self.direction(name, "K", U.grad)
        L = V @ S.T - self.lr * self.direction(name, "L", V.grad)
        if self.tol is None:
            U_hat, V_hat = torch.linalg.qr(K).Q, torch.linalg.qr(L).Q
        else:
            U_hat = torch.linalg.qr(torch.cat([K, U], dim=1)).Q
            V_hat = torch.linalg.qr(torch.cat([L, V], dim=1)).Q
        M, N = U_hat.T @ U, V_hat.T @ V
        self._rotate(name, "S", M.T, N.T)                 # S's moments into the augmented bases
        layer.set_factors(U_hat, M @ S @ N.T, V_hat)

    def _galerkin_and_truncate(self, layers: Mapping[str, nn.Module]) -> None:
        """The S-step of every layer, then (with ``tol``) its truncation; the ranks are read in one transfer."""
        cores = {name: layer.S - self.lr * self.direction(name, "S", layer.S.grad) for name, layer in layers.items()}
        if self.tol is None:
            for name, layer in layers.items():
                layer.set_factors(layer.U, cores[name], layer.V)
            return
        svds = {}
        for name, S in cores.items():
            try:
                svds[name] = torch.linalg.svd(S, full_matrices=False)
            except torch.linalg.LinAlgError as error:     # NaN or infinite entries: training diverged
                raise _diverged([name]) from error
        ranks = dict(zip(svds, truncation_ranks([sigma for _, sigma, _ in svds.values()], self.tol)))
        diverged = [name for name, kept in ranks.items() if kept is None]   # a GPU's SVD returns NaN, not an error
        if diverged:
            raise _diverged(diverged)
        for name, layer in layers.items():
            P, sigma, Qh = svds[name]
            r_max = min(layer.r_max, layer.r_max if self.r_max is None else self.r_max, sigma.numel())
            r = min(max(ranks[name], self.r_min), r_max)
            self._rotate(name, "S", P[:, :r], Qh[:r].T)
            layer.set_factors(layer.U @ P[:, :r], torch.diag(sigma[:r]), layer.V @ Qh[:r].T)

    def state_dict(self) -> dict:
        """The groups' learning rates (as a scheduler left them) and the factors' settings (``tol``, ``r_min``,
        ``r_max``, ``betas``, ``eps``), the factors' moments and the ``optimizer``'s state.

        The factors themselves are in the model's ``state_dict``.
        """
        return {"param_groups": [{key: value for key, value in group.items() if key != "params"}
                                 for group in self.param_groups],
                "state": {name: dict(state) for name, state in self.state.items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (also one in the ``{"optimizer", "moments"}`` format of earlier versions).

        The saved learning rates and settings replace this DLRT's (a state of earlier
        versions, which saved no settings or no learning rates, keeps its own).

        The moments keep the ranks they were saved at: load the model's ``state_dict``
        as well (before or after; :func:`lowlearn.train.load_checkpoint` does both).

        Raises:
            ValueError: a state saved with an ``optimizer`` argument loaded without one, or
                the reverse, a state with another number of parameter groups, or
                moments of a low-rank layer the model lacks; nothing is loaded then.
        """
        saved_with = state.get("optimizer") is not None
        if saved_with != (self.optimizer is not None):
            built = ("with", "without") if saved_with else ("without", "with")
            raise ValueError(f"the state was saved by a DLRT built {built[0]} an optimizer argument and this one is "
                             f"built {built[1]}: build it with the same optimizer argument (none, or an optimizer of "
                             "the dense parameters) as the DLRT that saved it")
        groups = list(state.get("param_groups", []))
        if saved_with and len(groups) == 1:        # earlier versions did not list the optimizer's parameters
            groups.append({})
        if groups and len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} parameter groups and this DLRT {len(self.param_groups)}: "
                             "build it on the same model, with the same optimizer argument, as the DLRT that "
                             "saved it")
        moments = state.get("state", state.get("moments", {}))
        layers = low_rank_layers(self.model)            # the moments go where their layer's factors are
        unknown = sorted(set(moments) - set(layers))
        if unknown:
            raise ValueError(f"the state has moments of low-rank layers {unknown}, which the model lacks (it has "
                             f"{sorted(layers)})")
        if self.optimizer is not None:                  # checks its groups before it changes anything
            self.optimizer.load_state_dict(state["optimizer"])
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        self._keep_signals()                            # a restored tol may differ from the one built with
        self.state = defaultdict(dict, {
            name: {key: value if key == "step" else torch.stack(tuple(value)).to(layers[name].U)
                   for key, value in layer.items()}
            for name, layer in moments.items()})


def _diverged(names: list[str]) -> NonFiniteLossError:
    """The error for layers whose S-step core is not finite."""
    which = f"layer {names[0]!r}" if len(names) == 1 else f"layers {names}"
    return NonFiniteLossError(f"the S-step core of {which} is not finite, so the loss or the gradients diverged: "
                              "lower lr")


def _scale_applied(layer: nn.Module) -> Tensor:
    """``c = ⟨S.grad, g⟩ / ⟨g, g⟩``: the rescaling of the gradient ``g`` that the layer's backward passes gave
    ``S.grad`` which is closest to what ``S.grad`` holds now; 1 where ``g`` is zero or was not kept (0-d, on the
    layer's device, without a host sync)."""
    kept, now = layer.signals.core_gradient, layer.S.grad
    if kept is None:
        return torch.ones((), dtype=layer.S.dtype, device=layer.S.device)
    if now is None:                                                    # cleared since: no gradient
        return torch.zeros((), dtype=layer.S.dtype, device=layer.S.device)
    peak = kept.abs().amax()
    unit = kept / torch.where(peak > 0, peak, 1.0)           # the squares of a loss-scaled g could overflow
    norm = (kept * unit).sum()
    return torch.where(norm > 0, (now * unit).sum() / norm, 1.0)


def _trained_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the low-rank layers of ``model`` that DLRT steps: those whose factors require gradients.

    Raises:
        ValueError: a layer with some of its factors ``U, S, V`` frozen and others not
            (the K-, L- and S-steps change all three together).
    """
    layers = {}
    for name, layer in low_rank_layers(model).items():
        trains = {factor.requires_grad for factor in (layer.U, layer.S, layer.V)}
        if len(trains) > 1:
            raise ValueError(f"low-rank layer {name!r} has some of its factors U, S, V frozen and the others not, but "
                             "DLRT's steps change all three together: freeze the layer, "
                             "layer.requires_grad_(False), or none of it")
        if trains == {True}:
            layers[name] = layer
    return layers


def _other_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[nn.Parameter]:
    """What DLRT's second parameter group lists: ``optimizer``'s parameters, or without it the model's parameters
    other than the low-rank factors."""
    if optimizer is None:
        return dense_parameters(model)
    return [p for group in optimizer.param_groups for p in group["params"]]


def _factors(model: nn.Module, trained_only: bool = False) -> list[nn.Parameter]:
    """``[U, S, V]`` of every low-rank layer of ``model`` (``trained_only``: of those that train), in module order."""
    layers = _trained_layers(model) if trained_only else low_rank_layers(model)
    return [p for layer in layers.values() for p in (layer.U, layer.S, layer.V)]
