"""Value intervals end to end on a seeded generated sample: customer_scores carries P10 / P50 / P90 and
P(value = 0), and the backtest measures their coverage on the holdout.

3,000 generated customers with ``mixed`` cancellations (retries and stray orders), orders straight into
the ``orders`` schema (as in test_purchase_basis.py). The coverage band here is the acceptance's
(80% +- 5 points); with 3,000 customers its sampling sd is ~0.7 points.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import load_config
from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, ORDERS
from models.bundle import GROUP_COLUMNS, INTERVAL_COLUMNS, LOADINGS_COLUMN
from pipelines.backtest import compute_metrics, fit_origin_models, predict_all
from pipelines.calibration import build_calibration_holdout
from pipelines.features import run_features
from datagen.generate import GeneratorParams
from pipelines.ltv import fit_btyd_bundles, run_score

from .test_purchase_basis import CONF, CUTOFF, END, orders_frame

N_CUSTOMERS = 3000


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(CONF, [f"storage.warehouse={tmp_path_factory.mktemp('intervals')}",
                              "models.purchase_models=[bgnbd, mbgnbd, paretonbd]", "models.compare_cohort=false",
                              "models.compare_naive=true", "models.purchase_basis=auto"])


@pytest.fixture(scope="module")
def orders_df(spark):
    frame = orders_frame(N_CUSTOMERS, 2027, GeneratorParams(cancellations="mixed"))
    # plus a customer who only ever cancelled: placed by rule under the net basis
    only_cancelled = frame.iloc[[0]].assign(order_id="O-only-cancelled", customer_id="C-only-cancelled",
                                            is_cancelled=True, cancelled_amount=frame["gross_amount"].iloc[0],
                                            net_amount=0.0)
    frame = pd.concat([frame, only_cancelled], ignore_index=True)
    return spark.createDataFrame(frame, ORDERS.schema).localCheckpoint(eager=True)


def test_the_backtest_measures_coverage_near_80_percent_on_the_holdout(orders_df, config):
    holdout_df = build_calibration_holdout(orders_df, CUTOFF).localCheckpoint(eager=True)
    models = fit_origin_models(holdout_df, None, config)
    metrics, _ = compute_metrics(predict_all(holdout_df, models.bundles))
    metrics = metrics.set_index("model")
    for name in ("bgnbd", "bgnbd_net", "mbgnbd", "mbgnbd_net", "paretonbd", "paretonbd_net"):
        assert metrics.loc[name, "interval_coverage"] == pytest.approx(0.80, abs=0.05), name
        # the closed-interval share counts every realised 0 inside [0, P90] as covered: more
        assert metrics.loc[name, "interval_closed_coverage"] > metrics.loc[name, "interval_coverage"]
    assert metrics.loc["naive", ["interval_coverage", "interval_closed_coverage"]].isna().all()
    # switched off: no coverage for any model
    off, _ = compute_metrics(predict_all(holdout_df, {"bgnbd": models.bundles["bgnbd"]}, intervals=False))
    assert off["interval_coverage"].isna().all()


def test_the_hybrids_rescaled_interval_covers_near_80_percent(orders_df, config):
    """The hybrid's interval is its BTYD base's distribution scaled to the trees' value
    (models.hybrid.HybridBundle.predict); measured on the holdout like any model's."""
    from core.dates import add_months
    from pipelines.hybrid import hybrid_bundles

    train_cutoff = add_months(CUTOFF, -6)
    train_df = build_calibration_holdout(orders_df, train_cutoff).localCheckpoint(eager=True)
    holdout_df = build_calibration_holdout(orders_df, CUTOFF).localCheckpoint(eager=True)
    base = fit_origin_models(holdout_df, None, config.model_copy(update={"models": config.models.model_copy(
        update={"purchase_models": ("bgnbd",), "compare_naive": False})})).bundles
    hybrids, _, skipped = hybrid_bundles(train_df, base, config.models.hybrid, ("bgnbd",), 0.0, train_cutoff, CUTOFF)
    assert set(hybrids) == {"hybrid", "hybrid_net"} and not skipped
    metrics, _ = compute_metrics(predict_all(holdout_df, {**base, **hybrids}))
    metrics = metrics.set_index("model")
    for name in hybrids:
        assert metrics.loc[name, "interval_coverage"] == pytest.approx(0.80, abs=0.05), name
        assert metrics.loc[name, "interval_closed_coverage"] > metrics.loc[name, "interval_coverage"]
    # the trees moved the values, so these are not the base's numbers under another name
    assert metrics.loc["hybrid", "mae"] != metrics.loc["bgnbd", "mae"]


def test_customer_scores_carry_the_interval_columns(spark, orders_df, config, tmp_path):
    from core.storage import Storage

    storage = Storage(spark, str(tmp_path / "warehouse"), backend="deltalake")
    storage.overwrite(ORDERS.name, orders_df)
    run_features(storage, END, config.features)
    features_df = storage.read(CUSTOMER_FEATURES.name).where(F.col("as_of_date") == F.lit(END))
    fitted = fit_btyd_bundles(features_df, ("bgnbd",), config.features.time_unit, purchase_basis="net")
    bundle = fitted.bundles["bgnbd"]
    stats = run_score(storage, END, bundle, "test")
    scores = storage.read(CUSTOMER_SCORES.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
    assert set(INTERVAL_COLUMNS) <= set(scores.columns)
    scored = scores[scores["purchase_basis"] == "net"]
    by_rule = scores[scores["purchase_basis"] == "net_rule"]
    assert len(by_rule) > 0 and stats.customers_with_interval == len(scored)
    # customers placed by rule (no completed order under the net basis) have no interval: null
    assert by_rule[list(INTERVAL_COLUMNS)].isna().all().all()
    assert scored[list(INTERVAL_COLUMNS)].notna().all().all()
    assert (scored["predicted_net_value_p10"] <= scored["predicted_net_value_p50"]).all()
    # what group totals add up (pipelines/value_totals.py): finite, non-negative, null with the interval
    group = scored[list(GROUP_COLUMNS)].to_numpy(float)
    assert np.isfinite(group).all() and (group >= 0).all()
    assert scored[LOADINGS_COLUMN].map(len).eq(7).all() and np.isfinite(np.stack(scored[LOADINGS_COLUMN])).all()
    assert by_rule[list(GROUP_COLUMNS)].isna().all().all() and by_rule[LOADINGS_COLUMN].isna().all()
    assert (scored["predicted_net_value_p50"] <= scored["predicted_net_value_p90"]).all()
    assert scored["p_zero_value"].between(0, 1).all()
    # the atom at 0 decides where the quantiles are 0: P10 = 0 iff P(0) >= 10%, P50 = 0 iff >= 50%, ...
    for column, level in (("predicted_net_value_p10", 0.1), ("predicted_net_value_p50", 0.5),
                          ("predicted_net_value_p90", 0.9)):
        assert ((scored[column] == 0) == (scored["p_zero_value"] >= level)).all(), column
    assert 0 < (scored["predicted_net_value_p50"] == 0).mean() < 1
    # models.intervals: false -> the same scores, null intervals
    run_score(storage, END, bundle, "test", intervals=False)
    off = storage.read(CUSTOMER_SCORES.name).where(F.col("as_of_date") == F.lit(END)).toPandas()
    assert off[list(INTERVAL_COLUMNS)].isna().all().all()
    merged = off.merge(scores, on="customer_id", suffixes=("", "_with"))
    assert (merged["predicted_net_value"] == merged["predicted_net_value_with"]).all()
    assert bundle.intervals        # run_score scored a copy: the bundle passed in is unchanged
