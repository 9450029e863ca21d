import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lowlearn.models import MLP, Conv4, LeNet5
from lowlearn.sparse.mask import attach_masks, masks_of, raw_weight, set_masks, squash
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.scores import magnitude, random
from lowlearn.sparse.structured import channel_scores, nm_mask, prune_channels, prune_nm


def slow_nm(weight, n, m):
    """Per-group reference: flatten each output row, walk its groups of m, keep the n largest |w|."""
    rows = weight.reshape(weight.shape[0], -1)
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], m):
            group = [abs(float(v)) for v in rows[r, start:start + m]]
            for j in sorted(range(m), key=lambda j: -group[j])[:n]:
                keep[r, start + j] = True
    return keep.view(weight.shape)


SHAPES = [(5, 8), (3, 12), (4, 2, 3, 2), (6, 4, 1, 1), (2, 3, 2, 2), (3, 2, 2, 4)]
NM = [(2, 4), (1, 4), (1, 2), (3, 4), (4, 4), (2, 8)]


@pytest.mark.parametrize("shape,n,m", [(s, n, m) for s in SHAPES for n, m in NM
                                        if torch.Size(s[1:]).numel() % m == 0])
def test_nm_mask_matches_a_per_group_reference(shape, n, m):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + 10 * n + m))
    mask = nm_mask(weight, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, slow_nm(weight, n, m))
    assert (mask.reshape(shape[0], -1, m).sum(-1) == n).all()


def test_nm_conv_groups_run_in_memory_order():
    # (out=1, in=2, k_h=1, k_w=4): the reduction order is in, k_h, k_w, so each input channel's
    # four kernel weights form one group.
    w = torch.tensor([[[[1.0, -4.0, 3.0, 2.0]], [[0.1, 0.2, -0.4, 0.3]]]])
    assert nm_mask(w).tolist() == [[[[False, True, True, False]], [[False, False, True, True]]]]


def test_nm_bad_input():
    w = torch.randn(4, 8)
    for n, m in [(3, 2), (0, 4), (-1, 4), (2, 0), (2.0, 4), (2, "4")]:
        with pytest.raises(ValueError, match="1 <= n <= m"):
            nm_mask(w, n, m)
    with pytest.raises(ValueError, match="reduction dimension of 6 weights does not split into groups of m=4"):
        nm_mask(torch.randn(4, 6))
    with pytest.raises(ValueError, match="needs an"):
        nm_mask(torch.randn(8))
    with pytest.raises(ValueError, match="1 <= n <= m"):
        prune_nm(MLP(), 5, 4)


def test_nm_mask_refuses_a_nan_weight_rather_than_keeping_it_as_the_largest():
    w = torch.tensor([[float("nan"), 0.1, 3.0, 2.0]])
    with pytest.raises(ValueError, match="the weight contains NaN"):
        nm_mask(w)
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(w)
    with pytest.raises(ValueError, match="the scores for '0' contain NaN"):     # prune_nm refuses it too
        prune_nm(model)


def test_prune_nm_on_a_model_keeps_n_of_every_m_and_zeroes_the_rest():
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    expected = {name: nm_mask(w) for name, w in magnitude(model).items()}
    masks = prune_nm(model, optimizer=optimizer)
    assert masks.keys() == expected.keys() == masks_of(model).keys()
    for name, layer in [("1", model[1]), ("3", model[3])]:
        assert torch.equal(masks[name], expected[name])
        assert torch.equal(masks_of(model)[name], expected[name])
        assert (layer.weight.reshape(layer.weight.shape[0], -1, 4).ne(0).sum(-1) == 2).all()
        theta = raw_weight(layer)
        assert (theta[~masks[name]] == 0).all()
        assert (optimizer.state[theta]["exp_avg"][~masks[name]] == 0).all()


def test_prune_nm_respects_existing_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    attach_masks(model)
    before = torch.rand(6, 8, generator=torch.Generator().manual_seed(3)) < 0.6
    set_masks(model, {"0": before})
    # Reference: per group, the 2 largest |w| among the weights still kept (pruned ones scored 0 < 1 + |w|).
    reference = slow_nm(torch.where(before, model[0].weight.detach().abs() + 1, 0.0), 2, 4) & before
    masks = prune_nm(model)
    assert torch.equal(masks["0"], reference)
    assert not (masks["0"] & ~before).any()
    groups = masks["0"].view(6, 2, 4).sum(-1)
    assert (groups == before.view(6, 2, 4).sum(-1).clamp(max=2)).all()
    assert (raw_weight(model[0])[~masks["0"]] == 0).all()


