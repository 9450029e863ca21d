import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from lowlearn.models import MLP
from lowlearn.sparse.allocation import erk, uniform
from lowlearn.sparse.mask import density, masks_of
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.schedule import GradualPruning, cubic_density, geometric_densities, iterative_pruning
from lowlearn.sparse.scores import magnitude
from lowlearn.train import fit


def test_geometric_densities():
    assert geometric_densities(0.5, 1) == [0.5]
    assert geometric_densities(0.008, 3) == pytest.approx([0.2, 0.04, 0.008])
    d = geometric_densities(0.8 ** 5, 5)   # Frankle & Carbin: 20% of the survivors per round
    assert d == pytest.approx([0.8, 0.64, 0.512, 0.4096, 0.32768])
    assert d[-1] == 0.8 ** 5
    ratios = [b / a for a, b in zip([1.0] + d, d)]
    assert ratios == pytest.approx([0.8] * 5)
    assert geometric_densities(0.1, 7)[-1] == 0.1


def test_geometric_bad_input():
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"final_density must be in \(0, 1\]"):
            geometric_densities(bad, 3)
    for bad in (0, -2, 2.0, True):                       # a bool is not a count
        with pytest.raises(ValueError, match="rounds must be an int >= 1"):
            geometric_densities(0.5, bad)
    assert geometric_densities(0.5, np.int64(2)) == geometric_densities(0.5, 2)   # NumPy integers are counts


