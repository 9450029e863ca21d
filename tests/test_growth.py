import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.growth import STRATEGIES, GrowthSchedule, gradmax_directions, grow, layer_pair, width
from lowlearn.models import MLP
from lowlearn.train import fit


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(10, (6, 5), 3, activation=nn.Tanh).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)).double()


def batch(shape=(10,), n=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                           generator=generator)


def new_unit_gradient_norm(model, layer, new, data):
    """‖∂L/∂W_new‖_F: the gradient that reaches the new units' incoming weights."""
    grown, _ = layer_pair(model, layer)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(data[0]), data[1]), grown.weight)
    return grad[new].norm().item()


@pytest.mark.parametrize("strategy", ["random", "split", "gradmax"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_function_is_unchanged_at_growth(strategy, kind):
    model, data, layer = (mlp(), batch(), 1) if kind == "linear" else (cnn(), batch((2, 8, 8)), 0)
    before = model(data[0]).detach()
    units = width(model, layer)
    new = grow(model, layer, 3, strategy, batch=data, generator=torch.Generator().manual_seed(0))
    assert new.tolist() == [units, units + 1, units + 2] and width(model, layer) == units + 3
    grown, consumer = layer_pair(model, layer)                     # the layers' sizes follow their weights
    sizes = ("out_features", "in_features") if kind == "linear" else ("out_channels", "in_channels")
    assert (getattr(grown, sizes[0]), getattr(consumer, sizes[1])) == (units + 3, units + 3)
    torch.testing.assert_close(model(data[0]), before, rtol=1e-12, atol=1e-12)


def test_an_in_place_relu_between_the_layers_gives_the_same_directions():
    # The probe's hook reads the ReLU's input, which an in-place ReLU overwrites with its output.
    data, found = batch((2, 8, 8)), []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 5, 3),
                              nn.Tanh(), nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).double()
        found.append(gradmax_directions(model, 0, 2, data, generator=torch.Generator().manual_seed(0)))
        assert model[1].inplace is inplace                        # the model itself is left as it was
    torch.testing.assert_close(found[1], found[0], atol=0, rtol=0)
    found = []                                                    # the closed form of a Linear pair, likewise
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.Tanh(),
                              nn.Linear(5, 3)).double()
        found.append(gradmax_directions(model, 0, 2, batch()))
    torch.testing.assert_close(found[1], found[0], atol=0, rtol=0)


def test_gradmax_leaves_the_gradients_of_the_model_alone():
    # M is measured with a backward pass from the loss to the grown layer's output only: the .grad that the
    # training loop accumulates in the model's parameters (all of them, also those of the layers after it) stay
    for closed_form in (True, False):
        model = mlp()
        gradmax_directions(model, 0, 2, batch(), closed_form=closed_form, generator=torch.Generator().manual_seed(0))
        assert all(p.grad is None for p in model.parameters())


