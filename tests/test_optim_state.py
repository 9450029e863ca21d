import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.lowrank import DLRT, dense_parameters, to_low_rank
from lowlearn.models import MLP
from lowlearn.optim_state import fresh_state, reset_optimizer_state, torch_optimizer
from lowlearn.powerprop import PowerPropOptimizer, powerprop
from lowlearn.sparse.mask import prunable_layers, raw_weight


def stepped(optimizer_class, steps=3, **settings):
    """A (4, 3) parameter and its optimizer after ``steps`` steps of a fixed gradient."""
    p = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    optimizer = optimizer_class([p], **settings)
    for step in range(steps):
        p.grad = torch.linspace(-1, 1, 12).view(4, 3) + step
        optimizer.step()
    return p, optimizer


KEEP = torch.arange(12).view(4, 3) % 2 == 0


@pytest.mark.parametrize("optimizer_class, settings, key, start", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer", 0.0),
    (torch.optim.Adam, {"lr": 0.1}, "exp_avg_sq", 0.0),
    (torch.optim.Rprop, {"lr": 0.01}, "step_size", 0.01),                  # Rprop's step sizes start at lr
    (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}, "sum", 0.5),
    # Weight decay adds λθ to a gradient: a reset weight's state must not take it from the weight's value.
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}, "momentum_buffer", 0.0),
    (torch.optim.Adam, {"lr": 0.1, "weight_decay": 0.1}, "exp_avg", 0.0),
    (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}, "sum", 0.0),
])
def test_reset_weights_get_the_state_a_new_parameter_starts_from_and_the_others_keep_theirs(
        optimizer_class, settings, key, start):
    p, optimizer = stepped(optimizer_class, **settings)
    before = {k: v.clone() for k, v in optimizer.state[p].items()}
    reset_optimizer_state(optimizer, p, KEEP)
    state = optimizer.state[p]
    assert torch.equal(state[key][KEEP], before[key][KEEP])
    assert (state[key][~KEEP] == start).all()
    for k, value in state.items():                       # every per-weight tensor is reset, scalars are not
        if value.shape != p.shape:
            assert torch.equal(value, before[k])