def _fine_tune(model, r, log):
    """One SGD step on a fixed batch (so that the next round's magnitudes change), and a log of the round."""
    g = torch.Generator().manual_seed(r)
    x, y = torch.randn(8, 784, generator=g), torch.randint(0, 10, (8,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    log.append((r, {name: m.clone() for name, m in masks_of(model).items()}))
    return f"round {r}"


def test_iterative_pruning_equals_the_loop_of_prune_and_fine_tune():
    torch.manual_seed(0)
    model = MLP(hidden=(32, 16))
    reference = copy.deepcopy(model)
    log, reference_log = [], []
    assert iterative_pruning(model, 0.05, 3, functools.partial(_fine_tune, log=log)) == "round 3"
    for r, d in enumerate(geometric_densities(0.05, 3), start=1):          # written out
        prune(reference, magnitude(reference), d, scope="global")
        _fine_tune(reference, r, reference_log)
    assert [r for r, _ in log] == [1, 2, 3]
    for (_, masks), (_, expected) in zip(log, reference_log):
        assert all(torch.equal(masks[name], expected[name]) for name in expected)
    total = sum(m.numel() for m in log[0][1].values())
    assert [sum(int(m.sum()) for m in masks.values()) for _, masks in log] == [
        kept_count(d, total) for d in geometric_densities(0.05, 3)]
    for (_, before), (_, after) in zip(log, log[1:]):                      # masks only shrink
        assert all(not (after[name] & ~before[name]).any() for name in after)
    assert torch.allclose(model(torch.ones(2, 784)), reference(torch.ones(2, 784)))


def test_iterative_pruning_ranks_by_the_score_it_is_given():
    # Fixed scores unrelated to the weights: each round keeps the global top-k of them, so after the last round
    # the model keeps exactly the kept_count(final_density, N) highest scores of all layers together.
    torch.manual_seed(0)
    model = MLP(hidden=(8,), in_features=6, out_features=3)
    g = torch.Generator().manual_seed(1)
    fixed = {"1": torch.rand(8, 6, generator=g), "3": torch.rand(3, 8, generator=g)}
    iterative_pruning(model, 0.25, 2, lambda model, r: None, score=lambda model: fixed)
    flat = torch.cat([fixed["1"].flatten(), fixed["3"].flatten()])
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[flat.sort(descending=True).indices[:kept_count(0.25, flat.numel())]] = True
    masks = masks_of(model)
    assert torch.equal(torch.cat([masks["1"].flatten(), masks["3"].flatten()]), expected)


def test_iterative_pruning_zeroes_the_pruned_weights_state_of_an_optimizer_kept_across_rounds():
    torch.manual_seed(0)
    model = MLP(hidden=(32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))

    def fine_tune(model, r):
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        for name, mask in masks_of(model).items():       # round 2 prunes weights whose moments round 1 made
            state = optimizer.state[model.get_submodule(name).parametrizations.weight.original]
            assert not state["exp_avg"][~mask].any() and not state["exp_avg_sq"][~mask].any(), (name, r)

    iterative_pruning(model, 0.1, 2, fine_tune, optimizer=optimizer)


def test_iterative_pruning_with_a_layer_wise_allocation_and_bad_input():
    model = MLP(hidden=(32, 16))
    log = []
    iterative_pruning(model, 0.1, 2, functools.partial(_fine_tune, log=log), scope="layer", allocation=erk)
    final = log[-1][1]
    expected = erk(model, 0.1)
    assert all(int(final[name].sum()) == kept_count(d, final[name].numel()) for name, d in expected.items())
    with pytest.raises(ValueError, match="use it with scope='layer'"):
        iterative_pruning(MLP(), 0.1, 2, lambda m, r: None, allocation=erk)
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
        iterative_pruning(MLP(), 0.1, 2, lambda m, r: None, scope="model")
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        iterative_pruning(MLP(), 0.1, 0, lambda m, r: None)


def test_a_final_density_the_allocation_cannot_reach_fails_before_the_first_round():
    # It failed in the last round, after the others had pruned and fine-tuned the model.
    model, rounds = MLP(in_features=12, hidden=(16, 8), out_features=3), []
    with pytest.raises(ValueError, match="first layer"):
        iterative_pruning(model, 0.3, 3, lambda m, r: rounds.append(r), scope="layer",
                          allocation=functools.partial(uniform, dense_first=True))
    assert rounds == [] and not masks_of(model)


def test_cubic_density_at_hand_picked_points():
    # s_i = 0, s_f = 0.9, t0 = 0, nΔt = 100: s_50 = 0.9 + (0 - 0.9)(1 - 0.5)³ = 0.7875.
    assert cubic_density(50, 0.1, 0, 100) == pytest.approx(1 - 0.7875)
    # t = 25: s = 0.9 - 0.9 · 0.75³ = 0.5203125.
    assert cubic_density(25, 0.1, 0, 100) == pytest.approx(1 - 0.5203125)
    # s_i = 0.5, s_f = 0.9, t0 = 100, nΔt = 200, t = 200: s = 0.9 - 0.4 · 0.5³ = 0.85.
    assert cubic_density(200, 0.1, 100, 300, initial_density=0.5) == pytest.approx(0.15)
    # Endpoints and outside.
    assert cubic_density(0, 0.1, 0, 100) == 1.0 and cubic_density(-5, 0.1, 0, 100) == 1.0
    assert cubic_density(100, 0.1, 0, 100) == 0.1 and cubic_density(1000, 0.1, 0, 100) == 0.1
    # begin == end: one step to the final density, at end (where GradualPruning prunes last).
    assert cubic_density(9, 0.1, 10, 10, 0.7) == 0.7 and cubic_density(10, 0.1, 10, 10, 0.7) == 0.1
    assert cubic_density(11, 0.1, 10, 10, 0.7) == 0.1
    # At begin the density is exactly the initial one (not the formula's rounding of it).
    assert cubic_density(5, 0.1, 5, 10, initial_density=0.3) == 0.3


def test_gradual_pruning_prunes_every_100_steps_by_default():
    schedule = GradualPruning(0.5, begin=1, end=1000)
    assert schedule.every == 100
    assert [t for t in range(1, 1001) if schedule.prunes_at(t)] == list(range(1, 1000, 100)) + [1000]


def test_cubic_density_is_monotone_and_fast_at_first():
    d = [cubic_density(t, 0.05, 10, 110) for t in range(0, 130)]
    drops = [a - b for a, b in zip(d, d[1:])]
    assert all(x >= 0 for x in drops)
    assert all(a >= b for a, b in zip(drops[10:109], drops[11:110]))   # concave in sparsity: drops shrink
    assert d[10] == 1.0 and d[110] == 0.05


def test_cubic_density_bad_input():
    with pytest.raises(ValueError, match="must not exceed initial_density"):
        cubic_density(5, 0.5, 0, 10, initial_density=0.3)
    with pytest.raises(ValueError, match="end .* must not come before begin"):
        cubic_density(5, 0.5, 10, 0)
    for message, args in (("step must be an int;", (float("nan"), 0.1, 0, 10)),
                          ("step must be an int;", (2.5, 0.1, 0, 10)),
                          ("begin must be an int >= 0", (5, 0.1, -1, 10)),
                          ("end must be an int >= 0", (5, 0.1, 0, float("nan")))):
        with pytest.raises(ValueError, match=message):                  # NaN gave a NaN density
            cubic_density(*args)
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            cubic_density(5, bad, 0, 10)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            cubic_density(5, 0.1, 0, 10, initial_density=bad)


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


class Recorder:
    """Records the masks after every step (put it after GradualPruning)."""

    def __init__(self):
        self.masks = {}

    def __call__(self, state):
        self.masks[state.step] = masks_of(state.model)


@pytest.mark.parametrize("scope,allocation,final", [
    ("layer", None, 0.3), ("global", None, 0.3), ("layer", erk, 0.3),
    ("layer", functools.partial(uniform, dense_first=True), 0.7)])   # the first layer has 192 of 344
def test_gradual_pruning_in_fit(scope, allocation, final):
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16, 8), out_features=3)
    sizes = {"1": 12 * 16, "3": 16 * 8, "5": 8 * 3}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = GradualPruning(final, begin=4, end=20, every=5, scope=scope, allocation=allocation)
    record = Recorder()
    fit(model, tiny_data(), optimizer, steps=26, batch_size=16, callbacks=[pruning, record], device="cpu")
    prune_steps = [4, 9, 14, 19, 20]
    assert [t for t in range(1, 27) if pruning.prunes_at(t)] == prune_steps
    assert all(record.masks[t] == {} for t in range(1, 4))   # no masks before the first pruning

    def kept(masks):
        return {name: int(m.sum()) for name, m in masks.items()}

    for t in range(4, 27):
        d = cubic_density(t, final, 4, 20)
        counts = kept(record.masks[t])
        if t in prune_steps and scope == "global":
            assert sum(counts.values()) == kept_count(d, sum(sizes.values()))
        elif t in prune_steps:
            targets = dict.fromkeys(sizes, d) if allocation is None else allocation(model, d)
            assert counts == {name: kept_count(targets[name], n) for name, n in sizes.items()}
        if t > 4:
            for name, mask in record.masks[t].items():
                assert not (mask & ~record.masks[t - 1][name]).any(), "masks only shrink"
                if t not in prune_steps:
                    assert torch.equal(mask, record.masks[t - 1][name]), "no pruning between pruning steps"
    assert abs(density(model) - final) <= 3 / sum(sizes.values())
    for name, layer in [("1", model[1]), ("3", model[3]), ("5", model[5])]:
        theta = layer.parametrizations.weight.original
        assert (theta[~record.masks[26][name]] == 0).all()
        assert (optimizer.state[theta]["momentum_buffer"][~record.masks[26][name]] == 0).all()


