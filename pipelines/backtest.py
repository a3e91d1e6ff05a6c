"""BACKTEST stage: fit every model as of a past cutoff, predict the next horizon, compare with what happened.

For each *origin* ``O`` (the as-of date ``D``, then ``D`` minus ``spacing_months``, ... ``n_origins``
origins) the cutoff is ``C = O - horizon_months``:

* ``calibration_holdout`` at ``C`` (features as of ``C`` + each customer's actual orders in
  ``(C, O]``) is reused when that partition exists with the same horizon and time unit, else built;
* every configured purchase model (``models.purchase_models``) is fitted with Gamma-Gamma spend and
  the cancellation model on sufficient statistics of the features at ``C`` only
  (:func:`pipelines.ltv.fit_btyd_bundles`);
* the **six-month cohort method**: customers of ``calibration_holdout`` at ``C - H`` are put in
  cells in Spark (:func:`with_cohort_cells`), and each cell's customer count, sum and sum of squares of
  actual net revenue in ``(C - H, C]`` come to the driver as one small aggregate (one row per cell);
  :class:`models.cohort.CohortModel` backs sparse cells off to coarser ones. A customer's prediction
  is the mean of their cell at ``C``;
* **purchase basis** (``models.purchase_basis``): with ``auto`` (default) every purchase model is
  fitted twice, on gross orders (``bgnbd``: cancelled orders count as purchases) and on completed
  orders only (``bgnbd_net``); the champion metric then picks model and basis together, so the
  basis is chosen by this client's data. ``gross`` / ``net`` fit one basis only;
* **channel-aware** variants (``models.by_channel.enabled``): BG/NBD and MBG/NBD with per-channel
  parameters shrunk towards the pooled fit (:mod:`models.channels`), named ``bgnbd_channel`` /
  ``bgnbd_channel_net``, compete beside the pooled models; the champion metric decides;
* the **naive** baseline: the customer's own net revenue in the trailing six months;
* every model predicts every customer in one ``mapInPandas`` pass with the bundles broadcast
  (:func:`predict_all`), giving long rows (model, customer_id, predicted, actual).

**MLflow.** One parent run per backtest; one nested run per (origin, model) with params, metrics and
artifacts (calibration plot, decile table, parameter table). The bundles fitted at the newest origin --
exactly the models whose metrics were just measured, fitted on data up to its cutoff -- are logged as
pyfunc models and registered (one new version per model per backtest); the model with the best mean
``models.champion_metric`` over the origins gets the alias ``champion`` (the previous champion stays an
older version). A cohort or naive champion scores with its own method (the bundle carries the cells).

Metrics are computed in Spark per model; only one row per model (and ten decile rows per model)
reach the driver. The definitions are those of :mod:`models.metrics` (tested against it):

* ``mae``, ``rmse``, ``total_error_pct`` (positive = over-prediction), ``abs_total_error_pct``;
* ``spearman``: Pearson correlation of average ranks (ties share their average rank);
* ``normalized_gini``: area between the capture curve and the diagonal, divided by the same area when
  customers are ordered by their actual value;
* ``top_decile_capture`` / ``top20_capture``: share of the actual total brought by the predicted
  top 10% / 20% of customers;
* decile table: customers in ten groups by prediction (decile 1 = highest), mean predicted vs actual;
* ``interval_coverage``: share of customers whose actual value lies in their 80% interval predicted at
  the cutoff (P10..P90, :mod:`models.intervals`), a realised 0 counted by the randomised probability
  integral transform (the share of the predicted atom at 0 within the levels 0.1..0.9: under a
  calibrated model 80% whatever the atom); ``interval_closed_coverage``: the plain share with
  P10 <= actual <= P90 (over-covers where P(value = 0) > 10%). Null for cohort and naive values.

**Ties and ranks in Spark.** Customers with the same predicted value form a tie group that is never
split. Rows are first grouped by (model, value) -- one row per tie group, with its customer count and
actual sum -- and a running sum over the groups of each model, ordered by value, gives the number of
customers above each group (``Window.partitionBy(model)``, frame: unbounded preceding to current row).
From it: the average rank ``C + (W + 1) / 2`` (spearman, joined back to the customers), the capture
curve corners (gini, top-share capture, with linear interpolation inside a tie group) and the decile
``ceil(10 k / N)`` of a group with average rank ``k`` (integer arithmetic, exact). The window holds
one row per *distinct* value of a model in one task: bounded by the distinct predictions (many
customers share values: zeros of the naive model, cohort cell means), not by a global sort.
"""
from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import ByChannelConf, Config
from core.dates import add_months
from core.errors import UserError
from core.results import StageResult
from core.storage import Storage
from core.tracking import BacktestFit, BacktestRuns
from core.tables import CALIBRATION_HOLDOUT, MODEL_BACKTEST, MODEL_BACKTEST_DECILES, ORDERS
from models import CELL_COLUMNS, DEFAULT_BANDS, CohortModel, NaiveRepeatModel
from models.bundle import DAYS_PER_UNIT, ScoringBundle
from models.metrics import METRIC_COLUMNS, METRIC_DIRECTION
from models.hybrid import bundle_from_payload
from pipelines.calibration import holdout_end, run_calibration
from pipelines.ltv import channel_run_params, fit_btyd_bundles

log = logging.getLogger(__name__)

DECILE_COLUMNS = ("decile", "n", "mean_predicted", "mean_actual", "sum_predicted", "sum_actual")
#: Coverage of the value intervals (models/intervals.py): null for a model without intervals.
INTERVAL_METRIC_COLUMNS = ("interval_coverage", "interval_closed_coverage")
PREDICTION_SCHEMA = T.StructType([
    T.StructField("model", T.StringType(), False),
    T.StructField("customer_id", T.StringType(), False),
    T.StructField("predicted", T.DoubleType(), False),
    T.StructField("actual", T.DoubleType(), False),
    # the 80% interval and P(value = 0) predicted at the cutoff; null where the model has none
    T.StructField("p10", T.DoubleType(), True),
    T.StructField("p90", T.DoubleType(), True),
    T.StructField("p_zero", T.DoubleType(), True),
])
_FRAME_TO_CURRENT = (Window.unboundedPreceding, Window.currentRow)
_FRAME_WHOLE = (Window.unboundedPreceding, Window.unboundedFollowing)


