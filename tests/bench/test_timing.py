import mmap
import subprocess

import pytest
import torch

import lowlearn
from lowlearn import allocator
from lowlearn.bench import timing


def test_faults_per_call_counts_the_pages_a_step_maps_afresh():
    if allocator.minor_page_faults() is None:
        pytest.skip("getrusage is not available")

    def touch_fresh_pages():
        fresh = mmap.mmap(-1, 64 * 2**20)           # anonymous pages from the system, whatever malloc keeps
        for offset in range(0, len(fresh), 4096):
            fresh[offset] = 1
        fresh.close()

    faults = timing.faults_per_call({"nothing": lambda: None, "64 MiB": touch_fresh_pages}, calls=2)
    assert faults["nothing"] < 1 and faults["64 MiB"] >= 32    # 16,384 pages of 4 KiB, or 32 of 2 MiB


def test_interleaved_rounds_time_every_step_alike_in_an_order_shuffled_per_round():
    def run(seed):
        calls = []
        steps = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        times = timing.interleaved_rounds(steps, device=torch.device("cpu"), iterations=3, repeats=12, warmup=2,
                                          seed=seed)
        return times, calls

    times, calls = run(seed=0)
    assert set(times) == set("abcd") and all(len(seconds) == 12 and min(seconds) >= 0 for seconds in times.values())
    assert calls[:8] == list("aabbccdd")                                      # the warm-up, in the given order
    rounds = ["".join(calls[8 + 12 * r:8 + 12 * (r + 1):3]) for r in range(12)]
    assert all(sorted(order) == list("abcd") for order in rounds)            # each step once per round ...
    assert all(calls[8 + 3 * i:8 + 3 * (i + 1)] == [calls[8 + 3 * i]] * 3 for i in range(48))   # ... in one block
    assert len(set(rounds)) > 1 and {order[0] for order in rounds} == set("abcd")             # places vary
    assert run(seed=0)[1] == calls and run(seed=1)[1] != calls                 # and follow the seed


def test_interleaved_medians_are_the_medians_of_the_rounds():
    steps = {"a": lambda: None, "b": lambda: sum(range(1000))}
    options = {"device": torch.device("cpu"), "iterations": 2, "repeats": 5, "warmup": 0}
    assert set(timing.interleaved_medians(steps, **options)) == {"a", "b"}
    assert timing.medians({"a": [3.0, 1.0, 2.0], "b": [4.0, 1.0, 2.0, 3.0]}) == {"a": 2.0, "b": 2.5}
    for bad, message in (({"iterations": 0}, "iterations must be an int >= 1"),
                         ({"repeats": 0}, "repeats must be an int >= 1"),
                         ({"warmup": -1}, "warmup must be an int >= 0")):
        with pytest.raises(ValueError, match=message):
            timing.interleaved_medians(steps, **{**options, **bad})


def test_paired_ratio_takes_each_round_s_ratio_then_their_median_and_quartiles():
    # Round r: case 10*(r+1) over reference 10, ratios 1..5 by hand; a slow round (the fourth)
    # slows both and keeps its ratio.
    rounds = {"case": [10.0, 20.0, 30.0, 80.0, 50.0], "reference": [10.0, 10.0, 10.0, 20.0, 10.0]}
    assert timing.paired_ratio(rounds, "case", "reference") == timing.Ratio(3.0, 2.0, 4.0)
    assert str(timing.Ratio(3.0, 2.0, 4.0)) == "3.000 (middle half 2.000-4.000)"        # as the goal lines print it
    assert timing.middle_half(1.234, 5.678) == "1.23-5.68"                              # as the tables print it
    assert timing.paired_ratio(rounds, "reference", "reference") == timing.Ratio(1.0, 1.0, 1.0)
    assert timing.paired_ratio({"a": [3.0], "b": [2.0]}, "a", "b") == timing.Ratio(1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="'a' has 2 rounds and 'b' 1"):          # rounds that do not pair up
        timing.paired_ratio({"a": [1.0, 2.0], "b": [1.0]}, "a", "b")


def test_a_goal_inside_the_middle_half_is_neither_met_nor_missed():
    assert timing.verdict(1.04, (1.00, 1.10), 1.05) == "unclear"
    assert timing.verdict(1.04, (1.00, 1.05), 1.05) == "yes"
    assert timing.verdict(1.16, (1.14, 1.19), 1.10) == "no"
    assert timing.verdict(3.48, (3.35, 3.52), 3.0, higher_is_better=True) == "yes"
    assert timing.verdict(3.1, (2.9, 3.2), 3.0, higher_is_better=True) == "unclear"
    assert timing.verdict(0.5, (0.4, 0.6), 1.0, higher_is_better=True) == "no"
    assert timing.verdict(0.15, None, 1.0) == "yes" and timing.verdict(1.2, None, 1.0) == "no"   # measured once
    assert timing.verdict(1.2, (1.1, 1.3), None) is None


