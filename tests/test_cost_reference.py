"""count_flops, training_memory and saved_tensor_bytes against independent references: torch's FlopCounterMode,
hand counts of MACs and of the bytes autograd saves, and the optimizers' documented state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowlearn.cost import count_flops, count_parameters, saved_tensor_bytes, training_memory
from lowlearn.models import MLP, VGG, Conv4, ConvNet, LeNet5, ResNet20, SmallCNN

FLOAT, INDEX = 4, 8            # bytes of a float32 value and of an int64 max-pooling index

MODELS = {
    "lenet-300-100": (lambda: MLP(), (2, 1, 28, 28)),
    "lenet5": (lambda: LeNet5(), (2, 1, 28, 28)),
    "caffe-lenet5": (lambda: LeNet5(channels=(20, 50), hidden=(500,), padding=0), (2, 1, 28, 28)),
    "conv4-omniglot": (lambda: Conv4(), (2, 1, 28, 28)),
    "conv4-miniimagenet": (lambda: Conv4(3, hidden=16, image_size=84), (1, 3, 84, 84)),
    "conv-4": (lambda: ConvNet(4), (1, 3, 32, 32)),
    "vgg11": (lambda: VGG(11, width=0.25), (1, 3, 32, 32)),
    "resnet20": (lambda: ResNet20(), (1, 3, 32, 32)),
    "smallcnn-standard": (lambda: SmallCNN("standard"), (2, 1, 28, 28)),
    "smallcnn-bottleneck": (lambda: SmallCNN("bottleneck"), (2, 1, 28, 28)),
}
GROUPED = {                    # depthwise convolutions (FlopCounterMode's backward count of these is not exact)
    "smallcnn-separable": (lambda: SmallCNN("separable"), (2, 1, 28, 28)),
    "smallcnn-inverted": (lambda: SmallCNN("inverted"), (2, 1, 28, 28)),
}


def torch_flops(model, x):
    """FLOPs (2 per multiply-accumulate) of torch.utils.flop_counter for a forward pass."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", [*MODELS, *GROUPED])
def test_count_flops_is_half_of_torchs_flop_counter(name):
    """torch.utils.flop_counter counts 2 FLOPs per MAC of mm/addmm/convolution (bias excluded), as count_flops
    counts 1 MAC; the per-example totals must agree exactly for every architecture of the course."""
    make, shape = {**MODELS, **GROUPED}[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    assert 2 * count_flops(model, x).total * shape[0] == torch_flops(model, x)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv1d(3, 8, 5, stride=2, padding=1, groups=1), (2, 3, 40)),
    (nn.Conv1d(4, 8, 3, dilation=2, groups=4), (2, 4, 40)),
    (nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), (2, 2, 5, 6, 6)),
    (nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1, groups=2), (2, 4, 10)),
    (nn.ConvTranspose2d(3, 5, 3, stride=2, output_padding=1), (2, 3, 7, 7)),
    (nn.ConvTranspose3d(2, 4, 2, stride=2), (1, 2, 3, 3, 3)),
])
def test_count_flops_of_other_convolutions_is_half_of_torchs_flop_counter(layer, shape):
    """1-D, 3-D and transposed convolutions (strided, padded, dilated, grouped), as the course's models above."""
    model, x = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)).eval(), torch.randn(shape)
    model(x)                                                   # sizes the lazy layer
    assert 2 * count_flops(model, x).total * shape[0] == torch_flops(model, x)


RECURRENT = {                  # (layer, input of 3 sequences of 5 steps; its batch dimension)
    "rnn": (lambda: nn.RNN(4, 6, nonlinearity="relu"), (5, 3, 4), 1),
    "gru-2-layers-bidirectional": (lambda: nn.GRU(4, 6, num_layers=2, bidirectional=True), (5, 3, 4), 1),
    "lstm-batch-first": (lambda: nn.LSTM(4, 6, batch_first=True), (3, 5, 4), 0),
    "lstm-2-layers-bidirectional-projected": (
        lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, batch_first=True), (3, 5, 4), 0),
    "lstm-cell": (lambda: nn.LSTMCell(4, 6), (3, 4), 0),
    "gru-cell": (lambda: nn.GRUCell(4, 6), (3, 4), 0),
}


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN",
                            "ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("name", RECURRENT)
