import copy

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.cost import saved_tensor_bytes
from lowlearn.data.episodes import Episode, random_episodes
from lowlearn.data.tasks import RegressionBatch, SinusoidTasks
from lowlearn.meta import ANIL, MAML, MetaSGD, Reptile, adapt_and_evaluate, head_names, run
from lowlearn.meta.episodic import meta_train
from lowlearn.meta.functional import inner_loop, parameters_of
from lowlearn.meta.maml import check_tasks
from lowlearn.models import MLP, Conv4


def episodes(tasks=3, dtype=torch.float64):
    """3-way 2-shot episodes of random 16×16 images, 3 queries per class."""
    return random_episodes(tasks, 3, 2, 3, image_size=16, dtype=dtype)


def regression(tasks=3, seed=0):
    batch = SinusoidTasks().sample(tasks, 5, 7, generator=torch.Generator().manual_seed(seed))
    return RegressionBatch(*(t.double() for t in batch))


def fine_tuned(model, x, y, lr, steps, loss_fn=F.mse_loss, parameters=None):
    """A copy of ``model`` after ``steps`` plain SGD steps on ``(x, y)`` (of ``parameters(copy)`` only, if given)."""
    tuned = copy.deepcopy(model)
    opt = torch.optim.SGD(tuned.parameters() if parameters is None else parameters(tuned), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(tuned(x), y).backward()
        opt.step()
    return tuned


def higher_meta_gradient(model, tasks, inner_lr, steps, loss_fn, first_order=False, adapted=None):
    """The reference: the same meta-gradient computed with higher's differentiable SGD (over ``adapted`` only)."""
    model.zero_grad()
    inner = torch.optim.SGD(model.parameters() if adapted is None else adapted(model), lr=inner_lr)
    count = tasks.support_x.shape[0]
    for j in range(count):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(tasks.support_x[j]), tasks.support_y[j]))
            (loss_fn(fmodel(tasks.query_x[j]), tasks.query_y[j]) / count).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_maml_meta_gradient_equals_higher(kind, steps):
    torch.manual_seed(0)
    if kind == "mlp":
        model, tasks, loss_fn, lr = MLP(1, (40, 40), 1).double(), regression(), F.mse_loss, 0.01
    else:
        model, tasks, loss_fn, lr = Conv4(1, 3, hidden=8, image_size=16, running_stats=False).double(), episodes(), \
            F.cross_entropy, 0.4
    reference = higher_meta_gradient(copy.deepcopy(model), tasks, lr, steps, loss_fn)
    maml = MAML(model, lr, steps, loss_fn=loss_fn)
    maml.meta_backward(tasks)
    for (name, p), ref in zip(model.named_parameters(), reference):
        assert torch.allclose(p.grad, ref, rtol=1e-8, atol=1e-12), name
        assert ref.abs().sum() > 0


def test_first_order_is_the_query_gradient_at_the_adapted_weights():
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    tasks = regression(2)
    maml = MAML(model, 0.05, 3, first_order=True, loss_fn=F.mse_loss)
    maml.meta_backward(tasks)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for j in range(2):
        adapted = fine_tuned(model, tasks.support_x[j], tasks.support_y[j], 0.05, 3)
        adapted.zero_grad()
        F.mse_loss(adapted(tasks.query_x[j]), tasks.query_y[j]).backward()
        for e, p in zip(expected, adapted.parameters()):
            e += p.grad / 2
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, rtol=1e-10)
    # ... and differs from the second-order meta-gradient.
    second = MAML(copy.deepcopy(model), 0.05, 3, loss_fn=F.mse_loss)
    second.model.zero_grad()
    second.meta_backward(tasks)
    assert not all(torch.allclose(a.grad, b.grad) for a, b in zip(model.parameters(), second.model.parameters()))


def test_anil_adapts_only_the_head_and_matches_higher_on_it():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=8, image_size=16, running_stats=False).double()
    assert head_names(model) == ["head.weight", "head.bias"]
    anil = ANIL(model, 0.4, 2)
    tasks = episodes()
    params = anil.adapt(tasks.support_x[0], tasks.support_y[0])
    for name, p in model.named_parameters():
        assert (params[name] is p) == (not name.startswith("head"))
    reference = higher_meta_gradient(copy.deepcopy(model), tasks, 0.4, 2, F.cross_entropy,
                                     adapted=lambda m: m.head.parameters())
    anil.meta_backward(tasks)
    for (name, p), ref in zip(model.named_parameters(), reference):      # second order through the head's steps
        assert torch.allclose(p.grad, ref, rtol=1e-8, atol=1e-12), name
        assert ref.abs().sum() > 0, name


