"""lowlearn.plot.mean_and_spread against its docstring and statistics (an independent reference)."""

import statistics

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lowlearn import plot  # noqa: E402


def test_mean_and_spread_equal_the_statistics_module_per_position():
    runs = [[0.91, 0.5, 3.0], [0.87, 0.25, -1.0], [0.95, 0.75, 2.5], [0.9, 0.5, 0.0]]
    mean, std = plot.mean_and_spread(runs)
    for i, column in enumerate(zip(*runs)):
        assert mean[i] == pytest.approx(statistics.fmean(column), rel=1e-15)
        assert std[i] == pytest.approx(statistics.stdev(column), rel=1e-12)
