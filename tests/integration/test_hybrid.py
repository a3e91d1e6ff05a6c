"""The hybrid model's Spark side (pipelines/hybrid.py): no leakage, a bounded training sample, skipping
without two horizons of history, and a hybrid champion that scores and exports.

Orders come straight from the generator's numpy blocks in the ``orders`` schema (as in
test_purchase_basis.py): 2,500 customers with stray cancellations over three years.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.config import HybridConf, load_config
from core.dates import add_months
from core.storage import Storage
from core.tables import ORDERS
from models.hybrid import BEHAVIOUR_COLUMNS, design_matrix
from pipelines.calibration import build_calibration_holdout
from pipelines.features import build_customer_features
from datagen.generate import GeneratorParams
from pipelines.hybrid import fit_hybrid, training_cutoff, training_sample
from pipelines.ltv import fit_btyd_bundles, load_champion, score_customers
from tests.integration.test_purchase_basis import orders_frame

END = dt.date(2026, 9, 30)
CUTOFF = add_months(END, -6)
TRAIN_CUTOFF = training_cutoff(CUTOFF, 6)
N_CUSTOMERS = 2500
CONF = Path(__file__).resolve().parents[2] / "conf" / "examples" / "synthetic.yaml"
SMALL = HybridConf(sample_rows=800, min_train_customers=100, max_iter=40, min_samples_leaf=20)


@pytest.fixture(scope="module")
def orders() -> pd.DataFrame:
    return orders_frame(N_CUSTOMERS, 2027, GeneratorParams(cancellations="stray", history_days=1096))


def _changed_after(orders: pd.DataFrame, day: dt.date) -> pd.DataFrame:
    """The same orders with every order dated after ``day`` 1.5 times larger, plus a copy of each."""
    later = orders["order_date"] > day
    changed = orders.copy()
    for column in ("gross_amount", "cancelled_amount", "net_amount"):
        changed.loc[later, column] = changed.loc[later, column] * 1.5
    extra = changed[later].assign(order_id=lambda d: d["order_id"] + "x")
    return pd.concat([changed, extra], ignore_index=True)


def _hybrid_at_cutoff(spark, orders: pd.DataFrame, conf: HybridConf = SMALL):
    """(bundle fitted at CUTOFF, scores of every customer at CUTOFF as pandas, training design matrix)."""
    orders_df = spark.createDataFrame(orders, ORDERS.schema)
    train_df = build_calibration_holdout(orders_df, TRAIN_CUTOFF, allow_incomplete=True).localCheckpoint(eager=True)
    features_df = build_customer_features(orders_df, CUTOFF).localCheckpoint(eager=True)
    btyd = fit_btyd_bundles(features_df, ("bgnbd",), "days", purchase_basis="net").bundles["bgnbd"]
    fit = fit_hybrid(train_df, btyd, conf, 0.0, TRAIN_CUTOFF, CUTOFF)
    scores = score_customers(features_df, fit.bundle).toPandas().sort_values("customer_id").reset_index(drop=True)
    sample_df, _ = training_sample(train_df, conf.sample_rows, conf.seed)
    rows = sample_df.select(*dict.fromkeys(("customer_id", *fit.bundle.feature_columns, *BEHAVIOUR_COLUMNS))) \
        .toPandas().sort_values("customer_id").reset_index(drop=True)
    train_btyd = fit_btyd_bundles(train_df, ("bgnbd",), "days", purchase_basis="net").bundles["bgnbd"]
    return fit, scores, design_matrix(rows, train_btyd)


def test_no_input_is_dated_after_the_cutoff_it_is_trained_or_scored_at(spark, orders):
    fit, scores, design = _hybrid_at_cutoff(spark, orders)
    assert fit.bundle.metadata["training_cutoff"] == TRAIN_CUTOFF.isoformat()
    # orders after the scoring cutoff change nothing: not the trees, not the scores
    _, later_scores, later_design = _hybrid_at_cutoff(spark, _changed_after(orders, CUTOFF))
    pd.testing.assert_frame_equal(later_scores, scores)
    pd.testing.assert_frame_equal(later_design, design)
    # orders after the training cutoff change the target (so the trees) but no training input
    refit, refit_scores, refit_design = _hybrid_at_cutoff(spark, _changed_after(orders, TRAIN_CUTOFF))
    pd.testing.assert_frame_equal(refit_design, design)
    assert not np.allclose(refit_scores["predicted_net_value"], scores["predicted_net_value"])


def test_the_training_sample_is_bounded_stratified_and_stable(spark):
    population = 60_000
    train_df = (spark.range(population).select(
        F.concat(F.lit("C"), F.col("id").cast("string")).alias("customer_id"),
        (F.col("id") % 10).cast("double").alias("frequency"),
        F.when(F.col("id") % 7 == 0, F.lit(100.0)).otherwise(F.lit(0.0)).alias("holdout_net")))
    sample_df, info = training_sample(train_df, 5_000, seed=3)
    sample = sample_df.toPandas()
    assert info["population"] == population and len(sample) <= 5_000
    assert len(sample) >= 5_000 - len(info["strata"])            # floor of each stratum's share
    assert sample["customer_id"].is_unique
    # each stratum keeps its share of the population (to one row)
    def band(frequency):           # the strata: repeat purchase days 0, 1, 2-3, 4-7, 8+
        return np.digitize(frequency, [1, 2, 4, 8])

    shares = sample.groupby([band(sample["frequency"]), sample["holdout_net"] > 0]).size()
    whole = train_df.toPandas()
    expected = whole.groupby([band(whole["frequency"]), whole["holdout_net"] > 0]).size() * 5_000 / population
    assert len(expected) == len(info["strata"]) == 10
    assert (shares - expected).abs().max() <= 1.0 + 1e-9
    again, _ = training_sample(train_df, 5_000, seed=3)
    assert sorted(again.toPandas()["customer_id"]) == sorted(sample["customer_id"])
    everyone, small = training_sample(train_df.limit(100), 5_000, seed=3)
    assert everyone.count() == 100 and small["population"] == 100


def test_the_sample_bound_holds_at_two_million_training_customers(spark):
    """The default bound (models.hybrid.sample_rows, 200,000) on a 2M-customer population: what
    reaches the driver is the sample, whatever the population; every stratum keeps its floor share."""
    population, bound = 2_000_000, HybridConf().sample_rows
    train_df = spark.range(population).select(
        F.concat(F.lit("C"), F.col("id").cast("string")).alias("customer_id"),
        (F.col("id") % 13).cast("double").alias("frequency"),
        F.when(F.col("id") % 5 == 0, F.lit(80.0)).otherwise(F.lit(0.0)).alias("holdout_net"))
    sample_df, info = training_sample(train_df, bound, seed=11)
    rows = sample_df.select("customer_id").toPandas()["customer_id"]
    assert info["population"] == population and bound - len(info["strata"]) <= len(rows) <= bound
    assert rows.is_unique and sum(info["quota"].values()) == len(rows)


def test_fit_collects_at_most_the_configured_rows(spark, orders):
    fit, _, design = _hybrid_at_cutoff(spark, orders, SMALL)
    assert fit.bundle.metadata["training_population"] > SMALL.sample_rows
    assert fit.sample["rows"] <= SMALL.sample_rows and fit.bundle.trees.n_train_ == fit.sample["rows"]
    assert len(design) == fit.sample["rows"]


def _warehouse(spark, root: Path, orders: pd.DataFrame, overrides: list[str]):
    overrides = [f"storage.warehouse={root}", "storage.backend=deltalake",
                 "spark.shuffle_partitions=2", "models.purchase_models=[bgnbd]",
                 "models.purchase_basis=net", "models.compare_cohort=false",
                 "models.compare_naive=false", "models.hybrid.sample_rows=1000",
                 "models.hybrid.max_iter=40", "models.hybrid.min_samples_leaf=20",
                 "models.hybrid.importance_rows=500", "models.hybrid.min_train_customers=100", *overrides]
    storage = Storage(spark, str(root), backend="deltalake")
    storage.append(ORDERS.name, spark.createDataFrame(orders, ORDERS.schema))
    return load_config(CONF, overrides), storage, overrides


def test_backtest_skips_the_hybrid_with_a_line_without_two_horizons_of_history(spark, orders, tmp_path):
    from pipelines.backtest import run_backtest

    recent = orders[orders["order_date"] > add_months(END, -10)]       # ten months of history
    config, storage, _ = _warehouse(spark, tmp_path / "wh", recent, [])
    result = run_backtest(storage, END, config, track=False)
    assert {m["model"] for m in result.metrics} == {"bgnbd_net"}
    assert len(result.notes) == 1 and "hybrid skipped" in result.notes[0]
    assert "two horizons of history" in result.notes[0] and TRAIN_CUTOFF.isoformat() in result.notes[0]


def test_a_hybrid_champion_is_backtested_registered_scores_and_exports(spark, orders, tmp_path, capsys):
    from core import tracking
    from pipelines.backtest import run_backtest
    from pipelines.features import run_features
    from pipelines.nightly import run_nightly

    config, storage, overrides = _warehouse(spark, tmp_path / "wh", orders, [f"export.dest={tmp_path / 'exports'}"])
    result = run_backtest(storage, END, config)
    assert {m["model"] for m in result.metrics} == {"bgnbd_net", "hybrid_net"} and not result.notes
    importances = storage.read("model_importances").toPandas()
    assert set(importances["model"]) == {"hybrid_net"} and importances["rank"].min() == 1
    assert (importances["training_cutoff"] == TRAIN_CUTOFF).all()
    assert (importances["training_rows"] <= 1000).all()
    # make the hybrid the champion whatever the metric said, then run a night on it
    target = tracking.tracking_target(config)
    tracking.start(target)
    tracking.set_champion(target.registered_model, result.model_versions["hybrid_net"])
    run_features(storage, END, config.features)
    run_nightly(spark, storage, config, END, steps=["score", "segments", "export"], refit="never",
                progress=lambda line: None)
    scores = storage.read("customer_scores").where(F.col("as_of_date") == F.lit(END)).toPandas()
    assert (scores["value_model"] == "hybrid").all()
    assert scores["predicted_net_value"].notna().all() and (scores["predicted_net_value"] >= 0).all()
    # its interval: the BTYD base's, rescaled (none for a customer the net basis places by rule)
    modelled = scores[scores["purchase_basis"] != "net_rule"]
    assert len(modelled) and modelled["predicted_net_value_p90"].notna().all()
    assert (modelled["predicted_net_value_p10"] <= modelled["predicted_net_value_p90"]).all()
    exported = pd.read_csv(next((tmp_path / "exports").glob("*.csv")))
    assert len(exported) == len(scores)
    # `cvseg score` with the hybrid champion (the same runner as the nightly step)
    from jobs.cli import main as cli

    capsys.readouterr()
    assert cli(["score", "--as-of", END.isoformat(), "--conf", str(CONF),
                *sum((["--set", o] for o in overrides), [])]) == 0
    assert "(hybrid)" in capsys.readouterr().out
    # the refit's training rows come from the stored features of the night six months earlier,
    # joined with what each customer spent since: the same rows as calibration_holdout at that date
    from pipelines.backtest import ensure_calibration
    from pipelines.hybrid import training_frame

    run_features(storage, CUTOFF, config.features)
    frame = training_frame(storage, CUTOFF, config)
    assert frame.source == "customer_features"
    stored_df = frame.rows
    assert sorted(frame.features.columns) == sorted(c for c in stored_df.columns if c != "holdout_net")
    columns = ["customer_id", "frequency", "recency", "T", "net_frequency", "monetary_value", "net_6m",
               "acquisition_channel", "holdout_net"]
    stored = stored_df.select(*columns).toPandas().sort_values("customer_id").reset_index(drop=True)
    built = ensure_calibration(storage, CUTOFF, config)[0].select(*columns).toPandas() \
        .sort_values("customer_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(stored, built)
    # a refit night of a hybrid champion refits the hybrid (trained as of END - 6 months)
    run_nightly(spark, storage, config, END, steps=["score"], refit="always", force=True,
                progress=lambda line: None)
    bundle, _ = load_champion(target.registered_model)
    assert bundle.value_model == "hybrid"
    assert bundle.metadata["training_cutoff"] == add_months(END, -6).isoformat()
