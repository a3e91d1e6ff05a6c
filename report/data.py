"""What the reports show, gathered from the engine's tables as small Spark aggregates.

Nothing customer-sized reaches the driver: every function returns a grouped result (a few rows
per week, cohort, channel, segment or histogram bin) or a handful of scalars. The customer base
(features joined with scores) is read in two passes: one aggregate for the summary figures and
every quantile (``percentile_approx``, rank error 0.1%), then one ``groupBy`` for all grouped
figures at once, histograms included (bins cut Spark-side from those quantiles).

A table that does not exist yet is reported as :class:`Missing` (with the command that produces
it) instead of failing, so the report works on any warehouse and fills in as stages are added.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.identity import read_orders
from pipelines.maintenance import ensure_not_pruned
from report import sources
from report.tables import GROUP_TOTAL_COLUMNS, Missing, require, table_available, to_pandas

HISTOGRAM_BINS = 30
F2_WINDOW_DAYS = 90
UNKNOWN = "__unknown__"          # null channel / category; the renderer shows it translated

@dataclass(frozen=True)
class Histogram:
    """Bin counts over [0, cap) in equal bins; the last bin also holds everything above cap."""

    edges: np.ndarray
    counts: np.ndarray
    median: float | None
    mean: float | None
    cap: float
    total: int


def _nice_cap(value: float | None) -> float:
    """Round a histogram's upper limit up to 1, 2, 2.5 or 5 x 10^k so bin edges read well."""
    if value is None or not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exponent >= value:
            return step * exponent
    return 10 * exponent


def months_before(as_of: dt.date, months: int) -> Column:
    return F.add_months(F.lit(as_of), -months)


# --------------------------------------------------------------------------------------------
# Customer base: features joined with scores at the as-of date, aggregated in two passes
# --------------------------------------------------------------------------------------------
def customer_base(storage, as_of: dt.date) -> DataFrame | Missing:
    absent = require(storage, as_of, "customer_features")
    if absent:
        return absent
    features_df = (storage.read("customer_features").where(F.col("as_of_date") == F.lit(as_of))
                   .select("customer_id", "first_order_date", "last_order_date", "n_orders", "gross_amount",
                           "cancelled_amount", "net_amount", "net_12m", "is_repeat", "days_to_second_purchase",
                           "gap_mean_days", "avg_order_value", "cancel_rate_amount", "orders_12m",
                           "acquisition_channel", "first_category"))
    if table_available(storage, "customer_scores"):
        scores_df = (storage.read("customer_scores").where(F.col("as_of_date") == F.lit(as_of))
                     .select("customer_id", "p_alive", "predicted_gross_value", "predicted_net_value",
                             "value_model", "model_version", *GROUP_TOTAL_COLUMNS,
                             # scores written before the basis existed were on gross orders
                             F.coalesce(F.col("purchase_basis"), F.lit("gross")).alias("purchase_basis")))
        if scores_df.limit(1).count() == 0:   # one partition, pruned: cheap
            ensure_not_pruned(storage, "customer_features", as_of)   # the first to recompute, if pruned too
            ensure_not_pruned(storage, "customer_scores", as_of)
        return features_df.join(scores_df, on="customer_id", how="left")
    return features_df.select("*", *(F.lit(None).cast(t).alias(c) for c, t in (
        ("p_alive", "double"), ("predicted_gross_value", "double"), ("predicted_net_value", "double"),
        ("value_model", "string"), ("model_version", "string"), ("purchase_basis", "string"),
        *GROUP_TOTAL_COLUMNS.items())))


HIST_COLUMNS = {"gap": "gap_mean_days", "aov": "avg_order_value", "value": "predicted_net_value"}
DECILE_QUANTILES = [i / 10 for i in range(9, 0, -1)]    # cut points of deciles 1 (top) .. 9
PERCENTILE_ACCURACY = 1000                              # relative rank error 0.1%


