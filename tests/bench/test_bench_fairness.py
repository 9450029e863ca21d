"""lowlearn.bench: the compared cases do the same work, and ratios point the right way.

Each test checks the benchmarks against a reference that does not come from the code under test: a
hand-written SGD-with-momentum step, torch.nn.utils.prune (the peer), Powerprop's identity at α = 1,
hand counts of mask updates, a top-k / row-norm / truncated-SVD computed with torch alone, and
canned times whose ratios are worked out by hand.
"""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.bench import dst, masks, powerprop, report, sparse, timing
from lowlearn.bench import maml as maml_bench
from lowlearn.bench.timing import Ratio
from lowlearn.sparse.dst import DynamicSparsity
from lowlearn.sparse.mask import prunable_layers
from lowlearn.sparse.topkast import TopKAST

CPU = torch.device("cpu")


def test_the_warm_up_ends_before_the_first_synchronised_clock_read(monkeypatch):
    """Hand-written event trace: every warm-up call (first-call caches, lazy optimizer state) precedes the
    first sync and clock read, so none of it lands in one case's timed block (the existing trace test has
    warmup=0)."""
    events, now = [], [0.0]

    def clock():
        events.append("clock")
        return now[0]

    def step(name, seconds):
        def run():
            events.append(name)
            now[0] += seconds
        return run

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(timing, "_sync", lambda device: events.append("sync"))
    times = timing.interleaved_rounds({"a": step("a", 1.0), "b": step("b", 5.0)}, device=CPU, iterations=2,
                                      repeats=2, warmup=3)
    assert events[:6] == ["a"] * 3 + ["b"] * 3 and events[6] == "sync"
    assert times == {"a": [1.0, 1.0], "b": [5.0, 5.0]}                   # warm-up time counted nowhere


def _effective_weights(model):
    """w ⊙ m now (torch.nn.utils.prune refreshes its ``.weight`` only in the next forward pass)."""
    return [(layer.weight_orig * layer.weight_mask if hasattr(layer, "weight_orig") else layer.weight).detach()
            for layer in prunable_layers(model).values()]