class BacktestError(UserError, ValueError):
    """The backtest cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------
def backtest_origins(as_of: dt.date, n_origins: int = 1, spacing_months: int = 1) -> list[dt.date]:
    """``as_of``, ``as_of - spacing``, ... (``n_origins`` dates, newest first).

    Monthly origins (the default spacing) overlap in their holdout windows, so they are not
    independent samples; they show whether the ranking of the models holds across starting months.
    ``spacing_months = horizon_months`` gives non-overlapping holdouts (needing more history).
    """
    if n_origins < 1:
        raise BacktestError(f"--origins must be at least 1 (got {n_origins})")
    if spacing_months < 1:
        raise BacktestError(f"--spacing-months must be at least 1 (got {spacing_months})")
    return [add_months(as_of, -spacing_months * k) for k in range(n_origins)]


# --------------------------------------------------------------------------------------------
# Cohort cells (column functions + transforms)
# --------------------------------------------------------------------------------------------
def band_column(value: Column, edges: Sequence[float]) -> Column:
    """Band number: the largest ``i`` with ``edges[i] <= value`` (as :func:`models.cohort.band_index`).

    Values below the first edge get null: the cohort model rejects missing keys, so such a row fails
    loudly instead of landing in band 0.
    """
    edges = [float(e) for e in edges]
    band = F.when(value >= F.lit(edges[-1]), F.lit(len(edges) - 1))
    for index in range(len(edges) - 2, -1, -1):
        band = band.when(value >= F.lit(edges[index]), F.lit(index))
    return band.cast("long")


def with_cohort_cells(features_df: DataFrame, time_unit: str, bands: Mapping[str, Sequence[float]],
                      with_channel: bool) -> DataFrame:
    """Adds the cell keys (``frequency_band``, ``recency_band``, ``tenure_band`` [, ``channel``]).

    Same definitions as :func:`models.bundle.cells_from_features` (which scoring uses): recency
    band on days since the last order, tenure band on days since the first, both rounded to 6
    decimals so weeks x 7 give whole days.
    """
    per_unit = F.lit(DAYS_PER_UNIT[time_unit])
    days_since_last = F.round((F.col("T") - F.col("recency")) * per_unit, 6)
    tenure_days = F.round(F.col("T") * per_unit, 6)
    cells_df = (features_df
                .withColumn("frequency_band", band_column(F.col("frequency"), bands["frequency"]))
                .withColumn("recency_band", band_column(days_since_last, bands["recency_days"]))
                .withColumn("tenure_band", band_column(tenure_days, bands["tenure_days"])))
    if with_channel:
        cells_df = cells_df.withColumn("channel", F.coalesce(F.col("acquisition_channel"), F.lit("unknown")))
    return cells_df


def cohort_key_columns(with_channel: bool) -> tuple[str, ...]:
    return CELL_COLUMNS + (("channel",) if with_channel else ())


def cohort_cell_stats(holdout_df: DataFrame, time_unit: str, bands: Mapping[str, Sequence[float]],
                      with_channel: bool) -> DataFrame:
    """One row per cell: customers, sum and sum of squares of their actual holdout net revenue."""
    keys = list(cohort_key_columns(with_channel))
    return (with_cohort_cells(holdout_df, time_unit, bands, with_channel)
            .groupBy(*keys)
            .agg(F.count(F.lit(1)).alias("n_customers"),
                 F.sum("holdout_net").alias("revenue_sum"),
                 F.sum(F.col("holdout_net") * F.col("holdout_net")).alias("revenue_sq_sum")))


# --------------------------------------------------------------------------------------------
# Predictions: every model, every customer, one mapInPandas pass
# --------------------------------------------------------------------------------------------
def predict_all(holdout_df: DataFrame, bundles: Mapping[str, ScoringBundle], intervals: bool = True) -> DataFrame:
    """Long rows (model, customer_id, predicted, actual, p10, p90, p_zero): each bundle's predicted net
    value over the horizon, its 80% interval (``intervals``: where the model has one, else null) and
    the customer's actual ``holdout_net``. The bundles are broadcast once."""
    if not bundles:
        raise BacktestError("no models to backtest: list models.purchase_models or enable compare_cohort/naive")
    spark = holdout_df.sparkSession
    shared = spark.sparkContext.broadcast({name: b.to_payload() for name, b in bundles.items()})

    def predict_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        models = {name: bundle_from_payload(payload) for name, payload in shared.value.items()}
        for model in models.values():
            model.intervals = intervals
            model.group_terms = False          # each customer's own interval only: no group-total terms
        for batch in batches:
            actual = batch["holdout_net"].to_numpy(float)
            for name, model in models.items():
                scores = model.predict(batch)
                yield pd.DataFrame({"model": name, "customer_id": scores["customer_id"].to_numpy(),
                                    "predicted": scores["predicted_net_value"].to_numpy(float),
                                    "actual": actual,
                                    "p10": scores["predicted_net_value_p10"].to_numpy(float),
                                    "p90": scores["predicted_net_value_p90"].to_numpy(float),
                                    "p_zero": scores["p_zero_value"].to_numpy(float)})

    columns = list(dict.fromkeys(c for b in bundles.values() for c in b.feature_columns))
    inputs = holdout_df.select(*[F.col(c).cast("double") if c in ("n_orders", "n_cancelled") else F.col(c)
                                 for c in columns], "holdout_net")
    # pandas' NaN ("no interval") arrives as a NaN double: null, so that averages skip it
    return inputs.mapInPandas(predict_batches, PREDICTION_SCHEMA).select(
        "model", "customer_id", "predicted", "actual",
        *[F.nanvl(F.col(c), F.lit(None).cast("double")).alias(c) for c in ("p10", "p90", "p_zero")])


