"""The CUDA path of every training method: the same step on CPU and on a GPU gives the same result.

Skipped without a CUDA device. Run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.data.episodes import random_episodes
from lowlearn.data.tasks import SinusoidTasks
from lowlearn.lowrank import DLRT, low_rank_layers, to_low_rank
from lowlearn.meta import MAML
from lowlearn.models import MLP, Conv4
from lowlearn.powerprop import PowerPropOptimizer, powerprop
from lowlearn.sparse.dst import SET, SNFS, RigL
from lowlearn.sparse.mask import masks_of, nonzero_counts
from lowlearn.sparse.packnet import PackNet
from lowlearn.sparse.topkast import TopKAST
from lowlearn.train import fit, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batches(n=12):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 20, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(n)]


@pytest.mark.parametrize("method", ["rigl", "snfs", "topkast"])
def test_sparse_training_keeps_exact_densities_on_cuda(method):
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 4).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if method == "topkast":
        sparsifier = TopKAST(model, optimizer, 0.3, 0.6, every=3)
    else:
        sparsifier = {"rigl": RigL, "snfs": SNFS}[method](model, optimizer, 0.3, end=10, every=3)
    before = {name: int(m.sum()) for name, m in masks_of(model).items()}
    for x, y in batches():
        optimizer.zero_grad()
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
        optimizer.step()
        sparsifier.step()
    after = {name: int(m.sum()) for name, m in masks_of(model).items()}
    assert sum(after.values()) == sum(before.values())
    assert all(m.device.type == "cuda" for m in masks_of(model).values())


@pytest.mark.parametrize("method", ["set", "packnet"])
def test_methods_built_on_the_cpu_draw_on_the_gpu_after_the_model_moves(method):
    # fit() moves the model to the GPU after the method made its generator with the model on the CPU.
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = SET(model, optimizer, 0.3, end=10, every=3) if method == "set" else PackNet(model)
    if isinstance(method, PackNet):
        method.start_task(optimizer)
    history = fit(model, batches()[0], optimizer, steps=6, batch_size=8, device="cuda",
                  callbacks=[method] if isinstance(method, SET) else [], progress=False)
    if isinstance(method, PackNet):
        method.assign(0.5, optimizer)                               # re-initialises the released weights
        method.start_task(optimizer)
        with method.use_task(1):
            model(batches()[0][0].cuda())
        assert all(owner.device.type == "cuda" for owner in method.owner.values())   # the owners followed
    assert method.generator.device.type == "cuda" and len(history.loss) > 0
    assert all(m.device.type == "cuda" for m in masks_of(model).values())


def test_a_cuda_generator_state_continues_on_a_new_cuda_generator():
    from lowlearn.train import restore_generator

    cuda = torch.Generator(device="cuda").manual_seed(3)
    torch.rand(5, generator=cuda, device="cuda")
    state = cuda.get_state()
    expected = torch.rand(4, generator=cuda, device="cuda")
    restored = restore_generator(torch.Generator(), state, "cuda:0")       # a method rebuilt with a CPU generator
    assert restored.device.type == "cuda" and torch.equal(torch.rand(4, generator=restored, device="cuda"), expected)
    cpu = torch.Generator()
    assert restore_generator(cpu, state) is cpu                              # device unknown: seeded
    source = torch.Generator().manual_seed(4)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(4))
    back = restore_generator(torch.Generator(device="cuda"), source.get_state(), "cpu")   # and the other way
    assert back.device.type == "cpu" and torch.equal(torch.rand(3, generator=back), expected)


@pytest.mark.parametrize("first_device", ["cuda", "cpu"])
def test_snfs_resumed_from_a_checkpoint_on_the_cpu_trains_on_the_gpu(first_device):
    # "cuda": a GPU run's checkpoint read to the CPU, loaded into the model on the GPU. "cpu": a CPU run's,
    # loaded with the model on the CPU, which fit then moves to the GPU.
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snfs = SNFS(model, optimizer, 0.3, end=10, every=3)
    fit(model, batches()[0], optimizer, steps=2, batch_size=8, device=first_device, callbacks=[snfs], progress=False)
    read_to_cpu = {**snfs.state_dict(), "momentum": {name: m.cpu() for name, m in snfs.momentum.items()}}
    resumed = SNFS(model, optimizer, 0.3, end=10, every=3)
    resumed.load_state_dict(read_to_cpu)
    fit(model, batches()[0], optimizer, steps=4, batch_size=8, device="cuda", callbacks=[resumed], progress=False,
        start_step=2)                                                        # an update at step 3 uses the momentum
    assert all(m.device.type == "cuda" for m in resumed.momentum.values())


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                            lambda ps: torch.optim.Adam(ps, lr=0.01)], ids=["sgd", "adam"])
def test_a_checkpoint_loaded_on_the_cpu_resumes_training_on_the_gpu(tmp_path, make_optimizer):
    x, y = batches()[0]
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 4)
    optimizer = make_optimizer(model.parameters())
    fit(model, (x, y), optimizer, steps=2, batch_size=8, device="cuda", progress=False)
    path = save_checkpoint(tmp_path / "ck.pt", model, optimizer)
    resumed = MLP(20, (32, 16), 4)                       # a new process: the model is built on the CPU
    resumed_optimizer = make_optimizer(resumed.parameters())
    load_checkpoint(path, resumed, resumed_optimizer)
    fit(model, (x, y), optimizer, steps=4, batch_size=8, device="cuda", progress=False, start_step=2)
    fit(resumed, (x, y), resumed_optimizer, steps=4, batch_size=8, device="cuda", progress=False, start_step=2)
    assert all(value.device.type == "cuda" for state in resumed_optimizer.state.values()
               for key, value in state.items() if key != "step")
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def test_a_sparsifier_saved_on_the_gpu_resumes_on_the_cpu():
    # CUDA's generator state cannot be set on a CPU generator: without a GPU (as here, where the saved
    # device is left out), loading seeds it, reproducibly.
    torch.manual_seed(0)
    model = MLP(20, (32, 16), 4).cuda()
    saved = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.3, end=10, every=3).state_dict()
    assert saved["generator"].numel() != torch.Generator().get_state().numel()
    del saved["generator_device"]
    draws = []
    for _ in range(2):
        cpu_model = MLP(20, (32, 16), 4)
        resumed = SET(cpu_model, torch.optim.SGD(cpu_model.parameters(), lr=0.1), 0.3, end=10, every=3)
        resumed.load_state_dict(saved)
        draws.append(torch.rand(4, generator=resumed.generator))
    assert torch.equal(draws[0], draws[1])


def test_channels_last_metric_learners_on_cuda_match_the_cpu():
    import dataclasses

    from lowlearn.eval import omniglot_runs
    from lowlearn.profiles import get_profile

    sizes = dataclasses.replace(get_profile("smoke").black_box, channels_last=True)
    torch.manual_seed(0)
    cpu = omniglot_runs.make_learner("protonet", sizes).eval()
    gpu = copy.deepcopy(cpu).cuda()
    episode = random_episodes(1, 5, 2, 3, image_size=sizes.image_size, seed=0)
    args = (episode.support_x[0], episode.support_y[0], episode.query_x[0])
    with torch.no_grad():
        assert torch.allclose(cpu(*args), gpu(*(a.cuda() for a in args)).cpu(), rtol=1e-4, atol=1e-4)


def test_powerprop_and_the_optimiser_aware_step_agree_with_cpu():
    torch.manual_seed(0)
    cpu = powerprop(MLP(20, (32,), 4), 3)
    gpu = copy.deepcopy(cpu).cuda()
    for model in (cpu, gpu):
        device = next(model.parameters()).device
        optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
        for x, y in batches(3):
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


def test_dlrt_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = to_low_rank(MLP(20, (32,), 4), ["1"], rank=4)
    gpu = copy.deepcopy(cpu).cuda()
    for model in (cpu, gpu):
        device = next(model.parameters()).device
        dlrt = DLRT(model, lr=0.1, tol=0.1)
        for x, y in batches(3):
            x, y = x.to(device), y.to(device)
            dlrt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            dlrt.step(lambda: F.cross_entropy(model(x), y))
    assert low_rank_layers(cpu)["1"].rank == low_rank_layers(gpu)["1"].rank
    x = batches(1)[0][0]
    assert torch.allclose(cpu(x), gpu(x.cuda()).cpu(), atol=1e-4)


def test_maml_meta_gradient_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = MLP(1, (40, 40), 1).double()
    gpu = copy.deepcopy(cpu).cuda()
    tasks = SinusoidTasks().sample(4, 5, 5, generator=torch.Generator().manual_seed(0))
    for model in (cpu, gpu):
        device = next(model.parameters()).device
        MAML(model, 0.01, 2, loss_fn=F.mse_loss).meta_backward(type(tasks)(*(t.double().to(device) for t in tasks)))
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a.grad, b.grad.cpu(), rtol=1e-8)


def test_task_batched_maml_on_cuda_matches_the_cpu_loop():
    """Grouped convolutions and per-task batch norm in cuDNN: the meta-gradient of the CPU's per-task loop."""
    torch.manual_seed(0)
    cpu = Conv4(1, 5, hidden=16, running_stats=False).double()
    gpu = copy.deepcopy(cpu).cuda()
    tasks = random_episodes(6, 5, 1, 3, dtype=torch.float64)
    MAML(cpu, 0.4, 2).meta_backward(tasks)
    MAML(gpu, 0.4, 2, tasks_at_once=4).meta_backward(type(tasks)(*(t.cuda() for t in tasks)))
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(a.grad, b.grad.cpu(), rtol=1e-7, atol=1e-10)