def test_masks_all_five_models_take_the_same_sgd_with_momentum_step_on_the_same_batch():
    """Reference: a hand-written SGD step (lr 0.01, momentum 0.9: b ← 0.9 b + g, w ← w − 0.01 b) on the
    masked effective weights, and torch.nn.utils.prune, the peer: the compared models do the same work."""
    models = masks.build_models(density=0.3, device=CPU)
    x, y = timing.fixed_batch(8, 784, CPU)
    for model in models.values():
        step = masks.train_step(model, x, y)
        for _ in range(3):
            step()
    # Hand-written reference in float64: the gradient of the loss at w ⊙ m w.r.t. (w, b), momentum by hand.
    start = masks.build_models(density=0.3, device=CPU)
    layers = prunable_layers(start["lowlearn masks"])
    keep = {name: layer.parametrizations.weight[0].mask.double() for name, layer in layers.items()}
    ref = start["dense"].double()
    state = {k: v.detach().clone() for k, v in ref.named_parameters()}
    buffers = {}
    for _ in range(3):
        params = {k: v.requires_grad_(True) for k, v in state.items()}
        used = {k: v * keep[k.rsplit(".", 1)[0]] if k.endswith("weight") else v for k, v in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(ref, used, (x.double(),)), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for k, g in grads.items():
            buffers[k] = g if k not in buffers else 0.9 * buffers[k] + g
            state[k] = (params[k] - 0.01 * buffers[k]).detach()
    raw = [state[f"{name}.weight"] for name in layers]
    keep = list(keep.values())
    expected = [w * m.double() for w, m in zip(raw, keep, strict=True)]
    for name in ("lowlearn masks", "torch.nn.utils.prune", "masked gradient"):
        for got, want in zip(_effective_weights(models[name]), expected, strict=True):
            assert torch.allclose(got.double(), want, atol=1e-6), name
    for a, b in zip(models["dense"].parameters(), models["dense (copy)"].parameters(), strict=True):
        assert torch.equal(a, b)                                          # the noise row: the same computation


def test_powerprop_at_alpha_one_each_case_trains_exactly_as_its_baseline():
    """Reference: Powerprop with α = 1 is the identity (θ = φ|φ|⁰ = φ), so each case must follow its own
    baseline step for step: same batch, same optimizer, same learning rate; the ratio compares like with like."""
    steps = powerprop.build_steps(alpha=1.0, batch_size=8, device=CPU)
    for _ in range(4):
        for step, _ in steps.values():
            step()
    probe = torch.randn(3, 784, generator=torch.Generator().manual_seed(5))
    for case, base in powerprop.BASELINE.items():
        assert torch.allclose(steps[case][1](probe), steps[base][1](probe), atol=1e-5), case


def test_dst_static_at_full_density_trains_exactly_as_dense(monkeypatch):
    """Reference: a static mask of density 1 keeps every weight, so the static model must follow the dense
    one step for step: the 'static vs dense' and 'X vs static' ratios share one optimizer, batch and init."""
    monkeypatch.setattr(dst, "METHODS", ("dense", "static"))
    steps = dst.build_steps(density=1.0, batch_size=8, every=2, device=CPU)
    for _ in range(4):
        for step, _ in steps.values():
            step()
    probe = torch.randn(3, 784, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(steps["static"][1](probe), steps["dense"][1](probe), atol=1e-6)


def test_each_timed_dst_block_of_updates_times_every_steps_holds_that_many_mask_updates_at_alpha():
    """Hand count: after the warm-up of ΔT steps, every block of ``updates·ΔT`` steps contains exactly
    ``updates`` mask updates for each dynamic method (the amortised cost the table claims), each at the drop
    fraction α = 0.3 (no cosine decay), and static sparse training none."""
    every, updates = 3, 2
    steps = dst.build_steps(density=0.2, batch_size=4, every=every, device=CPU)
    counts = {}
    for name, (step, _) in steps.items():
        sparsifier = step.__defaults__[2]
        counts[name] = []
        if isinstance(sparsifier, TopKAST):
            refresh = sparsifier.refresh
            sparsifier.refresh = lambda refresh=refresh, log=counts[name]: (log.append(None), refresh())[1]
        elif isinstance(sparsifier, DynamicSparsity) and name != "static":
            update = sparsifier.update
            sparsifier.update = lambda fraction, update=update, log=counts[name]: (log.append(fraction),
                                                                                   update(fraction))[1]
    for step, _ in steps.values():                                         # interleaved_rounds' warm-up
        for _ in range(every):
            step()
    for name, (step, _) in steps.items():
        for block in range(3):
            before = len(counts[name])
            for _ in range(updates * every):
                step()
            made = counts[name][before:]
            assert len(made) == (0 if name in ("dense", "static") else updates), (name, block)
            assert all(f is None or f == pytest.approx(0.3, abs=1e-9) for f in made), name


def test_sparse_variants_compute_what_their_rows_are_labelled():
    """Reference computed with torch alone: CSR = the layer with its d·n² largest |w| kept; channels = the
    dense outputs of the d·n rows of largest L1 norm; low rank = the best rank-r approximation
    (Eckart–Young, torch.linalg.svd) with r = d·n/2 and the same bias."""
    torch.manual_seed(0)
    n, density = 32, 0.25
    dense = nn.Sequential(nn.Linear(n, n)).eval()
    w, b = dense[0].weight.detach(), dense[0].bias.detach()
    x = torch.randn(5, n)
    variants = sparse._variants(dense, density)
    with torch.no_grad():
        kept = torch.zeros(n * n, dtype=torch.bool)
        kept[w.abs().flatten().topk(int(density * n * n)).indices] = True
        expected_csr = x @ (w * kept.view(n, n)).T + b
        assert torch.allclose(variants["csr"][0](x), expected_csr, atol=1e-5)
        rows = w.abs().sum(1).topk(int(density * n)).indices.sort().values
        assert torch.allclose(variants["channels"][0](x), (x @ w.T + b)[:, rows], atol=1e-5)
        rank = round(density * n / 2)
        u, s, vh = torch.linalg.svd(w.double())
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose(variants["low rank"][0](x).double(), x.double() @ best.T + b.double(), atol=1e-5)
    assert variants["csr"][1] == variants["channels"][1] == variants["low rank"][1] == 1 / density


def test_the_report_puts_every_ratio_the_right_way_round(monkeypatch):
    """Canned times, ratios worked out by hand: a time ratio is case / reference, a throughput or speed-up is
    reference time / case time, memory is DLRT / dense and the allocator's retained / defaults."""
    monkeypatch.setattr(report.masks, "run", lambda **_: {"rounds": {
        "dense": [2.0, 2.0], "dense (copy)": [2.0, 2.0], "lowlearn masks": [2.4, 2.4],
        "torch.nn.utils.prune": [3.0, 3.0]}})
    monkeypatch.setattr(report.dst, "run", lambda **_: {name: [1.0 + i, 1.0 + i]
                                                         for i, name in enumerate(report.dst.METHODS)})
    monkeypatch.setattr(report.powerprop, "run", lambda **_: {"rounds": {
        "SGD": [1.0, 1.0], "Powerprop, SGD": [1.5, 1.5], "Adam": [2.0, 2.0],
        "Powerprop, optimiser-aware Adam": [3.0, 3.0]}})
    monkeypatch.setattr(report, "has_glibc", lambda: True)
    monkeypatch.setattr(report.allocator, "run", lambda **_: {model: {
        "glibc defaults": {"seconds": 4.0, "faults": 0.0}, "freed memory retained": {"seconds": 3.0, "faults": 0.0}}
        for model in report.allocator.MODELS})
    monkeypatch.setattr(report.lowrank, "run", lambda **_: [{"width": 1024, "rank": 32, "batch_size": 128,
                                                             "time_ratio": Ratio(0.5, 0.5, 0.5),
                                                             "dlrt": {"bytes": 25}, "dense": {"bytes": 100}}])
    monkeypatch.setattr(report.maml, "run", lambda **_: {"rounds": {
        "higher": [6.0, 6.0], "lowlearn": [3.0, 3.0], "lowlearn batched": [2.0, 2.0]}, "peak_bytes": {}})
    monkeypatch.setattr(report.sparse, "run", lambda **_: [{
        "format": "csr", "density": 0.05, "features": 4096, "batch_size": 64, "ideal_speedup": 20.0, "speedup": 4.0,
        "spread": [3.5, 4.5]}])
    rows = {(row["benchmark"], row["case"], row["reference"], row["metric"]): row
            for row in report.collect(report.FULL, CPU)}
    assert rows["masks", "lowlearn masks", "dense", "time per step"]["ratio"] == pytest.approx(1.2)
    assert rows["masks", "lowlearn masks", "torch.nn.utils.prune", "time per step"]["ratio"] == pytest.approx(0.8)
    assert rows["dst", "RigL", "static", "time per step"]["ratio"] == pytest.approx(4.0 / 2.0)
    assert rows["dst", "static", "dense", "time per step"]["ratio"] == pytest.approx(2.0)
    assert rows["powerprop", "Powerprop, optimiser-aware Adam", "Adam", "time per step"]["ratio"] == 1.5
    assert rows["allocator", "dense, freed memory retained", "dense, glibc defaults",
                "time per step"]["ratio"] == 0.75
    assert rows["lowrank", "DLRT, width 1024", "dense", "training memory"]["ratio"] == 0.25
    assert rows["maml", "lowlearn MAML", "higher", "throughput"]["ratio"] == 2.0
    assert rows["maml", "lowlearn MAML, all tasks at once", "higher", "throughput"]["ratio"] == 3.0
    csr = rows["sparse", "csr, density 0.05", "dense", "speed-up"]
    assert csr["ratio"] == 4.0 and csr["met"] == "yes" and csr["goal"] == ">= 3"
    assert rows["masks", "lowlearn masks", "dense", "time per step"]["met"] == "no"    # 1.2 > 1.10


def test_the_maml_table_prints_tasks_per_second_and_higher_time_over_lowlearn_time(monkeypatch, capsys):
    """Canned rounds, by hand: 8 tasks in 2 s is 4 tasks/s; higher at 4 s is 2x slower than lowlearn."""
    monkeypatch.setattr(maml_bench, "run", lambda *args, **kwargs: {
        "rounds": {"lowlearn": [2.0], "lowlearn batched": [1.0], "higher": [4.0]},
        "seconds": {"lowlearn": 2.0, "lowlearn batched": 1.0, "higher": 4.0}, "peak_bytes": {}})
    maml_bench.main(["--tasks", "8", "--device", "cpu"])
    lines = {line.split()[0] + (" batched" if "batched" in line else ""): line.split()
             for line in capsys.readouterr().out.splitlines() if line.startswith(("lowlearn", "higher"))}
    assert lines["lowlearn"][1:3] == ["4.00", "2.00x"]
    assert lines["lowlearn batched"][2:4] == ["8.00", "4.00x"]
    assert lines["higher"][1:3] == ["2.00", "1.00x"]