# --------------------------------------------------------------------------------------------
# Metrics in Spark (reference: models/metrics.py)
# --------------------------------------------------------------------------------------------
def interval_covered(actual: Column, p10: Column, p90: Column, p_zero: Column) -> Column:
    """Per customer, how much of the customer counts as inside the 80% interval, in [0, 1] (null without
    an interval): :func:`models.intervals.pit_covered` as a Column. A realised value above 0 is inside
    when ``P10 <= actual <= P90``; a realised 0 counts as the share of the predicted atom
    ``[0, P(value = 0)]`` (in probability) that lies within the levels [0.1, 0.9] (randomised PIT)."""
    atom = F.least(F.greatest(p_zero, F.lit(0.0)), F.lit(1.0))
    zero_share = F.when(atom > 0, F.greatest(F.least(atom, F.lit(0.9)) - F.lit(0.1), F.lit(0.0)) / atom) \
        .otherwise(F.when(p10 <= 0, F.lit(1.0)).otherwise(F.lit(0.0)))
    inside = F.when((actual >= p10) & (actual <= p90), F.lit(1.0)).otherwise(F.lit(0.0))
    return F.when(p10.isNull(), F.lit(None).cast("double")).when(actual <= 0, zero_share).otherwise(inside)


def error_metrics(predictions_df: DataFrame) -> DataFrame:
    """Per model: customers, totals, MAE, RMSE, total error %, and whether any ranking is degenerate;
    the intervals' coverage (:func:`interval_covered`) and the plain share inside the closed interval."""
    error = F.col("predicted") - F.col("actual")
    total_actual = F.sum("actual")
    total_error = F.try_divide(F.sum("predicted") - total_actual, total_actual) * 100.0
    return (predictions_df.groupBy("model")
            .agg(F.count(F.lit(1)).alias("n_customers"),
                 F.sum("predicted").alias("predicted_total"),
                 total_actual.alias("actual_total"),
                 F.avg(F.abs(error)).alias("mae"),
                 F.sqrt(F.avg(error * error)).alias("rmse"),
                 F.when(total_actual > 0, total_error).otherwise(F.lit(float("nan"))).alias("total_error_pct"),
                 F.avg(interval_covered(F.col("actual"), F.col("p10"), F.col("p90"), F.col("p_zero")))
                 .alias("interval_coverage"),
                 F.avg(F.when(F.col("p10").isNull(), F.lit(None).cast("double"))
                       .when((F.col("actual") >= F.col("p10")) & (F.col("actual") <= F.col("p90")), F.lit(1.0))
                       .otherwise(F.lit(0.0))).alias("interval_closed_coverage"),
                 (F.min("predicted") == F.max("predicted")).alias("all_predicted_equal"),
                 (F.min("actual") == F.max("actual")).alias("all_actual_equal"))
            .withColumn("abs_total_error_pct", F.abs("total_error_pct")))


def tie_groups(predictions_df: DataFrame, order_column: str) -> DataFrame:
    """One row per (model, distinct ``order_column`` value), highest first, with running sums.

    ``customers`` (W) and ``actual_sum`` (A) of the group; ``above`` = customers with a strictly
    higher value (C); ``captured_before`` = actual revenue of those customers; ``n_total`` and
    ``actual_total`` of the model.
    """
    ordered = Window.partitionBy("model").orderBy(F.col("value").desc()).rowsBetween(*_FRAME_TO_CURRENT)
    whole = Window.partitionBy("model").rowsBetween(*_FRAME_WHOLE)
    return (predictions_df.groupBy("model", F.col(order_column).alias("value"))
            .agg(F.count(F.lit(1)).alias("customers"), F.sum("actual").alias("actual_sum"))
            .withColumn("above", F.sum("customers").over(ordered) - F.col("customers"))
            .withColumn("captured_before", F.sum("actual_sum").over(ordered) - F.col("actual_sum"))
            .withColumn("n_total", F.sum("customers").over(whole))
            .withColumn("actual_total", F.sum("actual_sum").over(whole)))


def _ascending_average_rank() -> Column:
    """Ascending average rank of a tie group: customers strictly below + (W + 1) / 2."""
    below = F.col("n_total") - F.col("above") - F.col("customers")
    return below + (F.col("customers") + F.lit(1.0)) / 2.0


def _gini_area() -> Column:
    """``integral (L(u) - u) du`` over the capture curve of tie groups (piecewise linear: exact)."""
    # try_divide: a model whose customers bought nothing has actual_total 0 (ANSI mode would raise);
    # its null area is turned into NaN by the caller
    share_before = F.try_divide(F.col("captured_before"), F.col("actual_total"))
    share_after = F.try_divide(F.col("captured_before") + F.col("actual_sum"), F.col("actual_total"))
    return F.sum(F.col("customers") / F.col("n_total") * (share_before + share_after) / 2.0) - 0.5


def _captured_share(share: float) -> Column:
    """``L(share)``: the top ``share`` of customers; the group at the cut counts pro rata."""
    cut = F.lit(share) * F.col("n_total")
    fraction = F.least(F.greatest((cut - F.col("above")) / F.col("customers"), F.lit(0.0)), F.lit(1.0))
    return F.try_divide(F.sum(F.col("actual_sum") * fraction), F.first("actual_total"))