def test_count_flops_of_recurrent_layers_is_half_of_torchs_flop_counter(name):
    """On the CPU, torch runs RNN and GRU layers and the cells step by step as matrix products, which
    FlopCounterMode counts; its LSTM kernel from oneDNN is counted as 0 FLOPs, so oneDNN is switched off."""
    make, shape, batch_dim = RECURRENT[name]
    model, x = make().eval(), torch.randn(shape)
    with torch.backends.mkldnn.flags(enabled=False):
        assert 2 * count_flops(model, x, batch_dim=batch_dim).total * 3 == torch_flops(model, x) > 0


class UnrolledLSTM(nn.Module):
    """One LSTM layer written out with linear layers: i, f, g, o = W_ih x_t + W_hh h_(t-1) (torch's equations)."""

    def __init__(self, lstm):
        super().__init__()
        gates = 4 * lstm.hidden_size
        self.ih, self.hh = nn.Linear(lstm.input_size, gates), nn.Linear(lstm.hidden_size, gates)
        with torch.no_grad():
            for linear, suffix in ((self.ih, "ih"), (self.hh, "hh")):
                linear.weight.copy_(getattr(lstm, f"weight_{suffix}_l0"))
                linear.bias.copy_(getattr(lstm, f"bias_{suffix}_l0"))

    def forward(self, x):                                       # (B, T, I)
        h = c = x.new_zeros(x.shape[0], self.hh.in_features)
        outputs = []
        for step in x.unbind(1):
            i, f, g, o = (self.ih(step) + self.hh(h)).chunk(4, dim=-1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            outputs.append(h)
        return torch.stack(outputs, 1)


def test_count_flops_of_an_lstm_equals_the_count_of_its_recurrence_written_out_with_linear_layers():
    torch.manual_seed(0)
    lstm, x = nn.LSTM(4, 6, batch_first=True).double(), torch.randn(3, 5, 4, dtype=torch.float64)
    unrolled = UnrolledLSTM(lstm).double()
    torch.testing.assert_close(unrolled(x), lstm(x)[0])        # the same computation
    assert count_flops(lstm, x).total == count_flops(unrolled, x).total == 5 * 4 * 6 * (4 + 6)


def test_macs_of_resnet20_and_mini_imagenet_conv4_by_hand():
    """k_h·k_w·C_in·C_out·H_out·W_out per convolution: ResNet-20 ≈ 40.55M MACs (the usual '41M FLOPs');
    the mini-ImageNet Conv-4 runs at 84, 42, 21 and 10 pixels before its 1600 → 5 head."""
    resnet = (27 * 16 * 32 * 32 + 6 * 16 * 16 * 9 * 32 * 32
              + 16 * 32 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16
              + 32 * 64 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8 + 64 * 10)
    assert count_flops(ResNet20(), torch.zeros(1, 3, 32, 32)).total == resnet == 40_551_040
    conv4 = 3 * 64 * 9 * 84**2 + 64 * 64 * 9 * (42**2 + 21**2 + 10**2) + 64 * 5 * 5 * 5
    assert count_flops(Conv4(3, image_size=84), torch.zeros(1, 3, 84, 84)).total == conv4 == 97_172_288


def no_loss(output, target):
    return output.sum()         # saves nothing for its backward


def test_lenet5_training_activations_by_hand():
    """What autograd needs for LeNet-5's backward: the input, each ReLU output (also the pooling's input), the
    int64 argmax of each pooling, each pooling output (the next layer's input), the hidden ReLU outputs."""
    batch = 3
    model = LeNet5()
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             (torch.randn(batch, 1, 28, 28), None), no_loss)
    per_example = (28 * 28 * FLOAT                                     # input of conv1
                   + 6 * 28 * 28 * FLOAT + 6 * 14 * 14 * (INDEX + FLOAT)  # relu1 output; pool1 indices and output
                   + 16 * 10 * 10 * FLOAT + 16 * 5 * 5 * (INDEX + FLOAT)  # relu2 output; pool2 indices and output
                   + 120 * FLOAT + 84 * FLOAT)                         # hidden ReLU outputs
    assert report.activations == batch * per_example


