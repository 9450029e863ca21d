"""Invariants of every sparsity method under the whole range of torch optimizers and their options.

tests/sparse/ checks these invariants with SGD with momentum and Adam (a few with Rprop,
AdamW, fused Adam/SGD, RMSprop or NAdam); these tests run each method under every
element-wise optimizer of ``torch.optim`` and the options that change its state
(momentum, dampening, nesterov, maximize, weight decay, amsgrad, foreach, fused,
centered, lr_decay, initial accumulator, decoupled decay), and check:

* exact per-layer counts after construction and after every mask update;
* pruned raw weights exactly zero after every step, and their per-weight optimizer state
  exactly a new parameter's, whose values are written here by hand from torch's update
  rules (zero, except Adagrad's ``sum`` = ``initial_accumulator_value``, Rprop's
  ``step_size`` = ``lr``, Adamax's ``exp_inf`` = ``max(β₂·0, |0| + eps) = eps`` and ASGD's
  average ``ax`` = the weight itself);
* grown weights start at zero with that state, and weights that stay active keep their
  value and state bit for bit (also a weight RigL drops and grows back, ``regrow_dropped``);
* frozen weights (Top-KAST outside ``B``, PackNet's earlier tasks) never move;
* masks only shrink (gradual pruning) and owners never change (PackNet);
* a checkpoint of model, optimizer and method taken mid-training, loaded into fresh
  objects, continues bit-identically to the uninterrupted run.

Tiny MLP 8 -> 16 -> 4 on CPU, 18 steps, mask updates every 3 steps.
"""

import io
import types

import pytest
import torch
import torch.nn.functional as F

from lowlearn.models import MLP
from lowlearn.sparse.dst import SET, SNFS, RigL, StaticSparse
from lowlearn.sparse.mask import attach_masks, masks_of, masks_or_ones, prunable_layers, raw_weight
from lowlearn.sparse.packnet import PackNet
from lowlearn.sparse.prune import kept_count
from lowlearn.sparse.schedule import GradualPruning, cubic_density
from lowlearn.sparse.topkast import TopKAST

optim = torch.optim
# (class, settings); the ids say which options each one exercises.
OPTIMIZERS = {
    "sgd": (optim.SGD, {"lr": 0.1}),
    "sgd-momentum-dampening": (optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
    "sgd-nesterov-wd": (optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    "sgd-momentum-maximize": (optim.SGD, {"lr": 0.01, "momentum": 0.9, "maximize": True}),
    "sgd-fused-wd": (optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "fused": True}),
    "adam-amsgrad-wd": (optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 1e-2}),
    "adam-single-tensor": (optim.Adam, {"lr": 0.01, "foreach": False}),
    "adam-foreach-maximize": (optim.Adam, {"lr": 0.01, "foreach": True, "maximize": True}),
    "adam-fused-amsgrad": (optim.Adam, {"lr": 0.01, "fused": True, "amsgrad": True}),
    "adamw-amsgrad": (optim.AdamW, {"lr": 0.01, "amsgrad": True}),
    "adamw-fused": (optim.AdamW, {"lr": 0.01, "fused": True}),
    "rmsprop-centered-momentum-wd": (optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9,
                                                     "weight_decay": 1e-2}),
    "adagrad-init-lr_decay-wd": (optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.3, "lr_decay": 0.01,
                                                 "weight_decay": 1e-2}),
    "adagrad-fused": (optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.3, "fused": True}),
    "adamax-wd": (optim.Adamax, {"lr": 0.01, "weight_decay": 1e-2}),
    "nadam-decoupled-wd": (optim.NAdam, {"lr": 0.01, "weight_decay": 1e-2, "decoupled_weight_decay": True}),
    "radam-wd": (optim.RAdam, {"lr": 0.01, "weight_decay": 1e-2}),
    "rprop": (optim.Rprop, {"lr": 0.01}),
    "adadelta": (optim.Adadelta, {"lr": 1.0}),
}
# The same optimizers without weight decay, for the methods that freeze weights (Top-KAST, PackNet).
NO_DECAY = {name: (cls, {**kw, **({"weight_decay": 0.0} if "weight_decay" in kw or cls is optim.AdamW else {})})
            for name, (cls, kw) in OPTIMIZERS.items()}
NO_DECAY["asgd-no-decay"] = (optim.ASGD, {"lr": 0.01, "lambd": 0.0})


