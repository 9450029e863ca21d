import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowlearn.cost import training_memory
from lowlearn.lowrank import (DLRT, LowRankConv2d, LowRankLayer, LowRankLinear, dense_parameters, low_rank_layers,
                              to_low_rank)
from lowlearn.models import MLP
from lowlearn.train import NonFiniteLossError, fit, load_checkpoint, save_checkpoint


def teacher_data(rank, n=24, m=32, samples=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(n, rank, generator=generator) @ torch.randn(rank, m, generator=generator) / rank ** 0.5
    x = torch.randn(samples, m, generator=generator)
    return x, x @ W.T, W


def dlrt_steps(model, dlrt, x, y, steps, loss_fn=F.mse_loss):
    """``steps`` DLRT steps on the batch ``(x, y)``; returns the loss of each step's first pass."""
    losses = []
    for _ in range(steps):
        dlrt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        dlrt.step(lambda: loss_fn(model(x), y))
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tol", [None, 0.05])
def test_factors_stay_orthonormal_and_the_loss_falls(tol):
    torch.manual_seed(0)
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 6, bias=False))
    dlrt = DLRT(model, lr=1.0, tol=tol)
    losses = dlrt_steps(model, dlrt, x, y, 300)
    layer = model[0]
    eye = torch.eye(layer.rank)
    assert torch.linalg.matrix_norm(layer.U.T @ layer.U - eye) < 1e-4
    assert torch.linalg.matrix_norm(layer.V.T @ layer.V - eye) < 1e-4
    assert losses[-1] < 0.05 * losses[0]
    if tol is None:
        assert layer.rank == 6


@pytest.mark.parametrize("teacher_rank, start_rank", [(5, 1), (3, 16)])
def test_rank_adapts_to_what_a_teacher_needs(teacher_rank, start_rank):
    # From rank 1 it grows to the teacher's 5; from 16 it shrinks to the teacher's 3.
    torch.manual_seed(0)
    x, y, W = teacher_data(teacher_rank)
    model = nn.Sequential(LowRankLinear(32, 24, start_rank, bias=False))
    dlrt = DLRT(model, lr=1.0, tol=0.02)
    dlrt_steps(model, dlrt, x, y, 600)
    assert model[0].rank == teacher_rank
    assert torch.linalg.matrix_norm(model[0].matrix() - W) < 0.05 * torch.linalg.matrix_norm(W)


def test_rank_bounds():
    x, y, _ = teacher_data(6)
    for r_min, r_max, expected in ((8, None, 8), (1, 4, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(LowRankLinear(32, 24, 2, bias=False))
        dlrt = DLRT(model, lr=1.0, tol=0.02, r_min=r_min, r_max=r_max)
        dlrt_steps(model, dlrt, x, y, 200)
        assert model[0].rank == expected
    # Without DLRT's own r_max, each layer's r_max (to_low_rank's, or LowRankLinear's) bounds its rank.
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(32, 24, 2, bias=False, r_max=3))
    dlrt_steps(model, DLRT(model, lr=1.0, tol=0.02), x, y, 100)
    assert model[0].rank == 3


def test_fit_trains_a_mixed_model_with_dlrt():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=generator)
    y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2] > 0).long()
    model = to_low_rank(MLP(in_features=20, hidden=(32, 32), out_features=4), ["1", "3"], rank=4)
    dlrt = DLRT(model, lr=0.1, tol=0.1, optimizer=torch.optim.SGD(
        [p for n, p in model.named_parameters() if n.startswith("5") or n.endswith("bias")], lr=0.1, momentum=0.9))
    bias_before = model[1].bias.detach().clone()
    history = fit(model, (x, y), dlrt, epochs=30, batch_size=32, log_every=8, device="cpu")
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert not torch.equal(model[1].bias, bias_before)                   # the dense optimizer ran
    assert set(dlrt.ranks()) == {"1", "3"} and all(r >= 1 for r in dlrt.ranks().values())