def test_sparse_adam_which_takes_sparse_gradients_only_is_reset_too():
    """SparseAdam (for nn.Embedding(sparse=True)) refuses the dense zero gradient of the probe step."""
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=0.01)
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    keep = torch.ones(10, 4, dtype=torch.bool)
    keep[2] = False
    before = {k: v.clone() for k, v in optimizer.state[embedding.weight].items() if torch.is_tensor(v)}
    assert before["exp_avg"][2].abs().sum() > 0
    reset_optimizer_state(optimizer, embedding.weight, keep)
    state = optimizer.state[embedding.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert (state[key][2] == 0).all() and torch.equal(state[key][keep], before[key][keep])


def test_a_reset_rprop_weight_moves_by_the_learning_rate_as_a_new_one_does():
    """A zero step size would be clamped to Rprop's minimum (1e-6): the weight would practically stop learning."""
    p, optimizer = stepped(torch.optim.Rprop, lr=0.01)
    reset_optimizer_state(optimizer, p, KEEP)
    before = p.detach().clone()
    p.grad = torch.ones(4, 3)
    optimizer.step()
    torch.testing.assert_close((before - p.detach())[~KEEP], torch.full((6,), 0.01))


def test_only_per_element_optimizer_state_is_reset():
    # Adafactor keeps factored second moments of shapes (4, 1) and (1, 3) for a (4, 3) weight, and a step count:
    # they are not per-element, so resetting the state of some weights leaves them as they are.
    p, optimizer = stepped(torch.optim.Adafactor, steps=1, lr=0.01)
    before = {k: v.clone() for k, v in optimizer.state[p].items()}
    assert before["row_var"].shape == (4, 1) and before["col_var"].shape == (1, 3)
    reset_optimizer_state(optimizer, p, KEEP)
    assert all(torch.equal(v, before[k]) for k, v in optimizer.state[p].items())


class LazyMomentum(torch.optim.Optimizer):
    """Heavy-ball SGD that makes a weight's momentum only once the weight has had a nonzero gradient."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.any():
                    trace = self.state[p].setdefault("trace", torch.zeros_like(p))
                    p.sub_(trace.mul_(0.9).add_(p.grad), alpha=group["lr"])


def test_per_weight_state_that_a_new_parameter_does_not_have_yet_is_reset_to_zero():
    # A zero gradient makes no momentum here: a reset weight has none to start from, and gets zero.
    p, optimizer = stepped(LazyMomentum)
    before = optimizer.state[p]["trace"].clone()
    assert fresh_state(optimizer, optimizer.param_groups[0], p) == {} and (before != 0).all()
    reset_optimizer_state(optimizer, p, KEEP)
    assert (optimizer.state[p]["trace"][~KEEP] == 0).all()
    assert torch.equal(optimizer.state[p]["trace"][KEEP], before[KEEP])


def test_a_wrapper_resets_the_state_of_the_optimizer_it_wraps():
    torch.manual_seed(0)
    model = powerprop(MLP(20, (8,), 3), 2.0)
    optimizer = PowerPropOptimizer(torch.optim.Rprop(model.parameters(), lr=0.01), model)
    F.cross_entropy(model(torch.randn(4, 20)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    phi = raw_weight(prunable_layers(model)["1"])
    keep = torch.rand(phi.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    state = copy.deepcopy(optimizer.optimizer.state[phi])
    reset_optimizer_state(optimizer, phi, keep)
    assert torch_optimizer(optimizer) is optimizer.optimizer
    assert (optimizer.optimizer.state[phi]["step_size"][~keep] == 0.01).all()
    assert torch.equal(optimizer.optimizer.state[phi]["step_size"][keep], state["step_size"][keep])


def test_fresh_state_takes_the_groups_settings_and_a_bad_optimizer_is_refused():
    p = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.Rprop([{"params": [p], "lr": 0.3}], lr=0.01)
    assert (fresh_state(optimizer, optimizer.param_groups[0], p)["step_size"] == 0.3).all()
    with pytest.raises(TypeError, match="must be a torch.optim optimizer"):
        torch_optimizer(object())


def test_a_reset_weight_takes_the_settings_of_its_own_group_among_groups_of_same_shaped_parameters():
    # Rprop's step sizes start at the group's lr: the second group's weights restart at 0.5, not the first's 0.1
    first, second = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 3))
    optimizer = torch.optim.Rprop([{"params": [first], "lr": 0.1}, {"params": [second], "lr": 0.5}])
    for step in range(3):
        first.grad = second.grad = torch.linspace(-1, 1, 12).view(4, 3) + step
        optimizer.step()
    before = optimizer.state[second]["step_size"].clone()
    reset_optimizer_state(optimizer, second, KEEP)
    assert (optimizer.state[second]["step_size"][~KEEP] == 0.5).all()
    assert torch.equal(optimizer.state[second]["step_size"][KEEP], before[KEEP])


def test_resetting_a_parameter_that_the_optimizer_does_not_hold_changes_nothing():
    # e.g. pruning a frozen layer while the optimizer trains only the others
    p, optimizer = stepped(torch.optim.Adam, lr=0.1)
    before = copy.deepcopy(optimizer.state_dict())
    reset_optimizer_state(optimizer, nn.Parameter(torch.zeros(4, 3)), KEEP)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][0][key], before["state"][0][key]) for key in before["state"][0])


@pytest.mark.parametrize("settings", [{}, {"lambd": 0.01}, {"lambd": 0.01, "weight_decay": 0.1}])
def test_a_reset_asgd_weights_average_starts_at_the_weight_itself(settings):
    """ASGD's ``lambd`` shrinks the weight (θ ← θ·(1 − λη)) as weight decay does; a new parameter's average
    ``ax`` after its first step with a zero gradient is the weight only without either."""
    p, optimizer = stepped(torch.optim.ASGD, lr=0.1, **settings)
    before = optimizer.state[p]["ax"].clone()
    reset_optimizer_state(optimizer, p, KEEP)
    assert torch.equal(optimizer.state[p]["ax"][~KEEP], p.detach()[~KEEP])
    assert torch.equal(optimizer.state[p]["ax"][KEEP], before[KEEP])


def test_of_an_optimizer_and_the_one_it_wraps_the_one_that_holds_the_parameter_is_reset():
    # DLRT is itself a torch optimizer and steps the dense parameters with the one it wraps.
    torch.manual_seed(0)
    model = to_low_rank(MLP(in_features=12, hidden=(8,), out_features=3), ["1"], rank=2)
    inner = torch.optim.SGD(dense_parameters(model), lr=0.1, momentum=0.9)
    dlrt = DLRT(model, lr=0.1, tol=0.1, optimizer=inner)
    dlrt.zero_grad()
    F.cross_entropy(model(torch.randn(5, 12)), torch.tensor([0, 1, 2, 0, 1])).backward()
    dlrt.step()
    head = model[3].weight
    assert torch_optimizer(dlrt, holding=[head]) is inner and torch_optimizer(dlrt) is dlrt
    assert torch_optimizer(dlrt, holding=[model[1].U]) is dlrt
    keep = torch.ones_like(head, dtype=torch.bool)
    keep[0] = False
    reset_optimizer_state(dlrt, head, keep)
    momentum = inner.state[head]["momentum_buffer"]
    assert (momentum[0] == 0).all() and (momentum[1:] != 0).any()


@pytest.mark.parametrize("keep", [KEEP[0], KEEP[:1], KEEP.T], ids=["a-row", "one-row", "transposed"])
def test_a_keep_mask_not_of_the_parameters_shape_is_refused_before_any_state_changes(keep):
    # A row's pattern broadcast over the rows: the same columns of every row were reset, with no error.
    p, optimizer = stepped(torch.optim.Adam, steps=2, lr=0.01)
    before = {k: v.clone() for k, v in optimizer.state[p].items()}
    with pytest.raises(ValueError, match=r"keep must have the parameter's shape \(4, 3\)"):
        reset_optimizer_state(optimizer, p, keep)
    assert all(torch.equal(v, before[k]) for k, v in optimizer.state[p].items())