def new_parameter_value(key, optimizer_class, settings):
    """A new parameter's per-weight state after a first step with a zero gradient, by hand from torch's rules."""
    if optimizer_class is optim.Adagrad and key == "sum":
        return settings.get("initial_accumulator_value", 0.0)
    if optimizer_class is optim.Rprop and key == "step_size":
        return settings["lr"]
    if optimizer_class is optim.Adamax and key == "exp_inf":
        return settings.get("eps", 1e-8)                 # max(β₂ · 0, |0| + eps)
    return 0.0


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=8, hidden=(16,), out_features=4)


def batches(n=18, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(n)]


DATA = batches()


def per_weight_state(optimizer, theta):
    return {k: v for k, v in optimizer.state[theta].items() if torch.is_tensor(v) and v.shape == theta.shape}


def assert_fresh(optimizer, theta, where, optimizer_class, settings, what):
    for key, value in per_weight_state(optimizer, theta).items():
        if optimizer_class is optim.ASGD and key == "ax":     # ASGD's average of a new parameter: itself
            expected = theta.detach()[where]
        else:
            expected = torch.full_like(value[where], new_parameter_value(key, optimizer_class, settings))
        assert torch.equal(value[where], expected), (what, key)


def assert_same_state_dicts(a, b):
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


def save_and_load(*objects):
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------- dynamic sparse training
DST = {
    "static": lambda m, o: StaticSparse(m, o, 0.3),
    "set": lambda m, o: SET(m, o, 0.3, end=16, every=3),
    "rigl": lambda m, o: RigL(m, o, 0.3, end=16, every=3),
    "rigl-regrow": lambda m, o: RigL(m, o, 0.3, end=16, every=3, regrow_dropped=True),
    "snfs": lambda m, o: SNFS(m, o, 0.3, end=16, every=3),
}


