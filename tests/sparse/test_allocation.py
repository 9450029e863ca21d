import math

import pytest
import torch
from torch import nn

from lowlearn.models import MLP, Conv4, LeNet5
from lowlearn.sparse.allocation import erdos_renyi, erk, uniform
from lowlearn.sparse.mask import attach_masks, density, masks_of, prunable_layers
from lowlearn.sparse.prune import prune
from lowlearn.sparse.scores import magnitude

ALLOCATIONS = [uniform, erdos_renyi, erk]


def small_net():
    """conv (3, 2, 3, 3): 54 weights; fc1 (3, 4): 12; fc2 (2, 3): 6; N = 72."""
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))


def budget(model, densities):
    sizes = {name: m.weight.numel() for name, m in model.named_modules() if name in densities}
    return sum(densities[name] * sizes[name] for name in densities), sum(sizes.values())


def test_erk_by_hand_no_layer_capped():
    # r_conv = (3+2+3+3)/54 = 11/54, r_fc1 = (4+3)/12 = 7/12, r_fc2 = (3+2)/6 = 5/6.
    # Σ r_l n_l = 11 + 7 + 5 = 23; at d = 0.3, d·N = 21.6 and ε = 21.6/23.
    # fc2: 5/6 · 21.6/23 = 18/23 < 1, so no layer is capped.
    eps = 21.6 / 23
    expected = {"0": 11 / 54 * eps, "2": 7 / 12 * eps, "3": 5 / 6 * eps}
    got = erk(small_net(), 0.3)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12)
    assert got["3"] == pytest.approx(18 / 23)


def test_erk_by_hand_cap_and_redistribute():
    # d = 0.5: d·N = 36, ε = 36/23, fc2 would get 5/6 · 36/23 = 30/23 > 1, so fc2 is dense (6 weights).
    # Again without fc2: ε = (36 - 6) / (11 + 7) = 5/3; conv 11/54 · 5/3 = 55/162, fc1 7/12 · 5/3 = 35/36 ≤ 1.
    got = erk(small_net(), 0.5)
    assert got == pytest.approx({"0": 55 / 162, "2": 35 / 36, "3": 1.0}, rel=1e-12)
    sizes = {name: layer.weight.numel() for name, layer in prunable_layers(small_net()).items()}
    assert sum(got[name] * sizes[name] for name in got) == pytest.approx(0.5 * sum(sizes.values()), rel=1e-12)


def test_erk_by_hand_two_layers_capped_at_once():
    # d = 0.8: d·N = 57.6, ε = 57.6/23 ≈ 2.504: fc1 (7/12·ε ≈ 1.46) and fc2 (≈ 2.09) both exceed 1.
    # Without them: conv keeps 57.6 - 12 - 6 = 39.6 of 54 weights.
    assert erk(small_net(), 0.8) == pytest.approx({"0": 39.6 / 54, "2": 1.0, "3": 1.0}, rel=1e-12)


def test_erdos_renyi_by_hand_ignores_the_kernel():
    # r_conv = (3+2)/(3·2) = 5/6 (kernel ignored), r_fc1 = 7/12, r_fc2 = 5/6.
    # Σ r_l n_l = 5/6·54 + 7 + 5 = 57; at d = 0.3, ε = 21.6/57.
    eps = 21.6 / 57
    assert erdos_renyi(small_net(), 0.3) == pytest.approx(
        {"0": 5 / 6 * eps, "2": 7 / 12 * eps, "3": 5 / 6 * eps}, rel=1e-12)


def one_at_a_time(shapes, d):
    """RigL's loop (sparse_utils.get_sparsities_erdos_renyi): make only the layer(s) of the
    largest raw probability dense each round. An independent reference for the solver."""
    n = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense = set()
    while True:
        rest = [k for k in n if k not in dense]
        eps = (d * sum(n.values()) - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in rest)
        top = max(raw[k] for k in rest)
        if top * eps <= 1:
            return {k: 1.0 if k in dense else eps * raw[k] for k in n}
        dense |= {k for k in rest if raw[k] == top}


@pytest.mark.parametrize("make", [MLP, LeNet5, Conv4, lambda: LeNet5(channels=(20, 50), hidden=(500,), padding=0)])
@pytest.mark.parametrize("d", [0.01, 0.05, 0.2, 0.5, 0.9])
def test_erk_matches_the_one_at_a_time_loop(make, d):
    model = make()
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert erk(model, d) == pytest.approx(one_at_a_time(shapes, d), rel=1e-9)


