"""Readers of the stage-2/3 tables (segments, trends, backtests) for the reports.

Each returns a small pandas frame, or :class:`~report.tables.Missing` when its table is
not in the warehouse, so the report says which command to run instead of failing. Column names
are those of the TableSpecs in :mod:`core.tables`.
"""
from __future__ import annotations

import datetime as dt

import pandas as pd
from dateutil.relativedelta import relativedelta
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from core.config import DORMANT, LIFECYCLE_SEGMENTS
from pipelines.identity import read_orders

from report.tables import GROUP_TOTAL_COLUMNS, Missing, missing, require, table_available, to_pandas
from pipelines.value_totals import loadings_width, rollup_interval_sums, total_interval_sums, with_total_interval


def _month(as_of: dt.date, months_back: int) -> str:
    return (as_of.replace(day=1) - relativedelta(months=months_back)).strftime("%Y-%m")


def segments_value(storage, base_df: DataFrame | None, as_of: dt.date) -> pd.DataFrame | Missing:
    """Customers and predicted 6-month value per current segment (highest mean value first).

    Value is the customer's score at the as-of date, or the value at assignment for customers
    without one (placed from an older score)."""
    absent = require(storage, as_of, "segments_current")
    if absent:
        return absent
    seg_df = storage.read("segments_current").select("customer_id", "segment", "generation_id",
                                                     "value_at_assignment")
    if base_df is not None:
        seg_df = seg_df.join(base_df.select("customer_id", "predicted_net_value", *GROUP_TOTAL_COLUMNS),
                             on="customer_id", how="left")
        value = F.coalesce(F.col("predicted_net_value"), F.col("value_at_assignment"))
    else:   # no interval for values at assignment: their customers count as without one
        seg_df = seg_df.select("*", *(F.lit(None).cast(t).alias(c) for c, t in GROUP_TOTAL_COLUMNS.items()))
        value = F.col("value_at_assignment")
    # the total's 80% interval (pipelines/value_totals.py): sums per segment, quantiles of a few rows
    sums_df = seg_df.groupBy("segment").agg(F.count(F.lit(1)).alias("customers"),
                                            F.max("generation_id").alias("generation_id"),
                                            *total_interval_sums(value, loadings_width(seg_df)))
    out = to_pandas(with_total_interval(sums_df).select("segment", "customers", "generation_id", "value", "value_p10",
                                                   "value_p90"))
    out["mean_value"] = out["value"] / out["customers"]
    # value bands by value (their own order), then the lifecycle segments, whatever their value
    lifecycle = {name: rank for rank, name in enumerate(LIFECYCLE_SEGMENTS, start=1)}
    out["_rank"] = out["segment"].map(lambda s: lifecycle.get(s, 0))
    return (out.sort_values(["_rank", "mean_value"], ascending=[True, False]).drop(columns="_rank")
            .rename(columns={"segment": "group"}).reset_index(drop=True))