def test_bad_input():
    with pytest.raises(ValueError, match="no low-rank layer"):
        DLRT(MLP(), lr=0.1)
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    with pytest.raises(ValueError, match=r"ϑ must be in \[0, 1\)"):
        DLRT(model, lr=0.1, tol=1.5)
    for lr in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a positive, finite"):
            DLRT(model, lr=lr)
    for betas in ((0.9,), (0.9, 0.99, 0.5), (0.9, 1.0), 0.9, ("a", "b"), (0.9, None)):
        with pytest.raises(ValueError, match="betas must be two numbers"):
            DLRT(model, lr=0.1, betas=betas)
    for eps in (-1.0, 10**400):                                        # 10**400: beyond a float
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            DLRT(model, lr=0.1, eps=eps)
    with pytest.raises(ValueError, match="with tol=None the ranks stay"):
        DLRT(model, lr=0.1, r_max=2)
    with pytest.raises(ValueError, match="with tol=None the ranks stay"):
        DLRT(model, lr=0.1, r_min=2)
    with pytest.raises(ValueError, match="lr must be a positive, finite"):
        DLRT(model, lr=True)
    assert DLRT(model, lr=np.float32(0.1), eps=np.float64(1e-8)).defaults["lr"] == pytest.approx(0.1)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=f"factors are {dtype}, for which torch has no QR or SVD"):
            DLRT(copy.deepcopy(model).to(dtype), lr=0.1)
    with pytest.raises(ValueError, match="r_min must be an int >= 1"):
        DLRT(model, lr=0.1, r_min=0)
    for r_max in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"r_max \(None or at least r_min\) must be an int >= 1"):
            DLRT(model, lr=0.1, tol=0.1, r_max=r_max)
    with pytest.raises(ValueError, match=r"at least r_min\) must be an int >= 3; got 2"):
        DLRT(model, lr=0.1, tol=0.1, r_min=3, r_max=2)
    with pytest.raises(ValueError, match="the optimizer holds 3 low-rank factors, which DLRT steps itself"):
        DLRT(model, lr=0.1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    DLRT(model, lr=0.1, optimizer=torch.optim.SGD(dense_parameters(model), lr=0.1))
    frozen_stem = nn.Sequential(nn.Linear(4, 8).requires_grad_(False), LowRankLinear(8, 6, 2), nn.Linear(6, 3))
    DLRT(frozen_stem, lr=0.1, optimizer=torch.optim.SGD([p for p in dense_parameters(frozen_stem) if p.requires_grad],
                                                        lr=0.1))        # a frozen parameter needs no optimizer
    dlrt = DLRT(model, lr=0.1)
    with pytest.raises(RuntimeError, match="has no gradient: run forward and backward"):
        dlrt.step(lambda: model(torch.randn(2, 784)).sum())
    assert low_rank_layers(model)["1"].rank == 2


def test_a_closure_that_leaves_a_low_rank_layer_out_is_refused():
    torch.manual_seed(0)
    two = nn.ModuleDict({"a": LowRankLinear(6, 6, 2), "b": LowRankLinear(6, 6, 2)})
    x = torch.randn(5, 6)
    dlrt = DLRT(two, lr=0.1)                   # at fixed rank: with tol the S-step needs no closure
    (two["a"](x).sum() + two["b"](x).sum()).backward()
    with pytest.raises(RuntimeError, match=r"does not depend on the low-rank layers \['b'\]"):
        dlrt.step(lambda: two["a"](x).sum())


@pytest.mark.parametrize("retain_graph", [False, True])
def test_a_closure_that_calls_backward_itself_is_refused_and_the_step_undone(retain_graph):
    # As torch.optim.LBFGS's closures do. Without retain_graph, DLRT's own backward used to fail with torch's
    # "backward through the graph a second time"; with it, the S-step took twice the gradient.
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(6, 5, 2), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    dlrt = DLRT(model, lr=0.1)
    F.mse_loss(model(x), y).backward()
    before = [factor.clone() for factor in (model[0].U, model[0].S, model[0].V)]

    def closure():
        loss = F.mse_loss(model(x), y)
        loss.backward(retain_graph=retain_graph)
        return loss

    with pytest.raises(RuntimeError, match="the closure called backward itself"):
        dlrt.step(closure)
    for factor, start in zip((model[0].U, model[0].S, model[0].V), before):
        assert torch.equal(factor, start)


@pytest.mark.parametrize("tol", [None, 0.1])
def test_a_wrapped_optimizer_that_fails_in_its_step_leaves_the_factors_and_their_moments_as_they_were(tol):
    # As torch.optim.LBFGS does without a closure: it raises before it changes a parameter.
    class FailsWhenTold(torch.optim.SGD):
        fail = False

        def step(self, closure=None):
            if self.fail:
                raise RuntimeError("the wrapped optimizer failed")
            return super().step(closure)

    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(6, 5, 2), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    sgd = FailsWhenTold(dense_parameters(model), lr=0.1)
    dlrt = DLRT(model, lr=0.1, tol=tol, betas=(0.9, 0.999), optimizer=sgd)
    dlrt_steps(model, dlrt, x, y, 1)
    before, moments = [p.clone() for p in model.parameters()], copy.deepcopy(dlrt.state["0"])
    sgd.fail = True
    with pytest.raises(RuntimeError, match="the wrapped optimizer failed"):
        dlrt_steps(model, dlrt, x, y, 1)
    for p, start in zip(model.parameters(), before):
        assert torch.equal(p, start)
    assert dlrt.state["0"].keys() == moments.keys()
    assert all(torch.equal(torch.as_tensor(dlrt.state["0"][key]), torch.as_tensor(moments[key])) for key in moments)


@pytest.mark.parametrize("betas", [None, (0.9, 0.999)])
def test_a_frozen_low_rank_layer_stays_as_it_is_and_the_others_train_as_beside_a_fixed_dense_layer(betas):
    # Reference: the frozen layer replaced by a frozen dense copy of itself, which DLRT does not see at all.
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    model = nn.Sequential(LowRankLinear(8, 6, 3), nn.Tanh(), LowRankLinear(6, 3, 2))
    model[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    reference[0] = reference[0].to_dense().requires_grad_(False)
    frozen = [factor.clone() for factor in (model[0].U, model[0].S, model[0].V)]
    dlrt_steps(model, DLRT(model, lr=0.1, tol=0.1, betas=betas), x, y, 5)
    dlrt_steps(reference, DLRT(reference, lr=0.1, tol=0.1, betas=betas), x, y, 5)
    for before, after in zip(frozen, (model[0].U, model[0].S, model[0].V)):
        assert torch.equal(before, after) and not after.requires_grad
    assert model[2].rank == reference[2].rank
    torch.testing.assert_close(model[2].matrix(), reference[2].matrix())
    torch.testing.assert_close(model[2].bias, reference[2].bias)


@pytest.mark.parametrize("tol", [None, 0.1])
def test_with_every_low_rank_layer_frozen_the_dense_parameters_take_plain_gradient_steps(tol):
    # Nothing to truncate: the factors stay, the head steps as torch's SGD steps a twin of the model.
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    model = nn.Sequential(LowRankLinear(8, 6, 3), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    frozen = [factor.clone() for factor in (model[0].U, model[0].S, model[0].V)]
    dlrt_steps(model, DLRT(model, lr=0.1, tol=tol), x, y, 3)
    sgd = torch.optim.SGD(dense_parameters(reference), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        F.mse_loss(reference(x), y).backward()
        sgd.step()
    for before, after in zip(frozen, (model[0].U, model[0].S, model[0].V)):
        assert torch.equal(before, after)
    for a, b in zip(dense_parameters(model), dense_parameters(reference)):
        torch.testing.assert_close(a, b)


def test_a_low_rank_layer_frozen_in_part_is_refused():
    model = nn.Sequential(LowRankLinear(8, 6, 3), nn.Tanh(), LowRankLinear(6, 3, 2))
    model[0].S.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0' has some of its factors U, S, V frozen .*layer.requires_grad_\(False\)"):
        DLRT(model, lr=0.1)
    model[0].S.requires_grad_(True)
    dlrt = DLRT(model, lr=0.1)
    model[0].U.requires_grad_(False)                 # frozen in part after the optimizer was built
    F.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 3)).backward()
    with pytest.raises(ValueError, match="layer '0' has some of its factors"):
        dlrt.step(lambda: model(torch.randn(4, 8)).sum())


def test_a_diverged_rank_adaptive_step_is_a_non_finite_loss_error_and_is_undone():
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 6, bias=False), nn.Linear(24, 24))
    before = copy.deepcopy(model.state_dict())
    dlrt = DLRT(model, lr=1.0, tol=0.1)
    with pytest.raises(NonFiniteLossError, match="S-step core of layer '0' is not finite"):
        dlrt_steps(model, dlrt, x * float("nan"), y, 1)
    for name, value in model.state_dict().items():              # the factors and the dense layer: untouched
        assert torch.equal(value, before[name]), name
    dlrt_steps(model, dlrt, x, y, 2)                        # and the model trains on


