"""The methods build every tensor they combine with the model's on the model's device, checked on the CPU.

On a GPU, a tensor factory without ``device=`` (``torch.zeros(n)``, ``torch.arange(n)``,
``torch.rand(shape, generator=g)``, ...) makes a CPU tensor, and combining it with the model's CUDA
tensors raises ("Expected all tensors to be on the same device"). CPU-only test runs cannot see that.
Here the model and data stay on the CPU while PyTorch's default device is ``meta`` during each library
call: a factory that relies on the default device then makes a meta tensor, and mixing it with the
model's CPU tensors raises "Tensor on device meta is not on the expected device cpu!", exactly where a
CUDA run would fail. (Forward, backward and ``optimizer.step()`` run outside, with SGD: PyTorch's own
optimizers may make CPU step counters by design.)
"""

import pytest
import torch
import torch.nn.functional as F

from lowlearn.models import MLP, Conv4

META = torch.device("meta")


def batch(features=20, classes=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g)


def train_step(model, optimizer, x, y, loss_fn=F.cross_entropy):
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()


def assert_on_cpu(*tensors):
    assert all(t.device.type == "cpu" for t in tensors)


def train_dlrt_under_meta(dlrt, model, x, y, steps=2):
    """``steps`` DLRT steps, each with torch's default device set to meta (the model on the CPU)."""
    for _ in range(steps):
        dlrt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with META:
            dlrt.step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("method", ["static", "set", "rigl", "snfs", "topkast"])
