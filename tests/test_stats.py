import math

import numpy as np
import pytest
import torch

from lowlearn.stats import curve_mean_and_ci, mean_and_ci, summarize


def test_mean_and_ci_uses_students_t_quantile():
    values = torch.tensor([1.0, 2.0, 6.0])
    mean, ci = mean_and_ci(values)
    s = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert mean == pytest.approx(3.0)
    assert ci == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6)      # t_{0.975, 2}
    many = torch.arange(10_000.0) % 7
    assert mean_and_ci(many)[1] == pytest.approx(1.96 * many.std().item() / 100, rel=1e-3)


def test_mean_and_ci_takes_lists_arrays_and_tensors_alike():
    values = [0.25, 0.5, 1.0, 0.125]
    expected = mean_and_ci(torch.tensor(values, dtype=torch.float64))
    assert mean_and_ci(values) == expected
    assert mean_and_ci(np.array(values, dtype=np.float32)) == pytest.approx(expected, rel=1e-7)
    assert mean_and_ci(np.array(values).reshape(2, 2)) == expected          # flattened
    assert mean_and_ci(torch.tensor(values, dtype=torch.bfloat16)) == expected  # these are exact in bfloat16
    assert mean_and_ci([torch.tensor(v, requires_grad=True) for v in values]) == expected


def test_mean_and_ci_needs_two_values():
    with pytest.raises(ValueError, match="at least two values, got 1"):
        mean_and_ci(torch.tensor([1.0]))


def test_non_finite_values_are_refused_where_they_enter():
    for bad in ([1.0, float("nan")], torch.tensor([1.0, float("inf")]), np.array([float("-inf"), 2.0])):
        for summary in (mean_and_ci, summarize):
            with pytest.raises(ValueError, match="1 that are not finite"):
                summary(bad)
    with pytest.raises(ValueError, match="not finite"):
        curve_mean_and_ci([[1.0, 2.0], [float("nan"), 3.0]])


def test_summarize_scales_and_gives_no_interval_for_one_value():
    mean, ci = summarize([0.9, 0.95, 0.92], scale=100)
    assert (mean, ci) == pytest.approx(mean_and_ci([90.0, 95.0, 92.0]))
    assert summarize([0.9], scale=100) == (pytest.approx(90.0), None)
    assert summarize(torch.tensor([[0.5]])) == (0.5, None)
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])


def test_curve_mean_and_ci_is_mean_and_ci_at_every_point():
    runs = np.array([[1.0, 10.0, 0.5], [2.0, 14.0, 0.5], [4.0, 9.0, 0.75]])
    mean, half = curve_mean_and_ci(runs)
    for point in range(3):
        assert (mean[point], half[point]) == pytest.approx(mean_and_ci(runs[:, point]), rel=1e-12)
    assert half[0] == pytest.approx(4.303 * np.std(runs[:, 0], ddof=1) / np.sqrt(3), rel=1e-3)
    with pytest.raises(ValueError, match="at least two"):
        curve_mean_and_ci(runs[:1])
    with pytest.raises(ValueError, match="runs, points"):
        curve_mean_and_ci(runs[0])


def test_a_single_value_that_is_not_finite_is_refused():
    for bad in ([float("nan")], torch.tensor([float("inf")])):
        with pytest.raises(ValueError, match="1 that are not finite"):
            summarize(bad)


def test_values_that_require_grad_and_empty_tensors_in_a_list():
    values = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    assert mean_and_ci(values) == mean_and_ci([1.0, 2.0, 6.0])
    with pytest.raises(ValueError, match=r"different shapes \(\[\(0,\), \(1,\)\]\)"):
        summarize([torch.tensor([]), torch.tensor([1.0])])