def test_the_kept_signals_follow_the_gradients_and_are_not_copied():
    """Kept with tol only, cleared by zero_grad, by a forward pass that finds U.grad cleared, and after a step;
    a deep copy starts without them; a forward pass without backward adds none."""
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.Tanh(), LowRankLinear(6, 3, 2))
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    loss = lambda: F.cross_entropy(model(x), y)                 # noqa: E731
    DLRT(model, lr=0.1)
    loss().backward()
    assert not model[0].signals                                 # fixed rank keeps none
    dlrt = DLRT(model, lr=0.1, tol=0.1)
    dlrt.zero_grad()
    loss().backward()
    assert len(model[0].signals) == 1 and not model[0].signals[0][1].requires_grad
    assert torch.equal(model[0].signals.core_gradient, model[0].S.grad)    # ∂L/∂S as the backward pass gave it
    with torch.no_grad():
        model(x)
    assert len(model[0].signals) == 1                           # evaluation leaves them
    assert not copy.deepcopy(model)[0].signals and len(model[0].signals) == 1
    loss().backward()                                           # accumulating, as U.grad does
    assert len(model[0].signals) == 2
    model.zero_grad()
    loss().backward()
    assert len(model[0].signals) == 1
    dlrt.step()
    assert not model[0].signals and model[0].U.grad is None and model[0].signals.core_gradient is None
    loss().backward()
    dlrt.zero_grad()
    assert not model[0].signals and model[0].signals.core_gradient is None


def test_after_its_last_step_rank_adaptive_dlrt_has_the_layers_keep_nothing_for_another_optimizer():
    # Fine-tuning the other parameters with SGD afterwards must not pile up one (x, δ) pair per step.
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    dlrt = DLRT(model, lr=0.1, tol=0.1)
    dlrt_steps(model, dlrt, x, y, 2, F.cross_entropy)
    sgd = torch.optim.SGD(dense_parameters(model), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()
    assert not model[0].signals and not model[0].keeps_signals
    model.zero_grad()                                       # not the DLRT's: it kept no pass for its S-step
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"layer '0' kept no backward pass for the S-step: .* call dlrt.zero_grad"):
        dlrt.step()
    dlrt_steps(model, dlrt, x, y, 1, F.cross_entropy)       # with its zero_grad it trains on


def _moments(dlrt):
    return {name: {key: value if key == "step" else value.clone() for key, value in state.items()}
            for name, state in dlrt.state.items()}


@pytest.mark.parametrize("tol", [None, 0.1])
@pytest.mark.parametrize("betas", [None, (0.9, 0.99)])
def test_a_failed_s_step_leaves_the_factors_and_moments_as_they_were(betas, tol, monkeypatch):
    # With tol, 2r > n: the augmented core is 3 × 4, which every later backward pass would refuse if it were left
    # in place. The S-step fails half-way through its pass (fixed rank) or while it forms its gradient (tol).
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(8, 3, 2), nn.ReLU(), nn.Linear(3, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    dlrt = DLRT(model, lr=0.1, tol=tol, betas=betas)
    loss = lambda: F.cross_entropy(model(x), y)                   # noqa: E731
    for _ in range(2):
        dlrt.zero_grad()
        loss().backward()
        dlrt.step(loss)
    state, moments = copy.deepcopy(model.state_dict()), _moments(dlrt)

    def failing_closure():
        loss().backward()
        raise KeyboardInterrupt

    def failing_gradient(layer):
        raise KeyboardInterrupt

    dlrt.zero_grad()
    loss().backward()
    assert bool(model[0].signals) == (tol is not None)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(LowRankLayer, "galerkin_gradient", failing_gradient)
        dlrt.step(failing_closure)
    assert model[0].S.shape == state["0.S"].shape and model[0].kl_gradients
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert model[0].U.grad is None and model[2].weight.grad is None and not model[0].signals   # run it again
    after = _moments(dlrt)
    assert after.keys() == moments.keys()
    for name, saved in moments.items():
        assert after[name].keys() == saved.keys()
        for key, value in saved.items():
            assert (after[name][key] == value) if key == "step" else torch.equal(after[name][key], value)
    assert [id(p) for p in dlrt.param_groups[0]["params"]] == [id(getattr(model[0], n)) for n in "USV"]
    dlrt.zero_grad()
    loss().backward()
    dlrt.step(loss)                                               # the next step runs
    assert model[0].S.shape[0] == model[0].S.shape[1]


def test_a_diverged_core_whose_svd_returns_nan_is_a_non_finite_loss_error(monkeypatch):
    # On a GPU the SVD of a matrix with NaN entries returns NaN instead of raising, as it does on the CPU.
    def svd_without_error_check(matrix, full_matrices=True):
        nan = torch.full(matrix.shape, float("nan"))
        return nan, torch.full(matrix.shape[-1:], float("nan")), nan

    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 6, bias=False))
    monkeypatch.setattr(torch.linalg, "svd", svd_without_error_check)
    with pytest.raises(NonFiniteLossError, match="S-step core of layer '0' is not finite"):
        dlrt_steps(model, DLRT(model, lr=1.0, tol=0.1), x, y, 1)


def test_the_error_names_only_the_layers_whose_core_diverged_and_every_layer_is_undone(monkeypatch):
    svd = torch.linalg.svd

    def nan_for_the_second_layer(matrix, full_matrices=True):     # its augmented core is 2 · 3 = 6 wide
        if matrix.shape[-1] != 6:
            return svd(matrix, full_matrices=full_matrices)
        nan = torch.full(matrix.shape, float("nan"))
        return nan, torch.full(matrix.shape[-1:], float("nan")), nan

    torch.manual_seed(0)
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 6, bias=False), nn.Tanh(), LowRankLinear(24, 24, 3, bias=False))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    monkeypatch.setattr(torch.linalg, "svd", nan_for_the_second_layer)
    with pytest.raises(NonFiniteLossError, match=r"S-step core of layer '2' is not finite"):
        dlrt_steps(model, DLRT(model, lr=0.1, tol=0.1), x, y, 1)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_adam_style_steps_train_and_keep_the_factors_orthonormal():
    torch.manual_seed(0)
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 8, bias=False))
    dlrt = DLRT(model, lr=0.05, tol=0.02, betas=(0.9, 0.999))
    losses = dlrt_steps(model, dlrt, x, y, 300)
    layer = model[0]
    eye = torch.eye(layer.rank)
    assert torch.linalg.matrix_norm(layer.U.T @ layer.U - eye) < 1e-4
    assert losses[-1] < 0.05 * losses[0]
    # Normalised steps give weak directions the same size as strong ones, so more of them
    # survive the truncation than with plain steps; never fewer than the teacher needs.
    r = layer.rank
    assert r >= 4
    state = dlrt.state["0"]
    assert state["step"] == 300
    assert state["K"][0].shape == (24, r) and state["L"][0].shape == (32, r) and state["S"][0].shape == (r, r)


