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


def test_powerprop_benchmark_prints_ratios(capsys, judged_as_printed):
    bench.main(["--iterations", "2", "--repeats", "1", "--batch-size", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    for case in bench.CASES:
        line = next(line for line in out.splitlines() if line.startswith(case + " "))
        assert line.split()[-3].endswith("x")
    for case, base in bench.BASELINE.items():                       # each case judged on its own
        line = next(line for line in out.splitlines() if line.startswith(f"goal: {case} / {base} <= 1.15: "))
        judged_as_printed(line, 1.15)
