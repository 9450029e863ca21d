"""Parameter, FLOP and memory counts against numbers worked out by hand."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lowlearn.cost import (
    FlopCount,
    MemoryReport,
    count_flops,
    count_parameters,
    training_flops,
    saved_tensor_bytes,
    training_memory,
)
from lowlearn.lowrank import DLRT, dense_parameters, to_low_rank
from lowlearn.meta import CNP
from lowlearn.models import MLP, Conv4, LeNet5, ResNet20
from lowlearn.sparse import attach_masks


def no_hooks_left(model):
    return all(not m._forward_hooks for m in model.modules())


# ---- count_parameters -------------------------------------------------------


def test_count_parameters_counts_shared_parameters_once():
    layer = nn.Linear(3, 4)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 4), layer)  # layer used twice
    assert count_parameters(model) == (3 * 4 + 4) + (4 * 4 + 4)


def test_count_parameters_trainable_only():
    model = MLP(hidden=(5,))
    model[1].requires_grad_(False)
    assert count_parameters(model) == (784 * 5 + 5) + (5 * 10 + 10)
    assert count_parameters(model, trainable_only=True) == 5 * 10 + 10


# ---- count_flops ------------------------------------------------------------


def test_flops_lenet_300_100():
    flops = count_flops(MLP(), torch.randn(1, 1, 28, 28))
    assert flops.total == flops.macs == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    assert flops.per_layer == {"1": 784 * 300, "3": 300 * 100, "5": 100 * 10}


def test_flops_lenet5_by_hand():
    flops = count_flops(LeNet5(), torch.randn(1, 1, 28, 28))
    conv1 = 6 * 28 * 28 * (1 * 5 * 5)  # padded: 28×28 outputs
    conv2 = 16 * 10 * 10 * (6 * 5 * 5)
    fcs = 400 * 120 + 120 * 84 + 84 * 10
    assert flops.per_layer["features.0"] == conv1 == 117_600
    assert flops.per_layer["features.3"] == conv2 == 240_000
    assert flops.total == conv1 + conv2 + fcs


def test_flops_caffe_lenet5_by_hand():
    caffe = LeNet5(channels=(20, 50), hidden=(500,), padding=0)
    flops = count_flops(caffe, torch.randn(1, 1, 28, 28))
    conv1 = 20 * 24 * 24 * 25
    conv2 = 50 * 8 * 8 * (20 * 25)
    assert flops.total == conv1 + conv2 + 800 * 500 + 500 * 10 == 2_293_000


def test_flops_grouped_strided_conv():
    layer = nn.Conv2d(8, 12, kernel_size=3, stride=2, padding=1, groups=4)
    flops = count_flops(layer, torch.randn(2, 8, 16, 16))
    # output 12×8×8; each output element sums (8 / 4) × 3 × 3 products
    assert flops.total == 12 * 8 * 8 * 2 * 3 * 3
    assert flops.per_layer == {"": flops.total}


def test_flops_of_1d_3d_and_transposed_convolutions_by_hand():
    # Conv1d on MNIST-1D's 40 steps: 38 outputs of 16 channels, each (1 × 3) products.
    assert count_flops(nn.Conv1d(1, 16, 3), torch.randn(2, 1, 40)).total == 16 * 38 * 3
    # Conv3d: 4 × 3×3×3 outputs of 6 channels, each (2 / 1) × 2 × 2 × 2 products.
    assert count_flops(nn.Conv3d(2, 6, 2, stride=2), torch.randn(1, 2, 6, 6, 6)).total == 6 * 27 * 2 * 8
    # A transposed convolution scatters each of the 4 × 5 × 5 input elements to (6 / 2) × 3 × 3 outputs.
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    assert count_flops(layer, torch.randn(3, 4, 5, 5)).total == 4 * 5 * 5 * 3 * 3 * 3


def test_flops_linear_on_sequence_counts_every_row():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    flops = count_flops(model, torch.randn(3, 7, 16))
    assert flops.total == 7 * (16 * 32 + 32 * 4)


def test_flops_layer_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 5)

        def forward(self, x):
            return self.layer(self.layer(x))

    assert count_flops(Twice(), torch.randn(2, 5)).per_layer == {"layer": 2 * 25}


def test_flops_do_not_depend_on_batch_size():
    model = Conv4()
    one = count_flops(model, torch.randn(1, 1, 28, 28))
    many = count_flops(model, torch.randn(5, 1, 28, 28))
    assert one == many
    convs = 64 * 28 * 28 * 9 + 64 * 14 * 14 * 64 * 9 + 64 * 7 * 7 * 64 * 9 + 64 * 3 * 3 * 64 * 9
    assert one.total == convs + 64 * 5


def test_flops_restore_each_module_mode_and_remove_hooks():
    model = ResNet20()
    model.train()
    model.features[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    count_flops(model, torch.randn(1, 3, 32, 32))
    assert [m.training for m in model.modules()] == modes
    assert no_hooks_left(model)


def test_flops_run_in_eval_mode_without_grad():
    seen = []
    model = nn.Sequential(nn.Linear(3, 3))
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    count_flops(model, torch.randn(2, 3))
    assert seen == [(False, False)]


def test_flops_clean_up_after_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 5))  # shapes do not chain
    with pytest.raises(RuntimeError):
        count_flops(model, torch.randn(2, 4))
    assert no_hooks_left(model)
    assert model.training


def test_flops_reject_an_empty_batch_and_an_input_without_a_batch_dimension():
    with pytest.raises(ValueError, match="batch"):
        count_flops(MLP(), torch.randn(0, 784))
    with pytest.raises(ValueError, match=r"a single example x is x.unsqueeze\(0\)\), got shape \(784,\)"):
        count_flops(nn.Linear(784, 10), torch.randn(784))         # would count 10 MACs instead of 7,840


class Pair(nn.Module):
    """Two inputs, each through a layer of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)

    def forward(self, x, y):
        return self.a(x).sum() + self.b(y).sum()