def test_prune_nm_only_the_layers_scored():
    model = LeNet5()   # the first convolution has 1·5·5 = 25 weights per filter: 4 does not divide it
    with pytest.raises(ValueError, match="layer 'features.0'.*groups of m=4.*pass scores= without it"):
        prune_nm(model)
    assert not masks_of(model)                                    # refused before any layer was masked
    scores = {name: s for name, s in random(model).items() if name != "features.0"}
    with pytest.raises(ValueError, match="layer 'features.3'"):   # 6·5·5 = 150 is not a multiple of 4 either
        prune_nm(model, scores=scores)
    scores = {name: s for name, s in scores.items() if name.startswith("classifier")}
    masks = prune_nm(model, scores=scores)
    assert list(masks) == ["classifier.1", "classifier.3", "classifier.5"]
    with pytest.raises(KeyError, match="no layer 'fc'"):
        prune_nm(model, scores={"fc": torch.rand(3, 4)})


def test_channel_scores_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.Conv2d(1, 2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 2.0], [0.0, 3.0, -4.0]]))
        model[1].weight.copy_(torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]]], [[[0.0, 0.0], [0.0, -2.0]]]]))
    l1 = channel_scores(model)
    assert l1["0"].tolist() == [5.0, 7.0] and l1["1"].tolist() == [4.0, 2.0]
    l2 = channel_scores(model, norm=2)
    assert l2["0"].tolist() == [3.0, 5.0] and l2["1"].tolist() == [2.0, 2.0]
    assert list(channel_scores(model, layers=["1"])) == ["1"]
    for bad in (0, -1, "l1"):
        with pytest.raises(ValueError, match="norm is the p of a p-norm"):
            channel_scores(model, norm=bad)


def test_channel_scores_of_a_layer_without_rows_is_a_clear_error():
    model = Conv4(hidden=4)
    with pytest.raises(ValueError, match=r"'features.1' is a BatchNorm2d; channel scoring is defined for nn.Linear"):
        channel_scores(model, layers=["features.0", "features.1"])
    attach_masks(model, ["features.1"])                     # a masked norm layer is named as what it is
    with pytest.raises(ValueError, match=r"layer 'features.1' is a BatchNorm2d"):
        channel_scores(model)
    with pytest.raises(ValueError, match="layer 'features.1' is a BatchNorm2d; channel pruning is defined for"):
        prune_channels(model, 0.5, layers=["features.1"])


def test_structured_patterns_refuse_a_transposed_convolution_whose_units_sit_the_other_way_round():
    # ConvTranspose2d(3, 8, 2) has weights (in=3, out=8, 2, 2): rows are its inputs, and its reduction runs along
    # dim 0; before this was refused, channel_scores gave 3 "unit" norms and N:M grouped along the outputs
    model = nn.Sequential(nn.ConvTranspose2d(3, 8, 2), nn.Flatten(), nn.Linear(8 * 25, 4))
    attach_masks(model, ["0"])
    with pytest.raises(ValueError, match="layer '0' is a ConvTranspose2d; channel scoring is defined for"):
        channel_scores(model)
    with pytest.raises(ValueError, match="layer '0' is a ConvTranspose2d; N:M pruning is defined for"):
        prune_nm(model)
    assert masks_of(model)["0"].all()                       # refused before anything changed


def capture(model, names):
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
               for name in names]
    return outputs, handles


@pytest.mark.parametrize("norm", [1, 2])
def test_prune_channels_lenet5(norm):
    torch.manual_seed(0)
    model = LeNet5()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    scores = channel_scores(model, norm)
    units = prune_channels(model, 0.5, norm=norm, optimizer=optimizer)
    layers = ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert list(units) == layers   # the output layer classifier.5 is left alone
    assert list(masks_of(model)) == layers
    modules = dict(model.named_modules())
    for name in layers:
        keep, layer = units[name], modules[name]
        n_out = layer.weight.shape[0]
        assert keep.shape == (n_out,) and int(keep.sum()) == round(0.5 * n_out)
        assert scores[name][keep].min() >= scores[name][~keep].max()          # the largest norms survive
        assert (layer.weight[~keep] == 0).all() and (layer.weight[keep] != 0).any(dim=1).all()
        assert (layer.bias[~keep] == 0).all() and torch.equal(layer.bias[keep] != 0, torch.ones_like(keep[keep]))
        for raw in (raw_weight(layer), layer.parametrizations.bias.original):
            assert (raw[~keep] == 0).all()
            assert (optimizer.state[raw]["momentum_buffer"][~keep] == 0).all()
    x = torch.randn(5, 1, 28, 28)
    outputs, handles = capture(model, layers)
    before = model(x)
    for name in layers:
        out = outputs[name]   # before the ReLU
        assert (out[:, ~units[name]] == 0).all() and (out[:, units[name]] != 0).any()
    for handle in handles:
        handle.remove()
    squash(model)
    assert all(type(m).__name__ in ("Conv2d", "Linear") for m in modules.values() if hasattr(m, "weight"))
    assert all(isinstance(modules[name].bias, nn.Parameter) for name in layers)
    assert torch.equal(model(x), before)
    assert all((modules[name].bias[~units[name]] == 0).all() for name in layers)


