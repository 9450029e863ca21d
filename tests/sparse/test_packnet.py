import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.models import MLP
from lowlearn.powerprop import PowerPropOptimizer, powerprop
from lowlearn.sparse.mask import attach_masks, find_mask, masked_layers, masks_of, prunable_layers, raw_weight
from lowlearn.sparse.packnet import PackNet


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 12), out_features=4)


def task_data(task, n=64):
    generator = torch.Generator().manual_seed(task)
    return torch.randn(n, 20, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def take_steps(model, optimizer, data, steps):
    x, y = data
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def train(model, data, steps=20, lr=0.1):
    take_steps(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9),
               data, steps)


def train_aware(model, data, steps=20, lr=0.01):
    """Adam through the optimiser-aware update of Powerprop."""
    optimizer = PowerPropOptimizer(torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr),
                                   model)
    take_steps(model, optimizer, data, steps)


@pytest.mark.parametrize("alpha, trainer", [(None, train), (3, train), (3, train_aware), (5, train_aware)])
def test_earlier_tasks_are_never_forgotten(alpha, trainer):
    model = small_mlp()
    if alpha:
        powerprop(model, alpha)
    packnet = PackNet(model)
    outputs = {}
    for task in (1, 2, 3):
        assert packnet.start_task() == task
        trainer(model, task_data(task))
        assert packnet.assign(0.25) == task
        trainer(model, task_data(task), steps=5, lr=0.01)          # retrain task t's weights alone
        with packnet.use_task(task):
            outputs[task] = model(task_data(task)[0]).detach()
    for task, expected in outputs.items():                          # after all three tasks
        with packnet.use_task(task):
            assert torch.equal(model(task_data(task)[0]), expected), task


def test_batch_norm_keeps_the_first_tasks_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    packnet = PackNet(model)
    packnet.start_task()
    train(model, task_data(1))
    packnet.assign(0.5)
    statistics = model[1].running_mean.clone(), model[1].running_var.clone()
    model.eval()
    with packnet.use_task(1), torch.no_grad():
        expected = model(task_data(1)[0])
    packnet.start_task()
    model.train()
    x, y = task_data(2)
    train(model, (3 * x + 2, y))                                   # other input statistics
    packnet.assign(0.5)
    assert torch.equal(model[1].running_mean, statistics[0]) and torch.equal(model[1].running_var, statistics[1])
    model.eval()
    with packnet.use_task(1), torch.no_grad():
        assert torch.equal(model(task_data(1)[0]), expected)


def test_ownership_and_masks():
    model = small_mlp()
    packnet = PackNet(model)
    packnet.start_task()
    train(model, task_data(1))
    trained = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    packnet.assign(0.3)
    for name, owner in packnet.owner.items():
        assert int((owner == 1).sum()) == round(0.3 * owner.numel())
        # Task 1 owns its layer's largest weights; the forward pass now uses only them.
        assert trained[name].abs()[owner == 1].min() >= trained[name].abs()[owner == 0].max()
        assert torch.equal(masks_of(model)[name], owner == 1)
    assert packnet.free_fraction() == pytest.approx({name: 0.7 for name in packnet.owner}, abs=0.01)
    packnet.start_task()
    train(model, task_data(2))
    packnet.assign(0.9)                                              # more than is free: all of it
    assert all((owner != 0).all() for owner in packnet.owner.values())
    with pytest.raises(ValueError, match="the network is full"):
        packnet.start_task()


def test_only_free_weights_learn_and_biases_freeze_after_the_first_task():
    model = small_mlp()
    packnet = PackNet(model)
    # One momentum optimizer for both tasks: its momentum from task 1 must not move task 1's weights later
    # (start_task and assign zero it).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    packnet.start_task(optimizer)
    take_steps(model, optimizer, task_data(1), 10)
    packnet.assign(0.4, optimizer)
    frozen = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    biases = {name: layer.bias.detach().clone() for name, layer in prunable_layers(model).items()}
    packnet.start_task(optimizer)
    for _ in range(5):                  # gradients zeroed, not set to None: a frozen bias's momentum would move it
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(task_data(2)[0]), task_data(2)[1]).backward()
        optimizer.step()
    for name, layer in prunable_layers(model).items():
        owned = packnet.owner[name] == 1
        assert torch.equal(raw_weight(layer).detach()[owned], frozen[name][owned])
        assert not torch.equal(raw_weight(layer).detach()[~owned], frozen[name][~owned])
        assert torch.equal(layer.bias.detach(), biases[name]) and not layer.bias.requires_grad
        assert layer.bias not in optimizer.state


