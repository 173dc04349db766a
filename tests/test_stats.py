"""The statistics behind seed comparisons and answer accuracy, against published tables."""

from __future__ import annotations

import math
import statistics

import pytest

from mode_cli.eval import stats

# Two-sided 95% critical values of Student's t (any statistics textbook's table).
T_975 = {
    1: 12.7062,
    2: 4.3027,
    3: 3.1824,
    4: 2.7764,
    5: 2.5706,
    9: 2.2622,
    10: 2.2281,
    20: 2.0860,
    30: 2.0423,
    120: 1.9799,
}


@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-5)


def test_t_quantile_elsewhere_and_its_limits():
    assert stats.t_quantile(0.995, 5) == pytest.approx(4.0321, abs=5e-5)
    assert stats.t_quantile(0.95, 2) == pytest.approx(2.9200, abs=5e-5)
    assert stats.t_quantile(0.025, 3) == pytest.approx(-3.1824, abs=5e-5)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=5e-5)
    assert stats.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    # The CDF is the quantile's inverse; at df=1 it is the Cauchy distribution's.
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)
    assert stats.t_cdf(stats.t_quantile(0.9, 4), 4) == pytest.approx(0.9, abs=1e-10)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_mean_std_is_the_sample_standard_deviation():
    values = [1.0, 2.5, 4.0, 3.5]
    mean, std = stats.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert stats.mean_std([2.0]) == (2.0, None)


def test_t_interval_by_hand():
    values = [0.3, -0.1, 0.5]
    got = stats.t_interval(values)
    half = 4.302653 * statistics.stdev(values) / math.sqrt(3)
    assert got.n == 3 and got.mean == pytest.approx(0.7 / 3)
    assert (got.low, got.high) == pytest.approx((0.7 / 3 - half, 0.7 / 3 + half), abs=1e-6)
    assert not got.excludes_zero
    assert stats.t_interval([1.0, 1.1, 0.9]).excludes_zero
    assert stats.t_interval([-1.0, -1.1]).excludes_zero
    single = stats.t_interval([0.4])
    assert single.low is None and not single.excludes_zero


# Two-sided p-values of t with 4 degrees of freedom (tables): t = 2.7764 at 0.05, 4.6041 at 0.01,
# 8.6103 at 0.001, 2.1318 at 0.10.
T4_TWO_SIDED = {2.7764: 0.05, 4.6041: 0.01, 8.6103: 0.001, 2.1318: 0.10}


@pytest.mark.parametrize(("t", "expected"), sorted(T4_TWO_SIDED.items()))
def test_the_p_value_is_the_two_sided_t_test_the_interval_inverts(t, expected):
    # Five values with sample standard deviation 1 and mean t / sqrt(5): their t statistic is t.
    spread = [k / math.sqrt(2.5) for k in (-2, -1, 0, 1, 2)]
    for sign in (1, -1):
        values = [sign * t / math.sqrt(5) + v for v in spread]
        got = stats.t_interval(values)
        assert got.std == pytest.approx(1.0)
        assert got.p_value == pytest.approx(expected, rel=2e-4)
        assert got.excludes_zero == (got.p_value < 0.05)
    assert stats.t_interval([0.4]).p_value is None
    assert stats.t_interval([0.2, 0.2, 0.2]).p_value == 0.0
    assert stats.t_interval([0.0, 0.0]).p_value == 1.0


def test_holm_by_hand():
    # m = 5: sorted 0.001 0.01 0.02 0.04 0.30 times 5 4 3 2 1 = 0.005 0.04 0.06 0.08 0.30; each
    # adjusted value is the largest so far, in the input's order.
    got = stats.holm([0.04, 0.001, 0.30, 0.02, 0.01])
    assert got == pytest.approx([0.08, 0.005, 0.30, 0.06, 0.04])
    # Monotone in the sorted order: 0.011 * 2 = 0.022 is below 0.01 * 3 = 0.03, which carries over.
    assert stats.holm([0.011, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5])
    assert stats.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [
        # Wilson score intervals, 95% (Newcombe 1998, table I; and by the closed form).
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (20, 20, (0.8389, 1.0)),
        (5, 10, (0.2366, 0.7634)),
    ],
)
def test_wilson_interval(successes, trials, expected):
    low, high = stats.wilson_interval(successes, trials)
    assert (low, high) == pytest.approx(expected, abs=1e-4)
    assert stats.wilson_interval(0, 0) is None
