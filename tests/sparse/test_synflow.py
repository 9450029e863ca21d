"""SynFlow (Tanaka et al. 2020) against a hand computation, the paper's conservation law and the authors' procedure."""

import copy

import pytest
import torch
from torch import nn

from lowlearn.models import MLP, Conv4
from lowlearn.powerprop import powerprop
from lowlearn.sparse.mask import attach_masks, masks_of, set_masks
from lowlearn.sparse.prune import prune
from lowlearn.sparse.schedule import iterative_pruning
from lowlearn.sparse.scores import magnitude, synflow


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


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