def test_flops_of_a_model_of_several_inputs():
    # A model of several inputs could not be counted: count_flops called model(example_input) with one tensor.
    count = count_flops(Pair(), (torch.randn(2, 3), torch.randn(2, 6, 5)))
    assert count.per_layer == {"a": 3 * 4, "b": 6 * 5 * 4}
    sequences_first = (torch.randn(2, 2, 3), torch.randn(6, 2, 5))       # 2 rows of x and 6 of y per example
    assert count_flops(Pair(), sequences_first, batch_dim=-2).per_layer == {"a": 2 * 3 * 4, "b": 6 * 5 * 4}
    layer, x = nn.Linear(3, 2), torch.randn(4, 3)
    assert count_flops(layer, (x,)) == count_flops(layer, x)


def test_flops_of_a_conditional_neural_process_by_hand():
    # Its inputs are context x, context y and target x, each (B, points, size): the batch is dimension 0 of each.
    # The decoder's first layer multiplies r once per function and x_T once per target (it was not counted,
    # with a warning, while CNP.forward applied its weight in functional code).
    n, m, x_dim, y_dim, hidden = 5, 7, 2, 1, 8
    cnp = CNP(x_dim, y_dim, hidden, encoder_layers=2, decoder_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count = count_flops(cnp, (torch.randn(3, n, x_dim), torch.randn(3, n, y_dim), torch.randn(3, m, x_dim)))
    assert count.per_layer == {"encoder.0": n * (x_dim + y_dim) * hidden, "encoder.2": n * hidden * hidden,
                               "decoder.0": hidden * hidden + m * x_dim * hidden, "decoder.2": m * hidden * 2 * y_dim}
    unbatched = cnp.decoder[0](torch.randn(hidden), torch.randn(m, x_dim))            # one function, no batch
    assert cnp.decoder[0].count_macs(unbatched) == hidden * hidden + m * x_dim * hidden


def test_flops_of_several_inputs_need_one_batch_size():
    with pytest.raises(ValueError, match=r"the same 2 examples along batch_dim=0 as the first, got shapes "
                                         r"\[\(2, 3\), \(3, 6, 5\)\]"):
        count_flops(Pair(), (torch.randn(2, 3), torch.randn(3, 6, 5)))
    with pytest.raises(ValueError, match="the same 2 examples along batch_dim=1"):
        count_flops(Pair(), (torch.randn(1, 2, 3), torch.randn(2)), batch_dim=1)   # no dimension 1
    with pytest.raises(TypeError, match="a tensor, a PackedSequence or a non-empty tuple of them .*, got Tensor, int"):
        count_flops(Pair(), (torch.randn(2, 3), 5))
    for bad, name in (((), "an empty tuple"), ([torch.randn(2, 3)], "list")):
        with pytest.raises(TypeError, match=f"got {name}"):
            count_flops(Pair(), bad)


def test_training_flops_is_three_forward_passes():
    flops = count_flops(MLP(), torch.randn(1, 784))
    assert training_flops(flops) == 3 * 266_200


def test_flop_table_lists_layers_and_total():
    table = str(FlopCount(total=300, per_layer={"a": 100, "b.c": 200}))
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "MACs", "share"]
    assert lines[1].split() == ["a", "100", "33.3%"]
    assert lines[2].split() == ["b.c", "200", "66.7%"]
    assert lines[3].split() == ["total", "300", "100.0%"]
    count = count_flops(nn.Linear(3, 2), torch.randn(1, 3))     # a model that is one layer has the row ""
    assert count.per_layer == {"": 6} and "(model)" in count.table()


