import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.data.episodes import Episode, random_episodes
from lowlearn.data.tasks import RegressionBatch, SinusoidTasks
from lowlearn.meta import ANIL, MAML, MetaSGD, Reptile, adapt_and_evaluate, parameters_of, run
from lowlearn.meta.batched import summed_over_tasks, task_batched
from lowlearn.models import MLP, Conv4, LeNet5
from lowlearn.sparse import attach_masks


def regression(tasks=5, seed=0):
    batch = SinusoidTasks().sample(tasks, 5, 7, generator=torch.Generator().manual_seed(seed))
    return RegressionBatch(*(t.double() for t in batch))


def problem(kind):
    """A float64 model, its tasks, loss and inner learning rate."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP(1, (40, 40), 1).double(), regression(), F.mse_loss, 0.01
    tasks = random_episodes(5, 3, 2, 3, image_size=16, dtype=torch.float64)
    return Conv4(1, 3, hidden=8, image_size=16, running_stats=False).double(), tasks, F.cross_entropy, 0.4


@pytest.mark.parametrize("kind", ["conv4", "mlp", "mlp-images", "lenet5", "norms", "pools", "flattens",
                                  "flattens-late"])
def test_each_task_of_a_batched_run_equals_the_model_run_with_that_tasks_parameters(kind):
    torch.manual_seed(0)
    norms = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2),
                          nn.BatchNorm2d(4, affine=False, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6, bias=False), nn.BatchNorm1d(6, track_running_stats=False),
                          nn.Tanh(), nn.Linear(6, 2))
    model, shape = {"conv4": (Conv4(1, 5, hidden=8, image_size=16, running_stats=False), (1, 16, 16)),
                    "mlp": (MLP(1, (40, 40), 1), (1,)),
                    "mlp-images": (MLP(784, (20,), 5), (1, 28, 28)),
                    "lenet5": (LeNet5(), (1, 28, 28)),
                    "norms": (norms, (1, 10, 10)),
                    "pools": (nn.Sequential(nn.AvgPool1d(2), nn.MaxPool1d(3, stride=1, padding=1), nn.Flatten(),
                                            nn.Linear(2 * 3, 3)), (2, 6)),
                    # flattens that keep the batch dimension: up to a dimension before the last, or after the channels
                    "flattens": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(1, 2), nn.MaxPool1d(2), nn.Flatten(),
                                               nn.Linear(4 * 5 * 2, 3)), (2, 7, 6)),
                    "flattens-late": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(2), nn.AvgPool1d(4), nn.Flatten(),
                                                    nn.Linear(4 * 5, 3)), (2, 7, 6))}[kind]
    model = model.double()
    tasks, batch = 3, 4
    shared = next(iter(parameters_of(model)))                      # one parameter without a task dimension
    params = {name: p if name == shared else p + 0.1 * torch.randn(tasks, *p.shape, dtype=p.dtype)
              for name, p in parameters_of(model).items()}
    x = torch.randn(tasks, batch, *shape, dtype=torch.float64)
    out = run(task_batched(model), params, x)
    for t in range(tasks):
        own = {name: p if name == shared else p[t] for name, p in params.items()}
        assert torch.allclose(out[t], run(model, own, x[t]), rtol=0, atol=1e-12)


def test_the_batched_copy_shares_the_parameters_and_leaves_the_model_alone():
    model = Conv4(1, 5, hidden=8, image_size=16, running_stats=False)
    x = torch.randn(6, 1, 16, 16)
    before, state = model(x), copy.deepcopy(model.state_dict())
    batched = task_batched(model)
    assert dict(batched.named_parameters()) == dict(model.named_parameters())
    assert torch.equal(batched(x[None])[0], before)                 # its own parameters: shared by every task
    assert type(model) is Conv4 and torch.equal(model(x), before)
    assert model.state_dict().keys() == state.keys()
    maml = MAML(model, 0.4, 1, tasks_at_once=4)
    assert maml.state_dict().keys() == MAML(model, 0.4, 1).state_dict().keys()


def test_summed_over_tasks_is_the_sum_of_each_tasks_mean_loss():
    out, y = torch.randn(3, 7, 5, dtype=torch.float64), torch.randint(0, 5, (3, 7))
    expected = sum(F.cross_entropy(out[t], y[t]) for t in range(3))
    assert torch.allclose(summed_over_tasks(F.cross_entropy)(out, y), expected, rtol=1e-14)


def learner(variant, model, lr, steps, loss_fn, tasks_at_once):
    if variant == "anil":
        return ANIL(model, lr, steps, loss_fn=loss_fn, tasks_at_once=tasks_at_once)
    if variant == "metasgd":
        return MetaSGD(model, lr, steps, loss_fn=loss_fn, tasks_at_once=tasks_at_once)
    return MAML(model, lr, steps, first_order=variant == "first-order", loss_fn=loss_fn, tasks_at_once=tasks_at_once)


@pytest.mark.parametrize("tasks_at_once", [2, 5])
@pytest.mark.parametrize("variant", ["maml", "first-order", "anil", "metasgd"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_batched_meta_gradient_equals_the_per_task_loop(kind, steps, variant, tasks_at_once):
    """In float64, for batch norm too: groups of 2 (2 + 2 + 1 tasks) and all 5 at once."""
    model, tasks, loss_fn, lr = problem(kind)
    results = []
    for at_once in (1, tasks_at_once):
        meta = learner(variant, copy.deepcopy(model), lr, steps, loss_fn, at_once)
        stats = meta.meta_backward(tasks)
        results.append((stats, {name: p.grad for name, p in meta.named_parameters()}))
    (loop_stats, loop_grads), (stats, grads) = results
    assert loop_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if grad is None:                                   # a parameter the loss does not reach (ANIL's none)
            assert loop_grads[name] is None, name
            continue
        assert torch.allclose(grad, loop_grads[name], rtol=1e-10, atol=1e-14), name
        assert loop_grads[name].abs().sum() > 0, name
    for key, value in loop_stats.items():
        assert torch.allclose(stats[key], value, rtol=1e-12), key


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_batched_adapt_and_evaluate_equals_the_per_task_loop(kind):
    model, tasks, loss_fn, lr = problem(kind)
    loop = adapt_and_evaluate(model, tasks, loss_fn, 3, lr)
    batched = adapt_and_evaluate(model, tasks, loss_fn, 3, lr, tasks_at_once=2)
    assert loop.keys() == batched.keys()
    for key, value in loop.items():
        assert value.shape == batched[key].shape and torch.allclose(batched[key], value, rtol=1e-12), key
    assert MAML(model, lr, 3, loss_fn=loss_fn, tasks_at_once=4).evaluate(tasks)["per_task_loss"].shape == (5,)


@pytest.mark.parametrize("tasks_at_once", [2, 5])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_batched_reptile_update_equals_the_per_task_loop(kind, tasks_at_once):
    model, tasks, loss_fn, lr = problem(kind)
    start = copy.deepcopy(model)
    results = []
    for at_once in (1, tasks_at_once):
        reptile = Reptile(copy.deepcopy(model), lr, 3, 0.5, loss_fn, tasks_at_once=at_once)
        stats = reptile.meta_step(tasks)
        results.append((stats["loss"], dict(reptile.model.named_parameters())))
    (loop_loss, loop_params), (loss, params) = results
    for name, param in params.items():
        assert torch.allclose(param, loop_params[name], rtol=1e-10, atol=1e-14), name
        assert not torch.equal(loop_params[name], dict(start.named_parameters())[name]), name   # it moved
    assert torch.allclose(loss, loop_loss, rtol=1e-12)
    loop = Reptile(model, lr, 3, 0.5, loss_fn).evaluate(tasks)
    batched = Reptile(model, lr, 3, 0.5, loss_fn, tasks_at_once=tasks_at_once).evaluate(tasks)
    assert torch.allclose(batched["per_task_loss"], loop["per_task_loss"], rtol=1e-12)


class ScaledLinear(nn.Linear):
    """A subclass whose forward is not nn.Linear's: it must not be run as a plain linear layer."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("model, problem_text", [
    (Conv4(1, 5, hidden=8, image_size=16), "running statistics"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "LayerNorm"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "ungrouped"),
    (nn.Sequential(ScaledLinear(4, 4)), "ScaledLinear holds"),
    # parameter-free, but mixing the features of one example, hence the packed tasks' (a loss after
    # LogSoftmax differed from the loop's by 1.4 before these were refused):
    (nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), "LogSoftmax"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4, affine=False)), "GroupNorm"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.LocalResponseNorm(2)), "LocalResponseNorm"),
    # a flatten from the batch dimension on, or from a negative start_dim that reaches it on a 2-d input
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(start_dim=0)), "Flatten"),
    (nn.Sequential(nn.Linear(4, 3), nn.Flatten(start_dim=-2)), "Flatten"),
])
def test_layers_without_a_batched_form_are_refused_when_the_learner_is_built(model, problem_text):
    with pytest.raises(ValueError, match=problem_text):
        MAML(model, 0.1, 1, tasks_at_once=2)
    MAML(model, 0.1, 1)                                    # one task at a time takes any model


