"""The Gaussian-process curves and the sinusoid tasks against independent references: a float64 GP written out
here (its own kernel, ``torch.linalg.solve``, ``torch.distributions.MultivariateNormal``; Rasmussen & Williams,
eqs. 2.23-2.24), calibration on curves of the GP's own prior, and the sinusoid family's closed-form moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from lowlearn.data.tasks import GPCurves, SinusoidTasks


def se_kernel(a, b, length_scale, scale):
    """Noise-free squared-exponential covariances between 1-D inputs ``a (n,)`` and ``b (m,)``, float64."""
    return scale ** 2 * torch.exp(-(a[:, None] - b[None, :]) ** 2 / (2 * length_scale ** 2))


def test_gp_posterior_equals_the_gaussian_conditional_computed_with_solve():
    """Rasmussen & Williams eqs. 2.23-2.24 per curve with a kernel written out here (not ``GPCurves.kernel``):
    the noise sits on the diagonal of K_cc and of k_** only, so a target at a context input is not interpolated
    exactly (its cross-covariance k_* carries no noise), and every curve has its own inputs."""
    ell, s, noise = 0.3, 1.4, 0.25
    gp = GPCurves(length_scale=ell, scale=s, noise=noise)
    g = torch.Generator().manual_seed(3)
    cx = -2 + 4 * torch.rand(3, 4, 1, generator=g)
    cy = torch.randn(3, 4, 1, generator=g)
    tx = torch.cat([cx[:, :2], -2 + 4 * torch.rand(3, 3, 1, generator=g), torch.full((3, 1, 1), 9.0)], 1)
    mean, std = gp.posterior(cx, cy, tx)
    for b in range(3):
        c, t, y = cx[b, :, 0].double(), tx[b, :, 0].double(), cy[b, :, 0].double()
        k_cc = se_kernel(c, c, ell, s) + noise ** 2 * torch.eye(4, dtype=torch.float64)
        k_tc = se_kernel(t, c, ell, s)
        k_tt = se_kernel(t, t, ell, s) + noise ** 2 * torch.eye(6, dtype=torch.float64)
        mu = k_tc @ torch.linalg.solve(k_cc, y)
        cov = k_tt - k_tc @ torch.linalg.solve(k_cc, k_tc.T)
        torch.testing.assert_close(mean[b, :, 0].double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std[b, :, 0].double(), cov.diagonal().sqrt(), rtol=1e-5, atol=1e-6)
    # the target at x = 9, far from every context point, gets the prior: mean 0, std sqrt(s² + noise²)
    torch.testing.assert_close(mean[:, -1, 0], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(std[:, -1, 0], torch.full((3,), math.sqrt(s ** 2 + noise ** 2)), rtol=1e-6, atol=0)
    # at a context input the predictive std stays above the noise level (observation, not function value)
    assert (std[:, :2] > noise).all()


def test_gp_predictive_density_is_the_ratio_of_multivariate_normal_densities():
    """log N(y_t; μ_t, σ_t²) from ``posterior`` equals log p(y_c, y_t) − log p(y_c), both from
    torch.distributions.MultivariateNormal with the written-out kernel (the exact conditional density)."""
    ell, s, noise = 0.4, 1.0, 0.05
    gp = GPCurves(length_scale=ell, scale=s, noise=noise)
    curves = gp.sample(2, 9, generator=torch.Generator().manual_seed(4))
    cx, cy, tx, ty = curves.x[:, :6], curves.y[:, :6], curves.x[:, 6:], curves.y[:, 6:]
    mean, std = gp.posterior(cx, cy, tx)
    got = Normal(mean.double(), std.double()).log_prob(ty.double())[..., 0]              # (2, 3)
    for b in range(2):
        c, y = cx[b, :, 0].double(), cy[b, :, 0].double()
        context = MultivariateNormal(torch.zeros(6, dtype=torch.float64),
                                     se_kernel(c, c, ell, s) + noise ** 2 * torch.eye(6, dtype=torch.float64))
        for j in range(3):
            joint_x = torch.cat([c, tx[b, j].double()])
            covariance = se_kernel(joint_x, joint_x, ell, s) + noise ** 2 * torch.eye(7, dtype=torch.float64)
            joint = MultivariateNormal(torch.zeros(7, dtype=torch.float64), covariance)
            expected = joint.log_prob(torch.cat([y, ty[b, j].double()])) - context.log_prob(y)
            assert got[b, j].item() == pytest.approx(expected.item(), abs=2e-4)


def test_gp_mahalanobis_is_the_quadratic_form_of_the_multivariate_normal_log_density():
    """−2 log N(y; 0, K) = P log 2π + log det K + yᵀK⁻¹y (MultivariateNormal with the written-out kernel)."""
    ell, s, noise = 0.5, 0.8, 0.1
    gp = GPCurves(length_scale=ell, scale=s, noise=noise)
    curves = gp.sample(3, 7, generator=torch.Generator().manual_seed(5))
    distances = gp.mahalanobis(curves)
    for b in range(3):
        x, y = curves.x[b, :, 0].double(), curves.y[b, :, 0].double()
        k = se_kernel(x, x, ell, s) + noise ** 2 * torch.eye(7, dtype=torch.float64)
        log_density = MultivariateNormal(torch.zeros(7, dtype=torch.float64), k).log_prob(y)
        expected = -2 * log_density - 7 * math.log(2 * math.pi) - torch.logdet(k)
        assert distances[b].item() == pytest.approx(expected.item(), rel=1e-9)


def test_gp_posterior_is_calibrated_on_curves_of_its_own_prior():
    """Sampling and conditioning agree: on curves drawn by ``sample``, (y_t − μ_t) / σ_t is standard normal
    (mean 0, variance 1, uncorrelated with the context values), checked on 3,000 curves with a fixed seed."""
    gp = GPCurves()
    curves = gp.sample(3000, 8, generator=torch.Generator().manual_seed(6))
    mean, std = gp.posterior(curves.x[:, :5], curves.y[:, :5], curves.x[:, 5:])
    z = ((curves.y[:, 5:] - mean) / std).double().flatten()                      # 9,000 standardised residuals
    assert z.mean().item() == pytest.approx(0.0, abs=0.05)                       # standard error about 0.01-0.02
    assert z.var().item() == pytest.approx(1.0, rel=0.08)
    context_y = curves.y[:, :1].double().expand(-1, 3, -1).flatten()
    assert torch.corrcoef(torch.stack([z, context_y]))[0, 1].abs() < 0.05
    # a wrong posterior (the prior, ignoring the context) is far from calibrated on the same curves
    prior_z = (curves.y[:, 5:] / math.sqrt(1 + gp.noise ** 2)).double().flatten()
    assert torch.corrcoef(torch.stack([prior_z, context_y]))[0, 1].abs() > 0.2


def test_gp_posterior_with_an_empty_context_is_the_prior():
    """n = 0 context points: no Cholesky to fail, mean 0 and std sqrt(scale² + noise²) everywhere."""
    gp = GPCurves(scale=1.5, noise=0.1)
    targets = torch.linspace(-2, 2, 5).expand(2, 5)[..., None]
    mean, std = gp.posterior(torch.zeros(2, 0, 1), torch.zeros(2, 0, 1), targets)
    assert torch.equal(mean, torch.zeros(2, 5, 1))
    torch.testing.assert_close(std, torch.full((2, 5, 1), math.sqrt(1.5 ** 2 + 0.1 ** 2)))


def test_sinusoid_mean_task_and_baseline_errors_match_their_closed_forms():
    """E[A sin(x − φ) | x] = −(2/π) E[A] cos x ≈ −1.62 cos x for A ~ U[0.1, 5], φ ~ U[0, π] (least squares on
    cos x and sin x of 20,000 sampled tasks), and the mean squared errors of predicting 0 and the mean task,
    E[A²]/2 ≈ 4.25 and ≈ 3.01, the numbers the meta_learning chapter states."""
    batch = SinusoidTasks().sample(20000, 5, 0, generator=torch.Generator().manual_seed(7))
    x, y = batch.support_x.double().flatten(), batch.support_y.double().flatten()
    design = torch.stack([torch.cos(x), torch.sin(x)], 1)
    coefficients = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    mean_amplitude = (0.1 + 5.0) / 2
    assert coefficients[0].item() == pytest.approx(-2 / math.pi * mean_amplitude, abs=0.05)
    assert coefficients[1].item() == pytest.approx(0.0, abs=0.05)
    mean_square = (5.0 ** 3 - 0.1 ** 3) / (3 * 4.9)                               # E[A²]
    mean_cos2 = 0.5 + (math.sin(10) - math.sin(-10)) / 40                         # E[cos² x], x ~ U[-5, 5]
    zero_mse, mean_task_mse = mean_square / 2, mean_square / 2 - (2 * mean_amplitude / math.pi) ** 2 * mean_cos2
    assert zero_mse == pytest.approx(4.25, abs=0.01) and mean_task_mse == pytest.approx(3.01, abs=0.01)
    assert y.square().mean().item() == pytest.approx(zero_mse, rel=0.03)
    mean_task = -2 / math.pi * mean_amplitude * torch.cos(x)
    assert (y - mean_task).square().mean().item() == pytest.approx(mean_task_mse, rel=0.03)


@pytest.mark.parametrize("name", ["noise", "scale", "length_scale"])
def test_gp_hyperparameters_must_be_finite(name):
    """An infinite noise or scale once passed the check (``inf > 0``), and sampling then blamed a noise too small;
    an infinite length scale gave constant curves with no error. The constructor refuses them, naming them."""
    with pytest.raises(ValueError, match=f"{name} must be a positive, finite number"):
        GPCurves(**{name: math.inf})


@pytest.mark.parametrize("kwargs", [dict(amplitude=(0.1, math.inf)), dict(phase=(0.0, math.inf)),
                                    dict(x_range=(-math.inf, 5.0))])
def test_sinusoid_ranges_must_be_finite(kwargs):
    """An infinite range would give infinite or NaN inputs or targets (``low + (high - low) * U``)."""
    with pytest.raises(ValueError, match="range .* of two finite numbers"):
        SinusoidTasks(**kwargs)
