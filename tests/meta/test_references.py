"""Meta-learners against independent references: closed forms on linear regression, written-out losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.data.episodes import random_episodes
from lowlearn.data.tasks import RegressionBatch
from lowlearn.meta import CNP, MAML, MatchingNet, MetaSGD, ProtoNet, Reptile
from lowlearn.meta.learned_optimizer import preprocess_gradient


# ---------------------------------------------------------------------------------------------------------------
# Linear regression: the support and query losses are quadratics, L(w) = ½ wᵀHw − bᵀw + c with H = (2/n) XᵀX and
# b = (2/n) Xᵀy, so every inner step, meta-gradient and Reptile update has a closed form in H and b.
# ---------------------------------------------------------------------------------------------------------------

def linear_tasks(tasks=3, d=4, support=6, query=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sx, sy = torch.randn(tasks, support, d, generator=generator), torch.randn(tasks, support, 1, generator=generator)
    qx, qy = torch.randn(tasks, query, d, generator=generator), torch.randn(tasks, query, 1, generator=generator)
    return RegressionBatch(sx.double(), sy.double(), qx.double(), qy.double(), torch.zeros(tasks), torch.zeros(tasks))


def linear_model(d=4, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False).double()


def quadratic(x, y):
    """``H, b`` of the mean squared error of ``w ↦ x w`` on ``(x, y)``: its gradient is ``H w − b``."""
    n = x.shape[0]
    return 2 / n * x.T @ x, 2 / n * x.T @ y[:, 0]


@pytest.mark.parametrize("tasks_at_once", [1, 2])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_maml_meta_gradient_equals_the_closed_form_product_on_linear_regression(steps, tasks_at_once):
    """Finn et al.: ∇_θ L_q(θ') = Π_j (I − α ∇²L_s(θ_j)) ∇L_q(θ'), here (I − α H_s)^k (H_q θ' − b_q) (task mean)."""
    tasks, model, alpha = linear_tasks(), linear_model(), 0.1
    w = model.weight.detach()[0].clone()
    expected = torch.zeros_like(w)
    for t in range(3):
        h_s, b_s = quadratic(tasks.support_x[t], tasks.support_y[t])
        h_q, b_q = quadratic(tasks.query_x[t], tasks.query_y[t])
        adapted = w.clone()
        for _ in range(steps):
            adapted = adapted - alpha * (h_s @ adapted - b_s)
        jacobian = torch.linalg.matrix_power(torch.eye(4, dtype=torch.float64) - alpha * h_s, steps)
        expected += jacobian.T @ (h_q @ adapted - b_q) / 3
    MAML(model, alpha, steps, loss_fn=F.mse_loss, tasks_at_once=tasks_at_once).meta_backward(tasks)
    torch.testing.assert_close(model.weight.grad[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tasks_at_once", [1, 3])
def test_two_step_meta_sgd_gradients_equal_the_closed_form_on_linear_regression(tasks_at_once):
    """Li et al.'s θ' = θ − α ⊙ ∇L, applied twice with one learned α: with J = I − diag(α) H_s, g_j = H_s θ_j − b_s
    and g' = H_q θ_2 − b_q, ∇_θ = Jᵀ Jᵀ g' and ∇_α = −g_0 ⊙ (Jᵀ g') − g_1 ⊙ g' (mean over tasks)."""
    tasks, model = linear_tasks(), linear_model()
    metasgd = MetaSGD(model, 0.1, 2, loss_fn=F.mse_loss, tasks_at_once=tasks_at_once)
    with torch.no_grad():
        metasgd.lrs[0].copy_(torch.tensor([[0.05, 0.2, 0.1, 0.15]], dtype=torch.float64))
    alpha, w = metasgd.lrs[0].detach()[0].clone(), model.weight.detach()[0].clone()
    grad_w, grad_alpha = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(3):
        h_s, b_s = quadratic(tasks.support_x[t], tasks.support_y[t])
        h_q, b_q = quadratic(tasks.query_x[t], tasks.query_y[t])
        g0 = h_s @ w - b_s
        w1 = w - alpha * g0
        g1 = h_s @ w1 - b_s
        w2 = w1 - alpha * g1
        g_q = h_q @ w2 - b_q
        j_t = (torch.eye(4, dtype=torch.float64) - torch.diag(alpha) @ h_s).T
        grad_w += j_t @ j_t @ g_q / 3
        grad_alpha += (-g0 * (j_t @ g_q) - g1 * g_q) / 3
    metasgd.meta_backward(tasks)
    torch.testing.assert_close(model.weight.grad[0], grad_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metasgd.lrs[0].grad[0], grad_alpha, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tasks_at_once", [1, 3])
def test_reptile_update_on_linear_regression_equals_its_definition(tasks_at_once):
    """Nichol et al., Algorithm 2: θ ← θ + ε (1/n) Σ_i (θ̃_i − θ), θ̃_i after k SGD steps θ ← θ − α (H_i θ − b_i)."""
    tasks, model = linear_tasks(tasks=3), linear_model()
    alpha, k, eps = 0.05, 4, 0.7
    w = model.weight.detach()[0].clone()
    ends = []
    for t in range(3):
        h, b = quadratic(tasks.support_x[t], tasks.support_y[t])
        adapted = w.clone()
        for _ in range(k):
            adapted = adapted - alpha * (h @ adapted - b)
        ends.append(adapted)
    expected = w + eps * (torch.stack(ends) - w).mean(0)
    Reptile(model, alpha, k, eps, F.mse_loss, tasks_at_once=tasks_at_once).meta_step(tasks)
    torch.testing.assert_close(model.weight.detach()[0], expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# The learned optimiser's gradient preprocessing (Andrychowicz et al., appendix A, p = 10).
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preprocessing_at_exactly_e_to_the_minus_p_is_continuous(dtype):
    """(log|g|/p, sign g) if |g| ≥ e^{−p}, else (−1, e^p g): both branches give (−1, ±1) at |g| = e^{−p}, so the
    inputs are continuous there, whichever branch the rounding of the threshold picks."""
    threshold = math.exp(-10)
    g = torch.tensor([threshold, -threshold, threshold * (1 + 1e-6), threshold * (1 - 1e-6), 0.0], dtype=dtype)
    out = preprocess_gradient(g, p=10.0)
    expected = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # just above the threshold the first branch is taken, just below the second
    above = torch.tensor([threshold * 1.01], dtype=dtype)
    below = torch.tensor([threshold * 0.99], dtype=dtype)
    torch.testing.assert_close(preprocess_gradient(above)[0], torch.tensor([math.log(threshold * 1.01) / 10, 1.0],
                                                                           dtype=dtype))
    torch.testing.assert_close(preprocess_gradient(below)[0], torch.tensor([-1.0, 0.99], dtype=dtype))


# ---------------------------------------------------------------------------------------------------------------
# Metric learners and the CNP: gradients and likelihoods against independent written-out versions.
# ---------------------------------------------------------------------------------------------------------------

def test_protonet_and_matching_net_gradients_equal_written_out_losses():
    """Snell et al. eq. 2 with cdist² and Vinyals et al. eq. 1–2 with explicit cosines, per query: the same loss
    and the same gradient in the embedding's weights (the centred, clamped distances must not change either)."""
    torch.manual_seed(0)
    embedding = nn.Linear(5, 3).double()
    tasks = random_episodes(2, 3, 2, 2, image_size=4, dtype=torch.float64)
    tasks = tasks._replace(support_x=tasks.support_x.flatten(2)[..., :5], query_x=tasks.query_x.flatten(2)[..., :5])
    for learner in (ProtoNet(embedding), MatchingNet(embedding, scale=2.5)):
        loss = learner.loss(tasks)["loss"]
        got = torch.autograd.grad(loss, list(embedding.parameters()))
        terms = []
        for b in range(2):
            s, q, y = embedding(tasks.support_x[b]), embedding(tasks.query_x[b]), tasks.support_y[b]
            if isinstance(learner, ProtoNet):
                prototypes = torch.stack([s[y == k].mean(0) for k in range(3)])
                logits = -torch.cdist(q, prototypes) ** 2
            else:
                cosine = torch.stack([torch.stack([F.cosine_similarity(qi, si, dim=0) for si in s]) for qi in q])
                attention = torch.softmax(2.5 * cosine, dim=-1)
                logits = torch.stack([attention[:, y == k].sum(-1) for k in range(3)], -1).log()
            terms.append(F.cross_entropy(logits, tasks.query_y[b], reduction="sum"))
        expected_loss = sum(terms) / tasks.query_y.numel()
        expected = torch.autograd.grad(expected_loss, list(embedding.parameters()))
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_cnp_loss_equals_the_negative_log_likelihood_of_torch_distributions_normal():
    """Garnelo et al.: −mean log N(y; μ, σ²) with σ = 0.1 + 0.9 softplus(raw) (the authors' bound), computed with
    torch.distributions.Normal from the encoder's mean representation and the decoder run on [r, x] by hand."""
    torch.manual_seed(0)
    cnp = CNP(x_dim=1, y_dim=1, hidden=8).double()
    generator = torch.Generator().manual_seed(5)
    cx, cy, tx, ty = (torch.randn(2, n, 1, generator=generator, dtype=torch.float64) for n in (3, 3, 6, 6))
    r = torch.stack([torch.stack([cnp.encoder(torch.cat([cx[b, i], cy[b, i]])) for i in range(3)]).mean(0)
                     for b in range(2)])
    first = cnp.decoder[0]                                   # its weight on [r, x], written out
    out = cnp.decoder[1:](F.linear(torch.cat([r[:, None].expand(2, 6, 8), tx], -1), first.weight, first.bias))
    normal = torch.distributions.Normal(out[..., :1], 0.1 + 0.9 * F.softplus(out[..., 1:]))
    torch.testing.assert_close(cnp.loss(cx, cy, tx, ty), -normal.log_prob(ty).mean(), rtol=1e-12, atol=1e-12)