def ranking_metrics(predictions_df: DataFrame, by_predicted: DataFrame | None = None,
                    by_actual: DataFrame | None = None) -> DataFrame:
    """Per model: spearman, normalized_gini, top_decile_capture, top20_capture (NaN where degenerate).

    ``by_predicted`` / ``by_actual``: :func:`tie_groups` of the same rows, when the caller has them.
    """
    by_predicted = tie_groups(predictions_df, "predicted") if by_predicted is None else by_predicted
    by_actual = tie_groups(predictions_df, "actual") if by_actual is None else by_actual
    curve = (by_predicted.groupBy("model")
             .agg(_gini_area().alias("gini"),
                  _captured_share(0.1).alias("top_decile_capture"),
                  _captured_share(0.2).alias("top20_capture"),
                  F.first("actual_total").alias("actual_total")))
    best = by_actual.groupBy("model").agg(_gini_area().alias("best_gini"))
    rank_p = by_predicted.select("model", F.col("value").alias("predicted"), _ascending_average_rank().alias("rank_p"))
    rank_a = by_actual.select("model", F.col("value").alias("actual"), _ascending_average_rank().alias("rank_a"))
    spearman = (predictions_df.select("model", "predicted", "actual")
                .join(rank_p, on=["model", "predicted"], how="inner")
                .join(rank_a, on=["model", "actual"], how="inner")
                .groupBy("model")
                # Pearson from population moments; try_divide: a constant ranking has no variance (ANSI
                # would raise), its null becomes NaN in compute_metrics
                .agg(F.try_divide(F.covar_pop("rank_p", "rank_a"),
                                  F.sqrt(F.var_pop("rank_p") * F.var_pop("rank_a"))).alias("rank_corr")))
    positive_total = F.col("actual_total") > 0
    return (curve.join(best, on="model", how="inner").join(spearman, on="model", how="inner")
            .select("model",
                    F.col("rank_corr").alias("spearman_raw"),
                    F.when(positive_total & (F.col("best_gini") > 0), F.col("gini") / F.col("best_gini"))
                    .otherwise(F.lit(float("nan"))).alias("normalized_gini"),
                    F.when(positive_total, F.col("top_decile_capture")).otherwise(F.lit(float("nan")))
                    .alias("top_decile_capture"),
                    F.when(positive_total, F.col("top20_capture")).otherwise(F.lit(float("nan")))
                    .alias("top20_capture")))


def decile_table(predictions_df: DataFrame, by_predicted: DataFrame | None = None) -> DataFrame:
    """Per model and decile 1..10 present: n, sums and means of predicted and actual.

    A tie group with average rank ``k = C + (W + 1) / 2`` (highest first) goes to decile
    ``ceil(10 k / N)`` = ``ceil(10 (2C + W + 1) / 2N)``, computed in integers (exact), capped to 1..10.
    """
    by_predicted = tie_groups(predictions_df, "predicted") if by_predicted is None else by_predicted
    groups_df = (by_predicted
                 .withColumn("rank_x20", F.lit(10) * (F.lit(2) * F.col("above") + F.col("customers") + F.lit(1)))
                 .withColumn("n_x2", F.lit(2) * F.col("n_total")))
    # ceil(a / b) = (a + b - 1) div b on longs: exact, no floating-point rounding at decile borders
    decile = F.expr("least(greatest((rank_x20 + n_x2 - 1) div n_x2, 1), 10)")
    return (groups_df.withColumn("decile", decile.cast("int"))
            .groupBy("model", "decile")
            .agg(F.sum("customers").alias("n"),
                 F.sum(F.col("value") * F.col("customers")).alias("sum_predicted"),
                 F.sum("actual_sum").alias("sum_actual"))
            .withColumn("mean_predicted", F.col("sum_predicted") / F.col("n"))
            .withColumn("mean_actual", F.col("sum_actual") / F.col("n")))