# ---- training_memory --------------------------------------------------------


def sum_loss(output, target):
    """A loss that saves nothing for backward, so only the model's tensors count."""
    return output.sum()


def param_bytes(model):
    return 4 * count_parameters(model)  # float32


def test_memory_of_parameters_and_gradients():
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = training_memory(model, optimizer, (torch.randn(8, 784), None), sum_loss)
    assert report.parameters == 4 * 266_610
    assert report.gradients == report.parameters
    assert report.optimizer_state == 0


def test_gradients_only_for_trainable_parameters():
    model = MLP(hidden=(5,))
    model[1].requires_grad_(False)
    report = training_memory(model, torch.optim.SGD(model[3].parameters(), lr=0.1),
                             (torch.randn(2, 784), None), sum_loss)
    assert report.parameters == param_bytes(model)
    assert report.gradients == 4 * (5 * 10 + 10)


def test_exact_activation_bytes_of_a_small_mlp():
    batch = 8
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = training_memory(model, optimizer, (torch.randn(batch, 784), None), sum_loss)
    # saved: the input (for the first weight's gradient) and the ReLU output (for the
    # ReLU's backward and the second weight's gradient: one tensor, counted once).
    # The weights are saved too but are parameters, so they are not counted.
    assert report.activations == 4 * batch * (784 + 300)
    assert report.total == (report.parameters + report.gradients + report.optimizer_state
                            + report.activations)


def test_a_batch_sliced_from_a_dataset_counts_as_the_batch():
    dataset = torch.randn(1000, 784)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sliced = training_memory(model, optimizer, (dataset[100:108], None), sum_loss)
    copied = training_memory(model, optimizer, (dataset[100:108].clone(), None), sum_loss)
    assert sliced.activations == copied.activations == 4 * 8 * (784 + 300)


def test_two_saved_views_of_one_tensor_count_the_span_they_reach_together():
    # The loss saves rows 0–1 and rows 6–7 of the linear output: one storage, counted from row 0 to row 7.
    batch = 8
    model = nn.Linear(784, 300)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = training_memory(model, optimizer, (torch.randn(batch, 784), None),
                             lambda out, _: (out[:2] * out[:2]).sum() + (out[6:] * out[6:]).sum())
    assert report.activations == 4 * batch * 784 + 4 * batch * 300