def test_adam_direction_and_the_change_of_basis_of_its_moments():
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    dlrt = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    g = torch.zeros(8, 2)                                     # K's gradient has U's shape
    g[:2] = torch.tensor([[0.5, -2.0], [1e-3, 4.0]])
    # First step: m̂ = g, v̂ = g², so the direction is g / (|g| + ε), about sign(g).
    assert torch.allclose(dlrt.direction("1", "K", g), g.sign(), atol=1e-4)
    assert dlrt.state["1"]["step"] == 1
    # Rotating the moments: m ← Pᵀ m Q, v ← (P∘P)ᵀ v (Q∘Q); rotating back restores the first moment.
    generator = torch.Generator().manual_seed(0)
    P, Q = (torch.linalg.qr(torch.randn(n, n, generator=generator)).Q for n in (8, 2))
    m, v = (moment.clone() for moment in dlrt.state["1"]["K"])
    dlrt._rotate("1", "K", P, Q)
    assert torch.allclose(dlrt.state["1"]["K"][0], P.T @ m @ Q, atol=1e-6)
    assert torch.allclose(dlrt.state["1"]["K"][1], P.square().T @ v @ Q.square(), atol=1e-6)
    dlrt._rotate("1", "K", P.T, Q.T)
    assert torch.allclose(dlrt.state["1"]["K"][0], m, atol=1e-6)
    assert (dlrt.state["1"]["K"][1] >= 0).all()
    buffer = io.BytesIO()
    torch.save(dlrt.state_dict(), buffer)
    buffer.seek(0)
    restored = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state["1"]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.state["1"]["K"], dlrt.state["1"]["K"]))
    with pytest.raises(ValueError, match="betas must be two numbers"):
        DLRT(model, lr=0.1, betas=(0.9, 1.0))


def test_dlrt_is_a_torch_optimizer_whose_schedulers_set_every_step_size():
    # A scheduler that halves the learning rate at once gives the trajectory of DLRT built with half of it,
    # for the factors (λ) and for the dense parameters (the biases and the dense output layer) alike.
    torch.manual_seed(0)
    base = to_low_rank(MLP(in_features=20, hidden=(32, 32), out_features=4), ["1", "3"], rank=6)
    x, y = torch.randn(64, 20), torch.randint(0, 4, (64,))
    halved, reference = copy.deepcopy(base), copy.deepcopy(base)
    dlrt = DLRT(halved, lr=0.2, tol=0.1)
    assert isinstance(dlrt, torch.optim.Optimizer) and len(dlrt.param_groups) == 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(dlrt, lambda step: 0.5)
    assert dlrt.lr == 0.1 and [g["lr"] for g in dlrt.param_groups] == [0.1, 0.1]
    plain = DLRT(reference, lr=0.1, tol=0.1)
    for model, optimizer in ((halved, dlrt), (reference, plain)):
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step(lambda: F.cross_entropy(model(x), y))
    assert scheduler.get_last_lr() == [0.1, 0.1]
    assert all(torch.equal(a, b) for a, b in zip(halved.state_dict().values(), reference.state_dict().values()))
    # The factors' group follows the layers' current factors, whose shapes change with the rank.
    assert [p.shape for p in dlrt.param_groups[0]["params"]] == [p.shape for n, p in halved.named_parameters()
                                                                 if n.split(".")[-1] in ("U", "S", "V")]


@pytest.mark.parametrize("tol", [None, 0.1])
def test_a_deep_copy_with_its_model_trains_as_the_original(tol):
    # torch's Optimizer.__getstate__ keeps only defaults, groups and state: the copy had no model nor optimizer
    # ("'DLRT' object has no attribute 'optimizer'" at its first zero_grad)
    x, y, _ = teacher_data(4)
    torch.manual_seed(0)
    model = to_low_rank(nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 24)), ["0"], rank=8)
    dlrt = DLRT(model, lr=0.1, tol=tol, betas=(0.9, 0.99), optimizer=torch.optim.Adam(dense_parameters(model)))
    dlrt_steps(model, dlrt, x, y, 2)
    twin, twin_dlrt = copy.deepcopy((model, dlrt))
    assert twin_dlrt.model is twin
    assert {id(p) for p in twin_dlrt.optimizer.param_groups[0]["params"]} == {id(p) for p in dense_parameters(twin)}
    assert dlrt_steps(twin, twin_dlrt, x, y, 3) == dlrt_steps(model, dlrt, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))


