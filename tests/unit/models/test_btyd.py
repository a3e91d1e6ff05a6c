"""Purchase models (BG/NBD, Pareto/NBD, MBG/NBD) against published values and independent numbers."""
from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import models
from models import BGNBDModel, MBGNBDModel, ModelFitError, ParetoNBDModel
from models import btyd
from tests.unit.models.helpers import simulate_bgnbd, unique_rows

RFM = ["frequency", "recency", "T"]


def rel_diff(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def with_params(cls, params: dict, **hyperparameters):
    """A fitted model built from known parameters (through the public from_dict)."""
    return cls.from_dict({"format_version": 1, "model": cls.name, "hyperparameters": hyperparameters,
                          "params": params})


@pytest.fixture(scope="module")
def cdnow_rows(cdnow):
    return unique_rows(cdnow, RFM)


@pytest.fixture(scope="module")
def cdnow_bgnbd(cdnow_rows):
    return BGNBDModel(time_unit="weeks").fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"],
                                             cdnow_rows.n)


# ---- published CDNOW values ----------------------------------------------------------------------
def test_bgnbd_reproduces_fader_hardie_lee_cdnow(cdnow_rows, cdnow_bgnbd):
    # Fader, Hardie & Lee (2005), "Counting your customers the easy way", CDNOW sample in weeks.
    assert len(cdnow_rows) < 1100                          # really fitted on distinct rows with counts
    assert cdnow_bgnbd.fit_info_["n_customers"] == 2357
    published = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
    for name, value in published.items():
        assert rel_diff(cdnow_bgnbd.params_[name], value) < 0.005, (name, cdnow_bgnbd.params_[name])
    # Same paper: LL = -9582.4 at the maximum.
    assert cdnow_bgnbd.fit_info_["log_likelihood"] == pytest.approx(-9582.4, abs=0.5)
    # Conditional expectation for x = 2, t_x = 30.43, T = 38.86 over the next 39 weeks: 1.226.
    value = cdnow_bgnbd.expected_purchases(39, 2, 30.43, 38.86)
    assert value.shape == (1,)
    assert round(float(value[0]), 3) == 1.226


def test_paretonbd_reproduces_published_cdnow(cdnow_rows):
    model = ParetoNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    # Fader, Hardie & Lee (2005) / Hardie note 009: r=0.553, alpha=10.578, s=0.606, beta=11.669, LL=-9595.0
    published = {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669}
    for name, value in published.items():
        assert rel_diff(model.params_[name], value) < 0.005, (name, model.params_[name])
    assert model.fit_info_["log_likelihood"] == pytest.approx(-9595.0, abs=0.5)
    assert model.fit_info_["converged"] and not model.fit_info_["fallback_used"]


def test_mbgnbd_reproduces_btydplus_cdnow(cdnow_rows):
    model = MBGNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    # BTYDplus (Platzer) values, as quoted in lifetimes' own test suite.
    published = {"r": 0.525, "alpha": 6.183, "a": 0.891, "b": 1.614}
    for name, value in published.items():
        assert rel_diff(model.params_[name], value) < 0.005, (name, model.params_[name])


# ---- weights are exact ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BGNBDModel, MBGNBDModel, ParetoNBDModel])
def test_weighted_fit_on_distinct_rows_equals_fit_on_all_customers(cls, cdnow, cdnow_rows):
    weighted = cls().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], weights=cdnow_rows.n)
    full = cls().fit(cdnow.frequency, cdnow.recency, cdnow["T"])
    assert len(cdnow_rows) < len(cdnow)
    for name in cls.param_names:
        assert rel_diff(weighted.params_[name], full.params_[name]) < 1e-4, name
    assert weighted.fit_info_["log_likelihood"] == pytest.approx(full.fit_info_["log_likelihood"], rel=1e-8)


