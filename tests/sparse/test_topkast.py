import copy
import io

import pytest
import torch
import torch.nn.functional as F

from lowlearn.models import MLP
from lowlearn.sparse.lottery import rewind
from lowlearn.sparse.mask import attach_masks, density, masks_of, prunable_layers, raw_weight, set_masks, squash
from lowlearn.sparse.prune import kept_count, top_k_mask
from lowlearn.sparse.topkast import TopKAST


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 12), out_features=4)


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 20, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def test_sets_are_the_top_magnitudes_and_nested():
    model = small_mlp()
    theta = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    sparsifier = TopKAST(model, None, 0.2, 0.5)
    forward, backward = masks_of(model), sparsifier.backward_masks()
    for name, w in theta.items():
        assert torch.equal(forward[name], top_k_mask(w.abs(), kept_count(0.2, w.numel())))
        assert torch.equal(backward[name], top_k_mask(w.abs(), kept_count(0.5, w.numel())))
        assert not (forward[name] & ~backward[name]).any()
    assert density(model) == pytest.approx(0.2, abs=0.01)


def test_forward_uses_only_a_while_gradients_reach_b():
    model = small_mlp()
    sparsifier = TopKAST(model, None, 0.2, 0.5)
    forward, backward = masks_of(model), sparsifier.backward_masks()
    # Reference: a plain network holding θ ⊙ 1_A.
    plain = small_mlp()
    with torch.no_grad():
        for name, layer in prunable_layers(plain).items():
            layer.weight.copy_(raw_weight(prunable_layers(model)[name]) * forward[name])
    x, y = batch()
    out = model(x)
    assert torch.equal(out, plain(x))
    F.cross_entropy(out, y).backward()
    F.cross_entropy(plain(x), y).backward()
    for name, layer in prunable_layers(model).items():
        grad = raw_weight(layer).grad
        dense_grad = prunable_layers(plain)[name].weight.grad      # ∂L/∂w at every position
        assert torch.allclose(grad, dense_grad * backward[name])
        assert (grad[~backward[name]] == 0).all()
        outside_a = backward[name] & ~forward[name]
        assert grad[outside_a].abs().sum() > 0                    # B \ A learns without being used


def test_training_keeps_frozen_weights_and_exact_forward_density():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = TopKAST(model, optimizer, 0.2, 0.4, every=3)
    x, y = batch()
    changed = 0
    for step in range(1, 13):
        frozen = {name: (raw_weight(layer).detach().clone(), ~sparsifier.backward_masks()[name])
                  for name, layer in prunable_layers(model).items()}
        before = masks_of(model)
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
        optimizer.step()
        for name, layer in prunable_layers(model).items():
            theta, outside = frozen[name]
            assert torch.equal(raw_weight(layer).detach()[outside], theta[outside])   # outside B: untouched
        sparsifier.step()
        after = masks_of(model)
        for name, m in after.items():
            assert int(m.sum()) == kept_count(0.2, m.numel())
        changed += sum(int((before[n] ^ after[n]).sum()) for n in after)
        if step % 3:                                             # the sets move only at refreshes
            assert all(torch.equal(before[n], after[n]) for n in after)
    assert changed > 0                                           # the sets follow the weights


def test_penalty_by_hand():
    model = small_mlp()
    sparsifier = TopKAST(model, None, 0.25, 0.5, distribution="uniform")
    forward, backward = masks_of(model), sparsifier.backward_masks()
    expected = 0.0
    for name, layer in prunable_layers(model).items():
        theta = raw_weight(layer).detach()
        expected += theta[forward[name]].abs().sum() + theta[backward[name] & ~forward[name]].abs().sum() / 0.25
    assert sparsifier.penalty().item() == pytest.approx(expected.item(), rel=1e-6)
    squared = sum((raw_weight(layer).detach()[forward[name]] ** 2).sum()
                  + (raw_weight(layer).detach()[backward[name] & ~forward[name]] ** 2).sum() / 0.25
                  for name, layer in prunable_layers(model).items())
    assert sparsifier.penalty(p=2).item() == pytest.approx(squared.item(), rel=1e-6)
    # Its gradient is zero outside B.
    sparsifier.penalty().backward()
    for name, layer in prunable_layers(model).items():
        assert (raw_weight(layer).grad[~backward[name]] == 0).all()


def penalty_by_hand(sparsifier, density):
    forward, backward = masks_of(sparsifier.model), sparsifier.backward_masks()
    return sum(theta[forward[name]].abs().sum() + theta[backward[name] & ~forward[name]].abs().sum() / density
               for name, theta in ((name, raw_weight(layer).detach()) for name, layer in sparsifier.layers().items()))


