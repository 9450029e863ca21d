import copy
import gc
import io
import math
import random
import weakref
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.models import MLP
from lowlearn.sparse.allocation import erk, uniform
from lowlearn.sparse.dst import SET, SNFS, RigL, StaticSparse, layer_densities_for, share
from lowlearn.sparse.mask import density, find_mask, masks_of, prunable_layers, raw_weight, set_masks
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.scores import magnitude
from lowlearn.sparse.topkast import TopKAST
from lowlearn.train import fit

METHODS = {"static": StaticSparse, "set": SET, "rigl": RigL, "snfs": SNFS}


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 12), out_features=4)


def batches(n=60, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 20, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(n)]


def make(method, model, optimizer, density=0.3, **kwargs):
    if method == "static":
        return StaticSparse(model, optimizer, density, seed=kwargs.get("seed", 0))
    kwargs = {"end": 30, "every": 5, **kwargs}
    return METHODS[method](model, optimizer, density, **kwargs)


def train(model, optimizer, sparsifier, data, check=None):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        if check is not None:
            check()


def counts(model):
    return {name: int(m.sum()) for name, m in masks_of(model).items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_density_is_exact_after_every_step(method, distribution):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make(method, model, optimizer, distribution=distribution)
    expected = {name: kept_count(d, raw_weight(layer).numel())
                for (name, layer), d in zip(prunable_layers(model).items(), sparsifier.densities.values())}
    total = sum(expected.values())
    assert counts(model) == expected == sparsifier.active

    def check():
        now = counts(model)
        assert now == sparsifier.active
        assert sum(now.values()) == total            # the global density never moves
        if method != "snfs":                          # SNFS moves weights between layers
            assert now == expected

    train(model, optimizer, sparsifier, batches(), check)


def test_initial_densities_follow_the_distribution():
    model = MLP()
    RigL(model, None, 0.1, end=1000)
    target = erk(MLP(), 0.1)
    for name, m in masks_of(model).items():
        assert int(m.sum()) == kept_count(target[name], m.numel())
    model = MLP()
    StaticSparse(model, None, 0.2, distribution="uniform")
    assert all(abs(int(m.sum()) - 0.2 * m.numel()) <= 0.5 for m in masks_of(model).values())
    assert layer_densities_for(MLP(), 0.2, {"1": 0.5, "3": 1.0}) == {"1": 0.5, "3": 1.0}
    assert layer_densities_for(MLP(), 0.2, lambda model, d: uniform(model, d)) == uniform(MLP(), 0.2)


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
def test_masks_change_and_drop_and_grow_sets_are_disjoint(method):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make(method, model, optimizer, end=1000, every=6)
    update, seen = sparsifier.update, []

    def recorded_update(fraction):
        before = masks_of(model)
        grown = update(fraction)
        seen.append((fraction, before, grown, masks_of(model)))
        return grown

    sparsifier.update = recorded_update
    train(model, optimizer, sparsifier, batches(12))
    assert len(seen) == 2
    for fraction, before, grown, after in seen:
        for name in before:
            dropped = before[name] & ~after[name]
            # all ⌊f·active⌋ scheduled drops left the network: none was grown back in the same update
            assert int(dropped.sum()) == math.floor(fraction * int(before[name].sum())) > 0, name
            assert not (grown[name] & before[name]).any()       # grown weights were inactive
            assert torch.equal(grown[name], after[name] & ~before[name])


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-3),
])
def test_grown_weights_and_their_optimizer_state_start_at_zero(method, make_optimizer):
    model = small_mlp()
    optimizer = make_optimizer(model.parameters())
    sparsifier = make(method, model, optimizer)
    seen = []

    def check():
        masks = masks_of(model)
        for name, layer in prunable_layers(model).items():
            theta, off = raw_weight(layer), ~masks[name]
            assert (theta[off] == 0).all()
            for value in optimizer.state[theta].values():
                if value.shape == theta.shape:
                    assert (value[off] == 0).all()
    # Catch the grown sets of every update by wrapping the engine's entry point.
    update = sparsifier.update

    def checked_update(fraction):
        seen.append(sparsifier.steps)
        grown = update(fraction)
        for name, layer in prunable_layers(model).items():
            theta = raw_weight(layer)
            assert (theta[grown[name]] == 0).all()
            for value in optimizer.state[theta].values():
                if value.shape == theta.shape:
                    assert (value[grown[name]] == 0).all()
        assert any(g.any() for g in grown.values())
        return grown

    sparsifier.update = checked_update
    train(model, optimizer, sparsifier, batches(), check)
    assert seen == [5, 10, 15, 20, 25]                      # the checks above ran at every update (f(T_end) = 0)


def test_grown_weights_get_a_new_parameters_rprop_step_size():
    """Rprop's step sizes start at the learning rate: a grown weight at step size 0 would be clamped to 1e-6."""
    model = small_mlp()
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    sparsifier = make("set", model, optimizer)
    train(model, optimizer, sparsifier, batches(4))
    grown = sparsifier.update(0.3)
    for name, layer in prunable_layers(model).items():
        state = optimizer.state[raw_weight(layer)]
        assert grown[name].any() and (state["step_size"][grown[name]] == 0.01).all()
        assert (state["prev"][grown[name]] == 0).all()


def test_grown_weights_start_at_zero_even_where_the_raw_weight_was_written_to():
    # Growth zeroes what it grows instead of relying on the masked-out weights being zero already:
    # a direct write to the raw weight (or to its momentum) must not come back to life as a grown connection.
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make("set", model, optimizer)
    train(model, optimizer, sparsifier, batches(2))
    with torch.no_grad():
        for name, layer in prunable_layers(model).items():
            theta, off = raw_weight(layer), ~masks_of(model)[name]
            theta[off] = 1.0
            optimizer.state[theta]["momentum_buffer"][off] = 1.0
    grown = sparsifier.update(0.3)
    for name, layer in prunable_layers(model).items():
        theta = raw_weight(layer)
        assert grown[name].any()
        assert (theta[grown[name]] == 0).all()
        assert (optimizer.state[theta]["momentum_buffer"][grown[name]] == 0).all()


