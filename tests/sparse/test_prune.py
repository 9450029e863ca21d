import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from lowlearn.models import MLP, LeNet5
from lowlearn.sparse.mask import attach_masks, density, layer_densities, masks_of
from lowlearn.sparse.prune import check_density, kept_count, prune
from lowlearn.sparse.scores import magnitude, random
from lowlearn.sparse.structured import prune_channels, prune_nm


def test_layer_scope_keeps_the_largest_magnitudes_exactly():
    torch.manual_seed(0)
    model = MLP(hidden=(20, 10))
    weights = {name: layer.weight.detach().clone() for name, layer in
               [("1", model[1]), ("3", model[3]), ("5", model[5])]}
    masks = prune(model, magnitude(model), 0.3)
    for name, w in weights.items():
        k = kept_count(0.3, w.numel())
        assert masks[name].sum() == k
        threshold = w.abs().flatten().sort(descending=True).values[k - 1]
        assert (w.abs()[masks[name]] >= threshold).all()
        assert (w.abs()[~masks[name]] <= threshold).all()


def test_kept_count_by_hand():
    assert kept_count(0.37, 10) == 4 and kept_count(0.35, 10) == 4 and kept_count(0.34, 10) == 3     # rounded
    assert kept_count(1e-4, 10) == 1 and kept_count(1.0, 7) == 7                  # at least one, at most all


def test_global_scope_ranks_layers_together():
    model = MLP(hidden=(4,), in_features=4, out_features=2)
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(16.).view(4, 4) + 100)  # all larger than the next layer
        model[3].weight.copy_(torch.arange(8.).view(2, 4))
    masks = prune(model, magnitude(model), 0.5, scope="global")  # keep 12 of 24
    assert masks["1"].sum() == 12 and masks["3"].sum() == 0
    assert density(model) == 0.5


def test_global_scope_ranks_the_raw_scores_whatever_the_layer_sizes():
    # Layer "1" has 16 weights scored about 3, layer "3" 8 weights scored about 2: the global top 12 of the raw
    # scores are the 12 largest of layer "1" (a ranking of per-layer normalised scores would keep all of "3").
    model = MLP(hidden=(4,), in_features=4, out_features=2)
    scores = {"1": 3.0 + 1e-3 * torch.arange(16.).view(4, 4), "3": 2.0 + 1e-3 * torch.arange(8.).view(2, 4)}
    masks = prune(model, scores, 0.5, scope="global")                  # keep round(0.5 · 24) = 12
    assert torch.equal(masks["1"].flatten(), torch.arange(16) >= 4)
    assert not masks["3"].any()


def test_per_layer_densities_and_masks_only_shrink():
    model = LeNet5()
    target = {"features.0": 0.9, "features.3": 0.5, "classifier.1": 0.2, "classifier.3": 0.3, "classifier.5": 1.0}
    first = prune(model, random(model, torch.Generator().manual_seed(0)), target)
    for name, d in target.items():
        assert first[name].sum() == kept_count(d, first[name].numel())
    second = prune(model, random(model, torch.Generator().manual_seed(1)), 0.1, scope="global")
    for name in first:
        assert not (second[name] & ~first[name]).any(), "a pruned weight came back"
    assert abs(density(model) - 0.1) * sum(m.numel() for m in second.values()) <= 1


def test_pruned_scores_never_win_even_when_large():
    model = MLP(hidden=(10,), in_features=10, out_features=2)
    prune(model, magnitude(model), 0.5)
    huge = {name: torch.full(m.shape, 1e9) * ~m + torch.rand(m.shape) for name, m in masks_of(model).items()}
    before = masks_of(model)
    after = prune(model, huge, 0.25)
    for name in before:
        assert not (after[name] & ~before[name]).any()


