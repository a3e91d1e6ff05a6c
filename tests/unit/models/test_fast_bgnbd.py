"""The fast BG/NBD fit (models.fast_bgnbd) against published values, lifetimes and finite differences."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

import models
from models import BGNBDModel, fast_bgnbd
from tests.unit.models.helpers import simulate_bgnbd, unique_rows

RFM = ["frequency", "recency", "T"]
PUBLISHED = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}      # Fader, Hardie & Lee (2005), weeks


def rel_diff(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


def lifetimes_objective(log_params, frequency, recency, T, weights, penalizer_coef, modified=False):
    """lifetimes' own BG/NBD (or MBG/NBD) objective (autograd-numpy code, evaluated as plain numpy)."""
    from lifetimes import BetaGeoFitter, ModifiedBetaGeoFitter

    fitter = ModifiedBetaGeoFitter if modified else BetaGeoFitter
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(fitter._negative_log_likelihood(np.asarray(log_params, float), frequency, recency, T,
                                                     weights, penalizer_coef))


@pytest.fixture(scope="module")
def cdnow_rows(cdnow):
    return unique_rows(cdnow, RFM)


@pytest.fixture(scope="module")
def cdnow_fits(cdnow_rows):
    args = (cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    return {backend: BGNBDModel(time_unit="weeks", backend=backend).fit(*args) for backend in ("fast", "lifetimes")}


@pytest.fixture(scope="module")
def simulated_days():
    """6000 customers at day resolution (whole days, as the Spark features deliver them)."""
    T = np.random.default_rng(21).integers(30, 731, 6000).astype(float)
    data = simulate_bgnbd(6000, r=0.5, alpha=30.0, a=0.6, b=3.0, T=T, seed=4)
    data["recency"] = np.floor(data.recency)
    return data


# ---- (a) CDNOW: published values and the lifetimes backend -------------------------------------------
def test_fast_fit_reproduces_published_cdnow_values(cdnow_fits):
    fast = cdnow_fits["fast"]
    assert fast.fit_info_["backend"] == "fast"
    assert fast.fit_info_["converged"] and not fast.fit_info_["fallback_used"]
    for name, value in PUBLISHED.items():
        assert rel_diff(fast.params_[name], value) < 0.005, (name, fast.params_[name])
    assert fast.fit_info_["log_likelihood"] == pytest.approx(-9582.4, abs=0.5)       # same paper


def test_fast_fit_equals_the_lifetimes_backend_on_cdnow(cdnow_fits):
    fast, slow = cdnow_fits["fast"], cdnow_fits["lifetimes"]
    assert slow.fit_info_["backend"].startswith("lifetimes ")
    for name in BGNBDModel.param_names:
        assert rel_diff(fast.params_[name], slow.params_[name]) < 1e-5, name
    assert fast.fit_info_["log_likelihood"] == pytest.approx(slow.fit_info_["log_likelihood"], rel=1e-9)
    # standard errors from the finite-difference Hessian vs lifetimes' autograd Hessian
    for name in BGNBDModel.param_names:
        assert rel_diff(fast.fit_info_["standard_errors"][name], slow.fit_info_["standard_errors"][name]) < 1e-4


def test_the_default_backend_is_fast_and_make_model_accepts_the_choice():
    assert BGNBDModel().backend == "fast"
    assert models.make_model("bgnbd", backend="lifetimes").backend == "lifetimes"
    with pytest.raises(ValueError, match="backend must be one of"):
        BGNBDModel(backend="numba")


# ---- (b) the objective and its analytic gradient ------------------------------------------------------
POINTS = [np.log([0.243, 4.414 / 78.86, 0.793, 2.426]),           # the CDNOW optimum in internal units
          np.zeros(4), np.array([-1.5, 2.0, 0.7, -0.4]), np.array([1.0, -3.0, -2.0, 3.0])]


@pytest.mark.parametrize("modified", [False, True], ids=["bgnbd", "mbgnbd"])
@pytest.mark.parametrize("penalizer", [0.0, 0.05])
@pytest.mark.parametrize("point", range(len(POINTS)))
def test_objective_equals_lifetimes_and_gradient_equals_finite_differences(cdnow_rows, point, penalizer, modified):
    frequency, recency, T = (cdnow_rows[c].to_numpy(float) for c in RFM)
    weights = cdnow_rows.n.to_numpy(float)
    scale = T.max()
    rows = fast_bgnbd.compress(frequency, recency / scale, T / scale, weights, modified=modified)
    # MBG/NBD: every row has the log-sum-exp term; BG/NBD: the rows with repeat purchases
    assert len(rows.pos_x) == (len(frequency) if modified else int((frequency > 0).sum()))
    x0 = POINTS[point]
    value, gradient = fast_bgnbd.negative_log_likelihood(x0, rows, penalizer)
    expected = lifetimes_objective(x0, frequency, recency / scale, T / scale, weights, penalizer, modified)
    assert value == pytest.approx(expected, rel=1e-12)
    other = lifetimes_objective(x0, frequency, recency / scale, T / scale, weights, penalizer, not modified)
    assert value != pytest.approx(other, rel=1e-6)               # the two likelihoods really differ

    def f(z):
        return fast_bgnbd.negative_log_likelihood(z, rows, penalizer)[0]

    def g(z):
        return fast_bgnbd.negative_log_likelihood(z, rows, penalizer)[1]

    error = optimize.check_grad(f, g, x0)
    assert error < 1e-6 * max(1.0, float(np.linalg.norm(gradient))), (error, gradient)


def test_gradient_on_simulated_day_rows(simulated_days):
    rows = fast_bgnbd.compress(simulated_days.frequency, simulated_days.recency / 730, simulated_days["T"] / 730,
                               np.ones(len(simulated_days)))
    for x0 in (np.log([0.5, 30 / 730, 0.6, 3.0]), np.array([0.3, -2.0, -0.5, 1.5])):
        _, gradient = fast_bgnbd.negative_log_likelihood(x0, rows, 0.01)
        error = optimize.check_grad(lambda z: fast_bgnbd.negative_log_likelihood(z, rows, 0.01)[0],
                                    lambda z: fast_bgnbd.negative_log_likelihood(z, rows, 0.01)[1], x0)
        assert error < 1e-6 * max(1.0, float(np.linalg.norm(gradient)))


def test_compress_keeps_only_distinct_values(simulated_days):
    rows = fast_bgnbd.compress(simulated_days.frequency, simulated_days.recency, simulated_days["T"],
                               np.ones(len(simulated_days)))
    # whole days: at most 701 distinct T (30..730) and 731 distinct recencies for 6000 rows
    assert len(rows.T) <= 701 and len(rows.t) <= 731 and len(rows.x) < 100
    assert rows.total_weight == len(simulated_days) == rows.x_weight.sum() == rows.T_weight.sum()
    assert len(rows.pos_x) == int((simulated_days.frequency > 0).sum())
    assert np.array_equal(rows.T[rows.pos_T_index], simulated_days["T"][simulated_days.frequency > 0])


# ---- (c) simulated data: fast == lifetimes, with and without a penalizer ------------------------------
@pytest.mark.parametrize("penalizer", [0.0, 0.01])
def test_fast_equals_lifetimes_backend_on_simulated_days(simulated_days, penalizer):
    rows = unique_rows(simulated_days, RFM)
    args = (rows.frequency, rows.recency, rows["T"], rows.n)
    fast = BGNBDModel(penalizer_coef=penalizer, backend="fast").fit(*args)
    slow = BGNBDModel(penalizer_coef=penalizer, backend="lifetimes").fit(*args)
    assert (fast.fit_info_["penalizer"], slow.fit_info_["penalizer"]) == (penalizer, penalizer)
    for name in BGNBDModel.param_names:
        assert rel_diff(fast.params_[name], slow.params_[name]) < 1e-4, (name, fast.params_, slow.params_)
    if penalizer:
        # really penalised: visibly away from the unpenalised fit
        free = BGNBDModel(backend="fast").fit(*args)
        assert max(rel_diff(fast.params_[k], free.params_[k]) for k in fast.params_) > 1e-3


def test_pure_numpy_fit_equals_the_model_fit(simulated_days):
    fit = fast_bgnbd.fit_bgnbd(simulated_days.frequency, simulated_days.recency, simulated_days["T"])
    model = BGNBDModel().fit(simulated_days.frequency, simulated_days.recency, simulated_days["T"])
    for name in BGNBDModel.param_names:
        assert rel_diff(fit.params[name], model.params_[name]) < 1e-8
    assert fit.log_likelihood == pytest.approx(model.fit_info_["log_likelihood"], rel=1e-10)
    assert fit.time_scale == 730
    # the reported log-likelihood is in the caller's unit: the plain formula at the fitted params
    assert fit.log_likelihood == pytest.approx(
        fast_bgnbd.log_likelihood(fit.params, simulated_days.frequency, simulated_days.recency, simulated_days["T"]),
        rel=1e-10)


def test_log_likelihood_in_another_time_unit_differs_by_the_purchase_time_density(cdnow_rows):
    # days = 7 x weeks: each purchase time's density is per unit of time, so LL_days = LL_weeks - sum(x) ln 7
    weeks = fast_bgnbd.fit_bgnbd(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    days = fast_bgnbd.fit_bgnbd(cdnow_rows.frequency, 7 * cdnow_rows.recency, 7 * cdnow_rows["T"], cdnow_rows.n)
    assert days.params["alpha"] == pytest.approx(7 * weeks.params["alpha"], rel=1e-8)
    total_x = float((cdnow_rows.frequency * cdnow_rows.n).sum())
    assert days.log_likelihood == pytest.approx(weeks.log_likelihood - total_x * math.log(7), rel=1e-10)


# ---- (d) weights are exact -------------------------------------------------------------------------------
def test_weighted_fit_on_unique_rows_equals_fit_on_expanded_rows(simulated_days):
    rows = unique_rows(simulated_days, RFM)
    assert len(rows) < 0.8 * len(simulated_days)               # day resolution really repeats rows
    weighted = BGNBDModel().fit(rows.frequency, rows.recency, rows["T"], rows.n)
    expanded = BGNBDModel().fit(simulated_days.frequency, simulated_days.recency, simulated_days["T"])
    for name in BGNBDModel.param_names:
        assert rel_diff(weighted.params_[name], expanded.params_[name]) < 1e-7, name
    assert weighted.fit_info_["log_likelihood"] == pytest.approx(expanded.fit_info_["log_likelihood"], rel=1e-10)
    assert weighted.fit_info_["n_customers"] == expanded.fit_info_["n_customers"] == len(simulated_days)


# ---- convergence checks and the fallback ladder ----------------------------------------------------------
def test_no_observed_dropout_is_not_converged_without_a_penalizer():
    # Every customer bought 5 times and was active to the end: the likelihood keeps rising towards
    # a -> 0 (nobody drops out), so there is no interior maximum.
    T = np.linspace(10, 300, 200)
    frequency, recency = np.full(200, 5.0), 0.99 * T
    with pytest.raises(fast_bgnbd.ConvergenceFailure, match="likelihood has no unique maximum"):
        fast_bgnbd.fit_bgnbd(frequency, recency, T)
    penalised = fast_bgnbd.fit_bgnbd(frequency, recency, T, penalizer_coef=0.001)    # accepted, as lifetimes does
    assert penalised.params["a"] < 1e-8


def test_a_failed_fast_attempt_moves_down_the_ladder(monkeypatch, cdnow_rows):
    original = fast_bgnbd.minimize
    calls = []

    def minimize(rows, penalizer_coef=0.0, initial_log_params=None):
        calls.append((penalizer_coef, initial_log_params))
        if len(calls) == 1:
            raise fast_bgnbd.ConvergenceFailure("forced")
        return original(rows, penalizer_coef, initial_log_params)

    monkeypatch.setattr(fast_bgnbd, "minimize", minimize)
    model = BGNBDModel().fit(cdnow_rows.frequency, cdnow_rows.recency, cdnow_rows["T"], cdnow_rows.n)
    assert [c[0] for c in calls] == [0.0, 0.001]
    assert calls[0][1] is None                                   # default start: moment-based
    assert model.fit_info_["failed_attempts"] == [{"penalizer": 0.0, "start": "default",
                                                   "error": "ConvergenceFailure: forced"}]
    assert model.fit_info_["penalizer"] == 0.001 and model.fit_info_["backend"] == "fast"


def test_restart_start_reaches_the_same_optimum(cdnow_rows, cdnow_fits):
    frequency, recency, T = (cdnow_rows[c].to_numpy(float) for c in RFM)
    scale = T.max()
    rows = fast_bgnbd.compress(frequency, recency / scale, T / scale, cdnow_rows.n.to_numpy(float))
    for start in (np.full(4, 0.1), np.log([1.0, 0.05, 1.0, 3.0]), fast_bgnbd.moment_start(rows)):
        optimum = fast_bgnbd.minimize(rows, 0.0, start)
        params = np.exp(optimum.log_params) * [1, scale, 1, 1]
        for value, name in zip(params, BGNBDModel.param_names):
            assert rel_diff(value, cdnow_fits["fast"].params_[name]) < 1e-7
        assert np.max(np.abs(optimum.gradient)) < fast_bgnbd.STATIONARY_RTOL * max(1.0, abs(optimum.objective))


# ---- persistence ------------------------------------------------------------------------------------------
def test_save_load_keeps_the_backend(tmp_path, cdnow_fits):
    fast_doc = json.loads(cdnow_fits["fast"].save(tmp_path / "fast.json").read_text())
    assert "backend" not in fast_doc["hyperparameters"]       # default: the file reads as before
    assert fast_doc["fit_info"]["backend"] == "fast"
    assert BGNBDModel.load(tmp_path / "fast.json").backend == "fast"
    slow_doc = json.loads(cdnow_fits["lifetimes"].save(tmp_path / "slow.json").read_text())
    assert slow_doc["hyperparameters"]["backend"] == "lifetimes"
    loaded = models.load_model(tmp_path / "slow.json")
    assert loaded.backend == "lifetimes" and loaded.params_ == cdnow_fits["lifetimes"].params_
    # a file written before the backend existed
    old = {"format_version": 1, "model": "bgnbd", "params": PUBLISHED,
           "hyperparameters": {"penalizer_coef": 0.0, "fallback_penalizers": [0.001, 0.01],
                               "fallback_restart": True, "time_unit": "weeks"},
           "fit_info": {"backend": "lifetimes 0.11.3"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    old_model = BGNBDModel.load(tmp_path / "old.json")
    assert old_model.backend == "fast" and old_model.params_ == PUBLISHED
    assert old_model.expected_purchases(39, 2, 30.43, 38.86)[0] == pytest.approx(1.226, abs=5e-4)


# ---- scoring: the distinct-value closed form equals lifetimes' -------------------------------------------
def test_conditional_expected_purchases_equals_lifetimes_formula():
    from lifetimes import BetaGeoFitter

    rng = np.random.default_rng(8)
    n = 4000
    T = rng.integers(0, 1500, n).astype(float)
    frequency = np.where(rng.random(n) < 0.3, 0, rng.integers(1, 400, n)).astype(float)
    recency = np.where(frequency > 0, np.floor(T * rng.random(n)), 0.0)
    t = rng.choice([0.0, 30.0, 182.5, 3650.0], n)
    params = {"r": 0.8, "alpha": 20.0, "a": 0.5, "b": 3.0}
    fitter = BetaGeoFitter()
    fitter.params_ = pd.Series(params)
    # whole days (few distinct values), a scalar horizon, and continuous times (all distinct)
    continuous_T = T + rng.random(n)
    cases = [(t, frequency, recency, T), (182.5, frequency, recency, T),
             (t, frequency, recency * continuous_T / np.maximum(T, 1), continuous_T)]
    for horizon, x, tx, age in cases:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            expected = fitter.conditional_expected_number_of_purchases_up_to_time(horizon, x, tx, age)
            ours = fast_bgnbd.conditional_expected_purchases(list(params.values()), horizon, x, tx, age)
        finite = np.isfinite(expected)
        assert finite.mean() > 0.9
        assert np.array_equal(np.isfinite(ours), finite)
        assert ours[finite] == pytest.approx(expected[finite], rel=1e-13, abs=1e-300)
    # scalar inputs keep their shape; the model applies its guards on top
    assert fast_bgnbd.conditional_expected_purchases([0.243, 4.414, 0.793, 2.426], 39, 2, 30.43, 38.86).shape == ()
    assert fast_bgnbd.conditional_expected_purchases([0.243, 4.414, 0.793, 2.426], 39, [], [], []).shape == (0,)
    model = BGNBDModel.from_dict({"format_version": 1, "model": "bgnbd", "hyperparameters": {}, "params": params})
    values = model.expected_purchases(t, frequency, recency, T)
    assert np.all(np.isfinite(values)) and np.all(values >= 0)


# ---- (f) MBG/NBD: the same machinery with the modified likelihood -------------------------------------
@pytest.mark.parametrize("penalizer", [0.0, 0.01])
def test_fast_mbg_equals_the_lifetimes_backend(cdnow_rows, simulated_days, penalizer):
    from models import MBGNBDModel

    assert MBGNBDModel().backend == "fast"
    for data, unit in ((cdnow_rows, "weeks"), (unique_rows(simulated_days, RFM), "days")):
        args = (data.frequency, data.recency, data["T"], data.n)
        fast = MBGNBDModel(penalizer_coef=penalizer, time_unit=unit).fit(*args)
        slow = MBGNBDModel(penalizer_coef=penalizer, time_unit=unit, backend="lifetimes").fit(*args)
        assert fast.fit_info_["backend"] == "fast" and slow.fit_info_["backend"].startswith("lifetimes ")
        assert fast.fit_info_["penalizer"] == slow.fit_info_["penalizer"] == penalizer
        for name in MBGNBDModel.param_names:
            assert rel_diff(fast.params_[name], slow.params_[name]) < 1e-4, (name, fast.params_, slow.params_)
        assert fast.fit_info_["log_likelihood"] == pytest.approx(slow.fit_info_["log_likelihood"], rel=1e-7)