def test_a_packnet_resumed_in_its_second_task_keeps_the_first_tasks_parameters_frozen():
    model = torch.nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    packnet = PackNet(model)
    packnet.start_task()
    train(model, task_data(1))
    packnet.assign(0.5)
    packnet.start_task()                                                 # task 2 begins, then a checkpoint
    saved_model, saved_packnet = model.state_dict(), packnet.state_dict()

    resumed_model = torch.nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    resumed = PackNet(resumed_model)
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved_packnet)
    assert resumed.frozen and resumed.tasks == 1
    x = task_data(1)[0]
    with torch.no_grad(), resumed.use_task(1):
        before = resumed_model.eval()(x)
    train(resumed_model.train(), task_data(2))
    with torch.no_grad(), resumed.use_task(1):
        torch.testing.assert_close(resumed_model.eval()(x), before, rtol=0, atol=0)   # task 1 is not forgotten
    assert not any(p.requires_grad for name, p in resumed_model.named_parameters() if "original" not in name)


def test_a_state_saved_without_the_frozen_flag_freezes_the_other_parameters_from_two_tasks_on():
    """A state from before ``frozen`` was recorded: two assigned tasks mean the network has been past its first."""
    packnet = PackNet(small_mlp())
    for _ in range(2):
        packnet.start_task()
        packnet.assign(0.3)
    state = {key: value for key, value in packnet.state_dict().items() if key != "frozen"}
    resumed_model = small_mlp()
    resumed = PackNet(resumed_model)
    resumed.load_state_dict(state)
    assert resumed.frozen
    assert not any(p.requires_grad for name, p in resumed_model.named_parameters() if "original" not in name)


def test_released_weights_are_reinitialised_so_powerprop_can_train_them():
    model = powerprop(small_mlp(), 3)
    packnet = PackNet(model, seed=4)
    packnet.start_task()
    train(model, task_data(1))
    trained = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    packnet.assign(0.2)
    for name, layer in prunable_layers(model).items():
        free = packnet.owner[name] == 0
        phi = raw_weight(layer).detach()
        theta = phi * phi.abs() ** 2
        bound = 1 / phi.shape[1] ** 0.5
        assert (theta[free].abs() <= bound + 1e-6).all() and (theta[free] != 0).all()
        assert (phi[free] != trained[name][free]).all()                   # drawn afresh, not the trained values
        assert torch.equal(phi[~free], trained[name][~free])
        # θ (not φ) is uniform in ±bound: it fills the range (φ drawn uniform instead would give |θ| ≤ bound³).
        assert theta[free].abs().max() > 0.8 * bound
        assert theta[free].abs().mean() == pytest.approx(bound / 2, rel=0.3)


def test_bad_input_and_state_dict():
    model = small_mlp()
    packnet = PackNet(model)
    with pytest.raises(ValueError, match="task must be one of the 0 assigned tasks"):
        with packnet.use_task(1):
            pass
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        packnet.assign(0.0)
    with pytest.raises(ValueError, match="weight_decay=0"):
        packnet.start_task(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    with pytest.raises(ValueError, match="already has a mask"):
        PackNet(model)
    for layers, unshared in ((None, nn.Sequential(nn.ReLU())), ([], small_mlp())):
        with pytest.raises(ValueError, match="no layers to share among the tasks"):
            PackNet(unshared, layers)
    partly = small_mlp()
    attach_masks(partly, ["3"])
    with pytest.raises(ValueError, match="layer '3' already has a mask"):
        PackNet(partly)
    assert set(masked_layers(partly)) == {"3"}                      # the refused call masked no other layer
    unmasked = small_mlp()
    with pytest.raises(KeyError, match="the model has no layer 'fc9'"):
        PackNet(unmasked, ["1", "fc9"])
    assert not masked_layers(unmasked)
    packnet.start_task()
    packnet.assign(0.5)
    for task in (1.5, True, "1"):
        with pytest.raises(ValueError, match="task must be one of the 1 assigned tasks"):
            with packnet.use_task(task):
                pass
    other = PackNet(small_mlp(3))
    other.load_state_dict(packnet.state_dict())
    assert not other.frozen and all(p.requires_grad for p in other.model.parameters())   # task 1 may still retrain
    assert other.tasks == 1 and all(torch.equal(other.owner[n], o) for n, o in packnet.owner.items())
    narrower = PackNet(MLP(in_features=20, hidden=(16, 10), out_features=4))
    with pytest.raises(ValueError, match=r"the state's owner are of layers .*'3': \(12, 16\).* but this PackNet has "
                                         r"the layers .*'3': \(10, 16\)"):
        narrower.load_state_dict(packnet.state_dict())
    assert narrower.tasks == 0 and all((o == 0).all() for o in narrower.owner.values())     # nothing restored


def test_a_state_of_the_first_task_is_refused_by_a_packnet_that_froze_the_other_parameters():
    # it was loaded: the PackNet was back in its first task, whose biases and batch norm learn, with them still
    # frozen (and batch norm held in evaluation mode), and its frozen flag still set
    model = bn_model()
    packnet = PackNet(model)
    packnet.start_task()
    first = packnet.state_dict()
    packnet.assign(0.5)
    packnet.start_task()
    owners = {name: o.clone() for name, o in packnet.owner.items()}
    with pytest.raises(ValueError, match="saved before the second task began, when they still learn: load it into "
                                         "a new model and a new PackNet"):
        packnet.load_state_dict(first)
    assert packnet.frozen and packnet.tasks == 1 and packnet.started                      # nothing restored
    assert all(torch.equal(packnet.owner[name], o) for name, o in owners.items())
    fresh = PackNet(bn_model())
    fresh.load_state_dict(first)
    assert not fresh.frozen and all(p.requires_grad for p in fresh.model.parameters())
    packnet.load_state_dict(packnet.state_dict())                # a state of its own frozen tasks loads
    assert packnet.frozen and not model[1].weight.requires_grad


class MultiHead(nn.Module):
    """A trunk shared by the tasks, and one output head per task."""

    def __init__(self, tasks=3):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(20, 16)
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(tasks))
        self.task = 0

    def forward(self, x):
        return self.heads[self.task](F.relu(self.trunk(x)))