def test_cuda_peak_bytes_counts_what_a_step_allocates_and_frees():
    from lowlearn.bench.timing import cuda_peak_bytes

    _held = torch.zeros(2**20, device="cuda")                         # allocated before: not counted
    peak = cuda_peak_bytes(lambda: torch.ones(2**20, device="cuda").sum(), torch.device("cuda"))
    assert 4 * 2**20 <= peak < 5 * 2**20


def test_training_memory_measures_the_same_cuda_peak_with_the_gradients_of_an_earlier_step_still_held():
    from lowlearn.cost import training_memory

    torch.manual_seed(0)
    model = MLP(784, (1024, 1024), 10).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = torch.randn(64, 784, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    fresh = training_memory(model, optimizer, batch, F.cross_entropy, measure_cuda=True).cuda_peak
    F.cross_entropy(model(batch[0]), batch[1]).backward()                       # .grad now held
    held = training_memory(model, optimizer, batch, F.cross_entropy, measure_cuda=True).cuda_peak
    assert abs(held - fresh) <= 512 * len(list(model.parameters())), (held, fresh)   # the allocator's rounding


def test_csr_export_on_cuda_matches_the_masked_model():
    from lowlearn.sparse import prune, scores
    from lowlearn.sparse.export import CSRLinear, export

    torch.manual_seed(0)
    model = MLP(20, (64, 32), 4).cuda()
    prune(model, scores.magnitude(model), 0.1)
    exported = export(model, "csr")
    assert isinstance(exported[1], CSRLinear)
    x = torch.randn(8, 20, device="cuda")
    torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


def test_two_four_export_runs_on_sparse_tensor_cores_where_available():
    from lowlearn.sparse import prune_nm
    from lowlearn.sparse.export import SemiStructuredLinear, export, semi_structured_unavailable

    torch.manual_seed(0)
    model = MLP(256, (256,), 128).cuda().half()
    prune_nm(model, 2, 4)
    if semi_structured_unavailable(model[1]) is not None:
        pytest.skip(semi_structured_unavailable(model[1]))
    exported = export(model, "2:4")
    assert isinstance(exported[1], SemiStructuredLinear)
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    torch.testing.assert_close(exported(x), model(x), rtol=2e-2, atol=2e-2)


def test_growth_with_a_cpu_generator_grows_a_model_on_the_gpu():
    from lowlearn.growth import gradmax_directions, grow, layer_pair

    torch.manual_seed(0)
    model = MLP(20, (8,), 4).cuda()
    x, y = (t.cuda() for t in batches()[0])
    before = model(x)
    grow(model, 0, 3, "random", epsilon=0.0, generator=torch.Generator().manual_seed(0))   # made before the move
    grow(model, 0, 2, "split", generator=torch.Generator().manual_seed(0))
    assert layer_pair(model, 0)[0].weight.shape[0] == 13
    directions = gradmax_directions(model, 0, 2, (x, y), closed_form=False, iterations=3,
                                    generator=torch.Generator().manual_seed(0))
    assert directions.device.type == "cuda" and directions.shape == (2, 4)
    assert torch.allclose(model(x), before, atol=1e-5)                    # growth keeps the function


def test_fit_moves_the_evaluation_data_to_the_gpu_once(monkeypatch):
    import lowlearn.train as train_module

    seen = []
    real = train_module.evaluate

    def recording(model, data, **options):
        seen.append(tuple((id(t), t.device.type) for t in data))
        return real(model, data, **options)

    monkeypatch.setattr(train_module, "evaluate", recording)
    x, y = batches()[0]
    model = MLP(20, (8,), 4)
    fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=3, batch_size=8, eval_data=(x, y),
        eval_every=1, device="cuda", progress=False)
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0][0][1] == "cuda"   # moved once, before training


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fit_trains_a_model_on_the_second_gpu_there():
    model = nn.Sequential(nn.Linear(6, 3)).to("cuda:1")
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=2, batch_size=8)
    assert all(p.device == torch.device("cuda:1") for p in model.parameters())


