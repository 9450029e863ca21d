import copy

import torch

from lowlearn.bench import maml as bench
from lowlearn.bench.timing import medians
from lowlearn.data.episodes import random_episodes
from lowlearn.models import Conv4


def test_every_implementation_takes_the_same_meta_step():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=8, running_stats=False).double()
    tasks = random_episodes(2, 3, 1, 2, dtype=torch.float64)
    models = {name: copy.deepcopy(model) for name in bench.IMPLEMENTATIONS}
    for name, m in models.items():
        bench.make_step(name, m, tasks, steps=2, inner_lr=0.4)()
    for name in ("lowlearn", "lowlearn batched"):
        for a, b in zip(models[name].parameters(), models["higher"].parameters()):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_the_run_keeps_its_rounds():
    result = bench.run(tasks=2, queries=1, steps=1, iterations=1, repeats=2, device="cpu")
    assert all(len(seconds) == 2 for seconds in result["rounds"].values())
    assert set(result["rounds"]) == set(bench.IMPLEMENTATIONS)
    assert result["seconds"] == medians(result["rounds"]) and result["peak_bytes"] == {}


def test_maml_benchmark_prints_throughput(capsys):
    bench.main(["--tasks", "2", "--queries", "2", "--steps", "1", "--iterations", "1", "--repeats", "1",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("x") >= 3 and "lowlearn batched" in out
    goals = [line for line in out.splitlines() if line.startswith("goal: ")]
    assert len(goals) == 1 and goals[0].startswith("goal: lowlearn throughput >= 1x higher's on cpu at tasks = 32, "
                                                   "ways = 5, shots = 1, queries = 15, steps = 5: ")
    # A smaller workload says nothing about the goal's.
    assert goals[0].endswith(", not judged (this run: tasks = 2, queries = 2, steps = 1)")


def test_each_path_is_held_on_the_device_it_is_meant_for():
    assert bench.goals(torch.device("cuda")) == {"lowlearn batched": 3.0}
    assert bench.goals(torch.device("cpu")) == {"lowlearn": 1.0}