def test_a_strided_saved_view_counts_the_elements_between_its_first_and_last():
    # The first 10 features of a (8, 784) batch: the view reaches from element 0 to 7 · 784 + 9 of its storage.
    model = nn.Linear(10, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wide = torch.randn(8, 784)
    report = training_memory(model, optimizer, (wide[:, :10], None), sum_loss)
    assert report.activations == 4 * (7 * 784 + 10)


def test_activations_include_what_the_loss_saves():
    batch = 4
    model = nn.Linear(784, 300)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = training_memory(model, optimizer, (torch.randn(batch, 784), None),
                             lambda out, _: (out * out).sum())
    # the input, plus the linear output saved (once) by the product
    assert report.activations == 4 * batch * (784 + 300)


def optimizer_after_one_step(model, optimizer):
    model(torch.randn(2, 784)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_sgd_momentum_state_equals_parameters():
    model = MLP()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = optimizer_after_one_step(model, sgd)
    report = training_memory(model, optimizer, (torch.randn(2, 784), None), sum_loss)
    assert report.optimizer_state == param_bytes(model)


def test_adam_state_is_two_moments_and_a_step_counter():
    model = MLP()
    optimizer = optimizer_after_one_step(model, torch.optim.Adam(model.parameters()))
    report = training_memory(model, optimizer, (torch.randn(2, 784), None), sum_loss)
    n_tensors = len(list(model.parameters()))  # 6: three weights, three biases
    # exp_avg and exp_avg_sq per parameter, plus a float32 scalar "step" per tensor
    assert report.optimizer_state == 2 * param_bytes(model) + 4 * n_tensors


def test_the_optimiser_aware_powerprop_step_counts_its_working_tensors():
    from lowlearn.powerprop import PowerPropOptimizer, powerprop

    model = powerprop(MLP(), 3)
    optimizer = optimizer_after_one_step(model, PowerPropOptimizer(torch.optim.SGD(model.parameters(), lr=0.1,
                                                                                   momentum=0.9), model))
    report = training_memory(model, optimizer, (torch.randn(2, 784), None), sum_loss)
    weights = sum(layer.weight.nbytes for layer in (model[1], model[3], model[5]))
    assert report.optimizer_state == param_bytes(model) + 2 * weights   # momentum, and two tensors like each φ


def test_optimizer_state_in_lists_counts_too():
    # L-BFGS keeps its history as lists of tensors in its state.
    model = nn.Linear(10, 2)
    x, y = torch.randn(8, 10), torch.randint(0, 2, (8,))
    optimizer = torch.optim.LBFGS(model.parameters(), history_size=3)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    expected = set()
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in value if isinstance(value, list) else [value]:
                if isinstance(tensor, torch.Tensor):
                    expected.add((id(tensor), tensor.nbytes))
    assert any(isinstance(v, list) and v for state in optimizer.state.values() for v in state.values())
    report = training_memory(model, optimizer, (x, y), nn.functional.cross_entropy)
    assert report.optimizer_state == sum(nbytes for _, nbytes in expected) > 0


def test_memory_changes_nothing():
    torch.manual_seed(0)
    model = Conv4().train()
    batch = (torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    optimizer.zero_grad()
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta_before = [s["momentum_buffer"].clone() for s in optimizer.state.values()]

    report = training_memory(model, optimizer, batch, nn.functional.cross_entropy)

    model_after = model.state_dict()
    # parameters and batch-norm running statistics
    assert all(torch.equal(model_before[k], model_after[k]) for k in model_before)
    momenta_after = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momenta_before, momenta_after))
    assert all(p.grad is None for p in model.parameters())
    assert report.activations > 4 * 4 * 28 * 28
    assert report.cuda_peak is None


def test_memory_measures_with_grad_even_under_no_grad():
    model = nn.Linear(10, 10)
    with torch.no_grad():
        report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 (torch.randn(3, 10), None), sum_loss)
    assert report.activations == 4 * 3 * 10


def test_memory_of_a_batch_on_another_device_than_the_model_is_a_clear_error():
    model = nn.Linear(2, 2, device="meta")                 # a device other than the batch's, on any machine
    with pytest.raises(ValueError, match="the batch is on cpu and the model on meta: move the batch"):
        training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), (torch.randn(1, 2), None), sum_loss)


def test_measure_cuda_needs_a_cuda_model():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        (torch.randn(1, 2), None), sum_loss, measure_cuda=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_cuda_reports_a_peak():
    model = MLP().cuda()
    batch = (torch.randn(64, 784, device="cuda"), None)
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, sum_loss,
                             measure_cuda=True)
    assert report.cuda_peak >= report.parameters + report.gradients + report.activations
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_cuda_leaves_out_the_copies_of_the_buffers_it_restores():
    model = nn.Linear(8, 8).cuda()
    model.register_buffer("table", torch.zeros(2**24, device="cuda"))    # 64 MiB that the forward pass never reads
    batch = (torch.randn(4, 8, device="cuda"), None)
    before = torch.cuda.memory_allocated()                               # the table included: it exists already
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, sum_loss,
                             measure_cuda=True)
    # A training step of this model allocates a few KiB; counting the table's copy would add 64 MiB.
    assert before <= report.cuda_peak < before + 2**20


def test_memory_report_total_is_the_sum_of_its_five_parts():
    report = MemoryReport(parameters=1, gradients=2, optimizer_state=4, activations=8, buffers=16, cuda_peak=1000)
    assert report.total == 31                                # the measured CUDA peak is not part of it


def test_a_pruned_models_masks_count_as_buffers():
    # The masks, as large as the weights, were in no field: a masked LeNet-300-100's total was 23% short.
    model = MLP()
    batch = (torch.randn(6, 784), torch.randint(0, 10, (6,)))
    dense = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, F.cross_entropy)
    attach_masks(model)
    masked = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, F.cross_entropy)
    weights = 4 * (784 * 300 + 300 * 100 + 100 * 10)
    assert dense.buffers == 0 and masked.buffers == weights
    assert masked.total == dense.total + weights + masked.activations - dense.activations
    bn = nn.Sequential(nn.Linear(784, 8), nn.BatchNorm1d(8))
    report = training_memory(bn, torch.optim.SGD(bn.parameters(), lr=0.1), batch, lambda out, y: out.sum())
    assert report.buffers == 4 * 8 * 2 + 8                  # running mean and variance, the int64 batch count


