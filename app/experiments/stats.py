"""The statistics of an online experiment, as plain numpy/scipy functions.

Every test compares one treatment with the control on per-user data (the user is the unit of
randomisation, so per-user aggregates are independent; per-impression data are not, which is
why click-through rate goes through the delta method rather than a test on impressions).

    two_proportion_z(x0, n0, x1, n1)          # users converting / users: pooled z test
    welch_t(a, b)                             # means of per-user values, unequal variances
    ratio_delta(y0, x0, y1, x1)               # sum(y)/sum(x) per arm (CTR): delta method
    cuped(y, x, ...) -> adjusted y            # variance reduction with a pre-period covariate
    srm_chi_square(counts, weights)           # sample-ratio mismatch
    holm(p) / benjamini_hochberg(p)           # multiplicity across metrics
    power_two_proportions / power_two_means   # what the design can detect

Relative lift intervals are taken on the log of the ratio of the arm means (delta method)
and exponentiated: they stay asymmetric and never cross -100%, and for proportions they
equal statsmodels' `confint_proportions_2indep(compare="ratio", method="log")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, stats


@dataclass(frozen=True)
class Comparison:
    """Treatment against control on one metric."""

    test: str
    """two_proportion_z, welch_t or delta_method_z."""
    control: float
    treatment: float
    abs_lift: float
    abs_ci: tuple[float, float]
    rel_lift: float
    rel_ci: tuple[float, float]
    statistic: float
    p_value: float
    n_control: int
    n_treatment: int
    se: float
    """Standard error of the absolute lift (what a power calculation needs)."""
    p_adjusted: float | None = None
    """After Holm / Benjamini-Hochberg across the experiment's metrics."""

    def with_adjusted(self, p: float) -> "Comparison":
        return replace(self, p_adjusted=float(p))


def _relative_ci(m0: float, var_m0: float, m1: float, var_m1: float, alpha: float) -> tuple[float, tuple[float, float]]:
    """Lift m1/m0 - 1 and its interval from the log-ratio delta method; nan when a mean is not
    positive (the log of the ratio does not exist)."""
    if not (m0 > 0 and m1 > 0):
        rel = m1 / m0 - 1 if m0 != 0 else math.nan
        return rel, (math.nan, math.nan)
    half = stats.norm.isf(alpha / 2) * math.sqrt(var_m1 / m1**2 + var_m0 / m0**2)
    log_ratio = math.log(m1 / m0)
    return m1 / m0 - 1, (math.exp(log_ratio - half) - 1, math.exp(log_ratio + half) - 1)


def _normal_p(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z)))


def two_proportion_z(x0: int, n0: int, x1: int, n1: int, alpha: float = 0.05) -> Comparison:
    """Pooled two-proportion z test (statsmodels `proportions_ztest`); the interval of the
    difference is the unpooled Wald interval, since under the alternative the arms differ."""
    if n0 <= 0 or n1 <= 0:
        raise ValueError("two_proportion_z needs at least one unit in each arm")
    p0, p1 = x0 / n0, x1 / n1
    pooled = (x0 + x1) / (n0 + n1)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    z = (p1 - p0) / se_pooled if se_pooled > 0 else 0.0
    var0, var1 = p0 * (1 - p0) / n0, p1 * (1 - p1) / n1
    se = math.sqrt(var0 + var1)
    half = stats.norm.isf(alpha / 2) * se
    rel, rel_ci = _relative_ci(p0, var0, p1, var1, alpha)
    return Comparison("two_proportion_z", p0, p1, p1 - p0, (p1 - p0 - half, p1 - p0 + half), rel, rel_ci, z, _normal_p(z), n0, n1, se)


def welch_t(control: np.ndarray, treatment: np.ndarray, alpha: float = 0.05) -> Comparison:
    """Welch's t test of the difference in means (scipy `ttest_ind(equal_var=False)`), its
    t interval, and the relative lift's log-ratio interval."""
    a, b = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    n0, n1 = len(a), len(b)
    if n0 < 2 or n1 < 2:
        raise ValueError("welch_t needs at least two units in each arm")
    m0, m1 = float(a.mean()), float(b.mean())
    v0, v1 = float(a.var(ddof=1)) / n0, float(b.var(ddof=1)) / n1
    se = math.sqrt(v0 + v1)
    diff = m1 - m0
    if se == 0:
        return Comparison("welch_t", m0, m1, diff, (diff, diff), m1 / m0 - 1 if m0 else math.nan, (math.nan, math.nan), 0.0, 1.0, n0, n1, 0.0)
    df = (v0 + v1) ** 2 / (v0**2 / (n0 - 1) + v1**2 / (n1 - 1))
    t = diff / se
    half = stats.t.isf(alpha / 2, df) * se
    rel, rel_ci = _relative_ci(m0, v0, m1, v1, alpha)
    return Comparison("welch_t", m0, m1, diff, (diff - half, diff + half), rel, rel_ci, t, float(2 * stats.t.sf(abs(t), df)), n0, n1, se)


