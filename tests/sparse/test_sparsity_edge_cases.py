"""Edge cases of the sparsity core: NaN and infinite scores, half and double precision, optimizer parameter groups.

Each test checks an independent reference: a hand computation or the documented rule, stated in its docstring.
"""
import warnings

import pytest
import torch
from torch import nn

from lowlearn.optim_state import reset_optimizer_state
from lowlearn.sparse.mask import attach_masks, density, layer_densities, masks_of, refuse_weight_decay
from lowlearn.sparse.export import export
from lowlearn.sparse.flops import model_sparse_flops
from lowlearn.sparse.prune import finite_scores, prune
from lowlearn.sparse.scores import magnitude
from lowlearn.sparse.update import drop_and_grow


def test_a_nan_score_is_the_lowest_finite_score_even_below_negative_scores():
    """finite_scores' docstring: NaN becomes the lowest finite score (dropped first, grown last).

    By hand: with signed scores [NaN, -1, 2] the NaN, not -1, is dropped; among inactive grow scores
    [NaN, -1] the -1, not the NaN, is grown. A NaN mapped to 0 would rank above every negative score."""
    nan = float("nan")
    assert finite_scores(torch.tensor([nan])).item() == torch.finfo(torch.float32).min
    assert finite_scores(torch.tensor([nan], dtype=torch.float64)).item() == torch.finfo(torch.float64).min
    mask = torch.tensor([True, True, True, False, False])
    new, _ = drop_and_grow(mask, torch.tensor([nan, -1.0, 2.0, 0.0, 0.0]), torch.zeros(5), 1, 0)
    assert new.tolist() == [False, True, True, False, False]
    new, grown = drop_and_grow(mask, torch.ones(5), torch.tensor([9.0, 9.0, 9.0, nan, -1.0]), 0, 1)
    assert grown.tolist() == [False, False, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masks_of_a_low_or_high_precision_layer_keep_its_dtype_and_the_layer_still_runs(dtype):
    """Mask's docstring: the buffer holds 0/1 in the weight's dtype. Reference: the masked layer's weight and output
    keep the layer's dtype, and equal the hand-written product weight * mask in that dtype."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).to(dtype)
    raw = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    prune(model, magnitude(model), 0.5)
    keep = masks_of(model)["0"]
    assert layer.parametrizations.weight[0].mask.dtype == dtype
    assert layer.weight.dtype == dtype
    assert torch.equal(layer.weight, torch.where(keep, raw, torch.zeros((), dtype=dtype)))
    assert layer(torch.randn(3, 6).to(dtype)).dtype == dtype


def test_refuse_weight_decay_reads_the_group_of_the_frozen_weights_not_the_defaults():
    """refuse_weight_decay's docstring: refuse an optimizer that applies weight decay to the given weights. In
    torch.optim a group's own setting overrides the constructor's default, so by hand: frozen weights in a group
    with weight_decay=0 are fine even when the default is 0.1, and a group with 0.1 is refused even when the
    default is 0."""
    frozen, other = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    ok = torch.optim.SGD([{"params": [frozen], "weight_decay": 0.0}, {"params": [other]}], lr=0.1, weight_decay=0.1)
    refuse_weight_decay(ok, [frozen], "frozen")                                   # no error
    bad = torch.optim.SGD([{"params": [frozen], "weight_decay": 0.1}, {"params": [other]}], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay=0.1"):
        refuse_weight_decay(bad, [frozen], "frozen")
    asgd = torch.optim.ASGD([{"params": [other]}, {"params": [frozen], "lambd": 0.01}], lr=0.1, lambd=0.0)
    with pytest.raises(ValueError, match="lambd"):
        refuse_weight_decay(asgd, [frozen], "frozen")


@pytest.mark.parametrize("optimizer_class, key, first, second", [
    (torch.optim.Rprop, "step_size", {"lr": 0.01}, {"lr": 0.3}),
    (torch.optim.Adagrad, "sum", {"initial_accumulator_value": 0.1}, {"initial_accumulator_value": 0.7}),
])
def test_a_reset_weight_takes_the_start_state_of_its_own_param_group(optimizer_class, key, first, second):
    """optim_state: a reset weight starts from what its optimizer class gives a new parameter with *its group's*
    settings: Rprop's step size = the group's lr, Adagrad's sum = the group's initial_accumulator_value (torch docs).
    The parameter sits in the second of two groups with different settings."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 3))
    optimizer = optimizer_class([{"params": [a], **first}, {"params": [b], **second}], lr=0.01)
    for step in range(3):
        a.grad, b.grad = torch.ones(3), torch.linspace(-1, 2, 6).view(2, 3) + step
        optimizer.step()
    before = optimizer.state[b][key].clone()
    keep = torch.tensor([[True, False, True], [False, True, True]])
    reset_optimizer_state(optimizer, b, keep)
    start = second.get("lr", second.get("initial_accumulator_value"))
    assert torch.equal(optimizer.state[b][key][keep], before[keep])
    assert (optimizer.state[b][key][~keep] == start).all()


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_half_precision_infinite_and_nan_scores_do_not_tie_with_the_largest_and_smallest_half_values(order):
    """finite_scores' docstring: scores are ranked in float32 at least, an infinite score above every finite one and
    a NaN below every finite one. float16's largest finite value is 65504 (torch.finfo), so by hand an inf float16
    score must beat a score of 65504, and a NaN must lose to -65504: each pair is given in both orders so that a
    tie (clamping to float16's range instead of float32's) cannot pass by topk's tie order."""
    inf, nan, big = float("inf"), float("nan"), 65504.0
    mask = torch.tensor([True, True, False])
    drop = torch.tensor([[inf, big][i] for i in order] + [0.0], dtype=torch.float16)
    new, _ = drop_and_grow(mask, drop, torch.zeros(3, dtype=torch.float16), 1, 0)
    assert new.tolist() == [order[0] == 0, order[1] == 0, False]                 # the +inf weight is kept
    drop = torch.tensor([[nan, -big][i] for i in order] + [0.0], dtype=torch.float16)
    new, _ = drop_and_grow(mask, drop, torch.zeros(3, dtype=torch.float16), 1, 0)
    assert new.tolist() == [order[0] == 1, order[1] == 1, False]                 # the NaN is dropped first
    # the same through prune, on a float16 layer whose weights are +inf and 65504
    layer = nn.Linear(2, 1, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[inf, big][i] for i in order]]))
    model = nn.Sequential(layer)
    kept = prune(model, {"0": layer.weight.detach().abs()}, 0.5)["0"]
    assert kept.tolist() == [[order[0] == 0, order[1] == 0]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_layer_of_no_weights_counts_as_fully_kept_and_prunes_to_nothing_without_error(scope):
    """kept_fraction's rule: a layer of no weights (an input width of 0, as growth from nothing makes) has nothing
    pruned, so its density is 1.0 and it keeps its 0 weights. By hand: with it beside a 3 × 2 layer pruned to 0.5,
    the model keeps 3 of 6 weights (0.5), the empty layer reports 1.0 and its repr prints, where 0 / 0 failed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # torch: "Initializing zero-element tensors is a no-op"
        model = nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 2))
        empty = nn.Sequential(nn.Linear(0, 3))
    attach_masks(model)
    assert "density=1.0000" in repr(model[0])
    prune(model, magnitude(model), 0.5, scope=scope)
    assert layer_densities(model) == {"0": 1.0, "1": 0.5}
    assert density(model) == 0.5
    assert model(torch.zeros(4, 0)).shape == (4, 2)
    attach_masks(empty)
    assert density(empty) == 1.0


def test_an_unmasked_layer_of_no_weights_is_dense_for_flop_counts_and_exports():
    """The same rule where the zeros of a weight are read instead of a mask: an empty 0 → 3 layer costs nothing and
    counts as dense, so the model's FLOPs are the 3 × 2 layer's 6 multiply-adds (3 · 2 = 6 per example, one example)
    and it exports as a CSR layer of no entries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.Linear(0, 3), nn.ReLU(), nn.Linear(3, 2))
    assert model_sparse_flops(model, torch.zeros(1, 0)) == 6.0
    exported = export(model, "csr")
    assert exported[0].values.numel() == 0 and exported(torch.zeros(4, 0)).shape == (4, 2)