def test_meta_sgd_learning_rates_receive_gradients_and_are_used():
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    metasgd = MetaSGD(model, 0.01, 1, loss_fn=F.mse_loss)
    assert len(list(metasgd.parameters())) == 2 * len(list(model.parameters()))
    tasks = regression()
    metasgd.meta_backward(tasks)
    for rate in metasgd.lrs:
        assert rate.grad is not None and rate.grad.abs().sum() > 0
    # With every rate equal to α, Meta-SGD's adaptation is MAML's.
    maml = MAML(model, 0.01, 1, loss_fn=F.mse_loss)
    a = metasgd.adapt(tasks.support_x[0], tasks.support_y[0])
    b = maml.adapt(tasks.support_x[0], tasks.support_y[0])
    assert all(torch.allclose(a[n], b[n]) for n in a)
    # Rates that differ per element: θ' = θ − α ⊙ ∇L_support, and ∂L_query/∂α = −∇L_query(θ') ⊙ ∇L_support(θ).
    with torch.no_grad():
        for rate in metasgd.lrs:
            rate.uniform_(0.005, 0.02, generator=torch.Generator().manual_seed(1))
    metasgd.zero_grad()
    metasgd.meta_backward(tasks)
    params = dict(model.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    rates = dict(zip(metasgd.adapt_names, metasgd.lrs))
    for j in range(3):
        support = torch.autograd.grad(F.mse_loss(run(model, params, tasks.support_x[j]), tasks.support_y[j]),
                                      list(params.values()))
        adapted = {name: (p - rates[name] * g).detach().requires_grad_()
                   for (name, p), g in zip(params.items(), support)}
        assert all(torch.allclose(metasgd.adapt(tasks.support_x[j], tasks.support_y[j])[name], adapted[name])
                   for name in adapted)
        query = torch.autograd.grad(F.mse_loss(run(model, adapted, tasks.query_x[j]), tasks.query_y[j]),
                                    list(adapted.values()))
        for (name, g_s), g_q in zip(zip(params, support), query):
            expected[name] -= g_q * g_s / 3
    for name, rate in rates.items():
        assert torch.allclose(rate.grad, expected[name], rtol=1e-8, atol=1e-14), name


def test_meta_sgd_evaluation_keeps_no_graph_through_the_learned_rates():
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    metasgd = MetaSGD(model, 0.01, 3, loss_fn=F.mse_loss)
    maml = MAML(model, 0.01, 3, loss_fn=F.mse_loss)      # the same rates, as plain numbers
    tasks = regression()
    peaks = []
    for learner in (metasgd, maml):
        with saved_tensor_bytes(exclude=[*metasgd.parameters(), *tasks]) as saved:
            stats = learner.evaluate(tasks)
        peaks.append(saved.peak)
    assert peaks[0] == peaks[1]
    assert torch.allclose(stats["per_task_loss"], metasgd.evaluate(tasks)["per_task_loss"])
    assert all(rate.grad is None for rate in metasgd.lrs)


def test_reptile_update_on_quadratics_equals_its_definition():
    # Task j: L_j(θ) = ½‖θ − c_j‖² (the "model" returns θ; the loss ignores its input).
    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))

        def forward(self, x):
            return self.theta.expand(x.shape[0], 3)

    centres = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0]], dtype=torch.float64)
    loss_fn = lambda out, c: 0.5 * ((out[0] - c[0]) ** 2).sum()            # noqa: E731
    tasks = RegressionBatch(torch.zeros(2, 1, 1), centres[:, None, :], torch.zeros(2, 1, 1), centres[:, None, :],
                            torch.zeros(2), torch.zeros(2))
    model = Point()
    theta = model.theta.detach().clone()
    alpha, k, eps = 0.1, 4, 0.5
    Reptile(model, alpha, k, eps, loss_fn).meta_step(tasks)
    # k SGD steps on ½‖θ − c‖²: θ̃ = c + (1 − α)^k (θ − c).
    adapted = centres + (1 - alpha) ** k * (theta - centres)
    expected = theta + eps * (adapted - theta).mean(0)
    assert torch.allclose(model.theta, expected, rtol=1e-12)


@pytest.mark.parametrize("tasks_at_once", [1, 2])
def test_reptile_trains_on_tasks_without_query_sets(tasks_at_once):
    # Reptile uses support sets only, so episodes sampled with queries=0 give the update they give with queries.
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False).double()
    with_queries = episodes()
    without = with_queries._replace(query_x=with_queries.query_x[:, :0], query_y=with_queries.query_y[:, :0])
    updated = {}
    for name, tasks in (("with", with_queries), ("without", without)):
        learner = copy.deepcopy(model)
        Reptile(learner, 0.1, 2, 0.5, tasks_at_once=tasks_at_once).meta_step(tasks)
        updated[name] = list(learner.parameters())
    assert all(torch.equal(a, b) for a, b in zip(updated["with"], updated["without"]))
    assert not torch.equal(updated["with"][0], next(model.parameters()))
    with pytest.raises(ValueError, match="the query set is empty"):              # MAML scores the query sets
        MAML(model, 0.1, 1).meta_backward(without)


