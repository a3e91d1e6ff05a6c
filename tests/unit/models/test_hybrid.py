"""The hybrid value model (models/hybrid.py): trees on BTYD outputs and behavioural features, pure pandas."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from models import BGNBDModel, CancellationRateModel, GammaGammaModel
from models.bundle import GROUP_COLUMNS, INTERVAL_COLUMNS, LOADINGS_COLUMN, SCORE_COLUMNS, ScoringBundle
from models.hybrid import (CATEGORICAL_INPUTS, INPUTS, HybridBundle, HybridValueModel, bundle_from_payload,
                           design_matrix, load_bundle, training_target)
from tests.unit.models.helpers import simulate_bgnbd


def customers(n: int, seed: int, time_unit: str = "days") -> pd.DataFrame:
    """Customer feature rows (the customer_features columns the hybrid reads) and a target that
    depends on recency, frequency and channel: tv customers spend three times as much."""
    rng = np.random.default_rng(seed)
    rfm = simulate_bgnbd(n, r=0.5, alpha=20.0, a=0.8, b=2.5, T=rng.uniform(30, 700, n), seed=seed)
    per_unit = 7.0 if time_unit == "weeks" else 1.0
    channel = rng.choice(["web", "tv", "store", None], n, p=[0.5, 0.2, 0.2, 0.1])
    frequency = rfm["frequency"].to_numpy()
    days_since = rfm["T"].to_numpy() - rfm["recency"].to_numpy()
    monetary = np.where(frequency > 0, rng.gamma(4.0, 1000.0, n), 0.0)
    orders = frequency + 1
    cancelled = rng.binomial(orders.astype(int), 0.05)
    rate = (frequency + 1) / (rfm["T"].to_numpy() + 30) * np.exp(-days_since / 200.0)
    lift = np.where(channel == "tv", 3.0, 1.0)
    target = rng.poisson(rate * 180 * lift) * rng.gamma(4.0, 1000.0, n)
    return pd.DataFrame({
        "customer_id": [f"C{i}" for i in range(n)],
        "frequency": frequency, "recency": rfm["recency"].to_numpy() / per_unit, "T": rfm["T"].to_numpy() / per_unit,
        "monetary_value": monetary, "n_orders": orders, "n_cancelled": cancelled.astype(float),
        "n_purchase_days": orders, "net_6m": np.where(days_since < 180, monetary, 0.0),
        "acquisition_channel": channel, "first_category": rng.choice(["food", "apparel"], n),
        "avg_order_value": monetary, "cancel_rate_count": cancelled / orders, "cancel_rate_amount": cancelled / orders,
        "gap_mean_days": np.where(frequency > 0, rfm["recency"].to_numpy() / np.maximum(frequency, 1), np.nan),
        "gap_std_days": np.nan, "orders_3m": (days_since < 90).astype(float),
        "net_3m": np.where(days_since < 90, monetary, 0.0), "orders_6m": (days_since < 180).astype(float),
        "holdout_net": target,
    })


def btyd_bundle(features: pd.DataFrame, time_unit: str = "days") -> ScoringBundle:
    purchase = BGNBDModel(time_unit=time_unit).fit(features["frequency"], features["recency"], features["T"])
    repeat = features[features["frequency"] > 0]
    spend = GammaGammaModel().fit(repeat["frequency"], repeat["monetary_value"])
    cancellation = CancellationRateModel().fit(features["n_orders"], features["n_cancelled"])
    return ScoringBundle(purchase=purchase, spend=spend, cancellation=cancellation, time_unit=time_unit)


@pytest.fixture(scope="module")
def train():
    return customers(4000, seed=1)


@pytest.fixture(scope="module")
def fitted(train):
    btyd = btyd_bundle(train)
    trees = HybridValueModel(max_iter=60, min_samples_leaf=40).fit(design_matrix(train, btyd), training_target(train))
    return HybridBundle(btyd=btyd, trees=trees, metadata={"training_cutoff": "2026-03-31"})


def test_design_matrix_reads_days_whatever_the_time_unit(train):
    days = design_matrix(train, btyd_bundle(train, "days"))
    in_weeks = train.assign(recency=train["recency"] / 7.0, T=train["T"] / 7.0)
    weeks = design_matrix(in_weeks, btyd_bundle(in_weeks, "weeks"))
    assert list(days.columns) == list(INPUTS)
    np.testing.assert_allclose(weeks["days_since_last"], days["days_since_last"], rtol=1e-9)
    # the BTYD outputs agree too (same customers, same horizon, another unit)
    np.testing.assert_allclose(weeks["btyd_expected_purchases"], days["btyd_expected_purchases"], rtol=1e-3)


def test_predictions_are_finite_non_negative_and_beat_the_btyd_alone(fitted):
    test = customers(4000, seed=2)
    predicted = fitted.trees.predict(design_matrix(test, fitted.btyd))
    assert np.isfinite(predicted).all() and (predicted >= 0).all()
    actual = test["holdout_net"].to_numpy()
    btyd = fitted.btyd.predict(test)["predicted_net_value"].to_numpy()
    # the BTYD alone cannot see the channel (tv customers spend 3x): the trees can
    assert np.mean(np.abs(predicted - actual)) < np.mean(np.abs(btyd - actual))


def test_channel_is_a_native_categorical_input_and_unseen_levels_score(fitted):
    test = customers(500, seed=3)
    as_web = design_matrix(test.assign(acquisition_channel="web"), fitted.btyd)
    as_tv = design_matrix(test.assign(acquisition_channel="tv"), fitted.btyd)
    assert fitted.trees.predict(as_tv).mean() > 2.0 * fitted.trees.predict(as_web).mean()
    unseen = design_matrix(test.assign(acquisition_channel="LINE", first_category=None), fitted.btyd)
    assert np.isfinite(fitted.trees.predict(unseen)).all()
    categorical = fitted.trees.estimator_.is_categorical_
    assert [c for c, is_cat in zip(fitted.trees.inputs_, categorical) if is_cat] == list(CATEGORICAL_INPUTS)


def test_categorical_codes_kept_levels_other_missing_and_an_input_nobody_has():
    """The encoding the trees read: a kept level its code, an unseen level the "other" code when the
    fit kept one (else missing), a missing value missing, an input missing for everyone a constant."""
    trees = HybridValueModel()
    trees.levels_ = {"acquisition_channel": ["store", "tv", "other"], "first_category": []}
    design = pd.DataFrame({"btyd_net_value": [1.0, 2.0, None, 4.0],
                           "acquisition_channel": ["tv", "LINE", None, "store"],
                           "first_category": [None, None, None, None]})
    encoded = trees._encode(design)
    assert encoded["acquisition_channel"].tolist()[:2] == [1.0, 2.0] and encoded["acquisition_channel"][3] == 0.0
    assert np.isnan(encoded["acquisition_channel"][2])
    assert encoded["first_category"].tolist() == [0.0] * 4            # nobody has it: a constant
    assert np.isnan(encoded["btyd_net_value"][2]) and encoded["btyd_net_value"][3] == 4.0
    trees.levels_["acquisition_channel"] = ["store", "tv"]                # no "other" kept: unseen is missing
    assert np.isnan(trees._encode(design)["acquisition_channel"][1])


def test_a_more_recent_purchase_never_lowers_the_prediction(fitted):
    row = design_matrix(customers(200, seed=4), fitted.btyd)
    grid = pd.concat([row] * 30, ignore_index=True)
    grid["days_since_last"] = np.repeat(np.linspace(0, 700, 30), len(row))
    predicted = fitted.trees.predict(grid).reshape(30, len(row))
    assert (np.diff(predicted, axis=0) <= 1e-9).all()


def test_bundle_scores_like_a_scoring_bundle_and_round_trips(fitted, tmp_path):
    test = customers(300, seed=5)
    scores = fitted.predict(test)
    assert list(scores.columns) == [*SCORE_COLUMNS, *INTERVAL_COLUMNS, *GROUP_COLUMNS, LOADINGS_COLUMN]
    btyd = fitted.btyd.predict(test)
    pd.testing.assert_series_equal(scores["p_alive"], btyd["p_alive"])
    np.testing.assert_allclose(scores["predicted_net_value"], fitted.trees.predict(design_matrix(test, fitted.btyd)))
    again = bundle_from_payload(fitted.to_payload())
    pd.testing.assert_frame_equal(again.predict(test), scores)
    loaded = load_bundle(fitted.save(tmp_path / "hybrid"))
    assert isinstance(loaded, HybridBundle) and loaded.metadata["training_cutoff"] == "2026-03-31"
    pd.testing.assert_frame_equal(loaded.predict(test), scores)
    assert isinstance(load_bundle(fitted.btyd.save(tmp_path / "btyd")), ScoringBundle)
    assert set(fitted.input_example().columns) == set(fitted.feature_columns)


def test_the_interval_is_the_bases_distribution_scaled_to_the_trees_value(fitted):
    test = customers(300, seed=5)
    scores, base = fitted.predict(test), fitted.btyd.predict(test)
    scale = scores["predicted_net_value"].to_numpy() / base["predicted_net_value"].to_numpy()
    assert np.isfinite(scale).all() and not np.allclose(scale, 1.0)      # the trees moved the values
    for column in (*INTERVAL_COLUMNS[:3], *GROUP_COLUMNS):
        np.testing.assert_allclose(scores[column], base[column] * scale, rtol=1e-12)
    pd.testing.assert_series_equal(scores["p_zero_value"], base["p_zero_value"])    # c * V is 0 when V is
    assert (scores["predicted_net_value_p10"] <= scores["predicted_net_value_p90"]).all()
    for got, want, c in zip(scores[LOADINGS_COLUMN], base[LOADINGS_COLUMN], scale):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want) * c, rtol=1e-12)
    # without intervals (models.intervals: false) or group terms (the backtest) the columns stay empty
    plain = dataclasses.replace(fitted, intervals=False).predict(test)
    assert plain[[*INTERVAL_COLUMNS, *GROUP_COLUMNS]].isna().all().all() and plain[LOADINGS_COLUMN].isna().all()
    own = dataclasses.replace(fitted, group_terms=False).predict(test)
    assert own[list(GROUP_COLUMNS)].isna().all().all() and own[LOADINGS_COLUMN].isna().all()
    np.testing.assert_allclose(own["predicted_net_value_p90"], scores["predicted_net_value_p90"], rtol=1e-12)


def test_a_customer_without_a_btyd_value_gets_no_interval(fitted):
    """Net basis: a customer who only cancelled is placed by rule (BTYD value 0): nothing to scale."""
    test = customers(50, seed=6)
    net = {c: test[c.removeprefix("net_")].astype(float) for c in ("net_frequency", "net_recency", "net_T",
                                                                   "net_monetary_value")}
    test = test.assign(**net)
    test.loc[:4, list(net)] = np.nan
    bundle = dataclasses.replace(fitted, btyd=dataclasses.replace(fitted.btyd, purchase_basis="net"))
    scores = bundle.predict(test)
    assert scores.loc[:4, [*INTERVAL_COLUMNS, *GROUP_COLUMNS]].isna().all().all()
    assert scores.loc[:4, LOADINGS_COLUMN].isna().all() and scores.loc[5:, LOADINGS_COLUMN].notna().all()
    assert scores.loc[5:, list(INTERVAL_COLUMNS)].notna().all().all()


def test_trees_saved_under_another_scikit_learn_are_refused(fitted, monkeypatch):
    import sklearn

    blob = fitted.trees.to_bytes()
    monkeypatch.setattr(sklearn, "__version__", "0.0.1")
    with pytest.raises(ValueError, match="scikit-learn"):
        HybridValueModel.from_bytes(blob)


def test_permutation_importance_ranks_what_matters(fitted):
    test = customers(3000, seed=6)
    table = fitted.trees.permutation_importance(design_matrix(test, fitted.btyd), test["holdout_net"], n_repeats=3)
    assert list(table.columns) == ["feature", "importance", "importance_std"]
    assert table["importance"].is_monotonic_decreasing
    top = set(table["feature"].head(5))
    assert "acquisition_channel" in top
    assert table.set_index("feature").loc["first_category", "importance"] < table["importance"].iloc[0] / 5


def test_fit_rejects_what_it_cannot_learn_from(train):
    design = design_matrix(train, btyd_bundle(train))
    with pytest.raises(ValueError, match="nobody"):
        HybridValueModel().fit(design, np.zeros(len(design)))
    with pytest.raises(ValueError, match="lacks"):
        HybridValueModel().fit(design.drop(columns=["net_3m"]), training_target(train))
    with pytest.raises(ValueError, match="exclude"):
        HybridValueModel(exclude=("nope",)).fit(design, training_target(train))
