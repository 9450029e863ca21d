import pytest

from lowlearn.allocator import has_glibc
from lowlearn.bench import allocator as bench

pytestmark = pytest.mark.skipif(not has_glibc(), reason="compares glibc's allocator settings")


def test_each_model_trains_in_a_process_of_its_own_under_both_settings(capsys):
    bench.main(["--rounds", "1", "--batch-size", "4", "--iterations", "2", "--repeats", "1", "--warmup", "20"])
    out = capsys.readouterr().out
    for model in bench.MODELS:
        default_ms, default_faults, retained_ms, retained_faults, ratio = out.split(model)[1].split("\n")[0].split()
        assert float(default_ms) > 0 and float(retained_ms) > 0 and ratio.endswith("x")
        assert float(default_faults) >= 0 and float(retained_faults) >= 0   # tests/test_allocator.py checks the counts
    assert "glibc defaults: masks / dense" in out and "freed memory retained: masks / dense" in out


def test_a_worker_in_this_process_reports_time_and_faults():
    result = bench.worker("dense", retain=False, batch_size=4, iterations=2, repeats=1, warmup=1)
    assert result["seconds"] > 0 and result["faults"] >= 0


def test_every_model_runs_once_per_round_under_each_setting_in_alternating_order(monkeypatch):
    # Drifts of the machine must hit both settings, and every model, alike: "masks / dense" compares two processes.
    calls = []

    def in_new_process(model, retain, threads, **sizes):
        calls.append((model, retain))
        return {"seconds": 1.0, "faults": 0.0}

    monkeypatch.setattr(bench, "in_new_process", in_new_process)
    bench.run(rounds=2, batch_size=4, iterations=1, repeats=1, warmup=1)
    assert sorted(calls) == sorted((model, retain) for model in bench.MODELS for retain in (False, True)
                                   for _ in range(2))
    first, second = calls[:len(calls) // 2], calls[len(calls) // 2:]
    assert second == first[::-1]


def test_the_report_says_when_every_process_inherits_allocator_settings(monkeypatch, capsys):
    """The worker processes inherit the environment, so with MALLOC_* set the 'defaults' column is not glibc's own
    defaults: the report says so (and says nothing without them)."""
    fake = {model: {setting: {"seconds": 1.0, "faults": 0.0} for setting in bench.SETTINGS} for model in bench.MODELS}
    monkeypatch.setattr(bench, "run", lambda *args: fake)
    for name in list(bench.allocator.environment_settings()):
        monkeypatch.delenv(name)
    bench.main([])
    assert "inherits" not in capsys.readouterr().out
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    bench.main([])
    assert ("every process inherits this one's environment (glibc defaults, with MALLOC_MMAP_THRESHOLD_=33554432 from "
            "the environment)") in capsys.readouterr().out