def test_a_relu_module_used_at_several_places_gives_the_directions_of_separate_ones():
    # The probe's ReLU counts f'(0) = 1 between the two layers only: one module used after the next layer too (and
    # before the grown one) must still pass the true gradient there, as separate ReLU modules do.
    data, found = batch((2, 8, 8)), []
    for shared in (False, True):
        torch.manual_seed(0)
        relus = [nn.ReLU()] * 3 if shared else [nn.ReLU() for _ in range(3)]
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), relus[0], nn.Conv2d(3, 4, 3, padding=1), relus[1],
                              nn.Conv2d(4, 5, 3), relus[2], nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).double()
        found.append(gradmax_directions(model, 1, 2, data, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(found[1], found[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("closed_form", [True, False])
def test_gradmax_leaves_batch_norm_statistics_alone(closed_form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    gradmax_directions(model, 1, 2, batch(), closed_form=closed_form, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_gradmax_closed_form_beats_every_random_candidate_and_equals_its_singular_values():
    data = batch()
    reference = mlp()
    k = 2
    directions = gradmax_directions(reference, 1, k, data)
    # the maximiser's gradient norm: f'(0) = tanh'(0) = 1 times the top-k singular values of M = Σ δ xᵀ
    model = mlp()
    new = grow(model, 1, k, "gradmax", batch=data, scale=1.0)
    target = reference[5].weight.norm(dim=0).mean()
    best = new_unit_gradient_norm(model, 1, new, data)
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        candidate = torch.randn(k, 3, generator=generator, dtype=torch.float64)
        candidate = torch.linalg.qr(candidate.T)[0].T                       # orthonormal, like GradMax's
        trial = mlp()
        with torch.no_grad():
            grow(trial, 1, k, "random")
            trial[5].weight[:, -k:] = candidate.T * target
        assert new_unit_gradient_norm(trial, 1, new, data) <= best + 1e-12
    # by hand: M from the layer input x and the error δ at the next layer's output
    x = torch.tanh(reference[1](data[0]))                               # the grown layer's input
    z = reference[5](torch.tanh(reference[3](x)))                       # the next layer's output
    z.retain_grad()
    F.cross_entropy(z, data[1]).backward()
    singular = torch.linalg.svdvals(z.grad.T @ x)
    torch.testing.assert_close(torch.tensor(best, dtype=torch.float64), target * singular[:k].norm())
    assert torch.allclose(directions @ directions.T, torch.eye(k, dtype=torch.float64))


def test_gradmax_closed_form_is_the_top_left_singular_subspace_of_m_by_hand():
    # With a 3-class cross-entropy and k = 2 any M gives the same subspace (δ's rows sum to 0, so 1 is always
    # M's null direction); here the next layer has 5 outputs, and M = Σ δ xᵀ is written out by hand.
    data, model, k = batch(), mlp(), 2
    directions = gradmax_directions(model, 0, k, data)
    x = data[0]                                                         # the grown layer's (model[1]) input
    z = model[3](torch.tanh(model[1](x)))                               # the next layer's output
    z.retain_grad()
    F.cross_entropy(model[5](torch.tanh(z)), data[1]).backward()
    left, singular, _ = torch.linalg.svd(z.grad.T @ x)                  # M: (5, 10)
    assert singular[k - 1] > 1.5 * singular[k]                          # a well-separated top-k subspace
    torch.testing.assert_close(directions.T @ directions, left[:, :k] @ left[:, :k].T, atol=1e-10, rtol=0)
    # The first direction is the top singular vector itself (up to sign).
    assert abs(directions[0] @ left[:, 0]).item() == pytest.approx(1.0, abs=1e-10)


def test_subspace_iteration_finds_the_closed_form_subspace():
    data = batch()
    closed = gradmax_directions(mlp(), 1, 2, data)
    iterated = gradmax_directions(mlp(), 1, 2, data, closed_form=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(iterated.T @ iterated, closed.T @ closed, atol=1e-8, rtol=0)


def test_under_relu_gradmax_chooses_its_directions_as_if_the_gradient_at_zero_were_one():
    # ReLU's gradient at 0 is 0, which would make the map U ↦ ∂L/∂W_new zero; the directions are chosen with
    # f'(0) = 1. For a Linear pair the subspace iteration then agrees with the closed form, which has no f'(0) ...
    def directions(model, data):
        return gradmax_directions(model, 0, 2, data, closed_form=False,
                                  generator=torch.Generator().manual_seed(0)).reshape(2, -1)

    data = batch()
    torch.manual_seed(0)
    model = MLP(10, (6, 5), 3).double()
    iterated, closed = directions(model, data), gradmax_directions(model, 0, 2, data)
    torch.testing.assert_close(iterated.T @ iterated, closed.T @ closed, atol=1e-8, rtol=0)
    # ... and for convolutions whose existing units all have positive inputs, where ReLU is the identity, it
    # agrees with the same network without the ReLU.
    data, found = batch((2, 8, 8)), []
    for activation in (nn.ReLU, nn.Identity):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), activation(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                              nn.Tanh(), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)).double()
        with torch.no_grad():
            model[0].bias.add_(10)
        found.append(directions(model, data))
    relu, identity = found
    torch.testing.assert_close(relu.T @ relu, identity.T @ identity, atol=1e-8, rtol=0)


@pytest.mark.parametrize("closed_form", [True, False])
def test_gradmax_measures_without_dropout_and_leaves_the_model_training(closed_form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    data = batch()

    def directions():
        return gradmax_directions(model, 0, 2, data, closed_form=closed_form,
                                  generator=torch.Generator().manual_seed(0))

    first, second = directions(), directions()
    assert model.training and model[2].training
    model.eval()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, directions(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradmax_grows_a_half_precision_model(kind):
    model = (mlp() if kind == "linear" else cnn()).to(torch.bfloat16)
    inputs, targets = batch() if kind == "linear" else batch((2, 8, 8))
    new = grow(model, 0, 2, "gradmax", batch=(inputs.to(torch.bfloat16), targets),
               generator=torch.Generator().manual_seed(0))
    outgoing = layer_pair(model, 0)[1].weight.detach()[:, new].transpose(0, 1).reshape(2, -1).float()
    assert layer_pair(model, 0)[1].weight.dtype == torch.bfloat16
    cosine = F.cosine_similarity(outgoing[0], outgoing[1], dim=0)
    assert abs(cosine) < 0.02                               # orthogonal, to bfloat16's precision


def test_gradmax_on_convolutions_beats_random_growth():
    data = batch((2, 8, 8))
    model = cnn()
    new = grow(model, 0, 2, "gradmax", batch=data, generator=torch.Generator().manual_seed(0))
    best = new_unit_gradient_norm(model, 0, new, data)
    for seed in range(20):
        trial = cnn()
        grow(trial, 0, 2, "random", generator=torch.Generator().manual_seed(seed))
        assert new_unit_gradient_norm(trial, 0, new, data) <= best + 1e-12


def test_gradmax_on_convolutions_reaches_the_top_singular_values_of_the_map_to_the_new_gradient():
    # The map A: outgoing weights u (a (5, 3, 3) filter column) ↦ ∂L/∂W_new (the new unit's (2, 3, 3) incoming
    # weights) is linear; written out column by column, one basis vector e_i at a time. k orthonormal outgoing
    # weights times c give at most ‖∂L/∂W_new‖_F = c ‖σ_{:k}(A)‖, reached by A's top-k right singular vectors.
    data, k = batch((2, 8, 8)), 2
    model = cnn()
    target = model[3].weight.detach().transpose(0, 1).reshape(4, -1).norm(dim=1).mean()
    columns = []
    for i in range(5 * 3 * 3):
        trial = cnn()
        grow(trial, 0, 1, "random")
        with torch.no_grad():
            trial[3].weight[:, 4] = torch.eye(45, dtype=torch.float64)[i].reshape(5, 3, 3)
        (grad,) = torch.autograd.grad(F.cross_entropy(trial(data[0]), data[1]), trial[0].weight)
        columns.append(grad[4].flatten())
    _, singular, right = torch.linalg.svd(torch.stack(columns, dim=1))          # A: (18, 45)
    new = grow(model, 0, k, "gradmax", batch=data, generator=torch.Generator().manual_seed(0))
    best = new_unit_gradient_norm(model, 0, new, data)
    assert best == pytest.approx((target * singular[:k].norm()).item(), rel=1e-6)
    outgoing = model[3].weight.detach()[:, new].transpose(0, 1).reshape(k, -1) / target
    torch.testing.assert_close(outgoing.T @ outgoing, right[:k].T @ right[:k], atol=1e-6, rtol=0)


def test_new_weights_get_the_state_a_new_parameter_starts_from():
    # Adagrad's sum starts at initial_accumulator_value and Rprop's step sizes at lr, not at zero (a zero step
    # size would leave Rprop's new weights where they are for good).
    for make, key, start in ((lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5), "sum", 0.5),
                             (lambda p: torch.optim.Rprop(p, lr=0.01), "step_size", 0.01)):
        model, data = mlp(), batch()
        optimizer = make(model.parameters())
        F.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()
        grow(model, 0, 2, "random", optimizer=optimizer, epsilon=0.1, generator=torch.Generator().manual_seed(0))
        incoming = layer_pair(model, 0)[0].weight
        assert torch.all(optimizer.state[incoming][key][-2:] == start), key
        before = incoming.detach()[-2:].clone()
        optimizer.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()
        assert not torch.equal(incoming.detach()[-2:], before)                     # the new weights learn


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p)])
def test_the_optimizer_state_grows_with_the_weights(make):
    model, data = mlp(), batch()
    optimizer = make(model.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim()}
                 for name, p in model.named_parameters()}
    grow(model, 0, 2, "gradmax", batch=data, optimizer=optimizer)
    params = dict(model.named_parameters())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in params.values()}
    for name, param in params.items():
        kept_keys = {key for key, value in optimizer.state[param].items() if torch.is_tensor(value) and value.dim()}
        assert kept_keys == set(old_state[name]) and kept_keys, name        # the state is kept, not dropped
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value) and value.dim():
                assert value.shape == param.shape
                before = old_state[name][key]
                kept = tuple(slice(0, size) for size in before.shape)
                assert torch.equal(value[kept], before)
                assert torch.count_nonzero(value) == torch.count_nonzero(before)      # the rest is zeros
    optimizer.zero_grad()
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()                                                   # training goes on