@pytest.mark.parametrize("pool", [nn.MaxPool1d(3, stride=1, padding=1), nn.AvgPool1d(3, stride=1, padding=1),
                                  nn.AdaptiveAvgPool1d(2)])
def test_pooling_without_a_channel_dimension_is_refused_rather_than_run_across_the_tasks(pool):
    # on (batch, tasks·features) PyTorch reads one unbatched example and pools along the packed features:
    # the tasks' features would meet in one window (a max differed from the loop's by 0.47 before this was refused)
    model = nn.Sequential(nn.Linear(4, 6), pool)
    with pytest.raises(ValueError, match="channel dimension"):
        task_batched(model)(torch.randn(3, 5, 4))


def test_layers_with_forward_hooks_are_refused_rather_than_run_without_them():
    # a hook that doubled a layer's output changed the meta-gradient by half of its norm before this was refused
    hooked = MLP(4, (8,), 2)
    hooked[1].register_forward_hook(lambda module, inputs, output: 2 * output)
    normed = MLP(4, (8,), 2)
    nn.utils.spectral_norm(normed[1])
    for model in (hooked, normed):
        with pytest.raises(ValueError, match="Linear has forward (pre-)?hooks"):
            MAML(model, 0.1, 1, tasks_at_once=2)


def test_layers_with_backward_hooks_are_refused_rather_than_run_without_them():
    # a hook that scaled a layer's gradient tenfold was dropped, and scaled the loop's meta-gradient only
    grad_hooked, pre_hooked = MLP(4, (8,), 2), MLP(4, (8,), 2)
    grad_hooked[1].register_full_backward_hook(lambda module, grad_input, grad_output: (10 * grad_input[0],))
    pre_hooked[1].register_full_backward_pre_hook(lambda module, grad_output: (10 * grad_output[0],))
    for model, kind in ((grad_hooked, "backward hooks"), (pre_hooked, "backward pre-hooks")):
        with pytest.raises(ValueError, match=f"Linear has {kind}"):
            MAML(model, 0.1, 1, tasks_at_once=2)