def test_random_quadratics_are_drawn_on_the_generators_device():
    from lowlearn.meta.learned_optimizer import quadratic

    f, theta = quadratic(generator=torch.Generator(device="cuda").manual_seed(0))
    assert theta.device.type == "cuda" and f(theta).device.type == "cuda"
    f, theta = quadratic(device="cuda")
    assert f(theta).device.type == "cuda"


def test_random_and_obd_scores_take_a_cpu_generator_for_a_model_on_the_gpu():
    from lowlearn.sparse.scores import obd, random

    torch.manual_seed(0)
    model = MLP(20, (8,), 4).cuda()
    batch = tuple(t.cuda() for t in batches()[0])
    for score in (lambda g: random(model, g), lambda g: obd(model, batch, samples=2, generator=g)):
        first, second = (score(torch.Generator().manual_seed(0)) for _ in range(2))
        assert all(s.device.type == "cuda" for s in first.values())
        assert all(torch.equal(first[name], second[name]) for name in first)     # reproducible


def test_synflow_scores_on_the_gpu_match_the_cpu():
    from lowlearn.sparse.scores import synflow

    torch.manual_seed(0)
    model = Conv4(num_classes=5, hidden=8)
    expected = synflow(model, (1, 28, 28))
    scores = synflow(model.cuda(), (1, 28, 28))
    for name in expected:
        assert scores[name].device.type == "cuda"
        torch.testing.assert_close(scores[name].cpu(), expected[name], rtol=1e-9, atol=0)