def compute_metrics(predictions_df: DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per model with every metric, ten rows per model of deciles): bounded results only.

    Empty deciles are added on the driver (n = 0, NaN means), as in the reference.
    """
    errors = error_metrics(predictions_df).toPandas()
    # one row per tie group, read by three aggregates: materialised once (far fewer rows than customers)
    by_predicted = tie_groups(predictions_df, "predicted").persist(StorageLevel.MEMORY_AND_DISK)
    by_actual = tie_groups(predictions_df, "actual").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        ranks = ranking_metrics(predictions_df, by_predicted, by_actual).toPandas()
        deciles = decile_table(predictions_df, by_predicted).toPandas()
    finally:
        by_predicted.unpersist()
        by_actual.unpersist()
    metrics = errors.merge(ranks, on="model", how="left")
    degenerate = metrics["all_predicted_equal"].astype(bool) | metrics["all_actual_equal"].astype(bool)
    metrics["spearman"] = np.where(degenerate, np.nan, np.clip(metrics["spearman_raw"].astype(float), -1.0, 1.0))
    metrics = metrics.drop(columns=["spearman_raw", "all_predicted_equal", "all_actual_equal"])
    full = pd.MultiIndex.from_product([sorted(metrics["model"]), range(1, 11)], names=["model", "decile"])
    deciles = deciles.set_index(["model", "decile"]).reindex(full).reset_index()
    deciles["n"] = deciles["n"].fillna(0).astype("int64")
    deciles[["sum_predicted", "sum_actual"]] = deciles[["sum_predicted", "sum_actual"]].fillna(0.0)
    return metrics.reset_index(drop=True), deciles[["model", *DECILE_COLUMNS]]


# --------------------------------------------------------------------------------------------
# Models fitted at one cutoff
# --------------------------------------------------------------------------------------------
def fit_cohort_model(cohort_train_df: DataFrame, time_unit: str, min_cell_size: int, with_channel: bool,
                     bands: Mapping[str, Sequence[float]] = DEFAULT_BANDS) -> CohortModel:
    """Cells at ``C - H`` with their actual net revenue in ``(C - H, C]`` -> a fitted cohort model."""
    cells = cohort_cell_stats(cohort_train_df, time_unit, bands, with_channel).toPandas()  # one row per cell
    if cells.empty:
        raise BacktestError("the cohort method has no customers one horizon before the cutoff; backtest a later "
                            "--as-of, or set models.compare_cohort=false")
    if cells[list(cohort_key_columns(with_channel))].isna().any(axis=None):
        raise BacktestError("some customers fall below the first cohort band edge (negative recency or tenure); "
                            "check customer_features for this cutoff")
    return CohortModel(key_columns=cohort_key_columns(with_channel), min_cell_size=min_cell_size).fit(cells)


@dataclass
class OriginModels:
    bundles: dict[str, ScoringBundle]
    seconds: dict[str, float]
    sizes: dict[str, int]
    notes: list[str] = field(default_factory=list)     # lines for the output, e.g. why the hybrid was skipped


def purchase_bases(configured: str) -> tuple[str, ...]:
    """The bases a backtest compares: both under ``auto``, else the configured one."""
    return ("gross", "net") if configured == "auto" else (configured,)


def basis_model_name(purchase_model: str, purchase_basis: str) -> str:
    """Backtest / registry name of a purchase model on a basis: ``bgnbd`` (gross), ``bgnbd_net``."""
    return purchase_model if purchase_basis == "gross" else f"{purchase_model}_{purchase_basis}"


def fit_origin_models(holdout_df: DataFrame, cohort_train_df: DataFrame | None, config: Config) -> OriginModels:
    """Every configured model fitted at one cutoff, each as a scoring bundle keyed by model name
    (:func:`basis_model_name`: one per purchase model and basis).

    The cohort and naive bundles carry the first purchase model's BTYD components (first basis), so
    their scores still report p_alive and expected purchases; only the net value comes from the method.
    """
    models_conf, features_conf = config.models, config.features
    bundles: dict[str, ScoringBundle] = {}
    seconds: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for basis in purchase_bases(models_conf.purchase_basis):
        fitted = fit_btyd_bundles(holdout_df, models_conf.purchase_models, features_conf.time_unit,
                                  features_conf.horizon_months, models_conf.penalizer_coef, purchase_basis=basis,
                                  by_channel=models_conf.by_channel)
        suffix = "" if basis == "gross" else f"_{basis}"
        bundles.update({basis_model_name(name, basis): b for name, b in fitted.bundles.items()})
        seconds.update({f"{k}{suffix}": v for k, v in fitted.seconds.items()})
        sizes.update({f"{k}{suffix}": v for k, v in fitted.sizes.items()})
    base = next(iter(bundles.values()))
    shared = dict(purchase=base.purchase, spend=base.spend, cancellation=base.cancellation,
                  horizon_months=features_conf.horizon_months, time_unit=features_conf.time_unit)
    if cohort_train_df is not None:
        started = time.perf_counter()
        cohort = fit_cohort_model(cohort_train_df, features_conf.time_unit, models_conf.cohort_min_cell_size,
                                  models_conf.cohort_by_channel)
        seconds["fit_cohort"] = time.perf_counter() - started
        bundles["cohort"] = ScoringBundle(value_model="cohort", cohort=cohort,
                                          cohort_with_channel=models_conf.cohort_by_channel, **shared)
    if models_conf.compare_naive:
        if features_conf.horizon_months != 6:
            log.warning("naive baseline skipped: it repeats the trailing six months (net_6m), which only "
                        "compares with a six-month horizon (features.horizon_months=%d)",
                        features_conf.horizon_months)
        else:
            bundles["naive"] = ScoringBundle(value_model="naive", naive=NaiveRepeatModel().fit(), **shared)
    return OriginModels(bundles=bundles, seconds=seconds, sizes=sizes)


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------
def ensure_calibration(storage: Storage, cutoff: dt.date, config: Config, rebuild: bool = False
                       ) -> tuple[DataFrame, bool]:
    """The ``calibration_holdout`` rows at ``cutoff``; reused when the partition exists with the same
    horizon end and time unit (else built and written). Returns (rows, reused)."""
    features_conf = config.features
    expected_end = holdout_end(cutoff, features_conf.horizon_months)
    if not rebuild and storage.exists(CALIBRATION_HOLDOUT.name):
        existing = (storage.read(CALIBRATION_HOLDOUT.name).where(F.col("cutoff_date") == F.lit(cutoff))
                    .select("horizon_end", "time_unit").limit(1).collect())
        if existing and existing[0]["horizon_end"] == expected_end \
                and existing[0]["time_unit"] == features_conf.time_unit \
                and not _lacks_net_basis(_calibration_rows(storage, cutoff)):
            return _calibration_rows(storage, cutoff), True
        if existing:
            log.warning("calibration_holdout at %s was built with horizon end %s / %s; rebuilding it for %s / %s",
                        cutoff, existing[0]["horizon_end"], existing[0]["time_unit"], expected_end,
                        features_conf.time_unit)
    run_calibration(storage, cutoff, features_conf)
    return _calibration_rows(storage, cutoff), False


def _lacks_net_basis(rows_df: DataFrame) -> bool:
    """A partition written before the net-basis columns existed (they read as null there)."""
    lacks = F.col("net_first_order_date").isNull() & (F.col("n_orders") > F.col("n_cancelled"))
    return bool(rows_df.where(lacks).limit(1).count())


def _calibration_rows(storage: Storage, cutoff: dt.date) -> DataFrame:
    return storage.read(CALIBRATION_HOLDOUT.name).where(F.col("cutoff_date") == F.lit(cutoff))


@dataclass
class OriginResult:
    origin: dt.date
    cutoff: dt.date
    horizon_end: dt.date
    calibration_version: int
    reused: dict[str, bool]
    models: OriginModels
    metrics: pd.DataFrame
    deciles: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


def run_origin(storage: Storage, origin: dt.date, config: Config, rebuild: bool = False) -> OriginResult:
    """Calibration at ``origin - H`` (and ``- 2H`` for the cohort cells), fits, predictions, metrics."""
    horizon = config.features.horizon_months
    cutoff = add_months(origin, -horizon)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    holdout_df, reused = ensure_calibration(storage, cutoff, config, rebuild)
    reused_flags = {"calibration": reused}
    cohort_train_df = None
    if config.models.compare_cohort:
        cohort_train_df, reused_flags["cohort_cells"] = ensure_calibration(
            storage, add_months(cutoff, -horizon), config, rebuild)
    seconds["calibration"] = time.perf_counter() - started
    version = storage.version(CALIBRATION_HOLDOUT.name)
    models = fit_origin_models(holdout_df, cohort_train_df, config)
    if config.models.hybrid.enabled:    # the hybrid, trained one horizon back: pipelines/hybrid.py
        from pipelines.hybrid import origin_hybrids

        hybrids, hybrid_seconds, models.notes = origin_hybrids(storage, cutoff, config, models.bundles, rebuild)
        models.bundles.update(hybrids)
        models.seconds.update(hybrid_seconds)
    started = time.perf_counter()
    predictions_df = predict_all(holdout_df, models.bundles, config.models.intervals).persist(
        StorageLevel.MEMORY_AND_DISK)
    try:
        metrics, deciles = compute_metrics(predictions_df)
    finally:
        predictions_df.unpersist()
    seconds["predict_and_metrics"] = time.perf_counter() - started
    return OriginResult(origin=origin, cutoff=cutoff, horizon_end=holdout_end(cutoff, horizon),
                        calibration_version=version, reused=reused_flags, models=models, metrics=metrics,
                        deciles=deciles, seconds=seconds)


def choose_champion(metrics: pd.DataFrame, metric: str) -> tuple[str, pd.Series]:
    """The model with the best mean of ``metric`` over the origins (NaN origins ignored).

    Returns (model name, mean metric per model). Lower is better for errors, higher for
    spearman, gini and capture (:data:`METRIC_DIRECTION`).
    """
    if metric not in METRIC_DIRECTION:
        raise BacktestError(f"models.champion_metric {metric!r}: must be one of {sorted(METRIC_DIRECTION)}")
    means = metrics.groupby("model")[metric].mean().dropna()
    if means.empty:
        raise BacktestError(f"no model has a finite {metric} (e.g. no revenue in any holdout); choose another "
                            "models.champion_metric or a period with sales")
    best = means.idxmax() if METRIC_DIRECTION[metric] else means.idxmin()
    return str(best), means


def compare_bases(means: pd.Series, bundles: Mapping[str, ScoringBundle], metric: str) -> dict[str, Any]:
    """Per basis: its best BTYD model and that model's mean ``metric`` (what decided the basis)."""
    better_high = METRIC_DIRECTION[metric]
    out: dict[str, Any] = {}
    for name, value in means.items():
        bundle = bundles.get(name)
        if bundle is None or bundle.value_model != "btyd" or not math.isfinite(float(value)):
            continue
        best = out.get(bundle.purchase_basis)
        if best is None or (value > best["value"] if better_high else value < best["value"]):
            out[bundle.purchase_basis] = {"model": name, "value": float(value)}
    return out


