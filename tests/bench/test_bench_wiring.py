"""What each benchmark's ``run`` and ``main`` put together: the models compared, the steps timed, the ratio printed.

References: hand counts of kept weights, hand-written SGD / Adam / Powerprop updates, canned times whose ratios
and verdicts are worked out by hand, the documented goals (module docstrings and constants), and outputs of the
variants computed with torch alone.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.allocator import has_glibc
from lowlearn.bench import allocator as alloc_bench
from lowlearn.bench import dst, lowrank, masks, powerprop, sparse, timing
from lowlearn.bench.timing import Ratio
from lowlearn.bench import maml as maml_bench
from lowlearn.powerprop import powerprop_layers
from lowlearn.sparse.mask import masks_of, prunable_layers

CPU = torch.device("cpu")


def one_round(steps, **options):
    """A stand-in for ``interleaved_rounds``: one round of 1 s for every step, none of them run."""
    return {name: [1.0] for name in steps}


def outputs_of_the_timed_steps(monkeypatch, module):
    """Make ``module``'s ``interleaved_rounds`` call each step once; returns ``{name: its output}``, filled then."""
    outputs = {}

    def run_once(steps, **options):
        outputs.update({name: step() for name, step in steps.items()})
        return one_round(steps)

    monkeypatch.setattr(module, "interleaved_rounds", run_once)
    return outputs


def _goal_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("goal: ")]


# --- masks -------------------------------------------------------------------------------------------------------

def test_masks_every_sparse_model_keeps_the_requested_fraction_of_each_layer():
    """Hand count: at density 0.1 each of the three sparse models keeps ~10% of every layer's weights (not 90%),
    the same entries in all three."""
    models = masks.build_models(density=0.1, device=CPU)
    lowlearn_masks = masks_of(models["lowlearn masks"])
    for name, layer in prunable_layers(models["torch.nn.utils.prune"]).items():
        keep = lowlearn_masks[name].bool()
        assert abs(keep.float().mean().item() - 0.1) < 0.02, name
        assert torch.equal(layer.weight_mask.bool(), keep), name
        hooked = prunable_layers(models["masked gradient"])[name].weight
        assert torch.equal(hooked != 0, keep), name                     # zero exactly where pruned


def test_masks_goal_lines_print_lowlearn_over_each_reference_and_judge_it_lower_is_better(monkeypatch, capsys):
    """Canned times, by hand: lowlearn 2.4 s against dense 2.0 s is 1.2 (> 1.10: not met); against
    torch.nn.utils.prune 3.0 s it is 0.8 (<= 1.0: met)."""
    names = ("dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient")
    times = {"dense": 2.0, "dense (copy)": 2.0, "lowlearn masks": 2.4, "torch.nn.utils.prune": 3.0,
             "masked gradient": 2.2}
    monkeypatch.setattr(masks, "run", lambda *args, **kwargs: {"rounds": {n: [times[n]] * 3 for n in names},
                                                               "seconds": times, "faults": dict.fromkeys(names)})
    masks.main(["--device", "cpu"])
    dense, prune = _goal_lines(capsys.readouterr().out)
    assert dense.startswith("goal: lowlearn masks / dense <= 1.10") and dense.endswith(
        ": 1.200 (middle half 1.200-1.200), not met")
    assert prune.startswith("goal: lowlearn masks / torch.nn.utils.prune <= 1.00") and prune.endswith(
        ": 0.800 (middle half 0.800-0.800), met")


# --- powerprop ---------------------------------------------------------------------------------------------------

def _gradients(model_theta, x, y):
    """``{name: ∂L/∂θ}`` of every parameter of a plain model computing θ."""
    loss = F.cross_entropy(model_theta(x), y)
    return dict(zip([n for n, _ in model_theta.named_parameters()],
                    torch.autograd.grad(loss, list(model_theta.parameters())), strict=True))


