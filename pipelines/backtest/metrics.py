"""The backtest metrics in Spark, per model: errors, ranks with tie groups, capture, deciles and interval
coverage (the reference definitions: :mod:`models.metrics`, which the tests hold these to)."""
from __future__ import annotations


import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from pipelines.backtest.schema import DECILE_COLUMNS



_FRAME_TO_CURRENT = (Window.unboundedPreceding, Window.currentRow)
_FRAME_WHOLE = (Window.unboundedPreceding, Window.unboundedFollowing)
RANK_A = "actual_rank_centered"

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
    ``actual_total`` of the model. Rows with ``actual_rank_centered`` (``predict_all``'s, see
    :func:`collect_actual_ranks`) also give the group's sum of it and of its square (Spearman's terms).
    """
    ordered = Window.partitionBy("model").orderBy(F.col("value").desc()).rowsBetween(*_FRAME_TO_CURRENT)
    whole = Window.partitionBy("model").rowsBetween(*_FRAME_WHOLE)
    rank_sums = [F.sum(RANK_A).alias("rank_a_sum"), F.sum(F.col(RANK_A) * F.col(RANK_A)).alias("rank_a_sq_sum")] \
        if RANK_A in predictions_df.columns else []
    return (predictions_df.groupBy("model", F.col(order_column).alias("value"))
            .agg(F.count(F.lit(1)).alias("customers"), F.sum("actual").alias("actual_sum"), *rank_sums)
            .withColumn("above", F.sum("customers").over(ordered) - F.col("customers"))
            .withColumn("captured_before", F.sum("actual_sum").over(ordered) - F.col("actual_sum"))
            .withColumn("n_total", F.sum("customers").over(whole))
            .withColumn("actual_total", F.sum("actual_sum").over(whole)))


def actual_tie_groups(holdout_df: DataFrame) -> DataFrame:
    """:func:`tie_groups` of the realised value (``holdout_net``) over an origin's customers, once for
    every model: :func:`~pipelines.backtest.transforms.predict_all` scores every customer with every model,
    so each model's ranking by actual is this one (its ``model`` column is a placeholder). Computed on N
    customer rows instead of N x models prediction rows."""
    return tie_groups(holdout_df.select(F.lit("*").alias("model"), F.col("holdout_net").alias("actual")), "actual")


def collect_actual_ranks(actual_groups: DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(distinct realised values ascending, their average ranks minus the mean rank (N + 1) / 2): one
    row per distinct value, a small sufficient statistic (amounts are whole yen: bounded by the spread
    of values, not by customers). ``predict_all`` looks each customer's rank up in it: no join of
    customer rows on a value that is 0 for most of them (one skewed partition). Centred, so that
    Spearman's sums of products do not cancel large terms."""
    centred = _ascending_average_rank() - (F.col("n_total") + F.lit(1.0)) / 2.0
    ranks = (actual_groups.select(F.col("value"), centred.alias("rank"))
             .orderBy("value").toPandas())
    return ranks["value"].to_numpy(float), ranks["rank"].to_numpy(float)