def test_each_task_trains_its_own_head_and_the_earlier_heads_stay_frozen():
    model = MultiHead()
    packnet = PackNet(model, layers=["trunk"])
    heads = []
    for task in (1, 2, 3):
        model.task = task - 1
        packnet.start_task(own=f"heads.{task - 1}")
        before = [p.detach().clone() for p in model.heads.parameters()]
        train(model, task_data(task))
        after = list(model.heads.parameters())
        for i in range(3):                        # head t learns in task t; the others do not move
            moved = [not torch.equal(a, b) for a, b in zip(before[2 * i:2 * i + 2], after[2 * i:2 * i + 2])]
            assert moved == ([True, True] if i == task - 1 else [False, False]), (task, i)
        packnet.assign(0.3)
        heads.append(model.heads[task - 1].weight.detach().clone())
    assert torch.equal(model.heads[0].weight, heads[0]) and torch.equal(model.heads[1].weight, heads[1])

    # Resumed in task 2, head 2 still learns and head 1 stays frozen.
    model, packnet = MultiHead(), PackNet(MultiHead(), layers=["trunk"])
    packnet.start_task(own="heads.0")
    train(packnet.model, task_data(1))
    packnet.assign(0.3)
    packnet.start_task(own=["heads.1"])
    resumed = PackNet(model, layers=["trunk"])
    model.load_state_dict(packnet.model.state_dict())
    resumed.load_state_dict(packnet.state_dict())
    assert resumed.started and resumed.own == ("heads.1.weight", "heads.1.bias")
    assert [p.requires_grad for p in model.heads.parameters()] == [False, False, True, True, False, False]


def test_weight_decay_is_refused_on_the_shared_weights_only():
    """The biases and heads may be decayed while they learn: frozen, they have no gradient, so the optimizer
    leaves them alone, and one optimizer across three tasks still computes every earlier task bit for bit
    (every torch.optim optimizer: tests/sparse/test_optimizer_invariants.py)."""
    def make(groups):
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    model = MultiHead().double()
    packnet = PackNet(model, layers=["trunk"])
    shared = raw_weight(model.trunk)
    with pytest.raises(ValueError, match="weights in the shared layers frozen .* build it with weight_decay=0"):
        packnet.start_task(make([{"params": [shared, model.trunk.bias], "weight_decay": 0.1}]))
    others = [p for p in model.parameters() if p is not shared]
    optimizer = make([{"params": [shared], "weight_decay": 0.0}, {"params": others, "weight_decay": 0.1}])
    data, outputs = {task: float64_task_data(task) for task in (1, 2, 3)}, {}
    for task in (1, 2, 3):
        model.task = task - 1
        packnet.start_task(optimizer, own=f"heads.{task - 1}")
        take_steps(model, optimizer, data[task], 5)
        packnet.assign(0.3, optimizer)
        take_steps(model, optimizer, data[task], 3)                             # retraining task t alone
        with packnet.use_task(task), torch.no_grad():
            outputs[task] = model(data[task][0])
    for task in (1, 2):
        model.task = task - 1
        with packnet.use_task(task), torch.no_grad():
            assert torch.equal(model(data[task][0]), outputs[task]), task