def test_memory_report_str_in_mib():
    report = MemoryReport(parameters=2**20, gradients=2**20, optimizer_state=0, activations=2**19)
    lines = str(report).splitlines()
    assert lines[0].split() == ["parameters", "1.00", "MiB"]
    assert lines[-2].split() == ["buffers", "0.00", "MiB"]
    assert lines[-1].split() == ["total", "2.50", "MiB"]


# ---- saved_tensor_bytes -----------------------------------------------------


def test_saved_tensor_bytes_by_hand():
    x = torch.randn(4, 3)                        # 48 bytes, no gradient needed
    w = torch.randn(3, 5, requires_grad=True)    # a "parameter": excluded
    with saved_tensor_bytes(exclude=[w]) as saved:
        h = x @ w                                # mm saves x (for w's gradient)
        r = torch.relu(h)                        # relu saves its output: 4 × 5 floats = 80 bytes
        loss = (r * r).sum()                     # mul saves r twice: one storage, counted once
    assert saved.bytes == saved.peak == 4 * 3 * 4 + 4 * 5 * 4
    assert saved.tensors >= 3 and saved.mib == saved.peak / 2**20
    loss.backward()                              # frees the graph, and with it the saved tensors
    assert saved.bytes == 0 and saved.peak == 128
    assert torch.allclose(w.grad, x.T @ (2 * r * (h > 0)))   # the saved tensors came back unchanged


def test_saved_tensor_bytes_peak_is_the_largest_total_not_the_last():
    big = torch.randn(1000, requires_grad=True)
    small = torch.randn(10, requires_grad=True)
    with saved_tensor_bytes(exclude=[big, small]) as saved:
        big.exp().sum().backward()               # exp saves its output, 4,000 bytes, freed by the backward pass
        assert saved.bytes == 0 and saved.mib == 4000 / 2**20
        loss = small.exp().sum()                 # 40 bytes
    assert saved.bytes == 40 and saved.peak == 4000
    del loss


def test_saved_tensor_bytes_does_not_count_saves_of_excluded_tensors():
    x = torch.randn(10, requires_grad=True)
    with saved_tensor_bytes(exclude=[x]) as saved:
        loss = x.sin().sum()                     # sin saves its input: x itself, excluded
    assert saved.tensors == 0 and saved.bytes == saved.peak == 0
    del loss


def test_saved_tensor_bytes_counts_a_storage_once_in_full():
    big = torch.randn(10, 8, dtype=torch.float64)
    w = torch.randn(8, requires_grad=True)
    with saved_tensor_bytes(exclude=[w]) as saved:
        loss = (big[:2] * w).sum() + (big[5:] * w).sum()   # two views of one storage: 640 bytes once
    assert saved.peak == 10 * 8 * 8
    del loss
    assert saved.bytes == 0


def test_saved_tensor_bytes_keeps_a_storage_that_another_graph_still_holds():
    x = torch.randn(25, dtype=torch.float64)     # 200 bytes, saved by two graphs
    w = torch.randn(25, dtype=torch.float64, requires_grad=True)
    with saved_tensor_bytes(exclude=[w]) as saved:
        first = (x * w).sum()                    # mul saves x for w's gradient
        second = (x * w.exp()).sum()             # x again (counted once), and exp's output, 200 bytes
    assert saved.bytes == saved.peak == 400
    first.backward()                             # frees the first graph: the second still holds x
    assert saved.bytes == 400
    second.backward()
    assert saved.bytes == 0 and saved.peak == 400