def test_powerprop_sgd_case_takes_the_powerprop_step_and_the_sgd_case_the_plain_one():
    """Hand-written update at α = 3, lr 0.1 (Schwarz et al. 2021, ∂L/∂φ = ∂L/∂θ · α|φ|^(α−1)): one step of the
    'Powerprop, SGD' case moves φ by −0.1·∂L/∂θ·3φ², and the 'SGD' baseline moves θ by −0.1·∂L/∂θ."""
    steps = powerprop.build_steps(alpha=3.0, batch_size=8, device=CPU)
    x, y = timing.fixed_batch(8, 784, CPU)
    base_model = steps["SGD"][1]
    grads = _gradients(copy.deepcopy(base_model), x, y)   # both cases start at the same θ
    before = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    pp_model = steps["Powerprop, SGD"][1]
    layers = powerprop_layers(pp_model)
    assert layers, "the Powerprop case has no Powerprop layer"
    phi = {name: layer.parametrizations.weight.original.detach().clone() for name, layer in layers.items()}
    steps["SGD"][0]()
    steps["Powerprop, SGD"][0]()
    for n, p in base_model.named_parameters():
        assert torch.allclose(p, before[n] - 0.1 * grads[n], atol=1e-6), n
    for name, layer in layers.items():
        want = phi[name] - 0.1 * grads[f"{name}.weight"] * 3 * phi[name] ** 2
        assert torch.allclose(layer.parametrizations.weight.original, want, atol=1e-6), name


def test_powerprop_adam_case_takes_the_optimiser_aware_step():
    """Hand-written first Adam step (lr 1e-3, bias-corrected: Δθ = −lr·g/(|g|+ε)) mapped to φ as the paper's
    optimiser-aware update, φ ← φ + Δθ·α|φ|^(α−1) with g = ∂L/∂θ (not Adam on ∂L/∂φ)."""
    steps = powerprop.build_steps(alpha=3.0, batch_size=8, device=CPU)
    x, y = timing.fixed_batch(8, 784, CPU)
    grads = _gradients(copy.deepcopy(steps["Adam"][1]), x, y)
    model = steps["Powerprop, optimiser-aware Adam"][1]
    layers = powerprop_layers(model)
    phi = {name: layer.parametrizations.weight.original.detach().clone() for name, layer in layers.items()}
    steps["Powerprop, optimiser-aware Adam"][0]()
    for name, layer in layers.items():
        g = grads[f"{name}.weight"]
        delta = -1e-3 * g / (g.abs() + 1e-8)
        want = phi[name] + delta * 3 * phi[name] ** 2
        # atol 1e-5: where |g| is near ε the float32 rounding of θ = φ³ moves g/(|g|+ε) by ~1e-3 of the step;
        # Adam on ∂L/∂φ instead would move φ by ~1e-3.
        assert torch.allclose(layer.parametrizations.weight.original, want, atol=1e-5), name


# --- dst ---------------------------------------------------------------------------------------------------------

def _dst_rounds(rigl: float) -> dict[str, list[float]]:
    base = {"dense": 1.0, "static": 2.0, "SET": 2.1, "RigL": rigl, "SNFS": 2.3, "Top-KAST": 2.5}
    return {name: [base[name]] * 3 for name in dst.METHODS}


@pytest.mark.parametrize("rigl, printed", [(2.2, "1.100 (middle half 1.100-1.100), not met"),
                                           (2.0, "1.000 (middle half 1.000-1.000), met")])
def test_dst_goal_is_rigl_over_static_lower_is_better(monkeypatch, capsys, rigl, printed):
    """Canned times, by hand: RigL 2.2 s over static 2.0 s is 1.1 > 1.05 (not met); 2.0 / 2.0 = 1 (met). Not
    RigL / dense (2.2), and a time ratio is met from below."""
    monkeypatch.setattr(dst, "run", lambda *args, **kwargs: _dst_rounds(rigl))
    dst.main(["--device", "cpu"])
    (line,) = _goal_lines(capsys.readouterr().out)
    assert line == f"goal: RigL / static <= 1.05 at ΔT = 100, batch = 128, density = 0.1: {printed}"