def base_scalars(base_df: DataFrame, as_of: dt.date) -> dict[str, Any]:
    """Pass 1: the summary figures and every quantile the histograms and deciles need."""
    quantiles = [F.percentile_approx(column, [0.5, 0.97], PERCENTILE_ACCURACY).alias(f"q_{name}")
                 for name, column in HIST_COLUMNS.items()]
    row = base_df.agg(
        F.count(F.lit(1)).alias("customers"),
        F.count_if(F.col("orders_12m") > 0).alias("active_12m"),
        F.count_if(F.col("first_order_date") > months_before(as_of, 12)).alias("new_12m"),
        F.count_if(F.col("is_repeat")).alias("repeat_customers"),
        # revenue up to D: features sum every order on or before D, so these equal sums over orders
        F.sum("gross_amount").alias("gross_total"),
        F.sum("cancelled_amount").alias("cancelled_total"),
        F.sum("net_amount").alias("net_total"),
        F.sum("net_12m").alias("net_12m"),
        F.sum("n_orders").alias("orders_total"),
        F.min("first_order_date").alias("first_order_date"),
        F.max("last_order_date").alias("last_order_date"),
        F.count("predicted_net_value").alias("scored"),
        F.sum("predicted_net_value").alias("predicted_net_6m"),
        F.avg("p_alive").alias("mean_p_alive"),
        F.percentile_approx("days_to_second_purchase", 0.5, PERCENTILE_ACCURACY).alias("median_days_to_second"),
        F.count("cancel_rate_amount").alias("with_cancel_rate"),
        F.count_if(F.col("cancel_rate_amount") == 0).alias("zero_cancel"),
        F.percentile_approx("predicted_net_value", DECILE_QUANTILES, PERCENTILE_ACCURACY).alias("decile_cuts"),
        *quantiles,
    ).first().asDict()
    row["repeat_rate"] = row["repeat_customers"] / row["customers"] if row["customers"] else None
    return row


CANCEL_BAND_LABELS = ("0-5%", "5-20%", "20-50%", "50-100%")
CANCEL_BINS = 20


def _bin(column: str, cap: float, bins: int) -> Column:
    """Equal bins over [0, cap); the last bin also takes everything above cap."""
    index = F.floor(F.col(column) / F.lit(cap / bins))
    return F.least(F.greatest(index, F.lit(0)), F.lit(bins - 1)).cast("int")


