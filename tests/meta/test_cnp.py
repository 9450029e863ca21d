import math

import pytest
import torch
from torch import nn

from lowlearn.data.tasks import GPCurves, context_target_split
from lowlearn.meta import CNP, fit_cnp


def test_predictions_are_invariant_to_the_order_of_the_context_set():
    torch.manual_seed(0)
    cnp = CNP(hidden=16).double()
    generator = torch.Generator().manual_seed(1)
    cx, cy, tx = (torch.randn(2, n, 1, generator=generator, dtype=torch.float64) for n in (7, 7, 5))
    order = torch.randperm(7, generator=generator)
    shuffled, original = cnp(cx[:, order], cy[:, order], tx), cnp(cx, cy, tx)
    torch.testing.assert_close(shuffled.mean, original.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shuffled.stddev, original.stddev, rtol=1e-12, atol=1e-12)


def _decoder_on_concatenation(cnp, r, tx):
    """g([r, x_T]) written out: the first layer's weight on the concatenated inputs, then the other layers."""
    first = cnp.decoder[0]
    return cnp.decoder[1:](torch.nn.functional.linear(torch.cat([r, tx], -1), first.weight, first.bias))


def test_the_representation_is_the_mean_of_the_encoded_pairs_and_the_std_is_bounded_below():
    torch.manual_seed(0)
    cnp = CNP(x_dim=2, y_dim=3, hidden=8, min_std=0.2)
    cx, cy, tx = torch.randn(4, 2), torch.randn(4, 3), torch.randn(6, 2)
    expected = torch.stack([cnp.encoder(torch.cat([cx[i], cy[i]])) for i in range(4)]).mean(0)
    torch.testing.assert_close(cnp.represent(cx, cy), expected)
    prediction = cnp(cx, cy, tx)
    assert prediction.mean.shape == (6, 3) and (prediction.stddev >= 0.2).all()
    # σ = σ_min + (1 − σ_min) softplus(raw), raw the decoder's second half; a very negative raw gives σ_min.
    r = cnp.represent(cx, cy).expand(6, -1)
    raw = _decoder_on_concatenation(cnp, r, tx)[:, 3:]
    torch.testing.assert_close(prediction.stddev, 0.2 + 0.8 * torch.nn.functional.softplus(raw))
    with torch.no_grad():
        last = cnp.decoder[-1]
        last.weight[3:].zero_()
        last.bias[3:].fill_(-1e3)
    assert torch.equal(cnp(cx, cy, tx).stddev, torch.full((6, 3), 0.2))


@pytest.mark.parametrize("decoder_layers", [1, 2, 3])
def test_the_decoder_equals_its_layers_on_the_concatenated_representation_and_targets(decoder_layers):
    """The first layer's product with r is taken once per function: the same outputs and gradients as g([r, x_T])."""
    torch.manual_seed(0)
    cnp = CNP(x_dim=2, y_dim=1, hidden=8, decoder_layers=decoder_layers).double()
    cx, cy, tx, ty = (torch.randn(3, n, d, dtype=torch.float64) for n, d in ((4, 2), (4, 1), (5, 2), (5, 1)))
    prediction = cnp(cx, cy, tx)
    loss = -prediction.log_prob(ty).mean()
    grads = torch.autograd.grad(loss, list(cnp.parameters()))

    r = cnp.represent(cx, cy).unsqueeze(1).expand(3, 5, 8)
    mean, raw = _decoder_on_concatenation(cnp, r, tx).split(1, dim=-1)
    std = 0.1 + 0.9 * torch.nn.functional.softplus(raw)
    torch.testing.assert_close(prediction.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prediction.stddev, std, rtol=1e-12, atol=1e-12)
    reference = torch.autograd.grad(-torch.distributions.Normal(mean, std).log_prob(ty).mean(), list(cnp.parameters()))
    for grad, expected in zip(grads, reference):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def _split(curves, n, generator):
    context, target = context_target_split(curves, n, generator=generator)
    return context.x, context.y, target.x, target.y


