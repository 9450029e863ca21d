"""Edge cases of the meta-learners: zero steps, empty support sets, learned rates and heads at test time, the
matching network's default scale, two episodes under transductive batch norm.

Each test checks against an independent reference: a hand computation (closed-form gradients of a linear or
tanh model under the mean squared error) or the paper's equation.
"""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.meta import ANIL, MAML, MatchingNet, MetaSGD, ProtoNet, Reptile, adapt_and_evaluate


class Tasks(NamedTuple):
    """The four fields the meta-learners read (a TaskBatch)."""
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def linear_tasks(tasks=3, support=5, queries=4, features=3, seed=0):
    """Random linear-regression tasks, float64, targets (K, 1)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return Tasks(draw(tasks, support, features), draw(tasks, support, 1),
                 draw(tasks, queries, features), draw(tasks, queries, 1))


def mse_gradient(x, y, w, b):
    """Closed form of ∇_(w, b) mean((x wᵀ + b − y)²): (2/n) Σ r xᵀ and (2/n) Σ r, r the residuals."""
    r = x @ w.T + b - y
    return 2 * r.T @ x / len(x), 2 * r.sum(0) / len(x)


def losses_after_one_step(tasks, w, b, lr_w, lr_b):
    """Each task's query loss after one hand step ``θ − α ⊙ ∇L`` of the linear model on its support set."""
    losses = []
    for j in range(len(tasks.support_x)):
        gw, gb = mse_gradient(tasks.support_x[j], tasks.support_y[j], w, b)
        w1, b1 = w - lr_w * gw, b - lr_b * gb
        losses.append(((tasks.query_x[j] @ w1.T + b1 - tasks.query_y[j]) ** 2).mean())
    return torch.stack(losses)


def test_meta_sgd_evaluate_fine_tunes_with_the_learned_per_element_rates():
    """Meta-SGD's test-time adaptation uses its learned rates α (Li et al. 2017: θ' = θ − α ⊙ ∇L), not the
    initial inner_lr: with the rates set to distinct values, evaluate's per-task query loss equals the hand
    computation of one step θ − α ⊙ ∇L with the closed-form MSE gradient."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    metasgd = MetaSGD(model, 0.1, 1, loss_fn=F.mse_loss)
    with torch.no_grad():                                        # as if meta-trained: rates no longer all 0.1
        for rate in metasgd.lrs:
            rate.copy_(torch.rand(rate.shape, dtype=rate.dtype) * 0.5 + 0.05)
    rates = dict(zip(metasgd.adapt_names, metasgd.lrs))
    tasks = linear_tasks()
    got = metasgd.evaluate(tasks)["per_task_loss"]
    want = losses_after_one_step(tasks, model.weight.detach(), model.bias.detach(), rates["weight"].detach(),
                                 rates["bias"].detach())
    torch.testing.assert_close(got, want)


def test_maml_adapt_with_zero_steps_returns_the_initialisation():
    """``MAML.adapt(x, y, steps=0)`` takes no step (the docstring: steps default to the meta-training ones; 0 is
    a count, not "use the default"): the result equals the model's own parameters, although inner_steps=3."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    maml = MAML(model, 0.5, 3, loss_fn=F.mse_loss)
    tasks = linear_tasks()
    adapted = maml.adapt(tasks.support_x[0], tasks.support_y[0], steps=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(adapted[name], p, rtol=0, atol=0)


def test_adapt_with_zero_steps_accepts_an_empty_support_set_as_adapt_and_evaluate_does():
    """With no step no support example is needed: MAML, ANIL and Meta-SGD's adapt(x, y, steps=0) on an empty
    support set give the initialisation itself (as a first-order MAML with inner_steps=0 does by default),
    while a step on it (its loss the NaN mean of nothing) is still refused."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    tasks = linear_tasks()
    x, y = tasks.support_x[0, :0], tasks.support_y[0, :0]
    for learner, kwargs in ((MAML(model, 0.5, 3, loss_fn=F.mse_loss), {"steps": 0}),
                            (ANIL(model, 0.5, 1, loss_fn=F.mse_loss), {"steps": 0}),
                            (MetaSGD(model, 0.5, 1, loss_fn=F.mse_loss), {"steps": 0}),
                            (MAML(model, 0.5, 0, first_order=True, loss_fn=F.mse_loss), {})):
        adapted = learner.adapt(x, y, **kwargs)
        for name, p in model.named_parameters():
            torch.testing.assert_close(adapted[name], p, rtol=0, atol=0)
    for steps in (None, 1):
        with pytest.raises(ValueError, match="the support set is empty, so the inner loop has nothing to adapt to"):
            MAML(model, 0.5, 3, loss_fn=F.mse_loss).adapt(x, y, steps=steps)
    with pytest.raises(ValueError, match="as many targets as inputs: got 0 inputs and 1 targets"):
        MAML(model, 0.5, 0, first_order=True, loss_fn=F.mse_loss).adapt(x, tasks.support_y[0, :1])


def test_reptile_evaluate_with_zero_steps_scores_the_initialisation():
    """``Reptile.evaluate(tasks, steps=0)`` scores the query sets with θ itself (no fine-tuning, although
    inner_steps=4): each task's loss equals mean((x wᵀ + b − y)²) computed by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    tasks = linear_tasks()
    got = Reptile(model, 0.3, 4, 0.5, loss_fn=F.mse_loss).evaluate(tasks, steps=0)["per_task_loss"]
    w, b = model.weight.detach(), model.bias.detach()
    want = ((tasks.query_x @ w.T + b - tasks.query_y) ** 2).mean((1, 2))
    torch.testing.assert_close(got, want)


def test_anil_evaluate_fine_tunes_the_head_only():
    """ANIL (Raghu et al. 2020) adapts only the head at test time too: on tanh features h = tanh(x W1ᵀ + b1)
    of a fixed body, one step of the head by the closed-form MSE gradient gives the per-task query loss that
    ANIL.evaluate reports (fine-tuning the body as well would change it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    tasks = linear_tasks()
    got = ANIL(model, 0.4, 1, loss_fn=F.mse_loss).evaluate(tasks)["per_task_loss"]
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    want = []
    for j in range(3):
        h, hq = torch.tanh(tasks.support_x[j] @ w1.T + b1), torch.tanh(tasks.query_x[j] @ w1.T + b1)
        gw, gb = mse_gradient(h, tasks.support_y[j], w2, b2)
        want.append(((hq @ (w2 - 0.4 * gw).T + (b2 - 0.4 * gb) - tasks.query_y[j]) ** 2).mean())
    torch.testing.assert_close(got, torch.stack(want))


def test_adapt_and_evaluate_with_zero_steps_accepts_tasks_without_support_examples():
    """Zero steps adapt nothing, so empty support sets are no error (check_tasks refuses them only with
    adapts=True): the losses are those of the initialisation on the queries, computed by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    full = linear_tasks()
    tasks = Tasks(full.support_x[:, :0], full.support_y[:, :0], full.query_x, full.query_y)
    got = adapt_and_evaluate(model, tasks, F.mse_loss, 0, 0.1)["per_task_loss"]
    w, b = model.weight.detach(), model.bias.detach()
    torch.testing.assert_close(got, ((full.query_x @ w.T + b - full.query_y) ** 2).mean((1, 2)))


def test_matching_net_default_scale_is_the_papers_plain_cosine():
    """Vinyals et al. (2016) eq. 2: a(x̂, x_i) = softmax_i(cos(f(x̂), g(x_i))), no temperature: the default
    MatchingNet's logits are log Σ_{i: y_i = k} a(x̂, x_i), computed here by a loop over queries and classes."""
    torch.manual_seed(0)
    support, query = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 0, 1])                          # 1-2 shots, classes not in label order
    got = MatchingNet(nn.Identity())(support, labels, query)
    want = torch.empty(3, 3, dtype=torch.float64)
    for q in range(3):
        cos = torch.stack([torch.dot(query[q], s) / (query[q].norm() * s.norm()) for s in support])
        attention = cos.exp() / cos.exp().sum()
        for k in range(3):
            want[q, k] = attention[labels == k].sum().log()
    torch.testing.assert_close(got, want)


