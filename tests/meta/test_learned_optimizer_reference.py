"""The learned optimiser (Andrychowicz et al. 2016) against a coordinate-by-coordinate loop of ``torch.nn.LSTMCell``
copies sharing its weights, with appendix A's preprocessing in plain Python, the paper's dropped second
derivatives, and truncated meta-training written out step by step; the CNP's layers against DeepMind's notebook."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.meta import CNP
from lowlearn.meta.learned_optimizer import LSTMOptimizer, meta_train, quadratic, unroll


def test_cnp_layers_follow_the_reference_notebook_structure():
    """The notebook's encoder [128]*4 and decoder [128, 128, 2] are ``CNP(encoder_layers=4, decoder_layers=3)``:
    linear layers of those widths with a ReLU between consecutive ones and none after the last (so r and the
    raw σ can be negative), the decoder reading [r, x]; σ = 0.1 + 0.9 softplus(raw)."""
    cnp = CNP(x_dim=1, y_dim=1, hidden=128, encoder_layers=4, decoder_layers=3)
    for net, widths in ((cnp.encoder, [(2, 128), (128, 128), (128, 128), (128, 128)]),
                        (cnp.decoder, [(129, 128), (128, 128), (128, 2)])):
        kinds = [nn.Linear if isinstance(m, nn.Linear) else type(m) for m in net]   # the decoder's first: on [r, x]
        assert kinds == [nn.Linear, nn.ReLU] * (len(widths) - 1) + [nn.Linear]
        assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == widths
    torch.manual_seed(0)
    r = cnp.represent(torch.randn(3, 5, 1), torch.randn(3, 5, 1))
    assert (r < 0).any()                                              # no ReLU after the encoder's last layer
    with torch.no_grad():
        cnp.decoder[-1].bias[1] = -50.0                                  # very negative raw σ: σ → 0.1 exactly
        cnp.decoder[-1].weight[1].zero_()
    assert torch.equal(cnp(torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(3, 4, 1)).stddev,
                       torch.full((3, 4, 1), 0.1 + 0.9 * F.softplus(torch.tensor(-50.0)).item()))


def appendix_a(g: float, p: float = 10.0) -> list[float]:
    """Andrychowicz et al., appendix A, for one coordinate, in plain Python."""
    return [math.log(abs(g)) / p, math.copysign(1.0, g) if g else 0.0] if abs(g) >= math.exp(-p) \
        else [-1.0, math.exp(p) * g]


class CoordinateLoop(nn.Module):
    """The same weights as ``net`` in fresh LSTMCell / Linear modules, applied to one coordinate at a time."""

    def __init__(self, net: LSTMOptimizer):
        super().__init__()
        self.cells = nn.ModuleList()
        for cell in net.cells:
            copy_ = nn.LSTMCell(cell.input_size, cell.hidden_size).double()
            copy_.load_state_dict(cell.state_dict())
            self.cells.append(copy_)
        self.out = nn.Linear(net.out.in_features, 1).double()
        self.out.load_state_dict(net.out.state_dict())
        self.scale = net.output_scale

    def step(self, grads: list[float], states: list[list[tuple]]):
        """One update per coordinate, each with its own (h, c) per layer; ``grads`` are plain floats (constants)."""
        updates = []
        for j, g in enumerate(grads):
            inputs = torch.tensor([appendix_a(g)], dtype=torch.float64)
            for layer, cell in enumerate(self.cells):
                states[j][layer] = cell(inputs, states[j][layer])
                inputs = states[j][layer][0]
            updates.append(self.scale * self.out(inputs)[0, 0])
        return torch.stack(updates)


def quadratic_problem(dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, y, theta0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((dim, dim), (dim,), (dim,)))
    W[:, 2] *= 1e-7                                            # coordinate 2's gradient falls below e^-10
    return (lambda theta: (W @ theta - y).square().sum()), theta0


def reference_unroll(loop: CoordinateLoop, f, theta, steps, states=None, grad=None):
    """Σ_{t=1}^{steps} f(θ_t) with θ_{t+1} = θ_t + m(∇_t), ∇_t = ∇f(θ_t) read as plain floats (∂∇/∂φ = 0)."""
    n = theta.numel()
    if states is None:
        states = [[(torch.zeros(1, c.hidden_size, dtype=torch.float64),) * 2 for c in loop.cells] for _ in range(n)]
    if grad is None:
        point = theta.detach().requires_grad_()
        grad = torch.autograd.grad(f(point), point)[0].tolist()
    total, seen = 0.0, []
    for _ in range(steps):
        seen.append(grad)
        theta = theta + loop.step(grad, states)
        total = total + f(theta)
        point = theta.detach().requires_grad_()
        grad = torch.autograd.grad(f(point), point)[0].tolist()
    return total, theta, states, grad, seen


def test_unroll_equals_a_coordinate_by_coordinate_loop_of_lstm_cells_with_shared_weights():
    """Loss, final θ and meta-gradient of ``unroll`` equal those of separate LSTMCell copies run on one coordinate
    at a time (each with its own state, the same weights: the paper's coordinate-wise LSTM), the gradient
    preprocessed by appendix A in plain Python (one coordinate below e^-10) and entering as a constant."""
    torch.manual_seed(0)
    net = LSTMOptimizer(hidden=7, layers=2, output_scale=0.3).double()
    loop = CoordinateLoop(net)
    f, theta0 = quadratic_problem()
    total, theta, _, _ = unroll(net, f, theta0, net.initial_state(5, theta0), 3)
    expected, expected_theta, _, _, seen = reference_unroll(loop, f, theta0, 3)
    assert any(abs(g[2]) < math.exp(-10) for g in seen) and any(abs(g[0]) > math.exp(-10) for g in seen)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theta, expected_theta, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(total, list(net.parameters()))
    want = dict(zip([n for n, _ in loop.named_parameters()], torch.autograd.grad(expected, list(loop.parameters()))))
    for (name, _), g in zip(net.named_parameters(), got):
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-12)


def test_dropping_second_derivatives_is_in_effect_and_matters():
    """The paper's ∂∇_t/∂φ = 0: the meta-gradient of ``unroll`` is not the full one (gradients differentiated
    with create_graph=True). With the raw gradient as input the dropped term is 0.1% or more here; through the
    log-and-sign preprocessing it is small (the sign has no derivative, log|g|/p a damped one) but not zero."""
    for preprocess, smallest in ((False, 1e-3), (True, 1e-5)):
        relative = _first_order_vs_full(preprocess)
        assert relative > smallest, (preprocess, relative)


def _first_order_vs_full(preprocess):
    torch.manual_seed(0)
    net = LSTMOptimizer(hidden=7, layers=2, output_scale=0.3, preprocess=preprocess).double()
    g = torch.Generator().manual_seed(1)
    W, y, theta0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 5), (5,), (5,)))

    def f(theta):
        return (W @ theta - y).square().sum()

    total, _, _, _ = unroll(net, f, theta0, net.initial_state(5, theta0), 3)
    first_order = torch.autograd.grad(total, list(net.parameters()))
    state, theta, full_total = net.initial_state(5, theta0), theta0.clone().requires_grad_(), 0.0
    grad = torch.autograd.grad(f(theta), theta, create_graph=True)[0]
    for _ in range(3):
        update, state = net(grad, state)
        theta = theta + update
        full_total = full_total + f(theta)
        grad = torch.autograd.grad(f(theta), theta, create_graph=True)[0]
    torch.testing.assert_close(total, full_total)                                    # same trajectory
    full = torch.autograd.grad(full_total, list(net.parameters()))
    flat_first, flat_full = torch.cat([a.flatten() for a in first_order]), torch.cat([a.flatten() for a in full])
    return ((flat_first - flat_full).norm() / flat_full.norm()).item()


def test_truncated_meta_training_over_two_segments_equals_the_written_out_procedure():
    """horizon 4, truncation 2, SGD: segment 1 from θ_0; φ ← φ − η ∇_φ (f(θ_1) + f(θ_2)) / 2; segment 2 from θ_2,
    the LSTM states and ∇_2 carried over as constants and run with the updated φ; a second step on
    (f(θ_3) + f(θ_4)) / 2. The reference is the per-coordinate LSTMCell loop, updated by hand."""
    torch.manual_seed(1)
    net = LSTMOptimizer(hidden=6, layers=2, output_scale=0.2).double()
    loop = CoordinateLoop(net)
    f, theta0 = quadratic_problem(dim=4, seed=2)
    lr = 0.05
    initial = copy.deepcopy(net)
    history = meta_train(net, lambda: (f, theta0), torch.optim.SGD(net.parameters(), lr=lr), problems=1,
                         horizon=4, truncation=2)
    losses, theta, states, grad = [], theta0, None, None
    for _ in range(2):
        total, theta, states, grad, _ = reference_unroll(loop, f, theta, 2, states, grad)
        grads = torch.autograd.grad(total / 2, list(loop.parameters()))
        with torch.no_grad():
            for p, g in zip(loop.parameters(), grads):
                p -= lr * g
        losses.append(total.item())
        theta = theta.detach()
        states = [[(h.detach(), c.detach()) for h, c in layers] for layers in states]
    want = dict(loop.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-10, atol=1e-12)
    assert history == [pytest.approx(sum(losses) / 4, rel=1e-10)]
    assert max((p - q).abs().max() for p, q in zip(net.parameters(), initial.parameters())) > 1e-4   # φ moved


def test_quadratic_is_the_squared_norm_of_its_documented_draws():
    """Reference: the docstring (Andrychowicz et al. section 3.1): ``f(θ) = ‖Wθ − y‖²`` (a sum of squares, not a
    mean), with ``W``, ``y`` and then ``θ_0`` drawn standard normal from the generator in that order."""
    dim = 7
    f, theta0 = quadratic(dim, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    W, y, start = torch.randn(dim, dim, generator=g), torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    torch.testing.assert_close(theta0, start)
    point = torch.linspace(-1, 1, dim)
    expected = sum((sum(W[i, j] * point[j] for j in range(dim)) - y[i]) ** 2 for i in range(dim))
    torch.testing.assert_close(f(point), expected, rtol=1e-5, atol=1e-5)
