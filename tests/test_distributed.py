"""Data-parallel training with two CPU processes (gloo): every process agrees, and with one process on the whole batch.

Each method trains a small MLP for a few steps of :func:`lowlearn.train.fit` inside a
two-process group, each process initialising it from its own seed, then alone on one
process with the same batches, from the first process's initialisation. The
two processes must hold bit-identical masks, weights and ranks; the one-process
run must match them to 1e-5 (the gradients are summed in another order), with the
same masks (and for DLRT the same ranks and matrices ``U S Vᵀ``: the factors
themselves are unique only up to rotations).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowlearn.distributed import average_across_processes, broadcast_from_the_first_process, world
from lowlearn.growth import GrowthSchedule
from lowlearn.lowrank import DLRT, to_low_rank
from lowlearn.lowrank.layers import dense_parameters
from lowlearn.models import MLP
from lowlearn.powerprop import PowerPropOptimizer, powerprop
from lowlearn.sparse import SET, SNFS, GradualPruning, RigL, StaticSparse, TopKAST, attach_masks
from lowlearn.train import NonFiniteLossError, fit, seeded_generator

METHODS = ("static", "set", "rigl", "snfs", "topkast", "gradual", "dlrt", "powerprop")
STEPS = 12


def train(method: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = MLP(20, (32, 16), 4)
    callbacks = []
    if method == "dlrt":
        to_low_rank(model, ["1", "3"], rank=8)      # initial ranks that do not depend on the seed; DLRT adapts them
        optimizer = DLRT(model, lr=0.1, tol=0.3, optimizer=torch.optim.SGD(dense_parameters(model), lr=0.1))
    elif method == "powerprop":     # the optimiser-aware Adam steps on ∂L/∂θ, which DDP must average
        powerprop(model, 3)
        optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model)
    else:
        if method == "gradual":
            attach_masks(model)      # before DistributedDataParallel takes the parameters (see fit)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifiers = {"static": lambda: StaticSparse(model, optimizer, 0.3),
                       "set": lambda: SET(model, optimizer, 0.3, end=STEPS, every=3),
                       "rigl": lambda: RigL(model, optimizer, 0.3, end=STEPS, every=3),
                       "snfs": lambda: SNFS(model, optimizer, 0.3, end=STEPS, every=3),
                       "topkast": lambda: TopKAST(model, optimizer, 0.3, 0.6, every=3),
                       "gradual": lambda: GradualPruning(0.2, begin=2, end=10, every=2)}
        callbacks = [sparsifiers[method]()]
    if world()[1] > 1:
        callbacks.append(alike_on_every_process)
    generator = torch.Generator().manual_seed(1)
    data = (torch.randn(99, 20, generator=generator), torch.randint(0, 4, (99,), generator=generator))   # last batch: 3
    fit(model, data, optimizer, steps=STEPS, batch_size=16, callbacks=callbacks, device="cpu", progress=False)
    return {name: value.clone() for name, value in model.state_dict().items()}


def alike_on_every_process(state) -> None:
    """A callback: every process holds the same state after each step's mask update, before the next forward pass
    of DistributedDataParallel hands every process the masks (buffers) of the first."""
    mine = {name: value.clone() for name, value in state.model.state_dict().items()}
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, mine)
    for name, value in mine.items():
        assert all(torch.equal(value, other[name]) for other in gathered), (state.step, name)


def worker(rank: int, processes: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=processes)
    try:
        assert world() == (rank, processes)
        values = torch.full((3,), float(rank))
        average_across_processes([values])
        assert torch.equal(values, torch.full((3,), 0.5))
        values = torch.full((3,), float(rank))
        average_across_processes([None, values])                    # a gradient not computed on any process
        assert torch.equal(values, torch.full((3,), 0.5))
        values = torch.full((3,), float(rank))
        broadcast_from_the_first_process(iter([values]))            # a generator, as model.parameters() gives
        assert torch.equal(values, torch.zeros(3))
        # float16 values of 30,000 and 60,000: the mean 45,000 fits float16 (as 44,992), the sum 90,000 does not.
        half = torch.full((2,), 30000.0 * (1 + rank), dtype=torch.float16)
        average_across_processes([half])
        assert torch.equal(half, torch.full((2,), 45000.0, dtype=torch.float16)), half
        # A gradient on the first process only (a parameter the second did not use): refused on both processes,
        # before anything is averaged (the collectives would pair the first's values with the second's others).
        values = torch.full((3,), float(rank))
        try:
            average_across_processes([torch.ones(2) if rank == 0 else None, values])
        except ValueError as error:
            assert "tensor 0 is None on process 1 but not on process 0" in str(error), error
        else:
            raise AssertionError("a gradient on one process only must be refused")
        assert torch.equal(values, torch.full((3,), float(rank)))
        try:
            average_across_processes([torch.ones(2 + rank)])
        except ValueError as error:
            assert "a tensor of shape (2,) on process 0 is (3,) on process 1" in str(error), error
        else:
            raise AssertionError("tensors of different shapes on the processes must be refused")
        model = MLP(20, (8,), 4)
        try:
            fit(model, (torch.zeros(5, 20), torch.zeros(5, dtype=torch.long)), torch.optim.SGD(model.parameters()),
                steps=1, batch_size=1, device="cpu", progress=False)
        except ValueError as error:
            assert "every batch needs at least 2 examples" in str(error)
        else:
            raise AssertionError("a batch smaller than the number of processes must be refused")
        try:
            fit(model, (torch.zeros(5, 20), torch.zeros(5, dtype=torch.long)), torch.optim.SGD(model.parameters()),
                steps=2, batch_size=4, device="cpu", progress=False)
        except ValueError as error:
            assert "leave 1 for the last one" in str(error), error
        else:
            raise AssertionError("a last batch smaller than the number of processes must be refused")
        fit(model, (torch.zeros(5, 20), torch.zeros(5, dtype=torch.long)), torch.optim.SGD(model.parameters()),
            steps=2, batch_size=4, drop_last=True, device="cpu", progress=False)      # the last batch is left out
        # The logged loss is this process's own share's mean loss (shares of 3 and 2 from a batch of 5).
        x, y = torch.randn(5, 20, generator=torch.Generator().manual_seed(7)), torch.tensor([0, 1, 2, 3, 0])
        history = fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.0), steps=1, batch_size=5,
                      device="cpu", progress=False, seed=3)
        share = torch.randperm(5, generator=seeded_generator(3, "batch order")).tensor_split(processes)[rank]
        with torch.no_grad():
            own = torch.nn.functional.cross_entropy(model(x[share]), y[share]).item()
        assert abs(history.loss[0] - own) < 1e-6, (history.loss[0], own)
        model = MLP(20, (8,), 4)
        try:
            fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=2, batch_size=5, device="cpu",
                progress=False, callbacks=[GrowthSchedule(0, 2, 1, 12, "random")])
        except RuntimeError as error:
            assert "grow in a single process" in str(error), error
        else:
            raise AssertionError("growth during data-parallel training must be refused")
        # Masks attached by the first pruning, during training, would escape DistributedDataParallel's averaging.
        model = MLP(20, (8,), 4)
        try:
            fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=3, batch_size=5, device="cpu",
                progress=False, callbacks=[GradualPruning(0.5, begin=1, end=2, every=1)])
        except RuntimeError as error:
            assert "attach_masks(model) before fit" in str(error), error
        else:
            raise AssertionError("masks attached during data-parallel training must be refused")
        # A NaN or infinite loss on one process stops every process at the same step (alone, it would leave the
        # other waiting in the next step's all-reduce).

        def nan_on_the_second(outputs, targets):
            return torch.nn.functional.cross_entropy(outputs, targets) * (float("nan") if rank == 1 else 1.0)

        try:
            model = MLP(20, (8,), 4)
            fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=3, batch_size=5,
                loss_fn=nan_on_the_second, device="cpu", progress=False)      # the first one's NaN from step 2
        except NonFiniteLossError as error:
            assert "at step 1" in str(error), error
        else:
            raise AssertionError(f"process {rank} did not stop at the other process's NaN loss")
        # Each process draws its own dropout masks (the generators are seeded with seed + rank) on the same batches.
        dropout = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 4))
        kept = []
        dropout[1].register_forward_hook(lambda module, inputs, output: kept.append((output != 0).float()))
        fit(dropout, (x[:4], y[:4]), torch.optim.SGD(dropout.parameters(), lr=0.0), steps=1, batch_size=4,
            device="cpu", progress=False)
        both = [torch.empty_like(kept[0]) for _ in range(processes)]
        dist.all_gather(both, kept[0])
        assert not torch.equal(both[0], both[1]), "the processes drew the same dropout masks"
        # DLRT averages its own gradients, so fit broadcasts the first process's weights, of the same shapes only.
        model = to_low_rank(MLP(20, (8,), 4), ["1"], rank=2 + rank)
        try:
            fit(model, (x, y), DLRT(model, lr=0.1), steps=1, batch_size=5, device="cpu", progress=False)
        except ValueError as error:
            assert "a tensor of shape (8, 2) on process 0 is (8, 3) on process 1" in str(error), error
        else:
            raise AssertionError("models of different shapes on the processes must be refused")
        try:
            broadcast_from_the_first_process([torch.zeros(2, dtype=torch.float32 if rank == 0 else torch.float64)])
        except ValueError as error:
            assert "a tensor of dtype torch.float32 on process 0 is torch.float64 on process 1" in str(error), error
        else:
            raise AssertionError("tensors of different dtypes on the processes must be refused")
        try:
            broadcast_from_the_first_process([torch.zeros(2)] * (1 + rank))
        except ValueError as error:
            assert "1 tensors on process 0, 2 on process 1" in str(error), error
        else:
            raise AssertionError("different numbers of tensors on the processes must be refused")

        # An optimizer that averages its own gradients: fit starts every process from the first one's buffers too.
        class Offset(torch.nn.Linear):
            def __init__(self):
                super().__init__(20, 4)
                self.register_buffer("offset", torch.full((4,), float(rank)))

            def forward(self, inputs):
                return super().forward(inputs) + self.offset

        class Averaging(torch.optim.SGD):
            averages_gradients = True

        model = Offset()
        fit(model, (x, y), Averaging(model.parameters(), lr=0.0), steps=1, batch_size=5, device="cpu", progress=False)
        assert torch.equal(model.offset, torch.zeros(4)), model.offset
        # Each process updates its batch norms' running statistics on its own share: fit evaluates, and ends, with
        # the first process's, on every process.
        x8, y8 = torch.randn(8, 20, generator=torch.Generator().manual_seed(8)), torch.arange(8) % 4
        norm = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
        history = fit(norm, (x8, y8), torch.optim.SGD(norm.parameters(), lr=0.1), steps=3, batch_size=4,
                      eval_data=(x8, y8), eval_every=2, device="cpu", progress=False)
        statistics = [torch.empty(2, 8) for _ in range(processes)]
        dist.all_gather(statistics, torch.stack([norm[1].running_mean, norm[1].running_var]))
        assert torch.equal(statistics[0], statistics[1]), statistics
        evaluations = [None] * processes
        dist.all_gather_object(evaluations, history.eval)
        assert evaluations[0] == evaluations[1] and len(evaluations[0]) == 2, evaluations
        fit(norm, (x8, y8), torch.optim.SGD(norm.parameters(), lr=0.1), steps=3, batch_size=4, device="cpu",
            progress=False)                                          # no evaluation: fit hands them out at the end
        dist.all_gather(statistics, torch.stack([norm[1].running_mean, norm[1].running_var]))
        assert torch.equal(statistics[0], statistics[1]), statistics
        # A GradScaler checks each process's own gradients, which DLRT averages afterwards: a step that one
        # process finds not finite is skipped on every process (the other used to step alone, its all-reduce of the
        # gradients paired with whatever collective the skipping process ran next).
        low_rank = to_low_rank(MLP(20, (8,), 4), ["1"], rank=2)
        broadcast_from_the_first_process(low_rank.parameters())
        before = {name: value.clone() for name, value in low_rank.state_dict().items()}
        dlrt, scaler = DLRT(low_rank, lr=0.1, tol=0.3), torch.amp.GradScaler("cpu")
        dlrt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(low_rank(torch.randn(4, 20)), torch.arange(4))).backward()
        if rank == 1:
            low_rank[3].bias.grad[0] = float("inf")
        scaler.step(dlrt)
        assert all(torch.equal(value, before[name]) for name, value in low_rank.state_dict().items()), rank
        # At fixed rank, a loss-scaled closure pass whose gradients overflow on one process runs again unscaled on
        # every process: its forward pass may hold collectives (SyncBatchNorm's), which would pair with the other
        # process's next ones. (Each process used to decide alone.)
        passes, overflow = [], 1e34 if rank == 1 else 1.0     # (loss / 10³⁴) · 10³⁴: backward multiplies by 10³⁴
        dlrt, scaler = DLRT(low_rank, lr=0.1), torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        dlrt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(low_rank(torch.randn(4, 20)), torch.arange(4))).backward()

        def closure():
            passes.append(None)
            return torch.nn.functional.cross_entropy(low_rank(torch.ones(4, 20)), torch.arange(4)) / overflow * overflow

        scaler.step(dlrt, closure)
        counts = [None] * processes
        dist.all_gather_object(counts, len(passes))
        assert counts == [2, 2], counts
        # Each process builds its model from its own seed: training starts from the first process's weights.
        torch.save({method: train(method, seed=rank) for method in METHODS}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_every_process_holds_identical_masks_weights_and_ranks(ranks, method):
    first, second = ranks[0][method], ranks[1][method]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process_on_the_whole_batch(ranks, method):
    together, alone = ranks[0][method], train(method)
    assert together.keys() == alone.keys()
    if method == "dlrt":                   # factors are unique only up to rotations: compare U S Vᵀ
        assert all(together[f"{layer}.S"].shape == alone[f"{layer}.S"].shape for layer in ("1", "3"))  # ranks
        for state in (together, alone):
            for layer in ("1", "3"):
                state[f"{layer}.weight"] = state.pop(f"{layer}.U") @ state.pop(f"{layer}.S") @ state.pop(f"{layer}.V").T
    for name in alone:
        assert together[name].shape == alone[name].shape, name
        if "mask" in name:
            assert torch.equal(together[name], alone[name]), name
        else:
            torch.testing.assert_close(together[name], alone[name], rtol=1e-5, atol=1e-5, msg=name)


def test_outside_a_process_group_there_is_one_process():
    assert world() == (0, 1)
    values = torch.ones(2)
    average_across_processes([values])
    assert torch.equal(values, torch.ones(2))
    average_across_processes(iter([None, values]))                    # a generator, and a gradient not computed
    with pytest.raises(TypeError, match=r"shape \[\(3,\)\] would not fit their integer dtype"):
        average_across_processes([values, torch.arange(3)])
    complex_values = torch.ones(2, dtype=torch.complex64)
    average_across_processes([complex_values])                          # a complex mean fits its dtype
    broadcast_from_the_first_process([values])
    assert torch.equal(values, torch.ones(2))


def test_methods_compare_the_processes_gradient_lists_at_their_first_average_only(monkeypatch):
    """The comparison is a gather through the host, which waits for the device: SNFS (which averages its dense
    gradients at every step) and DLRT (twice a step) make it at their first step, then only all-reduce. The
    process group is faked: two processes, the gather and the all-reduce counted."""
    import lowlearn.distributed as distributed
    gathers = []

    def all_gather_object(output, obj, group=None):
        gathers.append(len(obj))
        output[:] = [obj] * len(output)

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op=None: None)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 20, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(4)]
    for method in ("snfs", "dlrt"):
        torch.manual_seed(0)
        model = MLP(20, (16,), 4)
        if method == "dlrt":
            to_low_rank(model, ["1"], rank=4)
            optimizer, sparsifier = DLRT(model, lr=0.1, tol=0.3), None
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            sparsifier = SNFS(model, optimizer, 0.3, end=100, every=50)
        per_step = []
        for x, y in data:
            before = len(gathers)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if sparsifier is None:
                optimizer.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
            else:
                optimizer.step()
                sparsifier.step()
            per_step.append(len(gathers) - before)
        assert per_step == ([2, 0, 0, 0] if method == "dlrt" else [1, 0, 0, 0]), (method, per_step)