def calibration_figure(deciles: pd.DataFrame, title: str):
    """Predicted vs actual mean 6-month net value per predicted decile (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    x = deciles["decile"].to_numpy()
    width = 0.4
    axes.bar(x - width / 2, deciles["mean_predicted"].fillna(0.0), width, label="predicted (mean)")
    axes.bar(x + width / 2, deciles["mean_actual"].fillna(0.0), width, label="actual (mean)")
    axes.set_xticks(x)
    axes.set_xlabel("decile of predicted value (1 = highest)")
    axes.set_ylabel("net value per customer over the horizon")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def parameter_table(bundle: ScoringBundle) -> pd.DataFrame:
    """Component, parameter, value and standard error (when the fit reports one) for the CSV artifact."""
    rows = []
    components = {"purchase": bundle.purchase, "spend": bundle.spend, "cancellation": bundle.cancellation}
    for role, model in components.items():
        errors = (model.fit_info_ or {}).get("standard_errors") or {}
        for name, value in model.params_.items():
            if np.isscalar(value):
                rows.append({"component": role, "model": model.name, "parameter": name, "value": float(value),
                             "standard_error": errors.get(name)})
    if bundle.by_channel is not None:          # per channel, component "purchase:<channel>" / "spend:<channel>"
        for role, by_channel in (("purchase", bundle.by_channel.purchase), ("spend", bundle.by_channel.spend)):
            for channel, model in sorted(by_channel.items()):
                for name, value in model.params_.items():
                    rows.append({"component": f"{role}:{channel}", "model": model.name, "parameter": name,
                                 "value": float(value), "standard_error": None})
                rows.append({"component": f"{role}:{channel}", "model": model.name, "parameter": "n_customers",
                             "value": float(model.fit_info_.get("n_customers", 0.0)), "standard_error": None})
    if bundle.cohort is not None:
        info = bundle.cohort.fit_info_
        rows.append({"component": "cohort", "model": "cohort", "parameter": "population_mean",
                     "value": bundle.cohort.params_["population_mean"], "standard_error": None})
        for key in ("n_cells", "n_sparse_cells", "customers_in_sparse_cells"):
            rows.append({"component": "cohort", "model": "cohort", "parameter": key, "value": float(info[key]),
                         "standard_error": None})
    return pd.DataFrame(rows, columns=["component", "model", "parameter", "value", "standard_error"])


def channel_params(conf: ByChannelConf) -> dict[str, Any]:
    """MLflow parameters of the channel-aware variants' settings (``models.by_channel``)."""
    return {"by_channel_enabled": conf.enabled, "by_channel_prior_customers": conf.prior_customers,
            "by_channel_min_customers": conf.min_customers}