def test_saved_tensor_bytes_grows_with_second_order_inner_steps_only():
    from lowlearn.meta import inner_loop, parameters_of, run

    torch.manual_seed(0)
    model = MLP(4, (16,), 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    params = parameters_of(model)

    def held(steps, first_order):
        with saved_tensor_bytes(exclude=[*params.values(), x]) as saved:
            adapted = inner_loop(model, params, x, y, nn.functional.cross_entropy, steps, 0.1,
                                 first_order=first_order)
            loss = nn.functional.cross_entropy(run(model, adapted, x), y)
        assert saved.bytes == saved.peak
        del loss, adapted
        return saved.peak

    second = [held(k, False) for k in (1, 2, 4)]
    first = [held(k, True) for k in (1, 2, 4)]
    assert second[0] < second[1] < second[2]          # every inner step keeps its graph
    assert first[0] == first[1] == first[2]           # first order frees each inner step's graph
    assert all(s > f for s, f in zip(second, first))


def test_measuring_saved_tensors_frees_them_with_their_graph_and_keeps_second_derivatives():
    import gc
    import weakref

    torch.manual_seed(0)
    w1, w2, x = torch.randn(40, 1, requires_grad=True), torch.randn(1, 40, requires_grad=True), torch.randn(5, 1)
    with saved_tensor_bytes() as saved:
        hidden = torch.relu(x @ w1.T)                        # ReLU saves its own output
        alive = weakref.ref(hidden)
        torch.autograd.grad((hidden @ w2.T).sum(), [w2])     # frees the graph; the body's backward never runs
        del hidden
    gc.collect()
    assert alive() is None and saved.bytes == 0

    def second_order(measure):
        w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        with saved_tensor_bytes() if measure else contextlib.nullcontext():
            (g,) = torch.autograd.grad(torch.tanh(w @ w).sum(), w, create_graph=True)   # tanh saves its output
            return torch.autograd.grad(g.square().sum(), w)[0]

    assert torch.equal(second_order(True), second_order(False))


def test_count_flops_names_the_layers_it_did_not_see_run():
    class Tied(nn.Module):                  # the decoder passes the encoder's weight to functional code
        def __init__(self):
            super().__init__()
            self.encoder, self.unused = nn.Linear(6, 4), nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.encoder(x), self.encoder.weight.t())

    with pytest.warns(UserWarning, match=r"did not see the layers \['unused'\] run"):
        count = count_flops(Tied(), torch.randn(2, 6))
    assert count.per_layer == {"encoder": 24}


@pytest.mark.parametrize("batch_first", [True, False])
def test_flops_of_self_attention_by_hand(batch_first):
    # MultiheadAttention passes its weights to functional code: its MACs (out_proj's too) were left out.
    e, tokens, ff = 16, 5, 32
    layer = nn.TransformerEncoderLayer(e, 2, ff, batch_first=batch_first)
    x = torch.randn(3, tokens, e) if batch_first else torch.randn(tokens, 3, e)     # sequences first: (S, B, E)
    count = count_flops(layer, x, batch_dim=0 if batch_first else 1)
    by_hand = {"self_attn": 3 * tokens * e * e + 2 * tokens * tokens * e,     # q, k, v projections; Q Kᵀ and A V
               "self_attn.out_proj": tokens * e * e, "linear1": tokens * e * ff, "linear2": tokens * ff * e}
    assert count.per_layer == by_hand


def test_flops_divide_by_the_batch_along_batch_dim_once():
    # Sequences first, (S, B, F): dividing by S gave S/B times the count of one sequence. And each call rounded
    # down its own share: a one-MAC layer called on 2 and on 1 of 3 examples counted ⌊2/3⌋ + ⌊1/3⌋ = 0.
    layer = nn.Linear(3, 2)
    assert count_flops(layer, torch.randn(7, 2, 3), batch_dim=1).total == 7 * 3 * 2
    assert count_flops(layer, torch.randn(7, 2, 3), batch_dim=-2).total == 7 * 3 * 2

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1, 1)

        def forward(self, x):
            return torch.cat([self.fc(part) for part in x.tensor_split(2)])

    assert count_flops(Halves(), torch.randn(3, 1)).total == 1
    for bad in (2, -3):
        with pytest.raises(ValueError, match=f"batch_dim={bad}"):
            count_flops(layer, torch.randn(7, 2, 3)[:, :, 0], batch_dim=bad)
    with pytest.raises(ValueError, match="non-empty batch"):
        count_flops(layer, torch.randn(7, 0, 3), batch_dim=1)


def test_flops_of_cross_attention_with_other_key_and_value_sizes_by_hand():
    attention = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, add_bias_kv=True, add_zero_attn=True, batch_first=True)
    memory = torch.randn(2, 7, 4), torch.randn(2, 7, 6)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):                       # keyword arguments reach the count as well
            return self.attention(query=x, key=memory[0], value=memory[1])[0]

    count = count_flops(Decoder(), torch.randn(2, 3, 8))
    keys = 7 + 2                                     # the bias key and the zero key are attended to as well
    assert count.per_layer == {"attention": 3 * 8 * 8 + 7 * 4 * 8 + 7 * 6 * 8 + 2 * 3 * keys * 8,
                               "attention.out_proj": 3 * 8 * 8}


def test_an_attention_subclass_with_a_forward_of_its_own_is_named_not_miscounted():
    class SelfAttention(nn.MultiheadAttention):
        def forward(self, x):
            return super().forward(x, x, x)[0]

    model = nn.Sequential(SelfAttention(8, 2, batch_first=True))
    with pytest.warns(UserWarning, match=r"did not see the layers \['0'\] run"):
        assert count_flops(model, torch.randn(2, 3, 8)).per_layer == {}