def ratio_and_variance(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """sum(y)/sum(x) over units and the delta-method variance of that ratio:
    (s_y^2 - 2 R s_xy + R^2 s_x^2) / (n xbar^2), i.e. the variance of the linearised values
    (y - R x) / xbar over n."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    n = len(x)
    xbar = x.mean()
    if n < 2 or xbar <= 0:
        raise ValueError("a ratio metric needs at least two units and a positive denominator")
    r = y.mean() / xbar
    return float(r), float(np.var(y - r * x, ddof=1) / (n * xbar**2))


def ratio_delta(y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray, alpha: float = 0.05) -> Comparison:
    """z test of a ratio metric (clicks / impressions summed per arm) with delta-method
    variances, so that users with many impressions do not count as independent draws."""
    r0, var0 = ratio_and_variance(y0, x0)
    r1, var1 = ratio_and_variance(y1, x1)
    se = math.sqrt(var0 + var1)
    diff = r1 - r0
    z = diff / se if se > 0 else 0.0
    half = stats.norm.isf(alpha / 2) * se
    rel, rel_ci = _relative_ci(r0, var0, r1, var1, alpha)
    return Comparison("delta_method_z", r0, r1, diff, (diff - half, diff + half), rel, rel_ci, z, _normal_p(z), len(x0), len(x1), se)


def cuped_theta(y: np.ndarray, x: np.ndarray) -> float:
    """OLS slope of the outcome on the pre-period covariate, pooled over arms (pooling keeps
    the adjustment identical for both arms, so it cannot create an effect)."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    vx = x.var(ddof=1)
    return float(np.cov(x, y, ddof=1)[0, 1] / vx) if vx > 0 else 0.0


def cuped(y: np.ndarray, x: np.ndarray, theta: float | None = None) -> np.ndarray:
    """y - theta (x - mean x): same expectation, variance shrunk by the squared correlation."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    theta = cuped_theta(y, x) if theta is None else theta
    return y - theta * (x - x.mean())


@dataclass(frozen=True)
class SampleRatio:
    observed: list[int]
    expected: list[float]
    chi2: float
    p_value: float

    def mismatch(self, threshold: float) -> bool:
        return self.p_value < threshold


def srm_chi_square(counts: list[int], weights: list[float]) -> SampleRatio:
    """Pearson chi-square of the units per arm against the allocation (scipy `chisquare`)."""
    observed = np.asarray(counts, dtype=float)
    w = np.asarray(weights, dtype=float)
    if len(observed) != len(w) or len(w) < 2 or (w <= 0).any():
        raise ValueError("srm_chi_square needs one positive weight per arm and at least two arms")
    expected = observed.sum() * w / w.sum()
    if observed.sum() == 0:
        return SampleRatio([0] * len(w), expected.tolist(), 0.0, 1.0)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    return SampleRatio([int(c) for c in counts], expected.tolist(), chi2, float(stats.chi2.sf(chi2, len(w) - 1)))


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values: controls the family-wise error rate."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg step-up adjusted p-values: controls the false discovery rate."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="mergesort")[::-1]
    adjusted = np.minimum.accumulate(p[order] * m / np.arange(m, 0, -1))
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out.tolist()


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg}


def power_two_means(delta: float, sd0: float, sd1: float, n0: float, n1: float, alpha: float = 0.05) -> float:
    """Power of a two-sided z test of a difference `delta` in means (both tails counted, as
    statsmodels' NormalIndPower does)."""
    se = math.sqrt(sd0**2 / n0 + sd1**2 / n1)
    z = stats.norm.isf(alpha / 2)
    d = abs(delta) / se
    return float(stats.norm.cdf(d - z) + stats.norm.cdf(-d - z))


def power_two_proportions(p0: float, p1: float, n0: float, n1: float, alpha: float = 0.05) -> float:
    """Power of the pooled two-proportion z test: the critical value is set under the pooled
    null, the distribution of the difference under the alternative."""
    pbar = (n0 * p0 + n1 * p1) / (n0 + n1)
    se_null = math.sqrt(pbar * (1 - pbar) * (1 / n0 + 1 / n1))
    se_alt = math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    z = stats.norm.isf(alpha / 2)
    d = abs(p1 - p0)
    return float(stats.norm.cdf((d - z * se_null) / se_alt) + stats.norm.cdf((-d - z * se_null) / se_alt))


def users_per_arm_for_power(p0: float, p1: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest equal arm size at which the two-proportion test reaches `power`."""
    if p0 == p1:
        raise ValueError("no sample size detects a zero effect")
    n = optimize.brentq(lambda n: power_two_proportions(p0, p1, n, n, alpha) - power, 2, 1e12)
    return int(math.ceil(n))


def minimum_detectable_effect(se: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest absolute lift detected with `power` given the lift's standard error."""
    return float((stats.norm.isf(alpha / 2) + stats.norm.isf(1 - power)) * se)
