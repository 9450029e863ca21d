import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowlearn.models import MLP, Conv4
from lowlearn.powerprop import powerprop
from lowlearn.sparse.mask import attach_masks, masks_of, raw_weight, set_masks, squash
from lowlearn.sparse.prune import prune
from lowlearn.sparse.schedule import iterative_pruning
from lowlearn.sparse.scores import MovementScores, grasp, magnitude, obd, random, scored_layers, snip, synflow
from lowlearn.train import TrainState, fit


def two_layer(seed=0, keep=0.6):
    """Linear(3→4), ReLU, Linear(4→2), the first layer masked at random."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    attach_masks(model)
    g = torch.Generator().manual_seed(seed)
    set_masks(model, {"0": torch.rand(4, 3, generator=g) < keep, "2": torch.ones(2, 4, dtype=torch.bool)})
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_scored_layers():
    model = MLP(hidden=(8,))
    assert list(scored_layers(model)) == ["1", "3"]
    assert list(scored_layers(model, ["3"])) == ["3"]
    attach_masks(model, ["1"])
    assert list(scored_layers(model)) == ["1"]
    with pytest.raises(KeyError, match="no layer 'fc'"):
        scored_layers(model, ["fc"])


def test_snip_equals_the_analytic_gradient():
    model = two_layer()
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    W1, b1 = model[0].weight.detach(), model[0].bias.detach()   # W1 = θ1 ⊙ m1
    W2, b2 = model[2].weight.detach(), model[2].bias.detach()
    # L = mean((out - y)²) over 5·2 entries, out = relu(x W1ᵀ + b1) W2ᵀ + b2.
    z = x @ W1.T + b1
    h = z.clamp(min=0)
    out = h @ W2.T + b2
    d_out = 2 * (out - y) / out.numel()
    g2 = d_out.T @ h
    d_z = (d_out @ W2) * (z > 0)
    g1 = d_z.T @ x
    before = snapshot(model)
    scores = snip(model, (x, y), F.mse_loss)
    torch.testing.assert_close(scores["0"], (g1 * W1).abs(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores["2"], (g2 * W2).abs(), rtol=1e-6, atol=1e-7)
    assert (scores["0"][~masks_of(model)["0"]] == 0).all()
    assert_untouched(model, before)


@pytest.mark.parametrize("training", [True, False])
def test_snip_on_a_conv_net_matches_plain_autograd_and_changes_nothing(training):
    torch.manual_seed(0)
    model = Conv4(num_classes=3, hidden=4, image_size=16)
    prune(model, random(model, torch.Generator().manual_seed(1)), 0.5)
    fit(model, (torch.randn(16, 1, 16, 16), torch.randint(0, 3, (16,))),
        torch.optim.SGD(model.parameters(), lr=0.01), steps=2, batch_size=8, device="cpu")   # BN stats ≠ init
    model.zero_grad(set_to_none=True)
    model.train(training)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 3, (6,))
    before = snapshot(model)
    scores = snip(model, (x, y))
    assert_untouched(model, before)
    assert all(m.training == training for m in model.modules())
    # Reference: plain autograd on the squashed model (plain parameters w = θ ⊙ m), in eval mode.
    layers = list(scored_layers(model))
    squash(model).eval()
    F.cross_entropy(model(x), y).backward()
    modules = dict(model.named_modules())
    assert list(scores) == layers
    for name in layers:
        w = modules[name].weight
        torch.testing.assert_close(scores[name], (w.grad * w).abs())


def test_obd_exact_for_a_diagonal_hessian_with_one_sample():
    # One-hot inputs: out[b, k] = W[k, b], so L = Σ (W[k, b] - y[b, k])⁴ is separable,
    # H is diagonal with h = 12 (W - yᵀ)², and the saliency is ½ h W².
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    x, y = torch.eye(3), torch.randn(3, 2)
    scores = obd(model, (x, y), lambda out, t: ((out - t) ** 4).sum(), samples=1)
    W = model[0].weight.detach()
    torch.testing.assert_close(scores["0"], 0.5 * 12 * (W - y.T) ** 2 * W ** 2)


def exact_hessian(model, x, y, names):
    """Hessian of the cross-entropy in the named layers' weights, as one matrix."""
    weights = tuple(dict(model.named_parameters())[f"{n}.weight"].detach() for n in names)

    def loss(*ws):
        return F.cross_entropy(functional_call(model, {f"{n}.weight": w for n, w in zip(names, ws)}, (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, weights)
    sizes = [w.numel() for w in weights]
    return torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))], 0), weights