RECURRENT = [(nn.RNN, 1), (nn.LSTM, 4), (nn.GRU, 3)]        # (layer, gates)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind, gates", RECURRENT)
def test_flops_of_recurrent_layers_by_hand(kind, gates, batch_first):
    # A recurrent layer passes its weights to a fused kernel: it counted 0, and no warning named it.
    i, h, t = 4, 6, 5
    x, dim = (torch.randn(2, t, i), 0) if batch_first else (torch.randn(t, 2, i), 1)
    assert count_flops(kind(i, h, batch_first=batch_first), x, batch_dim=dim).per_layer == {"": t * gates * h * (i + h)}
    deep = kind(i, h, num_layers=2, bidirectional=True, batch_first=batch_first)    # the second layer reads 2h
    assert count_flops(deep, x, batch_dim=dim).total == t * 2 * gates * h * ((i + h) + (2 * h + h))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_flops_of_an_lstm_with_projections_by_hand():
    i, h, p, t = 4, 6, 2, 5               # the state is projected to p: the recurrent input and the next layer's
    lstm = nn.LSTM(i, h, num_layers=2, bidirectional=True, proj_size=p, batch_first=True)
    per_step = 2 * (4 * h * (i + p) + h * p) + 2 * (4 * h * (2 * p + p) + h * p)
    assert count_flops(lstm, torch.randn(3, t, i)).total == t * per_step


@pytest.mark.parametrize("kind, gates", RECURRENT)
def test_flops_of_packed_and_unbatched_sequences_count_their_real_steps(kind, gates):
    i, h, lengths = 4, 6, torch.tensor([5, 1, 3])                # 9 steps of 3 sequences: 3 per example

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kind(i, h, batch_first=True)

        def forward(self, x, lengths):                          # the padding is not computed
            return self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0].data

    assert count_flops(Packed(), (torch.randn(3, 5, i), lengths)).per_layer == {"rnn": 3 * gates * h * (i + h)}

    class OneByOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = kind(i, h)

        def forward(self, x):                                   # each sequence unbatched, (T, I)
            return [self.rnn(sequence)[0] for sequence in x]

    assert count_flops(OneByOne(), torch.randn(3, 5, i)).total == 5 * gates * h * (i + h)


@pytest.mark.parametrize("kind, gates", RECURRENT)
def test_flops_of_a_packed_sequence_given_as_the_example_input_count_its_sequences(kind, gates):
    # A PackedSequence is a named tuple, but one input: B sequences, whatever batch_dim says.
    i, h, lengths = 4, 6, torch.tensor([5, 1, 3])                # 9 steps of 3 sequences: 3 per example
    rnn = kind(i, h)
    packed = pack_padded_sequence(torch.randn(5, 3, i), lengths, enforce_sorted=False)
    for batch_dim in (0, 1):
        assert count_flops(rnn, packed, batch_dim=batch_dim).per_layer == {"": 3 * gates * h * (i + h)}
    if kind is not nn.LSTM:                                      # with the initial state (layers, B, H)
        assert count_flops(rnn, (packed, torch.zeros(1, 3, h)), batch_dim=(0, 1)).total == 3 * gates * h * (i + h)
    with pytest.raises(ValueError, match=r"the same 3 examples .* got shapes \['PackedSequence of 3 sequences', "
                                         r"\(1, 2, 6\)\]"):
        count_flops(rnn, (packed, torch.zeros(1, 2, h)), batch_dim=(0, 1))


def test_flops_of_sequences_first_and_their_lengths_take_a_batch_dimension_each():
    # Sequences (T, B, I) and lengths (B,): the batch is dimension 1 of one and 0 of the other (one batch_dim
    # for all inputs refused the lengths).
    i, h, lengths = 4, 6, torch.tensor([5, 1, 3])

    class SequencesFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(i, h)

        def forward(self, x, lengths):
            return self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data

    x = torch.randn(5, 3, i)
    assert count_flops(SequencesFirst(), (x, lengths), batch_dim=(1, 0)).per_layer == {"lstm": 3 * 4 * h * (i + h)}
    with pytest.raises(ValueError, match="the same 3 examples along batch_dim=1"):
        count_flops(SequencesFirst(), (x, lengths), batch_dim=1)
    for bad in ((1,), (1, 0, 0), (1, True), (1.0, 0)):
        with pytest.raises(ValueError, match=r"one integer per input \(2\), got"):
            count_flops(SequencesFirst(), (x, lengths), batch_dim=bad)
    with pytest.raises(ValueError, match=r"the same 3 examples along batch_dim=\(1, 1\)"):
        count_flops(SequencesFirst(), (x, torch.zeros(3, 2)), batch_dim=(1, 1))