@dataclass(frozen=True)
class BacktestResult(StageResult):
    """What :func:`run_backtest` measured and registered (``metrics``: one JSON row per model and
    origin; ``seconds``: the stages' wall times; ``calibration_reused``: per origin, whether its
    calibration partitions were read rather than rebuilt)."""
    backtest_run_id: str
    as_of: dt.date
    origins: tuple[dt.date, ...]
    horizon_months: int
    champion: str
    champion_metric: str
    champion_purchase_basis: str
    purchase_basis: str                  # models.purchase_basis as configured (auto | gross | net)
    basis_comparison: dict[str, Any]
    champion_version: str | None
    mean_metric: dict[str, float]
    model_versions: dict[str, str | None]
    mlflow_parent_run_id: str | None
    metrics: list[dict[str, Any]]
    calibration_reused: dict[str, dict[str, bool]]
    notes: tuple[str, ...]
    seconds: dict[str, float]

    def summary_line(self) -> str:
        version = (f" -> registered version {self.champion_version} has alias 'champion'" if self.champion_version
                   else " (not registered)")
        return (f"backtest {self.backtest_run_id}, {len(self.origins)} origin(s): champion by mean "
                f"{self.champion_metric}: {self.champion}{version}")


def run_backtest(storage: Storage, as_of: dt.date, config: Config, n_origins: int = 1,
                 spacing_months: int = 1, backtest_run_id: str | None = None, rebuild: bool = False,
                 track: bool = True) -> BacktestResult:
    """Backtest every configured model at ``n_origins`` origins, log to MLflow, register and pick the
    champion, and merge the results into ``model_backtest`` / ``model_backtest_deciles``.

    ``backtest_run_id`` (default: a new id) keys the rows: re-running with the same id replaces that
    run's rows instead of adding them.
    """
    origins = backtest_origins(as_of, n_origins, spacing_months)
    run_id = backtest_run_id or f"bt-{as_of.isoformat()}-{uuid.uuid4().hex[:8]}"
    started_all = time.perf_counter()
    results = [run_origin(storage, origin, config, rebuild) for origin in origins]
    all_metrics = pd.concat([r.metrics.assign(origin_date=r.origin) for r in results], ignore_index=True)
    champion_metric = config.models.champion_metric
    champion, means = choose_champion(all_metrics, champion_metric)
    champion_basis = results[0].models.bundles[champion].purchase_basis
    basis_comparison = compare_bases(means, results[0].models.bundles, champion_metric)
    created_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    importance_rows = []
    if any(b.value_model == "hybrid" for b in results[0].models.bundles.values()):
        from pipelines.hybrid import importance_rows as hybrid_importance_rows

        newest = results[0]
        importance_rows = hybrid_importance_rows(newest.models.bundles, _calibration_rows(storage, newest.cutoff),
                                                 config.models.hybrid, run_id, newest.origin, newest.cutoff, created_at)

    runs = None
    started = time.perf_counter()
    if track:
        from core import tracking

        target = tracking.tracking_target(config)
        tracking.start(target)
        parent_params = {"backtest_run_id": run_id, "as_of": as_of.isoformat(), "origins": len(origins),
                         "spacing_months": spacing_months, "horizon_months": config.features.horizon_months,
                         "time_unit": config.features.time_unit, "penalizer_coef": config.models.penalizer_coef,
                         "purchase_models": list(config.models.purchase_models),
                         "compare_cohort": config.models.compare_cohort, "compare_naive": config.models.compare_naive,
                         "champion_metric": champion_metric, "orders_version": storage.version(ORDERS.name),
                         "purchase_basis": config.models.purchase_basis,
                         **channel_params(config.models.by_channel)}
        runs = tracking.log_backtest(
            target.registered_model, f"backtest-{as_of.isoformat()}", parent_params,
            {"kind": "backtest", "backtest_run_id": run_id}, _backtest_fits(results, run_id, config), champion,
            summary_metrics={f"mean_{champion_metric}_{m}": v for m, v in means.items()},
            summary_artifacts={"backtest_metrics": all_metrics,
                               "champion": {"model": champion, "metric": champion_metric,
                                            "purchase_basis": champion_basis, "basis_comparison": basis_comparison}})
    tracking_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _write_backtest_tables(storage, results, run_id, config, champion, runs, created_at, importance_rows)
    write_seconds = time.perf_counter() - started
    return BacktestResult(
        backtest_run_id=run_id, as_of=as_of, origins=tuple(origins), horizon_months=config.features.horizon_months,
        champion=champion, champion_metric=champion_metric, champion_purchase_basis=champion_basis,
        purchase_basis=config.models.purchase_basis, basis_comparison=basis_comparison,
        champion_version=runs.champion_version if runs else None, mean_metric={k: float(v) for k, v in means.items()},
        model_versions=dict(runs.versions) if runs else {}, mlflow_parent_run_id=runs.parent_run_id if runs else None,
        metrics=[{**{k: _json_value(v) for k, v in r.items()}, "origin_date": r["origin_date"].isoformat()}
                 for r in all_metrics.to_dict("records")],
        calibration_reused={r.origin.isoformat(): r.reused for r in results},
        notes=tuple(note for r in results for note in r.models.notes),
        seconds={"total": round(time.perf_counter() - started_all, 2), "mlflow": round(tracking_seconds, 2),
                 "write_tables": round(write_seconds, 2),
                 **{f"{r.origin.isoformat()}_{k}": round(v, 2) for r in results
                    for k, v in {**r.seconds, **r.models.seconds}.items()}})