def test_state_dict_keeps_scheduled_learning_rates_and_moments():
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    dlrt = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.StepLR(dlrt, step_size=1, gamma=0.1)
    dlrt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 784)), torch.tensor([0, 1, 2, 3])).backward()
    dlrt.step(lambda: F.cross_entropy(model(torch.randn(4, 784)), torch.tensor([0, 1, 2, 3])))
    scheduler.step()
    buffer = io.BytesIO()
    torch.save(dlrt.state_dict(), buffer)
    buffer.seek(0)
    restored = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.lr == pytest.approx(0.01) and restored.param_groups[1]["lr"] == pytest.approx(0.01)
    assert restored.state["1"]["step"] == 1 and torch.equal(restored.state["1"]["S"], dlrt.state["1"]["S"])
    # The format of earlier versions: no learning rates, the moments as (m, v) pairs.
    old = {"optimizer": None, "moments": {"1": {"step": 1, "K": tuple(dlrt.state["1"]["K"])}}}
    restored.load_state_dict(old)
    assert torch.equal(restored.state["1"]["K"], dlrt.state["1"]["K"])
    # Moments saved on one device go to the layer's: saved in float64 here, loaded into float32 factors.
    restored.load_state_dict({**dlrt.state_dict(), "state": {"1": {key: value if key == "step" else value.double()
                                                                   for key, value in dlrt.state["1"].items()}}})
    assert restored.state["1"]["S"].dtype == torch.float32
    with_optimizer = DLRT(model, lr=0.1, optimizer=torch.optim.SGD(dense_parameters(model), lr=0.1))
    with pytest.raises(ValueError, match="saved by a DLRT built without an optimizer argument and this one is built "
                                         "with"):
        with_optimizer.load_state_dict(dlrt.state_dict())
    with pytest.raises(ValueError, match="saved by a DLRT built with an optimizer argument and this one is built "
                                         "without"):
        dlrt.load_state_dict(with_optimizer.state_dict())
    # Earlier versions saved one group with an optimizer: its parameters were not listed in a second.
    earlier = with_optimizer.state_dict()
    earlier["param_groups"] = [{**earlier["param_groups"][0], "lr": 0.05}]
    with_optimizer.load_state_dict(earlier)
    assert [group["lr"] for group in with_optimizer.param_groups] == [0.05, 0.1]
    without_dense = DLRT(to_low_rank(nn.Sequential(nn.Linear(784, 8, bias=False)), ["0"], rank=2), lr=0.1)
    with pytest.raises(ValueError, match="2 parameter groups and this DLRT 1: build it on the same model"):
        without_dense.load_state_dict({**dlrt.state_dict(), "state": {}})
    with pytest.raises(ValueError, match=r"moments of low-rank layers \['1'\], which the model lacks"):
        DLRT(to_low_rank(MLP(hidden=(8,)), ["3"], rank=2), lr=0.1, betas=(0.9, 0.999)).load_state_dict(
            dlrt.state_dict())


