import math

import numpy as np
import pytest

from flatmin.optim._checks import check_choice, check_int, check_real


@pytest.mark.parametrize("value", [0, 0.05, 2, np.float32(0.5)])
def test_check_real_accepts_and_converts(value):
    result = check_real("rho", value, minimum=0.0)
    assert isinstance(result, float) and result == float(value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-0.1, ValueError),
        (True, TypeError),
        ("0.05", TypeError),
        (None, TypeError),
    ],
)
def test_check_real_refuses_with_name_expectation_and_value(value, error):
    with pytest.raises(error) as info:
        check_real("rho", value, minimum=0.0, hint="e.g. 0.05")
    message = str(info.value)
    assert message.startswith("rho must be a finite number >= 0.0 (e.g. 0.05), got ")
    assert message.endswith(repr(value))


def test_check_real_bounds_open_and_closed():
    assert check_real("beta", 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True) == 1.0
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0.0 and <= 1.0"):
        check_real("beta", 0.0, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    with pytest.raises(ValueError, match=r"< 1.0, got 1.0"):
        check_real("p", 1.0, maximum=1.0, exclusive_maximum=True)


def test_check_real_infinity_only_when_allowed():
    assert check_real("limit", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError, match="must be a number"):
        check_real("limit", math.nan, finite=False)


def test_check_int():
    assert check_int("k", np.int64(5), minimum=1) == 5
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 0"):
        check_int("k", 0, minimum=1)
    with pytest.raises(TypeError, match=r"k must be an integer >= 1, got 2.0"):
        check_int("k", 2.0, minimum=1)
    with pytest.raises(TypeError):
        check_int("k", True, minimum=0)


def test_check_choice_is_strict_about_bools():
    assert check_choice("adaptive", "all", (None, "weights", "all")) == "all"
    assert check_choice("adaptive", None, (None, "weights", "all")) is None
    with pytest.raises(
        ValueError, match=r"adaptive must be one of None, 'weights', 'all', got True"
    ):
        check_choice("adaptive", True, (None, "weights", "all"))
    with pytest.raises(ValueError):
        check_choice("flag", 1, (True, False))
    with pytest.raises(ValueError):
        check_choice("flag", 0, (False, None))