def test_the_penalty_follows_the_sets_through_refreshes_a_loaded_state_and_a_moved_model():
    """The penalty's per-weight factors (1, 1/D, 0) are kept between steps; every way the sets change renews them."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sparsifier = TopKAST(model, optimizer, 0.25, 0.5, every=1)
    saved = copy.deepcopy(model.state_dict())
    for step in range(4):                                     # lr 0.5: the sets change at every refresh
        x, y = batch(seed=step)
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
        optimizer.step()
        sparsifier.step()
        assert sparsifier.penalty().item() == pytest.approx(penalty_by_hand(sparsifier, 0.25).item(), rel=1e-6)
    assert not torch.equal(masks_of(model)["1"], top_k_mask(saved["1.parametrizations.weight.original"].abs(),
                                                            kept_count(0.25, 20 * 16)))
    model.load_state_dict(saved)                              # the masks of step 0, written in place
    assert sparsifier.penalty().item() == pytest.approx(penalty_by_hand(sparsifier, 0.25).item(), rel=1e-6)
    model.double()                                            # new tensors for the weights and the masks
    assert sparsifier.penalty().dtype == torch.float64
    assert sparsifier.penalty().item() == pytest.approx(penalty_by_hand(sparsifier, 0.25).item(), rel=1e-12)


def test_the_penalty_of_a_half_precision_model_is_summed_without_overflow():
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 512, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)                     # Σ|θ| over A, and over B\A / D: 327,680, beyond float16's 65,504
    model = torch.nn.Sequential(layer).half()
    sparsifier = TopKAST(model, None, 0.25, 0.5)
    penalty = sparsifier.penalty()
    expected = 512 * 512 * (0.25 + 0.25 / 0.25)
    assert penalty.dtype == torch.float32 and penalty.item() == expected
    double = TopKAST(torch.nn.Sequential(torch.nn.Linear(8, 8)).double(), None, 0.5, 1.0)
    assert double.penalty().dtype == torch.float64                                   # no precision is lost
    tiny = TopKAST(torch.nn.Sequential(torch.nn.Linear(1000, 100, bias=False)).half(), None, 1e-5, 0.5)
    weight = tiny.dense_weight(tiny.model[0]).float().abs()      # 1/D = 1e5 is beyond float16 itself
    a, b = (m.float() for m in (masks_of(tiny.model)["0"], tiny.backward_masks()["0"]))
    assert tiny.penalty().item() == pytest.approx(((weight * a).sum() + (weight * (b - a)).sum() / 1e-5).item(),
                                                  rel=1e-5)


def test_checkpoint_round_trip_and_squash():
    model = small_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier = TopKAST(model, optimizer, 0.3, 0.6, every=2)
    x, y = batch()
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sparsifier": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = small_mlp(3)
    restored = TopKAST(other, None, 0.3, 0.6, every=2)
    other.load_state_dict(saved["model"])
    restored.load_state_dict(saved["sparsifier"])
    assert restored.steps == 5
    assert torch.equal(other(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(restored.backward_masks().values(),
                                                 sparsifier.backward_masks().values()))
    plain = squash(copy.deepcopy(model))
    assert torch.equal(plain(x), model(x))


def test_a_state_of_other_densities_is_refused_before_anything_is_restored():
    # it was loaded silently: the model computed with the saved sets until the next refresh chose sets of this
    # TopKAST's densities, and the penalty weighed the saved sets by this one's 1/D
    model = small_mlp()
    saved = TopKAST(model, None, 0.2, 0.4, every=2)
    saved.step()
    for forward, backward, distribution in ((0.3, 0.4, "uniform"), (0.2, 0.5, "uniform"), (0.2, 0.4, "erk")):
        other = TopKAST(small_mlp(), None, forward, backward, every=2, distribution=distribution)
        key = "forward" if forward != 0.2 or distribution != "uniform" else "backward"
        with pytest.raises(ValueError, match=f"the state's {key}_densities are .* but this TopKAST's are"):
            other.load_state_dict(saved.state_dict())
        assert other.steps == 0
    same = TopKAST(small_mlp(), None, 0.2, 0.4, every=2)
    same.load_state_dict(saved.state_dict())
    assert same.steps == 1
    earlier = {key: value for key, value in saved.state_dict().items() if not key.endswith("_densities")}
    other.load_state_dict(earlier)                            # a state without densities is not checked
    assert other.steps == 1


def test_bad_input():
    with pytest.raises(ValueError, match="backward_density .* must be at least forward_density"):
        TopKAST(small_mlp(), None, 0.5, 0.2)
    with pytest.raises(ValueError, match=r"forward_density must be in \(0, 1\]"):
        TopKAST(small_mlp(), None, 0.0, 0.2)
    model = small_mlp()
    with pytest.raises(ValueError, match="weight_decay=0"):
        TopKAST(model, torch.optim.AdamW(model.parameters()), 0.2, 0.4)
    model = small_mlp()
    TopKAST(model, None, 0.2, 0.4)
    with pytest.raises(ValueError, match="already has a mask"):
        TopKAST(model, None, 0.2, 0.4)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        TopKAST(small_mlp(), None, 0.2, 0.4).penalty(p=3)
    for end in (0, -5, 2.5):                   # a set that is never refreshed, or no step at all
        with pytest.raises(ValueError, match=r"end \(the last step that refreshes the sets, or None\) must be"):
            TopKAST(small_mlp(), None, 0.2, 0.4, end=end)
    with pytest.raises(ValueError, match=r"end \(5\) comes before the first refresh, at step every \(10\)"):
        TopKAST(small_mlp(), None, 0.2, 0.4, every=10, end=5)           # was accepted: static sparsity
    TopKAST(small_mlp(), None, 0.2, 0.4, every=10, end=10)
    model = small_mlp()
    with pytest.raises(KeyError, match="the model has no layer 'fc9'"):
        TopKAST(model, None, 0.2, 0.4, layers=["1", "fc9"])
    assert not masks_of(model)


@pytest.mark.parametrize("model, layers, distribution", [(small_mlp, [], "uniform"), (small_mlp, [], lambda m, d: {}),
                                                         (lambda: torch.nn.Sequential(torch.nn.ReLU()), None, "erk")])
def test_no_layer_to_sparsify_is_refused_as_the_other_sparsifiers_refuse_it(model, layers, distribution):
    """An empty layers= (or a model without Linear/Conv2d) is refused by name, as DynamicSparsity refuses it, not
    with an allocation's "the model has no Linear or Conv2d layer" or a bare StopIteration."""
    with pytest.raises(ValueError, match="no layers to train sparsely: layers is empty, or the model has no nn.Linear"):
        TopKAST(model(), None, 0.2, 0.4, layers=layers, distribution=distribution)