def test_a_schedule_grows_to_the_target_width_during_fit():
    model, data = mlp(), batch(n=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = GrowthSchedule(0, 3, every=4, target=11, batch=lambda: data)
    fit(model, data, optimizer, steps=20, batch_size=16, callbacks=[schedule], device="cpu", progress=False)
    assert width(model, 0) == 11 and schedule.grown_at == [4, 8]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(strategy="rnadom"), ValueError, "unknown strategy 'rnadom'"),
    (dict(strategy="random", max_width=64), TypeError, r"cannot pass \['max_width'\]"),
    (dict(strategy="random", epsilonn=0.1), TypeError, r"cannot pass \['epsilonn'\] on to grow\(\): its options are "
                                                       r"\['epsilon', 'generator', 'loss_fn', 'noise', 'scale'\]"),
    (dict(strategy="random", target=0), ValueError, "target .* must be an int >= 1; got 0"),
    (dict(strategy="random", every=True), ValueError, r"every \(steps between growths\) must be an int >= 1; got True"),
    (dict(strategy="random", epsilon=float("nan")), ValueError, "epsilon must be a finite number >= 0, got nan"),
    (dict(strategy="split", noise=-0.1), ValueError, "noise must be a finite number >= 0, got -0.1"),
    (dict(), ValueError, r"GradMax needs batch=, a function that returns a batch \(inputs, targets\)"),
])
def test_a_schedule_checks_its_arguments_when_it_is_built(kwargs, error, message):
    arguments = dict(layer=0, k=3, every=4, target=11) | kwargs
    with pytest.raises(error, match=message):
        GrowthSchedule(**arguments)