def test_meta_training_lowers_the_query_loss():
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)
    maml = MAML(model, 0.01, 1, loss_fn=F.mse_loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler, generator = SinusoidTasks(), torch.Generator().manual_seed(0)
    test = sampler.sample(50, 10, 10, generator=torch.Generator().manual_seed(99))
    before = maml.evaluate(test, steps=5)["loss"].item()
    for _ in range(400):
        maml.meta_step(sampler.sample(10, 10, 10, generator=generator), optimizer)
    after = maml.evaluate(test, steps=5)["loss"].item()
    assert after < 0.75 * before


def test_bad_input():
    model = MLP(1, (8,), 3)
    with pytest.raises(ValueError, match="0 inner steps has no inner update"):
        MAML(model, 0.1, 0)
    MAML(model, 0.1, 0, first_order=True)
    with pytest.raises(ValueError, match="unknown parameters in adapt"):
        MAML(model, 0.1, 1, adapt=["nope"])
    with pytest.raises(ValueError, match=r"adapt names \['3.bias'\] more than once"):
        MAML(model, 0.1, 1, adapt=["3.bias", "3.bias"])
    maml = MAML(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.4, 1)
    tasks = episodes(dtype=torch.float32)
    bad = tasks._replace(query_y=tasks.query_y + 3)
    with pytest.raises(ValueError, match=r"labels must be in 0 .. 2 for a 3-way model"):
        maml.meta_backward(bad)
    with pytest.raises(ValueError, match="support set has 6 inputs but 5 targets"):
        maml.meta_backward(tasks._replace(support_y=tasks.support_y[:, :5]))
    with pytest.raises(ValueError, match="must be the same task"):
        maml.meta_backward(tasks._replace(query_x=tasks.query_x[..., :8, :8]))
    with pytest.raises(ValueError, match="query set has 9 inputs but 5 targets"):
        maml.meta_backward(tasks._replace(query_y=tasks.query_y[:, :5]))
    with pytest.raises(ValueError, match=r"support targets have shape \(\) per example but query targets \(2,\)"):
        maml.meta_backward(tasks._replace(query_y=tasks.query_y.unsqueeze(-1).expand(-1, -1, 2)))
    # Support labels are checked before the inner loop uses them, at meta-training and at evaluation;
    # -100 is cross_entropy's ignore_index, which would drop the example without a word.
    for support_y in (tasks.support_y + 3, tasks.support_y.masked_fill(tasks.support_y == 0, -100)):
        for call in (maml.meta_backward, maml.evaluate):
            with pytest.raises(ValueError, match=r"labels must be in 0 .. 2 for a 3-way model"):
                call(tasks._replace(support_y=support_y))
    no_tasks = tasks._replace(support_x=tasks.support_x[:0], support_y=tasks.support_y[:0],
                              query_x=tasks.query_x[:0], query_y=tasks.query_y[:0])
    for bad_count in (tasks._replace(query_y=tasks.query_y[:1]), no_tasks):
        with pytest.raises(ValueError, match="same number of tasks"):
            maml.meta_backward(bad_count)
    no_support = tasks._replace(support_x=tasks.support_x[:, :0], support_y=tasks.support_y[:, :0])
    for call in (maml.meta_backward, maml.evaluate):
        with pytest.raises(ValueError, match="support sets are empty"):
            call(no_support)
    no_queries = tasks._replace(query_x=tasks.query_x[:, :0], query_y=tasks.query_y[:, :0])
    for call in (maml.meta_backward, maml.evaluate):
        with pytest.raises(ValueError, match="query set is empty"):
            call(no_queries)
    one = tasks._replace(**{name: getattr(tasks, name)[0] for name in tasks._fields})    # no task dimension
    for call in (maml.meta_backward, maml.evaluate):
        with pytest.raises(ValueError, match="no task dimension: stack the tasks along dimension 0"):
            call(one)
    for bad_lr in (0, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="inner_lr must be a positive, finite step size"):
            MAML(model, bad_lr, 1)
        with pytest.raises(ValueError, match="inner_lr must be a positive, finite step size"):
            Reptile(model, bad_lr, 1, 1.0)
        with pytest.raises(ValueError, match="outer_lr must be a positive, finite step size"):
            Reptile(model, 0.1, 1, bad_lr)
    for call in (lambda: maml.evaluate(tasks, steps=-1), lambda: maml.adapt(tasks.support_x[0], tasks.support_y[0],
                                                                            steps=-3)):
        with pytest.raises(ValueError, match=r"steps \(inner steps\) must be an int >= 0"):
            call()


def test_a_parameter_the_loss_does_not_use_is_named():
    class WithSpareHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)

    tasks = Episode(torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6)), torch.randn(2, 6, 4),
                    torch.randint(0, 3, (2, 6)), torch.arange(3).expand(2, 3))
    for learner in (MAML(WithSpareHead(), 0.1, 1), Reptile(WithSpareHead(), 0.1, 1, 1.0)):
        step = learner.meta_backward if isinstance(learner, MAML) else learner.meta_step
        with pytest.raises(ValueError, match=r"does not use the parameters \['spare.weight', 'spare.bias'\]"):
            step(tasks)


def test_adapt_checks_its_support_set_and_leaves_the_running_statistics_alone():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16).double()               # with running statistics, in train mode
    maml, tasks = MAML(model, 0.4, 1), episodes()
    before = copy.deepcopy(model.state_dict())
    adapted = maml.adapt(tasks.support_x[0], tasks.support_y[0])
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert any(not torch.equal(adapted[name], p) for name, p in parameters_of(model).items())
    with pytest.raises(ValueError, match="labels must be in 0 .. 2"):
        maml.adapt(tasks.support_x[0], tasks.support_y[0].masked_fill(tasks.support_y[0] == 0, -100))
    with pytest.raises(ValueError, match="the support set is empty, so the inner loop has nothing to adapt to"):
        maml.adapt(tasks.support_x[0, :0], tasks.support_y[0, :0])