def test_dst_run_times_blocks_of_updates_times_every_steps(monkeypatch):
    """Hand count: a timed block must hold ``updates`` mask updates, i.e. updates·ΔT steps (3·2 = 6 here),
    after a warm-up of whole intervals."""
    seen = {}

    def recording(steps, **options):
        seen.update(options)
        return one_round(steps)

    monkeypatch.setattr(dst, "interleaved_rounds", recording)
    dst.run(density=0.2, batch_size=4, every=2, updates=3, repeats=1, device="cpu")
    assert seen["iterations"] == 6 and seen["warmup"] % 2 == 0


# --- lowrank -----------------------------------------------------------------------------------------------------

def test_lowrank_dense_baseline_is_plain_sgd_at_dlrt_s_learning_rate():
    """Hand-written SGD (w ← w − lr·g, no momentum) for two steps: the dense baseline takes the plain step at
    DLRT's learning rate (momentum would show in the second step)."""
    model, optimizer = lowrank.build(16, None, CPU)
    _, dlrt = lowrank.build(16, 4, CPU)
    x, y = timing.fixed_batch(4, 16, CPU)
    step = lowrank._step(model, optimizer, x, y)
    for _ in range(2):
        ref = copy.deepcopy(model)
        loss = F.cross_entropy(ref(x), y)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        want = [p.detach() - dlrt.lr * g for p, g in zip(ref.parameters(), grads, strict=True)]
        step()
        for p, w in zip(model.parameters(), want, strict=True):
            assert torch.allclose(p, w, atol=1e-7)


def test_lowrank_time_ratio_is_dlrt_over_dense(monkeypatch):
    """Canned times, by hand: DLRT 1 s per step against dense 2 s is a time ratio of 0.5."""
    monkeypatch.setattr(lowrank, "interleaved_rounds",
                        lambda steps, **options: {"dense": [2.0, 2.0, 2.0], "dlrt": [1.0, 1.0, 1.0]})
    (row,) = lowrank.run(widths=(16,), rank=4, batch_size=4, iterations=1, repeats=3, device="cpu")
    assert row["time_ratio"] == timing.Ratio(0.5, 0.5, 0.5)
    assert row["ranks"] == {"0": 4, "2": 4}                          # fixed rank: as built


@pytest.mark.parametrize("width, rank, batch, device, expected", [
    (1024, 64, 128, "cpu", 1.0), (1023, 64, 128, "cpu", None), (1024, 65, 128, "cpu", None),
    (1024, 64, 4096, "cuda", 1.0), (1024, 64, 4095, "cuda", None)])
def test_lowrank_goal_holds_from_width_1024_at_rank_at_most_64(width, rank, batch, device, expected):
    """The documented goal: 'held from width 1024 at rank <= 64, and on a GPU only from a batch of GPU_BATCH'
    (4096): both ends of each bound."""
    row = {"width": width, "rank": rank, "batch_size": batch}
    assert lowrank.goal(row, torch.device(device)) == expected


# --- maml --------------------------------------------------------------------------------------------------------

def test_maml_loop_adapts_one_task_at_a_time_and_the_batched_path_all_at_once(monkeypatch):
    """The module docstring: 'lowlearn's MAML adapting one task after another, the same adapting all tasks at
    once': tasks_at_once 1 and T (3 tasks here)."""
    made = {}

    class Recorder:
        def __init__(self, model, inner_lr, steps, tasks_at_once=1):
            made[len(made)] = tasks_at_once

        def meta_step(self, tasks, optimizer):
            pass

    monkeypatch.setattr(maml_bench, "MAML", Recorder)
    from lowlearn.data.episodes import random_episodes
    tasks = random_episodes(3, 2, 1, 1, image_size=8)
    for name in ("lowlearn", "lowlearn batched"):
        maml_bench.make_step(name, nn.Linear(2, 2), tasks, 1, 0.4)
    assert made == {0: 1, 1: 3}


@pytest.mark.parametrize("lowlearn_s, printed", [(2.0, "2.000 (middle half 2.000-2.000), met"),
                                                 (8.0, "0.500 (middle half 0.500-0.500), not met")])
