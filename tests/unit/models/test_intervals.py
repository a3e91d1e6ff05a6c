"""Per-customer value intervals (models/intervals.py): the closed forms, the fits' covariance, coverage.

The coverage tests simulate BG/NBD (MBG/NBD) + Gamma-Gamma customers forward in time (helpers.py,
independent of the code under test), fit the engine's models on the calibration period and check
that the realised holdout value falls inside the 80% interval predicted at the cutoff for 80% of
customers (randomised-PIT counting for the atom at 0; the closed-interval share over-covers).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models import BGNBDModel, GammaGammaModel, MBGNBDModel
from models import intervals as iv

from .helpers import simulate_bgnbd_gamma_gamma

PURCHASE = {"r": 0.6, "alpha": 40.0, "a": 0.8, "b": 3.0}
SPEND = {"p": 4.0, "q": 5.0, "v": 300.0}
HORIZON = 182.625          # 6 months in days, as the engine's horizon


def _world(n: int, seed: int, modified: bool = False):
    ages = np.random.default_rng(seed).uniform(30, 700, n).round()
    customers = simulate_bgnbd_gamma_gamma(n, PURCHASE, SPEND, ages, HORIZON, seed=seed + 1, modified=modified)
    purchase = (MBGNBDModel if modified else BGNBDModel)().fit(customers["frequency"], customers["recency"],
                                                               customers["T"])
    repeat = customers[customers["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    return customers, purchase, spend


def _distribution(customers, purchase, spend, modified=False, parameter_uncertainty=True):
    purchase_cov = purchase.fit_info_["log_param_covariance"] if parameter_uncertainty else None
    spend_cov = spend.fit_info_["log_param_covariance"] if parameter_uncertainty else None
    counts = iv.count_moments(iv.sigma_points(purchase.params_, purchase_cov, purchase.param_names), HORIZON,
                              customers["frequency"], customers["recency"], customers["T"], modified=modified)
    spend_m = iv.spend_moments(iv.sigma_points(spend.params_, spend_cov, spend.param_names),
                               customers["frequency"], customers["monetary"])
    return iv.value_distribution(counts, spend_m, 1.0)


@pytest.mark.parametrize("modified", [False, True], ids=["bgnbd", "mbgnbd"])
def test_80_percent_intervals_cover_80_percent_of_simulated_customers(modified):
    customers, purchase, spend = _world(4000, seed=11, modified=modified)
    distribution = _distribution(customers, purchase, spend, modified)
    p10, p50, p90 = distribution.quantiles().T
    result = iv.interval_coverage(customers["holdout_value"], p10, p50, p90, distribution.p_zero)
    # 4,000 customers: the coverage's sampling sd is ~0.6 points
    assert result["coverage"] == pytest.approx(0.80, abs=0.025)
    # the closed interval over-covers where P(value = 0) > 10% (why coverage is counted by the PIT)
    assert result["closed_coverage"] > result["coverage"] + 0.05
    # the predicted atom at 0 matches the share of customers who bought nothing
    assert distribution.p_zero.mean() == pytest.approx((customers["holdout_value"] == 0).mean(), abs=0.02)
    assert np.all((p10 <= p50) & (p50 <= p90))


@pytest.mark.parametrize("model", [BGNBDModel, MBGNBDModel], ids=["bgnbd", "mbgnbd"])
def test_the_count_series_is_the_models_expected_purchases_and_p_alive(model, cdnow):
    fitted = model().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    point = iv.sigma_points(fitted.params_, None, fitted.param_names)
    t = 26.0
    counts = iv.count_moments(point, t, cdnow["frequency"], cdnow["recency"], cdnow["T"],
                              modified=model is MBGNBDModel)
    expected = fitted.expected_purchases(t, cdnow["frequency"], cdnow["recency"], cdnow["T"])
    np.testing.assert_allclose(counts.mean, expected, rtol=1e-7, atol=1e-9)
    # P(N = 0) = 1 - P(alive) P(M >= 1): at least the dead share, at most 1
    alive = fitted.p_alive(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    assert np.all(counts.p_zero >= 1 - alive - 1e-12) and np.all(counts.p_zero <= 1)
    # Var(N) >= 0
    assert np.all(counts.factorial2 + counts.mean - counts.mean ** 2 >= -1e-9)



@pytest.mark.parametrize("modified", [False, True], ids=["bgnbd", "mbgnbd"])
def test_the_compiled_and_the_numpy_count_series_sum_to_the_same_tolerance(modified, monkeypatch):
    pytest.importorskip("numba")
    rng = np.random.default_rng(20261205)
    n = 4000
    T = rng.uniform(1.0, 2000.0, n)
    x = np.where(rng.random(n) < 0.4, 0.0, rng.integers(1, 80, n)).astype(float)
    t_x = np.where(x > 0, T * rng.beta(3.0, 1.0, n), 0.0)
    # edge customers: a heavy buyer on a short history (a long series), long lapsed, brand new
    x, t_x, T = (np.append(v, extra) for v, extra in ((x, [500.0, 30.0, 0.0]), (t_x, [60.0, 10.0, 0.0]),
                                                      (T, [61.0, 3000.0, 1.0])))
    rows = np.array([[PURCHASE["r"], PURCHASE["alpha"], PURCHASE["a"], PURCHASE["b"]],
                     [0.9, 25.0, 1.6, 9.0], [0.3, 80.0, 0.5, 1.5]])
    compiled = iv.count_moments_by_point(rows, HORIZON, x, t_x, T, modified, compiled=True)
    numpy = iv.count_moments_by_point(rows, HORIZON, x, t_x, T, modified, compiled=False)
    monkeypatch.setattr(iv, "SERIES_TOLERANCE", 1e-14)       # the series summed on to the last bits
    exact = iv.count_moments_by_point(rows, HORIZON, x, t_x, T, modified, compiled=False)
    for got in (compiled, numpy):
        np.testing.assert_allclose(got.p_zero, exact.p_zero, rtol=1e-12)
        np.testing.assert_allclose(got.mean, exact.mean, rtol=1e-7)
        np.testing.assert_allclose(got.factorial2, exact.factorial2, rtol=1e-6)
    assert exact.mean.max() > 100     # the heavy buyer's series ran long


def test_without_a_writable_numba_cache_the_series_still_compiles(monkeypatch):
    numba = pytest.importorskip("numba")
    real_njit = numba.njit

    def njit_without_cache(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")   # what numba raises
        return real_njit(**options)

    monkeypatch.setattr(numba, "njit", njit_without_cache)
    iv._compiled_series.cache_clear()
    try:
        kernel = iv._compiled_series()
        assert kernel is not None
        counts = iv.count_moments_by_point(np.array([[0.6, 40.0, 0.8, 3.0]]), HORIZON, [2.0], [100.0], [300.0],
                                           compiled=True)
        reference = iv.count_moments_by_point(np.array([[0.6, 40.0, 0.8, 3.0]]), HORIZON, [2.0], [100.0], [300.0],
                                              compiled=False)
        np.testing.assert_allclose(counts.mean, reference.mean, rtol=1e-7)
    finally:
        iv._compiled_series.cache_clear()

def test_the_count_distribution_matches_a_monte_carlo_of_the_process():
    # one customer, BG/NBD: draw alive, lambda, p from their posteriors and N = min(Poisson, Geometric)
    r, alpha, a, b = 0.5, 30.0, 0.7, 2.5
    x, t_x, T, t = 4.0, 200.0, 300.0, 180.0
    rng = np.random.default_rng(5)
    draws = 400_000
    alive_p = iv.bg_family_p_alive(r, alpha, a, b, np.array([x]), np.array([t_x]), np.array([T]), False)[0]
    lam = rng.gamma(r + x, 1.0 / (alpha + T), draws)
    p = rng.beta(a, b + x, draws)
    n = np.minimum(rng.poisson(lam * t), rng.geometric(p)) * (rng.random(draws) < alive_p)
    counts = iv.count_moments(np.array([[r, alpha, a, b]]), t, [x], [t_x], [T])
    assert counts.p_zero[0] == pytest.approx(np.mean(n == 0), abs=3e-3)
    assert counts.mean[0] == pytest.approx(n.mean(), rel=0.01)
    assert counts.factorial2[0] == pytest.approx(np.mean(n * (n - 1.0)), rel=0.02)


def test_fits_store_the_log_parameter_covariance_consistent_with_their_standard_errors(cdnow):
    purchase = BGNBDModel().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    repeat = cdnow[cdnow["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary_value"])
    for model in (purchase, spend):
        covariance = model.fit_info_["log_param_covariance"]
        assert covariance["names"] == list(model.param_names)
        matrix = np.asarray(covariance["matrix"])
        np.testing.assert_allclose(matrix, matrix.T)
        assert np.all(np.linalg.eigvalsh(matrix) > 0)
        # delta method: se(theta) = theta * se(log theta), lifetimes' standard errors
        for i, name in enumerate(model.param_names):
            se = model.fit_info_["standard_errors"][name]
            assert model.params_[name] * np.sqrt(matrix[i, i]) == pytest.approx(se, rel=1e-3)
    # the covariance survives save/load, so a registered bundle carries it to the executors
    again = BGNBDModel.from_dict(purchase.to_dict())
    assert again.fit_info_["log_param_covariance"] == purchase.fit_info_["log_param_covariance"]


def test_sigma_points_have_the_normals_mean_and_covariance():
    covariance = {"names": ["p", "q", "v"], "matrix": [[0.04, 0.01, 0.0], [0.01, 0.09, -0.02], [0.0, -0.02, 0.25]]}
    points = iv.sigma_points({"q": 2.0, "p": 1.5, "v": 10.0}, covariance, ("p", "q", "v"))
    logs = np.log(points)
    assert len(points) == 4
    np.testing.assert_allclose(logs.mean(axis=0), np.log([1.5, 2.0, 10.0]), atol=1e-12)
    np.testing.assert_allclose(np.cov(logs.T, bias=True), np.asarray(covariance["matrix"]), atol=1e-12)
    assert iv.sigma_points({"p": 1.5, "q": 2.0, "v": 10.0}, None, ("p", "q", "v")).shape == (1, 3)


def test_parameter_uncertainty_widens_intervals_of_a_small_fit_only_a_little():
    customers, purchase, spend = _world(600, seed=3)
    with_params = _distribution(customers, purchase, spend)
    process_only = _distribution(customers, purchase, spend, parameter_uncertainty=False)
    var = (with_params.second - with_params.mean ** 2).sum()
    var0 = (process_only.second - process_only.mean ** 2).sum()
    assert var > var0 and var < 1.1 * var0
    # the mixture mean stays the point prediction's to second order
    assert with_params.mean.sum() == pytest.approx(process_only.mean.sum(), rel=0.01)


def test_coverage_counts_a_realised_zero_by_the_share_of_the_atom_inside_the_levels():
    actual = np.array([0.0, 0.0, 0.0, 5.0, 50.0])
    p10 = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    p90 = np.array([10.0, 0.0, 9.0, 10.0, 10.0])
    p_zero = np.array([0.5, 0.95, 0.0, 0.5, 0.5])
    covered = iv.pit_covered(actual, p10, p90, p_zero)
    # atom 0.5: levels (0.1, 0.5] of [0, 0.5] inside -> 0.8; atom 0.95: (0.1, 0.9] -> 0.8/0.95;
    # no atom and P10 > 0: outside; 5 inside; 50 above
    np.testing.assert_allclose(covered, [0.8, 0.8 / 0.95, 0.0, 1.0, 0.0])
    result = iv.interval_coverage(actual, p10, p10, p90, p_zero)
    assert result["closed_coverage"] == pytest.approx(3 / 5)
    assert result["above"] == pytest.approx(1 / 5) and result["below"] == pytest.approx(1 / 5)


def _features(customers: pd.DataFrame) -> pd.DataFrame:
    n = len(customers)
    return pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(n)], "frequency": customers["frequency"],
        "recency": customers["recency"], "T": customers["T"], "monetary_value": customers["monetary"],
        "n_orders": customers["frequency"] + 1, "n_cancelled": 0.0, "net_6m": 0.0,
        "acquisition_channel": "web"}).reset_index(drop=True)


def test_the_bundle_adds_interval_columns_the_same_whatever_the_batches():
    from models.bundle import GROUP_COLUMNS, INTERVAL_COLUMNS, LOADINGS_COLUMN, ScoringBundle
    from models.cancellation import CancellationRateModel

    customers, purchase, spend = _world(1500, seed=21)
    cancel = CancellationRateModel().fit([1, 2], [0, 1])
    bundle = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, value_model="btyd")
    features = _features(customers)
    whole = bundle.predict(features)
    assert list(whole.columns[-7:]) == [*INTERVAL_COLUMNS, *GROUP_COLUMNS, LOADINGS_COLUMN]
    # no randomness: any split into batches gives the same numbers
    parts = pd.concat([bundle.predict(features.iloc[i:i + 97]) for i in range(0, len(features), 97)],
                      ignore_index=True)
    pd.testing.assert_frame_equal(parts.drop(columns=LOADINGS_COLUMN), whole.drop(columns=LOADINGS_COLUMN))
    # (the count series stops per batch after the same terms but not the same steps: equal to ~1e-9)
    np.testing.assert_allclose(np.stack(parts[LOADINGS_COLUMN]), np.stack(whole[LOADINGS_COLUMN]), rtol=1e-5,
                               atol=1e-6)
    # the group-total columns: finite, non-negative, the parameter part within the sd, 4 + 3 loadings
    group = whole[list(GROUP_COLUMNS)].to_numpy(float)
    assert np.isfinite(group).all() and (group >= 0).all()
    assert (whole["predicted_net_value_param_sd"] <= whole["predicted_net_value_sd"]).all()
    assert np.stack(whole[LOADINGS_COLUMN]).shape == (len(features), 7)
    assert whole[list(INTERVAL_COLUMNS)].notna().all().all()
    assert (whole["predicted_net_value_p10"] <= whole["predicted_net_value_p50"]).all()
    assert (whole["predicted_net_value_p50"] <= whole["predicted_net_value_p90"]).all()
    # the interval is around the same value: its mean (without parameter uncertainty) is predicted_net_value
    process_only = _distribution(customers, purchase, spend, parameter_uncertainty=False)
    np.testing.assert_allclose(process_only.mean * (1 - whole["predicted_cancel_rate"]),
                               whole["predicted_net_value"], rtol=1e-6, atol=1e-8)
    # switched off, or a value model without a distribution: null intervals
    # without the group-total terms (the backtest): the same intervals, no sd / loadings
    own = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, group_terms=False).predict(features)
    pd.testing.assert_frame_equal(own[list(INTERVAL_COLUMNS)], whole[list(INTERVAL_COLUMNS)])
    assert own[list(GROUP_COLUMNS)].isna().all().all() and own[LOADINGS_COLUMN].isna().all()
    off = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, intervals=False).predict(features)
    assert off[list(INTERVAL_COLUMNS + GROUP_COLUMNS)].isna().all().all() and off[LOADINGS_COLUMN].isna().all()
    no_interval = [*INTERVAL_COLUMNS, *GROUP_COLUMNS, LOADINGS_COLUMN]
    pd.testing.assert_frame_equal(off.drop(columns=no_interval), whole.drop(columns=no_interval))
    from models.naive import NaiveRepeatModel
    naive = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, value_model="naive",
                          naive=NaiveRepeatModel().fit()).predict(features)
    assert naive[list(INTERVAL_COLUMNS + GROUP_COLUMNS)].isna().all().all() and naive[LOADINGS_COLUMN].isna().all()


# ---- Pareto/NBD: count moments by quadrature over the remaining lifetime -------------------------
PARETO = {"r": 0.6, "alpha": 40.0, "s": 0.8, "beta": 150.0}


def _pareto_distribution(customers, purchase, spend, parameter_uncertainty=True):
    from models.btyd import pareto_p_alive

    covariance = purchase.fit_info_["log_param_covariance"] if parameter_uncertainty else None
    points = iv.sigma_points(purchase.params_, covariance, purchase.param_names)
    x, t_x, T = (customers[c].to_numpy(float) for c in ("frequency", "recency", "T"))
    alive = np.stack([pareto_p_alive(row, x, t_x, T) for row in points])
    counts = iv.pareto_count_moments(points, HORIZON, x, t_x, T, alive)
    spend_cov = spend.fit_info_["log_param_covariance"] if parameter_uncertainty else None
    spend_m = iv.spend_moments(iv.sigma_points(spend.params_, spend_cov, spend.param_names), x, customers["monetary"])
    return iv.value_distribution(counts, spend_m, 1.0)


def test_paretonbd_80_percent_intervals_cover_80_percent_of_simulated_customers():
    from models import ParetoNBDModel

    from .helpers import simulate_paretonbd_gamma_gamma

    ages = np.random.default_rng(31).uniform(30, 700, 4000).round()
    customers = simulate_paretonbd_gamma_gamma(4000, PARETO, SPEND, ages, HORIZON, seed=32)
    purchase = ParetoNBDModel().fit(customers["frequency"], customers["recency"], customers["T"])
    repeat = customers[customers["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    distribution = _pareto_distribution(customers, purchase, spend)
    p10, p50, p90 = distribution.quantiles().T
    result = iv.interval_coverage(customers["holdout_value"], p10, p50, p90, distribution.p_zero)
    assert result["coverage"] == pytest.approx(0.80, abs=0.025)
    assert distribution.p_zero.mean() == pytest.approx((customers["holdout_value"] == 0).mean(), abs=0.02)
    assert distribution.mean.sum() == pytest.approx(customers["holdout_value"].sum(), rel=0.1)


def test_paretonbd_count_moments_are_the_models_expected_purchases_and_p_alive(cdnow):
    from models import ParetoNBDModel
    from models.btyd import pareto_p_alive

    fitted = ParetoNBDModel().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    point = iv.sigma_points(fitted.params_, None, fitted.param_names)
    x, t_x, T = (cdnow[c].to_numpy(float) for c in ("frequency", "recency", "T"))
    alive = pareto_p_alive(point[0], x, t_x, T)
    np.testing.assert_allclose(alive, fitted.p_alive(x, t_x, T), rtol=1e-9, atol=1e-12)
    counts = iv.pareto_count_moments(point, 26.0, x, t_x, T, alive[None, :])
    np.testing.assert_allclose(counts.mean, fitted.expected_purchases(26.0, x, t_x, T), rtol=1e-9, atol=1e-12)
    assert np.all(counts.p_zero >= 1 - alive - 1e-12) and np.all(counts.p_zero <= 1)
    assert np.all(counts.factorial2 + counts.mean - counts.mean ** 2 >= -1e-9)


@pytest.mark.parametrize("params, customer", [
    ((0.55, 10.6, 0.6, 11.7), (3.0, 20.0, 50.0)),       # CDNOW-like, weeks
    ((0.3, 5.0, 0.2, 300.0), (0.0, 0.0, 2.0)),          # a new customer: alpha + T << beta + T
    ((2.0, 100.0, 10.0, 1.0), (8.0, 170.0, 180.0)),     # fast dropout: beta + T << alpha + T
], ids=["cdnow-like", "slow-dropout", "fast-dropout"])
def test_paretonbd_count_distribution_matches_a_monte_carlo_of_the_process(params, customer):
    from models.btyd import pareto_p_alive

    r, alpha, s, beta = params
    x, t_x, T = customer
    t = 26.0
    alive = pareto_p_alive(params, np.array([x]), np.array([t_x]), np.array([T]))[0]
    rng = np.random.default_rng(7)
    draws = 1_000_000
    lam = rng.gamma(r + x, 1.0 / (alpha + T), draws)
    tau = rng.exponential(1.0 / rng.gamma(s, 1.0 / (beta + T), draws))
    n = rng.poisson(lam * np.minimum(tau, t)) * (rng.random(draws) < alive)
    counts = iv.pareto_count_moments(np.array([params]), t, [x], [t_x], [T], np.array([[alive]]))
    assert counts.p_zero[0] == pytest.approx(np.mean(n == 0), abs=2e-3)
    assert counts.mean[0] == pytest.approx(n.mean(), rel=0.02, abs=1e-3)
    assert counts.factorial2[0] == pytest.approx(np.mean(n * (n - 1.0)), rel=0.05, abs=1e-3)


def test_paretonbd_covariance_matches_the_spread_of_refits_on_fresh_samples():
    # the central-difference Fisher information against what it describes: 30 samples of the same world
    from models import ParetoNBDModel

    from .helpers import simulate_paretonbd_gamma_gamma

    names = ParetoNBDModel.param_names
    logs, predicted_sd = [], []
    for seed in range(30):
        ages = np.random.default_rng(100 + seed).uniform(30, 700, 3000).round()
        sample = simulate_paretonbd_gamma_gamma(3000, PARETO, SPEND, ages, HORIZON, seed=200 + seed)
        fitted = ParetoNBDModel().fit(sample["frequency"], sample["recency"], sample["T"])
        matrix = np.asarray(fitted.fit_info_["log_param_covariance"]["matrix"])
        assert np.all(np.linalg.eigvalsh(matrix) > 0)
        logs.append(np.log([fitted.params_[k] for k in names]))
        predicted_sd.append(np.sqrt(np.diag(matrix)))
    observed = np.std(logs, axis=0, ddof=1)
    # 30 refits: the observed sd itself is uncertain by ~13%; allow 35%
    np.testing.assert_allclose(observed, np.median(predicted_sd, axis=0), rtol=0.35)


def test_a_paretonbd_bundle_fills_the_interval_columns():
    from models import ParetoNBDModel
    from models.bundle import INTERVAL_COLUMNS, ScoringBundle
    from models.cancellation import CancellationRateModel

    from .helpers import simulate_paretonbd_gamma_gamma

    customers = simulate_paretonbd_gamma_gamma(1500, PARETO, SPEND, np.linspace(30, 700, 1500).round(), HORIZON,
                                               seed=41)
    purchase = ParetoNBDModel().fit(customers["frequency"], customers["recency"], customers["T"])
    repeat = customers[customers["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    bundle = ScoringBundle(purchase=purchase, spend=spend, cancellation=CancellationRateModel().fit([1, 2], [0, 1]))
    assert bundle.has_intervals
    scored = bundle.predict(_features(customers))
    assert scored[list(INTERVAL_COLUMNS)].notna().all().all()
    # and what group totals add up: finite sd and 4 + 3 loadings per customer
    from models.bundle import GROUP_COLUMNS, LOADINGS_COLUMN

    assert np.isfinite(scored[list(GROUP_COLUMNS)].to_numpy(float)).all()
    assert scored[LOADINGS_COLUMN].map(len).eq(7).all()
    assert (scored["predicted_net_value_p10"] <= scored["predicted_net_value_p50"]).all()
    assert (scored["predicted_net_value_p50"] <= scored["predicted_net_value_p90"]).all()
    # around the point value: without parameter uncertainty the distribution's mean is predicted_net_value
    process_only = _pareto_distribution(customers, purchase, spend, parameter_uncertainty=False)
    np.testing.assert_allclose(process_only.mean * (1 - scored["predicted_cancel_rate"]),
                               scored["predicted_net_value"], rtol=1e-6, atol=1e-8)