@pytest.mark.parametrize("method, cosine", [("set", True), ("rigl", True), ("snfs", True), ("set", False)])
def test_no_update_after_end(method, cosine):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make(method, model, optimizer, end=20, every=5, cosine=cosine)
    update, calls = sparsifier.update, []

    def recorded_update(fraction):
        calls.append(sparsifier.steps)
        return update(fraction)

    sparsifier.update = recorded_update
    data = batches(40)
    train(model, optimizer, sparsifier, data[:20])
    at_end = masks_of(model)
    train(model, optimizer, sparsifier, data[20:])
    assert all(torch.equal(at_end[n], m) for n, m in masks_of(model).items())
    # Every ΔT while t < T_end (Algorithm 1 of RigL): the cosine's f(T_end) = 0 would change nothing. A
    # constant fraction updates at T_end too. None after it.
    assert sparsifier.steps == 40 and calls == ([5, 10, 15] if cosine else [5, 10, 15, 20])


def test_static_masks_never_change():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = StaticSparse(model, optimizer, 0.3)
    start = masks_of(model)
    train(model, optimizer, sparsifier, batches(30))
    assert all(torch.equal(start[n], m) for n, m in masks_of(model).items())
    assert sparsifier.schedule is None


def test_rigl_grows_exactly_the_top_gradient_inactive_weights():
    # One linear layer; the gradient of the masked weight comes from autograd on a plain copy.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)   # lr 0: the weights stay put
    # end = 2: the update at step 1 replaces f(1) = 0.5/2 · (1 + cos(π/2)) = 0.25 of the 12 active weights.
    sparsifier = RigL(model, optimizer, 0.4, end=2, every=1, drop_fraction=0.5, distribution="uniform")
    mask = masks_of(model)["0"]
    theta = raw_weight(model[0]).detach().clone()
    assert int(mask.sum()) == 12
    x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
    w = (theta * mask).requires_grad_()
    F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()

    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert torch.equal(raw_weight(model[0]).grad, w.grad * mask)   # what the optimizer sees is masked
    optimizer.step()
    sparsifier.step()

    drop = theta.abs().masked_fill(~mask, float("inf")).flatten().topk(3, largest=False).indices
    grow = w.grad.abs().masked_fill(mask, -1.0).flatten().topk(3).indices
    expected = mask.flatten().clone()
    expected[drop] = False
    expected[grow] = True
    assert torch.equal(masks_of(model)["0"].flatten(), expected)


def test_the_drop_removes_the_smallest_magnitudes_negative_weights_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    sparsifier = SET(model, None, 0.4, distribution="uniform")          # 12 of 30 active; updated by hand
    mask = masks_of(model)["0"]
    values = torch.tensor([-9., 0.5, -0.2, 7., -0.1, 3., -6., 0.3, 5., -4., 2., -8.])   # signs mixed
    with torch.no_grad():
        raw_weight(model[0]).zero_().masked_scatter_(mask, values)
    sparsifier.update(0.25)                                             # drops ⌊0.25 · 12⌋ = 3
    dropped = mask & ~masks_of(model)["0"]
    assert torch.equal(values[dropped[mask]], torch.tensor([-0.2, -0.1, 0.3]))   # the 3 smallest |θ|, in order


def test_set_grows_uniformly_at_random_among_the_inactive_weights():
    # A fixed mask, 10 active and 10 inactive weights; each update grows 5 of the 10 inactive ones. Over 100
    # seeds each inactive weight is grown Binomial(100, 1/2) times: 50 ± 5 (25 and 75 are 5 standard deviations).
    fixed = torch.arange(20).view(4, 5) % 2 == 0
    times = torch.zeros(4, 5)
    for seed in range(100):
        model = nn.Sequential(nn.Linear(5, 4))
        sparsifier = SET(model, None, 0.5, distribution="uniform", seed=seed)
        set_masks(model, {"0": fixed})
        times += sparsifier.update(0.5)["0"]
    assert (times[fixed] == 0).all()
    assert 25 <= times[~fixed].min() and times[~fixed].max() <= 75


def test_initial_masks_are_uniformly_random_at_the_layers_count():
    # 10 of 20 weights at density 0.5: over 100 seeds each weight is kept Binomial(100, 1/2) times, 50 ± 5.
    times = torch.zeros(4, 5)
    for seed in range(100):
        model = nn.Sequential(nn.Linear(5, 4))
        StaticSparse(model, None, 0.5, distribution="uniform", seed=seed)
        mask = masks_of(model)["0"]
        assert int(mask.sum()) == 10
        times += mask
    assert 25 <= times.min() and times.max() <= 75


def test_snfs_without_the_cosine_grows_at_t_end_by_a_momentum_that_includes_that_steps_gradient():
    # cosine=False: the update at T_end = 4 replaces 0.3 of the weights, so the momentum must hold the
    # gradient of step 4: M_4 = β M_3 + ∂L/∂w of step 4, with ∂L/∂w taken on a plain copy of the masked weight.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = SNFS(model, optimizer, 0.4, end=4, every=2, cosine=False, distribution="uniform", beta=0.5)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    train(model, optimizer, sparsifier, data[:3])
    m3 = sparsifier.momentum["0"].clone()
    x, y = data[3]
    w = (raw_weight(model[0]) * masks_of(model)["0"]).detach().requires_grad_()
    (g4,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w, model[0].bias), y), w)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = masks_of(model)["0"]
    sparsifier.step()
    assert not torch.equal(masks_of(model)["0"], before)               # step 4 updated the masks
    assert torch.allclose(sparsifier.momentum["0"], 0.5 * m3 + g4, rtol=0, atol=1e-6)


