"""Beta-binomial cancellation rates: shrinkage by hand, MLE against scipy's beta-binomial, fallbacks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import models
from models import CancellationRateModel


def test_shrinkage_by_hand():
    model = CancellationRateModel.from_dict({"format_version": 1, "model": "cancellation", "hyperparameters": {},
                                             "params": {"alpha": 2.0, "beta": 18.0}})
    # prior mean 2 / 20 = 0.10; posterior mean (alpha + k) / (alpha + beta + n)
    assert model.prior_mean == pytest.approx(0.10)
    rates = model.predict([0, 1, 10, 100, 4], [0, 1, 5, 50, 1.5])
    assert rates == pytest.approx([2 / 20, 3 / 21, 7 / 30, 52 / 120, 3.5 / 24])
    # one cancelled order out of one: 1.0 raw, pulled to 3/21 = 0.143; 50 of 100 stays near 0.5
    assert rates[1] < 0.15 and abs(rates[3] - 0.5) < 0.07


@pytest.fixture(scope="module")
def simulated():
    rng = np.random.default_rng(2024)
    n_customers = 5000
    p = rng.beta(0.6, 5.4, n_customers)                  # population rate 0.10
    n = rng.integers(1, 15, n_customers)
    k = rng.binomial(n, p)
    rows = pd.DataFrame({"n": n, "k": k}).groupby(["n", "k"]).size().rename("count").reset_index()
    return n, k, rows


def test_mle_is_the_maximum_of_scipys_beta_binomial_likelihood(simulated):
    n, k, rows = simulated
    model = CancellationRateModel().fit(rows.n, rows.k, rows["count"])
    assert model.fit_info_["method"] == "mle"
    alpha, beta = model.params_["alpha"], model.params_["beta"]

    def log_likelihood(a, b):
        return float(np.sum(stats.betabinom.logpmf(k, n, a, b)))

    best = log_likelihood(alpha, beta)
    assert model.fit_info_["log_likelihood"] == pytest.approx(best, rel=1e-9)
    for da, db in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99), (1.01, 1.01), (0.99, 0.99), (1.01, 0.99)]:
        assert log_likelihood(alpha * da, beta * db) < best
    # and it recovers the simulated prior (SE of alpha, beta about 5% at this size)
    assert alpha == pytest.approx(0.6, rel=0.2) and beta == pytest.approx(5.4, rel=0.2)
    assert model.prior_mean == pytest.approx(0.10, abs=0.01)


def test_weighted_fit_equals_unweighted(simulated):
    n, k, rows = simulated
    weighted = CancellationRateModel().fit(rows.n, rows.k, rows["count"])
    full = CancellationRateModel().fit(n, k)
    for name in ("alpha", "beta"):
        assert weighted.params_[name] == pytest.approx(full.params_[name], rel=1e-5)


def test_no_cancellations_falls_back_to_pooled_rate_with_fixed_strength():
    model = CancellationRateModel(fallback_prior_strength=10.0).fit([1, 2, 3], [0, 0, 0], weights=[50, 30, 20])
    info = model.fit_info_
    assert info["method"] == "pooled" and info["reason"] == "no cancellations in the data"
    # K = 0 cancelled of N = 50 + 60 + 60 = 170 orders: rate (0 + 0.5) / 171, strength 10
    rate = 0.5 / 171
    assert model.params_["alpha"] == pytest.approx(10 * rate)
    assert model.params_["beta"] == pytest.approx(10 * (1 - rate))
    assert model.predict([4], [0])[0] == pytest.approx(10 * rate / 14)
    assert np.all(model.predict([1, 2], [1, 0]) > 0)


def test_tiny_data_falls_back():
    model = CancellationRateModel(min_customers=30).fit([2, 3, 1], [1, 0, 1])
    assert model.fit_info_["method"] == "pooled" and "min_customers=30" in model.fit_info_["reason"]
    # K = 2 of N = 6: (2 + 0.5) / 7
    assert model.prior_mean == pytest.approx(2.5 / 7)


def test_no_extra_binomial_spread_gives_the_pooled_rate_at_the_strength_cap():
    # every customer cancelled exactly 1 of 20 orders: less spread than binomial noise, so the
    # likelihood keeps rising with alpha + beta; the cap stops it and everyone gets 0.05
    model = CancellationRateModel(max_prior_strength=1e5).fit([20], [1], weights=[500])
    info = model.fit_info_
    assert info["method"] == "mle" and info["prior_strength_at_cap"]
    assert info["prior_strength"] == pytest.approx(1e5)
    assert model.prior_mean == pytest.approx(0.05, rel=1e-3)
    # a customer with 10 of 20 cancelled barely moves: (5000 + 10) / (100000 + 20)
    assert model.predict([20, 1], [10, 1]) == pytest.approx([5010 / 100020, 5001 / 100001], rel=1e-3)


def test_input_checks():
    with pytest.raises(ValueError, match="cannot exceed"):
        CancellationRateModel().fit([1, 2], [2, 0])
    with pytest.raises(ValueError, match="whole numbers"):
        CancellationRateModel().fit([1, 2], [0.5, 0])
    with pytest.raises(ValueError, match="nothing to fit"):
        CancellationRateModel().fit([0, 0], [0, 0])


def test_save_load_round_trip(tmp_path, simulated):
    _, _, rows = simulated
    model = CancellationRateModel().fit(rows.n, rows.k, rows["count"])
    loaded = models.load_model(model.save(tmp_path / "c.json"))
    assert isinstance(loaded, CancellationRateModel) and loaded.params_ == model.params_
    assert loaded.fit_info_["method"] == "mle"
    assert np.array_equal(loaded.predict([3, 0], [1, 0]), model.predict([3, 0], [1, 0]))