def test_a_meta_step_under_no_grad_still_takes_its_meta_gradient():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False).double()
    maml, tasks = MAML(model, 0.4, 1), episodes()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        maml.meta_step(tasks, optimizer)
    assert any(not torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_label_values_are_read_only_on_the_cpu():
    # On an accelerator, reading labels would make every meta-step wait for the device. Tensors on the meta
    # device have no values: reading them, or running the model on them, raises.
    maml = MAML(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.4, 1)
    tasks = episodes(dtype=torch.float32)
    bad = tasks._replace(query_y=tasks.query_y + 3)
    with pytest.raises(ValueError, match="labels must be in"):
        check_tasks(maml.model, parameters_of(maml.model), bad)
    on_meta = bad._replace(**{name: getattr(bad, name).to("meta") for name in bad._fields})
    check_tasks(maml.model, parameters_of(maml.model), on_meta)
    with pytest.raises(ValueError, match="support set has 6 inputs but 5 targets"):       # shapes are still checked
        check_tasks(maml.model, parameters_of(maml.model), on_meta._replace(support_y=on_meta.support_y[:, :5]))


def test_regression_targets_that_would_broadcast_the_outputs_are_refused():
    maml = MAML(MLP(1, (8,), 1).double(), 0.01, 1, loss_fn=F.mse_loss)
    tasks = regression(2)
    flat = tasks._replace(support_y=tasks.support_y.squeeze(-1), query_y=tasks.query_y.squeeze(-1))
    for call in (maml.meta_backward, maml.evaluate):
        with pytest.raises(ValueError, match=r"targets of a query set have shape \(7,\) but the model's outputs "
                                             r"\(7, 1\): a loss would broadcast them to \(7, 7\)"):
            call(flat)
    for call in (lambda: Reptile(maml.model, 0.01, 1, 0.5, F.mse_loss).meta_step(flat),   # Reptile's only set
                 lambda: maml.adapt(flat.support_x[0], flat.support_y[0])):
        with pytest.raises(ValueError, match=r"targets of a support set have shape \(5,\) but the model's outputs "
                                             r"\(5, 1\): a loss would broadcast them to \(5, 5\)"):
            call()
    gaussian = MAML(MLP(1, (8,), 2).double(), 0.01, 1, loss_fn=lambda out, y: F.gaussian_nll_loss(
        out[..., :1], y, out[..., 1:].exp()))                        # mean and log-variance: (K, 2) against (K, 1)
    gaussian.meta_backward(tasks)


def test_adapt_and_evaluate_matches_plain_fine_tuning_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    tasks = regression(2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = Reptile(model, 0.05, 3, 1.0, F.mse_loss).evaluate(tasks)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    expected = []
    for j in range(2):
        tuned = fine_tuned(model, tasks.support_x[j], tasks.support_y[j], 0.05, 3)
        with torch.no_grad():
            expected.append(F.mse_loss(tuned(tasks.query_x[j]), tasks.query_y[j]))
        assert torch.allclose(stats["per_task_loss"][j], expected[j])
    assert torch.allclose(stats["loss"], (expected[0] + expected[1]) / 2)        # the mean over the tasks


def test_adapt_and_evaluate_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16)                 # with running statistics, in training mode
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    MAML(model, 0.1).evaluate(episodes(dtype=torch.float32), steps=2)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


class _Tasks:
    """A sampler of sinusoid tasks in float64 for meta_train."""

    def __init__(self, sinusoids):
        self.float32 = sinusoids.sampler(5, 5, generator=torch.Generator().manual_seed(0))

    def sample(self, batch):
        return RegressionBatch(*(t.double() for t in self.float32.sample(batch)))


def test_reptile_in_meta_train_with_sgd_takes_its_own_update():
    # With an optimizer, Reptile hands it θ − mean θ̃ as the gradient: SGD at rate ε is the update of the paper.
    torch.manual_seed(0)
    model = MLP(1, (16,), 1).double()
    tasks = regression(3)
    reference = copy.deepcopy(model)
    Reptile(reference, 0.05, 3, 0.5, F.mse_loss).meta_step(tasks)
    stats = Reptile(model, 0.05, 3, 0.5, F.mse_loss).meta_step(tasks, torch.optim.SGD(model.parameters(), lr=0.5))
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(model.parameters(), reference.parameters()))
    sampler = SinusoidTasks()
    losses = meta_train(Reptile(model, 0.05, 3, 0.5, F.mse_loss), _Tasks(sampler), torch.optim.Adam(
        model.parameters(), lr=1e-3), steps=4, log_every=2)
    assert len(losses) == 2 and stats["loss"] > 0
    with pytest.raises(ValueError, match=r"inner_steps \(Reptile needs at least one\) must be an int >= 1; got 0"):
        Reptile(model, 0.05, 0, 0.5, F.mse_loss)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="inner_steps must be an int >= 0"):
            MAML(model, 0.05, bad)
    for kwargs, name in ((dict(steps=-1), "steps"), (dict(steps=4, batch=0), "batch"),
                         (dict(steps=4, log_every=True), "log_every")):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            meta_train(Reptile(model, 0.05, 3, 0.5, F.mse_loss), _Tasks(sampler), None, **kwargs)


def test_adapt_and_evaluate_reports_each_tasks_accuracy():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False)
    tasks = episodes(tasks=4, dtype=torch.float32)
    stats = MAML(model, 0.1).evaluate(tasks, steps=2)
    per_task = stats["per_task_accuracy"]
    assert per_task.shape == (4,) and torch.allclose(per_task.mean(), stats["accuracy"])
    # one task alone gets the same accuracy as within the batch
    one = type(tasks)(*(field[2:3] for field in tasks))
    assert torch.equal(MAML(model, 0.1).evaluate(one, steps=2)["per_task_accuracy"], per_task[2:3])
    assert "per_task_accuracy" not in MAML(MLP(1, (8,), 1).double(), 0.01, loss_fn=F.mse_loss).evaluate(regression(2))


class _Episodes:
    """A sampler of the fixed episodes for meta_train."""

    def sample(self, batch):
        return episodes(tasks=batch, dtype=torch.float32)