def test_rigl_regrowing_dropped_weights_drops_its_full_fraction_even_in_a_dense_layer():
    # regrow_dropped=True (RigL's code): a layer at density 0.9 (27 of 30) drops ⌊0.25 · 27⌋ = 6 weights of
    # smallest |θ|, more than its 3 inactive ones, and grows the 6 of largest |∂L/∂w| among the 9 not kept.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsifier = RigL(model, optimizer, 0.9, end=2, every=1, drop_fraction=0.5, distribution="uniform",
                      regrow_dropped=True)
    mask = masks_of(model)["0"]
    theta = raw_weight(model[0]).detach().clone()
    assert int(mask.sum()) == 27
    x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
    w = (theta * mask).requires_grad_()
    F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()

    kept = mask.flatten().clone()
    kept[theta.abs().masked_fill(~mask, float("inf")).flatten().topk(6, largest=False).indices] = False
    expected = kept.clone()
    expected[w.grad.abs().flatten().masked_fill(kept, -1.0).topk(6).indices] = True
    assert torch.equal(masks_of(model)["0"].flatten(), expected)


@pytest.mark.parametrize("end, armed", [(30, [4, 9]), (10, [4])])     # f(T_end = 10) = 0: no update at step 10
def test_dense_gradients_are_read_only_on_update_steps(end, armed):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("rigl", model, optimizer, every=5, end=end)
    hooked = []

    def check():
        hooked.append(any(find_mask(layer)._forward_hooks for layer in prunable_layers(model).values()))

    train(model, optimizer, sparsifier, batches(12), check)
    # After step t the hooks are armed iff step t + 1 updates the masks.
    assert [t for t, on in enumerate(hooked, start=1) if on] == armed


def test_rigl_without_a_backward_pass_says_what_to_do():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("rigl", model, optimizer, every=1, end=10)
    with pytest.raises(RuntimeError, match="sparsifier.step\\(\\) must be called exactly once after every optimi"):
        sparsifier.step()