# ---- recovery on simulated data ------------------------------------------------------------------
def test_bgnbd_recovers_simulated_parameters():
    true = {"r": 0.25, "alpha": 4.0, "a": 0.8, "b": 2.5}
    T = np.random.default_rng(7).uniform(20, 80, 20_000)
    data = simulate_bgnbd(20_000, T=T, seed=1, **true)
    model = BGNBDModel(time_unit="weeks").fit(data.frequency, data.recency, data["T"])
    errors = model.fit_info_["standard_errors"]
    # With 20k customers the standard errors are about 1.5% (r), 2.6% (alpha), 5.6% (a) and
    # 7.5% (b) of the values (checked over 5 seeds: the z-scores looked standard normal), so
    # 4 standard errors is a tolerance a correct fit passes with probability > 0.9998 per
    # parameter, while a wrong likelihood or unit (e.g. alpha off by 7x) fails it.
    bounds = {"r": 0.02, "alpha": 0.035, "a": 0.07, "b": 0.10}
    for name, value in true.items():
        assert errors[name] / model.params_[name] < bounds[name], (name, errors[name])
        assert abs(model.params_[name] - value) < 4 * errors[name], (name, model.params_[name])


def test_changing_the_time_unit_only_rescales_the_rate_parameters(cdnow_rows, cdnow_bgnbd):
    # Why the fallback ladder restarts instead of rescaling time: lifetimes already works on
    # T / max(T), so a fit in days is the fit in weeks with alpha (and Pareto beta) times 7.
    days = BGNBDModel(time_unit="days").fit(cdnow_rows.frequency, 7 * cdnow_rows.recency, 7 * cdnow_rows["T"],
                                            cdnow_rows.n)
    assert days.params_["alpha"] == pytest.approx(7 * cdnow_bgnbd.params_["alpha"], rel=1e-5)
    for name in ("r", "a", "b"):
        assert days.params_[name] == pytest.approx(cdnow_bgnbd.params_[name], rel=1e-5)
    assert days.expected_purchases(7 * 39, 2, 7 * 30.43, 7 * 38.86) == pytest.approx(
        cdnow_bgnbd.expected_purchases(39, 2, 30.43, 38.86), rel=1e-5)


# ---- extreme customers: finite and right -----------------------------------------------------------
# CDNOW estimates converted to days (alpha, beta x 7; see the time-unit test above).
BG_DAYS = {"r": 0.243, "alpha": 4.414 * 7, "a": 0.793, "b": 2.426}
MBG_DAYS = {"r": 0.525, "alpha": 6.183 * 7, "a": 0.891, "b": 1.614}
PARETO_DAYS = {"r": 0.553, "alpha": 10.578 * 7, "s": 0.606, "beta": 11.669 * 7}

# (frequency, recency, T, horizon t) in days
EXTREME = [
    (300, 3000.0, 3000.0, 182.5),      # bought every 10 days for 8 years, last purchase today
    (300, 1500.0, 3000.0, 182.5),      # same, but silent for the last 4 years
    (0, 0.0, 1e-6, 182.5),             # first order a moment ago
    (0, 0.0, 0.0, 182.5),              # first order today
    (0, 0.0, 36500.0, 182.5),          # one order, 100 years ago
    (1000, 3000.0, 3000.0, 3650.0),    # lifetimes' MBG/NBD closed form returns NaN here
    (2, 30.43 * 7, 38.86 * 7, 39 * 7.0),
]


def monte_carlo_bg_expectation(t, x, recency, T, r, alpha, a, b, modified, n=200_000, seed=11):
    """P(alive) * E[(1 - exp(-lambda p t)) / p] by sampling the posterior of an active customer.

    Independent of the closed forms: active customers have lambda ~ Gamma(r+x, rate alpha+T) and
    p ~ Beta(a, b+x) (MBG/NBD: b+x+1); P(alive) from Fader, Hardie & Lee (2005) / Batislam et al.
    """
    rng = np.random.default_rng(seed)
    lam = rng.gamma(r + x, 1.0 / (alpha + T), n)
    p = rng.beta(a, b + x + (1 if modified else 0), n)
    mean_purchases = np.mean(-np.expm1(-lam * p * t) / p)
    log_ratio = (r + x) * (math.log(alpha + T) - math.log(alpha + recency))
    if modified:
        p_alive = 1.0 / (1.0 + math.exp(min(math.log(a / (b + x)) + log_ratio, 700)))
    else:
        p_alive = 1.0 if x == 0 else 1.0 / (1.0 + math.exp(min(math.log(a / (b + x - 1)) + log_ratio, 700)))
    return p_alive * mean_purchases, p_alive