def test_meta_train_records_the_statistic_asked_for():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False)
    reference = copy.deepcopy(model)
    accuracies = meta_train(MAML(model, 0.1), _Episodes(), torch.optim.Adam(model.parameters(), lr=1e-3), 4,
                            batch=2, log_every=2, record="accuracy")
    maml, optimizer, expected = MAML(reference, 0.1), torch.optim.Adam(reference.parameters(), lr=1e-3), []
    for _ in range(4):                                                    # written out
        expected.append(maml.meta_step(episodes(tasks=2, dtype=torch.float32), optimizer)["accuracy"].item())
    assert accuracies == pytest.approx([sum(expected[:2]) / 2, sum(expected[2:]) / 2])
    with pytest.raises(KeyError, match=r"Reptile.meta_step reports \['loss'\], not 'accuracy'"):
        meta_train(Reptile(model, 0.05, 1, 0.5), _Episodes(), None, 1, record="accuracy")

    class Diverged:                                       # a NaN loss is caught whatever is recorded
        def meta_step(self, tasks, optimizer):
            return {"loss": torch.tensor(float("nan")), "accuracy": torch.tensor(0.2)}

    with pytest.raises(FloatingPointError, match="loss became nan by step 2; lower the learning rate, or check the ep"):
        meta_train(Diverged(), _Episodes(), None, 3, log_every=2, record="accuracy")


def test_frozen_parameters_are_used_but_neither_adapted_nor_meta_trained():
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    for p in model[1].parameters():                                     # a frozen first layer
        p.requires_grad_(False)
    frozen = [p.clone() for p in model[1].parameters()]
    tasks = regression(3)
    maml = MAML(model, 0.01, 2, loss_fn=F.mse_loss)
    assert maml.adapt_names == ["3.weight", "3.bias", "5.weight", "5.bias"]
    maml.meta_backward(tasks)
    assert all(p.grad is None for p in model[1].parameters()) and model[3].weight.grad is not None
    Reptile(model, 0.05, 3, 0.5, F.mse_loss).meta_step(tasks)
    Reptile(model, 0.05, 3, 0.5, F.mse_loss, tasks_at_once=3).meta_step(tasks)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[1].parameters()))
    by_default = adapt_and_evaluate(model, tasks, F.mse_loss, 3, 0.05)["per_task_loss"]   # frozen: not fine-tuned
    assert torch.equal(by_default, Reptile(model, 0.05, 3, 0.5, F.mse_loss).evaluate(tasks)["per_task_loss"])
    with pytest.raises(ValueError, match=r"adapt names frozen parameters .*\['1.weight'\]"):
        MAML(model, 0.01, 1, adapt=["1.weight", "3.weight"])
    with pytest.raises(ValueError, match=r"adapt names frozen parameters .*\['1.weight'\]"):
        adapt_and_evaluate(model, tasks, F.mse_loss, 3, 0.05, adapt=["1.weight", "3.weight"])


def test_an_empty_adapt_list_is_refused_when_there_are_inner_steps():
    model = MLP(1, (8,), 1).double()
    with pytest.raises(ValueError, match="nothing adapts in the inner loop"):
        MAML(model, 0.01, 1, adapt=[])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing adapts in the inner loop"):
        MAML(model, 0.01, 1)
    with pytest.raises(ValueError, match="nothing adapts in the inner loop"):
        adapt_and_evaluate(model, regression(2), F.mse_loss, 1, 0.01)
    MAML(model, 0.01, 0, first_order=True, adapt=[])             # no inner steps: nothing needs to adapt


def test_inference_mode_is_refused_with_the_advice_to_use_no_grad():
    maml = MAML(MLP(1, (8,), 1).double(), 0.01, 1, loss_fn=F.mse_loss)
    tasks = regression(2)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) forbids: evaluate under torch.no_grad"):
            maml.evaluate(tasks)
        with pytest.raises(RuntimeError, match="inference_mode"):
            maml.adapt(tasks.support_x[0], tasks.support_y[0])
        maml.evaluate(tasks, steps=0)                              # no adaptation, no gradient needed


def test_reptile_checks_its_tasks_and_leaves_only_the_inner_steps_in_the_running_statistics():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16).double()           # batch norm with running statistics
    tasks = episodes(1)
    probe = copy.deepcopy(model)
    inner = torch.optim.SGD(probe.parameters(), lr=0.1)             # the one inner step, by hand
    inner.zero_grad()
    F.cross_entropy(probe(tasks.support_x[0]), tasks.support_y[0]).backward()
    Reptile(model, 0.1, 1, 0.5).meta_step(tasks)
    for (name, b), expected in zip(model.named_buffers(), probe.buffers()):
        torch.testing.assert_close(b, expected, msg=name)
    with pytest.raises(ValueError, match="the support sets are empty"):
        Reptile(model, 0.1, 1, 0.5).meta_step(tasks._replace(support_x=tasks.support_x[:, :0],
                                                             support_y=tasks.support_y[:, :0]))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing adapts in the inner loop"):     # not a silent no-op
        Reptile(model, 0.1, 1, 0.5).meta_step(tasks)


def test_adapt_works_under_no_grad():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1).double()
    maml = MAML(model, 0.01, 2, loss_fn=F.mse_loss)
    tasks = regression(1)
    expected = maml.adapt(tasks.support_x[0], tasks.support_y[0], first_order=True)
    with torch.no_grad():
        adapted = maml.adapt(tasks.support_x[0], tasks.support_y[0], first_order=True)
    assert all(torch.equal(adapted[name].detach(), expected[name].detach()) for name in expected)


