import copy
import math

import pytest
import torch
from torch import nn

from lowlearn.meta.learned_optimizer import LSTMOptimizer, meta_train, optimize, preprocess_gradient, quadratic


def test_preprocessing_by_hand():
    g = torch.tensor([1.0, -math.e ** 2, 1e-6, -2e-5])
    out = preprocess_gradient(g, p=10.0)
    assert torch.allclose(out[0], torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[1], torch.tensor([0.2, -1.0]))
    # |g| < e^-10 ≈ 4.5e-5: (−1, e^10 g).
    assert torch.allclose(out[2], torch.tensor([-1.0, math.exp(10) * 1e-6]), rtol=1e-5)
    assert torch.allclose(out[3], torch.tensor([-1.0, -math.exp(10) * 2e-5]), rtol=1e-5)


def test_the_lstm_is_coordinate_wise():
    torch.manual_seed(0)
    net = LSTMOptimizer()
    grad = torch.randn(7)
    update, state = net(grad, net.initial_state(7, grad))
    perm = torch.randperm(7)
    p_update, p_state = net(grad[perm], net.initial_state(7, grad))
    assert torch.allclose(p_update, update[perm])
    # The same function for every coordinate: one coordinate alone gets the same update.
    single, _ = net(grad[3:4], net.initial_state(1, grad))
    assert torch.allclose(single, update[3:4])
    assert all(torch.allclose(a[perm], b) for (a, _), (b, _) in zip(state, p_state))
    # ... also later, through the hidden state each coordinate carries on: no coordinate sees another's.
    states = {"all": net.initial_state(7, grad), "permuted": net.initial_state(7, grad),
              "alone": net.initial_state(1, grad)}
    for _ in range(3):
        grad = torch.randn(7)
        update, states["all"] = net(grad, states["all"])
        p_update, states["permuted"] = net(grad[perm], states["permuted"])
        single, states["alone"] = net(grad[3:4], states["alone"])
        assert torch.allclose(p_update, update[perm], atol=1e-7) and torch.allclose(single, update[3:4], atol=1e-7)


def test_a_state_that_does_not_fit_the_optimiser_or_the_gradient_is_refused():
    # zip would pair a one-layer state with the first of two layers and skip the second without a word.
    net = LSTMOptimizer(layers=2)
    grad = torch.randn(5)
    state = net.initial_state(5, grad)
    for bad in (state[:1], [], net.initial_state(4, grad)):
        with pytest.raises(ValueError, match="start from initial_state"):
            net(grad, bad)


def test_meta_training_lowers_the_loss_on_quadratics():
    torch.manual_seed(0)
    net = LSTMOptimizer()
    test_problems = [quadratic(generator=torch.Generator().manual_seed(1000 + i)) for i in range(10)]

    def mean_loss():
        return sum(sum(optimize(net, f, theta, 20)[1:]) / 20 for f, theta in test_problems) / len(test_problems)

    before = mean_loss()
    generator = torch.Generator().manual_seed(0)
    meta_train(net, lambda: quadratic(generator=generator), torch.optim.Adam(net.parameters(), lr=0.01),
               problems=60, horizon=20, truncation=20)
    after = mean_loss()
    assert after < 0.5 * before


def test_truncated_meta_training_carries_theta_and_the_last_gradient_across_segments():
    # horizon = 3 truncations: θ_0's gradient once, then one evaluation per step, none repeated at a boundary
    torch.manual_seed(0)
    net, calls = LSTMOptimizer(), []
    f, theta0 = quadratic(generator=torch.Generator().manual_seed(0))

    def counted(theta):
        calls.append(theta.detach().clone())
        return f(theta)

    history = meta_train(net, lambda: (counted, theta0), torch.optim.SGD(net.parameters(), lr=0.0),
                         problems=1, horizon=6, truncation=2)
    assert len(calls) == 6 + 1
    # with a meta learning rate of 0 the segments continue one trajectory: the unbroken run's values
    expected = optimize(net, f, theta0, 6)[1:]
    assert history[0] == pytest.approx(sum(expected) / 6, rel=1e-5)


