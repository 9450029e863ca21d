import copy
import io

import pytest
import torch
from torch import nn

from lowlearn.models import MLP, ResNet20
from lowlearn.powerprop import powerprop
from lowlearn.sparse.lottery import (EarlyBird, Snapshot, constant_init, iterative_magnitude_pruning,
                                     mask_distance, mask_overlap, random_mask, random_reinit, reshuffle, rewind,
                                     train_control)
from lowlearn.sparse.mask import (attach_masks, density, find_mask, masked_layers, masks_of, prunable_layers,
                                  raw_weight, set_masks)
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.scores import magnitude
from lowlearn.sparse.structured import prune_channels
from lowlearn.train import History, TrainState, fit, seed_everything, seeded_generator

# A small synthetic task: 4 classes, linear in 20 features.
_g = torch.Generator().manual_seed(0)
X = torch.randn(320, 20, generator=_g)
Y = (X @ torch.randn(20, 4, generator=_g)).argmax(1)
TRAIN, TEST = (X[:256], Y[:256]), (X[256:], Y[256:])


def mlp(seed=0):
    seed_everything(seed)
    return MLP(in_features=20, hidden=(32, 16), out_features=4)


def bn_net(seed=0):
    seed_everything(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def optimizer_for(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def make_train(steps=20, kind="sgd", log=None, extra_first=()):
    """train(model, callbacks) for IMP; ``log`` gets the model's state before and after each run, and its optimizer."""

    def train(model, callbacks):
        entry = {"start": {k: v.clone() for k, v in model.state_dict().items()}, "masks": masks_of(model)}
        optimizer = optimizer_for(kind, model)
        extra = list(extra_first) if log is not None and not log else []
        history = fit(model, TRAIN, optimizer, steps=steps, batch_size=32, callbacks=[*callbacks, *extra],
                      eval_data=TEST, eval_every=5, device="cpu", progress=False)
        if log is not None:
            log.append({**entry, "end": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": optimizer})
        return history

    return train


def sizes(model):
    return {name: layer.weight.numel() for name, layer in masked_layers(model).items()}


def test_densities_follow_the_schedule_and_masks_only_shrink():
    model = mlp()
    lottery = iterative_magnitude_pruning(model, make_train(), rounds=3, prune_fraction=0.2, output_fraction=0.1)
    n = sizes(model)
    assert [t.index for t in lottery.rounds] == [0, 1, 2, 3]
    for r, ticket in enumerate(lottery.rounds):
        for name, mask in ticket.masks.items():
            p = 0.1 if name == "5" else 0.2
            assert int(mask.sum()) == kept_count((1 - p) ** r, n[name])
            assert ticket.layer_densities[name] == int(mask.sum()) / n[name]
            assert mask.device.type == "cpu" and mask.dtype == torch.bool
        assert ticket.density == sum(int(m.sum()) for m in ticket.masks.values()) / sum(n.values())
    for before, after in zip(lottery.rounds, lottery.rounds[1:]):
        for name in before.masks:
            assert not (after.masks[name] & ~before.masks[name]).any(), "a pruned weight came back"
        assert after.density < before.density


def test_each_round_prunes_the_smallest_surviving_magnitudes():
    log = []
    lottery = iterative_magnitude_pruning(mlp(), make_train(log=log), rounds=2, prune_fraction=0.5)
    for r in range(2):
        for name, survivors in lottery.rounds[r].masks.items():
            trained = log[r]["end"][f"{name}.parametrizations.weight.original"].abs()
            kept = lottery.rounds[r + 1].masks[name]
            assert trained[kept].min() >= trained[survivors & ~kept].max()


def test_reset_restores_the_initialisation_exactly():
    log = []
    model = bn_net()
    attach_masks(model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    lottery = iterative_magnitude_pruning(model, make_train(log=log), rounds=2, prune_fraction=0.3)
    assert lottery.rewind_step == 0
    for r in (1, 2):
        start, masks = log[r]["start"], lottery.rounds[r].masks
        for name, mask in masks.items():
            raw = start[f"{name}.parametrizations.weight.original"]
            original = init[f"{name}.parametrizations.weight.original"]
            assert torch.equal(raw[mask], original[mask])
            assert (raw[~mask] == 0).all()
            assert torch.equal(start[f"{name}.bias"], init[f"{name}.bias"])
        for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight", "1.bias"):
            assert torch.equal(start[key], init[key]), key
    assert not torch.equal(log[0]["end"]["1.running_mean"], init["1.running_mean"])


def test_rewinding_restores_the_step_k_snapshot_not_the_initialisation():
    log, reference = [], Snapshot(5)
    model = bn_net()
    attach_masks(model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    lottery = iterative_magnitude_pruning(model, make_train(log=log, extra_first=[reference]), rounds=2,
                                          prune_fraction=0.3, rewind_step=5)
    assert lottery.rewind_step == 5
    assert lottery.rewind_state.keys() == reference.state.keys()
    assert all(torch.equal(lottery.rewind_state[k], reference.state[k]) for k in reference.state)
    first = "0.parametrizations.weight.original"
    assert not torch.equal(reference.state[first], init[first])
    assert reference.state["1.num_batches_tracked"] == 5
    for r in (1, 2):
        start = log[r]["start"]
        for name, mask in lottery.rounds[r].masks.items():
            raw = start[f"{name}.parametrizations.weight.original"]
            assert torch.equal(raw[mask], reference.state[f"{name}.parametrizations.weight.original"][mask])
            assert (raw[~mask] == 0).all()
        for key in ("0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
            assert torch.equal(start[key], reference.state[key]), key


def test_the_documented_rewinding_closure_trains_the_dense_runs_steps_after_k_on_its_batches():
    # iterative_magnitude_pruning's docstring: fit(..., start_step=k) after the first call takes up the batches of
    # the dense run after step k, to the same end. With plain SGD (no optimizer state) and nothing pruned, the
    # rewound run then retraces the dense run's steps k + 1, ..., T exactly.
    ends, starts = [], []

    def train(model, callbacks):
        starts.append(0 if not starts else 7)
        history = fit(model, TRAIN, torch.optim.SGD(model.parameters(), lr=0.1), steps=20, batch_size=32,
                      callbacks=callbacks, device="cpu", progress=False, start_step=starts[-1])
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
        return history

    lottery = iterative_magnitude_pruning(mlp(), train, rounds=1, prune_fraction=0.0, rewind_step=7)
    assert starts == [0, 7] and [t.history.steps[-1] for t in lottery.rounds] == [20, 20]
    assert all(torch.equal(ends[0][key], ends[1][key]) for key in ends[0])


def test_rewind_keeps_the_bias_masks_of_removed_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_channels(model, 0.75)                                         # 6 units: weight and bias masks
    snapshot = Snapshot(0)
    snapshot.capture(model)
    units = prune_channels(model, 0.5)["0"]                             # 4 units, after the snapshot
    rewind(model, snapshot.state)
    assert torch.equal(find_mask(model[0], "bias").mask != 0, units)
    assert (model[0].parametrizations.bias.original[~units] == 0).all()
    assert (model[0](torch.randn(3, 8))[:, ~units] == 0).all()          # removed units stay silent
    kept = model[0].parametrizations.bias.original[units]
    assert torch.equal(kept, snapshot.state["0.parametrizations.bias.original"][units])
    random_reinit(model, seed=1)                                        # the control zeroes raw biases too
    assert (model[0].parametrizations.bias.original[~units] == 0).all()
    assert (model[0].parametrizations.bias.original[units] != 0).all()


@pytest.mark.parametrize("control", [None, "reinit"])
def test_train_control_after_channel_pruning_takes_the_lotterys_bias_masks_and_refuses_a_model_without_any(control):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))
    fresh = copy.deepcopy(model)
    units = prune_channels(model, 0.5)["0"]                             # masks the biases of the removed units
    lottery = iterative_magnitude_pruning(model, make_train(steps=5), rounds=1, prune_fraction=0.2)
    with pytest.raises(ValueError, match=r"masked biases in the layers \['0'\] \(prune_channels masks the biases "
                                         r"of the units it removes\): prune the channels of model first"):
        train_control(fresh, lottery, 1, make_train(steps=5), control)
    prune_channels(fresh, 0.75)                                         # other units, and more, than the lottery's
    copies = []

    def train(net, callbacks):
        copies.append(net)
        return make_train(steps=5)(net, callbacks)

    train_control(fresh, lottery, 1, train, control)
    net = copies[0]
    assert torch.equal(find_mask(net[0], "bias").mask != 0, units)
    assert all(torch.equal(mask, lottery.rounds[1].masks[name]) for name, mask in masks_of(net).items())
    assert (net[0](torch.randn(3, 20))[:, ~units] == 0).all()           # the lottery's removed units stay silent


def test_round_records_the_last_evaluation_and_the_early_stopping_step():
    lottery = iterative_magnitude_pruning(mlp(), make_train(), rounds=1, prune_fraction=0.2)
    for ticket in lottery.rounds:
        history = ticket.history
        assert history.eval_steps == [5, 10, 15, 20]
        assert ticket.eval == history.eval[-1] and set(ticket.eval) == {"loss", "accuracy"}
        losses = history.metric("loss")
        assert ticket.early_stop_step == history.eval_steps[losses.index(min(losses))]


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_pruned_weights_and_their_optimizer_state_stay_exactly_zero(kind):
    log = []
    model = mlp()
    lottery = iterative_magnitude_pruning(model, make_train(steps=30, kind=kind, log=log), rounds=2,
                                          prune_fraction=0.4)
    for r in (1, 2):  # each trained 30 steps after a pruning
        optimizer, masks, end = log[r]["optimizer"], lottery.rounds[r].masks, log[r]["end"]
        params = model.state_dict(keep_vars=True)  # the optimizer keys its state by parameter
        for name in masks:
            key, pruned = f"{name}.parametrizations.weight.original", ~masks[name]
            assert (end[key][pruned] == 0).all()
            moments = [v for v in optimizer.state[params[key]].values() if v.shape == pruned.shape]
            assert moments, "the optimizer kept no per-weight state"
            for value in moments:
                assert (value[pruned] == 0).all()
                assert value[~pruned].abs().sum() > 0


def test_global_scope_prunes_hidden_layers_together_and_the_output_layer_alone():
    model = mlp()
    lottery = iterative_magnitude_pruning(model, make_train(), rounds=2, prune_fraction=0.2,
                                          output_fraction=0.1, scope="global")
    n = sizes(model)
    for r, ticket in enumerate(lottery.rounds):
        hidden = int(ticket.masks["1"].sum()) + int(ticket.masks["3"].sum())
        assert hidden == kept_count(0.8 ** r, n["1"] + n["3"])
        assert int(ticket.masks["5"].sum()) == kept_count(0.9 ** r, n["5"])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_model_masked_before_imp_is_pruned_from_its_own_densities(scope):
    # Each round prunes a fraction of what survives, so a model that comes already masked (here to half of
    # each layer, the output layer to 0.8) keeps start · (1 − p)^r, not (1 − p)^r of every layer.
    model = mlp()
    start = {"1": 0.5, "3": 0.5, "5": 0.8}
    prune(model, magnitude(model), start)
    lottery = iterative_magnitude_pruning(model, make_train(), rounds=2, prune_fraction=0.2,
                                          output_fraction=0.1, scope=scope)
    n = sizes(model)
    for r, ticket in enumerate(lottery.rounds):
        if scope == "layer":
            assert int(ticket.masks["1"].sum()) == kept_count(0.5 * 0.8 ** r, n["1"])
            assert int(ticket.masks["3"].sum()) == kept_count(0.5 * 0.8 ** r, n["3"])
        else:
            hidden = int(ticket.masks["1"].sum()) + int(ticket.masks["3"].sum())
            pooled = (kept_count(0.5, n["1"]) + kept_count(0.5, n["3"])) / (n["1"] + n["3"])
            assert hidden == kept_count(pooled * 0.8 ** r, n["1"] + n["3"])
        assert int(ticket.masks["5"].sum()) == kept_count(0.8 * 0.9 ** r, n["5"])


def test_per_layer_fractions():
    model = mlp()
    fractions = {"1": 0.5, "3": 0.2, "5": 0.0}
    lottery = iterative_magnitude_pruning(model, make_train(), rounds=2, prune_fraction=fractions)
    n = sizes(model)
    for name, p in fractions.items():
        assert int(lottery.rounds[2].masks[name].sum()) == kept_count((1 - p) ** 2, n[name])


def test_procedure_errors():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        iterative_magnitude_pruning(mlp(), make_train(), 1, 1.0)
    with pytest.raises(ValueError, match="one prune_fraction"):
        iterative_magnitude_pruning(mlp(), make_train(), 1, {"1": 0.2, "3": 0.2, "5": 0.1}, scope="global")
    with pytest.raises(KeyError, match="missing"):
        iterative_magnitude_pruning(mlp(), make_train(), 1, {"1": 0.2})
    with pytest.raises(RuntimeError, match="rewind step 50"):
        iterative_magnitude_pruning(mlp(), make_train(steps=20), 1, 0.2, rewind_step=50)
    with pytest.raises(TypeError, match="History"):
        iterative_magnitude_pruning(mlp(), lambda model, callbacks: None, 1, 0.2)
    with pytest.raises(ValueError, match="leave output_fraction out"):   # the mapping names the output layer
        iterative_magnitude_pruning(mlp(), make_train(), 1, {"1": 0.2, "3": 0.2, "5": 0.5}, output_fraction=0.1)
    calls = []
    for output_fraction in (None, 0.1):
        with pytest.raises(ValueError, match="no masked layer and no nn.Linear or nn.Conv2d to mask"):
            iterative_magnitude_pruning(nn.Sequential(nn.Conv1d(2, 2, 3)), lambda *a: calls.append(a), 1, 0.2,
                                        output_fraction=output_fraction)
    assert not calls                                                    # refused before any training


def test_a_train_that_drops_the_callbacks_is_named_not_taken_for_a_short_round():
    # 20 steps passed the rewind step 3: what failed is the Snapshot that never reached fit.
    def train(model, callbacks):
        return make_train(steps=20)(model, [])

    with pytest.raises(RuntimeError, match=r"round 0 trained 20 steps but took no snapshot at the rewind step 3: "
                                           r"train\(model, callbacks\) must pass callbacks on to fit"):
        iterative_magnitude_pruning(mlp(), train, 1, 0.2, rewind_step=3)


@pytest.mark.parametrize("fractions", [{"prune_fraction": 1.5}, {"prune_fraction": {"1": 0.2}},
                                       {"prune_fraction": 0.2, "output_fraction": 2.0}])
def test_refused_fractions_leave_an_unmasked_model_without_masks(fractions):
    # The fractions are checked against the layers IMP would mask before any mask is attached.
    model = mlp()
    keys = set(model.state_dict())
    with pytest.raises((ValueError, KeyError), match="prune_fraction|output_fraction"):
        iterative_magnitude_pruning(model, make_train(), 1, **fractions)
    assert not masked_layers(model) and set(model.state_dict()) == keys


def test_a_step_zero_snapshot_must_be_captured_before_training():
    model = mlp()
    with pytest.raises(RuntimeError, match="capture"):
        fit(model, TRAIN, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, callbacks=[Snapshot(0)],
            device="cpu", progress=False)


def test_a_run_resumed_past_the_snapshot_step_is_told_to_restore_the_saved_copy():
    # the error spoke only of capturing the initialisation (step 0), which a Snapshot(3) has nothing to do with
    model, snapshot = mlp(), Snapshot(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, TRAIN, optimizer, steps=5, callbacks=[snapshot], device="cpu", progress=False)
    resumed = Snapshot(3)
    with pytest.raises(RuntimeError, match=r"Snapshot\(step=3\) was first called at step 6: to resume a run that "
                                           r"passed step 3 \(fit's start_step\), set snapshot.state to the copy"):
        fit(model, TRAIN, optimizer, steps=8, callbacks=[resumed], device="cpu", progress=False, start_step=5)
    resumed.state = snapshot.state
    fit(model, TRAIN, optimizer, steps=8, callbacks=[resumed], device="cpu", progress=False, start_step=5)


@pytest.mark.parametrize("step", [-1, 2.5, True])
def test_a_snapshot_step_must_be_a_count(step):
    with pytest.raises(ValueError, match="the snapshot step must be an int >= 0"):
        Snapshot(step)


# --- controls ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drawn():
    """A lottery of three rounds at 50% per round, and a copy of the model carrying its sparsest ticket."""
    model = mlp()
    lottery = iterative_magnitude_pruning(model, make_train(steps=10), rounds=2, prune_fraction=0.5)
    return model, lottery


def ticket_net(drawn, r=2):
    model, lottery = drawn
    net = copy.deepcopy(model)
    set_masks(net, lottery.rounds[r].masks)
    rewind(net, lottery.rewind_state)
    return net, lottery.rounds[r].masks, lottery.rewind_state


def initial(state, name):
    return state[f"{name}.parametrizations.weight.original"]


def assert_counts_kept(net, masks):
    for name, mask in masks_of(net).items():
        assert int(mask.sum()) == int(masks[name].sum())
        assert (raw_weight(masked_layers(net)[name])[~mask] == 0).all()


def test_random_reinit_keeps_the_mask_and_draws_fresh_default_weights(drawn):
    net, masks, state = ticket_net(drawn)
    rng = torch.get_rng_state()
    random_reinit(net, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "the global generator was disturbed"
    assert_counts_kept(net, masks)
    assert all(torch.equal(m, masks[name]) for name, m in masks_of(net).items())
    for name, layer in masked_layers(net).items():
        w, bound = raw_weight(layer)[masks[name]], layer.in_features ** -0.5
        assert (w != 0).all() and (w.abs() <= bound).all()  # nn.Linear's default: U(-1/√fan_in, 1/√fan_in)
        assert not torch.equal(w, initial(state, name)[masks[name]])
        assert not torch.equal(layer.bias, state[f"{name}.bias"])
    again, _, _ = ticket_net(drawn)
    random_reinit(again, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_random_reinit_resets_batch_norm_and_writes_the_raw_weight():
    net = bn_net()
    attach_masks(net)
    fit(net, TRAIN, torch.optim.SGD(net.parameters(), lr=0.1), steps=5, device="cpu", progress=False)
    set_masks(net, {name: torch.rand(m.shape) < 0.5 for name, m in masks_of(net).items()})
    random_reinit(net, seed=0)
    assert (net[1].running_mean == 0).all() and (net[1].running_var == 1).all()
    assert net[1].num_batches_tracked == 0 and (net[1].weight == 1).all()
    assert_counts_kept(net, masks_of(net))
    assert (raw_weight(net[0])[masks_of(net)["0"]] != 0).all()


def test_random_reinit_draws_from_the_distribution_of_a_models_own_initialisation():
    # ResNet-20 draws its convolutions Kaiming-normal, std sqrt(2 / fan_in), not from nn.Conv2d's default
    # U(±1/sqrt(fan_in)) (std sqrt(1 / (3 fan_in)), 2.45 times smaller): the control must draw them the same way.
    torch.manual_seed(0)
    net = ResNet20()
    attach_masks(net)
    set_masks(net, {name: torch.rand(m.shape) < 0.5 for name, m in masks_of(net).items()})
    before = {name: raw_weight(layer).detach().clone() for name, layer in masked_layers(net).items()}
    random_reinit(net, seed=1)
    convolutions = [name for name, layer in masked_layers(net).items() if isinstance(layer, nn.Conv2d)]
    assert len(convolutions) == 19
    scaled = torch.cat([raw_weight(masked_layers(net)[name])[masks_of(net)[name]].flatten()
                        / (2 / masked_layers(net)[name].weight[0].numel()) ** 0.5 for name in convolutions])
    assert abs(scaled.std().item() - 1) < 0.02 and abs(scaled.mean().item()) < 0.02   # 0.13M standard normals
    assert scaled.abs().max() > 3.5                                     # normal tails: no uniform draw reaches 3.5
    assert not any(torch.equal(raw_weight(masked_layers(net)[name]), before[name]) for name in convolutions)


def test_random_reinit_redraws_a_layer_with_only_a_private_reset():
    # nn.MultiheadAttention initialises in _reset_parameters (no public reset_parameters).
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2)
    before = attention.in_proj_weight.detach().clone()
    random_reinit(attention, seed=1)
    assert not torch.equal(attention.in_proj_weight, before)


def test_reshuffle_permutes_each_layers_kept_initial_values(drawn):
    net, masks, state = ticket_net(drawn)
    with torch.no_grad():                        # weights moved since the rewind: the values come from `state`
        for layer in masked_layers(net).values():
            raw_weight(layer).mul_(3.0)
    reshuffle(net, state, seed=1)
    assert_counts_kept(net, masks)
    for name, layer in masked_layers(net).items():
        mine, theirs = raw_weight(layer)[masks[name]], initial(state, name)[masks[name]]
        assert torch.equal(mine.sort().values, theirs.sort().values)
        assert not torch.equal(mine, theirs)


def test_constant_init_keeps_signs_with_the_layer_std(drawn):
    net, masks, state = ticket_net(drawn)
    constant_init(net, state)
    assert_counts_kept(net, masks)
    for name, layer in masked_layers(net).items():
        theta0 = initial(state, name)
        sigma = theta0.std(correction=0)
        kept = raw_weight(layer)[masks[name]]
        assert torch.allclose(kept.abs(), sigma.expand_as(kept), rtol=0, atol=0)
        assert torch.equal(kept.sign(), theta0[masks[name]].sign())


def test_constant_init_leaves_a_layer_that_kept_nothing_at_zero():
    # sigma of no weights is 0/0: a NaN there would survive the mask (NaN * 0) and reach every output.
    torch.manual_seed(0)
    net = MLP()
    attach_masks(net)
    masks = masks_of(net)
    masks["3"] = torch.zeros_like(masks["3"])
    set_masks(net, masks)
    state = {key: value.clone() for key, value in net.state_dict().items()}
    constant_init(net, state)
    assert torch.equal(raw_weight(masked_layers(net)["3"]), torch.zeros(100, 300))
    assert torch.isfinite(net(torch.randn(4, 784))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_constant_init_in_half_precision_takes_the_layer_std_of_a_layer_of_more_than_65504_weights(dtype):
    # LeNet-300-100's first layer holds 235,200 weights: a float16 count of them overflows to infinity.
    torch.manual_seed(0)
    net = MLP().to(dtype)
    attach_masks(net)
    state = {key: value.clone() for key, value in net.state_dict().items()}
    prune(net, magnitude(net), 0.2)
    masks = masks_of(net)
    constant_init(net, state)
    for name, layer in masked_layers(net).items():
        theta0 = initial(state, name).float()
        kept = raw_weight(layer)[masks[name]]
        torch.testing.assert_close(kept.abs(), theta0.std(correction=0).to(dtype).expand_as(kept), rtol=0, atol=0)
        assert torch.equal(kept.sign(), theta0[masks[name]].sign().to(dtype))


def test_random_mask_has_the_tickets_counts_and_the_original_initialisation(drawn):
    net, masks, state = ticket_net(drawn)
    random_mask(net, state, seed=0)
    new = masks_of(net)
    for name, layer in masked_layers(net).items():
        assert int(new[name].sum()) == int(masks[name].sum())
        assert not torch.equal(new[name], masks[name])
        raw = raw_weight(layer)
        assert torch.equal(raw[new[name]], initial(state, name)[new[name]])
        assert (raw[~new[name]] == 0).all()


@pytest.mark.parametrize("control", [reshuffle, random_mask])
def test_reshuffle_and_random_mask_draw_by_their_seed(drawn, control):
    # Controls are averaged over seeds: the same seed must give the same network, another seed another one.
    nets = []
    for seed in (1, 1, 2):
        net, _, state = ticket_net(drawn)
        control(net, state, seed=seed)
        nets.append(net.state_dict())
    same = [torch.equal(nets[0][k], nets[1][k]) for k in nets[0]]
    other = [torch.equal(nets[0][k], nets[2][k]) for k in nets[0]]
    assert all(same) and not all(other)


@pytest.mark.parametrize("control", [None, "reinit", "reshuffle", "constant", "random_mask"])
def test_train_control_trains_at_the_tickets_per_layer_counts(drawn, control):
    model, lottery = drawn
    fresh = mlp(seed=7)  # no masks: train_control attaches them to its copy
    log = []
    result = train_control(fresh, lottery, 2, make_train(steps=5, log=log), control, seed=1)
    ticket = lottery.rounds[2]
    assert result.index == 2 and not masked_layers(fresh)
    assert result.layer_densities == ticket.layer_densities and result.density == ticket.density
    same = all(torch.equal(result.masks[n], ticket.masks[n]) for n in ticket.masks)
    assert same == (control != "random_mask")
    # It trained the control's own start: the ticket, changed by the control function with the same seed.
    expected, _, state = ticket_net(drawn)
    changes = {"reinit": lambda: random_reinit(expected, 1), "reshuffle": lambda: reshuffle(expected, state, 1),
               "constant": lambda: constant_init(expected, state),
               "random_mask": lambda: random_mask(expected, state, 1)}
    if control is not None:
        changes[control]()
    start = log[0]["start"]
    assert all(torch.equal(start[key], value) for key, value in expected.state_dict().items())
    kept = log[0]["masks"]                   # the initial values at the kept weights: changed by the first three
    moved = any(not torch.equal(start[f"{name}.parametrizations.weight.original"][mask], initial(state, name)[mask])
                for name, mask in kept.items())
    assert moved == (control in ("reinit", "reshuffle", "constant"))


def test_train_control_of_the_ticket_itself_reproduces_its_round(drawn):
    model, lottery = drawn
    result = train_control(model, lottery, lottery.rounds[1], make_train(steps=10))
    assert result.history.eval == lottery.rounds[1].history.eval


def test_unknown_control_or_ticket_is_an_error(drawn):
    model, lottery = drawn
    with pytest.raises(ValueError, match="control must be one of"):
        train_control(model, lottery, 0, make_train(), "shuffle")
    for bad in (3, -4, True, 1.0, "1"):
        with pytest.raises(ValueError, match="the index of one of its 3 rounds"):
            train_control(model, lottery, bad, make_train())


def test_a_ticket_of_another_lottery_or_a_control_run_is_refused(drawn):
    # Its masks were not pruned from this lottery's rewind weights: the run would pair one seed's mask with
    # another's θ_0 under the name of a control of this lottery.
    model, lottery = drawn
    other = iterative_magnitude_pruning(mlp(seed=1), make_train(steps=5), rounds=2, prune_fraction=0.5)
    control = train_control(model, lottery, 1, make_train(steps=5), "random_mask")
    for ticket in (other.rounds[2], control):
        with pytest.raises(ValueError, match="TicketRound of round [12] but not one of lottery.rounds"):
            train_control(model, lottery, ticket, make_train(steps=5))


def test_controls_of_a_model_masked_before_imp_stay_inside_its_starting_mask():
    # At the rewind point a model pruned before IMP is zero outside its starting mask: the random mask is
    # drawn inside that mask (no kept weight starts at zero), and σ_l is the spread of the weights it holds.
    model = mlp()
    prune(model, magnitude(model), 0.5)
    start = masks_of(model)
    lottery = iterative_magnitude_pruning(model, make_train(steps=10), rounds=1, prune_fraction=0.5)
    net, masks, state = ticket_net((model, lottery), r=1)
    random_mask(net, state, seed=0)
    for name, mask in masks_of(net).items():
        assert int(mask.sum()) == int(masks[name].sum())
        assert not (mask & ~start[name]).any()
        assert (raw_weight(masked_layers(net)[name])[mask] != 0).all()
    net, _, _ = ticket_net((model, lottery), r=1)
    constant_init(net, state)
    for name, layer in masked_layers(net).items():
        sigma = initial(state, name)[start[name]].std(correction=0)
        kept = raw_weight(layer)[masks[name]]
        torch.testing.assert_close(kept.abs(), sigma.expand_as(kept))


# --- mask comparisons and early-bird tickets -----------------------------------------------------------


def test_mask_overlap_and_distance_by_hand():
    a = {"x": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "y": torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)}
    b = {"x": torch.tensor([1, 0, 1, 0], dtype=torch.bool), "y": torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)}
    # intersection 1 + 1, union 3 + 2, 8 weights in all
    assert mask_overlap(a, b) == pytest.approx(2 / 5)
    assert mask_distance(a, b) == pytest.approx(3 / 8)
    assert mask_overlap(a, a) == 1.0 and mask_distance(a, a) == 0.0
    with pytest.raises(KeyError, match="the masks cover different layers"):
        mask_overlap(a, {"x": b["x"]})
    with pytest.raises(ValueError, match="no masks to compare"):
        mask_distance({}, {})
    with pytest.raises(TypeError, match="must be boolean"):
        mask_overlap({"x": torch.ones(3)}, {"x": torch.ones(3)})
    with pytest.raises(ValueError, match=r"the masks of 'x' differ in shape: \(4,\) vs \(2, 2\)"):
        mask_distance(a, {**b, "x": b["y"]})


def test_global_scope_refuses_a_fraction_per_layer():
    with pytest.raises(ValueError, match="scope='global' prunes one fraction of all layers together"):
        iterative_magnitude_pruning(mlp(), make_train(), rounds=1, prune_fraction={"1": 0.2, "3": 0.2, "5": 0.2},
                                    scope="global")


@pytest.mark.parametrize("control", [reshuffle, constant_init, random_mask])
def test_controls_name_the_entry_missing_from_their_rewind_weights(control):
    model = mlp()
    attach_masks(model)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")}
    before = copy.deepcopy(model.state_dict())
    missing = r"no '1\.parametrizations\.weight\.(original|0\.mask)': pass the state_dict of the masked model"
    with pytest.raises(KeyError, match=missing):
        control(model, weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def step(model, k):
    return TrainState(step=k, epoch=0, loss=torch.zeros(()), model=model, optimizer=None)


def set_weight(model, rows):
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(rows, dtype=torch.float))


def test_early_bird_distances_by_hand():
    model = MLP(in_features=4, hidden=(), out_features=2)  # one 2×4 layer, named "1"
    bird = EarlyBird(0.5, every=2, window=2, threshold=0.2)
    set_weight(model, [[-8, 7, 6, 5], [4, 3, 2, 1]])
    bird(step(model, 1))  # not a multiple of every: nothing happens
    assert bird._previous is None
    bird(step(model, 2))  # keeps the first row
    assert torch.equal(bird.would_keep(model)["1"], torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool))
    set_weight(model, [[-8, 7, 6, 4], [-5, 3, 2, 1]])  # the 5 and the 4 swap places: 2 of 8 weights change
    bird(step(model, 4))
    bird(step(model, 6))
    assert bird.distances == [0.25, 0.0] and bird.found_at is None  # max of the window is 0.25 ≥ 0.2
    bird(step(model, 8))
    assert bird.distances == [0.25, 0.0, 0.0] and bird.found_at == 8
    assert torch.equal(bird.mask["1"], torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))
    assert not masked_layers(model), "EarlyBird must not prune"


def test_early_bird_resumes_from_a_checkpoint_as_if_never_interrupted():
    """Saved mid-run and loaded (torch.load with weights_only=True) into a fresh callback, the run finds the bird at the
    step, with the distances and mask, of the run never interrupted; without a state the first check after the
    restart had no masks to compare with."""
    data = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3

    def run(steps, start_step=0, state=None):
        torch.manual_seed(0)
        model = MLP(in_features=6, hidden=(8,), out_features=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        bird = EarlyBird(0.5, every=2, window=3, threshold=0.05)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            bird.load_state_dict(state["bird"])
        fit(model, data, opt, steps=steps, batch_size=16, callbacks=[bird], device="cpu", progress=False,
            start_step=start_step, seed=0)
        return model, opt, bird

    whole = run(60)[2]
    assert whole.found_at is not None and whole.found_at > 10
    model, opt, bird = run(10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "bird": bird.state_dict()}, buffer)
    buffer.seek(0)
    resumed = run(60, start_step=10, state=torch.load(buffer, weights_only=True))[2]
    assert resumed.distances == whole.distances and resumed.found_at == whole.found_at
    assert all(torch.equal(resumed.mask[name], whole.mask[name]) for name in whole.mask)


def test_early_bird_input_errors():
    for bad in (0, -0.1, 1.5, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            EarlyBird(0.5, every=1, threshold=bad)
    model = MLP(in_features=4, hidden=(), out_features=2)       # unmasked: its scores are checked too
    set_weight(model, [[float("nan"), 7, 6, 5], [4, 3, 2, 1]])
    with pytest.raises(ValueError, match="contain NaN"):
        EarlyBird(0.5, every=1).would_keep(model)


def test_early_bird_waits_for_a_full_window():
    model = MLP(in_features=4, hidden=(), out_features=2)
    bird = EarlyBird(0.5, every=1, window=2, threshold=0.2)
    set_weight(model, [[-8, 7, 6, 5], [4, 3, 2, 1]])
    bird(step(model, 1))
    bird(step(model, 2))                                   # the mask did not change: one distance, 0
    assert bird.distances == [0.0] and bird.found_at is None
    bird(step(model, 3))
    assert bird.distances == [0.0, 0.0] and bird.found_at == 3
    found = bird.mask
    set_weight(model, [[1, 2, 3, 4], [5, 6, 7, 8]])                 # later checks change neither the step nor the mask
    bird(step(model, 4))
    bird(step(model, 5))
    bird(step(model, 6))
    assert bird.distances == [0.0, 0.0, 1.0, 0.0, 0.0] and bird.found_at == 3 and bird.mask is found


def test_early_bird_stops_training_when_the_mask_settles():
    model = mlp()
    every = 256 // 32
    bird = EarlyBird(0.3, every=every, window=3, threshold=0.05, stop=True)
    history = fit(model, TRAIN, torch.optim.SGD(model.parameters(), lr=0.02), epochs=50, batch_size=32,
                  callbacks=[bird], device="cpu", progress=False)
    assert bird.found_at is not None and history.steps[-1] == bird.found_at < 50 * every
    assert len(bird.distances) == bird.found_at // every - 1
    assert max(bird.distances[-3:]) < 0.05 <= max(bird.distances[:-3], default=1.0)
    n = {name: layer.weight.numel() for name, layer in prunable_layers(model).items()}
    assert {name: int(m.sum()) for name, m in bird.mask.items()} == {k: kept_count(0.3, v) for k, v in n.items()}


def test_reinit_and_constant_controls_act_on_the_effective_weights_under_powerprop(drawn):
    # Under Powerprop the raw weight is φ and the layer computes θ = φ|φ|^(α−1): the controls set θ, not φ.
    def powerprop_ticket(seed):
        net = mlp(seed)
        powerprop(net, 3.0)
        attach_masks(net)
        set_masks(net, masks_of(drawn[0]))
        return net

    net, plain = powerprop_ticket(0), mlp(0)
    attach_masks(plain)
    set_masks(plain, masks_of(drawn[0]))
    random_reinit(net, seed=3)
    random_reinit(plain, seed=3)
    for name, layer in masked_layers(net).items():
        assert torch.allclose(layer.weight, masked_layers(plain)[name].weight, rtol=1e-5, atol=1e-8)
    state = copy.deepcopy(powerprop_ticket(1).state_dict())
    constant_init(net, state)
    for name, layer in masked_layers(net).items():
        keep = masks_of(net)[name]
        theta0 = state[f"{name}.parametrizations.weight.original"] ** 3        # Ψ(φ_0) for α = 3
        kept = layer.weight[keep]
        assert torch.allclose(kept.abs(), theta0[keep].std(correction=0).expand_as(kept), rtol=1e-5)  # its mask
        assert torch.equal(kept.sign(), theta0[keep].sign())


def negated_magnitude(model):
    """Scores under which the pruned (zero) weights rank highest, as signed scores (movement) can."""
    return {name: -scores for name, scores in magnitude(model).items()}


@pytest.mark.parametrize("scores", [magnitude, negated_magnitude])
def test_early_bird_on_a_model_sparser_than_its_density_keeps_only_surviving_weights(scores):
    model = mlp()
    prune(model, magnitude(model), 0.3)
    current = masks_of(model)
    keep = EarlyBird(0.5, every=1, scores=scores).would_keep(model)
    for name, mask in keep.items():
        assert torch.equal(mask, current[name]), name              # masks only shrink: no pruned weight comes back


def test_early_bird_needs_every_distance_strictly_below_the_threshold():
    """You et al. (2020, §3) and the docstring: the ticket emerges when the largest recent distance is *below* ε.

    One 2×4 layer at density 0.5: swapping the 4th and 5th largest magnitudes changes 2 of 8 mask entries,
    a normalised Hamming distance of exactly 2/8 = 0.25 (hand count). With ε = 0.25 and a window of 1 that
    distance must not trigger; the next, unchanged check (distance 0) does.
    """
    model = MLP(in_features=4, hidden=(), out_features=2)
    bird = EarlyBird(0.5, every=1, window=1, threshold=0.25)
    set_weight(model, [[-8, 7, 6, 5], [4, 3, 2, 1]])
    bird(step(model, 1))
    set_weight(model, [[-8, 7, 6, 4], [-5, 3, 2, 1]])
    bird(step(model, 2))
    assert bird.distances == [0.25] and bird.found_at is None       # 0.25 is not below 0.25
    bird(step(model, 3))
    assert bird.distances == [0.25, 0.0] and bird.found_at == 3


def test_mask_overlap_of_masks_that_both_keep_nothing_is_one():
    """Reference: the docstring's convention for the Jaccard index 0/0 ("1 when both keep nothing"):
    two equal masks, even empty ones, overlap fully, and their distance is 0; a non-empty mask
    against an empty one overlaps 0 (intersection 0 of a union of 2)."""
    empty = {"a": torch.zeros(2, 3, dtype=torch.bool), "b": torch.zeros(4, dtype=torch.bool)}
    assert mask_overlap(empty, empty) == 1.0
    assert mask_distance(empty, empty) == 0.0
    some = {"a": torch.zeros(2, 3, dtype=torch.bool), "b": torch.tensor([True, False, True, False])}
    assert mask_overlap(empty, some) == 0.0
    assert mask_distance(empty, some) == 2 / 10


def test_ticket_round_records_the_last_evaluation_and_the_step_of_the_lowest_loss():
    """Reference: TicketRound's docstring, by hand on a scripted History: ``eval`` is the *last*
    evaluation of the run, ``early_stop_step`` the eval step of the lowest loss (here neither the
    first nor the last), for every IMP round and for a control."""
    evals = [{"loss": 0.5, "accuracy": 0.1}, {"loss": 0.2, "accuracy": 0.3}, {"loss": 0.9, "accuracy": 0.2}]

    def train(model, callbacks):
        return History(steps=[10, 20, 30], loss=[1.0, 0.8, 0.7], eval_steps=[10, 20, 30],
                       eval=[dict(e) for e in evals])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    lottery = iterative_magnitude_pruning(model, train, rounds=2, prune_fraction=0.5)
    for ticket in lottery.rounds:
        assert ticket.eval == evals[-1]
        assert ticket.early_stop_step == 20
    torch.manual_seed(1)
    control = train_control(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), lottery, 1, train, "reinit")
    assert control.eval == evals[-1] and control.early_stop_step == 20 and control.index == 1


@pytest.mark.parametrize("losses, step", [([float("nan"), 0.5, 0.2, 0.9], 30), ([float("nan")] * 2, None)])
def test_a_nan_evaluation_loss_is_never_the_early_stopping_step(losses, step):
    # min() keeps a NaN met first, since no comparison with it is true.
    def train(model, callbacks):
        steps = [10 * (i + 1) for i in range(len(losses))]
        return History(steps=steps, loss=[1.0] * len(losses), eval_steps=steps,
                       eval=[{"loss": loss} for loss in losses])

    lottery = iterative_magnitude_pruning(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), train, rounds=1,
                                          prune_fraction=0.5)
    assert lottery.rounds[0].early_stop_step == step


def test_imp_ends_at_the_last_recorded_round_without_pruning_after_it():
    """Reference: iterative_magnitude_pruning's docstring ("unless it is the last round, prune ... the
    model ends trained at the sparsest mask"): after the run the model's masks are exactly those of the
    last TicketRound, its density that round's, and its weights those the last training left (no
    pruning or rewinding after the last round). rounds=0 (density 1): one dense training, nothing pruned."""
    def train(model, callbacks):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)          # "training": a visible change the model must end with
        return History()

    for rounds in (0, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        lottery = iterative_magnitude_pruning(model, train, rounds=rounds, prune_fraction=0.5)
        last = lottery.rounds[-1]
        assert len(lottery.rounds) == rounds + 1
        assert masks_of(model).keys() == last.masks.keys()
        for name, mask in masks_of(model).items():
            assert torch.equal(mask.cpu(), last.masks[name])
        assert density(model) == last.density
        assert rounds > 0 or last.density == 1.0
        # the trained weights: rewind value + 0.25 at every kept weight
        start = lottery.rewind_state
        for name in ("0", "2"):
            raw = start[f"{name}.parametrizations.weight.original"]
            keep = last.masks[name]
            w = model.get_submodule(name).weight.detach()
            assert torch.equal(w, torch.where(keep, raw + 0.25, torch.zeros_like(raw)))


def test_early_bird_mask_is_the_mask_of_the_step_it_was_found_at():
    """Reference: EarlyBird's docstring (``mask``: "the masks at found_at"), by hand: scripted scores
    move one kept weight per check by a small distance (2/8 < ε = 0.5, window 1), so the ticket is
    found at the second check, step 2·every, and its mask is the top-k of that step's scores, which
    differs from the first check's mask."""
    script = [torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.5, 0.4, 0.3, 0.2]]),      # keeps positions 0, 1
              torch.tensor([[4.0, 1.0, 2.0, 3.0], [0.5, 0.4, 0.3, 0.2]])]      # keeps positions 0, 3
    calls = []

    def scores(model):
        calls.append(1)
        return {"w": script[len(calls) - 1]}

    bird = EarlyBird(0.25, every=3, threshold=0.5, window=1, scores=scores)
    model = nn.Linear(4, 2)
    for step in range(1, 7):
        bird(TrainState(step=step, epoch=0, loss=torch.tensor(0.0), model=model, optimizer=None))
    assert bird.distances == [2 / 8]
    assert bird.found_at == 6
    expected = torch.zeros(2, 4, dtype=torch.bool)
    expected[0, 0] = expected[0, 3] = True
    assert torch.equal(bird.mask["w"], expected)


def test_reshuffle_permutes_by_the_documented_stream_of_its_seed(drawn):
    net, masks, state = ticket_net(drawn)
    reshuffle(net, state, seed=4)
    generator = seeded_generator(4, "reshuffle")             # one generator, the layers in the model's order
    for name, layer in masked_layers(net).items():
        kept = initial(state, name)[masks[name]]
        order = torch.randperm(kept.numel(), generator=generator)
        assert torch.equal(raw_weight(layer).detach()[masks[name]], kept[order]), name
