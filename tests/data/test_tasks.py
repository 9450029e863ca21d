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
    with pytest.raises(ValueError, match="length_scale must be a positive, finite number"):
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


def test_sinusoid_support_and_query_inputs_are_each_uniform_over_the_range():
    """Neither set is drawn from one end of the range: both have the mean and spread of U[-5, 5]."""
    batch = SinusoidTasks().sample(2000, 5, 5, generator=torch.Generator().manual_seed(2))
    for x in (batch.support_x, batch.query_x):
        assert x.double().mean().item() == pytest.approx(0.0, abs=0.2)
        assert x.double().std().item() == pytest.approx(10 / math.sqrt(12), rel=0.05)


def test_sinusoid_batch_and_query_counts():
    """A task may have no query points, but a batch needs at least one task."""
    batch = SinusoidTasks().sample(3, 4, 0, generator=torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 4, 1) and batch.query_x.shape == batch.query_y.shape == (3, 0, 1)
    for bad in (dict(batch=0, shots=1, queries=1), dict(batch=2, shots=1, queries=-1)):
        with pytest.raises(ValueError, match="must be an int >= "):
            SinusoidTasks().sample(**bad)


def test_sinusoid_tasks_follow_the_device_asked_for():
    """A CPU generator's draws go to the device asked for (here ``meta``, which holds no values)."""
    batch = SinusoidTasks().sample(2, 3, 4, generator=torch.Generator().manual_seed(0), device="meta")
    assert all(t.device.type == "meta" for t in batch)


def test_gp_sample_inputs_are_validated():
    gp = GPCurves()
    x = torch.linspace(-1, 1, 5)[:, None]
    with pytest.raises(ValueError, match="exactly one"):
        gp.sample(2, 5, x=x)                                               # both given
    with pytest.raises(ValueError, match="num_points must be an int >= 1"):
        gp.sample(2, 0)
    with pytest.raises(ValueError, match=r"x must have shape \(P, 1\) or \(batch=2, P, 1\)"):
        gp.sample(2, x=x.expand(3, 5, 1))                                  # three curves' inputs for two curves


def test_gp_curves_keep_their_own_copy_of_given_inputs():
    x = torch.linspace(-1, 1, 5)[None, :, None].repeat(2, 1, 1)
    curves = GPCurves().sample(2, x=x, generator=torch.Generator().manual_seed(0))
    x.add_(10.0)                                                           # the caller reuses its tensor
    assert torch.equal(curves.x[0, :, 0], torch.linspace(-1, 1, 5))


def test_gp_mahalanobis_gives_one_number_per_curve():
    gp = GPCurves()
    curves = gp.sample(3, 4, generator=torch.Generator().manual_seed(0))
    distances = gp.mahalanobis(curves)
    assert distances.shape == (3,)
    by_hand = [(y.T @ torch.linalg.inv(gp.kernel(x[None].double())[0]) @ y).item()
               for x, y in zip(curves.x, curves.y.double())]
    assert distances.tolist() == pytest.approx(by_hand, rel=1e-9)


def test_context_sizes_from_one_point_to_all_of_them():
    curves = GPCurves().sample(4, 6, generator=torch.Generator().manual_seed(0))
    context, _ = context_target_split(curves, 6, generator=torch.Generator().manual_seed(1))
    # all the points, each once: the same inputs, in another order
    assert torch.equal(context.x.sort(1).values, curves.x.sort(1).values)
    assert torch.equal(context.y.sort(1).values, curves.y.sort(1).values)
    assert context_target_split(curves, 1)[0].x.shape == (4, 1, 1)
    with pytest.raises(ValueError, match="num_context must be an int >= 1"):
        context_target_split(curves, 0)


def test_each_curve_gets_its_own_random_context_points():
    x = torch.arange(10.0)[:, None]                                        # every curve at the same inputs
    curves = GPCurves().sample(50, x=x, generator=torch.Generator().manual_seed(0))
    context, _ = context_target_split(curves, 3, generator=torch.Generator().manual_seed(1))
    chosen = context.x[..., 0].sort(1).values                              # (50, 3) indices of the chosen points
    assert len({tuple(row.tolist()) for row in chosen}) > 25               # 120 subsets possible
    counts = torch.bincount(chosen.long().flatten(), minlength=10)
    assert (counts > 0).all()                                              # every point can be chosen


def test_one_curve_without_a_cholesky_factor_among_several_is_refused():
    # Curve 0: 200 inputs in [-2, 2] (its kernel matrix has no Cholesky factor with noise 1e-9, as in
    # test_gp_validation); curve 1: inputs 10 apart, an almost diagonal kernel matrix that factors.
    # One failed curve is as wrong as all of them, so it must be an error too, naming 1 of the 2.
    x = torch.stack([torch.linspace(-2, 2, 200), torch.arange(200) * 10.0])[..., None]
    with pytest.raises(ValueError, match="the kernel matrices of 1 of 2 curves are not positive definite"):
        GPCurves(noise=1e-9).sample(2, x=x, generator=torch.Generator().manual_seed(0))


def test_gp_defaults_are_those_of_conditional_neural_processes():
    # Garnelo et al. 2018 (CNP), section 4.1: length scale 0.4, scale 1.0, inputs uniform in [-2, 2];
    # their reference code (GPCurvesReader): l1_scale=0.4, sigma_scale=1.0, noise sigma_noise=2e-2.
    gp = GPCurves()
    assert (gp.length_scale, gp.scale, gp.noise, gp.x_range) == (0.4, 1.0, 0.02, (-2.0, 2.0))
