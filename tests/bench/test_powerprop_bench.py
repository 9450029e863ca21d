import pytest
import torch

from lowlearn.bench import powerprop as bench


def test_cases_start_from_the_same_function():
    steps = bench.build_steps(alpha=3.0, batch_size=4, device=torch.device("cpu"))
    assert list(steps) == list(bench.CASES)
    x = torch.randn(2, 784)
    outputs = [model(x) for _, model in steps.values()]
    for out in outputs[1:]:
        assert torch.allclose(out, outputs[0], atol=1e-5)
    for step, _ in steps.values():
        step()


def test_powerprop_benchmark_prints_ratios(monkeypatch, capsys, judged_as_printed):
    run = bench.run
    monkeypatch.setattr(bench, "run", lambda alpha, batch_size, *args: run(alpha, 4, *args))   # a small batch, quickly
    bench.main(["--iterations", "2", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    for case in bench.CASES:
        line = next(line for line in out.splitlines() if line.startswith(case + " "))
        assert line.split()[-3].endswith("x")
    for case, base in bench.BASELINE.items():                       # each case judged on its own
        line = next(line for line in out.splitlines()
                    if line.startswith(f"goal: {case} / {base} <= 1.15 at batch = 60, α > 1: "))
        judged_as_printed(line, 1.15)


@pytest.mark.parametrize("options, why", [(["--batch-size", "4"], "batch = 4"),
                                          (["--alpha", "1"], "α = 1, the baseline itself")])
def test_the_goal_is_not_judged_away_from_its_workload_nor_at_alpha_one(monkeypatch, capsys, options, why):
    # At α = 1 Powerprop is the identity, so the goal would be met by construction.
    monkeypatch.setattr(bench, "run", lambda *args: {"rounds": {case: [1.0] for case in bench.CASES},
                                                     "seconds": dict.fromkeys(bench.CASES, 1.0),
                                                     "faults": dict.fromkeys(bench.CASES)})
    bench.main([*options, "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("goal: ")]
    assert len(lines) == 2 and all(line.endswith(f"1.000 (middle half 1.000-1.000), not judged (this run: {why})")
                                   for line in lines)


def test_graphed_cases_are_judged_against_their_graphed_baselines(monkeypatch, capsys):
    cases = [*bench.CASES, *(case + bench.GRAPH for case in bench.CASES)]
    assert [bench.baseline(case) for case in cases[4:]] == [
        "SGD, CUDA graph", "SGD, CUDA graph", "Adam, CUDA graph", "Adam, CUDA graph"]
    monkeypatch.setattr(bench, "run", lambda *args: {"rounds": {case: [1.0] for case in cases},
                                                     "seconds": dict.fromkeys(cases, 1.0),
                                                     "faults": dict.fromkeys(cases)})
    bench.main(["--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("goal: ")]
    assert [line.split(" <= ")[0] for line in lines] == [
        "goal: Powerprop, SGD / SGD", "goal: Powerprop, optimiser-aware Adam / Adam",
        "goal: Powerprop, SGD, CUDA graph / SGD, CUDA graph",
        "goal: Powerprop, optimiser-aware Adam, CUDA graph / Adam, CUDA graph"]