def test_maml_throughput_goal_is_met_from_above(monkeypatch, capsys, lowlearn_s, printed):
    """Canned times, by hand: higher 4 s per meta-step, lowlearn 2 s is 2x higher's throughput (>= 1: met); at
    8 s it is 0.5x (not met). Throughput is better when higher."""
    monkeypatch.setattr(maml_bench, "run", lambda *args, **kwargs: {
        "rounds": {"lowlearn": [lowlearn_s] * 3, "lowlearn batched": [lowlearn_s] * 3, "higher": [4.0] * 3},
        "seconds": {"lowlearn": lowlearn_s, "lowlearn batched": lowlearn_s, "higher": 4.0}, "peak_bytes": {}})
    maml_bench.main(["--device", "cpu"])
    lines = _goal_lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].endswith(f": {printed}")               # on a CPU the loop's goal only


def test_maml_run_gives_every_implementation_its_own_copy_of_one_model(monkeypatch):
    """Each implementation must start from the same weights in a model of its own (not one model that the
    first implementation's meta-steps move under the others)."""
    models = {}

    def make_step(name, model, tasks, steps, inner_lr):
        models[name] = model
        return lambda: None

    monkeypatch.setattr(maml_bench, "make_step", make_step)
    monkeypatch.setattr(maml_bench, "interleaved_rounds", one_round)
    maml_bench.run(tasks=2, queries=1, steps=1, iterations=1, repeats=1, device="cpu")
    assert len({id(m) for m in models.values()}) == len(maml_bench.IMPLEMENTATIONS)
    first, *others = models.values()
    for model in others:
        for a, b in zip(model.parameters(), first.parameters(), strict=True):
            assert a is not b and torch.equal(a, b)


# --- sparse ------------------------------------------------------------------------------------------------------

def test_sparse_run_times_each_variant_on_its_own_model(monkeypatch):
    """Outputs of the timed step functions against torch alone: 'csr' is the layer with its d·n² largest |w|
    kept, 'channels' has d·n outputs, 'low rank' is the best rank-(d·n/2) approximation (torch.linalg.svd)."""
    outputs = outputs_of_the_timed_steps(monkeypatch, sparse)
    n, d = 16, 0.25
    sparse.run(features=n, batch_size=3, densities=(d,), iterations=1, repeats=1, warmup=0, device="cpu",
               two_four_large=None)
    torch.manual_seed(0)
    layer = nn.Linear(n, n)
    x = torch.randn(3, n)
    w, b = layer.weight.detach(), layer.bias.detach()
    kept = torch.zeros(n * n, dtype=torch.bool)
    kept[w.abs().flatten().topk(int(d * n * n)).indices] = True
    assert torch.allclose(outputs["dense"], x @ w.T + b, atol=1e-5)
    assert torch.allclose(outputs["csr"], x @ (w * kept.view(n, n)).T + b, atol=1e-5)
    assert outputs["channels"].shape == (3, int(d * n))
    u, s, vh = torch.linalg.svd(w.double())
    r = int(d * n / 2)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    assert torch.allclose(outputs["low rank"].double(), x.double() @ best.T + b.double(), atol=1e-5)


def test_sparse_2_4_is_timed_against_the_dense_layer_in_fp16_on_the_same_batch(monkeypatch):
    """Reference: x.half() @ w.half().T + b.half(): the 2:4 row compares fp16 with fp16 (the module docstring:
    'against the dense layer in fp16'), not with the fp32 layer."""
    outputs = outputs_of_the_timed_steps(monkeypatch, sparse)
    monkeypatch.setattr(sparse, "semi_structured_unavailable", lambda layer: None)
    monkeypatch.setattr(sparse, "export", lambda model, format: model)
    monkeypatch.setattr(sparse, "SemiStructuredLinear", nn.Linear)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    (row,) = sparse._two_four(dense, x, 1, 1, 0, torch.device("cuda"))
    assert row["format"] == "2:4 (fp16)" and row["batch_size"] == 2 and row["features"] == 8
    w, b = dense[0].weight.detach().half(), dense[0].bias.detach().half()
    assert outputs["dense"].dtype == outputs["2:4 (fp16)"].dtype == torch.float16
    assert torch.allclose(outputs["dense"].float(), (x.half() @ w.T + b).float(), atol=1e-2)