def test_a_goal_line_gives_the_ratio_its_middle_half_and_the_verdict():
    assert timing.judged(timing.Ratio(1.16, 1.14, 1.19), 1.10) == "1.160 (middle half 1.140-1.190), not met"
    assert timing.judged(timing.Ratio(1.04, 1.00, 1.05), 1.05) == "1.040 (middle half 1.000-1.050), met"
    assert timing.judged(timing.Ratio(3.1, 2.9, 3.2), 3.0, higher_is_better=True).endswith(
        "unclear (the goal lies within the middle half)")


def test_a_goal_line_prints_the_decimals_that_tell_a_ratio_from_its_goal():
    # At three decimals 0.9996 would print as 1.000 beside ">= 1 ... not met".
    assert timing.judged(timing.Ratio(0.9996, 0.9995, 0.9998), 1.0, higher_is_better=True) == \
        "0.9996 (middle half 0.9995-0.9998), not met"
    assert timing.judged(timing.Ratio(1.10004, 1.09, 1.2), 1.10) == \
        "1.10004 (middle half 1.09000-1.20000), unclear (the goal lies within the middle half)"
    assert timing.decimals([1.0, 1.1], 1.0, 3) == 3                       # the goal itself prints as it is
    assert timing.decimals([1 + 1e-9], 1.0, 3) == 6                       # at most six


def test_a_goal_line_away_from_the_goals_workload_gives_no_verdict():
    settings = {"batch": (128, 60), "density": (0.1, 0.1), "ΔT": (2, 100)}
    assert timing.departures(settings) == ["batch = 128", "ΔT = 2"]
    assert timing.held_at(settings) == "batch = 60, density = 0.1, ΔT = 100"
    assert timing.judged(timing.Ratio(1.2, 1.1, 1.3), 1.5, not_held=timing.departures(settings)) == \
        "1.200 (middle half 1.100-1.300), not judged (this run: batch = 128, ΔT = 2)"
    assert timing.departures({"batch": (60, 60)}) == []


def test_cuda_peak_bytes_is_none_off_cuda_and_leaves_the_step_uncalled():
    calls = []
    assert timing.cuda_peak_bytes(lambda: calls.append(1), torch.device("cpu")) is None and not calls


def test_each_timed_block_is_synchronised_before_and_after_and_gives_seconds_per_call(monkeypatch):
    events, now = [], [0.0]

    def clock():
        events.append("clock")
        return now[0]

    def step(seconds):
        def run():
            events.append("step")
            now[0] += seconds
        return run

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(timing, "_sync", lambda device: events.append("sync"))
    times = timing.interleaved_rounds({"a": step(2.0), "b": step(3.0)}, device=torch.device("cpu"), iterations=4,
                                      repeats=3, warmup=0)
    assert times == {"a": [2.0] * 3, "b": [3.0] * 3}
    assert events == (["sync", "clock"] + ["step"] * 4 + ["sync", "clock"]) * 6