def test_meta_backward_reports_the_mean_query_loss_and_accuracy_of_the_adapted_tasks():
    # By hand: each task's copy fine-tuned by plain SGD on its support set, then scored on its query set.
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False).double()
    tasks = episodes(tasks=4)
    stats = MAML(copy.deepcopy(model), 0.4, 2).meta_backward(tasks)
    losses, accuracies = [], []
    for j in range(4):
        tuned = fine_tuned(model, tasks.support_x[j], tasks.support_y[j], 0.4, 2, F.cross_entropy)
        with torch.no_grad():
            out = tuned(tasks.query_x[j])
        losses.append(F.cross_entropy(out, tasks.query_y[j]))
        accuracies.append((out.argmax(-1) == tasks.query_y[j]).double().mean())
    assert torch.allclose(stats["loss"], torch.stack(losses).mean(), rtol=1e-10)
    assert torch.allclose(stats["accuracy"].double(), torch.stack(accuracies).mean(), rtol=1e-6)
    assert stats["accuracy"] > 0


def test_anil_adapts_the_last_linear_layer_of_a_deeper_network_and_nothing_else():
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    assert head_names(model) == ["5.weight", "5.bias"]
    tasks = regression(1)
    params = ANIL(model, 0.01, 2, loss_fn=F.mse_loss).adapt(tasks.support_x[0], tasks.support_y[0])
    for name, p in model.named_parameters():
        assert (params[name] is p) == (not name.startswith("5.")), name
    tuned = fine_tuned(model, tasks.support_x[0], tasks.support_y[0], 0.01, 2, parameters=lambda m: m[5].parameters())
    assert torch.allclose(params["5.weight"], tuned[5].weight, rtol=1e-12)
    assert torch.allclose(params["5.bias"], tuned[5].bias, rtol=1e-12)
    assert not torch.equal(params["5.weight"], model[5].weight)


@pytest.mark.parametrize("tasks_at_once", [1, 3])
def test_reptile_reports_the_mean_support_loss_before_adapting(tasks_at_once):
    torch.manual_seed(0)
    model = MLP(1, (16,), 1).double()
    tasks = regression(3)
    with torch.no_grad():
        expected = torch.stack([F.mse_loss(model(tasks.support_x[j]), tasks.support_y[j]) for j in range(3)]).mean()
    stats = Reptile(model, 0.05, 3, 0.5, F.mse_loss, tasks_at_once=tasks_at_once).meta_step(tasks)
    assert torch.allclose(stats["loss"], expected, rtol=1e-12)


@pytest.mark.parametrize("tasks_at_once", [1, 3])
def test_reptile_runs_the_model_once_per_task_and_inner_step(tasks_at_once, monkeypatch):
    # The reported loss is the inner loop's first: no pass of its own.
    import lowlearn.meta.functional
    import lowlearn.meta.maml

    reptile = Reptile(MLP(1, (16,), 1).double(), 0.05, 2, 0.5, F.mse_loss, tasks_at_once=tasks_at_once)
    reptile.meta_step(regression(3))                  # the first step also runs the shape checks once
    passes = []

    def counted(model, params, x):
        passes.append(x.shape)
        return run(model, params, x)

    for module in (lowlearn.meta.functional, lowlearn.meta.maml):
        monkeypatch.setattr(module, "run", counted)
    reptile.meta_step(regression(3, seed=1))
    assert len(passes) == 3 * 2 // tasks_at_once      # one pass of each group's tasks per inner step


@pytest.mark.parametrize("learner", ["maml", "reptile"])
def test_evaluate_and_adapt_take_the_number_of_steps_asked_for_not_the_meta_training_ones(learner):
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    tasks = regression(2)
    meta = MAML(model, 0.05, 1, loss_fn=F.mse_loss) if learner == "maml" else Reptile(model, 0.05, 1, 0.5, F.mse_loss)
    stats = meta.evaluate(tasks, steps=4)
    for j in range(2):
        tuned = fine_tuned(model, tasks.support_x[j], tasks.support_y[j], 0.05, 4)
        with torch.no_grad():
            assert torch.allclose(stats["per_task_loss"][j], F.mse_loss(tuned(tasks.query_x[j]), tasks.query_y[j]))
    if learner == "maml":
        adapted = meta.adapt(tasks.support_x[1], tasks.support_y[1], steps=4)
        assert all(torch.allclose(adapted[name], p, rtol=1e-12) for name, p in tuned.named_parameters())


def test_a_label_equal_to_the_number_of_ways_is_refused():
    # The +3 labels of test_bad_input lie far outside; a label N of an N-way model is the first one out.
    maml = MAML(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.4, 1)
    tasks = episodes(dtype=torch.float32)
    message = r"labels must be in 0 .. 2 for a 3-way model, got labels from 0 to 3"
    for field in ("support_y", "query_y"):
        labels = getattr(tasks, field)
        bad = tasks._replace(**{field: labels.masked_fill(labels == 2, 3)})           # labels 0, 1 and 3
        for call in (maml.meta_backward, maml.evaluate):
            with pytest.raises(ValueError, match=message):
                call(bad)
    with pytest.raises(ValueError, match=message):
        maml.adapt(tasks.support_x[0], tasks.support_y[0].masked_fill(tasks.support_y[0] == 2, 3))