def test_a_checkpoint_restores_tol_r_min_r_max_betas_and_eps_as_torch_restores_hyperparameters(tmp_path):
    # a DLRT built with other settings (the defaults here: fixed rank, plain steps) loaded the moments and went on
    # with its own settings, silently
    settings = {"tol": 0.5, "r_min": 2, "r_max": 6, "betas": (0.9, 0.99), "eps": 1e-6}

    def model_and_dlrt(**kwargs):
        torch.manual_seed(0)
        model = to_low_rank(MLP(in_features=20, hidden=(16,), out_features=4), ["1"], rank=8)
        return model, DLRT(model, lr=0.2, **kwargs)

    x, y = torch.randn(32, 20, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    model, dlrt = model_and_dlrt(**settings)
    dlrt_steps(model, dlrt, x, y, 3, loss_fn=F.cross_entropy)
    save_checkpoint(tmp_path / "run.pt", model, dlrt)
    resumed, resumed_dlrt = model_and_dlrt()
    load_checkpoint(tmp_path / "run.pt", resumed, resumed_dlrt)
    assert {key: getattr(resumed_dlrt, key) for key in settings} == settings and not resumed_dlrt.needs_closure
    dlrt_steps(model, dlrt, x, y, 3, loss_fn=F.cross_entropy)
    F.cross_entropy(resumed(x), y).backward()               # rank-adaptive from the load on, before any zero_grad:
    resumed_dlrt.step()                                     # the layers kept this pass for the S-step
    dlrt_steps(resumed, resumed_dlrt, x, y, 2, loss_fn=F.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    # A state of earlier versions saved no settings: the DLRT keeps its own.
    _, earlier = model_and_dlrt(tol=0.1)
    earlier.load_state_dict({**dlrt.state_dict(), "param_groups": [{"lr": 0.1}, {"lr": 0.1}]})
    assert earlier.tol == 0.1 and earlier.betas is None and earlier.lr == 0.1


def test_settings_given_as_numpy_numbers_are_kept_as_python_numbers_so_a_checkpoint_can_be_saved(tmp_path):
    # r_min, r_max, betas and eps were kept as given: state_dict() then held NumPy scalars, which
    # torch.load(weights_only=True) refuses, and save_checkpoint failed at the end of training
    torch.manual_seed(0)
    model = to_low_rank(MLP(in_features=20, hidden=(16,), out_features=4), ["1"], rank=8)
    dlrt = DLRT(model, lr=np.float32(0.2), tol=np.float64(0.5), r_min=np.int64(2), r_max=np.int64(6),
                betas=[np.float64(0.9), np.float32(0.99)], eps=np.float64(1e-6))
    save_checkpoint(tmp_path / "run.pt", model, dlrt)
    assert {key: (getattr(dlrt, key), type(getattr(dlrt, key))) for key in ("r_min", "r_max", "eps")} == {
        "r_min": (2, int), "r_max": (6, int), "eps": (1e-6, float)}
    assert dlrt.betas == (0.9, float(np.float32(0.99))) and {type(b) for b in dlrt.betas} == {float}


def test_a_checkpoint_restores_the_ranks_and_moments_and_without_the_model_state_the_step_says_so(tmp_path):
    # Saved after the ranks fell, loaded into a model built at its starting rank: the optimizer's state
    # (moments at the saved ranks) and the model's (the factors) go in together and the next steps match.
    def model_and_dlrt():
        torch.manual_seed(0)
        model = to_low_rank(MLP(in_features=20, hidden=(16,), out_features=4), ["1"], rank=8)
        return model, DLRT(model, lr=0.2, tol=0.5, betas=(0.9, 0.999))

    x, y = torch.randn(32, 20, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4

    def steps(model, dlrt, n):
        dlrt_steps(model, dlrt, x, y, n, loss_fn=F.cross_entropy)

    model, dlrt = model_and_dlrt()
    steps(model, dlrt, 5)
    assert dlrt.ranks()["1"] < 8
    save_checkpoint(tmp_path / "run.pt", model, dlrt)
    resumed, resumed_dlrt = model_and_dlrt()
    load_checkpoint(tmp_path / "run.pt", resumed, resumed_dlrt)
    steps(model, dlrt, 3)
    steps(resumed, resumed_dlrt, 3)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    _, orphan = model_and_dlrt()                              # the optimizer's state alone: ranks disagree
    orphan.load_state_dict(dlrt.state_dict())
    with pytest.raises(RuntimeError, match=r"K-moments of layer '1' have shape \(16, \d\) and its gradient "
                                           r"\(16, 8\): the optimizer's state was loaded without the model's"):
        steps(orphan.model, orphan, 1)


def test_training_memory_counts_the_factor_moments_and_the_dense_optimizer():
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    batch = (torch.randn(4, 784), torch.tensor([0, 1, 2, 3]))
    dense = torch.optim.Adam(dense_parameters(model), lr=0.1)
    dlrt = DLRT(model, lr=0.1, betas=(0.9, 0.999), optimizer=dense)
    dlrt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    dlrt.step(lambda: F.cross_entropy(model(batch[0]), batch[1]))
    moments = sum(t.nbytes for layer in dlrt.state.values() for t in layer.values() if torch.is_tensor(t))
    adam = sum(t.nbytes for s in dense.state.values() for t in s.values())
    assert moments == 2 * 4 * (784 * 2 + 8 * 2 + 2 * 2) and adam > 0
    assert training_memory(model, dlrt, batch, F.cross_entropy).optimizer_state == moments + adam


def _dense_gradient(W, x, y, b=0.0):
    """∂L/∂W of the mean-squared error of x Wᵀ + b against y, by autograd on a dense W."""
    W = W.detach().requires_grad_()
    return torch.autograd.grad(F.mse_loss(x @ W.T + b, y), W)[0]


@pytest.mark.parametrize("full_core", [False, True])
@pytest.mark.parametrize("tol", [None, 0.3])
def test_one_step_is_the_k_l_and_s_steps_of_the_paper(tol, full_core):
    """Schotthöfer et al. (2022), Algorithm 1, written out with a dense ∂L/∂W in float64.

    ``full_core``: S is not diagonal, as after any fixed-rank step (K = U S and L = V Sᵀ then differ from
    U Sᵀ and V S).
    """
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 2, bias=False).double()
    if full_core:
        with torch.no_grad():
            layer.S.copy_(torch.tensor([[1.5, 0.7], [-0.4, 0.9]], dtype=torch.float64))
    model = nn.Sequential(layer)
    x, y = torch.randn(16, 7, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    lr = 0.5
    U, S, V = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
    G = _dense_gradient(U @ S @ V.T, x, y)
    K1, L1 = U @ S - lr * G @ V, V @ S.T - lr * G.T @ U                     # K- and L-steps
    if tol is None:
        U1, V1 = torch.linalg.qr(K1).Q, torch.linalg.qr(L1).Q
    else:                                                                     # augmented bases, rank 2r
        U1, V1 = torch.linalg.qr(torch.cat([K1, U], 1)).Q, torch.linalg.qr(torch.cat([L1, V], 1)).Q
    S_tilde = (U1.T @ U) @ S @ (V1.T @ V).T                                   # S̃ = M S Nᵀ
    S1 = S_tilde - lr * U1.T @ _dense_gradient(U1 @ S_tilde @ V1.T, x, y) @ V1   # S-step
    expected = U1 @ S1 @ V1.T
    if tol is not None:                                                       # truncation
        P, sigma, Qh = torch.linalg.svd(S1)
        r = max(1, int((sigma.flip(0).square().cumsum(0).flip(0).sqrt() > tol * sigma.norm()).sum()))
        expected = U1 @ P[:, :r] @ torch.diag(sigma[:r]) @ Qh[:r] @ V1.T
        assert 0 < r < S1.shape[0]                                            # the truncation did something
    dlrt = DLRT(model, lr=lr, tol=tol)
    dlrt_steps(model, dlrt, x, y, 1)
    assert torch.allclose(layer.matrix(), expected, rtol=1e-10, atol=1e-12)
    assert layer.rank == (2 if tol is None else r)


@pytest.mark.parametrize("lr_dense", [None, 0.125])
def test_dense_parameters_take_the_plain_gradient_step_of_the_s_step_pass(lr_dense):
    """The bias steps by its gradient in the S-step's pass (weights U₁ S̃ V₁ᵀ), not the first pass's, nor both,
    at its own group's learning rate (set apart from the factors' λ, as a scheduler per group would)."""
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 2).double()
    model = nn.Sequential(layer)
    x, y = torch.randn(16, 7, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    lr = 0.5
    U, S, V, b = (t.detach().clone() for t in (layer.U, layer.S, layer.V, layer.bias))
    G = _dense_gradient(U @ S @ V.T, x, y, b)
    U1, V1 = torch.linalg.qr(U @ S - lr * G @ V).Q, torch.linalg.qr(V @ S.T - lr * G.T @ U).Q   # K- and L-steps
    S_tilde = (U1.T @ U) @ S @ (V1.T @ V).T
    bias = b.clone().requires_grad_()
    g_bias = torch.autograd.grad(F.mse_loss(x @ (U1 @ S_tilde @ V1.T).T + bias, y), bias)[0]   # the S-step pass
    first = torch.autograd.grad(F.mse_loss(x @ (U @ S @ V.T).T + bias, y), bias)[0]             # the first pass
    assert not torch.allclose(g_bias, first)                            # the two passes' gradients differ
    dlrt = DLRT(model, lr=lr)
    if lr_dense is not None:
        dlrt.param_groups[1]["lr"] = lr_dense
    dlrt_steps(model, dlrt, x, y, 1)
    torch.testing.assert_close(layer.bias.detach(), b - (lr_dense or lr) * g_bias, rtol=1e-10, atol=1e-12)


def test_batch_norm_statistics_take_one_update_per_step():
    # The S-step's second pass on the batch must not update the running statistics again.
    torch.manual_seed(0)
    model = to_low_rank(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), ["0"],
                        rank=2).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 3, (16,))
    dlrt = DLRT(model, lr=0.1)
    dlrt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    dlrt.step(lambda: F.cross_entropy(model(x), y))
    reference(x)                                            # one training-mode pass with the same weights
    for name, buffer in model[1].named_buffers():
        assert torch.equal(buffer, dict(reference[1].named_buffers())[name]), name


def test_r_min_above_a_layers_r_max_keeps_the_best_approximation_at_the_layers_r_max():
    """A layer whose own r_max (2) is below DLRT's r_min (3) stays at r_max (DLRT docstring: "a layer whose largest
    rank is smaller stays below it"), and what it keeps is the Eckart–Young best rank-2 approximation of the
    untruncated step. Reference: the same step taken on a twin layer with r_max = min(n, m) and tol = 0 (which keeps
    the whole augmented rank-4 matrix W₁), then the truncated SVD of W₁ at rank 2 by hand."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(24, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, 32, generator=generator,
                                                                                   dtype=torch.float64)
    x = torch.randn(128, 32, generator=generator, dtype=torch.float64)
    y = x @ W.T
    torch.manual_seed(0)
    capped = nn.Sequential(LowRankLinear(32, 24, 2, bias=False, r_max=2).double())
    free = copy.deepcopy(capped)
    free[0].r_max = 24
    dlrt_steps(capped, DLRT(capped, lr=0.1, tol=0.02, r_min=3), x, y, 1)
    dlrt_steps(free, DLRT(free, lr=0.1, tol=0.0), x, y, 1)
    assert free[0].rank == 4                                 # the augmented basis: 2r columns, nothing truncated
    assert capped[0].rank == 2 == capped[0].r_max            # never above the layer's own r_max
    P, sigma, Qh = torch.linalg.svd(free[0].matrix().detach())
    best = P[:, :2] @ torch.diag(sigma[:2]) @ Qh[:2]
    assert torch.allclose(capped[0].matrix().detach(), best, rtol=1e-9, atol=1e-10)


def test_a_scheduler_with_one_lambda_per_group_scales_the_dense_step_alone():
    """LambdaLR with [1, ½]: the factors follow λ as before, the dense parameters move exactly half as far.

    Reference: the same model trained one step with both groups at λ; the S-step pass (and so the dense
    gradients) does not depend on the dense group's learning rate, so Δb and ΔW_dense halve exactly and the
    factors are bit-identical.
    """
    def build():
        torch.manual_seed(0)
        return nn.Sequential(LowRankLinear(12, 8, 3), nn.Tanh(), nn.Linear(8, 4)).double()

    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    moved = []
    for halve in (False, True):
        model = build()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        dlrt = DLRT(model, lr=0.3, tol=0.1)
        if halve:
            torch.optim.lr_scheduler.LambdaLR(dlrt, [lambda step: 1.0, lambda step: 0.5])
        assert dlrt.lr == 0.3
        dlrt_steps(model, dlrt, x, y, 1, loss_fn=F.cross_entropy)
        moved.append({n: p.detach() - before[n] if n in ("0.bias", "2.weight", "2.bias") else p.detach().clone()
                      for n, p in model.named_parameters()})
    full, half = moved
    for name in ("0.bias", "2.weight", "2.bias"):
        assert full[name].abs().max() > 1e-4
        torch.testing.assert_close(half[name], full[name] / 2, rtol=1e-12, atol=1e-15)
    for name in ("0.U", "0.S", "0.V"):
        assert torch.equal(half[name], full[name])


def test_resuming_restores_the_dense_optimizers_momentum():
    """DLRT(optimizer=SGD with momentum): a run stopped after 2 steps and resumed from the model's and DLRT's
    state_dicts takes the same 3rd step as the uninterrupted run.

    Reference: the uninterrupted run itself (bit-identical parameters after step 3), and the momentum buffers
    of the dense optimizer equal to the saved ones right after loading.
    """
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(LowRankLinear(12, 8, 3), nn.Tanh(), nn.Linear(8, 4)).double()
        sgd = torch.optim.SGD(dense_parameters(model), lr=0.2, momentum=0.9)
        return model, DLRT(model, lr=0.3, tol=0.1, optimizer=sgd)

    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))

    def step(model, dlrt, n=1):
        dlrt_steps(model, dlrt, x, y, n, loss_fn=F.cross_entropy)

    model, dlrt = build()
    step(model, dlrt, 2)
    saved_model, saved_dlrt = copy.deepcopy(model.state_dict()), copy.deepcopy(dlrt.state_dict())
    resumed, resumed_dlrt = build()
    resumed.load_state_dict(saved_model)
    resumed_dlrt.load_state_dict(saved_dlrt)
    for p, q in zip(dense_parameters(model), dense_parameters(resumed)):
        momentum = dlrt.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(momentum, resumed_dlrt.optimizer.state[q]["momentum_buffer"])
    step(model, dlrt)
    step(resumed, resumed_dlrt)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _mixed_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 2, 5)), LowRankConv2d(nn.Conv2d(1, 4, 2), 2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(16, 8), nn.Tanh(), LowRankLinear(8, 3, 3))


def _rank_adaptive_run(lr, steps=4, passes=1, change=None, scaler=None):
    """The state of :func:`_mixed_model` after ``steps`` rank-adaptive steps, each with ``passes`` backward passes
    (halves of the batch), then ``change`` applied to every gradient; with a GradScaler ``scaler`` if given."""
    model = _mixed_model()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    dlrt = DLRT(model, lr=lr, tol=0.05)
    for _ in range(steps):
        dlrt.zero_grad()
        for xb, yb in zip(x.chunk(passes), y.chunk(passes)):
            loss = F.cross_entropy(model(xb), yb) / passes
            (loss if scaler is None else scaler.scale(loss)).backward()
        if change is not None:
            change(model)
        if scaler is None:
            dlrt.step()
        else:
            scaler.step(dlrt)
            scaler.update()
    return model.state_dict()


def _scale_gradients(factor):
    def change(model):
        for p in model.parameters():
            p.grad.mul_(factor)
    return change


@pytest.mark.parametrize("passes", [1, 2])
def test_a_rescaling_of_the_gradients_reaches_the_rank_adaptive_s_step(passes):
    # The S-step's gradient is formed from the kept signals: a rescaling of .grad (gradient clipping) reached the
    # K- and L-steps and the other parameters, not the S-step. Plain steps on c·g are steps of c·λ on g.
    reference = _rank_adaptive_run(lr=0.05, passes=passes)
    scaled = _rank_adaptive_run(lr=0.2, passes=passes, change=_scale_gradients(0.25))
    assert reference.keys() == scaled.keys()
    for name in reference:
        torch.testing.assert_close(scaled[name], reference[name], msg=name)


def test_gradient_norm_clipping_reaches_the_rank_adaptive_s_step():
    coefficients = []

    def clip(model):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        coefficients.append(min(1.0, 0.05 / (norm.item() + 1e-6)))

    clipped = _rank_adaptive_run(lr=0.5, steps=1, change=clip)
    assert coefficients[0] < 0.5                                          # the clipping acted
    reference = _rank_adaptive_run(lr=0.5 * coefficients[0], steps=1)
    for name in reference:
        torch.testing.assert_close(clipped[name], reference[name], msg=name)


def test_a_grad_scaler_trains_rank_adaptive_dlrt_as_without_loss_scaling():
    # The loss scaled by 2¹⁰ scaled the S-step's gradient by 2¹⁰ as well.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = _rank_adaptive_run(lr=0.1, scaler=scaler)
    reference = _rank_adaptive_run(lr=0.1)
    for name in reference:
        torch.testing.assert_close(scaled[name], reference[name], msg=name)


def test_zeroed_gradients_leave_the_rank_adaptive_network_as_it_was():
    # A step on no gradient at all changes the bases, not the network (the S-step took the unchanged signals).
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
    model = _mixed_model()
    before = model(x).detach()
    model.load_state_dict(_rank_adaptive_run(lr=0.1, steps=1, change=_scale_gradients(0.0)))
    torch.testing.assert_close(model(x).detach(), before)


def _adam_run(scaler, tol, steps=3, spoil=None):
    """:func:`_mixed_model` after ``steps`` DLRT steps with Adam on its dense parameters, through the GradScaler
    ``scaler`` if given (the closure given positionally at fixed rank); ``spoil(model)`` runs after each backward
    pass. Returns the model's state and the DLRT."""
    model = _mixed_model()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    dlrt = DLRT(model, lr=0.1, tol=tol, optimizer=torch.optim.Adam(dense_parameters(model), lr=0.01))
    for _ in range(steps):
        dlrt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if spoil is not None:
            spoil(model)
        closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        if scaler is None:
            dlrt.step(closure)
        else:
            scaler.step(dlrt, closure)
            scaler.update()
    return model.state_dict(), dlrt


@pytest.mark.parametrize("tol", [0.05, None])
def test_a_grad_scaler_unscales_the_gradients_of_dlrts_optimizer_too(tol):
    # The scaler checks, and DLRT unscales, the gradients of the optimizer DLRT steps: its groups list that
    # optimizer's parameters. (The scaler used to unscale DLRT's factors only, so a scaler was refused then.)
    reference, _ = _adam_run(None, tol)
    scaled, _ = _adam_run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), tol)
    for name in reference:
        torch.testing.assert_close(scaled[name], reference[name], msg=name)