# --- allocator ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not has_glibc(), reason="compares glibc's allocator settings")
def test_allocator_labels_each_setting_with_the_processes_that_ran_under_it(monkeypatch):
    """Canned workers: a process with freed memory retained reports 2 s, one with glibc's defaults 1 s; the
    results must carry each under its own label."""
    monkeypatch.setattr(alloc_bench, "in_new_process",
                        lambda model, retain, threads, **sizes: {"seconds": 2.0 if retain else 1.0,
                                                                  "faults": 0.0 if retain else 5.0})
    results = alloc_bench.run(rounds=2, batch_size=4, iterations=1, repeats=1, warmup=0)
    for model in alloc_bench.MODELS:
        assert results[model]["glibc defaults"] == {"seconds": 1.0, "faults": 5.0}
        assert results[model]["freed memory retained"] == {"seconds": 2.0, "faults": 0.0}


def test_allocator_worker_reports_time_and_faults_per_step(monkeypatch):
    """Hand count: a step that takes 0.5 s and faults 3 pages gives 0.5 s and 3 faults per step, over 2 blocks
    of 5 steps (the warm-up not counted)."""
    clock, faults = [0.0], [0]

    def step():
        clock[0] += 0.5
        faults[0] += 3

    monkeypatch.setattr(alloc_bench, "_step", lambda model, batch_size: step)
    monkeypatch.setattr(alloc_bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(alloc_bench.allocator, "minor_page_faults", lambda: faults[0])
    result = alloc_bench.worker("dense", retain=False, batch_size=4, iterations=5, repeats=2, warmup=4)
    assert result == {"seconds": 0.5, "faults": 3.0}


def test_maml_peak_memory_is_measured_after_the_optimizer_state_exists(monkeypatch):
    """Reference: cuda_peak_bytes' contract ('call it once the step's lazily created state exists'). Canned steps
    allocate 100 bytes of state on their first call and 10 bytes of temporaries on every call: the peak of each
    implementation must be 10, taken on a fresh step (not the one timed) after one call of its own."""
    made = []

    def make_step(name, model, tasks, steps, inner_lr):
        calls = []

        def step():
            calls.append(name)
            return (100 if len(calls) == 1 else 0) + 10

        made.append((name, calls))
        return step

    class Model(nn.Linear):
        def to(self, *args, **kwargs):                              # stays on the CPU
            return self

    monkeypatch.setattr(maml_bench, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(maml_bench, "Conv4", lambda *args, **kwargs: Model(1, 1))
    monkeypatch.setattr(maml_bench, "random_episodes", lambda *args, **kwargs: None)
    monkeypatch.setattr(maml_bench, "make_step", make_step)
    monkeypatch.setattr(maml_bench, "interleaved_rounds", one_round)
    monkeypatch.setattr(maml_bench, "cuda_peak_bytes", lambda step, device: step())
    result = maml_bench.run(tasks=2, iterations=1, repeats=1)
    assert result["peak_bytes"] == dict.fromkeys(maml_bench.IMPLEMENTATIONS, 10)
    assert len(made) == 2 * len(maml_bench.IMPLEMENTATIONS)   # a fresh set of steps for the memory
    assert all(calls == [] for _, calls in made[:len(maml_bench.IMPLEMENTATIONS)])   # the timed ones: never called


def test_sparse_2_4_availability_is_asked_of_the_pruned_fp16_layer(monkeypatch):
    """Reference: semi_structured_unavailable's own rules, minus the CUDA checks (fp16 weights, at most 2 of
    every 4 inputs nonzero). The layer _two_four asks about must be the 2:4-pruned fp16 copy, so that a row
    comes out; the dense fp16 layer is never 2:4 sparse."""
    asked = []

    def unavailable(layer):
        asked.append(layer.weight.detach().clone())
        weight = layer.weight.detach()
        if weight.dtype != torch.float16:
            return "fp16 needed"
        return "not 2:4" if bool((weight.reshape(weight.shape[0], -1, 4).ne(0).sum(-1) > 2).any()) else None

    monkeypatch.setattr(sparse, "semi_structured_unavailable", unavailable)
    monkeypatch.setattr(sparse, "export", lambda model, format: model)
    monkeypatch.setattr(sparse, "SemiStructuredLinear", nn.Linear)
    monkeypatch.setattr(sparse, "interleaved_rounds", one_round)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8)).eval()
    rows = sparse._two_four(dense, torch.randn(2, 8), 1, 1, 0, torch.device("cuda"))
    assert [row["format"] for row in rows] == ["2:4 (fp16)"]
    (weight,) = asked
    assert weight.dtype == torch.float16 and int(weight.ne(0).sum()) == 8 * 8 // 2


