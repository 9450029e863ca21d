import math

import pytest
import torch

from lowlearn.meta.episodic import mean_and_ci


def test_mean_and_ci_uses_students_t_quantile():
    values = torch.tensor([1.0, 2.0, 6.0])
    mean, ci = mean_and_ci(values)
    s = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert mean == pytest.approx(3.0)
    assert ci == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6)      # t_{0.975, 2}
    many = torch.arange(10_000.0) % 7
    assert mean_and_ci(many)[1] == pytest.approx(1.96 * many.std().item() / 100, rel=1e-3)


def test_mean_and_ci_needs_two_values():
    with pytest.raises(ValueError, match="at least two"):
        mean_and_ci(torch.tensor([1.0]))