def rank_lookup(values: np.ndarray, ranks: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Each ``actual``'s rank from :func:`collect_actual_ranks`' arrays (exact values: they come from
    the same column)."""
    if len(actual) == 0:
        return np.empty(0)
    at = np.minimum(np.searchsorted(values, actual), max(len(values) - 1, 0))
    if len(values) == 0 or not np.array_equal(values[at], actual):
        raise ValueError("a realised value is missing from the origin's ranks (the holdout changed while "
                         "the backtest read it)")
    return ranks[at]


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


def _rank_correlation_from_groups() -> Column:
    """Spearman as Pearson on the ranks, from predicted tie groups carrying the sums of the customers'
    centred actual ranks (``rank_a_sum``, ``rank_a_sq_sum``): a group's centred predicted rank is
    ``(N - 2C - W) / 2``, the same for its W customers, so ``sum(rank_p * rank_a)`` is a sum over groups."""
    n = F.first("n_total")
    rank_p = (F.col("n_total") - F.lit(2.0) * F.col("above") - F.col("customers")) / 2.0
    mean_p = F.sum(rank_p * F.col("customers")) / n
    mean_a = F.sum("rank_a_sum") / n
    covariance = F.sum(rank_p * F.col("rank_a_sum")) / n - mean_p * mean_a
    variances = (F.sum(rank_p * rank_p * F.col("customers")) / n - mean_p * mean_p) \
        * (F.sum("rank_a_sq_sum") / n - mean_a * mean_a)
    # a constant ranking has no variance: null (try_divide; ANSI would raise), NaN in compute_metrics
    return F.try_divide(covariance, F.sqrt(F.greatest(variances, F.lit(0.0))))


def ranking_metrics(predictions_df: DataFrame, by_predicted: DataFrame | None = None,
                    actual_groups: DataFrame | None = None) -> DataFrame:
    """Per model: spearman, normalized_gini, top_decile_capture, top20_capture (NaN where degenerate).

    ``by_predicted``: :func:`tie_groups` of the same rows, when the caller has them. ``actual_groups``:
    :func:`actual_tie_groups` of the customers every model scored, with their ``actual_rank_centered``
    on the rows (:data:`~pipelines.backtest.schema.RANKED_PREDICTION_SCHEMA`, from ``predict_all``): then
    Spearman comes from the predicted tie groups' sums, with no join of the predictions. Without them
    the ranks by actual are computed per model (models may have scored different customers) and joined.
    """
    by_predicted = tie_groups(predictions_df, "predicted") if by_predicted is None else by_predicted
    curve_terms = [_gini_area().alias("gini"), _captured_share(0.1).alias("top_decile_capture"),
                   _captured_share(0.2).alias("top20_capture"), F.first("actual_total").alias("actual_total")]
    if actual_groups is None:
        curve = by_predicted.groupBy("model").agg(*curve_terms)
        by_actual = tie_groups(predictions_df, "actual")
        best = by_actual.groupBy("model").agg(_gini_area().alias("best_gini"))
        rank_p = by_predicted.select("model", F.col("value").alias("predicted"),
                                     _ascending_average_rank().alias("rank_p"))
        rank_a = by_actual.select("model", F.col("value").alias("actual"), _ascending_average_rank().alias("rank_a"))
        spearman = (predictions_df.select("model", "predicted", "actual")
                    .join(rank_a, on=["model", "actual"]).join(rank_p, on=["model", "predicted"])
                    .groupBy("model")
                    # Pearson from population moments; try_divide: a constant ranking has no variance
                    # (ANSI would raise), its null becomes NaN in compute_metrics
                    .agg(F.try_divide(F.covar_pop("rank_p", "rank_a"),
                                      F.sqrt(F.var_pop("rank_p") * F.var_pop("rank_a"))).alias("rank_corr")))
        curve = curve.join(best, on="model", how="inner").join(spearman, on="model", how="inner")
    else:   # one best curve for every model: one row
        curve = (by_predicted.groupBy("model").agg(*curve_terms, _rank_correlation_from_groups().alias("rank_corr"))
                 .crossJoin(actual_groups.agg(_gini_area().alias("best_gini"))))
    positive_total = F.col("actual_total") > 0
    return (curve
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


def compute_metrics(predictions_df: DataFrame, actual_groups: DataFrame | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per model with every metric, ten rows per model of deciles): bounded results only.

    ``actual_groups``: see :func:`ranking_metrics` (rows from ``predict_all(..., actual_ranks=...)``).
    Empty deciles are added on the driver (n = 0, NaN means), as in the reference.
    """
    errors = error_metrics(predictions_df).toPandas()
    # one row per tie group, read by two aggregates: materialised once (fewer rows than predictions)
    by_predicted = tie_groups(predictions_df, "predicted").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        ranks = ranking_metrics(predictions_df, by_predicted, actual_groups).toPandas()
        deciles = decile_table(predictions_df, by_predicted).toPandas()
    finally:
        by_predicted.unpersist()
    metrics = errors.merge(ranks, on="model", how="left")
    degenerate = metrics["all_predicted_equal"].astype(bool) | metrics["all_actual_equal"].astype(bool)
    metrics["spearman"] = np.where(degenerate, np.nan, np.clip(metrics["spearman_raw"].astype(float), -1.0, 1.0))
    metrics = metrics.drop(columns=["spearman_raw", "all_predicted_equal", "all_actual_equal"])
    full = pd.MultiIndex.from_product([sorted(metrics["model"]), range(1, 11)], names=["model", "decile"])
    deciles = deciles.set_index(["model", "decile"]).reindex(full).reset_index()
    deciles["n"] = deciles["n"].fillna(0).astype("int64")
    deciles[["sum_predicted", "sum_actual"]] = deciles[["sum_predicted", "sum_actual"]].fillna(0.0)
    return metrics.reset_index(drop=True), deciles[["model", *DECILE_COLUMNS]]


