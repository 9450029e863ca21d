"""Reference tests for lowlearn.sparse.structured: N:M masks and channel pruning against slow Python loops."""

import pytest
import torch
from torch import nn

from lowlearn.sparse.mask import attach_masks, masks_of, raw_weight, set_masks, squash
from lowlearn.sparse.structured import channel_scores, nm_mask, prune_channels, prune_nm


def slow_nm_linear(weight, n, m):
    """Mishra et al. (2021) / NVIDIA ASP for a Linear weight (out, in): for every row and every group of m
    consecutive input features, keep the n largest |w| (indices written out, no reshape)."""
    out, fan_in = weight.shape
    keep = [[False] * fan_in for _ in range(out)]
    for r in range(out):
        for g in range(fan_in // m):
            idx = list(range(g * m, (g + 1) * m))
            idx.sort(key=lambda j: -abs(float(weight[r, j])))
            for j in idx[:n]:
                keep[r][j] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("out,fan_in,n,m", [(7, 16, 2, 4), (3, 24, 1, 8), (5, 6, 2, 3), (4, 10, 1, 2), (2, 12, 4, 4)])
def test_nm_mask_of_a_linear_weight_groups_along_in_features_as_asp_does(out, fan_in, n, m):
    """Linear (out, in): groups of m consecutive weights along in_features (the reduction dimension of x Wᵀ),
    n largest |w| kept; a loop over rows and groups with explicit indices is the reference. Also checks that the
    groups do not run along out_features: the transposed weight's mask differs in general."""
    g = torch.Generator().manual_seed(out * 100 + fan_in + n + m)
    w = torch.randn(out, fan_in, generator=g)
    mask = nm_mask(w, n, m)
    assert torch.equal(mask, slow_nm_linear(w, n, m))
    for r in range(out):
        for c0 in range(0, fan_in, m):
            assert int(mask[r, c0:c0 + m].sum()) == n


def test_nm_mask_with_ties_keeps_exactly_n_and_the_n_largest_magnitudes():
    """With ties the choice is arbitrary (documented), but the multiset of kept |w| in each group must be the n
    largest |w| of the group: a slow sort of each group's magnitudes is the reference. Signs do not matter."""
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0],
                      [-2.0, 2.0, 3.0, -3.0, 0.1, -0.1, 0.1, 0.2],
                      [5.0, 5.0, 5.0, 5.0, -1.0, 1.0, -1.0, 1.0]])
    for n in (1, 2, 3):
        mask = nm_mask(w, n, 4)
        for r in range(3):
            for c0 in (0, 4):
                group = [abs(v) for v in w[r, c0:c0 + 4].tolist()]
                kept = sorted(abs(float(w[r, c0 + j])) for j in range(4) if mask[r, c0 + j])
                assert len(kept) == n
                assert kept == sorted(group, reverse=True)[:n][::-1]


def test_nm_mask_conv2d_default_order_is_the_nchw_im2col_order():
    """Conv2d (out, in, k_h, k_w): the reduction dimension of the NCHW im2col product (F.unfold) runs over
    (in, k_h, k_w) with k_w fastest. A reference built on F.unfold's column order: the conv computed as
    unfold(x) ᵀ · W_flat, where groups of m consecutive entries of W_flat's row are the N:M groups; the product
    with the masked weight equals the conv with nm_mask's mask."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, 3, 2, generator=g)            # reduction 2·3·2 = 12: groups of 4 span k_h rows
    mask = nm_mask(w, 2, 4)
    flat = w.reshape(4, 12)
    ref = torch.zeros(4, 12, dtype=torch.bool)
    for o in range(4):
        for c0 in range(0, 12, 4):
            order = sorted(range(4), key=lambda j: -abs(float(flat[o, c0 + j])))
            for j in order[:2]:
                ref[o, c0 + j] = True
    # the ordering of flat's columns is F.unfold's: check by computing the convolution both ways
    x = torch.randn(1, 2, 5, 4, generator=g)
    cols = nn.functional.unfold(x, (3, 2))                                  # (1, 12, L)
    via_unfold = ((flat * ref).unsqueeze(0) @ cols).view(1, 4, 3, 3)
    torch.testing.assert_close(nn.functional.conv2d(x, w * mask), via_unfold)
    assert torch.equal(mask, ref.view_as(w))


@pytest.mark.parametrize("shape,m", [((4, 3, 3, 3), 4), ((5, 6), 4), ((3, 2), 4), ((2, 1, 5, 5), 2)])
def test_nm_mask_refuses_shapes_m_does_not_divide(shape, m):
    """A reduction dimension that m does not divide is a ValueError naming the size and m (no silent padding)."""
    size = torch.Size(shape[1:]).numel()
    with pytest.raises(ValueError, match=f"reduction dimension of {size} weights does not split into groups of m={m}"):
        nm_mask(torch.randn(shape), 1, m)


def test_prune_nm_on_a_conv_and_linear_model_against_the_slow_loop_and_the_outputs():
    """prune_nm with default magnitude scores on a model of a Conv2d and a Linear: every layer's mask is the slow
    per-group reference, the masked model's output equals a hand-written forward with W ⊙ mask, and squash
    keeps the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    w0, w3 = model[0].weight.detach().clone(), model[3].weight.detach().clone()
    masks = prune_nm(model, 2, 4)
    ref0 = slow_nm_linear(w0.reshape(4, -1), 2, 4).view_as(w0)
    ref3 = slow_nm_linear(w3, 2, 4)
    assert torch.equal(masks["0"], ref0) and torch.equal(masks["3"], ref3)
    x = torch.randn(3, 2, 4, 4)
    hidden = torch.relu(nn.functional.conv2d(x, w0 * ref0, model[0].bias)).flatten(1)
    expected = hidden @ (w3 * ref3).T + model[3].bias
    torch.testing.assert_close(model(x), expected)
    squash(model)
    torch.testing.assert_close(model(x), expected)