def test_obd_matches_the_exact_hessian_diagonal_within_its_standard_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    attach_masks(model)
    set_masks(model, {"0": torch.rand(4, 3) < 0.7, "2": torch.ones(3, 4, dtype=torch.bool)})
    x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    samples = 1000
    before = snapshot(model)
    scores = obd(model, (x, y), samples=samples, generator=torch.Generator().manual_seed(0))
    assert_untouched(model, before)
    pruned = ~masks_of(model)["0"]
    H, weights = exact_hessian(squash(model), x, y, ["0", "2"])   # in the effective weights θ ⊙ m
    diag = H.diagonal()
    stderr = ((H ** 2).sum(1) - diag ** 2).div(samples).sqrt()   # √(Σ_{j≠i} H_ij² / S)
    w2 = torch.cat([w.flatten() for w in weights]) ** 2
    estimate = torch.cat([scores["0"].flatten(), scores["2"].flatten()])
    error = (estimate - 0.5 * diag * w2).abs()
    assert (error <= 5 * 0.5 * stderr * w2 + 1e-7).all()
    assert pruned.any() and (scores["0"][pruned] == 0).all()
    assert (stderr > 0).all()   # the Hessian is not diagonal: the test is statistical


def test_obd_draws_no_probe_at_the_pruned_weights_of_a_masked_layer():
    # One surviving weight: with z zero at the pruned weights one sample gives its h_ii exactly, although
    # the cross-entropy's Hessian couples it to them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False))
    keep = torch.zeros(4, 3, dtype=torch.bool)
    keep[1, 2] = True
    attach_masks(model)
    set_masks(model, {"0": keep})
    x, y = torch.randn(7, 3), torch.randint(0, 4, (7,))
    scores = obd(model, (x, y), samples=1, generator=torch.Generator().manual_seed(0))
    H, (w,) = exact_hessian(squash(model), x, y, ["0"])
    i = 1 * 3 + 2
    expected = torch.zeros(12)
    expected[i] = 0.5 * H[i, i] * w.flatten()[i] ** 2
    torch.testing.assert_close(scores["0"].flatten(), expected)
    assert (H[i].abs() > 1e-3).sum() > 1


def test_obd_generator_reproducible_and_bad_samples():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    batch = torch.randn(5, 3), torch.randint(0, 3, (5,))
    a = obd(model, batch, samples=3, generator=torch.Generator().manual_seed(1))
    b = obd(model, batch, samples=3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"samples \(Rademacher vectors\) must be an int >= 1"):
            obd(model, batch, samples=bad)


def test_movement_scores_equal_a_hand_loop():
    model = two_layer(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    movement = MovementScores(model)
    g = torch.Generator().manual_seed(0)
    expected = {"0": torch.zeros(4, 3), "2": torch.zeros(2, 4)}
    for step in range(1, 6):
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        # Reference: S -= w ⊙ ∂L/∂w at the effective weights of this step, by hand.
        W1 = model[0].weight.detach().clone().requires_grad_()
        W2 = model[2].weight.detach().clone().requires_grad_()
        out = (x @ W1.T + model[0].bias.detach()).clamp(min=0) @ W2.T + model[2].bias.detach()
        g1, g2 = torch.autograd.grad(F.cross_entropy(out, y), (W1, W2))
        expected["0"] -= W1.detach() * g1
        expected["2"] -= W2.detach() * g2
        # The model's own step, then the callback as fit calls it.
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        movement(TrainState(step=step, epoch=0, loss=torch.zeros(()), model=model, optimizer=optimizer))
    scores = movement.scores()
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name])
    assert (scores["0"][~masks_of(model)["0"]] == 0).all()
    scores["0"].add_(1)   # a copy
    assert not torch.equal(movement.scores()["0"], scores["0"])