def dst_step(model, optimizer, sparsifier, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", DST)
def test_dst_counts_zeros_and_optimizer_state_under_every_optimizer(method, optimizer):
    """Exact counts; off-mask raw weights 0 and state a new parameter's (by hand); grown weights 0 and fresh;
    weights active before and after an update keep value and state bit for bit."""
    cls, settings = OPTIMIZERS[optimizer]
    model = tiny_mlp()
    opt = cls(model.parameters(), **settings)
    sparsifier = DST[method](model, opt)
    layers = prunable_layers(model)
    expected = {n: kept_count(sparsifier.densities[n], raw_weight(layer).numel()) for n, layer in layers.items()}
    assert {n: int(m.sum()) for n, m in masks_of(model).items()} == expected == sparsifier.active
    total = sum(expected.values())
    updates = []
    if method != "static":
        update = sparsifier.update

        def checked_update(fraction):
            before = masks_of(model)
            values = {n: raw_weight(layer).detach().clone() for n, layer in layers.items()}
            states = {n: {k: v.clone() for k, v in per_weight_state(opt, raw_weight(layer)).items()}
                      for n, layer in layers.items()}
            grown = update(fraction)
            after = masks_of(model)
            for n, layer in layers.items():
                theta, stayed = raw_weight(layer), before[n] & after[n]
                assert torch.equal(grown[n], after[n] & ~before[n])
                assert (theta[grown[n]] == 0).all()
                assert_fresh(opt, theta, grown[n], cls, settings, "grown")
                assert torch.equal(theta.detach()[stayed], values[n][stayed])
                for key, value in per_weight_state(opt, theta).items():
                    assert torch.equal(value[stayed], states[n][key][stayed]), key
            updates.append(sum(int(g.sum()) for g in grown.values()))
            return grown

        sparsifier.update = checked_update
    for x, y in DATA:
        dst_step(model, opt, sparsifier, x, y)
        masks = masks_of(model)
        counts = {n: int(m.sum()) for n, m in masks.items()}
        assert counts == sparsifier.active and sum(counts.values()) == total
        if method != "snfs":                                  # SNFS moves weights between layers
            assert counts == expected
        for n, layer in layers.items():
            theta = raw_weight(layer)
            assert (theta[~masks[n]] == 0).all()
            assert_fresh(opt, theta, ~masks[n], cls, settings, "pruned")
    if method != "static":
        assert len(updates) == 5 and sum(updates) > 0        # steps 3, 6, 9, 12, 15 updated the masks


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", DST)
@pytest.mark.parametrize("cut", [8, 9])                     # just before an update step; an update step
def test_dst_checkpoint_resume_is_bit_exact_under_every_optimizer(method, optimizer, cut):
    cls, settings = OPTIMIZERS[optimizer]

    def build(seed):
        model = tiny_mlp(seed)
        opt = cls(model.parameters(), **settings)
        return model, opt, DST[method](model, opt)

    whole = build(0)
    for x, y in DATA:
        dst_step(*whole, x, y)
    first = build(0)
    for x, y in DATA[:cut]:
        dst_step(*first, x, y)
    saved = save_and_load(*first)
    resumed = build(5)                                      # another initialisation, overwritten
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    for x, y in DATA[cut:]:
        dst_step(*resumed, x, y)
    assert_same_state_dicts(whole[0], resumed[0])
    assert resumed[2].active == whole[2].active


# ----------------------------------------------------------------- Top-KAST
def topkast_step(model, optimizer, sparsifier, x, y):
    optimizer.zero_grad()
    (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
    optimizer.step()
    sparsifier.step()


@pytest.mark.parametrize("optimizer", NO_DECAY)
def test_topkast_keeps_weights_outside_b_frozen_and_resumes_bit_exactly(optimizer):
    """Outside B: raw weight unchanged by every step and state a new parameter's; exact |A|, |B|;
    a checkpoint of model, optimizer and sparsifier continues bit-identically."""
    cls, settings = NO_DECAY[optimizer]

    def build(seed):
        model = tiny_mlp(seed)
        opt = cls(model.parameters(), **settings)
        return model, opt, TopKAST(model, opt, 0.3, 0.5, every=3)

    model, opt, sparsifier = whole = build(0)
    layers = prunable_layers(model)
    for x, y in DATA:
        frozen = {n: (raw_weight(layer).detach().clone(), ~sparsifier.backward_masks()[n])
                  for n, layer in layers.items()}
        topkast_step(*whole, x, y)
        backward = sparsifier.backward_masks()
        for n, layer in layers.items():
            theta, (old, outside) = raw_weight(layer), frozen[n]
            assert torch.equal(theta.detach()[outside], old[outside]), n
            assert_fresh(opt, theta, ~backward[n], cls, settings, "outside B")
            assert int(masks_of(model)[n].sum()) == kept_count(0.3, theta.numel())
            assert int(backward[n].sum()) == kept_count(0.5, theta.numel())
    first = build(0)
    for x, y in DATA[:7]:
        topkast_step(*first, x, y)
    saved = save_and_load(*first)
    resumed = build(3)
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    for x, y in DATA[7:]:
        topkast_step(*resumed, x, y)
    assert_same_state_dicts(model, resumed[0])


DECAYING = {name: spec for name, spec in OPTIMIZERS.items() if spec[1].get("weight_decay")}
DECAYING["adamw-default"] = (optim.AdamW, {"lr": 0.01})
DECAYING["asgd-default"] = (optim.ASGD, {"lr": 0.01})                  # lambd=1e-4: param.mul_(1 - lambd · eta)


@pytest.mark.parametrize("optimizer", DECAYING)
@pytest.mark.parametrize("method", ["topkast", "packnet"])
def test_methods_that_freeze_weights_refuse_every_optimizers_weight_decay(method, optimizer):
    cls, settings = DECAYING[optimizer]
    model = tiny_mlp()
    opt = cls(model.parameters(), **settings)
    option = "lambd" if cls is optim.ASGD else "weight_decay"
    with pytest.raises(ValueError, match=f"would shrink frozen weights too: build it with {option}=0"):
        if method == "topkast":
            TopKAST(model, opt, 0.3, 0.5)
        else:
            PackNet(model).start_task(opt)


@pytest.mark.parametrize("optimizer", DECAYING)
def test_packnet_lets_every_optimizer_decay_the_parameters_outside_the_shared_weights(optimizer):
    """Decay on the biases only: accepted; from the second task on they are frozen without a gradient, and every
    optimizer then leaves them (and the first task's weights) alone."""
    cls, settings = DECAYING[optimizer]
    model = tiny_mlp()
    packnet, layers = PackNet(model), prunable_layers(model)
    shared = [raw_weight(layer) for layer in layers.values()]
    option = "lambd" if cls is optim.ASGD else "weight_decay"
    biases = [p for p in model.parameters() if all(p is not w for w in shared)]
    opt = cls([{"params": shared, option: 0.0}, {"params": biases}], **settings)
    packnet.start_task(opt)
    packnet_steps(model, opt, DATA[:4])
    packnet.assign(0.3, opt)
    task1 = [w.detach().clone() for w in shared]
    frozen = [p.detach().clone() for p in biases]
    packnet.start_task(opt)
    packnet_steps(model, opt, DATA[4:8])
    for name, w, w1 in zip(layers, shared, task1):
        mine = packnet.owner[name] == 1
        assert torch.equal(w.detach()[mine], w1[mine]), name
    assert all(torch.equal(p, p1) for p, p1 in zip(biases, frozen))


# ----------------------------------------------------------------- gradual pruning
def gradual_run(model, optimizer, schedule, data, start=0, check=None):
    """Train with ``schedule`` called after every optimizer step, as lowlearn.train.fit does."""
    state = types.SimpleNamespace(model=model, optimizer=optimizer, step=start)
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        state.step += 1
        schedule(state)
        if check is not None:
            check(state.step)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gradual_pruning_shrinks_exactly_and_resumes_bit_exactly_under_every_optimizer(optimizer):
    """At each pruning step t every layer keeps kept_count(cubic_density(t)) (Zhu & Gupta eq. 1) inside its old mask;
    pruned weights 0 with a new parameter's state; resuming (masks attached before loading) is bit-exact."""
    cls, settings = OPTIMIZERS[optimizer]

    def build(seed):
        model = tiny_mlp(seed)
        return model, cls(model.parameters(), **settings)

    def schedule():
        return GradualPruning(0.2, begin=2, end=14, every=3)

    model, opt = build(0)
    layers = prunable_layers(model)
    previous = [masks_or_ones(model, layers)]
    pruned_at = []

    def check(step):
        masks = masks_or_ones(model, layers)
        for n, layer in layers.items():
            theta = raw_weight(layer)
            assert not (masks[n] & ~previous[0][n]).any()              # masks only shrink
            if schedule().prunes_at(step):
                assert int(masks[n].sum()) == kept_count(cubic_density(step, 0.2, 2, 14), theta.numel())
            assert (theta[~masks[n]] == 0).all()
            if opt.state.get(theta):
                assert_fresh(opt, theta, ~masks[n], cls, settings, "pruned")
        if schedule().prunes_at(step):
            pruned_at.append(step)
        previous[0] = masks

    gradual_run(model, opt, schedule(), DATA, check=check)
    assert pruned_at == [2, 5, 8, 11, 14]

    first = build(0)
    gradual_run(*first, schedule(), DATA[:7])
    saved = save_and_load(*first)
    resumed = build(4)
    attach_masks(resumed[0])                 # a pruned checkpoint loads into a masked model only
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    gradual_run(*resumed, schedule(), DATA[7:], start=7)
    assert_same_state_dicts(model, resumed[0])


# ----------------------------------------------------------------- PackNet
def packnet_steps(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer", NO_DECAY)
def test_packnet_freezes_earlier_tasks_and_resumes_bit_exactly_under_every_optimizer(optimizer):
    """One optimizer across tasks: task-1 weights never move, owners never change, forward counts exact;
    a checkpoint inside task 2 continues through assign and task 3 bit-identically."""
    cls, settings = NO_DECAY[optimizer]

    def build(seed):
        model = tiny_mlp(seed)
        packnet = PackNet(model)
        return model, cls(model.parameters(), **settings), packnet

    model, opt, packnet = build(0)
    layers = prunable_layers(model)
    packnet.start_task(opt)
    packnet_steps(model, opt, DATA[:4])
    packnet.assign(0.3, opt)
    owners = {n: o.clone() for n, o in packnet.owner.items()}
    task1 = {n: raw_weight(layer).detach().clone() for n, layer in layers.items()}
    for n, layer in layers.items():
        assert int((owners[n] == 1).sum()) == kept_count(0.3, raw_weight(layer).numel())
    packnet.start_task(opt)
    packnet_steps(model, opt, DATA[4:6])
    saved = save_and_load(model, opt, packnet)
    packnet_steps(model, opt, DATA[6:10])
    packnet.assign(0.3, opt)
    packnet.start_task(opt)
    packnet_steps(model, opt, DATA[10:12])
    for n, layer in layers.items():
        mine = owners[n] == 1
        assert torch.equal(raw_weight(layer).detach()[mine], task1[n][mine]), n
        assert torch.equal(packnet.owner[n][owners[n] != 0], owners[n][owners[n] != 0])

    resumed = build(6)
    for obj, state in zip(resumed, saved):
        obj.load_state_dict(state)
    m2, opt2, packnet2 = resumed
    packnet_steps(m2, opt2, DATA[6:10])
    packnet2.assign(0.3, opt2)
    packnet2.start_task(opt2)
    packnet_steps(m2, opt2, DATA[10:12])
    assert_same_state_dicts(model, m2)
