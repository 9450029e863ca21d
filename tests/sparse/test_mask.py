import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lowlearn.models import MLP, Conv4
from lowlearn.reparam import register
from lowlearn.sparse.mask import (Mask, SplitMask, attach_masks, density, kept_weights, layer_densities, masked_layers,
                                  masks_of, nonzero_counts, prunable_layers, raw_weight, read_scalars, set_masks,
                                  squash)
from lowlearn.train import fit, seed_everything


def random_masks(model, keep=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(layer.weight.shape, generator=g) < keep for name, layer in masked_layers(model).items()}


def masked_mlp(keep=0.3, seed=0):
    seed_everything(seed)
    model = MLP(hidden=(32, 16))
    attach_masks(model)
    set_masks(model, random_masks(model, keep, seed))
    return model


def test_default_layers_are_linear_and_conv_weights_only():
    model = Conv4(num_classes=5)
    assert list(attach_masks(model)) == list(prunable_layers(model)) == [
        "features.0", "features.4", "features.8", "features.12", "head"]
    for layer in masked_layers(model).values():
        assert not hasattr(layer, "parametrizations") or "bias" not in layer.parametrizations
    assert all(not hasattr(m, "parametrizations") for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert density(model) == 1.0


def test_masked_weight_is_weight_times_mask_and_raw_weight_is_zeroed():
    model = masked_mlp()
    for name, layer in masked_layers(model).items():
        mask = masks_of(model)[name]
        assert mask.dtype == torch.bool
        assert torch.equal(layer.weight, raw_weight(layer) * mask)
        assert (raw_weight(layer)[~mask] == 0).all()


def test_an_infinite_weight_that_is_masked_becomes_zero_not_nan():
    # θ·m turned an overflowed weight at a pruned position into NaN, and the NaN reached the output.
    model = nn.Sequential(nn.Linear(3, 2))
    attach_masks(model)
    theta = raw_weight(model[0])
    with torch.no_grad():
        theta[0, 0] = float("inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.state[theta]["momentum_buffer"] = torch.full_like(theta, float("inf"))
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 0] = False
    set_masks(model, {"0": keep}, optimizer)
    assert theta[0, 0] == 0 and optimizer.state[theta]["momentum_buffer"][0, 0] == 0
    assert torch.isfinite(model(torch.ones(1, 3))).all()


def test_density_is_exact():
    model = MLP(hidden=(10,))
    attach_masks(model)
    masks = {name: torch.zeros_like(m) for name, m in masks_of(model).items()}
    masks["1"].view(-1)[:785] = True   # 785 of 7840
    masks["3"].view(-1)[:50] = True    # 50 of 100
    set_masks(model, masks)
    assert kept_weights(model) == {"1": 785, "3": 50}
    assert layer_densities(model) == {"1": 785 / 7840, "3": 0.5}
    assert density(model) == (785 + 50) / (7840 + 100)
    assert kept_weights(MLP(hidden=(10,))) == {}


def test_nonzero_counts_come_back_in_the_masks_order_with_each_count():
    masks = {"b": torch.tensor([True, False, True]), "a": torch.zeros(2, 2, dtype=torch.bool),
             "c": torch.tensor([[1.0, 0.0], [2.0, -1.0]])}
    counts = nonzero_counts(masks)
    assert list(counts) == ["b", "a", "c"] and counts == {"b": 2, "a": 0, "c": 3}
    assert all(type(n) is int for n in counts.values())
    assert nonzero_counts({}) == {}
    assert read_scalars({"x": torch.tensor([True]), "y": torch.tensor(False)}) == {"x": True, "y": False}


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, fused=True),       # one kernel per step
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True),
], ids=["sgd-momentum", "adam", "adamw", "adam-fused", "sgd-momentum-fused"])
def test_pruned_weights_and_optimizer_state_stay_exactly_zero(make_optimizer):
    model = MLP(hidden=(32, 16))
    attach_masks(model)
    optimizer = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)
    fit(model, (x, y), optimizer, steps=5, batch_size=32, device="cpu")   # dense: state exists everywhere
    masks = random_masks(model)
    set_masks(model, masks, optimizer)
    fit(model, (x, y), optimizer, steps=200, batch_size=32, device="cpu", seed=1)
    for name, layer in masked_layers(model).items():
        theta = raw_weight(layer)
        assert (theta[~masks[name]] == 0).all()
        assert (theta[masks[name]] != 0).any()
        state = optimizer.state[theta]
        per_weight = [v for v in state.values() if torch.is_tensor(v) and v.shape == theta.shape]
        assert per_weight, "the optimizer keeps per-weight state"
        for value in per_weight:
            assert (value[~masks[name]] == 0).all()
        assert (theta.grad[~masks[name]] == 0).all()