def test_movement_scores_in_fit_then_prune():
    torch.manual_seed(0)
    model = MLP(in_features=10, hidden=(16,), out_features=3)
    movement = MovementScores(model)
    data = torch.randn(64, 10), torch.randint(0, 3, (64,))
    fit(model, data, torch.optim.SGD(model.parameters(), lr=0.1), steps=10, batch_size=16,
        callbacks=[movement], device="cpu")
    scores = movement.scores()
    assert list(scores) == ["1", "3"] and all(s.abs().sum() > 0 for s in scores.values())
    masks = prune(model, scores, 0.25)
    for name, s in scores.items():
        kept = s[masks[name]]
        assert kept.min() >= s[~masks[name]].max()
    assert raw_weight(model[1]).shape == (16, 10)


def test_movement_scores_resume_from_a_checkpoint_as_if_never_interrupted():
    # Without a state_dict, a resumed run started its scores from zero again.
    data = torch.randn(64, 3), torch.randint(0, 2, (64,))

    def run(steps, start_step=0, state=None):
        model = two_layer(seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        movement = MovementScores(model)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            movement.load_state_dict(state["movement"])
        fit(model, data, optimizer, steps=steps, batch_size=16, callbacks=[movement], device="cpu", progress=False,
            start_step=start_step)
        return model, optimizer, movement

    whole = run(10)[2].scores()
    model, optimizer, movement = run(4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "movement": movement.state_dict()}, buffer)
    buffer.seek(0)
    resumed = run(10, start_step=4, state=torch.load(buffer, weights_only=True))[2].scores()
    assert all(torch.equal(resumed[name], whole[name]) for name in whole) and list(resumed) == list(whole)


def test_movement_scores_refuse_the_state_of_other_layers_or_shapes():
    state = MovementScores(two_layer()).state_dict()
    with pytest.raises(ValueError, match=r"the state's scores are of layers \{'0': \(4, 3\), '2': \(2, 4\)\}, but "
                                         r"this MovementScores has the layers \{'1': \(16, 10\), '3': \(3, 16\)\}"):
        MovementScores(MLP(in_features=10, hidden=(16,), out_features=3)).load_state_dict(state)
    wider = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    attach_masks(wider)
    with pytest.raises(ValueError, match=r"'0': \(5, 3\), '2': \(2, 5\)\}: build it on a model like"):
        MovementScores(wider).load_state_dict(state)


def test_magnitude_is_that_of_the_weight_the_layer_computes_with():
    model = two_layer()
    with torch.no_grad():
        raw_weight(model[0]).add_(1.0)                   # nonzero under the mask too: the raw weight differs
    scores = magnitude(model)["0"]
    assert torch.equal(scores, (raw_weight(model[0]) * masks_of(model)["0"]).abs())
    assert (scores[~masks_of(model)["0"]] == 0).all() and (raw_weight(model[0]) != 0).all()


class _AuxiliaryHead(nn.Module):
    """A trunk and an output layer, and an auxiliary head that only training-mode passes use (as in Inception)."""

    def __init__(self):
        super().__init__()
        self.trunk, self.aux, self.out = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.out(h) + 0.3 * self.aux(h) if self.training else self.out(h)


def test_snip_and_obd_score_a_layer_the_eval_mode_loss_skips_zero():
    torch.manual_seed(0)
    model = _AuxiliaryHead()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    for scores in (snip(model, batch), obd(model, batch, samples=2, generator=generator)):
        assert set(scores) == {"trunk", "aux", "out"}
        assert (scores["aux"] == 0).all() and (scores["out"] != 0).any() and (scores["trunk"] != 0).any()
    assert model.training                                                # its mode restored


def test_obd_of_a_loss_linear_in_the_weights_is_zero():
    """∂²L/∂w² = 0: the gradient does not depend on the weights, so there is nothing to differentiate twice."""
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    scores = obd(model, (x, y), lambda out, target: (out * target).sum(), samples=3)
    assert torch.equal(scores["0"], torch.zeros(3, 4))