@pytest.mark.parametrize("learner", ["maml", "reptile", "evaluate"])
def test_a_summed_loss_is_refused_when_tasks_run_together(learner):
    # T tasks together take the mean over all their examples times T: a summed loss would make every
    # inner step T times larger (the meta-gradient differed from the loop's 170-fold before this was refused)
    model, tasks, _, lr = problem("conv4")
    summed = lambda out, y: F.cross_entropy(out, y, reduction="sum")        # noqa: E731
    runs = {"maml": lambda: MAML(model, lr, 1, loss_fn=summed, tasks_at_once=2).meta_backward(tasks),
            "reptile": lambda: Reptile(model, lr, 1, 1.0, loss_fn=summed, tasks_at_once=2).meta_step(tasks),
            "evaluate": lambda: adapt_and_evaluate(model, tasks, summed, 1, lr, tasks_at_once=2)}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="must be the plain mean over its examples"):
        runs[learner]()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    smoothed = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)  # noqa: E731
    MAML(model, lr, 1, loss_fn=smoothed, tasks_at_once=2).meta_backward(tasks)          # a mean: accepted
    MAML(model, lr, 1, loss_fn=nn.CrossEntropyLoss(), tasks_at_once=2).meta_backward(tasks)
    # A class-weighted mean divides by the weights of all the tasks together, not task by task.
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="the mean of two halves' losses is"):
        MAML(model, lr, 1, loss_fn=weighted, tasks_at_once=2).meta_backward(tasks)
    unhashable = Smoothed(0.1)                                                          # checked every time
    for _ in range(2):
        MAML(model, lr, 1, loss_fn=unhashable, tasks_at_once=2).meta_backward(tasks)


