"""Reference tests for lowlearn.sparse.mask: invariants of the Mask parametrization against hand-written forwards."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from lowlearn.sparse.mask import (attach_masks, density, layer_densities, masks_of, raw_weight, set_masks,
                                  squash)
from lowlearn.sparse.prune import prune
from lowlearn.sparse.scores import magnitude
from lowlearn.sparse.structured import prune_channels, prune_nm


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def hand_forward(x, p, masks):
    """The model's forward written with F.conv2d / F.linear on W ⊙ m (and b ⊙ m_b where a bias mask is given)."""
    def bias(name):
        b = p[f"{name}.bias"]
        return b * masks[f"{name}.bias"] if f"{name}.bias" in masks else b
    h = F.relu(F.conv2d(x, p["0.weight"] * masks["0"], bias("0"))).flatten(1)
    h = F.relu(F.linear(h, p["3.weight"] * masks["3"], bias("3")))
    return F.linear(h, p["5.weight"] * masks["5"], bias("5"))


def test_density_and_layer_densities_are_slow_counts():
    """density = Σ kept / Σ size over the masked weights, bias masks not counted; counted with Python loops."""
    model = small_model()
    prune_channels(model, 0.5)
    attach_masks(model)                                         # the output layer too
    prune(model, magnitude(model), 0.4, scope="global")
    masks = masks_of(model)
    counts = {name: sum(bool(v) for v in m.flatten().tolist()) for name, m in masks.items()}
    sizes = {name: len(m.flatten().tolist()) for name, m in masks.items()}
    assert layer_densities(model) == {name: counts[name] / sizes[name] for name in masks}
    assert density(model) == sum(counts.values()) / sum(sizes.values())
    assert set(masks) == {"0", "3", "5"}                      # the bias masks are not layers of their own


def test_masked_model_equals_a_hand_written_forward_through_every_pruning_route_and_squash():
    """After prune_channels (weight and bias masks), prune_nm and unstructured prune in sequence, the model computes
    the hand-written forward on raw ⊙ mask; each route only shrinks the masks; squash leaves the output bit for bit
    and keeps the very Parameter objects (so an optimizer built before squash still trains them)."""
    model = small_model()
    x = torch.randn(5, 2, 4, 4)
    history = []
    prune_channels(model, 0.5)
    history.append(masks_of(model))
    attach_masks(model)                                         # the output layer too
    prune_nm(model, 2, 4)
    history.append(masks_of(model))
    prune(model, magnitude(model), 0.2)
    history.append(masks_of(model))
    for before, after in zip(history, history[1:]):
        assert all(not (after[n] & ~before[n]).any() for n in before)
    p, masks = {}, dict(masks_of(model))
    for name in ("0", "3", "5"):
        layer = model.get_submodule(name)
        p[f"{name}.weight"] = raw_weight(layer).detach()
        if hasattr(layer, "parametrizations") and "bias" in layer.parametrizations:
            p[f"{name}.bias"] = layer.parametrizations.bias.original.detach()
            masks[f"{name}.bias"] = layer.parametrizations.bias[0].mask.bool()
        else:
            p[f"{name}.bias"] = layer.bias.detach()
    expected = hand_forward(x, p, masks)
    torch.testing.assert_close(model(x), expected)
    params = {name: param for name, param in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    squash(model)
    assert torch.equal(model(x), out)
    assert masks_of(model) == {}
    after = dict(model.named_parameters())
    assert after["0.weight"] is params["0.parametrizations.weight.original"]
    assert after["0.bias"] is params["0.parametrizations.bias.original"]
    model(x).sum().backward()
    optimizer.step()                                            # the optimizer still holds the model's parameters
    assert not torch.equal(model(x), out)


def test_state_dict_round_trip_strict_into_a_fresh_masked_model_with_bias_masks():
    """A channel-pruned model's state_dict (weight and bias masks) loads strictly into a fresh model that has
    the same parametrizations (made by pruning it the same way, whatever its own units), through torch.save:
    same outputs, same masks, same bias masks."""
    model = small_model(0)
    prune_channels(model, 0.5)
    attach_masks(model)
    prune(model, magnitude(model), 0.4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = small_model(1)
    prune_channels(fresh, 0.5)                                  # other units: the load overwrites them
    attach_masks(fresh)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(fresh(x), model(x))
    assert all(torch.equal(masks_of(fresh)[n], m) for n, m in masks_of(model).items())
    assert torch.equal(fresh[0].parametrizations.bias[0].mask, model[0].parametrizations.bias[0].mask)


def test_state_dict_of_a_masked_model_into_an_unmasked_model_is_a_strict_loading_error():
    """Strict loading into a model without masks fails, naming the plain key it misses and the parametrization
    keys it does not know (PyTorch's error; nothing is loaded silently); squash first gives a plain state_dict."""
    model = small_model()
    prune_nm(model, 2, 4)
    plain = small_model(1)
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\).*"0\.weight".*Unexpected key\(s\).*'
                                           r'"0\.parametrizations\.weight\.original"'):
        plain.load_state_dict(model.state_dict())
    squash(model)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(plain(x), model(x))


def test_functional_call_with_masked_raw_parameters_and_its_gradient():
    """functional_call with other raw weights (…parametrizations.weight.original) computes the hand-written forward
    on θ' ⊙ m, and torch.func.grad with respect to θ' is the hand-computed gradient times the mask (zero where
    pruned), without touching the module's own tensors."""
    model = small_model()
    prune_nm(model, 1, 4)
    masks = masks_of(model)
    g = torch.Generator().manual_seed(3)
    params = {name: torch.randn(p.shape, generator=g, dtype=torch.float64) for name, p in model.named_parameters()}
    model.double()
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    own = {name: p.clone() for name, p in model.named_parameters()}
    plain = {k.replace("parametrizations.weight.original", "weight"): v for k, v in params.items()}
    expected = hand_forward(x, plain, masks)
    torch.testing.assert_close(functional_call(model, params, (x,)), expected)
    got = grad(lambda ps: functional_call(model, ps, (x,)).square().sum())(params)
    ref = torch.func.grad(lambda ps: hand_forward(x, ps, {n: m.double() for n, m in masks.items()}).square().sum())(
        plain)
    for name in ("0", "3", "5"):
        gw = got[f"{name}.parametrizations.weight.original"]
        torch.testing.assert_close(gw, ref[f"{name}.weight"])
        assert (gw[~masks[name]] == 0).all() and (gw[masks[name]] != 0).any()
    assert all(torch.equal(p, own[name]) for name, p in model.named_parameters())


def test_deepcopy_of_a_channel_pruned_model_has_its_own_weight_and_bias_masks():
    """A deep copy computes the same; changing the copy's weight masks, squashing it, or training it leaves the
    original's masks, bias masks and class untouched."""
    model = small_model()
    prune_channels(model, 0.5)
    x = torch.randn(2, 2, 4, 4)
    out = model(x)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), out)
    set_masks(twin, {"3": torch.zeros(8, 36, dtype=torch.bool)})
    squash(twin)
    assert "parametrizations" in dict(model[0].named_children()) and torch.equal(model(x), out)
    assert masks_of(model)["3"].any() and model[0].parametrizations.bias[0].mask.sum() == 2
