"""The few statistics the reports need, in plain Python (no scipy): the mean and sample standard
deviation of a handful of runs, Student's t quantile, a t-interval for a mean over seeds with its
two-sided p-value, Holm's correction of several p-values, and the Wilson score interval of a
binomial rate (exact-match accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1 in the denominator; None for one value)."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The fraction converges fast only on one side of the mean; use the symmetry on the other.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, `df` degrees of freedom), by bisection on the CDF."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: expected a probability in (0, 1)")
    if df <= 0:
        raise ValueError(f"df={df}: expected a positive number of degrees of freedom")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def normal_quantile(p: float) -> float:
    """The standard normal quantile (the t quantile's limit as df grows)."""
    return math.sqrt(2.0) * _erf_inverse(2.0 * p - 1.0)


def _erf_inverse(y: float) -> float:
    # Newton's method on erf from a rough start; erf is smooth and monotone.
    x = 0.0
    for _ in range(100):
        step = (math.erf(x) - y) / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
        x -= step
        if abs(step) < 1e-15:
            break
    return x


@dataclass(frozen=True)
class MeanInterval:
    """A mean over n values with its t confidence interval (None below two values)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0."""
        return self.low is not None and (self.low > 0.0 or self.high < 0.0)

    @property
    def p_value(self) -> float | None:
        """The two-sided p-value of the one-sample t-test of mean 0 that the interval inverts:
        below 1 - confidence exactly when the interval excludes 0 (None below two values)."""
        if self.std is None:
            return None
        if self.std == 0.0:
            return 1.0 if self.mean == 0.0 else 0.0
        t = abs(self.mean) / (self.std / math.sqrt(self.n))
        return min(1.0, 2.0 * (1.0 - t_cdf(t, self.n - 1)))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """The mean of `values` with its two-sided t-interval: mean ± t(n-1) * s / sqrt(n)."""
    mean, std = mean_std(values)
    n = len(values)
    if std is None:
        return MeanInterval(n, mean, None, None, None)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return MeanInterval(n, mean, std, mean - half, mean + half)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of several p-values, in their given order.

    Sorted ascending, the i-th smallest of m is multiplied by m - i + 1 (i from 1), and each
    adjusted value is the largest so far, capped at 1. A hypothesis whose adjusted p-value is below
    alpha is rejected with a family-wise error of at most alpha over all m, whatever their
    dependence (Holm 1979).
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def wilson_interval(
    successes: int, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial rate; None without trials.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes,
    which matters for the small eval sets answer accuracy is scored on.
    """
    if trials <= 0:
        return None
    z = normal_quantile(0.5 + confidence / 2.0)
    rate = successes / trials
    scale = 1.0 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / scale
    half = z / scale * math.sqrt(rate * (1.0 - rate) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)