def test_pruned_weights_stay_pruned_when_kept_weights_score_minus_infinity():
    # Log-magnitude scores are -inf at a kept weight that is exactly zero: it still ranks above every pruned one.
    model = MLP(hidden=(10,), in_features=10, out_features=2)
    prune(model, {"1": -torch.arange(100.0).view(10, 10), "3": torch.rand(2, 10)}, 0.5)
    before = masks_of(model)
    with torch.no_grad():
        model[1].parametrizations.weight.original[:5] = 0          # rows 0..4 are the kept half of layer "1"
    after = prune(model, {name: w.abs().log() for name, w in magnitude(model).items()}, 0.4)
    for name in before:
        assert not (after[name] & ~before[name]).any()
    assert int(after["1"].sum()) == 40


def test_float64_scores_are_ranked_in_float64():
    # Scores 1 + k·1e-12 are equal in float32: ranked there, the layer kept the lowest half.
    model = torch.nn.Sequential(torch.nn.Linear(8, 1))
    scores = {"0": 1 + 1e-12 * torch.arange(7, -1, -1, dtype=torch.float64).view(1, 8)}
    assert prune(model, scores, 0.5)["0"].tolist() == [[True] * 4 + [False] * 4]
    model = torch.nn.Sequential(torch.nn.Linear(8, 1))
    huge = {"0": torch.tensor([[1e300, 1e300, 1e39, 1e39, 1.0, 1.0, 2.0, 2.0]], dtype=torch.float64)}
    assert prune(model, huge, 0.25)["0"].tolist() == [[True, True] + [False] * 6]   # not inf (a tie) in float32


def test_numbers_may_be_numpy_scalars_wherever_a_number_is_taken():
    from lowlearn.sparse.lottery import _layer_fractions
    from lowlearn.sparse.schedule import UpdateSchedule
    from lowlearn.sparse.structured import channel_scores, nm_mask

    assert _layer_fractions(["1", "3"], np.float32(0.5), np.float64(0.25)) == {"1": 0.5, "3": 0.25}
    assert UpdateSchedule(100, 10, np.float32(0.5)).drop_fraction == 0.5
    assert nm_mask(torch.arange(8.0).view(2, 4), np.int64(2), np.int64(4)).sum() == 4
    assert set(channel_scores(MLP(hidden=(8,)), norm=np.int64(2))) == {"1", "3"}
    with pytest.raises(ValueError, match="integers 1 <= n <= m"):
        nm_mask(torch.arange(8.0).view(2, 4), True, 4)


def test_density_may_be_a_numpy_scalar_but_not_a_bool():
    assert check_density(np.float32(0.5)) == 0.5 and isinstance(check_density(np.float64(0.25)), float)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_density(True)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_density_outside_unit_interval_is_an_error(bad):
    model = MLP(hidden=(8,))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        prune(model, magnitude(model), bad)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_density(bad)


def test_a_density_mapping_may_cover_layers_that_are_not_scored():
    model = MLP(hidden=(8,))
    masks = prune(model, {"1": magnitude(model)["1"]}, {"1": 0.25, "3": 0.5})     # e.g. a whole erk(model)
    assert list(masks) == ["1"] and int(masks["1"].sum()) == kept_count(0.25, 8 * 784)
    assert not parametrize.is_parametrized(model.get_submodule("3"))


def test_other_bad_input():
    model = MLP(hidden=(8,))
    scores = magnitude(model)
    prune(model, scores, 0.5)
    with pytest.raises(ValueError, match="masks only shrink"):
        prune(model, magnitude(model), 0.8)
    with pytest.raises(ValueError, match="masks only shrink"):
        prune(model, magnitude(model), 0.8, scope="global")
    with pytest.raises(ValueError, match="scope must be"):
        prune(model, magnitude(model), 0.1, scope="row")
    with pytest.raises(ValueError, match="one density"):
        prune(model, magnitude(model), {"1": 0.1, "3": 0.1}, scope="global")
    with pytest.raises(KeyError, match="no density given"):
        prune(model, magnitude(model), {"1": 0.1})
    with pytest.raises(KeyError, match="no layer 'fc'"):               # a typo in a density mapping is an error
        prune(model, {"1": magnitude(model)["1"]}, {"1": 0.4, "fc": 0.5})
    with pytest.raises(ValueError, match="shape"):
        prune(model, {"1": torch.rand(3, 3)}, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        prune(model, {"1": torch.full((8, 784), float("nan"))}, 0.1)
    scores = magnitude(model)
    for name in scores:
        scores[name][0, -1] = float("nan")
    with pytest.raises(ValueError, match=r"the scores for '1', '3' contain NaN"):   # every such layer named
        prune(model, scores, 0.1)
    with pytest.raises(KeyError, match="no layer 'fc'"):
        prune(model, {"fc": torch.rand(8, 784)}, 0.1)
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match="no layer to prune"):
            prune(model, {}, 0.1, scope=scope)