@pytest.mark.parametrize("method, every, says, not_said", [
    ("rigl", 1, r"every sparsified layer must take part in the loss of an update step", "loss of every step"),
    # SNFS sums the dense gradient of every step, so it needs it at step 1 too, which updates nothing
    ("snfs", 5, r"every sparsified layer must take part in the loss of every step up to end=10",
     "recorded only for the steps the schedule updates at"),
])
def test_a_method_names_a_layer_that_sat_out_the_loss_of_a_step_whose_gradient_it_needs(method, every, says,
                                                                                       not_said):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(6, 8), "a": torch.nn.Linear(8, 2), "b": torch.nn.Linear(8, 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make(method, model, optimizer, every=every, end=10)
    optimizer.zero_grad()
    model["a"](model["body"](torch.randn(4, 6))).sum().backward()        # head "b" takes no part in step 1
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"saw none for \['b'\]: " + says) as raised:
        sparsifier.step()
    assert not_said not in str(raised.value)


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
@pytest.mark.parametrize("optimizer_class", ["sgd", "adam"])
def test_resuming_from_a_checkpoint_is_bit_exact(method, optimizer_class):
    def build(seed):
        model = small_mlp(seed)
        if optimizer_class == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, optimizer, make(method, model, optimizer, end=40, every=4, seed=seed)

    data = batches(50)
    model, optimizer, sparsifier = build(0)
    train(model, optimizer, sparsifier, data)

    model2, optimizer2, sparsifier2 = build(0)
    train(model2, optimizer2, sparsifier2, data[:23])          # step 24 updates the masks
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                "sparsifier": sparsifier2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model3, optimizer3, sparsifier3 = build(5)                # another initialisation, then overwritten
    model3.load_state_dict(saved["model"])
    optimizer3.load_state_dict(saved["optimizer"])
    sparsifier3.load_state_dict(saved["sparsifier"])
    train(model3, optimizer3, sparsifier3, data[23:])

    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), name
    assert sparsifier3.active == sparsifier.active


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
@pytest.mark.parametrize("change", ["load_state_dict", "set_masks"])
def test_masks_written_without_the_sparsifier_are_counted_again_at_the_next_update(method, change):
    """Its active counts are kept on the host; masks of other counts (a model state loaded alone, set_masks) must
    not make an update drop entries that are not active, grow too many, or refuse to grow enough."""
    trained = small_mlp()
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    train(trained, optimizer, make("snfs", trained, optimizer, end=40, every=4, drop_fraction=0.5), batches(20))
    model = small_mlp(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make(method, model, optimizer, end=40, every=4, drop_fraction=0.5)
    if change == "load_state_dict":
        model.load_state_dict(trained.state_dict())
    else:
        set_masks(model, masks_of(trained))
    loaded = counts(model)
    assert loaded != sparsifier.active                            # SNFS moved weights between the layers
    train(model, optimizer, sparsifier, batches(4))                # step 4 updates the masks
    assert counts(model) == sparsifier.active
    assert sum(sparsifier.active.values()) == sum(loaded.values())
    if method != "snfs":                                         # the layers keep their densities
        assert sparsifier.active == loaded


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
def test_the_mask_buffers_a_move_replaced_are_freed_and_the_next_update_counts_the_new_ones(method):
    """The sparsifier tells masks written elsewhere by their buffers; it held on to those that moving the model
    replaced (after training on a GPU and moving the model to the CPU, GPU memory the size of the masked weights,
    for good once the schedule ended)."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make(method, model, optimizer, end=40, every=4)
    old = [weakref.ref(find_mask(layer).mask) for layer in sparsifier.layers().values()]
    model.double()
    gc.collect()
    assert all(buffer() is None for buffer in old)
    train(model, optimizer, sparsifier, [(x.double(), y) for x, y in batches(4)])     # step 4 updates the masks
    assert counts(model) == sparsifier.active


@pytest.mark.parametrize("method", ["rigl", "topkast"])
def test_fit_resumed_needs_the_sparsifiers_state_and_then_ends_as_the_uninterrupted_run(method):
    """fit's start_step with a sparsifier callback: one left at step 0 would restart its schedule (its mask updates
    shifted by 12 steps), so it is refused; with its state_dict loaded, the resumed run ends with the uninterrupted
    run's weights and masks, bit for bit (the reference)."""
    x, y = (torch.cat(t) for t in zip(*batches(8)))

    def build():
        model = small_mlp(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if method == "topkast":
            return model, optimizer, TopKAST(model, optimizer, 0.3, 0.5, every=4)
        return model, optimizer, make(method, model, optimizer, end=40, every=4)

    def run(model, optimizer, sparsifier, start_step=0):
        fit(model, (x, y), optimizer, steps=24, batch_size=16, callbacks=[sparsifier], device="cpu", progress=False,
            start_step=start_step)

    whole = build()
    run(*whole)
    cut = build()
    fit(cut[0], (x, y), cut[1], steps=12, batch_size=16, callbacks=[cut[2]], device="cpu", progress=False)
    saved = {"model": cut[0].state_dict(), "optimizer": cut[1].state_dict(), "sparsifier": cut[2].state_dict()}

    def restored(parts):      # copies, as from a file: the optimizer would share the saved momentum buffers
        model, optimizer, sparsifier = build()
        for part, name in zip((model, optimizer, sparsifier), parts):
            part.load_state_dict(copy.deepcopy(saved[name]))
        return model, optimizer, sparsifier

    with pytest.raises(RuntimeError, match=r"fit is at step 13 but this \w+ has seen 0 optimizer steps: to resume"):
        run(*restored(["model", "optimizer"]), start_step=12)
    resumed = restored(["model", "optimizer", "sparsifier"])
    run(*resumed, start_step=12)
    for (name, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed[2].steps == whole[2].steps == 24


@pytest.mark.parametrize("method", ["set", "snfs"])
def test_the_state_of_a_method_on_other_layers_is_refused_and_nothing_is_restored(method):
    saved = make(method, small_mlp(), None).state_dict()
    other = MLP(in_features=20, hidden=(16,), out_features=4)          # layers "1" and "3", not "1", "3" and "5"
    sparsifier = make(method, other, None)
    before = sparsifier.state_dict()
    with pytest.raises(ValueError, match="(the state is of the layers|the state's momentum are of layers)"):
        sparsifier.load_state_dict(saved)
    after = sparsifier.state_dict()
    assert after["steps"] == before["steps"] and after["active"] == before["active"]
    assert torch.equal(after["generator"], before["generator"])
    if method == "snfs":                              # the same layers, a momentum of other shapes
        wider = make(method, MLP(in_features=20, hidden=(16, 13), out_features=4), None)
        wider.momentum = {name: torch.zeros_like(raw_weight(layer)) for name, layer in wider.layers().items()}
        with pytest.raises(ValueError, match=r"the state's momentum are of layers .*'3': \(13, 16\).* but this SNFS "
                                             r"has the layers .*'3': \(12, 16\)"):
            make(method, small_mlp(), None).load_state_dict(wider.state_dict())


@pytest.mark.parametrize("saved_by, loaded_by", [("set", "snfs"), ("snfs", "rigl"), ("topkast", "set")])
def test_the_state_of_another_method_is_refused_by_name_and_nothing_is_restored(saved_by, loaded_by):
    # SET's state given to SNFS met a bare KeyError ('momentum'), Top-KAST's given to SET one for 'active'
    saved = TopKAST(small_mlp(), None, 0.3, 0.5) if saved_by == "topkast" else make(saved_by, small_mlp(), None)
    saved.steps = 7
    sparsifier = make(loaded_by, small_mlp(), None)
    name = type(saved).__name__
    with pytest.raises(ValueError, match=f"this state was saved by {name}, not {type(sparsifier).__name__}: load "
                                         f"it into the {name} it came from"):
        sparsifier.load_state_dict(saved.state_dict())
    assert sparsifier.steps == 0
    legacy = {key: value for key, value in make(loaded_by, small_mlp(), None).state_dict().items() if key != "method"}
    sparsifier.load_state_dict({**legacy, "steps": 3})                 # a state saved before methods were named
    assert sparsifier.steps == 3


def test_fit_drives_a_sparsifier_as_a_callback():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make("rigl", model, optimizer, end=30, every=5)
    x = torch.randn(64, 20)
    y = torch.randint(0, 4, (64,))
    start = masks_of(model)
    fit(model, (x, y), optimizer, steps=20, batch_size=8, callbacks=[sparsifier], device="cpu")
    assert sparsifier.steps == 20
    assert any(not torch.equal(start[n], m) for n, m in masks_of(model).items())
    assert density(model) == pytest.approx(sum(sparsifier.active.values()) / sum(m.numel() for m in start.values()))


@pytest.mark.parametrize("cosine", [True, False])
def test_set_replaces_the_scheduled_fraction_constant_as_in_its_paper_or_decayed(cosine):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("set", model, optimizer, distribution="uniform", drop_fraction=0.3, cosine=cosine)
    fractions = []
    update = sparsifier.update

    def recorded(fraction):
        fractions.append(fraction)
        return update(fraction)

    sparsifier.update = recorded
    train(model, optimizer, sparsifier, batches(30))
    steps = [5, 10, 15, 20, 25] if cosine else [5, 10, 15, 20, 25, 30]     # f(T_end) = 0 with the cosine
    expected = [0.15 * (1 + math.cos(math.pi * t / 30)) for t in steps] if cosine else [0.3] * len(steps)
    assert fractions == pytest.approx(expected)


def test_snfs_shares_growth_by_mean_momentum():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make("snfs", model, optimizer, end=1000, every=500)
    train(model, optimizer, sparsifier, batches(3))
    # Hand-made momentum: layer "1" gets all of it.
    for name, m in sparsifier.momentum.items():
        m.zero_()
        if name == "1":
            m.fill_(1.0)
    before = dict(sparsifier.active)
    sparsifier.update(0.2)
    dropped = {name: int(0.2 * k) for name, k in before.items()}
    assert sparsifier.active["1"] == before["1"] - dropped["1"] + sum(dropped.values())
    assert sparsifier.active["3"] == before["3"] - dropped["3"]
    assert sum(sparsifier.active.values()) == sum(before.values())
    # m_l is the mean over the layer's *active* weights: momentum at inactive ones does not draw growth.
    masks = masks_of(model)
    for name, m in sparsifier.momentum.items():
        m.copy_(torch.where(masks[name], 1.0, 0.0) if name == "1" else torch.where(masks[name], 0.0, 100.0))
    before = dict(sparsifier.active)
    sparsifier.update(0.2)
    dropped = {name: int(0.2 * k) for name, k in before.items()}
    assert sparsifier.active["1"] == before["1"] - dropped["1"] + sum(dropped.values())


def test_snfs_shares_growth_equally_between_layers_of_equal_mean_momentum_at_different_densities():
    # |M| = 1 at the active weights of layers "1" and "3" (ERK densities 0.24 and 0.31), 0 elsewhere: both means
    # over active weights are 1, so the K = 15 + 11 + 6 = 32 weights dropped at f = 0.2 regrow 16 and 16.
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make("snfs", model, optimizer, end=1000, every=500)
    train(model, optimizer, sparsifier, batches(3))
    masks = masks_of(model)
    for name, m in sparsifier.momentum.items():
        m.copy_(torch.where(masks[name], 1.0, 0.0) if name != "5" else torch.zeros_like(m))
    before = dict(sparsifier.active)
    assert before == {"1": 76, "3": 59, "5": 34}
    sparsifier.update(0.2)
    assert sparsifier.active == {"1": 76 - 15 + 16, "3": 59 - 11 + 16, "5": 34 - 6}


def test_snfs_momentum_is_the_smoothed_dense_gradient_and_growth_takes_its_largest_inactive_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)             # lr 0: the weights stay put
    sparsifier = SNFS(model, optimizer, 0.4, end=1000, every=500, distribution="uniform", beta=0.7)
    mask = masks_of(model)["0"]
    theta = raw_weight(model[0]).detach().clone()
    expected = torch.zeros_like(theta)
    for step in range(3):                                               # M_t = β M_{t−1} + ∂L/∂w
        x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
        w = (theta * mask).requires_grad_()
        F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()
        expected = 0.7 * expected + w.grad
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    assert torch.allclose(sparsifier.momentum["0"], expected, rtol=1e-6, atol=1e-8)
    sparsifier.update(0.25)                                             # one layer: it regrows all it dropped
    drop = theta.abs().masked_fill(~mask, float("inf")).flatten().topk(3, largest=False).indices
    grow = expected.abs().masked_fill(mask, -1.0).flatten().topk(3).indices
    kept = mask.flatten().clone()
    kept[drop] = False
    kept[grow] = True
    assert torch.equal(masks_of(model)["0"].flatten(), kept)


def test_snfs_momentum_of_a_float64_model_is_the_float64_recurrence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)             # lr 0: the weights stay put
    sparsifier = SNFS(model, optimizer, 0.4, end=1000, every=500, distribution="uniform", beta=0.9)
    weight, expected = model[0].weight.detach().clone(), 0
    for _ in range(20):
        x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 5, (7,))
        w = weight.clone().requires_grad_()                              # the dense gradient, at the masked weight
        F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()
        expected = 0.9 * expected + w.grad                              # M_t = β M_{t−1} + ∂L/∂w, β = 0.9 in float64
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    assert sparsifier.momentum["0"].dtype == torch.float64
    torch.testing.assert_close(sparsifier.momentum["0"], expected, rtol=1e-13, atol=1e-15)   # float32 β: off by 1e-6