def test_a_list_of_tensors_is_flattened_as_a_list_of_arrays_is():
    """Reference: the same numbers as one flat list. A list of equal-shaped tensors (per-seed curves, say) and
    the same list of NumPy arrays give one summary; parts of different shapes are an error, not a guess."""
    flat = [0.5, 0.75, 0.25, 1.0]
    parts = [[0.5, 0.75], [0.25, 1.0]]
    for summary in (mean_and_ci, summarize):
        expected = summary(flat)
        assert summary([torch.tensor(p, dtype=torch.bfloat16) for p in parts]) == expected   # exact in bfloat16
        assert summary([np.array(p) for p in parts]) == expected
        assert summary(tuple(torch.tensor(p, requires_grad=True) for p in parts)) == expected
    for ragged, shapes in (([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], r"\(1,\), \(2,\)"),
                           ([np.ones(2), 3.0], r"\(\), \(2,\)")):
        with pytest.raises(ValueError, match=f"different shapes \\(\\[{shapes}\\]\\)"):
            summarize(ragged)


def test_large_values_are_summarised_in_float64():
    s = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)         # of the offsets 1, 2, 4
    for big in (1e7, 1e8):
        values = [big + 1, big + 2, big + 4]        # float32 rounds 10**8 + 1, and the sum 3·10**7 + 7
        mean, half = mean_and_ci(values)
        assert mean == pytest.approx(big + 7 / 3, rel=1e-13) and half == pytest.approx(4.302653 * s / math.sqrt(3))
    runs = torch.tensor([1e7 + 1, 1e7 + 2, 1e7 + 4], dtype=torch.float32)[:, None]      # exact in float32
    mean, half = curve_mean_and_ci(runs)
    assert mean[0] == pytest.approx(1e7 + 7 / 3, rel=1e-13) and half[0] == pytest.approx(4.302653 * s / math.sqrt(3))


def test_a_float64_tensor_is_summarised_in_float64():
    """Reference: hand computation in float64. A float64 tensor of accuracies near 1e8 (or a per-episode
    float64 tensor) must not be rounded to float32 on the way: 1e8 + 1 is not a float32, so the
    mean 1e8 + 7/3 and the half-width t(0.975, 2)·s/√3 of the offsets 1, 2, 4 would be lost."""
    s = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    values = torch.tensor([1e8 + 1, 1e8 + 2, 1e8 + 4], dtype=torch.float64)
    for summary in (mean_and_ci, summarize):
        mean, half = summary(values)
        assert mean == pytest.approx(1e8 + 7 / 3, rel=1e-13), summary.__name__
        assert half == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6), summary.__name__


def test_curve_mean_and_ci_takes_runs_that_require_grad():
    """Curves stacked from tensors that still require grad (losses, accuracies computed in a graph) give the
    same band as their plain values, as mean_and_ci does for one point."""
    runs = [[1.0, 2.0, 3.0], [2.0, 2.5, 5.0], [6.0, 3.0, 4.0]]
    mean, half = curve_mean_and_ci(torch.tensor(runs, requires_grad=True))
    expected_mean, expected_half = curve_mean_and_ci(runs)
    assert isinstance(mean, np.ndarray) and isinstance(half, np.ndarray)
    assert np.array_equal(mean, expected_mean) and np.array_equal(half, expected_half)


@pytest.mark.parametrize("as_curve", [lambda r: torch.tensor(r, dtype=torch.bfloat16),
                                      lambda r: torch.tensor(r, requires_grad=True), np.array],
                         ids=["bfloat16", "requires grad", "arrays"])
def test_curve_mean_and_ci_takes_a_list_of_one_curve_per_run(as_curve):
    # A list of bfloat16 or grad-requiring tensors failed in NumPy, where mean_and_ci and plot.mean_and_spread take it.
    runs = [[1.0, 2.0, 3.0], [2.0, 2.5, 5.0], [6.0, 3.0, 4.0]]              # exact in bfloat16
    mean, half = curve_mean_and_ci([as_curve(run) for run in runs])
    expected_mean, expected_half = curve_mean_and_ci(runs)
    assert np.array_equal(mean, expected_mean) and np.array_equal(half, expected_half)
