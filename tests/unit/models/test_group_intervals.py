"""Intervals of group totals (models/intervals.py: group_terms, group_total_variance, total_quantiles).

A 2,000-customer BG/NBD + Gamma-Gamma population is simulated and fitted once (helpers.py); then,
200 times, the parameters are drawn from the fit's normal (log-parameters, the stored covariance)
and every customer's next six months are simulated given their history under those parameters
(alive or not, purchase rate, dropout, order-value level from their posteriors): the 200 group
totals share each draw's parameters, as a segment's customers share the fit. The group's 80%
interval must hold ~80% of them; 200 replications give the coverage a sampling sd of ~2.8 points.
"""
from __future__ import annotations

import numpy as np
import pytest

from models import BGNBDModel, GammaGammaModel
from models import intervals as iv

from .helpers import simulate_bgnbd_gamma_gamma

PURCHASE = {"r": 0.6, "alpha": 40.0, "a": 0.8, "b": 3.0}
SPEND = {"p": 4.0, "q": 5.0, "v": 300.0}
HORIZON = 182.625
N_CUSTOMERS = 2000
REPLICATIONS = 200


@pytest.fixture(scope="module")
def fitted():
    ages = np.random.default_rng(41).uniform(30, 700, N_CUSTOMERS).round()
    customers = simulate_bgnbd_gamma_gamma(N_CUSTOMERS, PURCHASE, SPEND, ages, HORIZON, seed=42)
    purchase = BGNBDModel().fit(customers["frequency"], customers["recency"], customers["T"])
    repeat = customers[customers["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    return customers, purchase, spend


def _points(model):
    return iv.sigma_points(model.params_, model.fit_info_["log_param_covariance"], model.param_names)


def _group(customers, purchase, spend):
    """The customers' distributions and group terms, as ScoringBundle._intervals computes them."""
    x, t_x, T, m = (customers[c].to_numpy(float) for c in ("frequency", "recency", "T", "monetary"))
    by_point = iv.count_moments_by_point(_points(purchase), HORIZON, x, t_x, T)
    spend_points = _points(spend)
    distribution = iv.value_distribution(by_point.averaged(), iv.spend_moments(spend_points, x, m), 1.0)
    terms = iv.group_terms(by_point, iv.spend_means_by_point(spend_points, x, m), distribution, 1.0)
    return by_point, spend_points, distribution, terms


def _draw_parameters(model, rng) -> dict[str, float]:
    cov = model.fit_info_["log_param_covariance"]
    centre = np.log([model.params_[n] for n in cov["names"]])
    return dict(zip(cov["names"], np.exp(rng.multivariate_normal(centre, np.asarray(cov["matrix"])))))


def _simulate_total(customers, purchase: dict, spend: dict, rng) -> float:
    """One draw of the group's 6-month total given the histories, under these parameters (BG/NBD:
    P(alive), lambda ~ Gamma(r + x, alpha + T), p ~ Beta(a, b + x), N = min(Poisson(lambda t),
    Geometric(p)); order values Gamma(p, nu), nu ~ Gamma(p x + q, v + x m))."""
    x, t_x, T, m = (customers[c].to_numpy(float) for c in ("frequency", "recency", "T", "monetary"))
    r, alpha, a, b = (purchase[k] for k in ("r", "alpha", "a", "b"))
    odds_dead = np.where(x > 0, a / (b + np.maximum(x, 1) - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x), 0.0)
    alive = rng.random(x.size) < 1.0 / (1.0 + odds_dead)
    lam = rng.gamma(r + x, 1.0 / (alpha + T))
    drop = rng.beta(a, b + x)
    n = np.where(alive, np.minimum(rng.poisson(lam * HORIZON), rng.geometric(drop)), 0)
    p, q, v = (spend[k] for k in ("p", "q", "v"))
    nu = rng.gamma(p * x + q, 1.0 / (v + x * np.where(x > 0, m, 0.0)))
    values = np.where(n > 0, rng.gamma(np.maximum(n, 1) * p, 1.0 / nu), 0.0)
    return float(values.sum())


def test_the_group_total_interval_covers_80_percent_of_simulated_totals(fitted):
    customers, purchase, spend = fitted
    _, _, distribution, terms = _group(customers, purchase, spend)
    mean = distribution.mean.sum()
    var = iv.group_total_variance(terms.process_var.sum(), terms.loadings.sum(axis=0), terms.interaction_sd.sum())
    p10, p90 = iv.total_quantiles(mean, var)[0]
    rng = np.random.default_rng(2026)
    totals = np.array([_simulate_total(customers, _draw_parameters(purchase, rng), _draw_parameters(spend, rng),
                                       rng) for _ in range(REPLICATIONS)])
    covered = np.mean((totals >= p10) & (totals <= p90))
    # 200 replications: sd ~2.8 points; the band is ~3 sd
    assert 0.72 <= covered <= 0.88, (covered, p10, p90, np.percentile(totals, [10, 90]))
    # the simulated totals' spread is the interval's: their mean and sd agree with the moments used
    assert totals.mean() == pytest.approx(mean, rel=0.03)
    assert totals.std() == pytest.approx(np.sqrt(var[0]), rel=0.2)
    # far narrower than the customers' own intervals added up (most of each one's spread averages out)
    individual = distribution.quantiles()
    assert p90 - p10 < 0.1 * (individual[:, 2] - individual[:, 0]).sum()


def test_the_loadings_give_the_sigma_point_grids_variance_and_the_sd_bound_is_looser(fitted):
    customers, purchase, spend = fitted
    by_point, spend_points, distribution, terms = _group(customers, purchase, spend)
    x, m = customers["frequency"].to_numpy(float), customers["monetary"].to_numpy(float)
    # exact: the group total's expected value at each of the 5 x 4 (purchase, spend) sigma-point pairs
    grid = np.array([(by_point.mean[i] * iv.spend_means_by_point(spend_points, x, m)[j]).sum()
                     for i in range(len(by_point.mean)) for j in range(len(spend_points))])
    exact = grid.var()
    first_order = np.sum(terms.loadings.sum(axis=0) ** 2)
    with_bound = first_order + terms.interaction_sd.sum() ** 2
    assert first_order <= exact * (1 + 1e-9) and with_bound >= exact * (1 - 1e-9)
    assert with_bound == pytest.approx(exact, rel=0.02)
    # perfect correlation (sum of the customers' parameter sds) overstates the parameter part
    assert terms.param_sd.sum() ** 2 > 1.2 * exact
    # per customer: the parts add up to the value's variance; every column finite and non-negative
    np.testing.assert_allclose(terms.process_var + terms.param_sd ** 2, distribution.second - distribution.mean ** 2,
                               rtol=1e-9)
    for column in (terms.sd, terms.param_sd, terms.process_var, terms.interaction_sd):
        assert np.all(np.isfinite(column)) and np.all(column >= 0)
    assert np.all(np.isfinite(terms.loadings)) and terms.loadings.shape == (len(customers), 4 + 3)


def test_total_quantiles_are_the_lognormal_of_the_moments():
    q = iv.total_quantiles([100.0, 0.0], [4.0, 0.0])
    assert np.all(q[1] == 0.0)                       # mean 0: nothing to spread
    # small relative spread (2%): the lognormal is nearly the normal, mean +- 1.2816 sd
    np.testing.assert_allclose(q[0], [100 - 1.2816 * 2, 100 + 1.2816 * 2], rtol=1e-3)
    # wide spread (sd 2x the mean): P10 stays above 0 where a normal's would be far below
    wide = iv.total_quantiles(100.0, 200.0 ** 2)[0]
    assert 0 < wide[0] < 100 < wide[1]
    sigma2 = np.log1p(4.0)
    np.testing.assert_allclose(np.log(wide), np.log(100) - sigma2 / 2 + np.sqrt(sigma2) * np.array([-1.2815516, 1.2815516]),
                               rtol=1e-6)


def test_a_total_likely_to_be_zero_has_its_atom():
    # a group that brings nothing with probability 0.95: P10 = P90 = 0, below its mean
    assert np.all(iv.total_quantiles(100.0, 400.0 ** 2, p_zero=0.95)[0] == 0.0)
    # with probability 0.5: P10 = 0, P90 from the positive part (mean 200 given positive)
    low, high = iv.total_quantiles(100.0, 400.0 ** 2, p_zero=0.5)[0]
    assert low == 0.0 and high > 200.0
    # no atom: the plain lognormal of the moments
    np.testing.assert_allclose(iv.total_quantiles(100.0, 4.0, p_zero=0.0), iv.total_quantiles(100.0, 4.0))


def test_a_paretonbd_group_total_interval_covers_80_percent_of_simulated_totals():
    # the same check through Pareto/NBD's count moments (quadrature over the remaining lifetime)
    from models import ParetoNBDModel
    from models.btyd import pareto_p_alive

    from .helpers import simulate_paretonbd_gamma_gamma

    pareto = {"r": 0.6, "alpha": 40.0, "s": 0.8, "beta": 150.0}
    ages = np.random.default_rng(41).uniform(30, 700, N_CUSTOMERS).round()
    customers = simulate_paretonbd_gamma_gamma(N_CUSTOMERS, pareto, SPEND, ages, HORIZON, seed=42)
    purchase = ParetoNBDModel().fit(customers["frequency"], customers["recency"], customers["T"])
    repeat = customers[customers["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    x, t_x, T, m = (customers[c].to_numpy(float) for c in ("frequency", "recency", "T", "monetary"))
    points = _points(purchase)
    alive = np.stack([pareto_p_alive(row, x, t_x, T) for row in points])
    by_point = iv.pareto_count_moments_by_point(points, HORIZON, x, t_x, T, alive)
    spend_points = _points(spend)
    distribution = iv.value_distribution(by_point.averaged(), iv.spend_moments(spend_points, x, m), 1.0)
    terms = iv.group_terms(by_point, iv.spend_means_by_point(spend_points, x, m), distribution, 1.0)
    var = iv.group_total_variance(terms.process_var.sum(), terms.loadings.sum(axis=0), terms.interaction_sd.sum())
    p10, p90 = iv.total_quantiles(distribution.mean.sum(), var)[0]
    rng = np.random.default_rng(2026)
    totals = []
    for _ in range(REPLICATIONS):
        drawn, level = _draw_parameters(purchase, rng), _draw_parameters(spend, rng)
        r, alpha, s, beta = (drawn[k] for k in ("r", "alpha", "s", "beta"))
        alive_now = rng.random(x.size) < pareto_p_alive([r, alpha, s, beta], x, t_x, T)
        lam = rng.gamma(r + x, 1.0 / (alpha + T))
        lifetime = rng.exponential(1.0 / rng.gamma(s, 1.0 / (beta + T)))
        n = np.where(alive_now, rng.poisson(lam * np.minimum(lifetime, HORIZON)), 0)
        nu = rng.gamma(level["p"] * x + level["q"], 1.0 / (level["v"] + x * np.where(x > 0, m, 0.0)))
        totals.append(np.where(n > 0, rng.gamma(np.maximum(n, 1) * level["p"], 1.0 / nu), 0.0).sum())
    totals = np.asarray(totals)
    assert np.mean((totals >= p10) & (totals <= p90)) == pytest.approx(0.80, abs=0.08)
    assert distribution.mean.sum() == pytest.approx(totals.mean(), rel=0.02)
