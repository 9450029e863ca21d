import torch

from lowlearn.bench import dst
from lowlearn.sparse.mask import density


def test_every_method_trains_its_own_model():
    steps = dst.build_steps(density=0.2, batch_size=4, every=2, device=torch.device("cpu"))
    assert list(steps) == list(dst.METHODS)
    for step, _ in steps.values():
        for _ in range(3):
            step()
    models = {name: model for name, (_, model) in steps.items()}
    assert density(models["dense"]) == 1.0
    for name in dst.METHODS[1:]:
        assert abs(density(models[name]) - 0.2) < 0.01, name


def test_dst_benchmark_prints_ratios_to_dense_and_static(capsys):
    dst.main(["--every", "2", "--updates", "1", "--repeats", "1", "--batch-size", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    for name in dst.METHODS:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert line.count("x") == 2
    assert "goal: RigL / static" in out
