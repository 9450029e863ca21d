import numpy as np
import pytest
import torch
import torch.nn.utils.prune

from lowlearn.cost import FlopCount, count_flops, training_flops
from lowlearn.models import MLP, LeNet5
from lowlearn.sparse.flops import (dst_training_flops, model_sparse_flops, pruning_training_flops,
                                   sparse_inference_flops, sparse_training_flops)
from lowlearn.sparse.mask import attach_masks, masks_of, squash
from lowlearn.sparse.prune import kept_count, prune
from lowlearn.sparse.scores import magnitude

# LeNet-300-100: 784·300 + 300·100 + 100·10 multiply-accumulates per example.
DENSE = {"1": 235_200, "3": 30_000, "5": 1_000}
DENSITIES = {"1": 0.1, "3": 0.2, "5": 0.5}
SPARSE = 23_520 + 6_000 + 500


@pytest.fixture
def lenet():
    return count_flops(MLP(), torch.zeros(2, 1, 28, 28))


def test_dense_count_of_lenet_300_100(lenet):
    assert lenet.per_layer == DENSE and lenet.total == 266_200


def test_inference_and_training_flops_by_hand(lenet):
    assert sparse_inference_flops(lenet, DENSITIES) == pytest.approx(SPARSE)
    assert sparse_training_flops(lenet, DENSITIES) == pytest.approx(3 * SPARSE)
    assert sparse_inference_flops(lenet, DENSITIES, relative_to_dense=True) == pytest.approx(SPARSE / 266_200)
    assert sparse_training_flops(lenet, DENSITIES, relative_to_dense=True) == pytest.approx(SPARSE / 266_200)


def test_layers_without_a_density_count_dense_and_one_number_means_every_layer(lenet):
    assert sparse_inference_flops(lenet, {"1": 0.1}) == pytest.approx(23_520 + 30_000 + 1_000)
    assert sparse_inference_flops(lenet, 0.25) == pytest.approx(266_200 / 4)
    assert sparse_inference_flops(lenet, {}) == lenet.total
    assert sparse_inference_flops(lenet, np.float32(0.25)) == pytest.approx(266_200 / 4)   # any real number


def test_a_model_at_density_one_costs_the_dense_count():
    model, x = LeNet5(), torch.zeros(3, 1, 28, 28)
    attach_masks(model)
    dense = count_flops(model, x)
    assert model_sparse_flops(model, x) == dense.total
    assert model_sparse_flops(model, x, relative_to_dense=True) == 1.0
    assert sparse_training_flops(dense, {name: 1.0 for name in dense.per_layer}) == training_flops(dense)