def test_prune_nm_twice_only_shrinks_and_picks_among_the_survivors():
    """2:4 then 1:4 by fresh random scores: the second mask is, per group, the single highest score among the two
    survivors of the first (slow loop), and is contained in the first."""
    model = nn.Sequential(nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    first = prune_nm(model, 2, 4, scores={"0": torch.rand(3, 8, generator=g)})["0"]
    scores = torch.rand(3, 8, generator=g)
    second = prune_nm(model, 1, 4, scores={"0": scores})["0"]
    ref = torch.zeros(3, 8, dtype=torch.bool)
    for r in range(3):
        for c0 in (0, 4):
            alive = [c0 + j for j in range(4) if first[r, c0 + j]]
            ref[r, max(alive, key=lambda j: float(scores[r, j]))] = True
    assert torch.equal(second, ref)
    assert not (second & ~first).any()


def test_channel_scores_of_conv_filters_match_li_et_al_sum_of_absolute_kernel_weights():
    """Li et al. (2017) §3.1: a filter F_j of a Conv2d (out, in, k, k) is ranked by s_j = Σ_{in,k,k} |F_j|
    (ℓ1; ℓ2 for norm=2): a triple loop over every filter's weights is the reference, for a masked conv too
    (the effective weight is scored)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 1))
    attach_masks(model)
    keep = torch.rand(5, 3, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.6
    set_masks(model, {"0": keep})
    w = (raw_weight(model[0]) * keep).detach()
    l1, l2 = [], []
    for j in range(5):
        values = [float(w[j, c, a, b]) for c in range(3) for a in range(3) for b in range(3)]
        l1.append(sum(abs(v) for v in values))
        l2.append(sum(v * v for v in values) ** 0.5)
    assert channel_scores(model, 1)["0"].tolist() == pytest.approx(l1, rel=1e-6)
    assert channel_scores(model, 2)["0"].tolist() == pytest.approx(l2, rel=1e-6)
    assert channel_scores(model)["2"].shape == (4,)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.7, 1.0])
def test_prune_channels_of_a_conv_keeps_the_filters_of_largest_l1_norm(density):
    """Li et al. (2017) §3.1 steps 1–4 for one layer: sort the filters by Σ|F_j|, prune the smallest; keep
    round(d · n_out). The mask is the weight's shape with whole filters (all in·k·k weights) on or off, the bias
    of a pruned filter is masked too, and a pruned channel's output is exactly zero. Reference: Python sort."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    w = model[0].weight.detach().clone()
    units = prune_channels(model, density)
    assert list(units) == ["0"]                                 # the last layer is left alone
    norms = [float(w[j].abs().sum()) for j in range(8)]
    k = max(1, round(density * 8))
    expected = sorted(sorted(range(8), key=lambda j: -norms[j])[:k])
    assert units["0"].nonzero().flatten().tolist() == expected
    mask = masks_of(model)["0"]
    assert mask.shape == w.shape
    for j in range(8):
        assert bool(mask[j].all()) == (j in expected) and bool(mask[j].any()) == (j in expected)
        if j not in expected:
            assert model[0].bias[j] == 0
    out = model[0](torch.randn(2, 3, 6, 6))
    dropped = [j for j in range(8) if j not in expected]
    assert (out[:, dropped] == 0).all()


def test_prune_channels_of_a_linear_removes_rows_not_columns():
    """For a Linear (out, in) a unit is a row (an output neuron with its incoming weights, as in the book);
    the kept rows are the round(d · out) of largest Σ_i |W_ji|, written as a loop."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    w = model[0].weight.detach().clone()
    units = prune_channels(model, 0.3)
    norms = [sum(abs(float(w[j, i])) for i in range(6)) for j in range(10)]
    expected = set(sorted(range(10), key=lambda j: -norms[j])[:3])
    assert set(units["0"].nonzero().flatten().tolist()) == expected
    mask = masks_of(model)["0"]
    assert mask.all(dim=1).sum() == 3 and torch.equal(mask.any(dim=1), mask.all(dim=1))