def base_groups(base_df: DataFrame, as_of: dt.date, caps: dict[str, float], decile_cuts: list[float] | None,
                new_months: int = 12, f2_months: int = 24) -> pd.DataFrame:
    """Pass 2: every grouped figure in one shuffle: each customer emits one (dim, key, v1, v2) row
    per grouping it belongs to; the result has a few hundred rows (bins, bands, deciles, channels,
    categories, cohorts)."""
    scored = F.col("predicted_net_value").isNotNull()
    is_new = (F.col("first_order_date") > months_before(as_of, new_months)) & scored
    rate = F.col("cancel_rate_amount")
    band = F.when(rate < 0.05, 0).when(rate < 0.2, 1).when(rate < 0.5, 2).otherwise(3)
    cohort_complete = ((F.date_add(F.last_day("first_order_date"), F2_WINDOW_DAYS) <= F.lit(as_of))
                       & (F.col("first_order_date") > months_before(as_of, f2_months + 4)))
    converted = (F.col("days_to_second_purchase") <= F2_WINDOW_DAYS).cast("double")

    def emit(dim: str, condition: Column, key: Column, v1: Column, v2: Column = F.lit(None)) -> Column:
        return F.when(condition, F.struct(F.lit(dim).alias("dim"), key.cast("string").alias("key"),
                                          v1.cast("double").alias("v1"), v2.cast("double").alias("v2")))

    rows = [emit(f"hist_{name}", F.col(column).isNotNull(), _bin(column, caps[name], HISTOGRAM_BINS), F.col(column))
            for name, column in HIST_COLUMNS.items()]
    rows += [
        emit("hist_cancel", rate.isNotNull(), _bin("cancel_rate_amount", 1.0, CANCEL_BINS), rate),
        emit("band", rate.isNotNull() & scored, band, F.col("predicted_gross_value"), F.col("predicted_net_value")),
        emit("channel", is_new, F.coalesce(F.col("acquisition_channel"), F.lit(UNKNOWN)), F.col("predicted_net_value")),
        emit("category", is_new, F.coalesce(F.col("first_category"), F.lit(UNKNOWN)), F.col("predicted_net_value")),
        emit("f2", cohort_complete, F.date_format(F.trunc("first_order_date", "month"), "yyyy-MM-dd"), converted),
        emit("model", F.col("value_model").isNotNull(),
             F.concat_ws("|", "value_model", "model_version", "purchase_basis"),
             F.col("predicted_net_value")),
    ]
    if decile_cuts:
        decile = F.lit(10)
        for i, cut in reversed(list(enumerate(decile_cuts, start=1))):   # the top cut, checked last, wins
            decile = F.when(F.col("predicted_net_value") >= F.lit(cut), F.lit(i)).otherwise(decile)
        rows.append(emit("decile", scored, decile, F.col("predicted_net_value")))
    grouped_df = (base_df.select(F.explode(F.array(*rows)).alias("g")).where(F.col("g").isNotNull())
                  .groupBy(F.col("g.dim").alias("dim"), F.col("g.key").alias("key"))
                  .agg(F.count(F.lit(1)).alias("n"), F.sum("g.v1").alias("v1"), F.sum("g.v2").alias("v2")))
    return to_pandas(grouped_df, limit=20_000)


def _dim(groups: pd.DataFrame, dim: str) -> pd.DataFrame:
    return groups[groups["dim"] == dim].drop(columns="dim").reset_index(drop=True)


def _histogram(groups: pd.DataFrame, dim: str, cap: float, bins: int, median: float | None) -> Histogram | None:
    part = _dim(groups, dim)
    if part.empty:
        return None
    counts = np.zeros(bins, dtype=np.int64)
    counts[part["key"].astype(int).to_numpy()] = part["n"].to_numpy()
    total = int(counts.sum())
    return Histogram(edges=np.linspace(0.0, cap, bins + 1), counts=counts, median=median,
                     mean=float(part["v1"].sum()) / total if total else None, cap=cap, total=total)


def _per_group(groups: pd.DataFrame, dim: str, top: int = 10) -> pd.DataFrame:
    part = _dim(groups, dim).rename(columns={"key": "group", "n": "customers"})
    part["mean_value"] = part["v1"] / part["customers"]
    return part.sort_values("customers", ascending=False).head(top)[["group", "customers", "mean_value"]]


def quarantine(storage, as_of: dt.date) -> dict[str, Any] | Missing:
    absent = require(storage, as_of, "ingest_runs")
    if absent:
        return absent
    runs = storage.read("ingest_runs").agg(
        F.count(F.lit(1)).alias("runs"), F.sum("input_rows").alias("input_rows"),
        F.sum("accepted_rows").alias("accepted_rows"), F.sum("quarantined_rows").alias("quarantined_rows"),
        F.sum("exact_duplicate_rows").alias("exact_duplicate_rows")).first().asDict()
    reasons = pd.DataFrame(columns=["reason", "rows"])
    if table_available(storage, "orders_quarantine"):
        reasons = to_pandas(storage.read("orders_quarantine").groupBy("reason")
                       .agg(F.count(F.lit(1)).alias("rows")).orderBy(F.desc("rows"), "reason"))
    return {"runs": runs, "reasons": reasons}