def test_prune_channels_only_shrinks_and_combines_with_unstructured_pruning():
    torch.manual_seed(0)
    model = MLP(in_features=10, hidden=(12, 8), out_features=3)
    first = prune_channels(model, 0.5)
    assert {k: int(v.sum()) for k, v in first.items()} == {"1": 6, "3": 4}
    second = prune_channels(model, {"1": 0.25, "3": 0.5}, optimizer=None)
    assert int(second["1"].sum()) == 3 and not (second["1"] & ~first["1"]).any()
    assert torch.equal(second["3"], first["3"])
    assert not (model[1].parametrizations.bias[0].mask.bool() & ~second["1"]).any()
    with pytest.raises(ValueError, match="layer '1' has 3 units left, so it cannot keep 6"):
        prune_channels(model, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '3' has 4 units left, so it cannot keep 6"):
        prune_channels(model, {"1": 1 / 6, "3": 0.75})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "a failed call changes nothing"
    # Unstructured pruning afterwards keeps the removed units removed.
    prune(model, magnitude(model), 0.1)
    assert (model[1].weight[~second["1"]] == 0).all()


def test_prune_channels_conv_without_bias_and_chosen_layers():
    model = Conv4(num_classes=5, hidden=8)
    units = prune_channels(model, 0.25, layers=["features.4", "head"])
    assert list(units) == ["features.4", "head"]
    assert int(units["features.4"].sum()) == 2 and int(units["head"].sum()) == kept_count(0.25, 5)
    assert model.features[4].bias is None
    assert (model.features[4].weight[~units["features.4"]] == 0).all()


def test_prune_channels_bad_input():
    model = MLP(in_features=10, hidden=(12,), out_features=3)
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            prune_channels(model, bad)
    with pytest.raises(KeyError, match="no layer 'fc'"):
        prune_channels(model, 0.5, layers=["fc"])
    with pytest.raises(KeyError, match="no density given for layers"):
        prune_channels(model, {"3": 0.5}, layers=["1", "3"])
    with pytest.raises(KeyError, match="no layer '4'"):               # a typo, not silently skipped
        prune_channels(model, {"1": 0.5, "4": 0.5})
    with pytest.raises(ValueError, match="layer '2' .ReLU. has no weight"):
        prune_channels(model, {"1": 0.5, "2": 0.5})
    assert not any(parametrize.is_parametrized(layer) for layer in model)    # the failed calls changed nothing
    with pytest.raises(ValueError, match="is a BatchNorm2d"):
        prune_channels(Conv4(hidden=4), 0.5, layers=["features.1"])
    with pytest.raises(ValueError, match="only Linear/Conv2d layer is its output layer"):
        prune_channels(nn.Sequential(nn.Linear(3, 2)), 0.5)
    diverged = MLP(in_features=10, hidden=(4,), out_features=3)
    with torch.no_grad():
        diverged[1].weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match="the scores for '1' contain NaN"):     # not kept as the largest norm
        prune_channels(diverged, 0.5)


def test_channel_scores_read_the_effective_weight():
    from lowlearn.powerprop import powerprop

    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -4.0, 1.0, 2.0], [1.0, 1.0, -1.0, 1.0]]))
    powerprop(model, 2.0)                              # θ = φ|φ|: the raw φ is ±√|θ|
    attach_masks(model)
    set_masks(model, {"0": torch.tensor([[True, False, True, False], [True, True, True, True]])})
    l1, l2 = channel_scores(model)["0"], channel_scores(model, norm=2)["0"]
    assert l1.tolist() == pytest.approx([4.0, 4.0])                     # |3| + |1|: masked, and θ, not φ
    assert l2.tolist() == pytest.approx([10 ** 0.5, 2.0])