def test_snfs_momentum_follows_a_model_cast_to_float64_and_a_float32_state_loads_in_float64():
    # M stayed in float32 after the model was cast to float64 (or a float32 checkpoint was loaded into an SNFS on a
    # float64 model), summing the float64 gradients in float32, unlike an SNFS built on the float64 model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)             # lr 0: the weights stay put
    sparsifier = SNFS(model, optimizer, 0.4, end=1000, every=500, distribution="uniform", beta=0.9)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        if step == 3:
            model.double()
            expected = sparsifier.momentum["0"].double()
        x = torch.randn(7, 6, generator=generator, dtype=next(model.parameters()).dtype)
        y = torch.randint(0, 5, (7,), generator=generator)
        w = model[0].weight.detach().clone().requires_grad_()            # the dense gradient, at the masked weight
        F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()
        if step >= 3:
            expected = 0.9 * expected + w.grad                          # M_t = β M_{t−1} + ∂L/∂w in float64
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    assert sparsifier.momentum["0"].dtype == torch.float64
    torch.testing.assert_close(sparsifier.momentum["0"], expected, rtol=1e-13, atol=1e-15)
    state = sparsifier.state_dict()
    state["momentum"] = {name: m.float() for name, m in state["momentum"].items()}
    sparsifier.load_state_dict(state)
    assert sparsifier.momentum["0"].dtype == torch.float64
    assert torch.equal(sparsifier.momentum["0"], state["momentum"]["0"].double())


def test_snfs_records_gradients_until_its_last_update_and_needs_a_step_before_one():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("snfs", model, optimizer, end=4, every=2)
    with pytest.raises(RuntimeError, match="take a training step"):
        sparsifier.update(0.2)
    data = batches(8)
    train(model, optimizer, sparsifier, data[:4])                      # steps 1..4: T_end = 4
    assert not sparsifier._gradients.active                            # nothing more to grow by: no recording
    frozen = {name: m.clone() for name, m in sparsifier.momentum.items()}
    train(model, optimizer, sparsifier, data[4:])
    assert all(torch.equal(sparsifier.momentum[name], m) for name, m in frozen.items())


def test_a_generator_state_from_another_kind_of_device_seeds_the_generator():
    # CUDA's generator state (16 bytes) cannot be set on a CPU generator (5,056): resuming elsewhere
    # reseeds from the saved bytes, reproducibly.
    foreign = torch.arange(16, dtype=torch.uint8)
    draws, steps = [], []
    for state in (foreign, foreign, foreign.flip(0), None):                # None: nothing loaded
        model = small_mlp()
        sparsifier = make("set", model, torch.optim.SGD(model.parameters(), lr=0.1))
        if state is not None:
            sparsifier.load_state_dict({**sparsifier.state_dict(), "steps": 7, "generator": state})
        draws.append(torch.rand(5, generator=sparsifier.generator))
        steps.append(sparsifier.steps)
    assert steps == [7, 7, 7, 0] and torch.equal(draws[0], draws[1])      # reproducibly,
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])   # from the saved bytes