class NormedHeads(nn.Module):
    """A shared trunk with a batch norm, and one head per task with batch norms of its own (one without affine)."""

    def __init__(self, tasks=3):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.BatchNorm1d(8, affine=False),
                                                 nn.Linear(8, 4)) for _ in range(tasks))
        self.task = 0

    def forward(self, x):
        return self.heads[self.task](self.trunk(x))


def test_the_batch_norms_of_a_tasks_own_modules_learn_their_statistics_in_that_task_only():
    model = NormedHeads()
    packnet = PackNet(model, layers=["trunk.0"])

    def statistics():
        return {name: buffer.clone() for name, buffer in model.named_buffers()}

    for task in (1, 2, 3):
        model.task = task - 1
        packnet.start_task(own=f"heads.{task - 1}")
        before = statistics()
        train(model, task_data(task), steps=5)
        moved = {name for name, buffer in statistics().items() if not torch.equal(buffer, before[name])}
        learning = {f"heads.{task - 1}.{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var",
                                                                             "num_batches_tracked")}
        trunk = {f"trunk.1.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")}
        assert moved == (learning | trunk if task == 1 else learning), (task, sorted(moved))
        packnet.assign(0.3)
    resumed = PackNet(NormedHeads(), layers=["trunk.0"])
    resumed.load_state_dict(packnet.state_dict())
    assert resumed.own_modules == packnet.own_modules == ("heads.2",)
    state = packnet.state_dict()
    del state["own_modules"]                        # a state saved before they were recorded: the own parameters'
    resumed.load_state_dict(state)
    assert resumed.own_modules == ("heads.2.0", "heads.2.1", "heads.2.3")


def test_own_must_name_parameters_of_the_model_outside_the_shared_layers():
    packnet = PackNet(MultiHead(), layers=["trunk"])
    with pytest.raises(ValueError, match="own='head.1' is neither a parameter nor a module"):
        packnet.start_task(own="head.1")
    with pytest.raises(ValueError, match="own='trunk' holds a shared layer's weight"):
        packnet.start_task(own="trunk")
    assert packnet.start_task(own="heads.0.bias") == 1 and packnet.own == ("heads.0.bias",)


def test_assign_needs_a_task_begun_by_start_task():
    model = small_mlp()
    packnet = PackNet(model)
    with pytest.raises(RuntimeError, match="call start_task\\(\\) before training task 1"):
        packnet.assign(0.5)
    packnet.start_task()
    packnet.assign(0.5)
    with pytest.raises(RuntimeError, match="call start_task\\(\\) before training task 2"):
        packnet.assign(0.5)                       # the weights of task 2 were never trained as task 2's
    restored = PackNet(small_mlp(1))
    restored.load_state_dict(packnet.state_dict())
    assert not restored.started
    packnet.start_task()
    restored.load_state_dict(packnet.state_dict())
    assert restored.started and restored.assign(0.2) == 2


def test_every_layer_with_free_weights_gives_the_new_task_at_least_one():
    model = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 4))     # round(0.001 · 256) = 0
    packnet = PackNet(model)
    packnet.start_task()
    packnet.assign(0.001)
    assert {name: int((o == 1).sum()) for name, o in packnet.owner.items()} == {"0": 6, "2": 1}


def plain_copy(model, weights):
    """An unmasked copy of the MLP ``model`` whose layers hold ``weights`` (``{name: tensor}``)."""
    plain = small_mlp()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "parametrizations" not in k}, strict=False)
    with torch.no_grad():
        for name, layer in prunable_layers(plain).items():
            layer.weight.copy_(weights[name])
    return plain


def test_a_task_trains_with_every_weight_in_the_forward_pass_and_only_free_weights_learn():
    model = small_mlp()
    packnet = PackNet(model)
    packnet.start_task()
    train(model, task_data(1), steps=5)
    packnet.assign(0.3)
    packnet.start_task()                                             # task 2: task 1's weights used, frozen
    raw = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    plain = plain_copy(model, raw)                                   # the dense network θ
    x, y = task_data(2)
    model.zero_grad()
    out = model(x)
    assert torch.allclose(out, plain(x), rtol=1e-6, atol=1e-7)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(plain(x), y).backward()
    for name, layer in prunable_layers(model).items():
        free = packnet.owner[name] == 0
        expected = prunable_layers(plain)[name].weight.grad * free
        assert torch.allclose(raw_weight(layer).grad, expected, rtol=1e-5, atol=1e-8), name