def test_conv4_training_activations_by_hand():
    """Conv4 in training mode: per block the convolution's input, the batch norm's input and its per-channel
    mean and inverse std, the pooling's input (batch-norm output) and int64 indices, the ReLU output."""
    batch, c = 2, 64
    model = Conv4().train()
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             (torch.randn(batch, 1, 28, 28), None), no_loss)
    expected = batch * 28 * 28 * FLOAT
    for side, pooled in [(28, 14), (14, 7), (7, 3), (3, 1)]:
        expected += batch * c * side * side * FLOAT * 2            # conv output (BN input), BN output
        expected += 2 * c * FLOAT                                  # save_mean, save_invstd
        expected += batch * c * pooled * pooled * (INDEX + FLOAT)  # pooling indices, ReLU output
    assert report.activations == expected


def test_lenet_300_100_with_cross_entropy_activations_by_hand():
    """Input, two ReLU outputs, the log-softmax output, the int64 targets and nll_loss's scalar total weight."""
    batch = 6
    model = MLP()
    batch_data = (torch.randn(batch, 784), torch.randint(0, 10, (batch,)))
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), batch_data, F.cross_entropy)
    assert report.activations == batch * (784 + 300 + 100 + 10) * FLOAT + batch * INDEX + FLOAT


def test_training_memory_agrees_with_an_independent_saved_tensors_hook():
    """An independent sum over saved_tensors_hooks (distinct storages, parameters and buffers left out) for a
    ResNet-20 step in training mode; the batch is contiguous, so whole storages equal the spans counted."""
    torch.manual_seed(0)
    model = ResNet20().train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    model.load_state_dict(state)
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), F.cross_entropy)
    assert report.activations == sum(seen.values())
    with saved_tensor_bytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        loss = F.cross_entropy(model(x), y)
    assert saved.peak == saved.bytes == report.activations      # the graph, held by loss, holds them all
    del loss


@pytest.mark.parametrize("make, copies, step_tensors", [
    (lambda p: torch.optim.SGD(p, lr=0.1), 0, False),                         # plain SGD keeps nothing
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 1, False),
    (lambda p: torch.optim.Adam(p), 2, True),                                 # m and v
    (lambda p: torch.optim.AdamW(p, amsgrad=True), 3, True),                  # m, v and max v
    (lambda p: torch.optim.RMSprop(p), 1, True),                              # square average
    (lambda p: torch.optim.Adagrad(p), 1, True),                              # sum of squares
])
def test_optimizer_state_is_the_documented_multiple_of_the_parameters(make, copies, step_tensors):
    """PyTorch's optimizers keep `copies` tensors like each parameter, plus a float32 step counter per tensor."""
    model = MLP(hidden=(32,))
    optimizer = make(model.parameters())
    model(torch.randn(4, 784)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    report = training_memory(model, optimizer, (torch.randn(2, 784), None), no_loss)
    n_tensors = len(list(model.parameters()))
    assert report.optimizer_state == copies * FLOAT * count_parameters(model) + step_tensors * FLOAT * n_tensors


def test_training_memory_counts_activations_on_the_meta_device():
    """On the meta device (shapes without data) every storage's address is 0; the saved input 8×784 and ReLU
    output 8×300 must count as on the CPU, not vanish into the parameters' storage."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10)).to("meta")
    assert count_flops(model, torch.empty(8, 784, device="meta")).total == 784 * 300 + 300 * 10
    report = training_memory(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             (torch.empty(8, 784, device="meta"), None), lambda out, _: out.sum())
    assert report.activations == 4 * 8 * (784 + 300)


def test_saved_tensor_bytes_counts_distinct_meta_storages_separately():
    """Two distinct saved storages on the meta device (both at address 0) count twice."""
    x = torch.empty(8, 784, device="meta", requires_grad=True)
    with saved_tensor_bytes() as saved:
        y = x.exp().exp()                       # each exp saves its own output: two 8×784 float storages
    assert saved.peak == 2 * 4 * 8 * 784
    del y


def test_a_saved_sparse_tensor_counts_once_with_the_bytes_of_its_indices_and_values():
    """A COO tensor's storages are its int64 indices (2 × nnz) and its values (nnz)."""
    w = torch.randn(4, 5, requires_grad=True)
    a = torch.eye(4).to_sparse()
    with saved_tensor_bytes(exclude=[w]) as saved:
        y = torch.sparse.mm(a, w)
    assert saved.tensors == 1 and saved.peak == 4 * (2 * 8 + 4)
    del y