def test_share_by_hand():
    assert share(10, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}) == {"a": 5, "b": 5}
    assert share(10, {"a": 3.0, "b": 1.0}, {"a": 100, "b": 100}) in ({"a": 8, "b": 2}, {"a": 7, "b": 3})
    assert share(10, {"a": 3.0, "b": 1.0}, {"a": 4, "b": 100}) == {"a": 4, "b": 6}     # a is full
    assert share(7, {"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1, "b": 5, "c": 5}) in (
        {"a": 1, "b": 3, "c": 3}, {"a": 1, "b": 4, "c": 2}, {"a": 1, "b": 2, "c": 4})
    assert share(0, {"a": 1.0}, {"a": 0}) == {"a": 0}
    # quotas 10/3 and 20/3: floors 3 and 6, the one left over goes to the larger remainder (2/3, b)
    assert share(10, {"a": 1.0, "b": 2.0}, {"a": 100, "b": 100}) == {"a": 3, "b": 7}
    assert share(10, {"a": 2.0, "b": 1.0}, {"a": 100, "b": 100}) == {"a": 7, "b": 3}
    for total in range(0, 30):
        result = share(total, {"a": 0.7, "b": 0.2, "c": 0.1}, {"a": 10, "b": 10, "c": 10})
        assert sum(result.values()) == total and all(v <= 10 for v in result.values())
    with pytest.raises(ValueError, match="room for 3"):
        share(4, {"a": 1.0}, {"a": 3})
    for bad in (-1.0, float("nan"), float("inf")):      # inf: an overflowed float16 momentum sum
        with pytest.raises(ValueError, match="non-negative finite numbers"):
            share(4, {"a": 1.0, "b": bad}, {"a": 3, "b": 3})


def exact_shares(total, weights, capacity):
    """Water-filling in exact arithmetic: x_n = min(capacity_n, c · w_n) with Σ x_n = total (equal shares of what
    is left where the open names' weights are all zero)."""
    fixed = {}
    while True:
        open_ = [n for n in weights if n not in fixed]
        left = total - sum(fixed.values())
        norm = sum(Fraction(weights[n]) for n in open_)
        quota = {n: left * Fraction(weights[n]) / norm if norm > 0 else Fraction(left, len(open_)) for n in open_}
        over = [n for n in open_ if quota[n] > capacity[n]]
        if not over:
            return {**fixed, **quota}
        fixed.update((n, Fraction(capacity[n])) for n in over)


def test_share_is_within_one_of_the_exact_proportional_shares():
    # rounding in every round of the redistribution once gave {"a": 1, "b": 6, "c": 4} for equal weights
    assert share(11, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1, "b": 30, "c": 30}) == {"a": 1, "b": 5, "c": 5}
    assert share(3, {"a": 3.0, "b": 1.0, "c": 1.0}, {"a": 1, "b": 30, "c": 30}) == {"a": 1, "b": 1, "c": 1}
    rng = random.Random(0)
    for _ in range(2000):
        names = [str(i) for i in range(rng.randint(1, 5))]
        weights = {n: rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, 7.0]) for n in names}
        capacity = {n: rng.randint(0, 30) for n in names}
        total = rng.randint(0, sum(capacity.values()))
        got, exact = share(total, weights, capacity), exact_shares(total, weights, capacity)
        assert sum(got.values()) == total and all(got[n] <= capacity[n] for n in names)
        assert all(abs(got[n] - exact[n]) < 1 for n in names), (total, weights, capacity, got)


def test_snfs_shares_growth_in_a_half_precision_model_whose_momentum_sums_overflow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).half()
    snfs = SNFS(model, None, 0.5, distribution="uniform")
    for name, layer in snfs.layers().items():   # |M| of 1,000 and 3,000 over 32,768 weights: float16 sums overflow
        snfs.momentum[name] = torch.full_like(raw_weight(layer), 1000.0 if name == "0" else 3000.0)
    counts = snfs.grow_counts({"0": 100, "2": 100}, snfs.masks())
    assert counts == {"0": 50, "2": 150}                                  # in proportion to the mean |M|: 1 : 3


def test_bad_input():
    with pytest.raises(ValueError, match="without end it would be static sparse training: give end"):
        RigL(small_mlp(), None, 0.5)
    SET(small_mlp(), None, 0.5).update(0.3)                   # SET and SNFS may be updated by hand instead
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            RigL(small_mlp(), None, bad, end=1000)
    with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
        StaticSparse(small_mlp(), None, 0.5, distribution="erdos")
    with pytest.raises(ValueError, match="drop_fraction"):
        SET(small_mlp(), None, 0.5, end=1000, drop_fraction=1.2)
    with pytest.raises(ValueError, match="beta must be in"):
        SNFS(small_mlp(), None, 0.5, end=1000, beta=1.0)
    with pytest.raises(ValueError, match=r"sparse layers \['1', '3', '5'\]; missing \['5'\]"):
        RigL(small_mlp(), None, 0.5, end=1000, distribution={"1": 0.5, "3": 0.5})
    with pytest.raises(ValueError, match=r"not sparse layers: \['fc9'\]"):
        RigL(small_mlp(), None, 0.5, end=1000, distribution={"1": 0.5, "3": 0.5, "5": 0.5, "fc9": 0.5})
    with pytest.raises(ValueError, match=r"density of '1' must be in \(0, 1\]"):
        RigL(small_mlp(), None, 0.5, end=1000, distribution=lambda model, d: {"1": 1.5, "3": d, "5": d})
    model = small_mlp()
    for bad, error, message in (({"distribution": "ekr"}, ValueError, "unknown distribution 'ekr'"),
                                ({"drop_fraction": 1.5}, ValueError, r"drop_fraction \(α\) must be in \(0, 1\)"),
                                ({"layers": ["1", "fc9"]}, KeyError, "the model has no layer 'fc9'")):
        with pytest.raises(error, match=message):
            RigL(model, None, 0.5, end=1000, **bad)
        assert not masks_of(model), bad                          # a refused sparsifier leaves the model as it was
    with pytest.raises(ValueError, match=r"lower drop_fraction to at most \(1 - density\) / density"):
        SNFS(model, None, 0.8, end=1000, distribution="uniform")          # 0.3 · 0.8 of the weights > 0.2 free
    assert not masks_of(model) and not any(module._forward_hooks for module in model.modules())
    SNFS(small_mlp(), None, 0.8, end=1000, distribution="uniform", drop_fraction=0.25)
    SNFS(small_mlp(), None, 0.8, end=1000, distribution="uniform", regrow_dropped=True)
    for layers, unsparse in (([], small_mlp()), (None, nn.Sequential(nn.ReLU()))):
        with pytest.raises(ValueError, match="no layers to train sparsely"):
            SET(unsparse, None, 0.5, layers=layers)