@pytest.mark.parametrize("cls, params, modified", [(BGNBDModel, BG_DAYS, False), (MBGNBDModel, MBG_DAYS, True)])
def test_bg_family_extreme_customers_match_monte_carlo(cls, params, modified):
    model = with_params(cls, params)
    x, recency, T, t = (np.array(column) for column in zip(*EXTREME))
    expected = model.expected_purchases(t, x, recency, T)
    alive = model.p_alive(x, recency, T)
    assert np.all(np.isfinite(expected)) and np.all(expected >= 0)
    assert np.all((alive >= 0) & (alive <= 1))
    for i, row in enumerate(EXTREME):
        reference, reference_alive = monte_carlo_bg_expectation(row[3], row[0], row[1], row[2], **params,
                                                                modified=modified)
        # 200k draws: Monte Carlo error below 0.5% (lambda has CV 1/sqrt(r+x) <= 2); 3% is safe.
        assert expected[i] == pytest.approx(reference, rel=0.03, abs=1e-9), row
        assert alive[i] == pytest.approx(reference_alive, rel=1e-9, abs=1e-12), row


def test_mbgnbd_guard_replaces_the_nan_of_lifetimes():
    from lifetimes import ModifiedBetaGeoFitter

    raw = ModifiedBetaGeoFitter()
    raw.params_ = pd.Series(MBG_DAYS)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        lifetimes_value = raw.conditional_expected_number_of_purchases_up_to_time(3650.0, 1000, 3000.0, 3000.0)
    assert np.isnan(lifetimes_value)                        # the known failure this guard is for
    ours = with_params(MBGNBDModel, MBG_DAYS).expected_purchases(3650.0, 1000, 3000.0, 3000.0)[0]
    reference, _ = monte_carlo_bg_expectation(3650.0, 1000, 3000.0, 3000.0, **MBG_DAYS, modified=True)
    assert ours == pytest.approx(reference, rel=0.01)


def test_bg_quadrature_guard_equals_the_closed_form_where_both_work():
    # The guard is only used where lifetimes fails; check it against lifetimes where it works.
    model = with_params(BGNBDModel, BG_DAYS)
    x = np.array([0, 1, 2, 10, 50])
    recency = np.array([0, 10, 200, 700, 1000.0])
    T = np.array([5, 100, 300, 800, 1100.0])
    t = np.array([30, 182.5, 90, 365, 182.5])
    guard = btyd._bg_family_expected_by_quadrature(t, x, recency, T, **BG_DAYS, modified=False)
    assert guard == pytest.approx(model.expected_purchases(t, x, recency, T), rel=1e-7)