def test_sparse_training_steps_and_updates_use_the_models_device(method):
    """Every update of every sparse-training method, incl. SNFS's redistribution and Top-KAST's refresh."""
    from lowlearn.sparse.dst import SET, SNFS, RigL, StaticSparse
    from lowlearn.sparse.mask import masks_of
    from lowlearn.sparse.topkast import TopKAST

    torch.manual_seed(0)
    model = MLP(20, (16, 16), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with META:
        if method == "topkast":
            sparsifier = TopKAST(model, optimizer, 0.3, 0.6, every=2)
        elif method == "static":
            sparsifier = StaticSparse(model, optimizer, 0.3)
        else:
            sparsifier = {"set": SET, "rigl": RigL, "snfs": SNFS}[method](model, optimizer, 0.3, end=8, every=2)
    x, y = batch()
    for _ in range(6):
        if method == "topkast":
            optimizer.zero_grad()
            (F.cross_entropy(model(x), y) + 1e-3 * sparsifier.penalty()).backward()
            optimizer.step()
        else:
            train_step(model, optimizer, x, y)
        with META:
            sparsifier.step()
    with META:
        state = sparsifier.state_dict()
        sparsifier.load_state_dict(state)
    assert_on_cpu(*masks_of(model).values())


def test_pruning_scores_structured_patterns_and_export_use_the_models_device():
    from lowlearn.sparse import prune, scores
    from lowlearn.sparse.export import compact, export
    from lowlearn.sparse.lottery import EarlyBird
    from lowlearn.sparse.mask import attach_masks, squash
    from lowlearn.sparse.schedule import GradualPruning
    from lowlearn.sparse.structured import channel_scores, nm_mask, prune_channels, prune_nm
    from lowlearn.train import TrainState

    torch.manual_seed(0)
    model = MLP(20, (16, 16), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    train_step(model, optimizer, x, y)
    with META:
        attach_masks(model)
        movement = scores.MovementScores(model)
    train_step(model, optimizer, x, y)
    with META:
        movement(None)
        bird = EarlyBird(0.5, every=1, window=1)
        gradual = GradualPruning(0.4, begin=1, end=2, every=1)
        for step in (1, 2):
            state = TrainState(step=step, epoch=0, loss=torch.zeros((), device="cpu"), model=model,
                               optimizer=optimizer)
            gradual(state)
            bird(state)
        for score in (scores.magnitude(model), scores.snip(model, (x, y)), movement.scores(),
                      scores.obd(model, (x, y), samples=2, generator=torch.Generator().manual_seed(0)),
                      scores.random(model, torch.Generator().manual_seed(1))):
            prune(model, score, 0.3, optimizer=optimizer)
        prune(model, scores.magnitude(model), 0.2, scope="global", optimizer=optimizer)
        prune_nm(model, 1, 4, optimizer=optimizer)
        nm_mask(model[1].weight.detach())
        channel_scores(model)
        prune_channels(model, 0.5, optimizer=optimizer)
        small = compact(model)
        exported = export(model, "csr")
        squash(model)
    torch.testing.assert_close(small(x), model(x))
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


def test_lottery_controls_use_the_models_device():
    """IMP's reset and the controls; reshuffle draws its permutations on the CPU by design, whatever the default
    device, and moves them to the model's."""
    from lowlearn.sparse.lottery import Snapshot, constant_init, mask_distance, random_mask, reshuffle, rewind
    from lowlearn.sparse.mask import attach_masks, masks_of
    from lowlearn.sparse import prune, scores

    torch.manual_seed(0)
    model = MLP(20, (16,), 4)
    attach_masks(model)
    snapshot = Snapshot(0)
    with META:
        snapshot.capture(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, optimizer, *batch())
    with META:
        prune(model, scores.magnitude(model), 0.5)
        ticket = masks_of(model)
        rewind(model, snapshot.state)
        reshuffle(model, snapshot.state, seed=1)
        constant_init(model, snapshot.state)
        random_mask(model, snapshot.state, seed=2)
        assert 0 < mask_distance(ticket, masks_of(model)) < 1


def test_packnet_and_growth_use_the_models_device():
    from lowlearn.growth import GrowthSchedule, gradmax_directions, grow, width
    from lowlearn.sparse.packnet import PackNet
    from lowlearn.train import TrainState

    torch.manual_seed(0)
    x, y = batch()
    model = MLP(20, (16,), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with META:
        packnet = PackNet(model)
        packnet.start_task(optimizer)
    train_step(model, optimizer, x, y)
    with META:
        packnet.assign(0.5, optimizer)
        packnet.start_task(optimizer)
        packnet.load_state_dict(packnet.state_dict())
        with packnet.use_task(1):
            model(x)

    grown = MLP(20, (8,), 4)
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.1, momentum=0.9)
    train_step(grown, optimizer, x, y)
    with META:
        for strategy in ("random", "split", "gradmax"):
            assert_on_cpu(grow(grown, 0, 2, strategy, batch=(x, y), optimizer=optimizer, epsilon=0.01,
                               generator=torch.Generator().manual_seed(0)))     # the new units' indices too
        schedule = GrowthSchedule(0, 2, every=1, target=16, strategy="random", generator=torch.Generator())
        schedule(TrainState(step=1, epoch=0, loss=torch.zeros((), device="cpu"), model=grown, optimizer=optimizer))
    train_step(grown, optimizer, x, y)
    assert width(grown, 0) == 16

    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3),
                               torch.nn.Flatten(), torch.nn.Linear(2 * 12 * 12, 3))
    images, labels = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))
    with META:
        gradmax_directions(conv, 0, 2, (images, labels), closed_form=False, iterations=2,
                           generator=torch.Generator().manual_seed(0))


def test_low_rank_training_and_powerprop_steps_use_the_models_device():
    from lowlearn.lowrank import DLRT, to_low_rank
    from lowlearn.lowrank.layers import to_dense
    from lowlearn.powerprop import PowerPropOptimizer, powerprop

    torch.manual_seed(0)
    x, y = batch()
    model = MLP(20, (16, 16), 4)
    with META:
        to_low_rank(model, ["1", "3"], rank=4)
    for betas in (None, (0.9, 0.999)):
        dlrt = DLRT(model, lr=0.05, tol=0.2, betas=betas)
        train_dlrt_under_meta(dlrt, model, x, y)
        with META:
            dlrt.load_state_dict(dlrt.state_dict())
    with META:
        dense = to_dense(model)
    assert_on_cpu(*dense.parameters())

    net = powerprop(MLP(20, (16,), 4), 3)
    optimizer = PowerPropOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with META:
            optimizer.step()
    with META:
        net.load_state_dict(net.state_dict())      # checks the saved alpha