def test_one_mapping_cannot_give_two_sets():
    with pytest.raises(ValueError, match="densities of two sets"):
        TopKAST(small_mlp(), None, 0.2, 0.4, distribution={"1": 0.2, "3": 0.2, "5": 0.2})


def test_top_kast_on_chosen_layers_leaves_an_earlier_mask_alone():
    from lowlearn.sparse import prune, scores

    model = small_mlp()
    prune(model, {"5": scores.magnitude(model)["5"]}, 0.5)
    pruned = masks_of(model)["5"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = TopKAST(model, optimizer, 0.2, 0.4, every=2, layers=["1", "3"])
    assert list(sparsifier.backward_masks()) == ["1", "3"]
    for _ in range(4):
        optimizer.zero_grad()
        (model(torch.randn(8, 20)).square().mean() + 1e-3 * sparsifier.penalty()).backward()
        optimizer.step()
        sparsifier.step()
    assert torch.equal(masks_of(model)["5"], pruned)


@pytest.mark.parametrize("seed", range(4))
def test_the_forward_set_lies_inside_the_backward_set_even_among_tied_magnitudes(seed):
    # Weights of two magnitudes only (quantised, or ±c initialisations): top-D and top-(D+M) chosen apart
    # may break the ties differently, and A must still lie in B, each still a set of the largest |θ|.
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(20, 16, bias=False)
    with torch.no_grad():
        signs = torch.randint(0, 2, (16, 20), generator=generator) * 2 - 1
        layer.weight.copy_(signs * torch.randint(1, 3, (16, 20), generator=generator))
    for forward_density, backward_density in ((0.01, 0.2), (0.01, 0.3), (0.05, 0.5), (0.2, 0.8)):
        model = copy.deepcopy(torch.nn.Sequential(layer))
        sparsifier = TopKAST(model, None, forward_density, backward_density)
        forward, backward = masks_of(model)["0"], sparsifier.backward_masks()["0"]
        magnitude = layer.weight.detach().abs()
        assert int(forward.sum()) == kept_count(forward_density, 320)
        assert int(backward.sum()) == kept_count(backward_density, 320)
        assert not (forward & ~backward).any(), (forward_density, backward_density)
        assert magnitude[forward].min() >= magnitude[~forward].max()
        assert magnitude[backward].min() >= magnitude[~backward].max()


def test_a_refresh_keeps_the_optimizer_state_of_the_whole_backward_set():
    # Only weights outside B are frozen: the momentum of B \ A (which learns) survives a refresh.
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier = TopKAST(model, optimizer, 0.2, 0.5, every=1)
    x, y = batch()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    buffers = {name: optimizer.state[raw_weight(layer)]["momentum_buffer"].clone()
               for name, layer in prunable_layers(model).items()}
    sparsifier.step()                                            # a refresh
    forward, backward = masks_of(model), sparsifier.backward_masks()
    for name, layer in prunable_layers(model).items():
        buffer = optimizer.state[raw_weight(layer)]["momentum_buffer"]
        assert torch.equal(buffer, buffers[name] * backward[name]), name
        assert buffer[backward[name] & ~forward[name]].abs().sum() > 0, name


def test_the_sets_are_refreshed_every_few_steps_up_to_end_and_then_kept():
    model = small_mlp()
    sparsifier = TopKAST(model, None, 0.2, 0.4, every=2, end=4)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        with torch.no_grad():                                    # new weights: new top sets, if refreshed
            for layer in prunable_layers(model).values():
                raw_weight(layer).copy_(torch.randn(raw_weight(layer).shape, generator=generator))
        before = (masks_of(model), sparsifier.backward_masks())
        sparsifier.step()
        after = (masks_of(model), sparsifier.backward_masks())
        for name, layer in prunable_layers(model).items():
            magnitude = raw_weight(layer).detach().abs()
            if step in (2, 4):                                   # refreshes at every = 2 steps, the last at end = 4
                assert torch.equal(after[0][name], top_k_mask(magnitude, kept_count(0.2, magnitude.numel())))
                assert torch.equal(after[1][name], top_k_mask(magnitude, kept_count(0.4, magnitude.numel())))
            else:
                assert torch.equal(after[0][name], before[0][name]) and torch.equal(after[1][name], before[1][name])


def test_a_split_mask_is_never_overwritten_by_a_plain_one():
    """A Top-KAST layer's gradient follows its backward set B, not its mask: a pruning or a dynamic sparsifier that
    wrote only the forward mask would leave weights outside the new mask learning (the raw weight would leave zero
    under a zero mask), and active weights outside B frozen. Such layers are refused, the model left as it was; once
    squashed, the model takes plain masks, and pruned weights stay zero through a training step."""
    from lowlearn.sparse import SET, StaticSparse, prune
    from lowlearn.sparse.mask import SplitMask, attach_masks, find_mask, set_masks
    from lowlearn.sparse.scores import magnitude

    model = small_mlp()
    TopKAST(model, None, 0.2, 0.5)
    before = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    half = {name: mask & (torch.rand(mask.shape, generator=generator) < 0.5) for name, mask in masks_of(model).items()}
    attempts = [lambda: SET(model, None, 0.3), lambda: StaticSparse(model, None, 0.3),
                lambda: prune(model, magnitude(model), 0.1), lambda: set_masks(model, half),
                lambda: attach_masks(model)]
    for attempt in attempts:
        with pytest.raises(ValueError, match="SplitMask.*squash"):
            attempt()
        state = model.state_dict()
        assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
        assert all(isinstance(find_mask(layer), SplitMask) for layer in prunable_layers(model).values())

    squash(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    SET(model, optimizer, 0.3)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for name, mask in masks_of(model).items():
        assert not raw_weight(prunable_layers(model)[name])[~mask].any()


def test_a_bad_seed_is_refused_before_the_model_changes_so_that_a_retry_works():
    model = MLP(20, (16,), 4)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        TopKAST(model, None, 0.2, 0.4, seed=-1)
    assert not masks_of(model)
    TopKAST(model, None, 0.2, 0.4, seed=0)


def test_a_frozen_layer_is_refused_by_name_before_the_model_changes_as_the_other_sparsifiers_refuse_it():
    # Its weights never move, so its sets would never change: its first magnitude pruning, kept for good.
    model = MLP(20, (16,), 4)
    model[1].requires_grad_(False)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"the layers \['1'\] are frozen \(requires_grad=False\), but Top-KAST"):
        TopKAST(model, None, 0.2, 0.4)
    assert list(model.state_dict()) == keys
    TopKAST(model, None, 0.2, 0.4, layers=["3"])               # the frozen layer left out stays dense


def test_rewinding_a_top_kast_model_keeps_its_raw_weights_outside_the_forward_set():
    """SplitMask's contract: its raw weights are not kept at zero outside the forward set A (Top-KAST trains them in
    B \\ A and keeps the rest dense for later refreshes). Reference: after rewind to the saved weights, θ equals the
    saved raw weights everywhere, while a plainly masked layer beside it is zero under its mask."""
    model = small_mlp()
    TopKAST(model, None, 0.2, 0.5, layers=["1", "3"])
    attach_masks(model, ["5"])
    keep = torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) < 0.5
    set_masks(model, {"5": keep})
    saved = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            raw_weight(layer).add_(1.0)
    rewind(model, saved)
    for name in ("1", "3"):
        raw = raw_weight(prunable_layers(model)[name])
        assert torch.equal(raw, saved[f"{name}.parametrizations.weight.original"])
        assert (raw[~masks_of(model)[name]] != 0).any()
    assert torch.equal(raw_weight(model[5]), saved["5.parametrizations.weight.original"] * keep)
