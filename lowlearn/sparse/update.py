"""Drop and grow: the one mask update that every dynamic sparse training method shares.

A method of :mod:`lowlearn.sparse.dst` only says *which* weights matter, with two
score tensors per layer (higher = more important):

* drop scores over the active weights (e.g. ``|θ|``): the ``n_drop`` lowest go;
* grow scores over the inactive weights (e.g. ``|∂L/∂w|`` for RigL, random for
  SET): the ``n_grow`` highest come in.

:func:`drop_and_grow` does the rest for one layer with two ``topk`` calls, so that
every method keeps exactly ``active − n_drop + n_grow`` weights, and no method has
its own copy of the bookkeeping. Its one policy choice is what a grow step may pick:

``regrow_dropped=False`` (the default)
    only weights that were inactive *before* the update: the dropped and the grown
    sets are disjoint, and each update really replaces ``n`` connections.
``regrow_dropped=True``
    every weight not kept after the drop, the weights just dropped included. This
    is what the reference implementation of RigL does (``generic_mask_update`` in
    ``google-research/rigl``, ``rigl_tf2/mask_updaters.py``): its grow ``topk`` runs
    over every position outside the kept set, and a weight that is dropped and
    grown back in the same update keeps its value and optimizer state (the code's
    ``reinit_when_same=False``) — it was, in effect, never dropped. Fewer
    connections then change than ``n``.

Grown weights start at zero with a new parameter's optimizer state (RigL's choice: a new
connection does not change the network's function at the moment it appears);
:class:`~lowlearn.sparse.dst.DynamicSparsity` applies that to the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_flag
from .prune import finite_scores


def drop_and_grow(
    mask: Tensor,
    drop_scores: Tensor,
    grow_scores: Tensor,
    n_drop: int,
    n_grow: int | None = None,
    *,
    regrow_dropped: bool = False,
    active: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop the ``n_drop`` lowest-scoring active weights, grow the ``n_grow`` best inactive ones.

    Args:
        mask: boolean, ``True`` at the layer's active weights.
        drop_scores: scores of ``mask``'s shape; only the active entries matter.
        grow_scores: scores of ``mask``'s shape; only the growable entries matter.
        n_drop: active weights removed.
        n_grow: weights added (default ``n_drop``: the layer's density is unchanged).
        regrow_dropped: may the weights just dropped be grown back (see the module
            docstring)? Default: no, drop and grow sets are disjoint.
        active: the number of active weights, if the caller knows it (saves a read
            of ``mask`` back to the host, which waits for the device).

    Returns:
        ``(new_mask, grown)``: the new boolean mask, with exactly
        ``active − n_drop + n_grow`` entries ``True``, and the boolean tensor of the
        weights that are active now and were not before.

    Raises:
        ValueError: ``mask`` not boolean, scores of another shape, a negative count,
            more drops than active weights, or more growth than growable weights.
        TypeError: ``regrow_dropped`` other than ``True`` or ``False``.
    """
    regrow_dropped = check_flag("regrow_dropped", regrow_dropped)
    if mask.dtype != torch.bool:
        raise ValueError(f"the mask must be boolean (True = active), got dtype {mask.dtype}")
    for what, scores in (("drop", drop_scores), ("grow", grow_scores)):
        if scores.shape != mask.shape:
            raise ValueError(f"the {what} scores have shape {tuple(scores.shape)}, the mask {tuple(mask.shape)}")
    n_grow = n_drop if n_grow is None else n_grow
    active = int(mask.count_nonzero()) if active is None else active
    if n_drop < 0 or n_grow < 0:
        raise ValueError(f"n_drop and n_grow must be non-negative, got {n_drop} and {n_grow}")
    if n_drop > active:
        raise ValueError(f"cannot drop {n_drop} weights: only {active} are active")
    growable = mask.numel() - active + (n_drop if regrow_dropped else 0)
    if n_grow > growable:
        raise ValueError(f"cannot grow {n_grow} weights: only {growable} of {mask.numel()} can be grown "
                         f"({active} active, {n_drop} dropped, regrow_dropped={regrow_dropped}); "
                         "lower the drop fraction or the density")

    before = mask.flatten()
    new = before.clone()
    if n_drop:
        lowest = finite_scores(drop_scores).flatten().masked_fill(~before, float("inf"))
        new[lowest.topk(n_drop, largest=False, sorted=False).indices] = False
    if n_grow:
        taken = new if regrow_dropped else before          # the kept weights, or every weight active before
        best = finite_scores(grow_scores).flatten().masked_fill(taken, float("-inf"))
        new[best.topk(n_grow, sorted=False).indices] = True
    return new.view_as(mask), (new & ~before).view_as(mask)