def test_grasp_scores_of_a_masked_net_on_the_gpu_match_the_cpu():
    from lowlearn.sparse import prune
    from lowlearn.sparse.scores import grasp, magnitude

    torch.manual_seed(0)
    model = Conv4(num_classes=5, hidden=8).double()
    prune(model, magnitude(model), 0.5)
    x, y = torch.randn(10, 1, 28, 28, dtype=torch.float64), torch.arange(10) % 5
    expected = grasp(model, (x, y))
    scores = grasp(model.cuda(), (x.cuda(), y.cuda()))
    for name in expected:
        assert scores[name].device.type == "cuda"
        torch.testing.assert_close(scores[name].cpu(), expected[name], rtol=1e-9, atol=1e-18)


def test_tasks_drawn_with_a_cpu_generator_are_the_same_on_the_gpu():
    from lowlearn.data.tasks import GPCurves, context_target_split

    def draws(device):
        generator = torch.Generator().manual_seed(0)
        tasks = SinusoidTasks().sample(3, 5, 4, generator=generator, device=device)
        curves = GPCurves().sample(2, 7, generator=generator, device=device)
        context, _ = context_target_split(curves, 3, generator=generator)
        return [*tasks, *curves, *context]

    for on_cpu, on_gpu in zip(draws("cpu"), draws("cuda")):
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)