def test_the_device_is_synchronised_on_cuda_and_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(timing.torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    timing._sync(torch.device("cpu"))
    timing._sync(torch.device("cuda:1"))
    timing._sync(torch.device("mps"))
    assert calls == [("cuda", torch.device("cuda:1")), ("mps", None)]


def test_paired_ratio_pairs_the_rounds_and_takes_the_median_of_their_ratios():
    # ratios 1/3, 1, 3: the rounds are paired as timed, not sorted
    assert timing.paired_ratio({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, "a", "b") == timing.Ratio(1.0, 2 / 3, 2.0)
    # ratios 1, 2, 1: their median is 1, while the ratio of the medians would be 2
    assert timing.paired_ratio({"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 3.0]}, "a", "b") == timing.Ratio(1.0, 1.0, 1.5)


def test_a_goal_reached_exactly_is_met_in_both_directions():
    assert timing.verdict(3.1, (3.0, 3.2), 3.0, higher_is_better=True) == "yes"
    assert timing.verdict(1.0, (0.9, 1.0), 1.0) == "yes"
    assert timing.verdict(0.0, None, 0.0) == "yes"                           # a goal of 0 is still a goal
    assert timing.judged(timing.Ratio(3.48, 3.35, 3.52), 3.0, higher_is_better=True).endswith(", met")
    assert timing.judged(timing.Ratio(0.5, 0.4, 0.6), 1.0, higher_is_better=True).endswith(", not met")


def test_faults_per_call_divides_by_the_calls(monkeypatch):
    counter = [0]

    def fault(pages):
        def run():
            counter[0] += pages
        return run

    monkeypatch.setattr(allocator, "minor_page_faults", lambda: counter[0])
    assert timing.faults_per_call({"none": fault(0), "ten": fault(10)}, calls=4) == {"none": 0.0, "ten": 10.0}
    monkeypatch.setattr(allocator, "minor_page_faults", lambda: None)
    assert timing.faults_per_call({"ten": fault(10)}, calls=4) == {"ten": None}


def test_cuda_peak_bytes_is_the_peak_above_what_was_allocated_before(monkeypatch):
    events = []
    cuda = timing.torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 250)
    assert timing.cuda_peak_bytes(lambda: events.append("step"), torch.device("cuda")) == 150
    assert events == ["sync", "reset", "step", "sync"]


def test_fixed_batch_is_reproducible_and_draws_every_class():
    x, y = timing.fixed_batch(1000, 3, torch.device("cpu"), classes=10)
    assert x.shape == (1000, 3) and y.shape == (1000,)
    assert sorted(y.unique().tolist()) == list(range(10))
    again = timing.fixed_batch(1000, 3, torch.device("cpu"), classes=10)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, timing.fixed_batch(1000, 3, torch.device("cpu"), seed=2)[0])


def test_the_machine_description_names_the_given_device(monkeypatch):
    assert timing.resolve_device("meta") == torch.device("meta")
    monkeypatch.setattr(timing.torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    env = timing.machine("cuda")
    assert env["device"] == "cuda" and env["device_name"] == "Some GPU"
    assert timing.machine("cpu")["threads"] == torch.get_num_threads()
    line = timing.environment("cpu")
    env = timing.machine("cpu")                                   # the model and the commit, as the `all` report has
    assert line.startswith(f"device cpu ({env['device_name']}), lowlearn {env['lowlearn']}, torch ")
    assert f", {torch.get_num_threads()} CPU threads, allocator " in line


def test_the_cpu_name_is_the_model_name_line_of_cpuinfo(monkeypatch):
    class CpuInfo:
        def __init__(self, path):
            pass

        def read_text(self, **_):
            return "processor\t: 0\nmodel\t\t: 85\nmodel name\t: Some CPU @ 2.00GHz\nflags\t\t: fpu\n"

    monkeypatch.setattr(timing, "Path", CpuInfo)
    assert timing._cpu_name() == "Some CPU @ 2.00GHz"


def test_the_code_version_asks_git_only_in_a_source_checkout(monkeypatch, tmp_path):
    calls = []

    def git(args, **_):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="abc1234-dirty\n", stderr="")

    monkeypatch.setattr(timing.subprocess, "run", git)
    package = tmp_path / "lowlearn"
    package.mkdir()
    (tmp_path / ".git").mkdir()                            # an installed copy inside some git repository
    monkeypatch.setattr(timing.lowlearn, "__file__", str(package / "__init__.py"))
    assert timing._code_version() == lowlearn.__version__ and calls == []
    (tmp_path / "pyproject.toml").write_text("")            # a checkout of lowlearn
    assert timing._code_version() == f"{lowlearn.__version__} (abc1234-dirty)"
    assert calls[0][:3] == ["git", "-C", str(tmp_path)]


def test_timed_steps_gives_the_rounds_their_medians_and_the_faults_of_one_block_more(monkeypatch):
    calls = {"a": 0, "b": 0}

    def step(name):
        def run():
            calls[name] += 1
        return run

    steps = {"a": step("a"), "b": step("b")}
    timed = timing.timed_steps(steps, device=torch.device("cpu"), iterations=3, repeats=5, warmup=2)
    assert calls == {"a": 2 + 3 * 5 + 3, "b": 2 + 3 * 5 + 3}
    assert set(timed) == {"rounds", "seconds", "faults"}
    assert all(len(rounds) == 5 for rounds in timed["rounds"].values())
    assert timed["seconds"] == timing.medians(timed["rounds"])
    assert set(timed["faults"]) == {"a", "b"}


def test_print_steps_prints_each_ratio_against_the_reference_it_is_given(capsys):
    timed = {"rounds": {"base": [1.0, 1.0, 1.0], "long name of a case": [1.0, 1.5, 2.0], "other": [3.0, 3.0, 3.0]},
             "seconds": {"base": 1.0, "long name of a case": 1.5, "other": 3.0},
             "faults": {"base": 0.0, "long name of a case": 2.5, "other": None}}
    timing.print_steps(timed, lambda name: "other" if name == "other" else "base", "case", "vs base")
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["case", "ms/step", "vs", "base", "middle", "half", "page", "faults/step"]
    assert [row.split() for row in rows] == [["base", "1000.000", "1.000x", "1.000-1.000", "0.0"],
                                             ["long", "name", "of", "a", "case", "1500.000", "1.500x", "1.250-1.750",
                                              "2.5"],
                                             ["other", "3000.000", "1.000x", "1.000-1.000", "n/a"]]
    assert len({len(line) for line in [header, *rows]}) == 1                # the columns line up


def test_cuda_graphs_are_refused_off_cuda_before_the_step_runs():
    calls = []
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        timing.cuda_graphed(lambda: calls.append(1), torch.device("cpu"))
    assert calls == []