def test_deepcopy_and_state_dict_round_trip(tmp_path):
    model = masked_mlp()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 784)
    assert torch.equal(twin(x), model(x))
    for a, b in zip(masks_of(twin).values(), masks_of(model).values()):
        assert torch.equal(a, b)
    set_masks(twin, {"1": torch.zeros_like(masks_of(twin)["1"])})
    assert masks_of(model)["1"].any(), "the copy has its own mask buffers"

    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = MLP(hidden=(32, 16))
    attach_masks(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(fresh(x), model(x))
    assert layer_densities(fresh) == layer_densities(model)


def test_functional_call_sees_the_mask():
    model = masked_mlp()
    x = torch.randn(4, 784)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert torch.equal(functional_call(model, {**params, **buffers}, (x,)), model(x))
    # A mask passed functionally is really used: with the first layer fully masked,
    # the output no longer depends on the input.
    key = "1.parametrizations.weight.0.mask"
    blocked = {**params, **buffers, key: torch.zeros_like(buffers[key])}
    out = functional_call(model, blocked, (x,))
    assert torch.equal(out, functional_call(model, blocked, (torch.randn(4, 784),)))
    assert not torch.equal(out, model(x))


def test_per_example_gradients_with_vmap_through_plain_and_split_masks():
    import torch.nn.functional as F
    from torch.func import grad, vmap

    from lowlearn.reparam import register
    from lowlearn.sparse.mask import SplitMask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    attach_masks(model, ["0"])
    keep = torch.rand(3, 5) < 0.5
    register(model[2], "weight", SplitMask(keep, keep | (torch.rand(3, 5) < 0.5), torch.float64))
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    loss(dict(model.named_parameters()), x, y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(per_example[name].mean(0), p.grad, rtol=1e-10, atol=1e-14), name


def test_squash_keeps_outputs_and_removes_masks():
    model = masked_mlp()
    x = torch.randn(8, 784)
    before = model(x)
    squash(model)
    assert masks_of(model) == {} and density(model) == 1.0
    assert torch.equal(model(x), before)
    assert isinstance(model[1].weight, nn.Parameter)


def test_mask_follows_dtype_and_device_moves():
    model = masked_mlp()
    model.double()
    assert next(iter(masked_layers(model).values())).parametrizations.weight[0].mask.dtype == torch.float64
    assert model(torch.randn(2, 784, dtype=torch.float64)).dtype == torch.float64


def test_bad_input():
    model = MLP(hidden=(8,))
    with pytest.raises(KeyError, match="no layer 'fc9'.*1, 3"):
        attach_masks(model, ["fc9"])
    with pytest.raises(ValueError, match=r"layer '2' \(ReLU\) has no weight tensor; its Linear/Conv2d layers are: "
                                         r"1, 3$"):
        attach_masks(model, ["2"])  # the ReLU
    with pytest.raises(KeyError, match="not a masked layer.*attach_masks first"):
        set_masks(model, {"1": torch.ones(8, 784, dtype=torch.bool)})
    attach_masks(model)
    with pytest.raises(ValueError, match=r"shape \(784, 8\).*\(8, 784\)"):
        set_masks(model, {"1": torch.ones(784, 8, dtype=torch.bool)})
    with pytest.raises(TypeError, match="boolean"):
        set_masks(model, {"1": torch.ones(8, 784)})
    with pytest.raises(TypeError, match="boolean"):
        Mask(torch.ones(3))
    for broadcastable in (Mask(torch.ones(1, 784, dtype=torch.bool)),                     # a mask per input
                          SplitMask(*[torch.ones(8, 1, dtype=torch.bool)] * 2)):          # a mask per output
        with pytest.raises(ValueError, match=r"shape \(\d+, \d+\) cannot mask a weight of shape \(8, 784\)"):
            register(MLP(hidden=(8,))[1], "weight", broadcastable)
    with pytest.raises(ValueError, match=r"not one string \('13'\)"):            # it would mask '1' and '3'
        attach_masks(MLP(hidden=(8, 6)), "13")
    # A bad entry is found before any mask changes: layer '1' keeps its mask and weights.
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        set_masks(model, {"1": torch.zeros(8, 784, dtype=torch.bool), "3": torch.ones(3, dtype=torch.bool)})
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


@pytest.mark.parametrize("backward", [torch.ones(3, 4), torch.ones(4, 3, dtype=torch.bool)],
                         ids=["not boolean", "another shape"])
def test_split_mask_refuses_a_backward_mask_that_does_not_match_the_forward_mask(backward):
    with pytest.raises(ValueError, match="backward mask must be boolean with the forward mask's shape"):
        SplitMask(torch.ones(3, 4, dtype=torch.bool), backward)


def test_mask_reprs_show_the_densities():
    keep = torch.tensor([[True, False, False, False]])
    assert repr(Mask(keep)) == "Mask(density=0.2500)"
    assert repr(SplitMask(keep, torch.ones_like(keep))) == "SplitMask(density=0.2500, backward_density=1.0000)"