@pytest.mark.parametrize("method", ["set", "rigl", "snfs"])
def test_a_sparsifier_leaves_the_masks_of_layers_it_was_not_given_alone(method):
    from lowlearn.sparse import prune, scores

    model = small_mlp()
    prune(model, {"5": scores.magnitude(model)["5"]}, 0.5)               # a layer pruned before sparse training
    pruned = masks_of(model)["5"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make(method, model, optimizer, layers=["1", "3"])
    assert list(sparsifier.layers()) == list(sparsifier.masks()) == ["1", "3"]
    train(model, optimizer, sparsifier, batches(20))
    assert torch.equal(masks_of(model)["5"], pruned)


def test_update_by_hand_says_why_rigl_cannot_grow_without_a_recorded_gradient():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("rigl", model, optimizer)
    train(model, optimizer, sparsifier, batches(2))
    with pytest.raises(RuntimeError, match="update\\(\\) by hand cannot use it"):
        sparsifier.update(0.3)
    set_model = small_mlp()
    set_optimizer = torch.optim.SGD(set_model.parameters(), lr=0.1)
    set_sparsifier = make("set", set_model, set_optimizer)
    before = masks_of(set_model)
    set_sparsifier.update(0.3)                                        # SET grows at random: any time will do
    assert any(not torch.equal(before[name], mask) for name, mask in masks_of(set_model).items())


def test_deepcopy_of_a_sparse_model_is_independent():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make("set", model, optimizer)
    train(model, optimizer, sparsifier, batches(12))
    frozen = copy.deepcopy(model)
    saved = masks_of(frozen)
    train(model, optimizer, sparsifier, batches(10, seed=3))
    assert all(torch.equal(saved[n], m) for n, m in masks_of(frozen).items())


@pytest.mark.parametrize("method", ["rigl", "snfs"])
@pytest.mark.parametrize("when", [0, 4])                     # at construction; a step before RigL's update at 5
def test_a_deep_copy_of_a_sparsifier_records_its_own_models_gradients(method, when):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = make(method, model, optimizer)
    train(model, optimizer, sparsifier, batches(when))
    twin = copy.deepcopy(sparsifier)
    assert twin.model is not model and twin.optimizer is not optimizer
    train(twin.model, twin.optimizer, twin, batches(6, seed=4))           # the copy's update reads its gradients
    assert not sparsifier._recorder().grads                             # and none went to the original
    train(model, optimizer, sparsifier, batches(6, seed=4))
    for name, mask in masks_of(model).items():                          # the same run, the same masks
        assert torch.equal(mask, masks_of(twin.model)[name])


def snfs_after_two_steps():
    """``(model, optimizer, SNFS without mask updates, a copy of its momentum)`` after two training steps."""
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = make("snfs", model, optimizer, end=None)
    train(model, optimizer, sparsifier, batches(2))
    return model, optimizer, sparsifier, {name: m.clone() for name, m in sparsifier.momentum.items()}


def test_a_non_finite_gradient_leaves_the_snfs_momentum_as_it_was():
    model, optimizer, sparsifier, before = snfs_after_two_steps()
    x, y = batches(1)[0]
    x[0, 0] = float("nan")
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sparsifier.step()                              # the optimizer skips the step, as a GradScaler does on overflow
    assert all(torch.equal(m, before[name]) for name, m in sparsifier.momentum.items())
    sparsifier.update(0.3)                                                # and growth goes on by it
    train(model, optimizer, sparsifier, batches(1, seed=5))
    assert all(not torch.equal(m, before[name]) for name, m in sparsifier.momentum.items())


def test_a_non_finite_gradient_in_one_layer_leaves_every_layers_snfs_momentum_as_it_was():
    # A GradScaler skips the whole step on an overflow anywhere: the finite layers' gradients (at the old scale)
    # entered their momentum.
    model, optimizer, sparsifier, before = snfs_after_two_steps()
    x, y = batches(1, seed=3)[0]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    last = list(before)[-1]
    sparsifier._recorder().grads[last][0, 0] = float("inf")             # one overflowed entry in the last layer
    sparsifier.step()
    assert len(before) > 1 and all(torch.equal(m, before[name]) for name, m in sparsifier.momentum.items())


def test_rigl_skips_an_update_whose_dense_gradient_is_not_finite():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = RigL(model, optimizer, 0.3, end=20, every=2)
    train(model, optimizer, sparsifier, batches(1))                      # step 1: no update
    before = masks_of(model)
    x, y = batches(1, seed=3)[0]
    x[0, 0] = float("nan")
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert not all(torch.isfinite(raw_weight(layer).grad).all() for layer in prunable_layers(model).values())
    sparsifier.step()                              # step 2 = ΔT, skipped by the optimizer as a GradScaler would
    assert all(torch.equal(mask, before[name]) for name, mask in masks_of(model).items())
    train(model, optimizer, sparsifier, batches(2, seed=4))              # steps 3, 4: the next update changes masks
    assert any(not torch.equal(mask, before[name]) for name, mask in masks_of(model).items())


class _OverfullSET(SET):
    def grow_counts(self, dropped, masks):                               # the last layer cannot grow so many
        return {**dropped, "5": masks["5"].numel()}


def test_a_refused_update_changes_no_count_and_no_mask():
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = _OverfullSET(model, optimizer, 0.3, end=30, every=5)
    active, masks, drawn_from = dict(sparsifier.active), masks_of(model), sparsifier.generator.get_state()
    for fraction in (-0.1, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
            sparsifier.update(fraction)
    with pytest.raises(ValueError, match="cannot grow 48 weights: only 14 of 48 can be grown"):
        sparsifier.update(0.3)                                           # after SET drew its random growth scores
    assert sparsifier.active == active == counts(model)
    assert all(torch.equal(mask, masks[name]) for name, mask in masks_of(model).items())
    assert torch.equal(sparsifier.generator.get_state(), drawn_from)      # the next update draws what it would have


@pytest.mark.parametrize("method", METHODS)
def test_a_pruned_model_gets_the_same_random_masks_as_an_unpruned_one(method):
    pruned, fresh = small_mlp(), small_mlp()
    prune(pruned, magnitude(pruned), 0.5)
    make(method, pruned, None)
    make(method, fresh, None)
    assert all(torch.equal(mask, masks_of(fresh)[name]) for name, mask in masks_of(pruned).items())


@pytest.mark.parametrize("method", ["rigl", "snfs"])                     # SET reads no gradient: no hooks
def test_a_closed_sparsifier_leaves_no_hook_and_another_takes_the_model_over(method):
    model = small_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = make(method, model, optimizer, every=1)                    # SNFS and RigL record from the start
    train(model, optimizer, first, batches(3))
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked
    first.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="was closed"):
        first.step()
    second = make(method, model, optimizer, every=1)
    train(model, optimizer, second, batches(3))
    assert len([m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]) == len(hooked)


def test_static_sparse_training_refuses_an_update_by_hand():
    model = MLP(8, (16,), 4)
    static = StaticSparse(model, None, 0.5)
    before = masks_of(model)
    with pytest.raises(RuntimeError, match="static sparse training never changes its masks"):
        static.update(0.3)
    assert all(torch.equal(before[name], mask) for name, mask in masks_of(model).items())


def test_snfs_momentum_defaults_to_the_papers_beta_of_0_9():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)             # lr 0: the weights stay put
    sparsifier = SNFS(model, optimizer, 0.4, end=1000, every=500, distribution="uniform")
    assert sparsifier.beta == 0.9
    weight, expected = model[0].weight.detach().clone(), 0
    for _ in range(3):
        x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
        w = weight.clone().requires_grad_()                              # the dense gradient, at the masked weight
        F.cross_entropy(F.linear(x, w, model[0].bias), y).backward()
        expected = 0.9 * expected + w.grad                              # M_t = 0.9 M_{t−1} + ∂L/∂w
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
    torch.testing.assert_close(sparsifier.momentum["0"], expected, rtol=1e-6, atol=1e-8)