def test_the_label_check_runs_the_model_once_per_shapes_and_again_for_a_new_head():
    # The labels are checked against the model's output size, found by one pass without gradients; a later step
    # of the same shapes runs only its own passes. Replacing the head changes a weight's shape, so the size is
    # found again, whether the new head has more classes or fewer.
    model = MLP(4, (8,), 3).double()
    maml = MAML(model, 0.1, 1)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    x, y = torch.randn(2, 6, 4, dtype=torch.float64), torch.arange(3).repeat(2, 2)
    tasks = Episode(x, y, x, y, classes=torch.arange(3).repeat(2, 1))
    maml.meta_backward(tasks)
    assert len(passes) == 1 + 2 * 2                         # the check, then per task an inner step and the queries
    passes.clear()
    maml.meta_backward(tasks)
    maml.adapt(x[0], y[0])
    assert len(passes) == 2 * 2 + 1
    wider = tasks._replace(query_y=y + 2)                   # labels up to 4
    with pytest.raises(ValueError, match="labels must be in 0 .. 2 for a 3-way model"):
        maml.meta_backward(wider)
    model[-1] = nn.Linear(8, 5).double()
    maml.meta_backward(wider)
    model[-1] = nn.Linear(8, 3).double()
    with pytest.raises(ValueError, match="labels must be in 0 .. 2 for a 3-way model"):
        maml.meta_backward(wider)


def test_maml_with_running_statistics_batch_norm_in_training_mode_equals_higher():
    """Batch norm that tracks running statistics, in training mode: each pass normalises by its own batch, and the
    running statistics that the inner steps update in place must not enter the meta-gradient."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16).double()                   # running statistics, training mode
    tasks = random_episodes(2, 3, 2, 2, image_size=16, dtype=torch.float64)
    reference = higher_meta_gradient(copy.deepcopy(model), tasks, 0.4, 2, F.cross_entropy)
    MAML(model, 0.4, 2).meta_backward(tasks)
    for p, expected in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
        assert expected.abs().sum() > 0


def test_transductive_batch_norm_in_evaluation_mode_batched_equals_the_loop_and_higher():
    """Batch norm without running statistics normalises by each set's own statistics in evaluation mode too; the
    task-batched path (which always normalises by the batch) must give the per-task loop's meta-gradient."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, running_stats=False).double().eval()
    tasks = random_episodes(3, 3, 2, 2, image_size=16, dtype=torch.float64)
    reference = higher_meta_gradient(copy.deepcopy(model), tasks, 0.4, 2, F.cross_entropy)
    for tasks_at_once in (1, 2, 3):
        learner = copy.deepcopy(model)
        MAML(learner, 0.4, 2, tasks_at_once=tasks_at_once).meta_backward(tasks)
        for p, expected in zip(learner.parameters(), reference):
            torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)