def test_gradual_pruning_reaches_exactly_what_prune_keeps():
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16,), out_features=3)
    fit(model, tiny_data(), torch.optim.SGD(model.parameters(), lr=0.05), steps=12, batch_size=16,
        callbacks=[GradualPruning(0.1, begin=2, end=10, every=4)], device="cpu")
    assert {name: int(m.sum()) for name, m in masks_of(model).items()} == {
        "1": kept_count(0.1, 12 * 16), "3": kept_count(0.1, 16 * 3)}


def test_gradual_pruning_with_a_custom_score():
    calls = []

    def score(model):
        calls.append(1)
        return magnitude(model)

    model = MLP(in_features=12, hidden=(16,), out_features=3)
    fit(model, tiny_data(), torch.optim.SGD(model.parameters(), lr=0.05), steps=5, batch_size=16,
        callbacks=[GradualPruning(0.5, begin=1, end=5, every=2, score=score)], device="cpu")
    assert len(calls) == 3   # steps 1, 3, 5


def test_gradual_pruning_bad_input():
    with pytest.raises(ValueError, match=r"every \(steps between prunings\) must be an int >= 1"):
        GradualPruning(0.1, 1, 10, every=0)
    with pytest.raises(ValueError, match="scope must be"):
        GradualPruning(0.1, 1, 10, scope="model")
    with pytest.raises(ValueError, match="use it with scope='layer'"):
        GradualPruning(0.1, 1, 10, scope="global", allocation=erk)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GradualPruning(0, 1, 10)
    with pytest.raises(ValueError, match="must not come before"):
        GradualPruning(0.1, 10, 0)
    with pytest.raises(ValueError, match=r"begin \(an optimizer step;.* must be an int"):
        GradualPruning(0.1, 0.5, 10, every=2)                     # it would prune only once, at the end
    with pytest.raises(ValueError, match=r"every \(steps between prunings\) must be an int >= 1"):
        GradualPruning(0.1, 1, 10, every=True)
    with pytest.raises(ValueError, match=r"begin \(an optimizer step; fit calls its callbacks after steps 1, 2"):
        GradualPruning(0.25, begin=0, end=0)                      # it would never prune: fit never calls at step 0