def test_movement_scores_use_the_raw_weight_from_the_very_first_step_under_powerprop():
    """Hand loop of the documented increment −θ ⊙ ∂L/∂θ on the raw (Powerprop φ) weight, θ taken before each step.

    Under Powerprop (α = 2) the layer computes w = φ|φ| ≠ φ, so the copy taken at construction must be of the raw
    φ, like the copies taken at later calls; the reference records φ before each SGD step and its .grad after
    backward, independently of the callback.
    """
    torch.manual_seed(0)
    model = powerprop(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 2.0)
    phis = {name: raw_weight(model[int(name)]) for name in ("0", "2")}
    assert not torch.allclose(model[0].weight, phis["0"])          # effective and raw weights differ
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    movement = MovementScores(model)
    expected = {name: torch.zeros_like(p) for name, p in phis.items()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        before = {name: p.detach().clone() for name, p in phis.items()}
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, p in phis.items():
            expected[name] -= before[name] * p.grad
        optimizer.step()
        movement(TrainState(step=step, epoch=0, loss=torch.zeros(()), model=model, optimizer=optimizer))
    scores = movement.scores()
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-6, atol=1e-7)


def test_movement_scores_follow_a_model_cast_to_float64_after_construction():
    """The increment −θ ⊙ ∂L/∂θ of a float64 model, accumulated in float64 (it was cast down to float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    movement = MovementScores(model)
    model.double()
    theta = model[0].weight.detach().clone()
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x).square().sum().backward()
    movement(None)
    score = movement.scores()["0"]
    assert score.dtype == torch.float64
    assert torch.equal(score, -theta * model[0].weight.grad)


@pytest.mark.parametrize("cast_after", [False, True])
def test_movement_scores_of_a_bfloat16_model_sum_every_increment(cast_after):
    """By hand: θ = 1 and ∂L/∂θ = −2⁻⁹ at each of 300 calls add 300 · 2⁻⁹ = 0.5859375 (exact in float32). Summed
    in bfloat16 the score stopped at 0.5, where 2⁻⁹ is half a unit in the last place and rounds away."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False))
    if not cast_after:
        model.bfloat16()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    movement = MovementScores(model)
    if cast_after:
        model.bfloat16()
    for _ in range(300):
        model[0].weight.grad = torch.full((1, 1), -2.0 ** -9, dtype=torch.bfloat16)
        movement(None)
    score = movement.scores()["0"]
    assert score.dtype == torch.float32
    assert score.item() == 300 * 2.0 ** -9


# ---- SynFlow (Tanaka et al. 2020): a hand computation, the paper's conservation law, the authors' procedure ----


def test_synflow_equals_the_hand_computed_flow_through_each_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    attach_masks(model)
    set_masks(model, {"0": torch.rand(4, 3) < 0.6, "2": torch.ones(2, 4, dtype=torch.bool)})
    before = snapshot(model)
    scores = synflow(model, (3,))
    assert_untouched(model, before)
    assert model.training
    W1, b1 = model[0].weight.detach().double().abs(), model[0].bias.detach().double().abs()
    W2 = model[2].weight.detach().double().abs()
    # On an input of ones every unit of |network| is active: h = |W1| 1 + |b1|, R = 1ᵀ(|W2| h + |b2|).
    h = W1.sum(1) + b1
    expected_2 = W2 * h[None, :]                  # ∂R/∂W2[k, i] = h_i
    expected_1 = W1 * W2.sum(0)[:, None]          # ∂R/∂W1[i, j] = Σ_k |W2[k, i]| · 1
    assert scores["2"].dtype == torch.float64
    torch.testing.assert_close(scores["2"], expected_2, rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["0"], expected_1, rtol=1e-12, atol=0)
    pruned = ~masks_of(model)["0"]
    assert pruned.any() and (scores["0"][pruned] == 0).all()


