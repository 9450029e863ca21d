import mmap

import pytest
import torch

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
    with pytest.raises(ValueError):                                           # rounds that do not pair up
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


def test_cuda_peak_bytes_is_none_off_cuda_and_leaves_the_step_uncalled():
    calls = []
    assert timing.cuda_peak_bytes(lambda: calls.append(1), torch.device("cpu")) is None and not calls