def test_fit_cnp_is_the_written_out_training_loop():
    torch.manual_seed(0)
    cnp, reference = CNP(hidden=16), CNP(hidden=16)
    reference.load_state_dict(cnp.state_dict())
    cnp.eval()                                                      # fit_cnp trains in (and leaves) training mode
    generators = [torch.Generator().manual_seed(1) for _ in range(2)]
    losses = fit_cnp(cnp, lambda: _split(GPCurves().sample(4, 10, generator=generators[0]), 3, generators[0]),
                     torch.optim.Adam(cnp.parameters(), lr=1e-2), 5)
    optimizer, expected = torch.optim.Adam(reference.parameters(), lr=1e-2), []
    for _ in range(5):
        loss = reference.loss(*_split(GPCurves().sample(4, 10, generator=generators[1]), 3, generators[1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    assert losses == expected and cnp.training
    assert all(torch.equal(a, b) for a, b in zip(cnp.parameters(), reference.parameters()))
    assert fit_cnp(cnp, None, optimizer, 0) == []
    nan = torch.full((2, 3, 1), float("nan"))
    with pytest.raises(FloatingPointError, match="became nan at step 1"):
        fit_cnp(cnp, lambda: (nan, nan, nan, nan), torch.optim.SGD(cnp.parameters(), lr=0.1), 2)
    zeros, inf = torch.zeros(2, 3, 1), torch.full((2, 3, 1), float("inf"))   # log N(∞; μ, σ²) = −∞: an infinite loss
    fresh = CNP(hidden=8)                                           # (the NaN run above left cnp's weights NaN)
    with pytest.raises(FloatingPointError, match="became inf at step 1"):
        fit_cnp(fresh, lambda: (zeros, zeros, zeros, inf), torch.optim.SGD(fresh.parameters(), lr=0.1), 2)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        fit_cnp(cnp, None, optimizer, -1)


def test_training_on_gp_curves_raises_the_likelihood_and_the_std_shrinks_at_the_context():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    curves = GPCurves()
    cnp = CNP(hidden=64)
    losses = fit_cnp(cnp, lambda: _split(curves.sample(32, 30, generator=generator), 8, generator),
                     torch.optim.Adam(cnp.parameters(), lr=1e-3), 1000)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 0.2, (losses[:5], losses[-5:])
    # Context points only in [-2, -1]: the prediction is surer there than in [1, 2], where no point is.
    context_x = -2 + torch.rand(64, 6, 1, generator=generator)
    sample = curves.sample(64, x=torch.cat([context_x, torch.linspace(-2, 2, 41).expand(64, 41).unsqueeze(-1)], 1),
                           generator=generator)
    with torch.no_grad():
        std = cnp(sample.x[:, :6], sample.y[:, :6], sample.x[:, 6:]).stddev.squeeze(-1).mean(0)
    near, far = std[:10].mean(), std[-10:].mean()
    assert near < 0.75 * far, (near, far)


def test_bad_input_is_a_clear_error():
    cnp = CNP(hidden=8)
    with pytest.raises(ValueError, match="context set is empty"):
        cnp(torch.zeros(2, 0, 1), torch.zeros(2, 0, 1), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="context_x"):
        cnp(torch.zeros(2, 4, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="target_x"):
        cnp(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.zeros(3, 3, 1))
    with pytest.raises(ValueError, match="target_y"):
        cnp.loss(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.zeros(2, 3, 1), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match="context_y"):                  # y_dim = 1, two outputs per context point
        cnp(torch.zeros(2, 4, 1), torch.zeros(2, 4, 2), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="target_y"):                   # would broadcast against μ and σ (2, 3, 1)
        cnp.loss(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="target set is empty"):
        cnp.loss(torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.zeros(2, 0, 1), torch.zeros(2, 0, 1))
    with pytest.raises(ValueError, match="min_std"):
        CNP(min_std=1.0)
    with pytest.raises(ValueError, match="above 0 so that σ never rounds to 0"):
        CNP(min_std=0.0)
    with pytest.raises(ValueError, match="context_x"):                # 1-D: one x per row, but no feature axis
        cnp(torch.zeros(4), torch.zeros(4, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="target_x"):
        cnp(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="target_y"):
        cnp.loss(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="hidden"):
        CNP(hidden=0)
    with pytest.raises(ValueError, match="encoder_layers must be an int >= 1"):
        CNP(encoder_layers=0)


def test_the_loss_is_the_mean_gaussian_negative_log_likelihood_written_out():
    # −log N(y; μ, σ²) = ½ log 2π + log σ + (y − μ)² / (2σ²), averaged over functions, targets and outputs.
    torch.manual_seed(0)
    cnp = CNP(x_dim=1, y_dim=2, hidden=8).double()
    generator = torch.Generator().manual_seed(3)
    cx, cy, tx, ty = (torch.randn(3, n, d, generator=generator, dtype=torch.float64)
                      for n, d in ((4, 1), (4, 2), (5, 1), (5, 2)))
    prediction = cnp(cx, cy, tx)
    mu, sigma = prediction.mean, prediction.stddev
    assert sigma.log().abs().min() > 0.05                                  # σ away from 1: the log σ term counts
    nll = 0.5 * math.log(2 * math.pi) + sigma.log() + (ty - mu) ** 2 / (2 * sigma ** 2)
    assert nll.shape == (3, 5, 2)
    torch.testing.assert_close(cnp.loss(cx, cy, tx, ty), nll.sum() / nll.numel(), rtol=1e-12, atol=1e-12)


def test_cnp_has_the_documented_number_of_linear_layers_and_widths():
    """Reference: the docstring, ``encoder_layers`` / ``decoder_layers`` count the linear layers of h and g:
    h = [x+y → H → … → H], g = [H+x → H → … → 2y], ReLU between layers only; parameters counted by hand."""
    def shapes(layers):
        return [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)]

    for enc, dec in ((3, 3), (1, 1), (2, 4)):
        model = CNP(x_dim=2, y_dim=3, hidden=5, encoder_layers=enc, decoder_layers=dec)
        assert shapes(model.encoder) == [(5, 5)] + [(5, 5)] * (enc - 1)
        assert shapes(model.decoder) == ([(7, 6)] if dec == 1 else [(7, 5)] + [(5, 5)] * (dec - 2) + [(5, 6)])
        by_hand = (5 * 5 + 5) * enc + ((7 * 6 + 6) if dec == 1 else (7 * 5 + 5) + (5 * 5 + 5) * (dec - 2) + 5 * 6 + 6)
        assert sum(p.numel() for p in model.parameters()) == by_hand