def test_meta_learners_and_task_samplers_use_the_datas_device():
    from lowlearn.data.augment import random_affine
    from lowlearn.data.cifar import augment_cifar
    from lowlearn.data.episodes import EpisodeSampler, group_by_class
    from lowlearn.data.tasks import GPCurves, SinusoidTasks, context_target_split
    from lowlearn.meta import MAML
    from lowlearn.meta.cnp import CNP
    from lowlearn.meta.metric import MatchingNet, ProtoNet

    torch.manual_seed(0)
    images = torch.randn(6, 5, 1, 16, 16)
    # built outside: as_tensor(groups) takes the default device under torch.device("meta") (on a GPU it
    # keeps the CPU, then moves to the data's device)
    sampler = EpisodeSampler(images, 3, 1, 2, seed=0, groups=[0, 0, 0, 1, 1, 1])
    flat_x, flat_y, cifar = torch.randn(12, 3), torch.arange(3).repeat(4), torch.rand(2, 3, 32, 32)
    with META:
        tasks = sampler.sample(2)
        grouped = group_by_class(flat_x, flat_y)
        random_affine(images[:2], torch.Generator().manual_seed(0))
        augment_cifar(cifar, torch.Generator().manual_seed(0))
    assert_on_cpu(*tasks, grouped)
    learners = [MAML(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.1, 1, learn_lr=True),
                MAML(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.1, 1, tasks_at_once=2),
                ProtoNet(Conv4(num_classes=None, hidden=4, image_size=16), refine_steps=1, test_shift=1,
                         test_rotations=True),
                MatchingNet(Conv4(num_classes=None, hidden=4, image_size=16), test_shift=1)]
    for learner in learners:
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
        with META:
            learner.meta_step(tasks, optimizer)
            learner.eval()
            learner.evaluate(tasks)
    g, cnp = torch.Generator().manual_seed(0), CNP(hidden=8)
    with META:
        sinusoids = SinusoidTasks().sample(2, 3, 3, generator=g)
        curves = GPCurves().sample(2, 8, generator=g)
        context, target = context_target_split(curves, 3, generator=g)
        loss = cnp.loss(context.x, context.y, target.x, target.y)
    loss.backward()
    assert_on_cpu(*sinusoids, loss)


def test_fit_draws_its_batch_order_on_the_cpu_whatever_the_default_device():
    """fit's batch order comes from a CPU generator: drawn on the default device instead, it fails on a GPU
    ("Expected a 'cuda' device type for generator") and makes meta tensors here. The run is the same as one
    with the CPU as the default device."""
    from lowlearn.train import evaluate, fit

    x, y = batch()
    histories = []
    for default in ("cpu", META):
        torch.manual_seed(0)
        model = MLP(20, (16,), 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.device(default):
            history = fit(model, (x, y), optimizer, steps=6, batch_size=8, log_every=2, eval_data=(x, y),
                          eval_every=3, device="cpu", progress=False)
            history.eval.append(evaluate(model, (x, y)))
        histories.append((history.loss, history.eval))
    assert histories[0] == histories[1]


def test_summaries_of_numbers_are_computed_on_the_cpu_whatever_the_default_device():
    """A list or array of numbers becomes a CPU tensor, as documented: on torch's default device, a GPU's,
    ``.numpy()`` of the curve's mean would fail."""
    from lowlearn.stats import curve_mean_and_ci, mean_and_ci, summarize

    with META:
        mean, half = curve_mean_and_ci([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
        single = summarize([0.5], scale=100)
        both = mean_and_ci([1.0, 2.0, 3.0])
    assert mean.tolist() == [2.0, 4.0] and half[1] == pytest.approx(2 * half[0])
    assert single == (50.0, None) and both[0] == 2.0


def test_the_benchmarks_fixed_batch_is_drawn_on_the_cpu_whatever_the_default_device():
    from lowlearn.bench.timing import fixed_batch

    expected = fixed_batch(8, 5, torch.device("cpu"))
    with META:
        x, y = fixed_batch(8, 5, torch.device("cpu"))
    torch.testing.assert_close((x, y), expected)


def test_data_dependent_scores_costs_checkpoints_and_lottery_rounds_use_the_models_device(tmp_path):
    """SynFlow and GraSP, the cost counters, checkpoints, and IMP with its controls (trained by fit)."""
    from lowlearn.cost import count_flops, training_memory
    from lowlearn.sparse import scores
    from lowlearn.sparse.flops import model_sparse_flops
    from lowlearn.sparse.lottery import iterative_magnitude_pruning, train_control
    from lowlearn.sparse.mask import attach_masks
    from lowlearn.sparse.update import drop_and_grow
    from lowlearn.train import fit, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    x, y = batch()
    model = MLP(20, (16,), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach_masks(model)
    half = torch.arange(16 * 20).reshape(16, 20) % 2 == 0

    def train(net, callbacks):
        return fit(net, (x, y), torch.optim.SGD(net.parameters(), lr=0.1), steps=2, batch_size=16,
                   callbacks=callbacks, device="cpu", progress=False)

    with META:
        synflow, grasp = scores.synflow(model, (20,)), scores.grasp(model, (x, y))
        count_flops(model, x)
        model_sparse_flops(model, x)
        training_memory(model, optimizer, (x, y), F.cross_entropy)
        drop_and_grow(half, synflow["1"], grasp["1"], 4)
        save_checkpoint(tmp_path / "model.pt", model, optimizer, step=1)
        load_checkpoint(tmp_path / "model.pt", model, optimizer)
        lottery = iterative_magnitude_pruning(model, train, 1, 0.5, rewind_step=1)
        for control in (None, "reinit", "reshuffle", "constant", "random_mask"):
            train_control(model, lottery, 1, train, control)
    assert_on_cpu(*synflow.values(), *grasp.values(), *model.state_dict().values())


def test_convolutional_low_rank_training_uses_the_models_device():
    from lowlearn.lowrank import DLRT, compression, to_low_rank

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 3))
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))
    with META:
        to_low_rank(model, ["0", "2"], tol=0.1)
    train_dlrt_under_meta(DLRT(model, lr=0.05, tol=0.2), model, x, y)
    with META:
        compression(model)
    assert_on_cpu(*model.state_dict().values())