def test_a_gradient_recorded_before_a_checkpoint_is_loaded_does_not_reach_the_resumed_snfs_momentum():
    def build(seed):
        model = small_mlp(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, make("snfs", model, optimizer, end=40, every=4, seed=seed)

    data = batches(30)
    model, optimizer, sparsifier = build(0)
    train(model, optimizer, sparsifier, data)

    model2, optimizer2, sparsifier2 = build(0)
    train(model2, optimizer2, sparsifier2, data[:23])
    saved = copy.deepcopy({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                           "sparsifier": sparsifier2.state_dict()})
    model3, optimizer3, sparsifier3 = build(5)
    x, y = data[0]
    F.cross_entropy(model3(x), y).backward()                   # a backward pass of the fresh model, recorded
    model3.load_state_dict(saved["model"])
    optimizer3.load_state_dict(saved["optimizer"])
    sparsifier3.load_state_dict(saved["sparsifier"])
    train(model3, optimizer3, sparsifier3, data[23:])

    for name, m in sparsifier.momentum.items():
        assert torch.equal(m, sparsifier3.momentum[name]), name
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), name


def test_snfs_sums_the_momentum_of_a_bfloat16_model_in_float32_and_loads_a_saved_one_in_float32():
    # In bfloat16 β = 0.9 would be 0.8984375, and each gradient added to the sum rounded to its 8 bits: after 30
    # steps of one gradient g, M was up to 3% off g (1 − 0.9^30) / 0.1.
    model = small_mlp().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)              # the same gradient at every step
    sparsifier = SNFS(model, optimizer, 0.5, beta=0.9)
    x, y = batches(1)[0]
    for step in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
        optimizer.step()
        sparsifier.step()
        if step == 0:
            first = {name: m.to(torch.float32, copy=True) for name, m in sparsifier.momentum.items()}
    expected = {name: torch.zeros_like(g) for name, g in first.items()}
    for _ in range(30):
        expected = {name: 0.9 * m + first[name] for name, m in expected.items()}
    for name, m in sparsifier.momentum.items():
        torch.testing.assert_close(m.float(), expected[name], rtol=1e-5, atol=0)
        assert m.dtype == torch.float32
    for saved_dtype in (torch.bfloat16, torch.float32):           # a state saved in either loads in float32
        state = sparsifier.state_dict()
        state["momentum"] = {name: m.to(saved_dtype) for name, m in state["momentum"].items()}
        sparsifier.load_state_dict(state)
        for name, m in sparsifier.momentum.items():
            assert m.dtype == torch.float32 and torch.equal(m, state["momentum"][name].float())


@pytest.mark.parametrize("method", [SET, RigL, SNFS, StaticSparse])
def test_a_frozen_layer_is_refused_by_name_before_the_model_changes(method):
    # Dropped connections would be regrown at zero, where a frozen layer cannot move them.
    model = MLP(20, (16,), 4)
    model[1].requires_grad_(False)
    keys = list(model.state_dict())
    schedule = {} if method is StaticSparse else {"end": 100, "every": 10}
    with pytest.raises(ValueError, match=r"the layers \['1'\] are frozen \(requires_grad=False\)"):
        method(model, None, 0.5, **schedule)
    assert list(model.state_dict()) == keys
    method(model, None, 0.5, layers=["3"], **schedule)        # the frozen layer left out stays dense


@pytest.mark.parametrize("seed", [-1, "0", 1.5])
def test_a_bad_seed_is_refused_before_the_model_changes(seed):
    model = MLP(20, (16,), 4)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        RigL(model, None, 0.5, end=100, every=10, seed=seed)
    assert not masks_of(model)
