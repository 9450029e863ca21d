"""Synthetic regression task distributions."""

from __future__ import annotations

import math

import pytest
import torch

from lowlearn.data.tasks import Curves, GPCurves, SinusoidTasks, context_target_split


def test_sinusoid_shapes_ranges_and_values():
    tasks = SinusoidTasks()
    batch = tasks.sample(256, shots=5, queries=7, generator=torch.Generator().manual_seed(0))
    assert batch.support_x.shape == batch.support_y.shape == (256, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (256, 7, 1)
    assert batch.amplitude.shape == batch.phase.shape == (256,)
    assert all(t.dtype == torch.float32 for t in batch)
    assert ((0.1 <= batch.amplitude) & (batch.amplitude <= 5.0)).all()
    assert ((0.0 <= batch.phase) & (batch.phase <= math.pi)).all()
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert ((-5.0 <= x) & (x <= 5.0)).all()
    amplitude, phase = batch.amplitude[:, None, None], batch.phase[:, None, None]
    assert torch.equal(batch.support_y, amplitude * torch.sin(batch.support_x - phase))
    assert torch.equal(batch.query_y, amplitude * torch.sin(batch.query_x - phase))


def test_sinusoid_curve_and_reproducibility():
    grid = torch.linspace(-5, 5, 11)[:, None]
    assert torch.allclose(SinusoidTasks.curve(2.0, 0.5, grid), (2.0 * torch.sin(grid - 0.5))[None])
    a = SinusoidTasks().sample(3, 2, 2, generator=torch.Generator().manual_seed(1))
    b = SinusoidTasks().sample(3, 2, 2, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert SinusoidTasks.curve(a.amplitude, a.phase, grid).shape == (3, 11, 1)


def test_a_sinusoid_sampler_draws_tasks_of_one_shape():
    sampler = SinusoidTasks().sampler(3, 4, generator=torch.Generator().manual_seed(5))
    expected = SinusoidTasks().sample(2, 3, 4, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(sampler.sample(2), expected))


def test_sinusoid_validation():
    with pytest.raises(ValueError, match="amplitude must be a range"):
        SinusoidTasks(amplitude=(5.0, 0.1))
    for bad in (5.0, (1, 2, 3), ("a", 2)):                     # one number, three, not numbers
        with pytest.raises(ValueError, match=r"amplitude must be a range \(low, high\) of two numbers"):
            SinusoidTasks(amplitude=bad)
    with pytest.raises(ValueError, match="x_range must be a range .* low < high"):
        SinusoidTasks(x_range=(1.0, 1.0))
    fixed = SinusoidTasks(phase=(0, 0)).sample(4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fixed.phase, torch.zeros(4))                   # a fixed phase, as the chapter's exercise asks
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        SinusoidTasks().sample(2, shots=0, queries=3)


def test_gp_shapes_and_range():
    curves = GPCurves().sample(8, 30, generator=torch.Generator().manual_seed(0))
    assert isinstance(curves, Curves)
    assert curves.x.shape == curves.y.shape == (8, 30, 1)
    assert curves.x.dtype == curves.y.dtype == torch.float32
    assert ((-2.0 <= curves.x) & (curves.x <= 2.0)).all()


def test_gp_covariance_matches_the_kernel():
    gp = GPCurves(length_scale=0.4, scale=1.5)
    x = torch.tensor([[-1.0], [-0.8], [0.0], [0.3], [1.5]])
    y = gp.sample(4000, x=x, generator=torch.Generator().manual_seed(0)).y[..., 0].double()  # (4000, 5)
    empirical = y.T @ y / y.shape[0]  # the process has mean zero
    expected = gp.kernel(x.double()[None])[0]
    by_hand = 1.5 ** 2 * torch.exp(-(x.double() - x.double().T) ** 2 / (2 * 0.4 ** 2)) + gp.noise ** 2 * torch.eye(5)
    assert torch.allclose(expected, by_hand.double(), rtol=1e-12)   # the squared-exponential kernel, written out
    assert expected[0, 1] > 1.5 and expected[0, 4] < 1e-3  # both near and far pairs are checked
    assert torch.allclose(empirical, expected, atol=0.1 * gp.scale ** 2)


def test_gp_posterior_is_the_textbook_formula():
    gp = GPCurves(length_scale=0.5, scale=1.3, noise=0.1)
    curves = gp.sample(3, 7, generator=torch.Generator().manual_seed(0))
    cx, cy, tx = curves.x[:, :4], curves.y[:, :4], curves.x[:, 4:]
    mean, std = gp.posterior(cx, cy, tx)
    assert mean.shape == std.shape == (3, 3, 1) and mean.dtype == torch.float32
    k = gp.kernel(curves.x.double())                       # Rasmussen & Williams eqs. 2.23-2.24, with an inverse
    inverse = torch.linalg.inv(k[:, :4, :4])
    expected_mean = k[:, 4:, :4] @ inverse @ cy.double()
    expected_var = k[:, 4:, 4:].diagonal(dim1=-2, dim2=-1) - (k[:, 4:, :4] @ inverse @ k[:, :4, 4:]).diagonal(
        dim1=-2, dim2=-1)
    torch.testing.assert_close(mean, expected_mean.float())
    torch.testing.assert_close(std, expected_var.sqrt().unsqueeze(-1).float())
    # One context point, by hand: μ = k(x*, x) y / (s² + σ²), σ*² = s² + σ² − k(x*, x)² / (s² + σ²).
    x, y, t = torch.tensor([[[0.0]]]), torch.tensor([[[2.0]]]), torch.tensor([[[0.5]]])
    cov, var = 1.3 ** 2 * math.exp(-0.25 / (2 * 0.25)), 1.3 ** 2 + 0.1 ** 2
    mean, std = gp.posterior(x, y, t)
    assert mean.item() == pytest.approx(cov * 2.0 / var, rel=1e-6)
    assert std.item() == pytest.approx(math.sqrt(var - cov ** 2 / var), rel=1e-6)


def test_gp_posterior_refuses_shapes_that_would_broadcast():
    gp = GPCurves()
    curves = gp.sample(4, 6, generator=torch.Generator().manual_seed(0))
    cx, cy, tx = curves.x[:, :2], curves.y[:, :2], curves.x[:, 2:]
    # one curve's values for all four, and values without their last dimension (a (4, 2, 4) "mean"):
    for bad in ((cx, cy[:1], tx), (cx, cy.squeeze(-1), tx), (cx, cy, tx[:1]), (cx[0], cy[0], tx[0])):
        with pytest.raises(ValueError, match=r"must be \(B, n, 1\), \(B, n, 1\) and \(B, m, 1\)"):
            gp.posterior(*bad)


def test_gp_mahalanobis_is_chi_squared_for_its_own_curves():
    gp = GPCurves()
    curves = gp.sample(2000, 10, generator=torch.Generator().manual_seed(0))
    distances = gp.mahalanobis(curves)
    one = curves.y[0].double()
    assert distances[0].item() == pytest.approx((one.T @ torch.linalg.inv(gp.kernel(curves.x[:1].double())[0]) @ one)
                                                .item(), rel=1e-9)
    assert distances.mean().item() == pytest.approx(10, abs=0.3)               # E[χ²_10] = 10, std of the mean 0.1
    assert distances.var().item() == pytest.approx(20, rel=0.15)               # Var[χ²_10] = 20
    rough = GPCurves(length_scale=0.1).sample(500, 10, generator=torch.Generator().manual_seed(1))
    assert gp.mahalanobis(rough).mean() > 30                                    # another prior's curves stand out
    with pytest.raises(ValueError, match=r"curves must hold inputs and outputs of shape \(B, P, 1\)"):
        gp.mahalanobis(Curves(curves.x, curves.y[:1]))                          # would broadcast one curve's values


def test_gp_validation():
    with pytest.raises(ValueError, match="length_scale must be > 0"):
        GPCurves(length_scale=0.0)
    with pytest.raises(ValueError, match="x_range"):
        GPCurves(x_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="exactly one"):
        GPCurves().sample(2)
    # Almost no noise and 200 inputs in [-2, 2]: the kernel matrices have no Cholesky factor in float64. A
    # failed factor is partial, and its curves would come out wrong (std near 4, not 1) without an error.
    tight = GPCurves(noise=1e-9)
    with pytest.raises(ValueError, match="kernel matrices of 3 of 3 curves are not positive definite"):
        tight.sample(3, 200, generator=torch.Generator().manual_seed(0))
    x = torch.linspace(-2, 2, 200)[:, None]
    curves = GPCurves(noise=1e-3).sample(3, x=x, generator=torch.Generator().manual_seed(0))   # enough noise
    with pytest.raises(ValueError, match="not positive definite"):
        tight.posterior(curves.x, curves.y, curves.x[:, :5])
    with pytest.raises(ValueError, match="not positive definite"):
        tight.mahalanobis(curves)


def test_context_is_a_subset_of_the_target():
    generator = torch.Generator().manual_seed(0)
    curves = GPCurves().sample(16, 20, generator=generator)
    context, target = context_target_split(curves, 6, generator=generator)
    assert context.x.shape == context.y.shape == (16, 6, 1)
    assert target is curves
    # Match every context point to the target point with the same x: it has the same y.
    match = (context.x == target.x.transpose(1, 2))  # (B, 6, 20)
    assert (match.sum(-1) == 1).all()
    assert torch.equal(context.y[..., 0], (match * target.y.transpose(1, 2)).sum(-1))
    with pytest.raises(ValueError, match="num_context must be <= the 20 points"):
        context_target_split(curves, 21)


def test_sinusoid_parameters_fill_their_ranges_uniformly_and_independently():
    # Finn et al. section 5.1: amplitude U[0.1, 5], phase U[0, π], x U[-5, 5], drawn anew for every task and point.
    batch = SinusoidTasks().sample(4000, 5, 5, generator=torch.Generator().manual_seed(0))
    x = torch.cat([batch.support_x, batch.query_x], dim=1).flatten().double()
    for values, low, high in ((batch.amplitude.double(), 0.1, 5.0), (batch.phase.double(), 0.0, math.pi),
                              (x, -5.0, 5.0)):
        width = high - low
        assert values.min() < low + 0.01 * width and values.max() > high - 0.01 * width
        # mean and standard deviation of U[low, high]: (low + high) / 2 and width / √12; 6+ standard errors apart
        assert values.mean().item() == pytest.approx((low + high) / 2, abs=0.03 * width)
        assert values.std().item() == pytest.approx(width / math.sqrt(12), rel=0.05)
    # support and query points are separate draws: no query input repeats a support input
    assert not (batch.support_x == batch.query_x.transpose(1, 2)).any()
    # independent of each other and of the task's place in the batch (|r| < 0.06: 4 standard errors)
    place = torch.arange(4000, dtype=torch.float64)
    for a, b in ((batch.amplitude, batch.phase), (batch.amplitude, place), (batch.phase, place)):
        assert torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].abs() < 0.06