def test_a_weighted_mean_loss_is_refused_on_support_sets_of_one_example():
    # the weighted mean of one example is its loss: the check saw a plain mean, while tasks run together divided by
    # the weights of all their support examples, and the meta-gradient differed from the loop's
    torch.manual_seed(0)
    support_y = torch.arange(4)[:, None] % 3                                # a different class for each task's one
    tasks = Episode(torch.randn(4, 1, 5, dtype=torch.float64), support_y, torch.randn(4, 6, 5, dtype=torch.float64),
                    torch.arange(3).repeat_interleave(2).repeat(4, 1), torch.arange(3).repeat(4, 1))
    model = MLP(5, (8,), 3).double()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="the mean of two halves' losses is"):
        MAML(model, 0.5, 1, loss_fn=weighted, tasks_at_once=2).meta_backward(tasks)
    MAML(model, 0.5, 1, tasks_at_once=2).meta_backward(tasks)                      # a plain mean: accepted


def test_a_weighted_mean_loss_is_refused_whatever_the_order_of_the_support_examples():
    # Interleaved labels put every class in both halves of the examples, whose weighted means then average to the
    # whole's: the examples are sorted by label before they are halved.
    torch.manual_seed(0)
    interleaved = torch.arange(3).repeat(2).repeat(4, 1)                                 # [0, 1, 2, 0, 1, 2]
    tasks = Episode(torch.randn(4, 6, 5, dtype=torch.float64), interleaved, torch.randn(4, 6, 5, dtype=torch.float64),
                    interleaved, torch.arange(3).repeat(4, 1))
    model = MLP(5, (8,), 3).double()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="the mean of two halves' losses is"):
        MAML(model, 0.5, 1, loss_fn=weighted, tasks_at_once=2).meta_backward(tasks)
    MAML(model, 0.5, 1, tasks_at_once=2).meta_backward(tasks)                          # a plain mean: accepted


@dataclasses.dataclass
class Smoothed:
    """A loss object that cannot be hashed (a dataclass with equality)."""

    smoothing: float

    def __call__(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=self.smoothing)


def test_masked_layers_are_refused_rather_than_run_with_a_frozen_mask():
    model = MLP(4, (8,), 2)
    attach_masks(model)
    with pytest.raises(ValueError, match="parametrized"):
        task_batched(model)


def test_bad_tasks_at_once_and_unflattened_linear_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="tasks_at_once"):
        MAML(MLP(1, (4,), 1), 0.1, 1, tasks_at_once=0)
    with pytest.raises(ValueError, match="tasks_at_once"):
        MAML(MLP(1, (4,), 1), 0.1, 1, tasks_at_once=True)            # a flag, not a count
    with pytest.raises(ValueError, match="tasks_at_once"):
        Reptile(MLP(1, (4,), 1), 0.1, 1, 0.5, tasks_at_once=0)
    with pytest.raises(ValueError, match="running statistics"):
        Reptile(Conv4(1, 5, hidden=8, image_size=16), 0.1, 1, 0.5, tasks_at_once=2)
    batched = task_batched(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="flatten"):
        batched(torch.randn(2, 4, 5, 3))


class Squeezed(nn.Module):
    """A regression network whose forward squeezes its one output: ``(B,)`` for one task."""

    def __init__(self):
        super().__init__()
        self.body = MLP(1, (8,), 1)

    def forward(self, x):
        return self.body(x).squeeze(-1)