def test_prune_channels_after_unstructured_pruning_keeps_the_pruned_weights_of_kept_units_pruned():
    torch.manual_seed(0)
    model = MLP(in_features=10, hidden=(12, 8), out_features=3)
    prune(model, magnitude(model), 0.5)                # every unit keeps some weights, none keeps all
    before = {name: m.clone() for name, m in masks_of(model).items()}
    assert all(m.any(dim=1).all() and not m.all(dim=1).any() for name, m in before.items() if name != "5")
    norms = {name: (layer.weight * before[name]).abs().sum(dim=1) for name, layer in (("1", model[1]),
                                                                                      ("3", model[3]))}
    units = prune_channels(model, 0.5)
    for name in ("1", "3"):
        keep = units[name]
        assert int(keep.sum()) == before[name].shape[0] // 2
        assert norms[name][keep].min() >= norms[name][~keep].max()
        assert torch.equal(masks_of(model)[name], before[name] & keep[:, None])


def test_prune_channels_keeps_an_alive_unit_of_zero_norm_over_a_removed_one():
    # Row 0 is removed (masked, though its raw weights are large), row 1 is alive with all-zero weights: both have
    # norm 0, and the two survivors must be alive units (row 1 and row 2), so that masks only shrink.
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([9.0, 0.0, 1.0])[:, None].expand(3, 4))
    removed = torch.ones(3, 4, dtype=torch.bool)
    removed[0] = False
    attach_masks(model, ["0"])
    set_masks(model, {"0": removed})
    units = prune_channels(model, 2 / 3, layers=["0"])
    assert units["0"].tolist() == [False, True, True]
    assert masks_of(model)["0"].any(dim=1).tolist() == [False, True, True]


def test_prune_channels_refuses_to_keep_one_unit_more_than_are_left():
    model = MLP(in_features=10, hidden=(8,), out_features=3)
    prune_channels(model, 0.5)
    with pytest.raises(ValueError, match="layer '1' has 4 units left, so it cannot keep 5"):
        prune_channels(model, 5 / 8)
    assert int(prune_channels(model, 0.5)["1"].sum()) == 4                  # all the units left: fine


def test_prune_channels_that_fails_on_a_diverged_weight_leaves_the_model_unmasked():
    model = MLP(in_features=10, hidden=(4,), out_features=3)
    with torch.no_grad():
        model[1].weight[1, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        prune_channels(model, 0.5)
    assert not any(parametrize.is_parametrized(layer) for layer in model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_prune_channels_keeps_the_bias_in_the_model_dtype(dtype):
    torch.manual_seed(0)
    model = MLP(in_features=8, hidden=(6,), out_features=3).to(dtype)
    units = prune_channels(model, 0.5)
    assert model[1].bias.dtype == dtype and model[1].parametrizations.bias[0].mask.dtype == dtype
    assert (model[1].bias[~units["1"]] == 0).all()
    assert model(torch.randn(2, 8, dtype=dtype)).dtype == dtype


def test_a_bias_masked_by_channel_pruning_stays_masked_when_the_weights_are_revived():
    model = MLP(in_features=10, hidden=(8,), out_features=3)
    first = prune_channels(model, 0.5)
    set_masks(model, {"1": torch.ones(8, 10, dtype=torch.bool)})          # e.g. regrown by sparse training
    with torch.no_grad():
        raw_weight(model[1]).add_(1.0)                                      # every unit alive and large
    prune_channels(model, 1.0)
    assert torch.equal(model[1].parametrizations.bias[0].mask.bool(), first["1"])


def test_structured_pruning_of_no_layer_is_refused_and_changes_nothing():
    model = MLP()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="no layer to prune"):
        prune_nm(model, scores={})
    with pytest.raises(ValueError, match="no layer to prune"):
        prune_nm(nn.Sequential(nn.ReLU()))                  # the default scores: no Linear/Conv2d layer
    with pytest.raises(ValueError, match="no layer to prune"):
        prune_channels(model, 0.5, layers=[])
    assert not parametrize.is_parametrized(model[1]) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_fresh_model_takes_a_channel_pruned_state_dict_once_its_own_channels_are_pruned():
    torch.manual_seed(0)
    pruned, fresh, masked_only, x = MLP(), MLP(), MLP(), torch.randn(3, 784)
    prune_channels(pruned, 0.25)
    attach_masks(masked_only)
    with pytest.raises(RuntimeError, match="parametrizations.bias"):          # the bias masks are missing
        masked_only.load_state_dict(pruned.state_dict())
    prune_channels(fresh, 0.5)                                                  # any density: the loaded masks win
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(fresh(x), pruned(x))
    assert all(torch.equal(m, masks_of(pruned)[name]) for name, m in masks_of(fresh).items())
