"""Predicted value totals of groups of customers (segments, channels) with their 80% interval, and
the ``ltv_by_channel`` table.

A group total's interval is not the sum of its customers' intervals: the customers share the
fitted parameters, so the parameter part of their values adds up before it is squared while the
purchase and spend processes average out (``models/intervals.py``, "Intervals of group totals").
``customer_scores`` carries per customer what that needs (``predicted_net_value_sd``,
``_param_sd``, ``_param_loadings``); here they are summed per group in Spark, and only the sums
(a few numbers per group) go through :func:`models.intervals.total_quantiles`.

``ltv_by_channel`` (per as-of date D, acquisition channel and acquisition month): scored customers,
the sum and mean of their predicted 6-month net value with the total's P10 / P90, F2 within 90 days
(:func:`pipelines.trends.is_f2_converted`, as ``trend_f2_conversion``), the model version. Written by
the trends step after ``run_trends`` as a snapshot of the D partition: a re-run writes the same rows.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.results import StageResult
from core.storage import Storage
from core.tables import CUSTOMER_FEATURES, CUSTOMER_SCORES, LTV_BY_CHANNEL, SCORES_CARRIED_COLUMNS
from models import intervals as intervals_lib
from models.bundle import LOADINGS_COLUMN
from pipelines.trends import UNKNOWN, is_f2_complete, is_f2_converted, month_label, share

SD, PARAM_SD = "predicted_net_value_sd", "predicted_net_value_param_sd"
#: The sums a group's interval needs, as ``ltv_by_channel`` stores them (so its rows roll up exactly):
#: process variances, interaction sds and loadings (coordinate by coordinate) added over the customers,
#: and the customers with a value but no interval (their group gets no interval).
PROCESS_VAR, INTERACTION_SD = "predicted_net_value_process_var", "predicted_net_value_interaction_sd"
#: sum of log P(value = 0): the log-probability that the whole group brings nothing (the total's atom)
LOG_P_ZERO = "predicted_net_value_log_p_zero"
WITHOUT_INTERVAL = "customers_without_interval"


def loadings_width(scores_df: DataFrame) -> int:
    """Length of the loadings arrays (0 without intervals): one aggregate, two numbers to the driver.
    Every customer of one scores partition is scored by one bundle, so one length; two lengths
    would mean coordinates of different fits, which must not be added up."""
    return _scores_profile(scores_df)[1]


def _scores_profile(scores_df: DataFrame) -> tuple[int, int, int]:
    """(rows, :func:`loadings_width`, rows without the carried ``first_order_date``) in one pass: the
    last is every row for a partition scored before customer_scores carried the acquisition columns."""
    sizes = F.when(F.col(LOADINGS_COLUMN).isNotNull(), F.size(LOADINGS_COLUMN))
    row = scores_df.agg(F.count(F.lit(1)).alias("rows"), F.min(sizes).alias("low"), F.max(sizes).alias("high"),
                        (F.count_if(F.col("first_order_date").isNull()) if "first_order_date" in scores_df.columns
                         else F.count(F.lit(1))).alias("uncarried")).first()
    if row["low"] != row["high"]:
        raise ValueError(f"the rows mix parameter loadings of {row['low']} and {row['high']} coordinates (scores "
                         "of several fits in one date?); re-score the date with one model, then re-run trends")
    return int(row["rows"]), int(row["high"] or 0), int(row["uncarried"])


def _squared_norm(array: Column) -> Column:
    """Sum of the squares of an array column's elements (null for a null array)."""
    return F.aggregate(array, F.lit(0.0), lambda acc, x: acc + x * x)


def _loading_sums(column: Column, width: int) -> Column:
    """Element-wise sum of an array column over a group's rows (null when no row has one)."""
    return F.when(F.count(column) > 0, F.array(*[F.sum(column[k]) for k in range(width)]).cast("array<double>"))