def test_two_episodes_in_evaluation_mode_with_transductive_batch_norm_do_not_share_statistics():
    """In evaluation mode, batch norm without running statistics normalises each episode by its own support and
    query embeddings (the embed_episodes docstring). With exactly two episodes in a batch, each episode's
    ProtoNet logits equal those computed by hand: batch-normalise that episode's 4 support and 3 query
    features alone (mean, biased variance, eps 1e-5), then −‖q − c_k‖² to the class means."""
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    model = ProtoNet(embedding).eval()
    sx, qx = torch.randn(2, 4, 3, dtype=torch.float64) * 3, torch.randn(2, 3, 3, dtype=torch.float64)
    sy = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    got = model(sx, sy, qx)
    lin = embedding[0]
    for e in range(2):
        z = torch.cat([sx[e], qx[e]]) @ lin.weight.detach().T + lin.bias.detach()
        z = (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt()
        s, q = z[:4], z[4:]
        prototypes = torch.stack([s[sy[e] == k].mean(0) for k in range(2)])
        want = -((q[:, None, :] - prototypes[None]) ** 2).sum(-1)
        torch.testing.assert_close(got[e], want)


def test_anil_on_a_bare_linear_model_adapts_that_layer():
    """A model that is itself one nn.Linear is its own head (head_names: the name prefix is empty): ANIL then
    adapts "weight" and "bias", and evaluate's per-task loss equals one hand step θ − α∇L (closed-form MSE
    gradient)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    anil = ANIL(model, 0.3, 1, loss_fn=F.mse_loss)
    assert anil.adapt_names == ["weight", "bias"]
    tasks = linear_tasks()
    got = anil.evaluate(tasks)["per_task_loss"]
    torch.testing.assert_close(got, losses_after_one_step(tasks, model.weight.detach(), model.bias.detach(), 0.3, 0.3))