@pytest.mark.parametrize("tasks_at_once", [2, 5])
def test_a_forward_that_reshapes_its_output_by_its_sizes_is_refused_rather_than_broadcast(tasks_at_once):
    batch = regression(tasks=3)
    batch = batch._replace(support_y=batch.support_y.squeeze(-1), query_y=batch.query_y.squeeze(-1))
    torch.manual_seed(0)
    model = Squeezed().double()
    maml = MAML(model, 0.01, 1, loss_fn=F.mse_loss, tasks_at_once=tasks_at_once)
    with pytest.raises(ValueError, match=r"squeeze|shape \(5,\)"):
        maml.meta_backward(batch)
    assert all(p.grad is None for p in model.parameters())
    MAML(model, 0.01, 1, loss_fn=F.mse_loss).meta_backward(batch)       # one task at a time: fine
    with pytest.raises(ValueError, match="squeeze"):                    # a group of one task alone
        task_batched(model)(batch.support_x[:1])


def test_weights_stacked_for_another_number_of_tasks_are_refused_rather_than_grouped_wrongly():
    # weights for 3 tasks on inputs of 4: the 3·8 filters ran as 4 groups of 6, and 4 tasks of 6 channels came out
    model = nn.Sequential(nn.Conv2d(1, 8, 3))
    params = {name: p.detach().expand(3, *p.shape) for name, p in parameters_of(model).items()}
    with pytest.raises(ValueError, match="weights for 3 tasks and inputs of 4 tasks"):
        run(task_batched(model), params, torch.randn(4, 2, 1, 7, 7))


@pytest.mark.parametrize("per_task", [("weight",), ("bias",), ("weight", "bias")])
@pytest.mark.parametrize("layer, x", [(nn.Linear(5, 3), torch.randn(3, 2, 5)),
                                      (nn.Conv2d(1, 8, 3), torch.randn(3, 2, 1, 7, 7))])
def test_parameters_of_one_task_are_refused_on_inputs_of_several_rather_than_broadcast(layer, x, per_task):
    # a Linear broadcast weights or biases stacked for one task over all 3 tasks; a Conv2d refused biases with torch's
    # error about the grouped convolution, or failed adding them
    model = nn.Sequential(layer)
    params = {name: p.detach()[None] if name.split(".")[-1] in per_task else p.detach()
              for name, p in parameters_of(model).items()}
    with pytest.raises(ValueError, match="for 1 tasks and inputs of 3 tasks"):
        run(task_batched(model), params, x)


class ScaledConv2d(nn.Conv2d):
    """A convolution subclass whose forward is not nn.Conv2d's: it must not be run as a plain convolution."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_conv_subclass_with_its_own_forward_is_refused():
    # task_batched converts exact types only: run as TaskConv2d, the doubling in forward would be lost
    with pytest.raises(ValueError, match=r"ScaledConv2d holds \['weight', 'bias'\] and has no task-batched form"):
        task_batched(nn.Sequential(ScaledConv2d(1, 2, 3)))


def test_a_parameter_free_leaf_model_is_copied_and_the_users_layer_left_as_it_is():
    # task_batched docstring: it "leaves model itself unchanged"; a ReLU is shared as it is inside a container,
    # so as the root it must be copied before the copy's class becomes the task-batched one
    relu = nn.ReLU()
    x = torch.randn(4, 5)
    batched = task_batched(relu)
    assert torch.equal(relu(x), x.clamp(min=0))                  # still takes a plain batch (B, features)
    assert batched is not relu and type(relu) is nn.ReLU
    tasks = torch.randn(3, 4, 5)
    assert torch.equal(batched(tasks), tasks.clamp(min=0))       # the copy takes (T, B, features)


class Normalised(nn.Module):
    """A block holding a buffer of its own beside a convolution child."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x - self.mean)


def test_a_container_holding_a_buffer_of_its_own_is_refused_by_the_buffers_name():
    # task_batched docstring: a layer with buffers and no task-batched form is refused; a container's own buffer
    # counts too, though its child (a Conv2d) has a task-batched form
    with pytest.raises(ValueError, match=r"Normalised holds \['mean'\] and has no task-batched form"):
        task_batched(nn.Sequential(Normalised()))