# --------------------------------------------------------------------------------------------
# Everything the diagnostic report needs
# --------------------------------------------------------------------------------------------
@dataclass
class DiagnosticData:
    as_of: dt.date
    kpis: dict[str, Any] | Missing
    f2_cohorts: pd.DataFrame | Missing
    cohort_retention: pd.DataFrame | Missing
    gap_hist: Histogram | None | Missing
    aov_hist: Histogram | None | Missing
    cancel_hist: Histogram | None | Missing
    zero_cancel_share: float | None
    cancel_bands: pd.DataFrame | Missing
    value_hist: Histogram | None | Missing
    pareto: pd.DataFrame | Missing
    pareto_kind: str                      # decile | segment
    deciles: pd.DataFrame | Missing
    value_by_segment: pd.DataFrame | Missing
    new_by_channel: pd.DataFrame | Missing
    new_by_category: pd.DataFrame | Missing
    yearly: pd.DataFrame | Missing
    yearly_category: pd.DataFrame | Missing
    weekly_segment: pd.DataFrame | Missing
    champion: pd.DataFrame | Missing
    backtest: pd.DataFrame | Missing
    backtest_deciles: pd.DataFrame | Missing
    migration: pd.DataFrame | Missing
    generation_review: pd.DataFrame | Missing
    quarantine: dict[str, Any] | Missing
    # the hybrid's permutation importances of the latest backtest (empty when it has no hybrid)
    hybrid_importances: pd.DataFrame | Missing = field(default_factory=pd.DataFrame)
    # with several sources: trend_channel_sets' yearly rows (None: one source, no page)
    channel_sets: pd.DataFrame | None = None
    # ltv_by_channel rolled up per channel (None: not gathered, no page)
    channel_value: pd.DataFrame | Missing | None = None