def test_task_s_computes_with_the_weights_of_tasks_one_to_s():
    model = small_mlp()
    packnet = PackNet(model)
    for task in (1, 2, 3):
        packnet.start_task()
        train(model, task_data(task), steps=5)
        packnet.assign(0.25)
    x = task_data(1)[0]
    for task in (1, 2, 3):
        weights = {name: raw_weight(layer).detach() * ((packnet.owner[name] >= 1) & (packnet.owner[name] <= task))
                   for name, layer in prunable_layers(model).items()}
        with packnet.use_task(task), torch.no_grad():
            assert torch.allclose(model(x), plain_copy(model, weights)(x), rtol=1e-6, atol=1e-7), task


def test_assign_zeroes_the_optimizer_state_of_the_released_weights_only():
    model = small_mlp()
    packnet = PackNet(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    packnet.start_task(optimizer)
    take_steps(model, optimizer, task_data(1), 3)
    buffers = {name: optimizer.state[raw_weight(layer)]["momentum_buffer"].clone()
               for name, layer in prunable_layers(model).items()}
    packnet.assign(0.3, optimizer)
    reinitialised = {name: raw_weight(layer).detach().clone() for name, layer in prunable_layers(model).items()}
    for name, layer in prunable_layers(model).items():
        owned = packnet.owner[name] == 1
        assert torch.equal(optimizer.state[raw_weight(layer)]["momentum_buffer"], buffers[name] * owned), name
    take_steps(model, optimizer, task_data(1), 3)                   # retraining task 1's weights alone
    for name, layer in prunable_layers(model).items():
        released = packnet.owner[name] == 0                         # no stale momentum moves the fresh weights
        assert torch.equal(raw_weight(layer).detach()[released], reinitialised[name][released]), name


def test_the_next_tasks_free_weights_learn_under_a_kept_rprop():
    """Released weights get a new parameter's Rprop step size (the learning rate); at zero, Rprop would clamp it to
    its minimum, 1e-6, and the next task could practically not learn."""
    torch.manual_seed(0)
    model = MLP(20, (16, 12), 4)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=generator), torch.randint(0, 4, (64,), generator=generator)
    packnet = PackNet(model)
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    packnet.start_task(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    packnet.assign(0.3, optimizer)
    packnet.start_task(optimizer)
    weight = raw_weight(prunable_layers(model)["1"])
    before = weight.detach().clone()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    learns = (packnet.owner["1"] == 0) & (weight.grad != 0)
    optimizer.step()
    assert learns.any()
    torch.testing.assert_close((weight.detach() - before)[learns].abs(), torch.full((int(learns.sum()),), 0.01))


# --------------------------------------------------------------------------------------------------------------
# PackNet (Mallya & Lazebnik 2018) against a slow re-implementation on plain tensors.
#
# Per task t: train the free weights with every assigned and free weight in the forward pass;
# give task t the largest free weights of each layer; retrain task t's weights with the
# network of tasks 1..t; at inference, task s uses the weights of tasks 1..s only. Biases
# learn in task 1 only. The reference below writes all of this out for a three-layer MLP
# with plain SGD, and checks lowlearn's PackNet against it after every phase.
# --------------------------------------------------------------------------------------------------------------

NAMES = ("1", "3", "5")


def float64_task_data(task, n=32):
    generator = torch.Generator().manual_seed(100 + task)
    return torch.randn(n, 20, generator=generator, dtype=torch.float64), torch.randint(0, 4, (n,), generator=generator)


def reference_forward(weights, biases, x, use=None):
    h = x
    for i, name in enumerate(NAMES):
        w = weights[name] if use is None else weights[name] * use[name]
        h = h @ w.T + biases[name]
        if i < 2:
            h = h.relu()
    return h


def reference_sgd_steps(weights, biases, data, steps, lr, learn, use=None, biases_learn=True):
    """Plain SGD on leaf copies; only ``learn`` entries of each weight move."""
    x, y = data
    for _ in range(steps):
        w = {n: weights[n].clone().requires_grad_() for n in NAMES}
        b = {n: biases[n].clone().requires_grad_() for n in NAMES}
        grads = torch.autograd.grad(F.cross_entropy(reference_forward(w, b, x, use), y), [w[n] for n in NAMES] +
                                    [b[n] for n in NAMES])
        for i, n in enumerate(NAMES):
            weights[n] = weights[n] - lr * grads[i] * learn[n]
            if biases_learn:
                biases[n] = biases[n] - lr * grads[3 + i]


def test_packnet_follows_a_slow_reference_through_three_tasks():
    """Weights, biases, owners and every task's outputs equal a plain-tensor PackNet after every phase."""
    lr, fraction, steps, retrain = 0.1, 0.25, 6, 3
    model = small_mlp().double()
    packnet = PackNet(model, seed=3)
    layers = prunable_layers(model)
    weights = {n: raw_weight(layers[n]).detach().clone() for n in NAMES}
    biases = {n: layers[n].bias.detach().clone() for n in NAMES}
    owner = {n: torch.zeros_like(weights[n], dtype=torch.long) for n in NAMES}
    outputs = {}
    for task in (1, 2, 3):
        data = float64_task_data(task)
        packnet.start_task()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        free = {n: owner[n] == 0 for n in NAMES}
        reference_sgd_steps(weights, biases, data, steps, lr, free, biases_learn=task == 1)
        take_steps(model, optimizer, data, steps)
        for n in NAMES:
            torch.testing.assert_close(raw_weight(layers[n]).detach(), weights[n], rtol=1e-12, atol=1e-14)
        trained = {n: raw_weight(layers[n]).detach().clone() for n in NAMES}
        packnet.assign(fraction)
        for n in NAMES:
            k = min(max(1, round(fraction * owner[n].numel())), int(free[n].sum()))
            scores = weights[n].abs().masked_fill(~free[n], -1.0).flatten()
            chosen = torch.zeros(scores.numel(), dtype=torch.bool)
            chosen[scores.argsort(descending=True)[:k]] = True
            owner[n][chosen.view_as(owner[n])] = task
            assert torch.equal(packnet.owner[n].long(), owner[n]), (task, n)
            released = owner[n] == 0
            fresh = raw_weight(layers[n]).detach()
            bound = 1 / weights[n].shape[1] ** 0.5
            assert (fresh[released].abs() <= bound).all()                  # re-drawn in PyTorch's default range
            assert torch.equal(fresh[~released], trained[n][~released])    # the kept weights untouched
            weights[n] = torch.where(released, fresh, weights[n])
        use = {n: owner[n] >= 1 for n in NAMES}                            # tasks 1..t
        own = {n: owner[n] == task for n in NAMES}
        reference_sgd_steps(weights, biases, data, retrain, lr, own, use, biases_learn=task == 1)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        take_steps(model, optimizer, data, retrain)
        for n in NAMES:
            torch.testing.assert_close(raw_weight(layers[n]).detach(), weights[n], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(layers[n].bias.detach(), biases[n], rtol=1e-12, atol=1e-14)
        outputs[task] = reference_forward(weights, biases, data[0], use)
    for task in (1, 2, 3):                          # inference: tasks 1..s only, after all three tasks
        use = {n: (owner[n] >= 1) & (owner[n] <= task) for n in NAMES}
        x = float64_task_data(task)[0]
        with packnet.use_task(task), torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out, reference_forward(weights, biases, x, use), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out, outputs[task], rtol=1e-12, atol=1e-14)      # nothing forgotten


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=0.01),
                                  lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
                                  lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
                                  lambda p: torch.optim.NAdam(p, lr=0.01)])