def channel_value(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    """Per acquisition channel, from ``ltv_by_channel`` at the as-of date: customers, the predicted
    6-month value total with its 80% interval (the months' sums rolled up, pipelines/value_totals.py),
    the mean per customer, and F2 within 90 days over the months complete at the as-of date."""
    absent = require(storage, as_of, "ltv_by_channel")
    if absent:
        return absent
    rows_df = storage.read("ltv_by_channel", partitions={"as_of_date": [as_of]})
    complete = F.col("is_complete_90d")
    sums_df = rows_df.groupBy("acquisition_channel").agg(
        F.sum("customers").alias("customers"),
        F.sum(F.when(complete, F.col("customers"))).alias("f2_customers"),
        F.sum(F.when(complete, F.col("converted_90d"))).alias("converted_90d"),
        *rollup_interval_sums("predicted_net_value", loadings_width(rows_df)))
    out = to_pandas(with_total_interval(sums_df).select("acquisition_channel", "customers", "value", "value_p10",
                                                   "value_p90", "f2_customers", "converted_90d"))
    if out.empty:   # the table exists, but the trends step has not run for this date
        return missing(as_of, "ltv_by_channel")
    out["mean_value"] = out["value"] / out["customers"]
    out["f2_rate"] = out["converted_90d"] / out["f2_customers"].where(out["f2_customers"] > 0)
    return out.sort_values("value", ascending=False).reset_index(drop=True)


def f2_cohorts(storage, as_of: dt.date, months: int = 24) -> pd.DataFrame | Missing:
    """Complete 90-day F2 cohorts of the last N months from ``trend_f2_conversion``."""
    absent = require(storage, as_of, "trend_f2_conversion")
    if absent:
        return absent
    out = to_pandas(storage.read("trend_f2_conversion")
               .where(F.col("is_complete_90d") & (F.col("cohort_month") <= F.lit(as_of.strftime("%Y-%m"))))
               .orderBy(F.desc("cohort_month")).limit(months)
               .select("cohort_month", "customers", F.col("converted_90d").alias("converted"),
                       F.col("f2_rate_90d").alias("f2_rate")))
    out["cohort_month"] = pd.to_datetime(out["cohort_month"] + "-01").dt.date
    return out.sort_values("cohort_month").reset_index(drop=True)


def cohort_retention(storage, as_of: dt.date, cohorts: int = 18, max_months: int = 12) -> pd.DataFrame | Missing:
    absent = require(storage, as_of, "trend_cohort_retention")
    if absent:
        return absent
    first = _month(as_of, cohorts - 1)
    return to_pandas(storage.read("trend_cohort_retention")
                .where((F.col("cohort_month") >= F.lit(first)) & (F.col("months_since_first_order") <= max_months)
                       & (F.col("activity_month") <= F.lit(as_of.strftime("%Y-%m"))))
                .select("cohort_month", "months_since_first_order", "cohort_customers", "retention_rate"))


def yearly(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    absent = require(storage, as_of, "trend_yearly")
    if absent:
        return absent
    return to_pandas(storage.read("trend_yearly").where(F.col("year") <= as_of.year).orderBy("year"))


def channel_sets(storage, as_of: dt.date, years: int = 5) -> pd.DataFrame | None:
    """Yearly rows of trend_channel_sets (first source x source set), last ``years`` years; None
    for a client with one source (no such table: the report has no page for it)."""
    if not table_available(storage, "trend_channel_sets"):
        return None
    return to_pandas(storage.read("trend_channel_sets")
                .where((F.col("period") == "year") & (F.col("year") > as_of.year - years) & (F.col("year") <= as_of.year))
                .select("year", "first_source", "source_set", "customers", "converted_90d", "net_6m",
                        "crossed_customers", "is_complete_90d", "is_complete_6m"))


def yearly_category(storage, as_of: dt.date, top: int = 6) -> pd.DataFrame | Missing:
    """Net revenue per year of the ``top`` categories by total net (the rest summed as other)."""
    absent = require(storage, as_of, "trend_yearly_category")
    if absent:
        return absent
    return to_pandas(storage.read("trend_yearly_category").where(F.col("year") <= as_of.year)
                .select("year", "category", "net", "new_customers", "existing_customers", "is_partial_year"))


def weekly_segment(storage, as_of: dt.date, weeks: int = 26) -> pd.DataFrame | Missing:
    absent = require(storage, as_of, "trend_weekly_segment")
    if absent:
        return absent
    start = as_of - dt.timedelta(days=7 * weeks)
    return to_pandas(storage.read("trend_weekly_segment")
                .where((F.col("year") >= start.year)    # partition pruning
                       & (F.col("week_start") > F.lit(start)) & (F.col("week_end") <= F.lit(as_of)))   # whole weeks
                .select("week_start", "segment", "customers", "active_buyers", "orders", "net", "is_partial_week")
                .orderBy("week_start", "segment"))


def _latest_backtest_run(storage, as_of: dt.date) -> tuple[str, dt.date] | None:
    row = (storage.read("model_backtest").where(F.col("origin_date") <= F.lit(as_of))
           .orderBy(F.desc("created_at"), F.desc("origin_date")).select("backtest_run_id", "origin_date").first())
    return (row["backtest_run_id"], row["origin_date"]) if row else None


def backtest(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    """Metrics of every model at the newest origin of the latest backtest run up to the as-of date."""
    absent = require(storage, as_of, "model_backtest")
    if absent:
        return absent
    latest = _latest_backtest_run(storage, as_of)
    if latest is None:
        return pd.DataFrame()
    run_id, origin = latest
    return to_pandas(storage.read("model_backtest")
                .where((F.col("backtest_run_id") == run_id) & (F.col("origin_date") == F.lit(origin)))
                .select("backtest_run_id", "origin_date", "cutoff_date", "horizon_end", "model", "value_model",
                        "n_customers", "actual_total", "predicted_total", "mae", "rmse", "abs_total_error_pct",
                        "total_error_pct", "spearman", "normalized_gini", "top_decile_capture", "top20_capture",
                        "interval_coverage", "is_champion", "champion_metric", "model_version",
                        F.coalesce(F.col("purchase_basis"), F.lit("gross")).alias("purchase_basis"))
                .orderBy("model"))


def backtest_deciles(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    absent = require(storage, as_of, "model_backtest", "model_backtest_deciles")
    if absent:
        return absent
    latest = _latest_backtest_run(storage, as_of)
    if latest is None:
        return pd.DataFrame()
    run_id, origin = latest
    return to_pandas(storage.read("model_backtest_deciles")
                .where((F.col("backtest_run_id") == run_id) & (F.col("origin_date") == F.lit(origin)))
                .select("model", "decile", "n", "mean_predicted", "mean_actual").orderBy("model", "decile"))


def hybrid_importances(storage, as_of: dt.date, top: int = 10) -> pd.DataFrame | Missing:
    """The hybrid's inputs by permutation importance (top ``top``) in the latest backtest run up to the
    as-of date; empty when that run had no hybrid (the model page shows them when one is champion)."""
    if not table_available(storage, "model_backtest") or not table_available(storage, "model_importances"):
        return pd.DataFrame()
    latest = _latest_backtest_run(storage, as_of)
    if latest is None:
        return pd.DataFrame()
    return to_pandas(storage.read("model_importances").where((F.col("backtest_run_id") == latest[0])
                                                        & (F.col("rank") <= top))
                .select("model", "feature", "rank", "importance", "importance_std", "split_gain_share",
                        "training_cutoff", "training_rows", "holdout_rows", "base_model", "base_params")
                .orderBy("model", "rank"))


def migration(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    """The migration matrix into the newest generation (long form)."""
    absent = require(storage, as_of, "segment_migration")
    if absent:
        return absent
    mig_df = storage.read("segment_migration")
    newest = mig_df.agg(F.max("to_generation")).first()[0]
    if newest is None:
        return pd.DataFrame(columns=["from_generation", "to_generation", "from_segment", "to_segment", "customers"])
    return to_pandas(mig_df.where(F.col("to_generation") == newest)
                .select("from_generation", "to_generation", "from_segment", "to_segment", "customers"))


def generation_review(storage, as_of: dt.date) -> pd.DataFrame | Missing:
    """Predicted vs actual per segment of the last generation that ended on or before the as-of date."""
    absent = require(storage, as_of, "generation_review")
    if absent:
        return absent
    review_df = storage.read("generation_review").where(F.col("valid_to") <= F.lit(as_of))
    newest = review_df.agg(F.max("generation_id")).first()[0]
    if newest is None:
        return pd.DataFrame(columns=["generation_id", "segment", "customers", "predicted_net_value",
                                     "actual_net_value", "actual_to_predicted", "horizon_coverage"])
    return to_pandas(review_df.where(F.col("generation_id") == newest)
                .select("generation_id", "segment", "valid_from", "valid_to", "customers", "predicted_net_value",
                        "actual_net_value", "actual_to_predicted", "horizon_coverage")
                .orderBy(F.desc("predicted_net_value")))


# --------------------------------------------------------------------------------------------
# Weekly report
# --------------------------------------------------------------------------------------------
def _week_of(column, windows) -> F.Column:
    label = F.lit(None).cast("string")
    for name, (start, end) in windows.items():
        label = F.when(column.between(F.lit(start), F.lit(end)), F.lit(name)).otherwise(label)
    return label


def new_customers_weekly(storage, as_of: dt.date, windows) -> pd.DataFrame | Missing:
    """New customers per window and channel from ``trend_new_customers_weekly``."""
    absent = require(storage, as_of, "trend_new_customers_weekly")
    if absent:
        return absent
    starts = [start for start, _ in windows.values()]
    return to_pandas(storage.read("trend_new_customers_weekly")
                .where(F.col("year").isin(sorted({s.year for s in starts}))     # partition pruning
                       & F.col("week_start").isin([F.lit(s) for s in starts]))
                .select(_week_of(F.col("week_start"), windows).alias("week"),
                        F.col("acquisition_channel").alias("channel"), "new_customers"))


def weekly_segment_compare(storage, as_of: dt.date, windows) -> pd.DataFrame | Missing:
    absent = require(storage, as_of, "trend_weekly_segment")
    if absent:
        return absent
    starts = [start for start, _ in windows.values()]
    return to_pandas(storage.read("trend_weekly_segment")
                .where(F.col("year").isin(sorted({s.year for s in starts}))     # partition pruning
                       & F.col("week_start").isin([F.lit(s) for s in starts]))
                .select(_week_of(F.col("week_start"), windows).alias("week"), "segment", "customers",
                        "active_buyers", "orders", "net"))




def dormant_movements(storage, as_of: dt.date, windows) -> pd.DataFrame | Missing:
    """Per window: dormant customers at its end, customers who became dormant in it (their
    ``dormant`` row starts in the window) and dormant customers who bought in it (reactivated)."""
    absent = require(storage, as_of, "segments_history", "orders")
    if absent:
        return absent
    hist_df = storage.read("segments_history").where(F.col("segment") == DORMANT).select(
        "customer_id", "valid_from", "valid_to")
    first = min(start for start, _ in windows.values())
    orders_df = (read_orders(storage).where((F.col("order_date") >= F.lit(first)) & ~F.col("is_cancelled"))
                 .select("customer_id", "order_date"))
    first_valid_from = storage.read("segments_history").agg(F.min("valid_from")).first()[0]
    rows = []
    for name, (start, end) in windows.items():
        if first_valid_from is None or end < first_valid_from:   # no segments recorded yet that week
            rows.append({"week": name, "dormant": None, "became_dormant": None, "reactivated": None})
            continue
        valid_at_end = (F.col("valid_from") <= F.lit(end)) & (F.col("valid_to").isNull() | (F.col("valid_to") > F.lit(end)))
        valid_at_start = (F.col("valid_from") <= F.lit(start)) & (
            F.col("valid_to").isNull() | (F.col("valid_to") > F.lit(start)))
        counts = hist_df.agg(F.count_if(valid_at_end).alias("dormant"),
                             F.count_if(F.col("valid_from").between(F.lit(start), F.lit(end))).alias("became")).first()
        buyers = (hist_df.where(valid_at_start).select("customer_id")
                  .join(orders_df.where(F.col("order_date").between(F.lit(start), F.lit(end))),
                        on="customer_id", how="left_semi").count())
        rows.append({"week": name, "dormant": counts["dormant"], "became_dormant": counts["became"],
                     "reactivated": buyers})
    out = pd.DataFrame(rows)
    out.attrs["first_valid_from"] = first_valid_from
    return out