@pytest.mark.parametrize("call", [
    lambda model: prune(model, magnitude(model), 1.5),
    lambda model: prune(model, {"1": torch.rand(3, 3)}, 0.1),
    lambda model: prune(model, {"1": torch.rand(8, 784), "fc": torch.rand(8, 784)}, 0.1),
    lambda model: prune(model, magnitude(model), 0.1, scope="row"),
    lambda model: prune_nm(model, 2, 4, {"1": torch.rand(8, 784), "3": torch.rand(10, 6)}),
    lambda model: prune_channels(model, {"1": 0.5}, layers=["1", "3"]),
])
def test_refused_pruning_leaves_the_model_unmasked(call):
    model = MLP(hidden=(8, 6))
    keys = list(model.state_dict())
    with pytest.raises((ValueError, KeyError)):
        call(model)
    assert list(model.state_dict()) == keys and not masks_of(model)


def test_optimizer_state_of_pruned_weights_is_zeroed():
    model = MLP(hidden=(8,))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 784)).sum().backward()
    optimizer.step()
    attach_masks(model)
    # attaching a parametrization keeps the same raw parameter object, and its state
    theta = model[1].parametrizations.weight.original
    assert theta in optimizer.state
    masks = prune(model, magnitude(model), 0.25, optimizer=optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        assert (optimizer.state[theta][key][~masks["1"]] == 0).all()
        assert (optimizer.state[theta][key][masks["1"]] != 0).any()
    assert layer_densities(model)["1"] == 0.25


def test_global_pruning_to_the_density_the_model_already_has_is_allowed_and_changes_nothing():
    """Masks only shrink, but pruning to exactly the weights still kept is no growth: accepted, masks unchanged
    (as with scope='layer')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    first = prune(model, magnitude(model), 0.4, scope="global")
    again = prune(model, magnitude(model), 0.4, scope="global")
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)
    assert sum(int(m.sum()) for m in masks_of(model).values()) == round(0.4 * (6 * 5 + 5 * 3))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_asking_for_one_weight_more_than_is_kept_is_refused_and_revives_nothing(scope):
    """The bound of "masks only shrink" is exact: 4 of 8 weights kept, a density of 5/8 would need one pruned
    weight back (top-k of the scores would take a pruned one, scored -inf), so it is refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    kept = prune(model, magnitude(model), 4 / 8, scope=scope)["0"]
    with pytest.raises(ValueError, match="masks only shrink"):
        prune(model, magnitude(model), 5 / 8, scope=scope)
    assert torch.equal(masks_of(model)["0"], kept)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("wrap, message", [
    (lambda layer: torch_prune.random_unstructured(layer, "weight", 0.5), "not a parameter but recomputed by a hook"),
    (lambda layer: torch.nn.utils.weight_norm(layer), "not a parameter but recomputed by a hook"),
    (lambda layer: torch.nn.utils.parametrizations.weight_norm(layer), "computed from several tensors"),
])
@pytest.mark.parametrize("call", [attach_masks, lambda model: prune(model, magnitude(model), 0.5),
                                  lambda model: prune_nm(model, 2, 4, magnitude(model))])
def test_a_weight_that_cannot_take_a_mask_is_refused_before_any_layer_is_masked(wrap, message, call):
    # The last layer's weight is recomputed by torch's own pruning or weight norm; the first layer must stay unmasked.
    model = MLP(hidden=(8,))
    wrap(model[3])
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=rf"the weight of layer '3' is {message}"):
        call(model)
    assert list(model.state_dict()) == keys and not masks_of(model)