def test_pruned_models_cost_their_kept_weights_times_the_positions_they_slide_over():
    torch.manual_seed(0)
    model = MLP()
    prune(model, magnitude(model), DENSITIES)
    assert model_sparse_flops(model, torch.zeros(1, 784)) == pytest.approx(SPARSE)

    conv, x = LeNet5(), torch.zeros(2, 1, 28, 28)
    prune(conv, magnitude(conv), {"features.0": 0.5, "features.3": 0.3, "classifier.1": 0.1,
                                  "classifier.3": 0.2, "classifier.5": 0.7})
    dense = count_flops(conv, x).per_layer
    layers = dict(conv.named_modules())
    # Each kept weight is used once per output position: F_l / n_l times.
    expected = sum(int(m.sum()) * dense[name] // layers[name].weight.numel() for name, m in masks_of(conv).items())
    assert model_sparse_flops(conv, x) == pytest.approx(expected)
    assert int(masks_of(conv)["features.3"].sum()) == kept_count(0.3, 16 * 6 * 25)


def test_a_recurrent_layer_costs_its_nonzero_weights_beside_a_masked_head():
    class Tagger(torch.nn.Module):                      # masks attach to linear and convolutional layers only
        def __init__(self):
            super().__init__()
            self.lstm, self.head = torch.nn.LSTM(4, 6, batch_first=True), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model, x = Tagger(), torch.randn(2, 5, 4)
    prune(model, magnitude(model), 2 / 3)
    assert list(masks_of(model)) == ["head"]
    lstm, head = 5 * 4 * 6 * (4 + 6), 5 * 6 * 3
    assert count_flops(model, x).per_layer == {"lstm": lstm, "head": head}
    assert model_sparse_flops(model, x) == pytest.approx(lstm + 2 / 3 * head)
    # Its weight matrices pruned with torch.nn.utils.prune (each step multiplies both; they used to count dense):
    # 24 of the 96 input weights and 48 of the 144 recurrent ones kept, 5 steps per sequence.
    torch.nn.utils.prune.custom_from_mask(model.lstm, "weight_ih_l0", torch.arange(96).view(24, 4) % 4 == 0)
    torch.nn.utils.prune.custom_from_mask(model.lstm, "weight_hh_l0", torch.arange(144).view(24, 6) % 3 == 0)
    assert model_sparse_flops(model, x) == pytest.approx(5 * (24 + 48) + 2 / 3 * head)


def test_squashed_and_torch_pruned_models_cost_their_nonzero_weights():
    torch.manual_seed(0)
    model, x = MLP(), torch.zeros(1, 784)
    prune(model, magnitude(model), DENSITIES)
    masked = model_sparse_flops(model, x)
    keep = {name: m.clone() for name, m in masks_of(model).items()}
    squash(model)                                                       # the masks made permanent: zeros remain
    assert model_sparse_flops(model, x) == pytest.approx(masked)
    torch_pruned = MLP()
    for name, layer in torch_pruned.named_modules():
        if name in keep:
            torch.nn.utils.prune.custom_from_mask(layer, "weight", keep[name])
    assert model_sparse_flops(torch_pruned, x) == pytest.approx(masked)
    assert model_sparse_flops(MLP(), x, relative_to_dense=True) == 1.0   # trained weights have no exact zeros


def test_a_pruned_transformer_layer_costs_its_kept_projections():
    # The attention's out_proj is a prunable Linear whose forward never runs: its mask raised a KeyError.
    torch.manual_seed(0)
    e, tokens, ff = 16, 5, 32
    layer = torch.nn.TransformerEncoderLayer(e, 2, ff, batch_first=True)
    prune(layer, magnitude(layer), 0.25)
    assert set(masks_of(layer)) == {"self_attn.out_proj", "linear1", "linear2"}
    attention = 3 * tokens * e * e + 2 * tokens * tokens * e               # its in_proj_weight is not a layer: dense
    by_hand = attention + 0.25 * (tokens * e * e + 2 * tokens * e * ff)
    assert model_sparse_flops(layer, torch.randn(3, tokens, e)) == pytest.approx(by_hand)
    layer.self_attn.batch_first = False                                     # now sequences first, (S, B, E)
    assert model_sparse_flops(layer, torch.randn(tokens, 3, e), batch_dim=1) == pytest.approx(by_hand)


def test_pruning_with_a_constant_schedule_costs_static_sparse_training(lenet):
    static = sparse_training_flops(lenet, DENSITIES)
    assert pruning_training_flops(lenet, [DENSITIES] * 7) == pytest.approx(static)
    assert pruning_training_flops(lenet, [DENSITIES, DENSITIES], steps=[10, 30]) == pytest.approx(static)


def test_pruning_averages_the_schedule_over_steps(lenet):
    # 1 dense step, then 3 steps with the first layer at half density.
    half = 3 * (117_600 + 30_000 + 1_000)
    expected = (3 * 266_200 * 1 + half * 3) / 4
    assert pruning_training_flops(lenet, [{}, {"1": 0.5}], steps=[1, 3]) == pytest.approx(expected)
    per_step = [{}] + [{"1": 0.5}] * 3
    assert pruning_training_flops(lenet, per_step) == pytest.approx(expected)
    assert pruning_training_flops(lenet, per_step, relative_to_dense=True) == pytest.approx(expected / (3 * 266_200))


def test_errors_name_the_problem(lenet):
    with pytest.raises(KeyError, match="no FLOPs counted"):
        sparse_inference_flops(lenet, {"7": 0.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sparse_inference_flops(lenet, {"1": 1.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sparse_inference_flops(lenet, {"1": True})
    with pytest.raises(ValueError, match="empty"):
        pruning_training_flops(lenet, [])
    with pytest.raises(ValueError, match="steps"):
        pruning_training_flops(lenet, [0.5, 0.1], steps=[3])
    for bad in (float("nan"), float("inf"), "3", 10**400):           # NaN gave a NaN cost; 10**400 overflows a float
        with pytest.raises(ValueError, match="steps must give a non-negative length"):
            pruning_training_flops(lenet, [0.5, 0.1], steps=[bad, 1])


def test_dst_training_flops_by_hand(lenet):
    dense = 266_200
    assert dst_training_flops(lenet, DENSITIES, "dense") == 3 * dense
    assert dst_training_flops(lenet, DENSITIES, "static") == pytest.approx(3 * SPARSE)
    assert dst_training_flops(lenet, DENSITIES, "set") == pytest.approx(3 * SPARSE)
    # RigL: (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1).
    rigl = (3 * SPARSE * 100 + 2 * SPARSE + dense) / 101
    assert dst_training_flops(lenet, DENSITIES, "rigl") == pytest.approx(rigl)
    assert dst_training_flops(lenet, DENSITIES, "rigl", relative_to_dense=True) == pytest.approx(rigl / (3 * dense))
    assert dst_training_flops(lenet, DENSITIES, "rigl", every=1) == pytest.approx((5 * SPARSE + dense) / 2)
    # RigL's dense gradient adds little at ΔT = 100, SNFS's (every step) adds a dense third.
    assert 3 * SPARSE < rigl < 1.03 * 3 * SPARSE
    assert dst_training_flops(lenet, DENSITIES, "snfs") == pytest.approx(2 * SPARSE + dense)
    backward = {"1": 0.2, "3": 0.4, "5": 1.0}
    assert dst_training_flops(lenet, DENSITIES, "topkast", backward_densities=backward) == pytest.approx(
        2 * SPARSE + 47_040 + 12_000 + 1_000)


def test_dst_training_flops_bad_input(lenet):
    with pytest.raises(ValueError, match="unknown method 'prune'"):
        dst_training_flops(lenet, 0.1, "prune")
    with pytest.raises(ValueError, match="every"):
        dst_training_flops(lenet, 0.1, "rigl", every=0)
    with pytest.raises(ValueError, match="backward_densities"):
        dst_training_flops(lenet, 0.1, "topkast")
    with pytest.raises(ValueError, match=r"at least its forward density; not so for \['1', '3', '5'\]"):
        dst_training_flops(lenet, 0.5, "topkast", backward_densities=0.1)
    with pytest.raises(ValueError, match="'rigl' has none"):
        dst_training_flops(lenet, 0.1, "rigl", backward_densities=0.5)
    nothing = count_flops(torch.nn.Sequential(torch.nn.ReLU()), torch.randn(1, 4))
    assert sparse_inference_flops(nothing, 0.5) == 0
    for relative in (lambda: sparse_inference_flops(nothing, 0.5, relative_to_dense=True),
                     lambda: sparse_training_flops(nothing, 0.5, relative_to_dense=True),
                     lambda: dst_training_flops(nothing, 0.5, "set", relative_to_dense=True)):
        with pytest.raises(ValueError, match="no counted layer"):
            relative()


def test_a_layer_at_density_zero_costs_nothing(lenet):
    assert sparse_inference_flops(lenet, {"1": 0.0}) == 30_000 + 1_000
    assert sparse_inference_flops(lenet, 0.0) == 0


def test_pruning_schedule_steps_may_be_zero_but_not_negative_nor_all_zero(lenet):
    assert pruning_training_flops(lenet, [{}, {"1": 0.5}], steps=[0, 2]) == pytest.approx(3 * (117_600 + 31_000))
    for bad in ([-1, 2], [0, 0]):
        with pytest.raises(ValueError, match="steps must give a non-negative length"):
            pruning_training_flops(lenet, [0.5, 0.1], steps=bad)


def test_a_masked_layer_costs_its_mask_density_even_where_a_kept_weight_is_zero():
    model, x = MLP(), torch.zeros(1, 784)
    prune(model, magnitude(model), DENSITIES)
    with torch.no_grad():
        model[1].parametrizations.weight.original[masks_of(model)["1"]] = 0.0      # kept, but zero for now
    assert model_sparse_flops(model, x) == pytest.approx(SPARSE)


def test_a_single_density_must_be_a_real_number(lenet):
    for bad in (True, "0.5", 1.5, -0.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            sparse_inference_flops(lenet, bad)


def test_top_kast_layers_without_a_forward_density_are_dense_so_their_backward_set_must_be_too(lenet):
    with pytest.raises(ValueError, match=r"not so for \['3', '5'\]"):
        dst_training_flops(lenet, {"1": 0.1}, "topkast", backward_densities={"1": 0.2, "3": 0.5, "5": 0.5})
    assert dst_training_flops(lenet, {"1": 0.1}, "topkast", backward_densities={"1": 0.2}) == pytest.approx(
        2 * (23_520 + 31_000) + 47_040 + 31_000)


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "snfs"])
def test_every_method_checks_its_densities(lenet, method):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dst_training_flops(lenet, {"1": 1.5}, method)
    with pytest.raises(KeyError, match="no FLOPs counted"):
        dst_training_flops(lenet, {"7": 0.5}, method)


def test_a_strided_padded_convolution_costs_its_kept_weights_times_its_output_positions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 5 * 5, 2))
    prune(model, magnitude(model), {"0": 0.25, "2": 0.5})
    kept = {name: int(m.sum()) for name, m in masks_of(model).items()}
    assert kept == {"0": 27, "2": 100}
    # (9 + 2·1 − 3) // 2 + 1 = 5: each kept filter weight is used at 5 × 5 positions
    x = torch.zeros(2, 3, 9, 9)
    assert model_sparse_flops(model, x) == pytest.approx(27 * 25 + 100)
    assert sparse_training_flops(count_flops(model, x), {"0": 0.25, "2": 0.5}) == pytest.approx(3 * (27 * 25 + 100))


def test_topkast_backward_set_counts_dense_where_backward_densities_leave_a_layer_out():
    """Reference: the docstring's ``2 f_A + f_B`` with layers not named in a densities mapping counting dense,
    by hand: F = {a: 100, b: 40}; A = {a: .1, b: .5}; B names only a (.3), so b is dense in B.
    f_A = 10 + 20 = 30, f_B = 30 + 40 = 70, cost = 2·30 + 70 = 130 (not 2·30 + 30 + 20 = 110)."""
    count = FlopCount(total=140, per_layer={"a": 100, "b": 40})
    macs = dst_training_flops(count, {"a": 0.1, "b": 0.5}, "topkast", backward_densities={"a": 0.3})
    assert macs == 2 * (0.1 * 100 + 0.5 * 40) + (0.3 * 100 + 1.0 * 40)
    assert dst_training_flops(count, {"a": 0.1, "b": 0.5}, "topkast", backward_densities={"a": 0.3},
                              relative_to_dense=True) == macs / (3 * 140)
