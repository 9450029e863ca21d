"""SNFS and Top-KAST against hand computations from the papers and the authors' code.

SNFS: the counts of one update as the authors' released code (github.com/TimDettmers/sparse_learning,
sparselearning/core.py and funcs.py) computes them, in the regime where the paper, that code and
lowlearn agree (no layer overflows, no dense layer, integer quotas).

Top-KAST (Jayakumar et al. 2020): the exploration penalty Ω = Σ_{i∈A}|θ_i| + Σ_{i∈B∖A}|θ_i|/D with a
*per-layer* D (lowlearn's documented extension to non-uniform allocations), and the backward rule
Δθ_i = 0 for i ∉ B under Adam across refreshes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.models import MLP
from lowlearn.sparse.allocation import erk
from lowlearn.sparse.dst import SNFS
from lowlearn.sparse.mask import masks_of, prunable_layers, raw_weight
from lowlearn.sparse.prune import kept_count
from lowlearn.sparse.topkast import TopKAST


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_snfs_counts_match_the_authors_code_when_no_layer_overflows(regrow_dropped):
    """Three layers of 100, 200, 200 weights at 40, 40, 80 active; |M| = 2, 1, 1 on the active weights
    (the mean over *active* weights is what the authors' ``momentum_redistribution`` takes), 5 elsewhere
    (must not count). At f = 0.25 the layers drop 10, 10, 20 (K = 40) and regrow K·(½, ¼, ¼) = 20, 10,
    10: the authors' code (ceil of the drop, share of K, floor of the growth) gives the same counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10))
    sparsifier = SNFS(model, None, 0.5, distribution={"0": 0.4, "2": 0.2, "4": 0.4},
                      regrow_dropped=regrow_dropped)
    means = {"0": 2.0, "2": 1.0, "4": 1.0}
    for name, mask in sparsifier.masks().items():
        sparsifier.momentum[name] = torch.where(mask, means[name], 5.0)
    before = dict(sparsifier.active)
    assert before == {"0": 40, "2": 40, "4": 80}
    removed, grown = {"0": 10, "2": 10, "4": 20}, {"0": 20, "2": 10, "4": 10}
    sparsifier.update(0.25)
    assert sparsifier.active == {name: before[name] - removed[name] + grown[name] for name in before}


def test_topkast_penalty_uses_each_layers_own_forward_density():
    """Ω = Σ_l [Σ_{i∈A_l}|θ_i| + Σ_{i∈B_l∖A_l}|θ_i| / D_l] with D_l the layer's ERK forward density
    (by hand, per layer, from the densities ERK gives), and ∂Ω/∂θ = sign(θ)(1_A + 1_{B∖A}/D_l), 0 off B."""
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(16, 12), out_features=4)
    sparsifier = TopKAST(model, None, 0.3, 0.6, distribution="erk")
    d_forward = erk(model, 0.3, layers=list(prunable_layers(model)))
    assert len(set(round(d, 6) for d in d_forward.values())) > 1          # the layers' D really differ
    forward, backward = masks_of(model), sparsifier.backward_masks()
    expected, grads = 0.0, {}
    for name, layer in prunable_layers(model).items():
        theta = raw_weight(layer).detach()
        a, b = forward[name], backward[name]
        assert int(a.sum()) == kept_count(d_forward[name], theta.numel())
        expected += theta[a].abs().sum().item() + theta[b & ~a].abs().sum().item() / d_forward[name]
        grads[name] = theta.sign() * (a.double() + (b & ~a).double() / d_forward[name])
    penalty = sparsifier.penalty()
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for name, layer in prunable_layers(model).items():
        assert torch.allclose(raw_weight(layer).grad.double(), grads[name], rtol=1e-6, atol=1e-7)


def test_topkast_under_adam_moves_only_b_and_keeps_a_inside_b_at_every_refresh():
    """Paper: Δθ_i = −η ∇_α L(α)_i for i ∈ B, 0 otherwise. Under Adam a weight that leaves B at a refresh
    still has moments; they are reset, so from then on it does not move. After every refresh A and B are
    the top-|A| and top-|B| of |θ| (no ties in random floats), with A ⊆ B."""
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(16, 12), out_features=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    sparsifier = TopKAST(model, optimizer, 0.2, 0.4, every=1)
    generator = torch.Generator().manual_seed(1)
    left_b = 0
    for _ in range(8):
        x, y = torch.randn(8, 20, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        outside = {name: ~b for name, b in sparsifier.backward_masks().items()}
        theta = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
        optimizer.step()
        for name, layer in prunable_layers(model).items():
            assert torch.equal(raw_weight(layer).detach()[outside[name]], theta[name][outside[name]])
        old_b = sparsifier.backward_masks()
        sparsifier.step()
        for name, layer in prunable_layers(model).items():
            magnitude = raw_weight(layer).detach().abs().flatten()
            a, b = masks_of(model)[name].flatten(), sparsifier.backward_masks()[name].flatten()
            assert not (a & ~b).any()
            assert magnitude[a].min() > magnitude[~a].max() and magnitude[b].min() > magnitude[~b].max()
            left_b += int((old_b[name].flatten() & ~b).sum())
    assert left_b > 0                                                  # some weights did leave B