def collect_diagnostic(storage, as_of: dt.date) -> DiagnosticData:
    """Every aggregate of the diagnostic report: two passes over the customer base and small reads
    of the aggregated tables. Long on purpose: one read per report section, in page order, around
    the one persisted customer base that two of them share."""
    base = customer_base(storage, as_of)
    scores_missing = require(storage, as_of, "customer_scores")
    if isinstance(base, Missing):
        kpis: dict[str, Any] | Missing = base
        groups = None
    else:
        base_df = base.persist()    # two passes read it; executors only, never the driver
        try:
            kpis = base_scalars(base_df, as_of)
            if kpis["customers"] == 0:
                ensure_not_pruned(storage, "customer_features", as_of)
                raise LookupError(f"customer_features has no rows as of {as_of}; run `cvseg features --as-of "
                                  f"{as_of}` or pick an as-of date that has features (`cvseg show customer_features`)")
            caps = {name: _nice_cap((kpis[f"q_{name}"] or [None, None])[1]) for name in HIST_COLUMNS}
            groups = base_groups(base_df, as_of, caps, kpis["decile_cuts"])
            segments = sources.segments_value(storage, base_df, as_of)
        finally:
            base_df.unpersist()

    def from_groups(fn, *, needs_scores: bool = False):
        if isinstance(kpis, Missing):
            return kpis
        if needs_scores and scores_missing:
            return scores_missing
        return fn()

    def hist(name: str):
        return _histogram(groups, f"hist_{name}", caps[name], HISTOGRAM_BINS, (kpis[f"q_{name}"] or [None])[0])

    def bands():
        part = _dim(groups, "band").rename(columns={"n": "customers"})
        part["band"] = part["key"].astype(int)
        part["mean_gross"] = part["v1"] / part["customers"]
        part["mean_net"] = part["v2"] / part["customers"]
        return part.sort_values("band")[["band", "customers", "mean_gross", "mean_net"]].reset_index(drop=True)

    def deciles():
        part = _dim(groups, "decile").rename(columns={"n": "customers", "v1": "value"})
        part["group"] = part["key"].astype(int)
        return part.sort_values("group")[["group", "customers", "value"]].reset_index(drop=True)

    def f2_features():
        part = _dim(groups, "f2").rename(columns={"n": "customers", "v1": "converted"})
        part["cohort_month"] = pd.to_datetime(part["key"]).dt.date
        part["f2_rate"] = part["converted"] / part["customers"]
        return part.sort_values("cohort_month").tail(24)[["cohort_month", "customers", "converted", "f2_rate"]] \
            .reset_index(drop=True)

    def models():
        part = _dim(groups, "model").rename(columns={"n": "customers"})
        split = part["key"].str.split("|", n=2, expand=True)
        part["value_model"], part["model_version"] = split[0], split[1]
        part["purchase_basis"] = split[2] if 2 in split.columns else "gross"
        return part.sort_values("customers", ascending=False)[["value_model", "model_version", "purchase_basis",
                                                               "customers"]]

    decile_df = from_groups(deciles, needs_scores=True)
    if isinstance(kpis, Missing):
        segments = kpis
    if not isinstance(segments, Missing) and not scores_missing:
        pareto, pareto_kind = segments, "segment"
    else:
        pareto, pareto_kind = decile_df, "decile"
    f2 = sources.f2_cohorts(storage, as_of)
    if isinstance(f2, Missing):
        f2 = from_groups(f2_features)
    zero_cancel = None
    if not isinstance(kpis, Missing) and kpis["with_cancel_rate"]:
        zero_cancel = kpis["zero_cancel"] / kpis["with_cancel_rate"]
    return DiagnosticData(
        as_of=as_of,
        kpis=kpis,
        f2_cohorts=f2,
        cohort_retention=sources.cohort_retention(storage, as_of),
        gap_hist=from_groups(lambda: hist("gap")),
        aov_hist=from_groups(lambda: hist("aov")),
        cancel_hist=from_groups(lambda: _histogram(groups, "hist_cancel", 1.0, CANCEL_BINS, None)),
        zero_cancel_share=zero_cancel,
        cancel_bands=from_groups(bands, needs_scores=True),
        value_hist=from_groups(lambda: hist("value"), needs_scores=True),
        pareto=pareto,
        pareto_kind=pareto_kind,
        deciles=decile_df,
        value_by_segment=segments,
        new_by_channel=from_groups(lambda: _per_group(groups, "channel"), needs_scores=True),
        new_by_category=from_groups(lambda: _per_group(groups, "category"), needs_scores=True),
        yearly=sources.yearly(storage, as_of),
        yearly_category=sources.yearly_category(storage, as_of),
        weekly_segment=sources.weekly_segment(storage, as_of, weeks=26),
        champion=from_groups(models, needs_scores=True),
        backtest=sources.backtest(storage, as_of),
        backtest_deciles=sources.backtest_deciles(storage, as_of),
        migration=sources.migration(storage, as_of),
        generation_review=sources.generation_review(storage, as_of),
        quarantine=quarantine(storage, as_of),
        hybrid_importances=sources.hybrid_importances(storage, as_of),
        channel_sets=sources.channel_sets(storage, as_of),
        channel_value=sources.channel_value(storage, as_of),
    )

# --------------------------------------------------------------------------------------------
# Weekly report
# --------------------------------------------------------------------------------------------
def week_windows(as_of: dt.date) -> dict[str, tuple[dt.date, dt.date]]:
    """This week = the last complete Monday-Sunday week ending on or before the as-of date (the
    weeks of the trend tables); last week; the same week 52 weeks earlier (same weekdays)."""
    end = as_of - dt.timedelta(days=(as_of.weekday() + 1) % 7)

    def window(last_day: dt.date) -> tuple[dt.date, dt.date]:
        return last_day - dt.timedelta(days=6), last_day
    return {"this": window(end), "last": window(end - dt.timedelta(days=7)),
            "year": window(end - dt.timedelta(days=364))}


def _week_label(column: Column, windows: dict[str, tuple[dt.date, dt.date]]) -> Column:
    label = F.lit(None).cast("string")
    for name, (start, end) in windows.items():
        label = F.when(column.between(F.lit(start), F.lit(end)), F.lit(name)).otherwise(label)
    return label


