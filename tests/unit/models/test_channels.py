"""Per-channel parameters shrunk towards the pooled fit (models/channels.py).

Simulated BG/NBD and Gamma-Gamma worlds (numpy, seeded): a pooled population, a 50,000-customer
channel and a 30-customer channel with other true parameters. The small channel must stay near the
pooled fit, the large one must get close to its own truth.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifetimes import GammaGammaFitter

from models import BGNBDModel, GammaGammaModel, MBGNBDModel
from models import intervals as iv
from models.channels import (ChannelComponents, fit_channel_components, fit_purchase_by_channel,
                             fit_spend_by_channel, gamma_gamma_negative_log_likelihood, pooled_prior)
from tests.unit.models.helpers import simulate_bgnbd

POOL_TRUTH = {"r": 0.8, "alpha": 60.0, "a": 0.8, "b": 6.0}
CHANNEL_TRUTH = {"r": 1.5, "alpha": 20.0, "a": 0.5, "b": 8.0}     # ~4x the purchase rate
NAMES = ("r", "alpha", "a", "b")


def _customers(n: int, truth: dict, seed: int) -> pd.DataFrame:
    ages = np.random.default_rng(seed + 100).uniform(30, 700, n).round()
    df = simulate_bgnbd(n, truth["r"], truth["alpha"], truth["a"], truth["b"], ages, seed)
    df["recency"] = df["recency"].round()          # day resolution, as the features table
    return df


@pytest.fixture(scope="module")
def purchase_world():
    customers = pd.concat([_customers(100_000, POOL_TRUTH, 1).assign(channel="web"),
                           _customers(50_000, CHANNEL_TRUTH, 2).assign(channel="large"),
                           _customers(30, CHANNEL_TRUTH, 3).assign(channel="small")], ignore_index=True)
    by_channel = customers.groupby(["channel", "frequency", "recency", "T"]).size().rename("weight").reset_index()
    pooled_rows = by_channel.groupby(["frequency", "recency", "T"])["weight"].sum().reset_index()
    return customers, by_channel, pooled_rows


def _log_distance(params: dict, reference: dict) -> np.ndarray:
    return np.array([abs(np.log(params[k]) - np.log(reference[k])) for k in NAMES])


@pytest.mark.parametrize("model_class", [BGNBDModel, MBGNBDModel])
def test_small_channel_stays_pooled_large_channel_gets_its_own(purchase_world, model_class):
    _, by_channel, pooled_rows = purchase_world
    pooled = model_class().fit(pooled_rows["frequency"], pooled_rows["recency"], pooled_rows["T"],
                               weights=pooled_rows["weight"])
    fitted, fallbacks = fit_purchase_by_channel(pooled, by_channel, prior_customers=1000, min_customers=1)
    assert fallbacks == {} and set(fitted) == {"large", "small", "web"}
    # the pooled fit is a mixture; the channels' truth is far from it: r and the mean rate r / alpha (> 30%)
    gap = _log_distance(pooled.params_, CHANNEL_TRUTH)
    pooled_rate = pooled.params_["r"] / pooled.params_["alpha"]
    assert gap[0] > 0.3 and abs(np.log(pooled_rate * 20.0 / 1.5)) > 0.3, pooled.params_
    # 30 customers vs a prior worth 1,000: r moves < 10% of the way to the channel truth, no parameter > 6%
    moved = _log_distance(fitted["small"].params_, pooled.params_)
    assert moved[0] < 0.1 * gap[0] and np.all(moved < 0.06), (fitted["small"].params_, pooled.params_)
    if model_class is BGNBDModel:
        # 50,000 customers: within 5% of the channel's truth (r, alpha) and 10% (a, b): its own parameters
        own = _log_distance(fitted["large"].params_, CHANNEL_TRUTH)
        assert np.all(own < np.array([0.05, 0.05, 0.1, 0.1])), fitted["large"].params_
    # and far closer to its own maximum-likelihood fit than to the pooled one
    large_rows = by_channel[by_channel["channel"] == "large"]
    unshrunk = model_class().fit(large_rows["frequency"], large_rows["recency"], large_rows["T"],
                                 weights=large_rows["weight"])
    to_own = _log_distance(fitted["large"].params_, unshrunk.params_)
    to_pooled = _log_distance(fitted["large"].params_, pooled.params_)
    assert np.all(to_own < 0.1 * to_pooled + 0.005), (fitted["large"].params_, unshrunk.params_)
    # the posterior of a 50k channel is far tighter than that of a 30-customer one, which stays near the prior's
    variance = {c: np.diag(np.asarray(fitted[c].fit_info_["log_param_covariance"]["matrix"])) for c in fitted}
    assert np.all(variance["large"] < variance["small"] / 10)


def test_min_customers_and_null_channel_score_pooled(purchase_world):
    _, by_channel, pooled_rows = purchase_world
    pooled = BGNBDModel().fit(pooled_rows["frequency"], pooled_rows["recency"], pooled_rows["T"],
                              weights=pooled_rows["weight"])
    with_null = pd.concat([by_channel, by_channel[by_channel["channel"] == "small"].assign(channel=None)])
    fitted, fallbacks = fit_purchase_by_channel(pooled, with_null, prior_customers=1000, min_customers=100)
    assert set(fitted) == {"large", "web"}
    assert set(fallbacks) == {"small"} and "30 customers" in fallbacks["small"]


def test_prior_strength_is_what_moves_the_small_channel(purchase_world):
    _, by_channel, pooled_rows = purchase_world
    pooled = BGNBDModel().fit(pooled_rows["frequency"], pooled_rows["recency"], pooled_rows["T"],
                              weights=pooled_rows["weight"])
    small = by_channel[by_channel["channel"] == "small"]
    strong, _ = fit_purchase_by_channel(pooled, small, prior_customers=10_000, min_customers=1)
    weak, _ = fit_purchase_by_channel(pooled, small, prior_customers=3, min_customers=1)
    moved_strong = _log_distance(strong["small"].params_, pooled.params_).sum()
    moved_weak = _log_distance(weak["small"].params_, pooled.params_).sum()
    assert moved_strong < 0.05 < moved_weak and moved_weak > 5 * moved_strong


def test_prior_precision_is_the_pooled_information_per_customer_times_k(purchase_world):
    _, _, pooled_rows = purchase_world
    pooled = BGNBDModel().fit(pooled_rows["frequency"], pooled_rows["recency"], pooled_rows["T"],
                              weights=pooled_rows["weight"])
    prior = pooled_prior(pooled, 500)
    covariance = np.asarray(pooled.fit_info_["log_param_covariance"]["matrix"])
    n_pool = pooled.fit_info_["n_customers"]
    assert n_pool == 150_030
    # k customers' worth of information: the prior's covariance is the pooled one scaled by N / k
    np.testing.assert_allclose(np.linalg.inv(prior.precision), covariance * n_pool / 500, rtol=1e-8)
    np.testing.assert_allclose(np.exp(prior.centre), [pooled.params_[k] for k in NAMES], rtol=1e-12)


def test_gamma_gamma_likelihood_and_gradient_match_lifetimes():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 6, 40).astype(float)
    m = rng.gamma(3.0, 2000.0, 40)
    w = rng.integers(1, 5, 40).astype(float)
    theta = np.log([2.0, 3.0, 500.0])
    value, gradient = gamma_gamma_negative_log_likelihood(x, m, w)(theta)
    assert value == pytest.approx(GammaGammaFitter._negative_log_likelihood(theta, x, m, w, 0.0) * w.sum(),
                                  rel=1e-12)
    step = 1e-6
    numeric = [(gamma_gamma_negative_log_likelihood(x, m, w)(theta + step * e)[0]
                - gamma_gamma_negative_log_likelihood(x, m, w)(theta - step * e)[0]) / (2 * step) for e in np.eye(3)]
    np.testing.assert_allclose(gradient, numeric, rtol=1e-6)


def _spend_rows(n: int, p: float, q: float, v: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 8, n)
    nu = rng.gamma(q, 1.0 / v, n)
    mean_value = np.array([rng.gamma(p, 1.0 / nu_i, k).mean() for nu_i, k in zip(nu, x)]).round()
    return pd.DataFrame({"frequency": x.astype(float), "monetary_value": np.maximum(mean_value, 1.0)})


def test_gamma_gamma_channels_shrink_by_size():
    pool = {"p": 6.0, "q": 4.0, "v": 3500.0}
    richer = {"p": 6.0, "q": 4.0, "v": 7000.0}              # twice the mean order value
    rows = pd.concat([_spend_rows(40_000, **pool, seed=1).assign(channel="web"),
                      _spend_rows(20_000, **richer, seed=2).assign(channel="large"),
                      _spend_rows(30, **richer, seed=3).assign(channel="small")], ignore_index=True)
    stats = rows.groupby(["channel", "frequency", "monetary_value"]).size().rename("weight").reset_index()
    pooled_rows = stats.groupby(["frequency", "monetary_value"])["weight"].sum().reset_index()
    pooled = GammaGammaModel().fit(pooled_rows["frequency"], pooled_rows["monetary_value"], pooled_rows["weight"])
    fitted, fallbacks = fit_spend_by_channel(pooled, stats, prior_customers=1000, min_customers=1)
    assert fallbacks == {}
    mean_value = {c: m.population_mean_order_value() for c, m in fitted.items()}
    pooled_mean = pooled.population_mean_order_value()
    true_richer = 6.0 * 7000.0 / 3.0
    assert abs(mean_value["large"] / true_richer - 1) < 0.05, mean_value
    assert abs(mean_value["small"] / pooled_mean - 1) < 0.05, (mean_value, pooled_mean)
    assert true_richer / pooled_mean > 1.3                  # the pooled mean is far from the richer channel's


def test_channel_components_round_trip(purchase_world):
    _, by_channel, pooled_rows = purchase_world
    pooled = BGNBDModel().fit(pooled_rows["frequency"], pooled_rows["recency"], pooled_rows["T"],
                              weights=pooled_rows["weight"])
    spend_rows = _spend_rows(3000, 6.0, 4.0, 3500.0, seed=4).assign(channel=np.repeat(["web", "large"], 1500))
    spend_stats = spend_rows.groupby(["channel", "frequency", "monetary_value"]).size().rename("weight").reset_index()
    spend = GammaGammaModel().fit(spend_rows["frequency"], spend_rows["monetary_value"])
    components = fit_channel_components(pooled, spend, by_channel, spend_stats, prior_customers=1000,
                                        min_customers=100)
    again = ChannelComponents.from_dict(components.to_dict())
    assert again.channels == components.channels == ["large", "web"]
    for channel in again.purchase:
        assert again.purchase[channel].params_ == components.purchase[channel].params_
        assert again.purchase[channel].fit_info_["log_param_covariance"] == \
            components.purchase[channel].fit_info_["log_param_covariance"]
    assert again.fallbacks["purchase"] == {"small": "30 customers < min_customers 100"}
    assert set(again.describe()) == {"large", "web"}


# ---- the scoring bundle with channel components ----------------------------------------------------
HORIZON_DAYS = 182.625
APP_PURCHASE = {"r": 1.5, "alpha": 20.0, "a": 0.5, "b": 8.0}
APP_SPEND = {"p": 4.0, "q": 5.0, "v": 600.0}
WEB_PURCHASE = {"r": 0.8, "alpha": 60.0, "a": 0.8, "b": 6.0}
WEB_SPEND = {"p": 4.0, "q": 5.0, "v": 300.0}


def _simulated_channel(n: int, purchase: dict, spend: dict, channel, seed: int) -> pd.DataFrame:
    from tests.unit.models.helpers import simulate_bgnbd_gamma_gamma

    ages = np.random.default_rng(seed).uniform(30, 700, n).round()
    customers = simulate_bgnbd_gamma_gamma(n, purchase, spend, ages, HORIZON_DAYS, seed=seed + 1)
    return customers.assign(acquisition_channel=channel)


@pytest.fixture(scope="module")
def channel_bundles():
    from models.bundle import ScoringBundle
    from models.cancellation import CancellationRateModel

    customers = pd.concat([_simulated_channel(8000, WEB_PURCHASE, WEB_SPEND, "web", 11),
                           _simulated_channel(8000, APP_PURCHASE, APP_SPEND, "app", 12),
                           _simulated_channel(30, APP_PURCHASE, APP_SPEND, "tiny", 13),
                           _simulated_channel(20, APP_PURCHASE, APP_SPEND, None, 14)], ignore_index=True)
    customers["customer_id"] = [f"C{i}" for i in range(len(customers))]
    repeat = customers[customers["frequency"] > 0]
    purchase = BGNBDModel().fit(customers["frequency"], customers["recency"], customers["T"])
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary"])
    keyed = customers.rename(columns={"acquisition_channel": "channel", "monetary": "monetary_value"})
    rfm = keyed.groupby(["channel", "frequency", "recency", "T"], dropna=False).size().rename("weight").reset_index()
    spend_stats = (keyed[keyed["frequency"] > 0].groupby(["channel", "frequency", "monetary_value"], dropna=False)
                   .size().rename("weight").reset_index())
    components = fit_channel_components(purchase, spend, rfm, spend_stats, prior_customers=1000, min_customers=100)
    cancel = CancellationRateModel().fit([1, 2], [0, 1])
    pooled = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel)
    aware = ScoringBundle(purchase=purchase, spend=spend, cancellation=cancel, by_channel=components)
    features = pd.DataFrame({
        "customer_id": customers["customer_id"], "frequency": customers["frequency"],
        "recency": customers["recency"], "T": customers["T"], "monetary_value": customers["monetary"],
        "n_orders": customers["frequency"] + 1, "n_cancelled": 0.0, "net_6m": 0.0,
        "acquisition_channel": customers["acquisition_channel"]})
    return customers, features, pooled, aware


def test_bundle_scores_each_channel_with_its_components(channel_bundles):
    from models.bundle import LOADINGS_COLUMN

    customers, features, pooled, aware = channel_bundles
    assert aware.by_channel.channels == ["app", "web"]          # tiny (30) and null: pooled
    by_channel = aware.predict(features)
    everyone_pooled = pooled.predict(features)
    app = (features["acquisition_channel"] == "app").to_numpy()
    rows = features[app]
    own = aware.by_channel.purchase["app"].expected_purchases(pooled.horizon,
                                                              rows["frequency"], rows["recency"], rows["T"])
    np.testing.assert_array_equal(by_channel.loc[app, "expected_purchases"].to_numpy(), own)
    own_value = aware.by_channel.spend["app"].expected_order_value(rows["frequency"], rows["monetary_value"])
    np.testing.assert_array_equal(by_channel.loc[app, "expected_order_value"].to_numpy(), own_value)
    # small, null and unseen channels: exactly the pooled scores
    rest = features["acquisition_channel"].isin(["tiny"]).to_numpy() | features["acquisition_channel"].isna().to_numpy()
    pd.testing.assert_frame_equal(by_channel[rest].drop(columns=LOADINGS_COLUMN),
                                  everyone_pooled[rest].drop(columns=LOADINGS_COLUMN))
    unseen = features.assign(acquisition_channel="billboard")
    pd.testing.assert_frame_equal(aware.predict(unseen).drop(columns=LOADINGS_COLUMN),
                                  everyone_pooled.drop(columns=LOADINGS_COLUMN))
    # group-total loadings: one block of 7 per fit (pooled, app, web); each customer's in its own fit's
    # block, so that totals add a fit's coordinates and take the channels' fits as independent
    width = aware.loading_width
    blocks = np.stack(by_channel[LOADINGS_COLUMN].to_numpy())
    assert blocks.shape == (len(features), 3 * width)
    for index, mask in ((0, rest), (1, app), (2, (features["acquisition_channel"] == "web").to_numpy())):
        inside = blocks[mask][:, index * width:(index + 1) * width]
        assert np.abs(inside).sum(axis=1).min() > 0
        assert np.abs(blocks[mask]).sum() == pytest.approx(np.abs(inside).sum())
    np.testing.assert_allclose(blocks[rest][:, :width], np.stack(everyone_pooled.loc[rest, LOADINGS_COLUMN].to_numpy()),
                               rtol=1e-6, atol=1e-9)
    # the channel-aware totals are closer to what happened in each large channel (gross: the simulated
    # orders are not cancelled, the toy cancellation model would scale both alike)
    for channel in ("app", "web"):
        mask = (features["acquisition_channel"] == channel).to_numpy()
        actual = customers.loc[mask, "holdout_value"].sum()
        aware_error = abs(by_channel.loc[mask, "predicted_gross_value"].sum() / actual - 1)
        pooled_error = abs(everyone_pooled.loc[mask, "predicted_gross_value"].sum() / actual - 1)
        assert aware_error < 0.1 and pooled_error > 3 * aware_error, (channel, aware_error, pooled_error)


def test_channel_intervals_are_finite_ordered_and_follow_the_channel(channel_bundles):
    from models.bundle import INTERVAL_COLUMNS

    _, features, pooled, aware = channel_bundles
    scores = aware.predict(features)
    values = scores[list(INTERVAL_COLUMNS)].to_numpy(float)
    assert np.isfinite(values).all()
    assert (scores["predicted_net_value_p10"] <= scores["predicted_net_value_p50"]).all()
    assert (scores["predicted_net_value_p50"] <= scores["predicted_net_value_p90"]).all()
    app = (features["acquisition_channel"] == "app").to_numpy()
    # the app rows' intervals are those of the app components (parameters and their own covariance)
    purchase, spend = aware.by_channel.purchase["app"], aware.by_channel.spend["app"]
    rows = features[app]
    counts = iv.count_moments(iv.sigma_points(purchase.params_, purchase.fit_info_["log_param_covariance"],
                                              purchase.param_names),
                              aware.horizon, rows["frequency"], rows["recency"], rows["T"])
    spend_moments = iv.spend_moments(iv.sigma_points(spend.params_, spend.fit_info_["log_param_covariance"],
                                                     spend.param_names), rows["frequency"], rows["monetary_value"])
    factor = 1.0 - scores.loc[app, "predicted_cancel_rate"].to_numpy()
    expected = iv.value_distribution(counts, spend_moments, factor).quantiles(iv.LEVELS)
    np.testing.assert_allclose(scores.loc[app, list(INTERVAL_COLUMNS[:3])].to_numpy(), expected, rtol=1e-12)
    assert not np.allclose(pooled.predict(features).loc[app, "predicted_net_value_p90"].to_numpy(), expected[:, 2],
                           rtol=1e-3)


def test_bundle_round_trips_payload_and_files(channel_bundles, tmp_path):
    from models.bundle import CHANNELS_FILE, ScoringBundle

    _, features, pooled, aware = channel_bundles
    expected = aware.predict(features)
    pd.testing.assert_frame_equal(ScoringBundle.from_payload(aware.to_payload()).predict(features), expected)
    loaded = ScoringBundle.load(aware.save(tmp_path / "aware"))
    assert loaded.by_channel.channels == ["app", "web"]
    pd.testing.assert_frame_equal(loaded.predict(features), expected)
    assert loaded.describe()["by_channel"]["channels"]["app"]["purchase"] == aware.by_channel.purchase["app"].params_
    # a pooled bundle's payload and folder are as before channels existed
    assert "by_channel" not in pooled.to_payload()
    folder = pooled.save(tmp_path / "pooled")
    assert not (folder / CHANNELS_FILE).exists() and "by_channel" not in (folder / "bundle.json").read_text()
    assert ScoringBundle.load(folder).by_channel is None