def test_one_stateful_optimizer_across_all_tasks_never_moves_an_earlier_tasks_weight(make):
    """One optimizer kept from task to task (passed to start_task and assign): owned weights bit-for-bit frozen."""
    model = small_mlp().double()
    packnet = PackNet(model)
    optimizer = make(model.parameters())
    layers = prunable_layers(model)
    snapshots = {}
    for task in (1, 2, 3):
        packnet.start_task(optimizer)
        take_steps(model, optimizer, float64_task_data(task), 5)
        packnet.assign(0.25, optimizer)
        take_steps(model, optimizer, float64_task_data(task), 3)                # retraining task t alone
        snapshots[task] = {n: raw_weight(layers[n]).detach().clone() for n in NAMES}
        for earlier in range(1, task + 1):
            for n in NAMES:
                owned = (packnet.owner[n] >= 1) & (packnet.owner[n] <= earlier)
                assert torch.equal(raw_weight(layers[n]).detach()[owned], snapshots[earlier][n][owned]), (task, n)


def test_released_conv_weights_are_redrawn_in_pytorchs_default_range_of_the_full_fan_in():
    """PackNet.assign re-draws released weights "from PyTorch's default initialisation of the layer (uniform in
    ±1/√fan_in)". For a Conv2d, fan_in = in_channels·k_h·k_w (torch.nn.init._calculate_fan_in_and_fan_out, and
    nn.Conv2d.reset_parameters' bias bound), not in_channels: with 4 input channels and a 3×3 kernel the bound
    is 1/6, not 1/2. Reference: torch's own fan-in computation on a fresh layer of that shape."""
    torch.manual_seed(1)      # not PackNet's seed: with both 0 the re-draw repeats the conv's own init exactly
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    packnet = PackNet(model, seed=0)
    conv = model[0]
    before = raw_weight(conv).detach().clone()
    packnet.start_task()
    packnet.assign(0.2)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(8, 4, 3, 3))
    bound = 1 / math.sqrt(fan_in)
    assert fan_in == 36
    released = packnet.owner["0"] == 0
    fresh = raw_weight(conv).detach()[released]
    assert (fresh != before[released]).all()               # really re-drawn
    assert released.sum() == 288 - round(0.2 * 288)
    assert (fresh.abs() <= bound + 1e-7).all()
    assert fresh.abs().max() > 0.9 * bound                # the draw fills the range (230 uniform draws)
    assert abs(fresh.abs().mean().item() - bound / 2) < 0.1 * bound