def test_a_split_schedule_with_k_above_the_width_fails_at_its_first_growth_with_the_model_unchanged():
    # The schedule does not see the model before training: its docstring says the width is checked at the first growth.
    model, data = mlp(), batch(n=64)
    before = copy.deepcopy(model.state_dict())
    schedule = GrowthSchedule(0, width(model, 0) + 1, every=2, target=64, strategy="split")
    with pytest.raises(ValueError, match="splitting copies 7 distinct units, but layer 0 has only 6"):
        fit(model, data, torch.optim.SGD(model.parameters(), lr=0.0), steps=4, batch_size=16, callbacks=[schedule],
            device="cpu", progress=False)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_bad_growth_is_a_clear_error():
    model, data = mlp(), batch()
    for bad in (0, True):
        with pytest.raises(ValueError, match=r"k \(units to grow\) must be an int >= 1"):
            grow(model, 0, bad, "random")
    with pytest.raises(ValueError, match="max_width=7"):
        grow(model, 0, 2, "random", max_width=7)
    with pytest.raises(ValueError, match="needs a batch"):
        grow(model, 0, 1, "gradmax")
    with pytest.raises(ValueError, match="unknown strategy"):
        grow(model, 0, 1, "magic")
    with pytest.raises(ValueError, match="hidden Linear/Conv2d layer"):
        grow(model, 2, 1, "random")
    with pytest.raises(ValueError, match="Conv2d→Linear"):
        grow(cnn(), 1, 1, "random")
    with pytest.raises(ValueError, match="at most 3 orthogonal"):
        gradmax_directions(model, 1, 6, data)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"k \(directions\) must be an int >= 1"):
            gradmax_directions(model, 1, bad, data)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        gradmax_directions(model, 1, 1, data, closed_form=False, iterations=0)
    with pytest.raises(ValueError, match="closed form is for Linear pairs; use closed_form=False for convolutions"):
        gradmax_directions(cnn(), 0, 1, batch((2, 8, 8)), closed_form=True)
    from lowlearn.sparse.mask import attach_masks

    masked = mlp()
    attach_masks(masked)
    with pytest.raises(ValueError, match="parametrized layers"):
        grow(masked, 0, 1, "random")
    with pytest.raises(ValueError, match="at most 1 orthogonal"):     # a 1×1 convolution: one outgoing weight
        gradmax_directions(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 1, 1), nn.Flatten()), 0, 2,
                           (torch.randn(4, 2, 6, 6), torch.randn(4, 16)), loss_fn=F.mse_loss, closed_form=False)
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    for strategy in ("random", "split"):
        with pytest.raises(ValueError, match="grouped convolutions"):
            grow(grouped, 0, 1, strategy)
    for option, bad in (("scale", float("inf")), ("epsilon", float("nan")), ("noise", -1.0), ("epsilon", "0.1")):
        with pytest.raises(ValueError, match=f"{option} must be a finite number >= 0"):
            grow(model, 0, 1, "random", **{option: bad})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim optimizer"):
        grow(model, 0, 1, "random", optimizer=object())
    assert width(model, 0) == 6                                           # every refused call changed nothing