def test_every_layer_of_a_bias_free_relu_network_carries_the_whole_flow():
    """Theorem 2 of Tanaka et al. (network-wise conservation): each layer's scores sum to R."""
    torch.manual_seed(1)
    widths = [6, 9, 5, 7, 3]
    layers = []
    for n_in, n_out in zip(widths, widths[1:]):
        layers += [nn.Linear(n_in, n_out, bias=False), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    prune(model, magnitude(model), 0.5, scope="global")
    scores = synflow(model, (6,))
    flow = torch.ones(6, dtype=torch.float64)
    for layer in model[::2]:
        flow = layer.weight.detach().double().abs() @ flow
    flow = flow.sum()
    assert len(scores) == 4
    for name, s in scores.items():
        torch.testing.assert_close(s.sum(), flow, rtol=1e-12, atol=0, msg=name)


def authors_synflow(model, input_shape):
    """The procedure of Tanaka et al.'s code on a plain network: the absolute values of every state_dict entry,
    eval mode, one input of ones, ``.grad`` by backward, ``|θ ⊙ grad|``."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    net(torch.ones(1, *input_shape, dtype=torch.float64)).sum().backward()
    return {name: (layer.weight.grad * layer.weight).abs() for name, layer in net.named_modules()
            if isinstance(layer, (nn.Linear, nn.Conv2d))}


def test_a_conv_net_with_batch_norm_is_scored_as_by_the_authors_procedure():
    torch.manual_seed(2)
    model = Conv4(in_channels=1, num_classes=3, hidden=4)
    with torch.no_grad():                          # running statistics other than the initial ones
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(-1, 1)
    expected = authors_synflow(model, (1, 28, 28))
    before = snapshot(model)
    scores = synflow(model, (1, 28, 28))
    assert_untouched(model, before)
    assert model.training and scores.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-10, atol=0, msg=name)


def test_synflow_scores_are_magnitudes_where_the_flow_falls_as_a_weight_grows():
    """Layer norm subtracts the mean of its inputs, so even in the network of absolute values some ∂R/∂θ are
    negative; the scores are |θ ⊙ ∂R/∂θ| there too, as in the authors' procedure."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.1, 3)
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            tensor.abs_()
    net(torch.ones(1, 5, dtype=torch.float64)).sum().backward()
    assert (net[0].weight.grad < 0).any()           # the signed θ ⊙ ∂R/∂θ would be negative there
    expected = authors_synflow(model, (5,))
    scores = synflow(model, (5,))
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-10, atol=0, msg=name)


def test_powerprop_layers_are_scored_on_their_effective_weights():
    torch.manual_seed(3)
    plain = MLP(hidden=(10, 8))
    reparametrised = powerprop(copy.deepcopy(plain), alpha=3.0)     # θ = φ|φ|² is the plain weight
    for model in (plain, reparametrised):
        prune(model, magnitude(model), 0.4, scope="layer")
    assert all(torch.equal(a, b) for a, b in zip(masks_of(plain).values(), masks_of(reparametrised).values()))
    expected = synflow(plain, (1, 28, 28))
    scores = synflow(reparametrised, (1, 28, 28))
    for name in expected:
        # φ = sign(θ)|θ|^(1/3) is rounded in float32, so φ|φ|² differs from θ in the last bits
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-5, atol=0, msg=name)


def test_iterative_synflow_keeps_every_layer_where_one_shot_scores_at_initialisation_empty_one():
    """Layer collapse (Tanaka et al., Fig. 1): LeNet-300-100 at initialisation, pruned to 0.1% of its weights."""
    torch.manual_seed(0)
    init = MLP()
    one_shot = copy.deepcopy(init)
    prune(one_shot, magnitude(one_shot), 1e-3, scope="global")
    assert min(int(m.sum()) for m in masks_of(one_shot).values()) == 0      # the first layer is emptied
    iterated = copy.deepcopy(init)
    iterative_pruning(iterated, 1e-3, 20, lambda model, r: None, score=lambda model: synflow(model, (1, 28, 28)))
    kept = [int(m.sum()) for m in masks_of(iterated).values()]
    assert sum(kept) == round(1e-3 * 266_200) and min(kept) > 0


def test_a_model_without_prunable_layers_has_no_scores():
    assert synflow(nn.Sequential(nn.ReLU()), (3,)) == {}


@pytest.mark.parametrize("shape", [(), (0, 3), (-1,), (2.0,), (True, 3)])
def test_an_input_shape_that_is_not_one_inputs_shape_is_refused(shape):
    with pytest.raises(ValueError, match="input_shape must be the shape of one input"):
        synflow(MLP(hidden=(4,)), shape)