def test_layerwise_gradual_pruning_leaves_out_a_layer_that_global_pruning_emptied():
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16,), out_features=3)
    with torch.no_grad():
        model[3].weight.mul_(1e-3)                                # the output layer loses every weight globally
    prune(model, magnitude(model), 16 * 12 / (16 * 12 + 3 * 16), scope="global")
    assert int(masks_of(model)["3"].sum()) == 0
    fit(model, tiny_data(), torch.optim.SGD(model.parameters(), lr=0.05), steps=4, batch_size=16,
        callbacks=[GradualPruning(0.25, begin=2, end=4, every=2)], device="cpu", progress=False)
    kept = {name: int(mask.sum()) for name, mask in masks_of(model).items()}
    assert kept == {"1": kept_count(0.25, 16 * 12), "3": 0}


def test_a_final_density_the_allocation_cannot_reach_fails_at_the_first_pruning_step():
    # a dense first layer holds 192 of the 344 weights: 30% overall cannot be allocated
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16, 8), out_features=3)
    pruning = GradualPruning(0.3, begin=2, end=20, every=2, allocation=functools.partial(uniform, dense_first=True))
    steps = []
    with pytest.raises(ValueError, match="first layer"):
        fit(model, tiny_data(), torch.optim.SGD(model.parameters(), lr=0.05), steps=30, batch_size=16,
            callbacks=[lambda state: steps.append(state.step), pruning], device="cpu")
    assert steps[-1] == 2 and not masks_of(model)                   # before anything was pruned


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_pruning_goes_on_from_a_model_already_sparser_than_its_schedule(scope):
    # A model pruned before (or a run resumed with a fresh step count): masks only shrink, so the schedule
    # prunes a layer only once it asks for less than the layer keeps, and ends at the final density.
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(16,), out_features=3)
    data = (torch.randn(96, 12), torch.randint(0, 3, (96,)))
    schedule = GradualPruning(0.1, begin=1, end=20, every=5, scope=scope)
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), steps=12, batch_size=16, callbacks=[schedule],
        device="cpu", progress=False)
    halfway = masks_of(model)
    assert 0.1 < density(model) < 1.0
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.05), steps=20, batch_size=16, callbacks=[schedule],
        device="cpu", progress=False)
    assert all((mask <= halfway[name]).all() for name, mask in masks_of(model).items())      # only shrank
    sizes = {name: mask.numel() for name, mask in masks_of(model).items()}
    if scope == "layer":
        assert all(int(mask.sum()) == kept_count(0.1, sizes[name]) for name, mask in masks_of(model).items())
    else:
        assert sum(int(mask.sum()) for mask in masks_of(model).values()) == kept_count(0.1, sum(sizes.values()))


def test_iterative_pruning_with_an_allocation_allocates_each_rounds_density():
    """Reference: Han et al.'s loop written out, as the docstring states it: round r prunes layer l to
    ``allocation(model, d_r)[l]`` with ``d_r = final^(r/R)`` (not the final density from round 1), so
    after round r layer l keeps exactly ``kept_count(erk(model, d_r)[l], n_l)`` weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    counts = []
    iterative_pruning(model, 0.2, 3, lambda m, r: counts.append({n: int(k.sum()) for n, k in masks_of(m).items()}),
                      scope="layer", allocation=erk)
    assert len(counts) == 3
    for after, d_r in zip(counts, geometric_densities(0.2, 3)):
        wanted = erk(model, d_r)
        expected = {n: kept_count(wanted[n], model.get_submodule(n).weight.numel()) for n in wanted}
        assert after == expected