def tiny_layer_model():
    # The 2-weight layer would get a density far above 1: it must become dense.
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1), nn.ReLU(), nn.Linear(1, 2))


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("make", [MLP, LeNet5, Conv4, tiny_layer_model])
@pytest.mark.parametrize("d", [0.02, 0.1, 0.37, 1.0])
def test_pruning_to_an_allocation_keeps_the_global_budget(allocation, make, d):
    torch.manual_seed(0)
    model = make()
    densities = allocation(model, d)
    assert all(0 < v <= 1 for v in densities.values())
    planned, total = budget(model, densities)
    assert planned == pytest.approx(d * total, rel=1e-12)
    prune(model, magnitude(model), densities)
    kept = sum(int(m.sum()) for m in masks_of(model).values())
    assert abs(kept - d * total) <= len(densities)
    assert abs(density(model) - d) <= len(densities) / total


def test_tiny_layer_becomes_dense():
    densities = erk(tiny_layer_model(), 0.1)
    assert densities["4"] == 1.0 and densities["2"] == 1.0
    assert densities["0"] == pytest.approx((0.1 * (4096 + 64 + 2) - 66) / 4096)


@pytest.mark.parametrize("allocation", [erdos_renyi, erk])
def test_density_one_is_every_layer_dense_when_rounding_makes_every_layer_exceed_one(allocation):
    # Weights (1, 10) and (2, 9): r = 11/10 and 11/18, Σ r_l n_l = 22, ε = 28/22 = 14/11 at d = 1.
    # The first layer exceeds 1 (1.4) and is made dense; the second then has ε = 18/11 and
    # ε·r = 1 exactly, but in floating point 18/11 · 11/18 > 1: both end dense, with density 1.0 each.
    model = nn.Sequential(nn.Linear(10, 1), nn.Linear(9, 2))
    assert allocation(model, 1.0) == {"0": 1.0, "1": 1.0}


def test_allocations_follow_masks_and_layer_names():
    model = MLP(hidden=(32, 16))
    assert list(erk(model, 0.5)) == ["1", "3", "5"]
    assert list(erk(model, 0.5, layers=["1", "3"])) == ["1", "3"]
    attach_masks(model, ["3", "5"])
    assert list(uniform(model, 0.5)) == ["3", "5"]


def test_uniform_and_dense_first():
    model = MLP(in_features=10, hidden=(20,), out_features=5)   # 200 + 100 weights
    assert uniform(model, 0.3) == {"1": 0.3, "3": 0.3}
    # d = 0.8: 240 weights; the first layer keeps its 200, the second 40 of 100.
    assert uniform(model, 0.8, dense_first=True) == pytest.approx({"1": 1.0, "3": 0.4})
    assert uniform(model, 1.0, dense_first=True) == {"1": 1.0, "3": 1.0}
    with pytest.raises(ValueError, match="first layer '1' alone has 200.*more than 0.6667"):
        uniform(model, 0.5, dense_first=True)
    with pytest.raises(ValueError, match="first layer"):
        uniform(nn.Sequential(nn.Linear(4, 4)), 0.5, dense_first=True)
    assert uniform(nn.Sequential(nn.Linear(4, 4)), 1.0, dense_first=True) == {"0": 1.0}   # all of it is dense


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), "0.5"])
def test_bad_density(allocation, bad):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        allocation(MLP(), bad)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_bad_layers(allocation):
    with pytest.raises(KeyError, match="no layer 'fc9'"):
        allocation(MLP(), 0.5, layers=["fc9"])
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        allocation(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="weight of shape"):
        allocation(Conv4(), 0.5, layers=["features.1"])   # a batch norm


def test_dense_first_keeps_the_first_layer_dense_when_it_is_not_the_largest():
    """Hand computation of uniform(dense_first=True) on a model whose *second* layer is the larger one.

    MLP(4 → 20 → 10): layer "1" has 80 weights, layer "3" 200, N = 280. At d = 0.5 the model keeps 140;
    the first layer keeps its 80, so the other keeps d' = (140 − 80) / 200 = 0.3 (RigL's dense first layer is
    the input layer, in named_modules order, not the largest one). At d = 0.6: (168 − 80) / 200 = 0.44.
    """
    model = MLP(in_features=4, hidden=(20,), out_features=10)
    assert uniform(model, 0.5, dense_first=True) == pytest.approx({"1": 1.0, "3": 0.3})
    assert uniform(model, 0.6, dense_first=True) == pytest.approx({"1": 1.0, "3": 0.44})
    with pytest.raises(ValueError, match="first layer '1' alone has 80"):
        uniform(model, 80 / 280, dense_first=True)              # the budget is exactly the first layer
    # the layers listed in another order: the first layer is still the model's input layer, "1"
    assert uniform(model, 0.5, dense_first=True, layers=["3", "1"]) == pytest.approx({"1": 1.0, "3": 0.3})


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_the_layers_come_back_in_the_models_order_whatever_the_order_they_are_named_in(allocation):
    model = small_net()
    assert list(allocation(model, 0.5, layers=["3", "0", "2"])) == ["0", "2", "3"]
