"""The shared checks: which values count as real numbers, integers and counts, and whether tensors are finite."""

import fractions
import math
import re

import numpy as np
import pytest
import torch

from lowlearn.checks import (all_finite, as_float, check_batch, check_count, check_flag, check_non_negative,
                             check_positive, check_rate, check_scalar_loss, is_integer, is_real)


@pytest.mark.parametrize("value", [0, -3, 2.5, float("inf"), np.int64(4), np.float32(0.5), fractions.Fraction(1, 3)])
def test_real_numbers_include_numpy_scalars(value):
    assert is_real(value)


@pytest.mark.parametrize("value", [True, False, "0.5", None, 1j, torch.tensor(0.5), np.array([0.5])])
def test_bools_strings_tensors_and_arrays_are_not_real_numbers(value):
    assert not is_real(value)


@pytest.mark.parametrize("value", [0, -3, np.int64(4), np.uint8(7)])
def test_integers_include_numpy_integers(value):
    assert is_integer(value)


@pytest.mark.parametrize("value", [True, 2.0, np.float64(2.0), "2", torch.tensor(2)])
def test_bools_floats_strings_and_tensors_are_not_integers(value):
    assert not is_integer(value)


def test_a_count_at_the_minimum_passes():
    check_count("shots", 1, 1)
    check_count("shots", np.int64(5), 1)


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "3"])
def test_a_count_below_the_minimum_or_not_an_integer_names_itself(value):
    with pytest.raises(ValueError, match=r"shots must be an int >= 1; got"):
        check_count("shots", value, 1)


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_a_flag_is_a_python_or_numpy_bool_and_comes_back_as_a_python_bool(value):
    assert check_flag("cosine", value) is bool(value)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True), np.array([True])])
def test_a_flag_of_another_type_names_itself_even_when_python_would_read_it_as_true_or_false(value):
    with pytest.raises(TypeError, match=r"cosine must be True or False, got"):
        check_flag("cosine", value)


def test_a_rate_must_be_a_positive_finite_number():
    assert check_rate("lr", np.float32(0.5)) == 0.5 and isinstance(check_rate("lr", 1), float)
    for bad in (0, -1e-3, float("nan"), float("inf"), True, "0.1", torch.tensor(0.1)):
        with pytest.raises(ValueError, match="lr must be a positive, finite step size"):
            check_rate("lr", bad)


def test_a_positive_number_must_be_finite_and_above_zero():
    assert check_positive("noise", np.float32(0.5)) == 0.5 and isinstance(check_positive("noise", 1), float)
    for bad in (0, -1e-3, float("nan"), float("inf"), 10**400, True, "0.1", torch.tensor(0.1)):
        with pytest.raises(ValueError, match="^noise must be a positive, finite number, got "):
            check_positive("noise", bad)


def test_a_non_negative_number_must_be_finite_and_at_least_zero():
    assert check_non_negative("eps", 0) == 0.0 and isinstance(check_non_negative("eps", 0), float)
    assert check_non_negative("eps", np.float32(0.5)) == 0.5 and check_non_negative("eps", 10**308) == 1e308
    for bad in (-1e-300, float("nan"), float("inf"), 10**400, True, "0.1", torch.tensor(0.1)):
        with pytest.raises(ValueError, match="^eps must be a finite number >= 0, got "):
            check_non_negative("eps", bad)


@pytest.mark.parametrize("value", [10**400, fractions.Fraction(10**400, 3), -(10**400), fractions.Fraction(1, 10**400)],
                         ids=["10**400", "10**400/3", "-10**400", "1/10**400"])
def test_a_rate_beyond_the_float_range_is_a_value_error_not_an_overflow_nor_a_zero(value):
    with pytest.raises(ValueError, match="lr must be a positive, finite step size"):
        check_rate("lr", value)
    assert check_rate("lr", 10**308) == 1e308 and check_rate("lr", fractions.Fraction(1, 3)) == 1 / 3


def test_as_float_maps_numbers_beyond_the_float_range_to_infinities_and_non_numbers_to_nan():
    assert as_float(10**400) == math.inf and as_float(-(10**400)) == -math.inf
    assert as_float(fractions.Fraction(1, 10**400)) == 0.0 and as_float(np.float16(0.5)) == 0.5
    assert all(math.isnan(as_float(bad)) for bad in (True, "1", torch.tensor(1.0), None))


@pytest.mark.parametrize("check", ["alpha", "density", "growth option", "result"])
def test_range_checks_refuse_numbers_beyond_the_float_range_with_a_value_error(check, tmp_path):
    from lowlearn.growth import GrowthSchedule
    from lowlearn.powerprop import check_alpha
    from lowlearn.results import record
    from lowlearn.sparse.prune import check_density
    call, bad = {"alpha": (check_alpha, 10**400),
                 "density": (check_density, fractions.Fraction(1, 10**400)),      # rounds to a density of 0.0
                 "growth option": (lambda v: GrowthSchedule(0, 1, 1, 2, "random", scale=v), 10**400),
                 "result": (lambda v: record("chapter", "key", v, directory=tmp_path), 10**400)}[check]
    with pytest.raises(ValueError, match="finite|in \\(0, 1\\]"):
        call(bad)
    assert not any(tmp_path.iterdir())


def test_one_batch_is_exactly_a_pair_of_tensors():
    """A triple (inputs, targets, weights) is refused, not cut to its first two: the weights would be dropped."""
    x, y, w = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.ones(4)
    for good in ((x, y), [x, y]):
        got = check_batch(good)
        assert isinstance(got, tuple) and len(got) == 2 and got[0] is x and got[1] is y
    for bad in ((x, y, w), [x, y, w], (x,)):
        with pytest.raises(TypeError, match=r"batch must be one batch, a pair \(inputs, targets\) of tensors"):
            check_batch(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_false_for_any_nan_or_infinity_in_any_tensor_and_true_otherwise(dtype):
    values = [torch.linspace(-3, 3, 12, dtype=dtype).view(3, 4), torch.ones(5, dtype=dtype)]
    assert all_finite(values).item() and all_finite(values).dim() == 0 and all_finite(values).dtype == torch.bool
    for bad in (float("nan"), float("inf"), float("-inf")):
        for which, where in ((0, (0, 0)), (0, (1, 2)), (0, (2, 3)), (1, (4,))):
            broken = [v.clone() for v in values]
            broken[which][where] = bad
            assert not all_finite(broken).item(), (bad, which, where)
            assert not all_finite(iter(broken)).item(), "a generator of tensors, as a dict's values()"
    assert all_finite([torch.full((2, 2), torch.finfo(dtype).max, dtype=dtype)]).item()


def test_all_finite_counts_empty_tensors_and_no_tensors_as_finite():
    assert all_finite([torch.zeros(0, 3), torch.ones(2)]).item()
    assert not all_finite([torch.zeros(0), torch.tensor([float("nan")])]).item()
    assert all_finite([torch.zeros(0, dtype=torch.float64)]).item()
    assert all_finite([]).item()
    assert all_finite([torch.zeros(0, device="meta")]).device.type == "meta"      # on the tensors' device too


@pytest.mark.parametrize("shape", [(1,), (3,), (1, 1)])
def test_a_loss_is_one_number_a_0_d_tensor_not_a_one_element_vector(shape):
    check_scalar_loss(torch.tensor(0.5))
    with pytest.raises(ValueError, match=rf"one number; it returned a tensor of shape {re.escape(str(shape))}"):
        check_scalar_loss(torch.ones(shape))
    with pytest.raises(TypeError, match="as a tensor"):
        check_scalar_loss(0.5)