def test_inside_use_task_no_shared_weight_gets_a_gradient_and_a_step_moves_none():
    """PackNet.use_task: "the network computes task s (weights of tasks 1..s); nothing learns". Reference by
    hand: every shared raw weight's gradient is exactly zero inside the block, for the latest task as for an
    earlier one, so an SGD step with momentum taken there leaves every shared weight bit-for-bit as it was
    (e.g. a loss evaluated with gradients, or a fine-tuning step by mistake, must not move task s's own weights)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    packnet = PackNet(model)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    for _ in range(2):
        packnet.start_task()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        packnet.assign(0.3)
    shared = {name: raw_weight(layer) for name, layer in prunable_layers(model).items()}
    for task in (1, 2):
        before = {name: w.detach().clone() for name, w in shared.items()}
        optimizer = torch.optim.SGD(shared.values(), lr=0.5, momentum=0.9)
        with packnet.use_task(task):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for name, w in shared.items():
                assert w.grad is not None and torch.count_nonzero(w.grad) == 0, (task, name)
            optimizer.step()
        for name, w in shared.items():
            assert torch.equal(w.detach(), before[name]), (task, name)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def test_from_the_second_task_batch_norm_normalises_with_the_first_tasks_running_statistics_in_training():
    """Reference: the evaluation-mode output (running statistics), as in PackNet's code, which keeps batch norm
    in eval mode from the second task on. Merely freezing the running statistics (momentum 0) would leave
    training mode normalising with each batch's own statistics, so task 2 would train a different network
    from the one use_task(2) evaluates."""
    model = bn_model()
    packnet = PackNet(model)
    packnet.start_task()
    train(model.train(), task_data(1))
    packnet.assign(0.5)
    packnet.start_task()
    x = 3 * task_data(2)[0] + 2                                          # other input statistics
    with torch.no_grad():
        in_training = model.train()(x)
        in_eval = model.eval()(x)
    torch.testing.assert_close(in_training, in_eval, rtol=0, atol=0)


def test_use_task_restores_the_training_masks_after_an_exception_and_when_nested():
    """Reference: the forward and backward masks as they were before the block (a context manager must restore
    them on the way out, however it leaves), also for use_task(1) nested inside use_task(2)."""
    model = bn_model()
    packnet = PackNet(model)
    for task in (1, 2):
        packnet.start_task()
        train(model.train(), task_data(task))
        packnet.assign(0.3)
    packnet.start_task()                                                 # training task 3

    def masks():
        return {name: (find_mask(layer).mask.clone(), find_mask(layer).backward_mask.clone())
                for name, layer in packnet.layers.items()}

    def assert_same(a, b):
        for name in a:
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name

    before = masks()
    with pytest.raises(KeyError):
        with packnet.use_task(1):
            raise KeyError("evaluation failed")
    assert_same(before, masks())
    with packnet.use_task(2):
        outer = masks()
        with packnet.use_task(1):
            pass
        assert_same(outer, masks())


def test_a_packnet_state_dict_is_a_snapshot_and_loading_it_leaves_it_unchanged():
    """Reference: a deep copy of the state dict when it was made. assign() writes the owners in place, so a
    state dict that shared them would change with the next task; and a PackNet that loaded it and goes on
    must not write into it, so the same in-memory checkpoint can be loaded twice with the same result."""
    model = bn_model()
    packnet = PackNet(model)
    packnet.start_task()
    train(model.train(), task_data(1))
    packnet.assign(0.3)
    state, model_state = packnet.state_dict(), copy.deepcopy(model.state_dict())
    snapshot = copy.deepcopy(state)
    packnet.start_task()
    packnet.assign(0.3)
    for name, o in snapshot["owner"].items():
        assert torch.equal(state["owner"][name], o), name                # saving took a copy
    owners = []
    for _ in range(2):
        other = bn_model()
        resumed = PackNet(other)
        other.load_state_dict(model_state)
        resumed.load_state_dict(state)
        resumed.start_task()
        resumed.assign(0.3)
        owners.append({name: o.clone() for name, o in resumed.owner.items()})
        for name, o in snapshot["owner"].items():
            assert torch.equal(state["owner"][name], o), name            # loading took a copy
    for name in owners[0]:
        assert torch.equal(owners[0][name], owners[1][name]), name
        assert int((owners[0][name] == 2).sum()) > 0


def test_a_layer_with_fewer_free_weights_than_the_fraction_gives_all_it_has_and_keeps_earlier_owners():
    """Reference (assign's docstring): "a layer with fewer free weights gives all it has". Task 1 takes
    round(0.7·n) weights of each layer; task 2 asks for 0.7·n again, more than the 0.3·n left, and must get
    exactly the free ones, never a weight of task 1."""
    model = bn_model()
    packnet = PackNet(model)
    packnet.start_task()
    train(model.train(), task_data(1))
    packnet.assign(0.7)
    first = {name: o.clone() for name, o in packnet.owner.items()}
    packnet.start_task()
    train(model, task_data(2))
    packnet.assign(0.7)
    for name, owner in packnet.owner.items():
        assert bool((owner[first[name] == 1] == 1).all()), name
        assert bool((owner[first[name] == 0] == 2).all()), name


def test_pruning_a_packnet_model_is_refused_since_its_gradients_follow_the_tasks_backward_masks():
    """PackNet's split masks route gradients by task ownership, not by the forward mask: a pruning would write only
    the forward mask and leave the pruned weights learning. Refused, with the model and PackNet's owners unchanged."""
    from lowlearn.sparse import prune
    from lowlearn.sparse.scores import magnitude

    model = small_mlp()
    packnet = PackNet(model)
    packnet.start_task()
    packnet.assign(0.5)
    before, owners = copy.deepcopy(model.state_dict()), copy.deepcopy(packnet.owner)
    with pytest.raises(ValueError, match="SplitMask.*squash"):
        prune(model, magnitude(model), 0.2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(packnet.owner[k], v) for k, v in owners.items())


def test_a_bad_seed_is_refused_before_the_model_changes_so_that_a_retry_works():
    model = MLP(20, (16,), 4)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        PackNet(model, seed=-1)
    assert not any(find_mask(layer) for layer in prunable_layers(model).values())
    PackNet(model, seed=0)


@pytest.mark.parametrize("layer", [nn.Embedding(10, 6), nn.Bilinear(6, 6, 6), nn.LayerNorm(6)])
def test_a_layer_whose_default_initialisation_is_not_the_redrawn_one_is_refused_before_the_model_changes(layer):
    # assign() re-drew an Embedding's released weights in ±1/√6 (its default is N(0, 1)), a LayerNorm's in ±1.
    model = nn.Sequential(nn.Linear(6, 6), layer)
    with pytest.raises(ValueError, match=f"layer '1' is a {type(layer).__name__}: PackNet re-draws .* share only "
                                         "nn.Linear and convolution layers"):
        PackNet(model, ["0", "1"])
    assert find_mask(model[0]) is None


@pytest.mark.parametrize("layer", [nn.Conv1d(3, 5, 3), nn.Conv2d(3, 5, (2, 3)), nn.ConvTranspose2d(3, 6, 2, groups=3)])
def test_released_weights_of_convolutions_are_redrawn_within_the_layers_default_bound(layer):
    bound = 1 / math.sqrt(layer.weight[0].numel())                           # fan_in, as torch's default init uses
    default = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, groups=layer.groups).weight
    assert default.abs().max() <= bound < 1.2 * default.abs().max()
    packnet = PackNet(nn.Sequential(layer), ["0"])
    packnet.start_task()
    packnet.assign(0.1)
    redrawn = raw_weight(layer).detach()[packnet.owner["0"] == 0]         # released: out of the forward pass
    assert redrawn.abs().max() <= bound and redrawn.abs().max() > 0.8 * bound


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_layers_of_no_weights_share_nothing_and_the_others_are_assigned():
    # assign() re-drew the released weights of every layer: of a layer with no output it indexed row 0 (IndexError),
    # of a layer with no input it divided by a fan-in of 0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 0), nn.Linear(0, 2))
    packnet = PackNet(model)
    packnet.start_task()
    assert packnet.assign(0.5) == 1
    assert int((packnet.owner["0"] == 1).sum()) == 6
    assert packnet.owner["1"].numel() == packnet.owner["2"].numel() == 0
    packnet.start_task()
    with packnet.use_task(1):
        assert model(torch.randn(5, 3)).shape == (5, 2)