def test_dlrts_groups_list_the_parameters_its_optimizer_holds_then():
    model, extra = _mixed_model(), nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam(dense_parameters(model), lr=0.01)
    dlrt = DLRT(model, lr=0.1, optimizer=adam)
    assert [id(p) for p in dlrt.param_groups[1]["params"]] == [id(p) for p in dense_parameters(model)]
    adam.add_param_group({"params": [extra]})
    dlrt.zero_grad()
    assert [id(p) for p in dlrt.param_groups[1]["params"]] == [id(p) for p in [*dense_parameters(model), extra]]
    # A group added to the DLRT itself would never step (the optimizer steps the other parameters): refused.
    with pytest.raises(ValueError, match=r"add it to that optimizer instead, dlrt.optimizer.add_param_group"):
        dlrt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(dlrt.param_groups) == 2
    plain = DLRT(_mixed_model(), lr=0.1)                       # without one, an added group takes plain steps
    plain.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.5})
    assert len(plain.param_groups) == 3


def test_a_gradient_of_dlrts_optimizer_that_is_not_finite_skips_the_whole_step_and_lowers_the_scale():
    def spoil(model):
        model[4].bias.grad[0] = float("inf")               # the dense layer's only: the factors' are finite

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = _mixed_model().state_dict()
    after, dlrt = _adam_run(scaler, 0.05, steps=2, spoil=spoil)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not dlrt.optimizer.state and not dlrt.state and scaler.get_scale() == 2.0 ** 8