def test_maml_adapt_is_differentiable_to_second_order_in_the_initialisation_as_the_book_says():
    """Reference: on linear regression ``f(x) = wᵀx`` with MSE, ``θ' = θ − α (H_s θ − b_s)`` with ``H = (2/n) XᵀX`` and
    ``b = (2/n) Xᵀy``, so ``∂L_q(θ')/∂θ = (I − α H_s)ᵀ (H_q θ' − b_q)`` (Finn et al.'s meta-gradient).

    ``MAML.adapt`` of a second-order learner (``first_order=False``, default ``first_order=None``) must keep that
    graph (book/meta_learning.ipynb: "θ' = θ − α ∇L_support(θ), differentiable in θ"); ``first_order=True`` on the
    call must drop the Hessian term, leaving ``H_q θ' − b_q``.
    """
    g = torch.Generator().manual_seed(0)
    d, alpha = 4, 0.1
    sx, sy = torch.randn(6, d, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    qx, qy = torch.randn(5, d, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    net = nn.Linear(d, 1, bias=False).double()
    w = net.weight.detach()[0].clone()
    h_s, b_s = 2 / 6 * sx.T @ sx, 2 / 6 * sx.T @ sy[:, 0]
    h_q, b_q = 2 / 5 * qx.T @ qx, 2 / 5 * qx.T @ qy[:, 0]
    adapted_w = w - alpha * (h_s @ w - b_s)
    first = h_q @ adapted_w - b_q
    second = (torch.eye(d, dtype=torch.float64) - alpha * h_s).T @ first

    maml = MAML(net, alpha, 1, loss_fn=F.mse_loss)
    for kwargs, expected in (({}, second), ({"first_order": True}, first)):
        adapted = maml.adapt(sx, sy, **kwargs)
        torch.testing.assert_close(adapted["weight"].detach()[0], adapted_w, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(F.mse_loss(run(net, adapted, qx), qy), net.weight)
        torch.testing.assert_close(grad[0], expected, rtol=1e-10, atol=1e-12)
    assert (second - first).norm() > 0.1 * first.norm()        # the two orders differ here by far more than round-off


@pytest.mark.parametrize("training", [True, False])
def test_maml_adapt_with_running_batch_norm_statistics_is_differentiable_and_equals_higher(training):
    # adapt gives the running statistics back after its inner loop, whose graph saved them: differentiating that
    # graph afterwards must still work, and give the meta-gradient (reference: higher).
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16).double().train(training)
    model(torch.randn(8, 1, 16, 16, dtype=torch.float64))           # running statistics away from their start
    tasks = episodes(tasks=1)
    reference = higher_meta_gradient(copy.deepcopy(model), tasks, 0.4, 2, F.cross_entropy)
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    adapted = MAML(model, 0.4, 2).adapt(tasks.support_x[0], tasks.support_y[0])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    F.cross_entropy(run(model, adapted, tasks.query_x[0]), tasks.query_y[0]).backward()
    for (name, p), ref in zip(model.named_parameters(), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-12, msg=name)


def test_tasks_at_once_with_dropout_in_evaluation_mode_equals_plain_fine_tuning():
    """MAML's docstring allows dropout with tasks_at_once > 1 ("dropout draws other masks"). In evaluation mode
    dropout is the identity, so evaluate with 3 tasks at once over 4 tasks (a last group of one) equals, task by
    task, plain SGD on a copy of the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 1)).double().eval()
    tasks = regression(tasks=4)
    got = MAML(model, 0.2, 2, loss_fn=F.mse_loss, tasks_at_once=3).evaluate(tasks)["per_task_loss"]
    want = []
    for j in range(4):
        tuned = fine_tuned(model, tasks.support_x[j], tasks.support_y[j], 0.2, 2)
        with torch.no_grad():
            want.append(F.mse_loss(tuned(tasks.query_x[j]), tasks.query_y[j]))
    torch.testing.assert_close(got, torch.stack(want))


def test_anil_refuses_a_model_without_a_linear_head():
    with pytest.raises(ValueError, match="the model has no nn.Linear layer to use as the head"):
        ANIL(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), 0.4, 1)


def test_the_inner_loop_reports_the_support_loss_before_each_step():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1).double()
    x, y = regression(1).support_x[0], regression(1).support_y[0]
    losses = []
    inner_loop(model, parameters_of(model), x, y, F.mse_loss, 3, 0.1, losses=losses)
    expected = [F.mse_loss(fine_tuned(model, x, y, 0.1, k)(x), y).detach() for k in range(3)]
    assert len(losses) == 3 and not any(loss.requires_grad for loss in losses)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected))


def test_the_inner_loop_refuses_low_rank_factors_and_adapts_s_to_second_order():
    # U.grad and V.grad of a low-rank layer are DLRT's ∇_K and ∇_L, not ∂L/∂U and ∂L/∂V; S's is ∂L/∂S.
    from lowlearn.lowrank import to_low_rank

    torch.manual_seed(0)
    model = to_low_rank(MLP(1, (6,), 1).double(), ["1"], rank=1)
    tasks = regression(1)
    with pytest.raises(ValueError, match=r"\['1.U', '1.V'\] are factors U, V of low-rank layers"):
        MAML(model, 0.1, 1, loss_fn=F.mse_loss).adapt(tasks.support_x[0], tasks.support_y[0])
    for factor in (model[1].U, model[1].V):
        factor.requires_grad_(False)
    maml = MAML(model, 0.1, 2, loss_fn=F.mse_loss)
    stats = maml.meta_backward(tasks)

    def plain(S, b1, w2, b2, x):                    # the same network written with the dense weight U S Vᵀ
        return F.linear(F.relu(F.linear(x, model[1].U @ S @ model[1].V.T, b1)), w2, b2)

    start = [p.detach().clone().requires_grad_() for p in (model[1].S, model[1].bias, model[3].weight, model[3].bias)]
    adapted = start
    for _ in range(2):
        grads = torch.autograd.grad(F.mse_loss(plain(*adapted, tasks.support_x[0]), tasks.support_y[0]), adapted,
                                    create_graph=True)
        adapted = [p - 0.1 * g for p, g in zip(adapted, grads)]
    query = F.mse_loss(plain(*adapted, tasks.query_x[0]), tasks.query_y[0])
    torch.testing.assert_close(stats["loss"], query.detach())
    expected = torch.autograd.grad(query, start)
    for p, g in zip((model[1].S, model[1].bias, model[3].weight, model[3].bias), expected):
        torch.testing.assert_close(p.grad, g)


def test_a_dictionary_of_rates_must_give_every_adapted_parameter_one():
    model = MLP(1, (8,), 1).double()
    rates = {"1.weight": torch.tensor(0.1), "1.bias": torch.tensor(0.1), "3.weight": torch.tensor(0.1)}
    with pytest.raises(ValueError, match=r"lr has no step size for the adapted parameters \['3.bias'\]"):
        adapt_and_evaluate(model, regression(2), F.mse_loss, 1, rates)
    with pytest.raises(ValueError, match=r"lr has no step size for the adapted parameters \['3.bias'\]"):
        inner_loop(model, parameters_of(model), *regression(1)[:2], F.mse_loss, 1, rates)
    rates["3.bias"] = torch.tensor(0.1)
    assert adapt_and_evaluate(model, regression(2), F.mse_loss, 1, rates)["loss"].isfinite()


def test_a_meta_step_starts_from_zero_gradients_and_steps_by_its_own_tasks_meta_gradient():
    torch.manual_seed(0)
    model = MLP(1, (20,), 1).double()
    reference = copy.deepcopy(model)
    maml = MAML(model, 0.05, 1, loss_fn=F.mse_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(3, 1, dtype=torch.float64)).sum().backward()        # a stale gradient the step must not add
    for seed in (0, 1):
        tasks = regression(seed=seed)
        maml.meta_step(tasks, optimizer)
        reference.zero_grad()
        MAML(reference, 0.05, 1, loss_fn=F.mse_loss).meta_backward(tasks)
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