def test_dropout_of_every_kind_may_sit_between_the_layers():
    for dropout in (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), dropout(0.5), nn.Conv2d(4, 3, 3), nn.Flatten()).eval()
        x = torch.randn(2, 2, 7, 7)
        before = model(x)
        grow(model, 0, 2, "random")
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_growth_keeps_a_channels_last_model_channels_last():
    for strategy in ("random", "split"):
        model = cnn().to(memory_format=torch.channels_last)
        grow(model, 0, 2, strategy)
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert model[3].weight.is_contiguous(memory_format=torch.channels_last)


class _NeedsMore(torch.optim.SGD):
    def __init__(self, params, lr, extra):           # a constructor growth cannot call to probe a fresh state
        super().__init__(params, lr=lr, momentum=0.9)


def test_growth_extends_a_wrapped_optimizers_state_and_refuses_one_it_cannot_probe_before_changing_anything():
    from lowlearn.powerprop import PowerPropOptimizer, powerprop

    model, data = mlp(), batch()
    powerprop(model, 2, layers=["5"])                                  # only the head is reparameterised
    optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    grow(model, 0, 2, "random", optimizer=optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert optimizer.state[model[1].weight]["exp_avg"].shape == (8, 10)
    model = mlp()
    optimizer = _NeedsMore(model.parameters(), lr=0.1, extra=1)
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="extra"):
        grow(model, 0, 2, "split", optimizer=optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("strategy", ["random", "gradmax"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_layer_can_grow_by_more_units_than_it_has(strategy, kind):
    # a 2-unit layer grown by 3 (the bias and, for convolutions, the subspace iteration's probe were sized by
    # the old width)
    if kind == "linear":
        torch.manual_seed(0)
        model, data = MLP(10, (2, 5), 3, activation=nn.Tanh).double(), batch()
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 5, 3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(5 * 6 * 6, 3)).double()
        data = batch((2, 8, 8))
    before = model(data[0]).detach()
    grow(model, 0, 3, strategy, batch=data, generator=torch.Generator().manual_seed(0))
    grown, consumer = layer_pair(model, 0)
    assert grown.weight.shape[0] == grown.bias.shape[0] == consumer.weight.shape[1] == 5
    torch.testing.assert_close(model(data[0]), before, rtol=1e-12, atol=1e-12)


def test_an_optimizer_over_some_parameters_keeps_training_those_after_growth():
    model, data = mlp(), batch()
    optimizer = torch.optim.SGD(model[-1].parameters(), lr=0.1, momentum=0.9)     # the head alone
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    grow(model, 1, 2, "random", optimizer=optimizer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model[-1].parameters()}                    # the grown head, not the layer
    assert optimizer.state[model[-1].weight]["momentum_buffer"].shape == model[-1].weight.shape


@pytest.mark.parametrize("strategy", ["random", "split", "gradmax"])
def test_optimizer_state_growth_cannot_extend_is_refused_before_the_model_changes(strategy):
    model, data = mlp(), batch()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.01)          # factored second moments
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Adafactor keeps state 'row_var' of shape"):
        grow(model, 1, 2, strategy, batch=data, optimizer=optimizer)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    with pytest.raises(ValueError, match="LBFGS keeps a history of its parameters flattened together"):
        grow(model, 1, 2, strategy, batch=data, optimizer=torch.optim.LBFGS(model.parameters()))


def test_split_copies_the_units_with_the_largest_outgoing_weights_and_shares_them_around_a_half():
    model = mlp()
    grown, consumer = layer_pair(model, 0)
    before_in, before_out = grown.weight.detach().clone(), consumer.weight.detach().clone()
    largest = before_out.norm(dim=0).topk(2).indices
    grow(model, 0, 2, "split", noise=0.1, generator=torch.Generator().manual_seed(0))
    grown, consumer = layer_pair(model, 0)
    assert torch.equal(grown.weight[6:], before_in[largest])
    share = consumer.weight[:, 6:] / before_out[:, largest]              # (½ + η) per new unit, |η| ≤ noise
    assert torch.allclose(share, share[0].expand_as(share)) and ((share[0] - 0.5).abs() <= 0.1).all()
    assert torch.allclose(consumer.weight[:, largest] + consumer.weight[:, 6:], before_out[:, largest])
    etas = []
    for seed in range(5):                                                     # every unit split, 30 draws of η
        model = mlp()
        out = layer_pair(model, 0)[1].weight.detach().clone()
        grow(model, 0, 6, "split", noise=0.1, generator=torch.Generator().manual_seed(seed))
        etas.append(layer_pair(model, 0)[1].weight[0, 6:] / out[0, out.norm(dim=0).topk(6).indices] - 0.5)
    eta = torch.cat(etas)
    assert eta.min() < 0 < eta.max() and (eta.abs() <= 0.1).all()            # uniform in ±noise: both signs


@pytest.mark.parametrize("strategy", ["random", "gradmax"])
def test_scale_sets_the_norm_of_the_new_outgoing_weights(strategy):
    norms = {}
    for scale in (1.0, 2.0):
        model = mlp()
        mean_norm = layer_pair(model, 0)[1].weight.norm(dim=0).mean()
        grow(model, 0, 2, strategy, batch=batch(), scale=scale, generator=torch.Generator().manual_seed(0))
        norms[scale] = layer_pair(model, 0)[1].weight[:, 6:].norm(dim=0)
        assert torch.allclose(norms[scale], scale * mean_norm)
    assert torch.allclose(norms[2.0], 2 * norms[1.0])


@pytest.mark.parametrize("strategy", ["random", "gradmax"])
@pytest.mark.parametrize("kind", ["zero next layer", "no units yet"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
def test_new_units_take_the_default_initialisations_norm_where_no_unit_has_outgoing_weights(strategy, kind):
    # Zero weights both ways would leave the new units at a saddle: no gradient reaches either side.
    torch.manual_seed(0)
    units = 6 if kind == "zero next layer" else 0
    model = nn.Sequential(nn.Linear(10, units), nn.Tanh(), nn.Linear(units, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    consumer = layer_pair(model, 0)[1]
    if kind == "zero next layer":
        nn.init.zeros_(consumer.weight)
    old = width(model, 0)
    data = batch()
    before = model(data[0])
    new = grow(model, 0, 2, strategy, batch=data, scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(data[0]), before)                      # the function is unchanged
    expected = 2.0 * (5 / (3 * (old + 2))) ** 0.5             # U(±1/√fan_in) after growth, 5 outputs per unit
    torch.testing.assert_close(consumer.weight[:, new].norm(dim=0), torch.full((2,), expected, dtype=torch.float64))
    assert new_unit_gradient_norm(model, 0, new, data) > 0


def test_splitting_more_units_than_the_layer_has_is_a_clear_error():
    torch.manual_seed(0)
    model = MLP(10, (2, 5), 3, activation=nn.Tanh)
    with pytest.raises(ValueError, match="only 2"):
        grow(model, 0, 3, "split")


def test_gradmax_gives_k_orthonormal_directions_past_the_rank_of_m():
    # M is (10, 3): rank 3, but 5 new units still get 5 orthonormal outgoing weights (two with zero gradient)
    torch.manual_seed(0)
    model = MLP(3, (6,), 10, activation=nn.Tanh).double()
    data = batch((3,))
    directions = gradmax_directions(model, 0, 5, data)
    assert directions.shape == (5, 10)
    torch.testing.assert_close(directions @ directions.T, torch.eye(5, dtype=torch.float64))
    before = model(data[0]).detach()
    grow(model, 0, 5, "gradmax", batch=data)
    torch.testing.assert_close(model(data[0]), before, rtol=1e-12, atol=1e-12)


def test_a_sequential_with_its_own_forward_is_not_read_as_a_chain_of_layers():
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    with pytest.raises(ValueError, match="whose own forward may not apply its layers in order"):
        layer_pair(Residual(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), 0)


def test_growth_keeps_frozen_parameters_frozen():
    """Reference: a grown parameter is the old one with more rows/columns, so it keeps the old one's
    ``requires_grad`` (a frozen bias or consumer stays frozen; a trainable weight stays trainable)."""
    torch.manual_seed(0)
    for strategy in ("random", "split"):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        model[0].bias.requires_grad_(False)
        model[2].weight.requires_grad_(False)
        grow(model, 0, 2, strategy, generator=torch.Generator().manual_seed(1))
        assert model[0].weight.shape == (5, 4) and model[2].weight.shape == (2, 5)
        assert model[0].weight.requires_grad
        assert not model[0].bias.requires_grad
        assert not model[2].weight.requires_grad


@pytest.mark.parametrize("closed_form", [True, False])
def test_gradmax_measures_the_gradient_of_frozen_layers_too(closed_form):
    # ∂L/∂W_new is a property of the function, not of what is trained: freezing the grown layer, the next one or
    # the whole model changes neither the directions nor the growth, and the frozen parameters stay frozen
    data = batch()
    expected = gradmax_directions(mlp(), 0, 2, data, closed_form=closed_form,
                                  generator=torch.Generator().manual_seed(0))
    for frozen in ([1], [3], [1, 3, 5]):
        model = mlp()
        for index in frozen:
            model[index].requires_grad_(False)
        directions = gradmax_directions(model, 0, 2, data, closed_form=closed_form,
                                        generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(directions.T @ directions, expected.T @ expected, atol=1e-8, rtol=0)
        grow(model, 0, 2, "gradmax", batch=data)
        assert [p.requires_grad for p in model.parameters()] == [i not in frozen for i in (1, 1, 3, 3, 5, 5)]


def test_random_growth_draws_incoming_weights_of_both_signs_with_standard_deviation_epsilon():
    """Reference: the grow docstring, ``epsilon`` is the standard deviation of the new units' random incoming
    weights (zero-mean normal): over 64 × 50 draws, the mean is near 0, both signs occur about equally and the
    standard deviation is near ε."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 3), nn.ReLU(), nn.Linear(3, 2))
    new = grow(model, 0, 64, "random", epsilon=0.1, generator=torch.Generator().manual_seed(3))
    incoming = model[0].weight.detach()[new]
    assert abs(incoming.mean().item()) < 0.01
    assert 0.45 < (incoming > 0).float().mean().item() < 0.55
    assert abs(incoming.std().item() - 0.1) < 0.01


def test_new_units_take_the_fresh_state_of_their_own_param_group():
    """Reference: torch's Adagrad starts a parameter's ``sum`` at its group's ``initial_accumulator_value``
    (a zero gradient adds 0²), so after growth the new rows of the grown layer (group with 0.5) hold 0.5 and
    the consumer's new columns (group with 0.25) hold 0.25, while the old entries keep their values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.Adagrad([{"params": model[2].parameters(), "initial_accumulator_value": 0.25},
                               {"params": model[0].parameters(), "initial_accumulator_value": 0.5}], lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    old_w0 = opt.state[model[0].weight]["sum"].clone()
    old_w2 = opt.state[model[2].weight]["sum"].clone()
    new = grow(model, 0, 2, "random", optimizer=opt, generator=torch.Generator().manual_seed(0))
    w0, b0, w2 = model[0].weight, model[0].bias, model[2].weight
    assert torch.equal(opt.state[w0]["sum"][:3], old_w0)
    assert torch.equal(opt.state[w0]["sum"][new], torch.full((2, 4), 0.5))
    assert torch.equal(opt.state[b0]["sum"][new], torch.full((2,), 0.5))
    assert torch.equal(opt.state[w2]["sum"][:, :3], old_w2)
    assert torch.equal(opt.state[w2]["sum"][:, new], torch.full((2, 2), 0.25))


def test_growing_through_a_layer_growth_cannot_see_through_is_refused_and_changes_nothing():
    # module docstring: only activations, dropout and pooling may sit between the grown layer and the next; a batch
    # norm right after the grown layer has one statistic per unit, which growth does not extend
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot grow through \['BatchNorm1d'\]"):
        grow(model, 0, 2, "random")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert (model[0].out_features, model[3].in_features) == (8, 8)


class RowNormSGD(torch.optim.SGD):
    """SGD that also keeps each matrix's row norms: per-parameter state of another shape than the parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 2:
                    self.state[p]["row_norm"] = p.norm(dim=1)
        return loss


def test_one_dimensional_state_of_a_matrix_is_refused_before_the_model_changes():
    # grow's docstring: optimizer state not shaped like its parameter cannot be extended (a 1-D tensor is state
    # too, only scalar tensors such as Adam's step count are kept as they are); the model is then left as it was
    model, data = mlp(), batch()
    optimizer = RowNormSGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"RowNormSGD keeps state 'row_norm' of shape \(6,\) for a parameter of "
                                         r"shape \(6, 10\)"):
        grow(model, 0, 2, "random", optimizer=optimizer)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_layer_used_at_several_places_is_refused_before_anything_changes(strategy):
    """A Linear used twice in the chain (tied, square) cannot take new units: its other use would get inputs or
    outputs of the wrong width. Every strategy refuses it, as the grown layer or as the next one, and names it."""
    torch.manual_seed(0)
    tied = nn.Linear(6, 6).double()
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), tied, nn.Tanh(), tied, nn.Tanh(), nn.Linear(6, 3)).double()
    before = copy.deepcopy(model.state_dict())
    for layer, named in ((0, r"\[1\]"), (1, r"\[1, 2\]"), (2, r"\[2\]")):
        with pytest.raises(ValueError, match=f"used at several places of the chain \\(layers {named}\\)"):
            grow(model, layer, 1, strategy, batch=batch())
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_growth_beside_low_rank_layers_extends_the_optimizer_dlrt_steps_the_grown_layers_with():
    # DLRT is a torch optimizer that steps the dense parameters with the one it wraps: growth looked for the grown
    # layers in DLRT's own groups, found none, and left the wrapped optimizer with the old tensors (never stepped).
    from lowlearn.lowrank import DLRT, dense_parameters, to_low_rank

    torch.manual_seed(0)
    model, data = to_low_rank(mlp(), ["5"], rank=2), batch()
    inner = torch.optim.SGD(dense_parameters(model), lr=0.1, momentum=0.9)
    dlrt = DLRT(model, lr=0.1, tol=0.1, optimizer=inner)

    def step():
        dlrt.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        dlrt.step()

    step()
    grow(model, 0, 2, "random", optimizer=dlrt)
    assert {id(p) for group in inner.param_groups for p in group["params"]} == {id(p) for p in dense_parameters(model)}
    assert inner.state[model[1].weight]["momentum_buffer"].shape == (8, 10)
    before = model[1].weight.detach().clone()
    step()
    assert not torch.equal(model[1].weight, before)                       # the grown layer trains
