"""SNFS and Top-KAST against hand computations from the papers and the authors' code.

SNFS: the counts of one update as the authors' released code (github.com/TimDettmers/sparse_learning,
sparselearning/core.py and funcs.py) computes them, in the regime where the paper, that code and
lowlearn agree (no layer overflows, no dense layer, integer quotas).

Top-KAST (Jayakumar et al. 2020): the exploration penalty Ω = Σ_{i∈A}|θ_i| + Σ_{i∈B∖A}|θ_i|/D with a
*per-layer* D (lowlearn's documented extension to non-uniform allocations), and the backward rule
Δθ_i = 0 for i ∉ B under Adam across refreshes.
"""

import copy

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


def one_step(model, optimizer, sparsifier, seed):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 10, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()


def two_layer_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))      # 200 and 40 weights


def test_snfs_mean_momentum_is_over_the_active_weights_before_the_drop():
    """Paper's m_l = mean |M| over the layer's active weights (Dettmers & Zettlemoyer 2019, Alg. 1), by hand.

    Layer "0": 100 active of 200, layer "2": 3 active of 40, |M| = 1 at every active weight, so m_0 = m_2 = 1.
    update(0.3) drops ⌊0.3·100⌋ = 30 and ⌊0.3·3⌋ = 0; K = 30 is shared 15 : 15. A mean taken over the
    weights left after the drop (70 and 3) would give 1.43 : 1 and share 18 : 12.
    """
    model = two_layer_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = SNFS(model, optimizer, 0.5, distribution={"0": 0.5, "2": 0.075})
    assert sparsifier.active == {"0": 100, "2": 3}
    one_step(model, optimizer, sparsifier, 0)
    masks = masks_of(model)
    for name, m in sparsifier.momentum.items():
        m.copy_(masks[name].float())
    sparsifier.update(0.3)
    assert sparsifier.active == {"0": 100 - 30 + 15, "2": 3 + 15}
    assert {name: int(m.sum()) for name, m in masks_of(model).items()} == sparsifier.active


def test_an_snfs_state_dict_is_a_snapshot_and_loading_it_leaves_it_unchanged():
    """Reference: a deep copy of the state dict taken when it was made.

    Training on after state_dict() must not change the saved momentum (it is updated in place every step),
    and a sparsifier that loaded it and trains on must not write into it either: the same in-memory
    checkpoint can be loaded again, and then resumes exactly as the first time.
    """
    model = two_layer_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = SNFS(model, optimizer, 0.5, end=20, every=4)
    for seed in range(3):
        one_step(model, optimizer, sparsifier, seed)
    state = sparsifier.state_dict()
    snapshot = copy.deepcopy(state)
    for seed in range(3, 6):
        one_step(model, optimizer, sparsifier, seed)
    for name, m in snapshot["momentum"].items():
        assert torch.equal(state["momentum"][name], m), name            # saving took a copy

    model_state = copy.deepcopy(model.state_dict())
    runs = []
    for _ in range(2):                                                  # load the same dict twice
        other = two_layer_mlp()
        opt = torch.optim.SGD(other.parameters(), lr=0.1)
        resumed = SNFS(other, opt, 0.5, end=20, every=4)
        other.load_state_dict(model_state)
        resumed.load_state_dict(state)
        for seed in range(3, 6):
            one_step(other, opt, resumed, seed)
        runs.append({name: m.clone() for name, m in resumed.momentum.items()})
        for name, m in snapshot["momentum"].items():
            assert torch.equal(state["momentum"][name], m), name        # loading took a copy
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_topkast_backward_set_never_smaller_than_the_forward_set_under_a_custom_distribution():
    """Reference: B ⊇ A and |B| = max(k_A, k_B) (module docstring: "the larger set B ⊇ A").

    A distribution function is evaluated at both global densities; here it gives layer "2" a *lower* density
    at the backward density (0.2) than at the forward one (0.5). B must still contain A, so |B| = |A| = 20 for
    that layer, B = A = the top 20 |θ|.
    """
    def distribution(model, d):
        return {"0": d, "2": 0.5 if d < 0.4 else 0.2}

    model = two_layer_mlp()
    sparsifier = TopKAST(model, None, 0.3, 0.6, distribution=distribution)
    forward, backward = masks_of(model), sparsifier.backward_masks()
    assert int(forward["2"].sum()) == 20 and int(backward["2"].sum()) == 20
    assert torch.equal(forward["2"], backward["2"])
    top = model[2].parametrizations.weight.original.detach().abs().flatten().topk(20).indices
    expected = torch.zeros(40, dtype=torch.bool)
    expected[top] = True
    assert torch.equal(backward["2"].flatten(), expected)
    assert int(forward["0"].sum()) == 60 and int(backward["0"].sum()) == 120
    assert bool((backward["0"] | ~forward["0"]).all())
