import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.lowrank import DLRT, LowRankLinear, low_rank_layers, to_low_rank
from lowlearn.models import MLP
from lowlearn.train import fit


def teacher_data(rank, n=24, m=32, samples=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(n, rank, generator=generator) @ torch.randn(rank, m, generator=generator) / rank ** 0.5
    x = torch.randn(samples, m, generator=generator)
    return x, x @ W.T, W


def regression_steps(layer_model, dlrt, x, y, steps):
    losses = []
    for _ in range(steps):
        dlrt.zero_grad()
        loss = F.mse_loss(layer_model(x), y)
        loss.backward()
        dlrt.step(lambda: F.mse_loss(layer_model(x), y))
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tol", [None, 0.05])
def test_factors_stay_orthonormal_and_the_loss_falls(tol):
    torch.manual_seed(0)
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 6, bias=False))
    dlrt = DLRT(model, lr=1.0, tol=tol)
    losses = regression_steps(model, dlrt, x, y, 300)
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
    regression_steps(model, dlrt, x, y, 600)
    assert model[0].rank == teacher_rank
    assert torch.linalg.matrix_norm(model[0].matrix() - W) < 0.05 * torch.linalg.matrix_norm(W)


def test_rank_bounds():
    x, y, _ = teacher_data(6)
    for r_min, r_max, expected in ((8, None, 8), (1, 4, 4)):
        torch.manual_seed(0)
        model = nn.Sequential(LowRankLinear(32, 24, 2, bias=False))
        dlrt = DLRT(model, lr=1.0, tol=0.02, r_min=r_min, r_max=r_max)
        regression_steps(model, dlrt, x, y, 200)
        assert model[0].rank == expected


def test_fit_trains_a_mixed_model_with_dlrt():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=generator)
    y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2] > 0).long()
    model = to_low_rank(MLP(in_features=20, hidden=(32, 32), out_features=4), ["1", "3"], rank=4)
    dlrt = DLRT(model, lr=0.1, tol=0.1, optimizer=torch.optim.SGD(
        [p for n, p in model.named_parameters() if n.startswith("5") or n.endswith("bias")], lr=0.1, momentum=0.9))
    bias_before = model[1].bias.detach().clone()
    history = fit(model, (x, y), dlrt, epochs=30, batch_size=32, log_every=8)
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert not torch.equal(model[1].bias, bias_before)                   # the dense optimizer ran
    assert set(dlrt.ranks()) == {"1", "3"} and all(r >= 1 for r in dlrt.ranks().values())


def test_bad_input():
    with pytest.raises(ValueError, match="no low-rank layer"):
        DLRT(MLP(), lr=0.1)
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    with pytest.raises(ValueError, match=r"ϑ must be in \[0, 1\)"):
        DLRT(model, lr=0.1, tol=1.5)
    with pytest.raises(ValueError, match="lr must be a positive"):
        DLRT(model, lr=0.0)
    with pytest.raises(ValueError, match="r_min must be a positive integer"):
        DLRT(model, lr=0.1, r_min=0)
    dlrt = DLRT(model, lr=0.1)
    with pytest.raises(RuntimeError, match="has no gradient: run forward and backward"):
        dlrt.step(lambda: model(torch.randn(2, 784)).sum())
    assert low_rank_layers(model)["1"].rank == 2


def test_adam_style_steps_train_and_keep_the_factors_orthonormal():
    torch.manual_seed(0)
    x, y, _ = teacher_data(4)
    model = nn.Sequential(LowRankLinear(32, 24, 8, bias=False))
    dlrt = DLRT(model, lr=0.05, tol=0.02, betas=(0.9, 0.999))
    losses = regression_steps(model, dlrt, x, y, 300)
    layer = model[0]
    eye = torch.eye(layer.rank)
    assert torch.linalg.matrix_norm(layer.U.T @ layer.U - eye) < 1e-4
    assert losses[-1] < 0.05 * losses[0]
    # Normalised steps give weak directions the same size as strong ones, so more of them
    # survive the truncation than with plain steps; never fewer than the teacher needs.
    r = layer.rank
    assert r >= 4
    state = dlrt.moments["0"]
    assert state["step"] == 300
    assert state["K"][0].shape == (24, r) and state["L"][0].shape == (32, r) and state["S"][0].shape == (r, r)


def test_adam_direction_and_the_change_of_basis_of_its_moments():
    model = to_low_rank(MLP(hidden=(8,)), ["1"], rank=2)
    dlrt = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    g = torch.tensor([[0.5, -2.0], [1e-3, 4.0]])
    # First step: m̂ = g, v̂ = g², so the direction is g / (|g| + ε), about sign(g).
    assert torch.allclose(dlrt.direction("1", "K", g), g.sign(), atol=1e-4)
    assert dlrt.moments["1"]["step"] == 1
    # Rotating the moments to other coordinates and back restores the first moment.
    Q = torch.linalg.qr(torch.randn(2, 2)).Q
    m = dlrt.moments["1"]["K"][0].clone()
    dlrt._rotate("1", "K", Q, Q)
    dlrt._rotate("1", "K", Q.T, Q.T)
    assert torch.allclose(dlrt.moments["1"]["K"][0], m, atol=1e-6)
    assert (dlrt.moments["1"]["K"][1] >= 0).all()
    buffer = io.BytesIO()
    torch.save(dlrt.state_dict(), buffer)
    buffer.seek(0)
    restored = DLRT(model, lr=0.1, betas=(0.9, 0.999))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.moments["1"]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.moments["1"]["K"], dlrt.moments["1"]["K"]))
    with pytest.raises(ValueError, match="betas must be two numbers"):
        DLRT(model, lr=0.1, betas=(0.9, 1.0))