def total_interval_sums(value: Column, width: int) -> list[Column]:
    """Aggregates over customers (``customer_scores`` columns): the group's value total ``value`` and the
    sums of :class:`models.intervals.GroupTerms` its interval needs (names as in ``ltv_by_channel``)."""
    sd, param_sd = F.col(SD), F.col(PARAM_SD)
    loadings_sq = _squared_norm(F.col(LOADINGS_COLUMN))
    return [
        F.sum(value).alias("value"),
        # GroupTerms.process_var and .interaction_sd, per customer
        F.sum(F.greatest(sd * sd - param_sd * param_sd, F.lit(0.0))).alias(PROCESS_VAR),
        F.sum(F.sqrt(F.greatest(param_sd * param_sd - loadings_sq, F.lit(0.0)))).alias(INTERACTION_SD),
        _loading_sums(F.col(LOADINGS_COLUMN), width).alias(LOADINGS_COLUMN),
        # P(value = 0) = 0 (a sure buyer) as 1e-300: exp of the sum is then 0 to double precision; null
        # (no interval: placed by rule, value 0 for sure) adds nothing (greatest() would skip the null)
        F.sum(F.when(F.col("p_zero_value").isNotNull(),
                     F.log(F.greatest(F.col("p_zero_value"), F.lit(1e-300))))).alias(LOG_P_ZERO),
        # a customer whose value is 0 by rule (placed by rule: no interval) adds nothing to either
        F.count_if(sd.isNull() & (F.coalesce(value, F.lit(0.0)) != 0)).alias(WITHOUT_INTERVAL),
    ]


def rollup_interval_sums(value: str, width: int) -> list[Column]:
    """Aggregates over rows of group sums (:func:`total_interval_sums`, ``ltv_by_channel``) into larger
    groups: every sum adds up again (the interaction sds stay a bound)."""
    return [F.sum(value).alias("value"), F.sum(PROCESS_VAR).alias(PROCESS_VAR),
            F.sum(INTERACTION_SD).alias(INTERACTION_SD),
            _loading_sums(F.col(LOADINGS_COLUMN), width).alias(LOADINGS_COLUMN),
            F.sum(LOG_P_ZERO).alias(LOG_P_ZERO), F.sum(WITHOUT_INTERVAL).alias(WITHOUT_INTERVAL)]


# a typed return type, not a DDL string: importing this module needs no Spark session
@F.pandas_udf(T.StructType([T.StructField("p10", T.DoubleType()), T.StructField("p90", T.DoubleType())]))
def _total_quantiles(mean: pd.Series, variance: pd.Series, log_p_zero: pd.Series) -> pd.DataFrame:
    quantiles = intervals_lib.total_quantiles(mean.to_numpy(float), variance.to_numpy(float),
                                              np.exp(log_p_zero.to_numpy(float)))
    return pd.DataFrame({"p10": quantiles[:, 0], "p90": quantiles[:, 1]})


def total_variance() -> Column:
    """:func:`models.intervals.group_total_variance` of the sums as a Column."""
    return F.col(PROCESS_VAR) + F.col(INTERACTION_SD) ** 2 + F.coalesce(_squared_norm(F.col(LOADINGS_COLUMN)),
                                                                         F.lit(0.0))


def with_total_interval(sums_df: DataFrame) -> DataFrame:
    """Rows of group sums with ``value_p10`` / ``value_p90``: the lognormal quantiles of the total
    (:func:`models.intervals.total_quantiles`, run on the grouped rows only); null when a customer
    with a value has no interval, or nobody has one."""
    has_interval = (F.col(WITHOUT_INTERVAL) == 0) & F.col(PROCESS_VAR).isNotNull()
    quantiles = F.when(has_interval, _total_quantiles(F.col("value"), total_variance(),
                                                      F.coalesce(F.col(LOG_P_ZERO), F.lit(0.0))))
    return sums_df.withColumn("_q", quantiles).select("*", F.col("_q.p10").alias("value_p10"),
                                                      F.col("_q.p90").alias("value_p90")).drop("_q")