def test_the_csr_goal_is_not_held_at_another_batch_of_the_default_layer():
    """Reference: SIZE's docstring, the goal is held at (4096 features, batch 64): a batch of 128 on the
    4096-feature layer has no goal, in the report (sparse.goal) as in the goal line."""
    row = {"format": "csr", "density": sparse.CSR_GOAL_DENSITY, "features": 4096, "batch_size": 128}
    assert sparse.goal(row, torch.device("cpu")) is None
    assert sparse.goal(row | {"batch_size": 64}, torch.device("cpu")) == sparse.CSR_GOAL


def test_lowrank_refuses_a_rank_above_the_narrowest_width(monkeypatch, capsys):
    """Reference: a w x w layer has rank at most w, so the rank must fit the smallest of --widths, not only the
    largest. The benchmark must stop with a usage error before running anything."""
    monkeypatch.setattr(lowrank, "run", lambda *args, **kwargs: pytest.fail("ran with an impossible rank"))
    with pytest.raises(SystemExit) as exit_:
        lowrank.main(["--widths", "16", "64", "--rank", "32", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--rank 32 is above the width 16" in capsys.readouterr().err


def test_dst_describes_the_device_it_ran_on_not_the_default_one(monkeypatch, capsys):
    """Reference: the --device given. With the default device pretended to be 'meta', a run on --device cpu must
    print 'device cpu (' in its environment line."""
    monkeypatch.setattr(timing, "default_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dst, "run", lambda *args, **kwargs: {name: [1.0] for name in dst.METHODS})
    dst.main(["--device", "cpu"])
    header = capsys.readouterr().out.splitlines()[0]
    assert ", device cpu (" in header and "device meta" not in header


def test_faults_per_call_counts_each_step_from_its_own_start(monkeypatch):
    """Hand count: with a fault counter that step 'a' raises by 3 and step 'b' by 5 per call, 2 calls each give
    3 and 5 faults per call: each step's count starts where the previous step's ended, not at the first one's."""
    counter = [1000]

    def stepping(pages):
        def step():
            counter[0] += pages

        return step

    monkeypatch.setattr(timing.allocator, "minor_page_faults", lambda: counter[0])
    assert timing.faults_per_call({"a": stepping(3), "b": stepping(5), "c": stepping(0)}, 2) == {
        "a": 3.0, "b": 5.0, "c": 0.0}


def test_a_goal_line_adds_decimals_when_only_an_end_of_the_middle_half_would_print_as_the_goal():
    """Hand computation: 0.9996 prints as 1.000 at 3 decimals, beside a goal of 1 it does not reach; the line
    needs 4 decimals for every number, though the median 1.02 alone would need only 3."""
    assert timing.judged(Ratio(1.02, 0.9996, 1.05), 1.0) == (
        "1.0200 (middle half 0.9996-1.0500), unclear (the goal lies within the middle half)")
    assert timing.judged(Ratio(1.02, 1.01, 1.05), 1.0, higher_is_better=True) == "1.020 (middle half 1.010-1.050), met"


@pytest.mark.parametrize("name", ["masks", "dst", "powerprop", "allocator", "lowrank", "maml", "sparse", "all"])
def test_every_benchmark_but_the_cpu_only_allocator_takes_a_device(name, capsys):
    from lowlearn.bench.__main__ import BENCHMARKS

    assert set(BENCHMARKS) == {"masks", "dst", "powerprop", "allocator", "lowrank", "maml", "sparse", "all"}
    with pytest.raises(SystemExit):
        BENCHMARKS[name](["--help"])
    assert ("--device" in capsys.readouterr().out) == (name != "allocator")
