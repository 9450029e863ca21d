import pytest
import torch

from lowlearn.bench import masks, timing
from lowlearn.bench.__main__ import main as bench_main
from lowlearn.sparse.mask import prunable_layers


def test_the_sparse_models_compute_the_same_function_and_the_copy_the_dense_one():
    models = masks.build_models(density=0.2, device=torch.device("cpu"))
    x = torch.randn(5, 784)
    dense_out = models["dense"](x)
    assert torch.equal(models["dense (copy)"](x), dense_out)
    assert models["dense (copy)"][1].weight is not models["dense"][1].weight
    assert torch.allclose(models["lowlearn masks"](x), models["torch.nn.utils.prune"](x), atol=1e-6)
    assert torch.equal(models["lowlearn masks"](x), models["masked gradient"](x))
    assert not torch.allclose(models["lowlearn masks"](x), dense_out)


def test_the_masked_gradient_model_trains_as_lowlearn_masks_do_while_nothing_else_moves_its_zeros():
    models = masks.build_models(density=0.2, device=torch.device("cpu"))
    x, y = timing.fixed_batch(8, 784, torch.device("cpu"))
    for name in ("lowlearn masks", "masked gradient"):
        step = masks.train_step(models[name], x, y)
        for _ in range(5):
            step()
    pairs = zip(prunable_layers(models["lowlearn masks"]).values(), prunable_layers(models["masked gradient"]).values(),
                strict=True)
    for masked, hooked in pairs:
        assert torch.equal(masked.weight, hooked.weight)                 # the same bits: w ⊙ m is w here
        assert (hooked.weight.grad[masked.parametrizations.weight[0].mask == 0] == 0).all()
    assert not torch.equal(models["masked gradient"][1].weight, models["dense"][1].weight)     # it trained


def test_masks_benchmark_prints_a_ratio_and_the_page_faults_per_model(capsys, judged_as_printed):
    masks.main(["--iterations", "2", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "page faults/step" in out
    for name in ("dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient"):
        line = next(row for row in out.splitlines() if row.startswith(name))
        ratio, spread, faults = line.split()[-3:]
        low, high = map(float, spread.split("-"))
        assert ratio.endswith("x") and low <= high and (faults == "n/a" or float(faults) >= 0)
    assert "1.000x" in next(row for row in out.splitlines() if row.startswith("dense"))
    goal = next(row for row in out.splitlines() if row.startswith("goal: lowlearn masks / dense <= 1.10 at "))
    assert goal.startswith("goal: lowlearn masks / dense <= 1.10 at batch = 60, density = 0.1: ")
    judged_as_printed(goal, 1.10)


def test_the_goal_is_not_judged_at_another_batch_or_density(monkeypatch, capsys):
    names = ("dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient")
    monkeypatch.setattr(masks, "run", lambda *args, **kwargs: {"rounds": {name: [1.0] for name in names},
                                                               "seconds": dict.fromkeys(names, 1.0),
                                                               "faults": dict.fromkeys(names)})
    masks.main(["--batch-size", "4096", "--density", "0.5", "--device", "cpu"])   # a large batch hides the overhead
    goals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("goal: ")]
    assert len(goals) == 2
    assert all(line.endswith("not judged (this run: batch = 4096, density = 0.5)") for line in goals)


def test_graphed_models_are_measured_against_the_graphed_dense_model(monkeypatch, capsys):
    names = ("dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient")
    names += tuple(name + masks.GRAPH for name in names)
    times = dict.fromkeys(names, 1.0) | {"dense" + masks.GRAPH: 0.5, "lowlearn masks" + masks.GRAPH: 0.55}
    monkeypatch.setattr(masks, "run", lambda *args, **kwargs: {"rounds": {name: [times[name]] for name in names},
                                                               "seconds": times, "faults": dict.fromkeys(names)})
    masks.main(["--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert [masks.reference(name) for name in names] == ["dense"] * 5 + ["dense, CUDA graph"] * 5
    assert next(line for line in out if line.startswith("lowlearn masks, CUDA graph ")).split()[-3] == "1.100x"
    goals = [line.split(":")[1].strip() for line in out if line.startswith("goal: ")]
    assert goals == ["lowlearn masks / dense <= 1.10 at batch = 60, density = 0.1",
                     "lowlearn masks / torch.nn.utils.prune <= 1.00 at batch = 60, density = 0.1",
                     "lowlearn masks, CUDA graph / dense, CUDA graph <= 1.10 at batch = 60, density = 0.1",
                     "lowlearn masks, CUDA graph / torch.nn.utils.prune, CUDA graph <= 1.00 at batch = 60, "
                     "density = 0.1"]


def test_help_lists_the_benchmarks_and_exits_normally(capsys):
    bench_main(["--help"])
    assert "with NAME one of: masks, dst, powerprop" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error_that_names_it(capsys):
    try:
        bench_main(["nope"])
    except SystemExit as exit_:
        assert str(exit_.code).startswith("'nope' is not a benchmark\n") and "masks" in str(exit_.code)
    else:
        raise AssertionError("expected a usage error")


def test_run_gives_the_times_and_the_page_faults_of_the_same_steps():
    result = masks.run(batch_size=4, iterations=1, repeats=3, warmup=0, device="cpu")
    names = {"dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient"}
    assert set(result["rounds"]) == set(result["seconds"]) == set(result["faults"]) == names
    assert all(len(rounds) == 3 and min(rounds) > 0 for rounds in result["rounds"].values())
    assert result["seconds"] == timing.medians(result["rounds"])


def test_one_model_is_built_as_among_all_of_them_and_an_unknown_name_is_refused():
    models = masks.build_models(density=0.2, device=torch.device("cpu"))
    x = torch.randn(5, 784)
    for name in masks.MODELS:
        assert torch.equal(masks.build_model(name, 0.2, torch.device("cpu"))(x), models[name](x))
    with pytest.raises(ValueError, match="unknown model 'masked'; the models are: dense, dense \\(copy\\), "):
        masks.build_model("masked", 0.2, torch.device("cpu"))