@pytest.mark.parametrize("unscaled_first, overflows", [(False, False), (True, False), (False, True)])
def test_a_grad_scaler_scales_the_loss_of_the_fixed_rank_closures_pass_too(unscaled_first, overflows):
    # The closure, given positionally (the scaler refuses closure=), has its loss scaled by the scaler's scale
    # and its gradients unscaled; after scaler.unscale_(dlrt) DLRT is not told the scale, and the pass runs
    # unscaled; a scaled pass whose gradients overflow runs again unscaled. Each trains as without a scaler.
    # (The closure's pass used to run unscaled always.)
    x, y = torch.randn(16, 10, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
    factor = 1e34 if overflows else 1.0     # (loss / 10³⁴) · 10³⁴: backward multiplies the scale 2¹⁶ by 10³⁴: inf
    states, seen = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)):
        model = _mixed_model()
        dlrt = DLRT(model, lr=0.1)

        def closure():
            loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                loss.register_hook(lambda gradient: seen.append(float(gradient)))
            return loss / factor * factor

        for _ in range(3):
            dlrt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                dlrt.step(closure)
            else:
                scaler.scale(loss).backward()
                if unscaled_first:
                    scaler.unscale_(dlrt)
                scaler.step(dlrt, closure)
                scaler.update()
        states.append(model.state_dict())
    passes = [1.0] if unscaled_first else [float("inf"), 1.0] if overflows else [2.0 ** 16]
    assert seen == passes * 3
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], msg=name)


def test_after_a_failed_step_under_a_grad_scaler_the_next_step_takes_the_scalers_scale_once():
    # The scaler removes the grad_scale it gave DLRT once the step returns, not when it raises; a step after a
    # failed one (an interrupted closure, here) used to unscale the gradients by the square of the scale.
    x, y = torch.randn(16, 10, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
    states = []
    for fails in (False, True):
        model, scaler = _mixed_model(), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        dlrt = DLRT(model, lr=0.1)
        for failing in (True, False, False) if fails else (False, False):
            dlrt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()

            def closure(failing=failing):
                if failing:
                    raise KeyboardInterrupt
                return F.cross_entropy(model(x), y)

            try:
                scaler.step(dlrt, closure)
            except KeyboardInterrupt:
                assert not hasattr(dlrt, "grad_scale") and not hasattr(dlrt, "found_inf")
                continue
            scaler.update()
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], msg=name)


def test_zero_grad_clears_each_gradient_once_with_a_wrapped_optimizer():
    """Its groups list the wrapped optimizer's parameters, so clearing them through its own zero_grad as well would
    make a second weight-sized pass with set_to_none=False."""
    class ZeroedTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.zero_, torch.ops.aten._foreach_zero_):
                self.count += len(args[0]) if isinstance(args[0], (list, tuple)) else 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.ReLU(), nn.Linear(6, 3))
    dlrt = DLRT(model, lr=0.1, optimizer=torch.optim.SGD(dense_parameters(model), lr=0.1))
    model(torch.randn(4, 8)).sum().backward()
    with ZeroedTensors() as zeroed:
        dlrt.zero_grad(set_to_none=False)
    assert zeroed.count == len(list(model.parameters()))                     # U, S, V, the two biases and the weight
    assert all(not p.grad.any() for p in model.parameters())