def test_network_problem_is_the_model_loss_of_its_flat_parameters():
    import torch.nn.functional as F

    from lowlearn.meta.learned_optimizer import network_problem
    from lowlearn.models import MLP

    torch.manual_seed(0)
    model = MLP(8, (5,), 3)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    objective, theta = network_problem(model, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert theta.numel() == sum(p.numel() for p in model.parameters())
    # f(θ_0) is the model's own loss on the mini-batch the generator draws.
    index = torch.randint(40, (16,), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(objective(theta), F.cross_entropy(model(x[index]), y[index]))
    net = LSTMOptimizer()
    losses = optimize(net, objective, theta, 5)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def test_network_problem_optimises_the_trainable_parameters_and_leaves_frozen_ones_as_they_are():
    import torch.nn.functional as F

    from lowlearn.meta.learned_optimizer import network_problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].requires_grad_(False)                                   # a frozen body, a trained head
    body = [p.clone() for p in model[0].parameters()]
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    objective, theta = network_problem(model, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert theta.numel() == 16 * 3 + 3
    assert torch.equal(theta, torch.cat([model[2].weight.flatten(), model[2].bias]))
    index = torch.randint(40, (16,), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(objective(theta), F.cross_entropy(model(x[index]), y[index]))
    # Other head weights change the loss as the head alone would; the body is the model's own.
    head = torch.randn_like(theta)
    with torch.no_grad():
        expected = F.cross_entropy(F.linear(torch.tanh(model[0](x[index])), head[:48].view(3, 16), head[48:]), y[index])
    objective, _ = network_problem(model, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(objective(head), expected)
    optimize(LSTMOptimizer(), objective, theta, 5)
    assert all(torch.equal(a, b) for a, b in zip(body, model[0].parameters()))


def test_network_problem_refuses_a_frozen_model_and_trainable_low_rank_factors():
    from lowlearn.lowrank import to_low_rank
    from lowlearn.meta.learned_optimizer import network_problem

    x, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="every parameter of the model is frozen"):
        network_problem(nn.Linear(3, 2).requires_grad_(False), x, y)
    model = to_low_rank(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), ["0"], rank=2)
    with pytest.raises(ValueError, match=r"\['0.U', '0.V'\] are factors U, V of low-rank layers"):
        network_problem(model, x, y)
    model[0].U.requires_grad_(False)
    model[0].V.requires_grad_(False)
    _, theta = network_problem(model, x, y)                      # S, the bias and the dense layer: true gradients
    assert theta.numel() == 2 * 2 + 4 + 4 * 2 + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_problem_on_a_gpu_draws_its_batches_there_from_a_cpu_generator():
    from lowlearn.meta.learned_optimizer import network_problem
    from lowlearn.models import MLP

    model = MLP(8, (5,), 3).cuda()
    x, y = torch.randn(40, 8, device="cuda"), torch.randint(0, 3, (40,), device="cuda")
    losses = []
    for _ in range(2):                                         # the same seed, the same batches
        objective, theta = network_problem(model, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
        losses.append(objective(theta))
    assert losses[0].is_cuda and torch.equal(*losses)


def test_a_parameter_of_any_shape_is_updated_coordinate_by_coordinate():
    torch.manual_seed(0)
    net = LSTMOptimizer()
    grad = torch.randn(3, 4)
    update, _ = net(grad, net.initial_state(12, grad))
    flat, _ = net(grad.flatten(), net.initial_state(12, grad))
    assert update.shape == (3, 4) and torch.equal(update, flat.view(3, 4))
    losses = optimize(net, lambda theta: theta.square().sum(), torch.ones(2, 3), steps=2)
    assert len(losses) == 3


@pytest.mark.parametrize("counts, name", [((1, 5, 0), "truncation"), ((1, 5, -2), "truncation"),
                                          ((1, 0, 1), "horizon"), ((-1, 5, 5), "problems")])
def test_meta_train_refuses_counts_that_would_train_nothing(counts, name):
    net = LSTMOptimizer()
    problems, horizon, truncation = counts
    with pytest.raises(ValueError, match=name):
        meta_train(net, quadratic, torch.optim.Adam(net.parameters()), problems=problems, horizon=horizon,
                   truncation=truncation)


def test_each_unrolled_step_evaluates_f_once_and_feeds_that_evaluations_gradient():
    # A stochastic f: the k-th call is its own quadratic ‖W_k θ − y_k‖² (a fresh "mini-batch" per call).
    from lowlearn.meta.learned_optimizer import unroll

    generator = torch.Generator().manual_seed(0)
    Ws, ys = torch.randn(8, 4, 4, generator=generator), torch.randn(8, 4, generator=generator)
    calls = []

    def objective(theta):
        k = len(calls)
        calls.append(theta.detach().clone())
        return (Ws[k] @ theta - ys[k]).square().sum()

    torch.manual_seed(0)
    net = LSTMOptimizer()
    theta0 = torch.randn(4, generator=generator)
    steps = 3
    total, theta, state, last = unroll(net, objective, theta0, net.initial_state(4, theta0), steps)
    assert len(calls) == steps + 1
    meta_gradient = torch.autograd.grad(total, list(net.parameters()), retain_graph=True)

    # The paper's graph by hand: ∇_t is the gradient of the same f_t whose value enters the meta-loss.
    def f(k, theta):
        return (Ws[k] @ theta - ys[k]).square().sum()

    state, theta, expected = net.initial_state(4, theta0), theta0, 0.0
    point = theta0.clone().requires_grad_()
    grad = torch.autograd.grad(f(0, point), point)[0]
    for t in range(1, steps + 1):
        update, state = net(grad, state)
        theta = theta + update
        expected = expected + f(t, theta)
        point = theta.detach().requires_grad_()
        grad = torch.autograd.grad(f(t, point), point)[0]
    assert torch.allclose(total, expected)
    for got, want in zip(meta_gradient, torch.autograd.grad(expected, list(net.parameters()))):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)

    # The next truncated segment starts from θ_T with ∇_T of that same evaluation, not a fresh one.
    assert torch.allclose(last, grad)
    unroll(net, objective, theta.detach(), state, 1, last)
    assert len(calls) == steps + 2


def test_preprocessing_at_the_threshold_e_to_the_minus_p():
    # e^-10 ≈ 4.54e-5: 1e-4 and 3e-3 lie above it (log-and-sign), 4e-5 below (−1, e^10 g).
    out = preprocess_gradient(torch.tensor([1e-4, -3e-3, 4e-5], dtype=torch.float64), p=10.0)
    expected = torch.tensor([[math.log(1e-4) / 10, 1.0], [math.log(3e-3) / 10, -1.0], [-1.0, math.exp(10) * 4e-5]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # another p moves the threshold and divides the log by p: |g| = 1e-2 ≥ e^-5
    torch.testing.assert_close(preprocess_gradient(torch.tensor([-1e-2, 1e-3], dtype=torch.float64), p=5.0),
                               torch.tensor([[math.log(1e-2) / 5, -1.0], [-1.0, math.exp(5) * 1e-3]],
                                            dtype=torch.float64), rtol=1e-12, atol=1e-12)


def reference_updates(net, grads):
    """The coordinate-wise LSTM written out from its equations, the state carried over the steps.

    Input ``(log|g|/10, sign g)`` (every ``|g| ≥ e^-10`` here); per layer, with PyTorch's gate order ``i, f, g, o``:
    ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``; the update is ``output_scale · (w·h + b)``, h the last's.
    """
    n = grads[0].numel()
    state = [(grads[0].new_zeros(n, cell.hidden_size), grads[0].new_zeros(n, cell.hidden_size)) for cell in net.cells]
    updates = []
    for g in grads:
        x = torch.stack([g.abs().log() / 10, g.sign()], dim=-1)
        for layer, cell in enumerate(net.cells):
            h, c = state[layer]
            i, f, gate, o = (x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gate)
            h = torch.sigmoid(o) * torch.tanh(c)
            state[layer] = (h, c)
            x = h
        updates.append(net.output_scale * (x @ net.out.weight.T + net.out.bias).squeeze(-1))
    return updates


def test_the_update_is_the_two_layer_lstm_of_the_preprocessed_gradient_written_out():
    torch.manual_seed(0)
    net = LSTMOptimizer(hidden=6, layers=2, output_scale=0.37).double()
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(5, generator=generator, dtype=torch.float64).sign()
             * 10 ** (4 * torch.rand(5, generator=generator, dtype=torch.float64) - 3) for _ in range(4)]
    state, updates = net.initial_state(5, grads[0]), []
    for g in grads:
        update, state = net(g, state)
        updates.append(update)
    with torch.no_grad():
        for got, want in zip(updates, reference_updates(net, grads)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_each_truncated_segment_steps_phi_on_the_segments_mean_loss():
    # By hand: θ_{t+1} = θ_t + m_φ(∇f(θ_t)), the gradients constants; one SGD step φ ← φ − η ∇_φ (f(θ_1) + f(θ_2)) / 2.
    torch.manual_seed(0)
    net = LSTMOptimizer(hidden=8).double()
    reference = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(0)
    W, y, theta0 = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((4, 4), (4,), (4,)))
    f = lambda theta: (W @ theta - y).square().sum()                  # noqa: E731
    meta_train(net, lambda: (f, theta0), torch.optim.SGD(net.parameters(), lr=0.01), problems=1, horizon=2,
               truncation=2)
    state, theta, total = reference.initial_state(4, theta0), theta0, 0.0
    for _ in range(2):
        point = theta.detach().requires_grad_()
        update, state = reference(torch.autograd.grad(f(point), point)[0], state)
        theta = theta + update
        total = total + f(theta)
    grads = torch.autograd.grad(total / 2, list(reference.parameters()))
    for p, q, g in zip(net.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, q - 0.01 * g, rtol=1e-10, atol=1e-12)
    assert max((p - q).abs().max() for p, q in zip(net.parameters(), reference.parameters())) > 1e-4


def test_meta_training_refuses_a_horizon_that_the_truncation_does_not_divide():
    with pytest.raises(ValueError, match=r"horizon \(20\) must be a multiple of truncation \(6\)"):
        meta_train(LSTMOptimizer(), quadratic, torch.optim.Adam(LSTMOptimizer().parameters()), problems=1,
                   horizon=20, truncation=6)


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "batch_size must be an int >= 1"),
                                             ({"batch_size": 2.5}, "batch_size must be an int >= 1"),
                                             ({"y": torch.zeros(9, dtype=torch.long)}, "10 inputs and 9 targets"),
                                             ({"x": torch.zeros(0, 3), "y": torch.zeros(0, dtype=torch.long)},
                                              "0 inputs and 0 targets")])
def test_network_problem_refuses_an_empty_mini_batch_and_inputs_without_their_targets(kwargs, message):
    # a batch_size of 0 made f(θ) the NaN mean of an empty batch; 9 targets for 10 inputs failed only inside f
    from lowlearn.meta.learned_optimizer import network_problem

    given = {"x": torch.randn(10, 3), "y": torch.zeros(10, dtype=torch.long), **kwargs}
    with pytest.raises(ValueError, match=message):
        network_problem(nn.Linear(3, 2), **given)


def test_an_empty_quadratic_and_a_negative_number_of_steps_are_refused():
    # quadratic(0) was the constant 0, and optimize with steps=-1 returned f(θ_0) alone
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        quadratic(0)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        optimize(LSTMOptimizer(), *quadratic(3), steps=-1)


@pytest.mark.parametrize("steps", [0, -2, 2.0])
def test_unroll_refuses_a_number_of_steps_below_one(steps):
    # steps=0 or -2 returned a zero meta-loss with no graph to φ; 2.0 failed in range()
    from lowlearn.meta.learned_optimizer import unroll

    net = LSTMOptimizer()
    objective, theta = quadratic(3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        unroll(net, objective, theta, net.initial_state(3, theta), steps)