def _backtest_fits(results: Sequence[OriginResult], run_id: str, config: Config) -> Iterator[BacktestFit]:
    """Each fitted model at each origin as MLflow logs it; the newest origin's fits are registered
    (what was just measured). MLflow parameter names are read back by ``cvseg models`` and the
    nightly refit: keep them."""
    horizon = config.features.horizon_months
    for position, result in enumerate(results):
        for name, bundle in result.models.bundles.items():
            row = result.metrics.set_index("model").loc[name]
            deciles = result.deciles[result.deciles["model"] == name].drop(columns="model")
            params = {"model": name, "value_model": bundle.value_model,
                      "purchase_model": bundle.purchase.name, "purchase_basis": bundle.purchase_basis,
                      "as_of": result.cutoff.isoformat(), "origin": result.origin.isoformat(),
                      "cutoff_date": result.cutoff.isoformat(), "horizon_end": result.horizon_end.isoformat(),
                      "horizon_months": horizon, "time_unit": config.features.time_unit,
                      "penalizer_coef": config.models.penalizer_coef,
                      "calibration_holdout_version": result.calibration_version,
                      "backtest_run_id": run_id}
            params.update(channel_run_params(bundle))    # nightly refits a channel-aware champion as such
            if name == "cohort":
                params.update(cohort_min_cell_size=config.models.cohort_min_cell_size,
                              cohort_by_channel=config.models.cohort_by_channel)
            metrics = {m: row[m] for m in (*METRIC_COLUMNS, *INTERVAL_METRIC_COLUMNS, "n_customers",
                                           "predicted_total", "actual_total")}
            suffix = "" if bundle.purchase_basis == "gross" else f"_{bundle.purchase_basis}"
            metrics.update({f"fit_seconds_{k.removeprefix('fit_')}": v
                            for k, v in result.models.seconds.items()
                            if k == f"fit_{name}" or k in (f"fit_gamma_gamma{suffix}",
                                                           f"sufficient_statistics{suffix}")})
            artifacts = {"decile_table": deciles, "parameters": parameter_table(bundle),
                         "calibration_plot": calibration_figure(
                             deciles, f"{name}: origin {result.origin}, cutoff {result.cutoff}")}
            bundle.metadata.update({"backtest_run_id": run_id, "cutoff_date": result.cutoff.isoformat(),
                                    "origin": result.origin.isoformat(), "model": name})
            if bundle.value_model == "hybrid":     # training cutoff, sample size, importances
                from pipelines.hybrid import tracking_extras

                extra_params, extra_artifacts = tracking_extras(bundle)
                params.update(extra_params)
                artifacts.update(extra_artifacts)
            yield BacktestFit(result.origin, name, bundle, params, metrics, artifacts,
                              {"kind": "backtest_fit", "backtest_run_id": run_id}, register=position == 0)


def _write_backtest_tables(storage: Storage, results: Sequence[OriginResult], run_id: str, config: Config,
                           champion: str, runs: BacktestRuns | None, created_at: dt.datetime,
                           importance_rows: list[dict[str, Any]]) -> None:
    """Merge the run's rows into ``model_backtest``, ``model_backtest_deciles`` (and the hybrid's
    ``model_importances``): a few rows per model, built on the driver, merged by key (a re-run with
    the same ``run_id`` replaces its rows)."""
    spark = storage.spark
    rows = []
    decile_rows = []
    for result in results:
        for record in result.metrics.to_dict("records"):
            name = record["model"]
            bundle = result.models.bundles[name]
            rows.append({
                "backtest_run_id": run_id, "origin_date": result.origin, "cutoff_date": result.cutoff,
                "horizon_end": result.horizon_end, "horizon_months": config.features.horizon_months,
                "time_unit": config.features.time_unit,
                "model": name, "value_model": bundle.value_model, "purchase_model": bundle.purchase.name,
                "purchase_basis": bundle.purchase_basis,
                "penalizer_coef": float(config.models.penalizer_coef),
                "n_customers": int(record["n_customers"]), "actual_total": float(record["actual_total"]),
                "predicted_total": float(record["predicted_total"]),
                **{m: _finite_or_none(record[m]) for m in (*METRIC_COLUMNS, *INTERVAL_METRIC_COLUMNS)},
                "calibration_holdout_version": int(result.calibration_version),
                "mlflow_run_id": runs.run_ids.get((result.origin, name)) if runs else None,
                "mlflow_parent_run_id": runs.parent_run_id if runs else None,
                "model_version": runs.versions.get(name) if runs and result is results[0] else None,
                "is_champion": bool(name == champion),
                "champion_metric": config.models.champion_metric, "created_at": created_at})
        for record in result.deciles.to_dict("records"):
            decile_rows.append({
                "backtest_run_id": run_id, "origin_date": result.origin, "model": record["model"],
                "decile": int(record["decile"]), "n": int(record["n"]),
                "mean_predicted": _finite_or_none(record["mean_predicted"]),
                "mean_actual": _finite_or_none(record["mean_actual"]),
                "sum_predicted": float(record["sum_predicted"]), "sum_actual": float(record["sum_actual"]),
                "created_at": created_at})
    storage.merge(MODEL_BACKTEST.name, spark.createDataFrame(rows, MODEL_BACKTEST.schema))
    storage.merge(MODEL_BACKTEST_DECILES.name, spark.createDataFrame(decile_rows, MODEL_BACKTEST_DECILES.schema))
    if importance_rows:
        from core.tables import MODEL_IMPORTANCES

        storage.merge(MODEL_IMPORTANCES.name, spark.createDataFrame(importance_rows, MODEL_IMPORTANCES.schema))


def _json_value(value: Any) -> Any:
    """numpy scalars to Python, NaN to None (for the JSON summary)."""
    if isinstance(value, (float, np.floating)):
        return _finite_or_none(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _finite_or_none(value: Any) -> float | None:
    """Delta/JSON-friendly: NaN (a degenerate metric) is stored as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