def _pareto_reference_mp(x, recency, T, t, r, alpha, s, beta):
    """P(alive) and E[X(t)] for Pareto/NBD in 60-digit arithmetic, lifetimes' formula untransformed."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        r, alpha, s, beta, x, recency, T, t = (mpmath.mpf(v) for v in (r, alpha, s, beta, x, recency, T, t))
        big, shape = (beta, r + x) if alpha < beta else (alpha, s + 1)
        gap, rsf = abs(alpha - beta), r + s + x
        a0 = (mpmath.hyp2f1(rsf, shape, rsf + 1, gap / (big + recency)) / (big + recency) ** rsf
              - mpmath.hyp2f1(rsf, shape, rsf + 1, gap / (big + T)) / (big + T) ** rsf)
        alive = 1 / (1 + s / rsf * (alpha + T) ** (r + x) * (beta + T) ** s * a0)
        dropout = (beta + T) / (s - 1) * (1 - ((beta + T) / (beta + T + t)) ** (s - 1))
        expectation = alive * (r + x) / (alpha + T) * dropout
        return float(alive), float(expectation)


def test_paretonbd_extreme_customers_match_high_precision():
    model = with_params(ParetoNBDModel, PARETO_DAYS)
    rows = EXTREME + [(300, 2990.0, 3000.0, 182.5), (50, 100.0, 3000.0, 182.5)]
    x, recency, T, t = (np.array(column) for column in zip(*rows))
    expected = model.expected_purchases(t, x, recency, T)
    alive = model.p_alive(x, recency, T)
    assert np.all(np.isfinite(expected)) and np.all(np.isfinite(alive))
    for i, row in enumerate(rows):
        reference_alive, reference_expected = _pareto_reference_mp(row[0], row[1], row[2], row[3], **PARETO_DAYS)
        assert alive[i] == pytest.approx(reference_alive, rel=1e-7, abs=1e-300), row
        assert expected[i] == pytest.approx(reference_expected, rel=1e-7, abs=1e-300), row


def _log_a0_mp(params, x, recency, T):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(80):
        r, alpha, s, beta = (mpmath.mpf(v) for v in params)
        x, recency, T = (mpmath.mpf(v) for v in (x, recency, T))
        big, shape = (beta, r + x) if alpha < beta else (alpha, s + 1)
        gap, rsf = abs(alpha - beta), r + s + x
        return float(mpmath.log(mpmath.hyp2f1(rsf, shape, rsf + 1, gap / (big + recency)) / (big + recency) ** rsf
                                - mpmath.hyp2f1(rsf, shape, rsf + 1, gap / (big + T)) / (big + T) ** rsf))


@pytest.mark.parametrize("params", [(2.0, 20.0, 0.5, 2000.0), (0.5, 1000.0, 2.0, 1.0), (0.553, 74.046, 0.606, 81.683)])
def test_pareto_log_a0_matches_high_precision_including_quadrature_rows(monkeypatch, params):
    calls = []
    original = btyd._log_integral_quad
    monkeypatch.setattr(btyd, "_log_integral_quad", lambda *a: calls.append(a) or original(*a))
    rows = [(100, 1.0, 3000.0), (300, 100.0, 3000.0), (1000, 1.0, 30000.0), (5000, 100.0, 3000.0),
            (300, 2990.0, 3000.0), (2, 200.0, 272.0), (0, 0.0, 3000.0)]
    x, recency, T = (np.array(column, dtype=float) for column in zip(*rows))
    ours = btyd._pareto_log_A_0(params, x, recency, T, quadrature=True)
    for i, row in enumerate(rows):
        assert ours[i] == pytest.approx(_log_a0_mp(params, *row), rel=1e-10), row
    if params[1] < params[3] / 10 or params[3] < params[1] / 10:
        assert calls                                   # scipy's hyp2f1 gave up on some rows here


def test_paretonbd_stable_likelihood_where_lifetimes_returns_nan():
    from lifetimes import ParetoNBDFitter

    params = [0.553, 10.578 * 7, 0.606, 11.669 * 7]
    # a frequent buyer whose last purchase is on the as-of date (common in daily data)
    x, recency, T = np.array([2.0, 300.0]), np.array([213.0, 3000.0]), np.array([272.0, 3000.0])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        original = ParetoNBDFitter._conditional_log_likelihood(params, x, recency, T)
    assert np.isfinite(original[0]) and np.isnan(original[1])       # hyp2f1 overflow: inf - inf
    ours = btyd._StableParetoNBDFitter._conditional_log_likelihood(params, x, recency, T)
    assert ours[0] == pytest.approx(original[0], rel=1e-12)
    assert np.isfinite(ours[1])


@pytest.mark.parametrize("params", [(0.553, 10.578, 0.606, 11.669), (2.0, 20.0, 0.5, 2000.0),
                                    (0.5, 1000.0, 2.0, 1.0), (5.0, 1e-3, 5.0, 1e-3), (1.0, 1e12, 1.0, 1e12)])
def test_pareto_distinct_value_likelihood_equals_the_row_by_row_one(params):
    # The fit evaluates hyp2f1 once per distinct (x, recency) and (x, T) pair; per row the result
    # must be exactly the row-by-row likelihood, NaN rows (scipy gives up, no quadrature) included.
    rng = np.random.default_rng(11)
    x = rng.choice([0.0, 1.0, 2.0, 5.0, 40.0, 300.0, 2000.0], 5000)
    T = rng.choice(np.arange(1.0, 400.0) / 7.0, 5000)               # weeks: non-integer values
    recency = np.where(x == 0, 0.0, np.minimum(T, rng.choice(np.arange(0.0, 400.0) / 7.0, 5000)))
    recency[:300] = T[:300]                                          # last purchase on the as-of date
    # rows where scipy's hyp2f1 gives up when alpha and beta are far apart (z near 1)
    # and a row whose A_0 underflows to 0 (recency a hair before T, a flat G): NaN, not -inf
    hard = np.array([(1000, 1.0, 30000.0), (5000, 100.0, 3000.0), (300, 100.0, 3000.0), (3, 1000.0, 1000.000001)] * 3)
    x, recency, T = (np.concatenate([a, hard[:, i]]) for i, a in enumerate((x, recency, T)))
    expected = btyd._pareto_conditional_log_likelihood(params, x, recency, T, quadrature=False)
    ours = btyd._ParetoDistinctLikelihood(x, recency, T).rows(params)
    np.testing.assert_array_equal(ours, expected)                    # bit for bit, NaN where NaN
    assert np.isfinite(ours).sum() > 1000
    if params[1] < params[3] / 10 or params[3] < params[1] / 10 or params[1] > 1e6:
        assert np.isnan(ours).any()                                  # the NaN branch was exercised


def test_pareto_fit_objective_is_the_distinct_value_likelihood(monkeypatch, cdnow_rows):
    built = []
    original = btyd._ParetoDistinctLikelihood.__init__

    def spy(self, *args):
        built.append(len(args[0]))
        original(self, *args)

    monkeypatch.setattr(btyd._ParetoDistinctLikelihood, "__init__", spy)
    ParetoNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    assert built[0] == len(cdnow_rows)      # built once for the fit, not per evaluation
    assert len(built) <= 2                  # (+ the final likelihood lifetimes may ask for)


def test_paretonbd_fits_frequent_buyers_in_days():
    # Daily data with customers making hundreds of purchases: lifetimes' own likelihood is NaN
    # at its starting point for these rows, ours fits.
    T = np.random.default_rng(3).uniform(30, 3000, 1500).round()
    data = simulate_bgnbd(1500, r=2.0, alpha=20.0, a=0.5, b=20.0, T=T, seed=5)
    assert data.frequency.max() > 300
    model = ParetoNBDModel().fit(data.frequency, data.recency, data["T"])
    assert model.fit_info_["converged"]
    assert all(math.isfinite(v) and v > 0 for v in model.params_.values())
    # purchase rate: r / alpha ~ 0.1 per day as simulated (2 / 20)
    assert model.params_["r"] / model.params_["alpha"] == pytest.approx(0.1, rel=0.15)


# ---- the fallback ladder -------------------------------------------------------------------------
def _fail_first_calls(monkeypatch, fitter_class, n_failures, error=None, when=None):
    """Make ``fitter_class.fit`` raise for its first ``n_failures`` calls (or while ``when(kwargs)``)."""
    from lifetimes.utils import ConvergenceError

    original = fitter_class.fit
    calls = []

    def fit(self, *args, **kwargs):
        calls.append(kwargs)
        failing = when(kwargs) if when is not None else len(calls) <= n_failures
        if failing:
            raise error or ConvergenceError("forced: the model did not converge")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fitter_class, "fit", fit)
    return calls


def test_fallback_to_small_penalizer_is_taken_and_logged(monkeypatch, caplog, cdnow_rows, cdnow_bgnbd):
    from lifetimes import BetaGeoFitter

    calls = _fail_first_calls(monkeypatch, btyd._BetaGeoFitter, n_failures=1)
    with caplog.at_level(logging.WARNING, logger="models"):
        model = BGNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    assert len(calls) == 2
    info = model.fit_info_
    assert info["penalizer"] == 0.001 and info["start"] == "default" and info["fallback_used"]
    assert info["failed_attempts"] == [{"penalizer": 0.0, "start": "default",
                                        "error": "ConvergenceError: forced: the model did not converge"}]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("attempt 1/6" in m and "failed" in m for m in messages)
    assert any("fallback attempt 2/6" in m and "penalizer=0.001" in m for m in messages)
    # the result is lifetimes' own penalised fit
    direct = BetaGeoFitter(penalizer_coef=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct.fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], weights=cdnow_rows.n)
    for name in BGNBDModel.param_names:
        assert model.params_[name] == pytest.approx(direct.params_[name], rel=1e-6)
    # really penalised (a small but visible shift from the unpenalised fit)
    assert max(rel_diff(model.params_[k], cdnow_bgnbd.params_[k]) for k in model.params_) > 1e-4


def test_real_non_convergence_falls_back_to_penalizer():
    # Every customer bought 5 times and was active to the end: no dropout is ever observed, the
    # likelihood keeps rising as a -> 0 and lifetimes' BFGS stops with a precision-loss error.
    from lifetimes import BetaGeoFitter
    from lifetimes.utils import ConvergenceError

    T = np.linspace(10, 300, 200)
    frequency, recency = np.full(200, 5.0), 0.99 * T
    with pytest.raises(ConvergenceError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BetaGeoFitter().fit(frequency, recency, T)
    model = BGNBDModel().fit(frequency, recency, T)
    info = model.fit_info_
    # which penalised rung is taken is the optimiser's business; that one was needed is not
    assert info["fallback_used"] and info["penalizer"] > 0
    unpenalised = [f for f in info["failed_attempts"] if f["penalizer"] == 0]
    assert unpenalised and all("likelihood has no unique maximum" in f["error"] for f in unpenalised)
    # no dropout seen: (almost) everyone is alive and keeps buying at ~5 / T
    assert np.all(model.p_alive(frequency, recency, T) > 0.97)


def test_restart_is_tried_after_the_penalizers(monkeypatch, cdnow_rows):
    _fail_first_calls(monkeypatch, btyd._ModifiedBetaGeoFitter, 0, when=lambda kw: kw["initial_params"] is None)
    model = MBGNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    info = model.fit_info_
    assert (info["penalizer"], info["start"]) == (0.0, "restart")
    assert [(f["penalizer"], f["start"]) for f in info["failed_attempts"]] == [
        (0.0, "default"), (0.001, "default"), (0.01, "default")]
    # the restart reaches the same maximum as the default start
    assert model.params_["r"] == pytest.approx(0.525, rel=0.005)


def test_non_finite_parameters_count_as_a_failed_attempt(monkeypatch, cdnow_rows):
    original = btyd._BetaGeoFitter.fit
    calls = []

    def fit(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        if len(calls) == 1:
            self.params_["alpha"] = np.nan
        return out

    monkeypatch.setattr(btyd._BetaGeoFitter, "fit", fit)
    model = BGNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    assert "non-finite" in model.fit_info_["failed_attempts"][0]["error"]
    assert all(math.isfinite(v) for v in model.params_.values())


def test_model_fit_error_when_everything_fails(monkeypatch, cdnow_rows):
    _fail_first_calls(monkeypatch, btyd._StableParetoNBDFitter, n_failures=100)
    with pytest.raises(ModelFitError) as caught:
        ParetoNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    message = str(caught.value)
    assert "Pareto/NBD could not be fitted" in message and "all 6 attempts failed" in message
    assert "What to try" in message and "penalizer_coef" in message and "'bgnbd'" in message
    assert len(caught.value.attempts) == 6


def test_without_fallbacks_the_first_failure_is_final(monkeypatch, cdnow_rows):
    _fail_first_calls(monkeypatch, btyd._BetaGeoFitter, n_failures=1)
    with pytest.raises(ModelFitError) as caught:
        BGNBDModel(fallback_penalizers=(), fallback_restart=False).fit(
            cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    assert len(caught.value.attempts) == 1


def test_bad_inputs_are_rejected_before_fitting():
    with pytest.raises(ValueError, match="recency exceeds T"):
        BGNBDModel().fit([1, 2], [5.0, 11.0], [10.0, 10.0])
    with pytest.raises(ValueError, match="recency must be 0 where frequency is 0"):
        BGNBDModel().fit([0, 2], [3.0, 5.0], [10.0, 10.0])
    with pytest.raises(ValueError, match="whole number"):
        BGNBDModel().fit([0.5, 2], [0.0, 5.0], [10.0, 10.0])
    with pytest.raises(ValueError, match="missing or infinite"):
        BGNBDModel().fit([1, 2], [np.nan, 5.0], [10.0, 10.0])
    with pytest.raises(ValueError, match="differ in length"):
        BGNBDModel().fit([1, 2], [1.0, 5.0], [10.0, 10.0], weights=[1, 2, 3])
    with pytest.raises(ValueError, match="penalizer_coef"):
        BGNBDModel(penalizer_coef=-1)


# ---- persistence ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, cdnow_bgnbd):
    path = cdnow_bgnbd.save(tmp_path / "bgnbd.json")
    document = json.loads(path.read_text())
    assert document["format_version"] == 1 and document["model"] == "bgnbd"
    assert document["hyperparameters"] == {"penalizer_coef": 0.0, "fallback_penalizers": [0.001, 0.01],
                                           "fallback_restart": True, "time_unit": "weeks"}
    assert set(document["params"]) == {"r", "alpha", "a", "b"}
    loaded = BGNBDModel.load(path)
    assert loaded.params_ == cdnow_bgnbd.params_
    assert loaded.time_unit == "weeks"
    assert loaded.fit_info_["log_likelihood"] == cdnow_bgnbd.fit_info_["log_likelihood"]
    x, recency, T = [0, 2, 7], [0.0, 30.43, 20.0], [38.86, 38.86, 30.0]
    assert np.array_equal(loaded.expected_purchases(39, x, recency, T),
                          cdnow_bgnbd.expected_purchases(39, x, recency, T))
    assert np.array_equal(loaded.p_alive(x, recency, T), cdnow_bgnbd.p_alive(x, recency, T))
    assert type(models.load_model(path)) is BGNBDModel


def test_load_rejects_other_format_version_and_other_model(tmp_path, cdnow_bgnbd):
    path = cdnow_bgnbd.save(tmp_path / "bgnbd.json")
    document = json.loads(path.read_text())
    document["format_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="format_version is 2"):
        BGNBDModel.load(tmp_path / "v2.json")
    with pytest.raises(ValueError, match="format_version is 2"):
        models.load_model(tmp_path / "v2.json")
    with pytest.raises(ValueError, match="holds model 'bgnbd', not 'paretonbd'"):
        ParetoNBDModel.load(path)
    document["format_version"] = 1
    document["params"]["alpha"] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="finite and > 0"):
        BGNBDModel.load(tmp_path / "bad.json")


def test_unfitted_model_cannot_predict_or_save(tmp_path):
    with pytest.raises(models.NotFittedError, match="not fitted"):
        BGNBDModel().expected_purchases(10, 1, 1.0, 2.0)
    with pytest.raises(models.NotFittedError):
        ParetoNBDModel().save(tmp_path / "x.json")


def test_registry_builds_models_by_name():
    model = models.make_model("paretonbd", penalizer_coef=0.01)
    assert isinstance(model, ParetoNBDModel) and model.penalizer_coef == 0.01
    assert {"bgnbd", "paretonbd", "mbgnbd", "gamma_gamma"} <= set(models.MODEL_REGISTRY)
    with pytest.raises(ValueError, match="unknown model 'bgnbdx'"):
        models.make_model("bgnbdx")