def test_other_meta_learners_learned_optimizers_and_the_gp_posterior_use_the_datas_device():
    from lowlearn.data.episodes import EpisodeSampler
    from lowlearn.data.tasks import GPCurves, context_target_split
    from lowlearn.meta import ANIL, MetaSGD, Reptile
    from lowlearn.meta.cnp import CNP, fit_cnp
    from lowlearn.meta.episodic import episode_accuracies, meta_train
    from lowlearn.meta.learned_optimizer import LSTMOptimizer, meta_train as meta_train_optimizer, network_problem
    from lowlearn.meta.learned_optimizer import optimize, quadratic

    torch.manual_seed(0)
    sampler = EpisodeSampler(torch.randn(6, 5, 1, 16, 16), 3, 1, 2, seed=0)
    learners = [ANIL(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.1, 1),
                MetaSGD(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.1, 1),
                Reptile(Conv4(1, 3, hidden=4, image_size=16, running_stats=False), 0.1, 2, 0.5, tasks_at_once=2)]
    for learner in learners:
        net = learner if isinstance(learner, torch.nn.Module) else learner.model
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        with META:
            meta_train(learner, sampler, optimizer, 2, batch=2, log_every=1)
            accuracies = episode_accuracies(lambda tasks: learner.evaluate(tasks)["per_task_accuracy"], sampler, 3,
                                            batch=2)
        assert_on_cpu(accuracies)

    x, y = batch()
    lstm, network = LSTMOptimizer(hidden=4), MLP(20, (8,), 4)
    g = torch.Generator().manual_seed(0)
    with META:
        meta_train_optimizer(lstm, lambda: quadratic(4, generator=g), torch.optim.SGD(lstm.parameters(), lr=1e-3),
                             problems=1, horizon=4, truncation=2)
        optimize(lstm, *network_problem(network, x, y, batch_size=8, generator=g), 2)

    gp, cnp = GPCurves(), CNP(hidden=8)

    def sample():
        context, target = context_target_split(gp.sample(2, 8, generator=g), 3, generator=g)
        return context.x, context.y, target.x, target.y

    with META:
        fit_cnp(cnp, sample, torch.optim.SGD(cnp.parameters(), lr=1e-3), 2)
        curves = gp.sample(2, 8, generator=g)
        context, target = context_target_split(curves, 3, generator=g)
        mean, std = gp.posterior(context.x, context.y, target.x)
        distance = gp.mahalanobis(curves)
    assert_on_cpu(mean, std, distance)