def test_quadratics_and_affine_maps_drawn_with_a_cpu_generator_are_the_same_on_the_gpu():
    from lowlearn.data.augment import random_affine_matrices
    from lowlearn.meta.learned_optimizer import quadratic

    def draws(device):
        f, theta = quadratic(generator=torch.Generator().manual_seed(0), device=device)
        return theta, f(theta), random_affine_matrices(3, torch.Generator().manual_seed(0), device=device)

    for on_cpu, on_gpu in zip(draws("cpu"), draws("cuda")):
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize("method", ["masks", "powerprop"])
def test_a_training_step_captured_in_a_cuda_graph_trains_as_the_eager_step_does(method):
    # The benchmarks time masked and Powerprop steps as CUDA graphs: their replays must be the same training,
    # with a change of the mask buffer in place seen by the replays, and pruned weights staying zero. Only the
    # replay is kept (cuda_graphed's result must hold the model, optimizer and batch the graph writes and reads).
    from lowlearn.bench.timing import cuda_graphed
    from lowlearn.sparse.mask import attach_masks, set_masks

    x, y = (t.cuda() for t in batches(1)[0])
    models = []

    def make_step():
        torch.manual_seed(0)
        model = MLP(20, (32, 16), 4).cuda()
        if method == "powerprop":
            powerprop(model, 3.0)
        attach_masks(model)
        set_masks(model, {name: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.5
                          for name, m in masks_of(model).items()})
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, capturable=True)
        if method == "powerprop":
            optimizer = PowerPropOptimizer(optimizer, model)
        models.append(weakref.ref(model))

        def step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        return step

    eager_step, replay = make_step(), cuda_graphed(make_step, torch.device("cuda"), warmup=3)
    garbage = [torch.full((4096,), 7.0, device="cuda") for _ in range(64)]    # reuses any memory freed meanwhile
    for _ in range(3):                                      # the graph's warm-up steps
        eager_step()
    for round_ in range(2):
        for _ in range(5):
            eager_step()
            replay()
        for model in (ref() for ref in models):
            for layer in (m for m in model.modules() if hasattr(m, "parametrizations") and round_ == 0):
                layer.parametrizations.weight[-1].mask[:, 0] = 0                # prune more, in place
    torch.cuda.synchronize()
    assert all(t.eq(7.0).all() for t in garbage)
    eager, replayed = (dict(ref().named_parameters()) for ref in models)
    for name in eager:
        assert torch.allclose(eager[name], replayed[name], rtol=1e-5, atol=1e-6), name
    for layer in (m for m in models[1]().modules() if hasattr(m, "parametrizations")):
        pruned = layer.parametrizations.weight[-1].mask == 0
        assert pruned[:, 0].all() and (layer.weight[pruned] == 0).all()


def test_nonzero_counts_read_masks_split_across_devices():
    """A model split across devices: one read per device, each count under its own name."""
    masks = {"gpu": torch.tensor([True, True, False], device="cuda"), "cpu": torch.tensor([False, True]),
             "gpu2": torch.ones(2, 2, dtype=torch.bool, device="cuda")}
    assert nonzero_counts(masks) == {"gpu": 2, "cpu": 1, "gpu2": 4}
    assert list(nonzero_counts(masks)) == ["gpu", "cpu", "gpu2"]
