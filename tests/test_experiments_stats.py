"""The experiment statistics against scipy and statsmodels on the same data (to 1e-9), and
their calibration on simulated experiments: A/A false-positive rate and power."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from app.experiments import stats as st
from app.experiments.simulate import simulate_ctr_arms

TOL = 1e-9


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_two_proportion_z_equals_statsmodels():
    c = st.two_proportion_z(480, 10_000, 560, 10_300)
    z, p = proportions_ztest([560, 480], [10_300, 10_000])
    lo, hi = confint_proportions_2indep(560, 10_300, 480, 10_000, method="wald", compare="diff")
    rlo, rhi = confint_proportions_2indep(560, 10_300, 480, 10_000, method="log", compare="ratio")
    assert c.statistic == pytest.approx(z, abs=TOL) and c.p_value == pytest.approx(p, abs=TOL)
    assert c.abs_ci == pytest.approx((lo, hi), abs=TOL)
    assert c.rel_ci == pytest.approx((rlo - 1, rhi - 1), abs=TOL)


def test_welch_t_equals_scipy_including_interval(rng):
    a, b = rng.gamma(2, 3, 400), rng.gamma(2, 3.4, 350)
    c = st.welch_t(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert c.statistic == pytest.approx(ref.statistic, abs=TOL) and c.p_value == pytest.approx(ref.pvalue, abs=TOL)
    assert c.abs_ci == pytest.approx((ci.low, ci.high), abs=TOL)


def test_delta_method_equals_statsmodels_z_on_linearised_values(rng):
    imp0, imp1 = 1 + rng.poisson(20, 800), 1 + rng.poisson(20, 900)
    clk0, clk1 = rng.binomial(imp0, rng.beta(0.2, 3.8, 800)), rng.binomial(imp1, rng.beta(0.22, 3.78, 900))
    c = st.ratio_delta(clk0, imp0, clk1, imp1)
    # The delta method is a z test on each user's linearised contribution (y - R x) / xbar.
    lin = [r + (y - r * x) / x.mean() for y, x in ((clk0, imp0), (clk1, imp1)) for r in [y.sum() / x.sum()]]
    cm = CompareMeans(DescrStatsW(lin[1]), DescrStatsW(lin[0]))
    z, p = cm.ztest_ind(usevar="unequal")
    lo, hi = cm.zconfint_diff(usevar="unequal")
    assert c.control == pytest.approx(clk0.sum() / imp0.sum(), abs=TOL)
    assert c.statistic == pytest.approx(z, abs=TOL) and c.p_value == pytest.approx(p, abs=TOL)
    assert c.abs_ci == pytest.approx((lo, hi), abs=TOL)


def test_srm_chi_square_equals_scipy():
    s = st.srm_chi_square([5100, 4900, 10_150], [1, 1, 2])
    ref = stats.chisquare([5100, 4900, 10_150], f_exp=[5037.5, 5037.5, 10_075])
    assert s.chi2 == pytest.approx(ref.statistic, abs=TOL) and s.p_value == pytest.approx(ref.pvalue, abs=TOL)
    assert st.srm_chi_square([5600, 4400], [1, 1]).mismatch(0.001)


@pytest.mark.parametrize("ours,theirs", [(st.holm, "holm"), (st.benjamini_hochberg, "fdr_bh")])
def test_multiplicity_corrections_equal_statsmodels(rng, ours, theirs):
    p = np.concatenate([rng.uniform(0, 0.05, 5), rng.uniform(0, 1, 10), [0.01, 0.01]])
    assert ours(p.tolist()) == pytest.approx(multipletests(p, method=theirs)[1].tolist(), abs=TOL)


def test_cuped_theta_is_the_ols_slope_and_cuts_variance_by_rho_squared(rng):
    x = rng.gamma(2, 5, 20_000)
    y = 0.8 * x + rng.normal(0, 4, 20_000)
    assert st.cuped_theta(y, x) == pytest.approx(stats.linregress(x, y).slope, abs=TOL)
    adjusted = st.cuped(y, x)
    rho = np.corrcoef(x, y)[0, 1]
    assert adjusted.mean() == pytest.approx(y.mean(), abs=1e-9)
    assert adjusted.var(ddof=1) == pytest.approx(y.var(ddof=1) * (1 - rho**2), rel=1e-9)


def test_power_equals_statsmodels_normal_power():
    ours = st.power_two_means(0.5, 4.0, 4.0, 900, 1200, alpha=0.05)
    theirs = NormalIndPower().power(effect_size=0.5 / 4.0, nobs1=900, alpha=0.05, ratio=1200 / 900)
    assert ours == pytest.approx(theirs, abs=TOL)


def test_aa_false_positive_rate_is_alpha_over_1000_simulated_experiments():
    rng = np.random.default_rng(2026)
    p = [st.ratio_delta(a.clicks, a.impressions, b.clicks, b.impressions).p_value for a, b in (simulate_ctr_arms(rng, 1500, 0.05) for _ in range(1000))]
    assert 0.035 <= np.mean(np.asarray(p) < 0.05) <= 0.065
    # p-values are uniform under the null, not merely right at 0.05.
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_known_effect_is_detected_with_the_designed_power():
    """Design: users per arm for 80% power at 5% -> 5.75% users clicking; simulate 400 runs."""
    n = st.users_per_arm_for_power(0.05, 0.0575, power=0.8)
    rng = np.random.default_rng(7)
    hits = [
        st.two_proportion_z(rng.binomial(n, 0.05), n, rng.binomial(n, 0.0575), n).p_value < 0.05 for _ in range(400)
    ]
    # 3 binomial standard errors around the design's 80%.
    assert abs(np.mean(hits) - 0.8) < 3 * np.sqrt(0.8 * 0.2 / 400)


def test_a_known_ctr_effect_through_the_delta_method_matches_its_predicted_power():
    rng = np.random.default_rng(8)
    runs = [simulate_ctr_arms(rng, 3000, 0.05, rel_effect=0.08) for _ in range(300)]
    results = [st.ratio_delta(a.clicks, a.impressions, b.clicks, b.impressions) for a, b in runs]
    predicted = np.mean([st.power_two_means(0.05 * 0.08, 1, 1, 2 / r.se**2, 2 / r.se**2) for r in results])
    observed = np.mean([r.p_value < 0.05 for r in results])
    assert abs(observed - predicted) < 3 * np.sqrt(predicted * (1 - predicted) / 300)