@dataclass
class WeeklyData:
    as_of: dt.date
    windows: dict[str, tuple[dt.date, dt.date]]
    orders: pd.DataFrame | Missing         # week, orders, buyers, gross, net
    new_f2: pd.DataFrame | Missing         # week, channel, new_customers, f2_conversions
    segments: pd.DataFrame | Missing       # segment, week, customers, active, net
    dormant: pd.DataFrame | Missing        # week, into_dormant, out_of_dormant


def collect_weekly(storage, as_of: dt.date) -> WeeklyData:
    windows = week_windows(as_of)
    orders = require(storage, as_of, "orders")
    if orders is None:
        week = _week_label(F.col("order_date"), windows)
        first_day = windows["year"][0]
        orders = to_pandas(read_orders(storage)   # buyers on the unified customer id
                      .where((F.col("order_month") >= F.lit(first_day.strftime("%Y-%m")))   # partition pruning
                             & (F.col("order_date") >= F.lit(first_day)))
                      .withColumn("week", week).where(F.col("week").isNotNull())
                      .groupBy("week").agg(F.count(F.lit(1)).alias("orders"),
                                           F.countDistinct("customer_id").alias("buyers"),
                                           F.sum("gross_amount").alias("gross"),
                                           F.sum("net_amount").alias("net")))
    new_f2 = _new_and_f2_from_features(storage, as_of, windows)
    new_trend = sources.new_customers_weekly(storage, as_of, windows)
    if not isinstance(new_f2, Missing) and not isinstance(new_trend, Missing):
        # the trend table is the source of new customers; F2 per week only exists in features
        f2_only = new_f2[["week", "channel", "f2_conversions"]]
        f2_only = f2_only.assign(channel=f2_only["channel"].replace(UNKNOWN, "(unknown)"))
        new_f2 = new_trend.merge(f2_only, on=["week", "channel"], how="outer").fillna(0)
    return WeeklyData(as_of=as_of, windows=windows, orders=orders, new_f2=new_f2,
                      segments=sources.weekly_segment_compare(storage, as_of, windows),
                      dormant=sources.dormant_movements(storage, as_of, windows))


def _new_and_f2_from_features(storage, as_of: dt.date, windows) -> pd.DataFrame | Missing:
    """New customers (first order in the week) and F2 conversions (second purchase day in the week)
    per acquisition channel, from ``customer_features`` as of D: both dates are fixed once they
    happened, so past weeks read the same from today's features."""
    absent = require(storage, as_of, "customer_features")
    if absent:
        return absent
    features_df = storage.read("customer_features").where(F.col("as_of_date") == F.lit(as_of))
    if features_df.limit(1).count() == 0:    # one partition, pruned: cheap
        ensure_not_pruned(storage, "customer_features", as_of)
        raise LookupError(f"customer_features has no rows as of {as_of}; run `cvseg features --as-of {as_of}` "
                          "or pick an as-of date that has features (`cvseg show customer_features`)")
    channel = F.coalesce(F.col("acquisition_channel"), F.lit(UNKNOWN)).alias("channel")
    new_df = (features_df.withColumn("week", _week_label(F.col("first_order_date"), windows))
              .where(F.col("week").isNotNull()).groupBy("week", channel)
              .agg(F.count(F.lit(1)).alias("new_customers")))
    second = F.date_add(F.col("first_order_date"), F.col("days_to_second_purchase"))
    f2_df = (features_df.where(F.col("days_to_second_purchase") <= F2_WINDOW_DAYS)
             .withColumn("week", _week_label(second, windows))
             .where(F.col("week").isNotNull()).groupBy("week", channel)
             .agg(F.count(F.lit(1)).alias("f2_conversions")))
    joined = new_df.join(f2_df, on=["week", "channel"], how="full").fillna(0)
    return to_pandas(joined)
