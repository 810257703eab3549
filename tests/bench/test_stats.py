import math

import pytest

from flatmin.bench.stats import (
    median,
    paired_difference,
    regularized_incomplete_beta,
    summarize,
    t_cdf,
    t_quantile,
)

# Two-sided 95 % critical values t_{0.975, ν} from printed t tables.
T_TABLE_975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}


@pytest.mark.parametrize(("df", "expected"), sorted(T_TABLE_975.items()))
def test_t_quantile_matches_printed_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-7)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-7)


def test_t_with_one_degree_of_freedom_is_cauchy():
    # Student's t with ν = 1 is the standard Cauchy: F(t) = ½ + arctan(t)/π.
    for t in (-30.0, -2.0, -0.3, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    for p in (0.6, 0.9, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8)


def test_t_with_two_degrees_of_freedom_closed_form():
    # ν = 2: F(t) = ½ + t / (2·√(2 + t²)).
    for t in (-4.0, -0.5, 1.0, 3.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959963985, abs=1e-5)


def test_incomplete_beta_closed_forms():
    # I_x(1, b) = 1 − (1 − x)^b and I_x(a, 1) = x^a.
    for x in (0.05, 0.3, 0.8, 0.99):
        assert regularized_incomplete_beta(1.0, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5)
        assert regularized_incomplete_beta(2.5, 1.0, x) == pytest.approx(x**2.5)


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 5, 7.5, 50):
        for p in (0.8, 0.95, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_summarize_hand_computed():
    s = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    # mean 5, sum of squares 32, sample variance 32/7
    assert (s.mean, s.n) == (5.0, 8)
    assert s.std == pytest.approx(math.sqrt(32 / 7))
    assert summarize([3.0]).std == 0.0
    assert s.format(scale=10, digits=1) == f"50.0 ± {10 * math.sqrt(32 / 7):.1f}"


def test_paired_difference_hand_computed():
    # d = [1, 2, 3]: mean 2, s_d = 1, half width t_{0.975,2}·1/√3.
    d = paired_difference([1.5, 2.5, 3.5], [0.5, 0.5, 0.5])
    half = 4.302652730 / math.sqrt(3)
    assert (d.mean, d.std, d.n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert d.low == pytest.approx(2.0 - half, abs=1e-7)
    assert d.high == pytest.approx(2.0 + half, abs=1e-7)
    assert not d.excludes_zero  # 2 − 2.484 < 0: three pairs are too few here


def test_pairing_removes_shared_seed_variation():
    base = [0.60, 0.70, 0.80, 0.65, 0.75]
    better = [b + 0.01 for b in base]  # same seeds, a constant gain of 1 point
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.01)
    assert d.high - d.low == pytest.approx(0.0, abs=1e-12)
    assert d.excludes_zero


def test_interval_that_straddles_zero():
    d = paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert d.mean == 0.0
    assert not d.excludes_zero


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: paired_difference([1.0, 2.0], [1.0]), "equal lengths"),
        (lambda: paired_difference([1.0], [2.0]), "at least 2"),
        (lambda: paired_difference([1.0, 2.0], [1.0, math.nan]), "finite"),
        (lambda: paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0), "confidence"),
        (lambda: summarize([]), "at least 1"),
        (lambda: t_quantile(1.0, 3), "p must be"),
        (lambda: t_quantile(0.9, 0), "df \\(degrees of freedom\\) must be a finite number > 0.0"),
        (lambda: regularized_incomplete_beta(1.0, 1.0, 1.5), "x must be"),
    ],
)
def test_bad_input_is_rejected_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