@pytest.mark.parametrize("kind, gates", [(nn.RNNCell, 1), (nn.LSTMCell, 4), (nn.GRUCell, 3)])
def test_flops_of_recurrent_cells_by_hand(kind, gates):
    i, h, t = 4, 6, 5

    class Unrolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = kind(i, h)

        def forward(self, x):
            state = None
            for step in x.unbind(1):
                state = self.cell(step, state)
            return state

    assert count_flops(Unrolled(), torch.randn(2, t, i)).per_layer == {"cell": t * gates * h * (i + h)}


def test_flops_of_a_bilinear_layer_by_hand_and_none_of_an_embedding():
    bilinear = nn.Bilinear(3, 4, 5)                     # out × in1 × in2 per row; it counted 0
    assert count_flops(bilinear, (torch.randn(2, 3), torch.randn(2, 4))).total == 5 * 3 * 4
    assert count_flops(bilinear, (torch.randn(2, 7, 3), torch.randn(2, 7, 4))).total == 7 * 5 * 3 * 4
    lookup = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))     # a lookup is no arithmetic
    assert count_flops(lookup, torch.randint(10, (2, 7))).per_layer == {"1": 7 * 4 * 2}


def test_count_flops_names_a_recurrent_layer_it_did_not_see_run():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 4), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x)

    with pytest.warns(UserWarning, match=r"did not see the layers \['lstm'\] run"):
        count_flops(Unused(), torch.randn(2, 3))


def test_saved_sparse_tensors_count_their_indices_and_values():
    # A sparse tensor has no storage of its own: both measures failed on a graph that saves one.
    torch.manual_seed(0)
    adjacency = (torch.rand(20, 20) < 0.2).float().to_sparse()
    parts = adjacency._indices().nbytes + adjacency._values().nbytes
    h = torch.randn(20, 3, requires_grad=True)
    with saved_tensor_bytes() as saved:
        torch.sparse.mm(adjacency, h)
    assert saved.peak == parts

    class GraphConvolution(nn.Linear):
        def forward(self, x):
            return torch.sparse.mm(adjacency, super().forward(x))

    model = GraphConvolution(8, 3)
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    memory = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), nn.functional.cross_entropy)
    assert memory.activations >= parts + x.nbytes


@pytest.mark.parametrize("compressed", [torch.sparse_csr_tensor, torch.sparse_csc_tensor], ids=["CSR", "CSC"])
def test_a_saved_compressed_tensor_counts_its_pointers_indices_and_values(compressed):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
        a = compressed(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3]), torch.ones(4), (4, 4),
                       check_invariants=True)
    w = torch.randn(4, 5, requires_grad=True)
    with saved_tensor_bytes(exclude=[w]) as saved:
        out = a @ w
    # the pointers (n + 1) and the indices (nnz) in int64, the values (nnz) in float32
    assert saved.peak == 5 * 8 + 4 * 8 + 4 * 4
    assert repr(saved) == "SavedTensors(bytes=88, peak=88, tensors=1)"
    del out


def test_an_empty_saved_tensor_counts_nothing():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
        model = nn.Linear(0, 3)
    x, y = torch.randn(4, 0), torch.zeros(4, 3)
    memory = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), lambda o, t: (o * t).sum())
    assert memory.activations == 4 * 3 * 4       # mul saves t for o's gradient; the empty x adds no bytes


def test_training_memory_counts_the_state_of_dlrts_dense_optimizer():
    """Reference: the MemoryReport docstring (state of an optimizer held as ``.optimizer`` counts), by hand:
    DLRT's own state tensors plus Adam's two moments (each the size of its parameter) and its scalar step per
    dense parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    to_low_rank(model, ["0"], rank=2)
    dense = list(dense_parameters(model))
    adam = torch.optim.Adam(dense, lr=1e-3)
    opt = DLRT(model, lr=0.01, optimizer=adam)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(p in adam.state for p in dense)
    dlrt_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    adam_bytes = sum(2 * p.nbytes + adam.state[p]["step"].nbytes for p in dense)
    assert adam_bytes > 0
    report = training_memory(model, opt, (x, y), F.cross_entropy)
    assert report.optimizer_state == dlrt_bytes + adam_bytes