def test_an_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="floating dtype"):
        synflow(MLP(hidden=(4,)), (784,), dtype=torch.int64)


def masked_mlp(seed):
    """A float64 MLP 5→6→4→3 with tanh (smooth, so every Hessian entry is defined), the first layer masked."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    attach_masks(model)
    set_masks(model, {"0": torch.rand(6, 5, generator=torch.Generator().manual_seed(seed)) < 0.7})
    return model


def squared_gradient_norm(model, batch, temperature):
    """‖m ⊙ ∂L/∂w‖² over the effective weights of the scored layers: the gradient the surviving weights train on."""
    weights = {name: layer.weight.detach().clone().requires_grad_() for name, layer in scored_layers(model).items()}
    masks = masks_of(model)

    def loss(*ws):
        params = {f"{name}.weight": w for name, w in zip(weights, ws)}
        plain = squash(copy.deepcopy(model))
        return F.cross_entropy(functional_call(plain, params, batch[0]) / temperature, batch[1])

    grads = torch.autograd.functional.jacobian(loss, tuple(weights.values()))
    return sum(((g * masks[name]) if name in masks else g).square().sum() for name, g in zip(weights, grads))


def test_grasp_equals_w_times_the_full_hessian_times_the_trained_gradient():
    """Reference: the Hessian of L over all scored weights, built entry by entry with torch.autograd.functional."""
    model = masked_mlp(0)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (7,), generator=generator)
    names = list(scored_layers(model))
    shapes = [scored_layers(model)[name].weight.shape for name in names]
    sizes = [shape.numel() for shape in shapes]
    plain = squash(copy.deepcopy(model)).eval()
    w0 = torch.cat([plain.get_submodule(name).weight.detach().flatten() for name in names])

    def loss(flat):
        params = {f"{name}.weight": part.view(shape) for name, part, shape in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(plain, params, x) / 4.0, y)

    g = torch.autograd.functional.jacobian(loss, w0)
    H = torch.autograd.functional.hessian(loss, w0)
    m = torch.cat([masks_of(model).get(name, torch.ones(shape, dtype=torch.bool)).flatten().double()
                   for name, shape in zip(names, shapes)])
    expected = dict(zip(names, (w0 * (H @ (m * g))).split(sizes)))
    before = snapshot(model)
    scores = grasp(model, (x, y), temperature=4.0)
    assert_untouched(model, before)
    assert list(scores) == names
    for name, shape in zip(names, shapes):
        torch.testing.assert_close(scores[name], expected[name].view(shape), rtol=1e-10, atol=1e-14, msg=name)
    pruned = ~masks_of(model)["0"]
    assert pruned.any() and (scores["0"][pruned] == 0).all()
    assert (scores["2"] < 0).any() and (scores["2"] > 0).any()                 # signed, unlike SNIP's


def test_a_high_grasp_score_marks_a_weight_whose_removal_shrinks_the_gradient():
    """The first-order reading: taking a fraction ε of weight i away changes ‖g‖² by −2ε·score_i + O(ε²)."""
    model = masked_mlp(1)
    generator = torch.Generator().manual_seed(2)
    batch = torch.randn(9, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (9,), generator=generator)
    scores = grasp(model, batch, temperature=2.0)
    base = squared_gradient_norm(model, batch, 2.0)
    eps = 1e-5
    for name, index in [("2", (1, 3)), ("4", (2, 0)), ("0", tuple(masks_of(model)["0"].nonzero()[0].tolist()))]:
        layer = scored_layers(model)[name]
        with torch.no_grad():
            raw_weight(layer)[index] *= 1 - eps
        changed = squared_gradient_norm(model, batch, 2.0)
        with torch.no_grad():
            raw_weight(layer)[index] /= 1 - eps
        torch.testing.assert_close((changed - base) / eps, -2 * scores[name][index], rtol=1e-3, atol=1e-9, msg=name)


def authors_grasp(model, x, y, temperature):
    """The procedure of Wang et al.'s code (pruner/GraSP.py, reinit=False) on an unmasked network: g summed over
    two halves of the batch without a graph, then z = Σ g.data ⊙ ∂L_half/∂w with a graph, z.backward() per half,
    and the score −θ ⊙ θ.grad. Eval mode here, as lowlearn scores (the authors' code runs in training mode)."""
    net = copy.deepcopy(model).eval()
    weights = [layer.weight for layer in scored_layers(net).values()]
    halves = [(x[:len(x) // 2], y[:len(x) // 2]), (x[len(x) // 2:], y[len(x) // 2:])]
    grad_w = [torch.zeros_like(w) for w in weights]
    for xs, ys in halves:
        for acc, g in zip(grad_w, torch.autograd.grad(F.cross_entropy(net(xs) / temperature, ys), weights)):
            acc += g
    for xs, ys in halves:
        grad_f = torch.autograd.grad(F.cross_entropy(net(xs) / temperature, ys), weights, create_graph=True)
        sum((g.data * f).sum() for g, f in zip(grad_w, grad_f)).backward()
    return {name: -w.data * w.grad for name, w in zip(scored_layers(net), weights)}


def test_grasp_on_a_conv_net_keeps_what_the_authors_procedure_keeps():
    torch.manual_seed(3)
    model = Conv4(num_classes=3, hidden=4, image_size=16).double()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(12, 1, 16, 16, generator=generator, dtype=torch.float64)
    y = torch.arange(12) % 3
    theirs = authors_grasp(model, x, y, 200.0)
    scores = grasp(model, (x, y))                                        # T = 200 by default, as theirs
    assert model.training and scores.keys() == theirs.keys()
    for name in scores:
        # two halves of equal size: their Hg is (H₁ + H₂)(g₁ + g₂) = 4 Hg, and their score is −w ⊙ Hg
        torch.testing.assert_close(-4 * scores[name], theirs[name], rtol=1e-9, atol=1e-20, msg=name)
    # Their keep mask at density 0.2: the scores below the k-th largest, k the number removed. (Their code keeps
    # `score <= k-th largest`, that weight too: one more than the density asks; lowlearn keeps exactly round(d·n).)
    flat = torch.cat([s.flatten() for s in theirs.values()])
    threshold = flat.topk(int(len(flat) * 0.8)).values[-1]
    prune(model, scores, 0.2, scope="global")
    for name, mask in masks_of(model).items():
        assert torch.equal(mask, theirs[name] < threshold), name


def test_grasp_scores_powerprop_layers_on_their_effective_weights():
    torch.manual_seed(5)
    plain = MLP(12, (10, 8), 3)
    reparametrised = powerprop(copy.deepcopy(plain), alpha=3.0)
    batch = torch.randn(6, 12), torch.randint(0, 3, (6,))
    expected = grasp(plain, batch)
    scores = grasp(reparametrised, batch)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-12, msg=name)


def test_grasp_of_a_loss_linear_in_the_weights_is_zero():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    scores = grasp(model, (x, y), lambda out, target: (out * target).sum())
    assert torch.equal(scores["0"], torch.zeros(3, 4))


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a positive, finite number"):
        grasp(MLP(hidden=(4,)), (torch.randn(2, 784), torch.tensor([0, 1])), temperature=temperature)


@pytest.mark.parametrize("masked", [False, True])
def test_a_frozen_layer_is_scored_as_if_it_were_trained_and_stays_frozen(masked):
    # A derivative exists whether or not the weight is trained: a frozen body is scored like a trained one.
    torch.manual_seed(0)
    model = MLP(4, (6,), 3).double()
    if masked:
        attach_masks(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    scorers = {"snip": lambda m: snip(m, (x, y)), "grasp": lambda m: grasp(m, (x, y)),
               "obd": lambda m: obd(m, (x, y), generator=torch.Generator().manual_seed(0)),
               "synflow": lambda m: synflow(m, (4,))}
    trained = {name: score(model) for name, score in scorers.items()}
    raw_weight(model[1]).requires_grad_(False)
    for name, score in scorers.items():
        frozen = score(model)
        for layer in trained[name]:
            torch.testing.assert_close(frozen[layer], trained[name][layer], msg=f"{name} {layer}")
        assert not raw_weight(model[1]).requires_grad and raw_weight(model[3]).requires_grad
        assert raw_weight(model[1]).grad is None
