import pytest
import torch

from lowlearn.bench import lowrank as bench
from lowlearn.bench.timing import Ratio
from lowlearn.lowrank import low_rank_layers


def test_dense_and_dlrt_networks():
    dense, _ = bench.build(64, None, torch.device("cpu"))
    model, dlrt = bench.build(64, 8, torch.device("cpu"))
    assert not low_rank_layers(dense)
    assert {name: layer.rank for name, layer in low_rank_layers(model).items()} == {"0": 8, "2": 8}
    assert dlrt.tol is None                                            # the fixed-rank integrator


def test_lowrank_benchmark_prints_ratios(capsys):
    bench.main(["--widths", "32", "64", "--rank", "4", "--iterations", "1", "--repeats", "1", "--batch-size", "8",
                "--device", "cpu"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith(("32 ", "64 "))]
    assert len(lines) == 2 and all(line.count("x") == 2 for line in lines)
    assert "middle half" in out
    # No width reached 1024, so the goal is not judged (an empty sweep once read "met").
    assert "goal: DLRT below dense time and memory from width 1024 at rank <= 64: not measured" in out


@pytest.mark.parametrize("time, dlrt_bytes, verdict", [
    (Ratio(0.8, 0.7, 0.9), 10, "met"), (Ratio(0.98, 0.95, 1.03), 10, "unclear (the goal lies within the middle half)"),
    (Ratio(0.8, 0.7, 0.9), 200, "not met"), (Ratio(1.2, 1.1, 1.3), 10, "not met")])
def test_the_goal_judges_each_wide_row_s_time_spread_and_memory(monkeypatch, capsys, time, dlrt_bytes, verdict):
    rows = [{"width": width, "time_ratio": time, "dense": {"seconds": 1.0, "bytes": 100, "cuda_peak": None},
             "dlrt": {"seconds": time.median, "bytes": dlrt_bytes, "cuda_peak": None}} for width in (1024, 2048)]
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: rows)
    bench.main(["--widths", "1024", "2048", "--device", "cpu"])
    assert capsys.readouterr().out.endswith(f"from width 1024 at rank <= 64: {verdict}\n")