# --------------------------------------------------------------------------------------------
# ltv_by_channel
# --------------------------------------------------------------------------------------------
def ltv_by_channel(scores_df: DataFrame, features_df: DataFrame | None, as_of_date: dt.date,
                   width: int) -> DataFrame:
    """``ltv_by_channel`` rows of one date from its ``customer_scores`` partition: every scored customer
    counts once. The acquisition columns are the scores' own (carried from the features at scoring)
    or, given ``features_df`` (a partition scored before they were carried), joined from it (a customer
    without a features row, which the score step cannot produce, would count under ``(unknown)``)."""
    if features_df is not None:
        attributes_df = features_df.select("customer_id", *SCORES_CARRIED_COLUMNS)
        scores_df = scores_df.drop(*SCORES_CARRIED_COLUMNS).join(attributes_df, on="customer_id", how="left")
    customers_df = scores_df.select(
        "*", F.coalesce(F.col("acquisition_channel"), F.lit(UNKNOWN)).alias("_channel"),
        F.trunc("first_order_date", "month").alias("month_day"), is_f2_converted(90).alias("is_converted"))
    joined_df = customers_df.drop("acquisition_channel").withColumnRenamed("_channel", "acquisition_channel")
    sums_df = joined_df.groupBy("acquisition_channel", "month_day").agg(
        F.count(F.lit(1)).alias("customers"),
        F.count_if(F.coalesce(F.col("is_converted"), F.lit(False))).alias("converted_90d"),
        # one bundle scores a date; max: the same answer whatever the row order
        F.max("model_version").alias("model_version"), F.max("horizon_months").alias("horizon_months"),
        *total_interval_sums(F.col("predicted_net_value"), width))
    return (with_total_interval(sums_df)
            .select(F.lit(as_of_date).alias("as_of_date"), "acquisition_channel",
                    F.coalesce(month_label(F.col("month_day")), F.lit(UNKNOWN)).alias("acquisition_month"),
                    "customers", F.col("value").alias("predicted_net_value"),
                    (F.col("value") / F.col("customers")).alias("predicted_net_value_mean"),
                    F.col("value_p10").alias("predicted_net_value_p10"),
                    F.col("value_p90").alias("predicted_net_value_p90"),
                    "converted_90d", share(F.col("converted_90d"), F.col("customers")).alias("f2_rate_90d"),
                    F.coalesce(is_f2_complete(F.col("month_day"), 90, as_of_date), F.lit(False))
                    .alias("is_complete_90d"),
                    PROCESS_VAR, INTERACTION_SD, LOADINGS_COLUMN, LOG_P_ZERO, WITHOUT_INTERVAL, "model_version",
                    "horizon_months"))


@dataclass(frozen=True)
class LtvByChannelResult(StageResult):
    """The ``ltv_by_channel`` partition :func:`run_ltv_by_channel` wrote, or why none was."""
    as_of_date: dt.date
    rows: int = 0
    customers: int = 0
    rows_with_interval: int = 0
    not_written: str | None = None      # D is not scored: what to run

    def asdict(self) -> dict[str, Any]:
        if self.not_written:
            return {"ltv_by_channel": self.not_written}
        return {"ltv_by_channel_rows": self.rows, "ltv_by_channel_customers": self.customers,
                "ltv_by_channel_rows_with_interval": self.rows_with_interval}

    def summary_line(self) -> str:
        if self.not_written:
            return f"ltv_by_channel {self.not_written}"
        return (f"ltv_by_channel: {self.rows:,} rows ({self.rows_with_interval:,} with an interval), "
                f"{self.customers:,} customers")


def run_ltv_by_channel(storage: Storage, as_of_date: dt.date) -> LtvByChannelResult:
    """Rewrite the D partition of ``ltv_by_channel`` from ``customer_scores`` and ``customer_features``
    at D; without scores for D nothing is written and the summary says what to run."""
    scores_df = (storage.read(CUSTOMER_SCORES).where(F.col("as_of_date") == F.lit(as_of_date))
                 if storage.exists(CUSTOMER_SCORES) else None)
    # one pass: whether D is scored, the loadings' width and whether its rows carry the acquisition columns
    scored, width, uncarried = _scores_profile(scores_df) if scores_df is not None else (0, 0, 0)
    if not scored:
        return LtvByChannelResult(as_of_date, not_written=f"not written: no customer_scores for {as_of_date} "
                                                          f"(run `cvseg score --as-of {as_of_date}`, then this again)")
    features_df = (storage.read(CUSTOMER_FEATURES).where(F.col("as_of_date") == F.lit(as_of_date))
                   if uncarried else None)
    rows_df = ltv_by_channel(scores_df, features_df, as_of_date, width)
    storage.replace_partitions(LTV_BY_CHANNEL, rows_df, partitions={"as_of_date": [as_of_date]})
    written = (storage.read(LTV_BY_CHANNEL).where(F.col("as_of_date") == F.lit(as_of_date))
               .agg(F.count(F.lit(1)).alias("rows"), F.sum("customers").alias("customers"),
                    F.count("predicted_net_value_p10").alias("with_interval")).first())
    return LtvByChannelResult(as_of_date, int(written["rows"]), int(written["customers"] or 0),
                              int(written["with_interval"]))


__all__ = ["loadings_width", "total_interval_sums", "rollup_interval_sums", "total_variance", "with_total_interval",
           "ltv_by_channel", "run_ltv_by_channel", "LtvByChannelResult"]
