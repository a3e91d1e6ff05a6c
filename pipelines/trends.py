"""TRENDS stage: weekly, monthly and yearly trend tables, updated incrementally or rebuilt.

Inputs: ``orders`` with ``order_date <= D`` (``order_date`` is already the business-timezone
day), ``customer_features`` at ``D`` (first order date, acquisition channel, days to the second
purchase day: one row per customer with an order on or before ``D``) and ``segments_current``
(customers not segmented yet count as ``(unsegmented)``). Amounts are in ``business.currency``.

Tables (one row per key; every count is of customers or orders, amounts are sums)
---------------------------------------------------------------------------------
``trend_weekly_segment`` - key (week_start, segment). Weeks start on Monday.
    week_end (Sunday), segment (the customer's *current* segment), customers (the segment's
    customers whose first order is on or before week_end: the segment's base that week),
    active_buyers (customers with at least one order in the week that was not fully cancelled),
    orders, cancelled_orders (fully cancelled), gross, cancelled (cancelled amount), net
    (gross - cancelled), is_partial_week (the as-of date falls inside the week). Dense: every
    week from a segment's first customer to the as-of week has a row, zeros included.
``trend_new_customers_weekly`` - key (week_start, acquisition_channel): new_customers (first
    order in the week; channel of the first order, ``(unknown)`` when it has none),
    is_partial_week. Weeks or channels without new customers have no row.
``trend_f2_conversion`` - key cohort_month (yyyy-MM of the first order): customers,
    converted_90d / converted_180d (second purchase day within 90 / 180 days of the first, as
    ``customer_features.days_to_second_purchase``: same-day orders are one purchase, cancelled
    orders count as purchases, the BTYD convention), f2_rate_90d / f2_rate_180d (converted /
    customers), is_complete_90d / is_complete_180d (the cohort's last day + 90 / 180 days is on
    or before the as-of date; rates of incomplete cohorts are still rising).
``trend_cohort_retention`` - key (activity_month, cohort_month): months_since_first_order
    (0 = the acquisition month), cohort_customers, active_customers (orders not fully
    cancelled in activity_month), orders, net, retention_rate (active / cohort customers).
    Only (cohort, month) pairs with orders have a row.
``trend_yearly`` - key year, the last ``trends.years`` calendar years up to the as-of year:
    new_customers (first order in the year), existing_customers (first order in an earlier year
    and an order not fully cancelled in this one), new_customer_net / existing_customer_net /
    net (net of the year's orders by those groups), orders, is_partial_year, through_date (the
    last day counted: 31 Dec, or the as-of date in the current year).
``trend_yearly_category`` - key (year, category): the same by product category (``(unknown)``
    for orders without one); new_customers / existing_customers count the category's buyers
    (an order not fully cancelled in the category that year) acquired in / before the year.
``trend_runs`` - one row per run that wrote: as-of date, mode, the ingest runs and segment
    generation / ``segments_current`` version it saw, and the first year recomputed per table.

Incremental updates (only affected periods are replaced)
--------------------------------------------------------
Every trend table is partitioned by calendar year (``year`` of the week's Monday, ``cohort_year``,
``activity_year``, ``year``): a few small files per table instead of one per week. Rows of a
period depend on orders in that period and on customer attributes (first order date, channel,
segment). A run at ``D`` after a run at ``L`` recomputes, per table, the years from

* ``base`` = the earliest of: ``L`` (periods that were partial at ``L``, and orders dated after
  ``L`` that were already ingested), the earliest order date among orders from ingest runs the
  last trend run had not seen (``orders.ingest_run_id``: new and re-ingested orders), and ``D -
  trends.recompute_weeks`` weeks (a margin for corrections that move an order's date backwards,
  which the ingest run id cannot see);
* weekly tables: the year of ``base``'s week; ``trend_weekly_segment`` also goes back to the first
  order of customers placed in a segment since ``L`` (they move out of ``(unsegmented)``), and is
  recomputed in full when a new segment generation was cut (every customer may have moved);
* ``trend_f2_conversion``: the year of ``base - 180 days`` (a new order can be the second
  purchase of a customer acquired up to 180 days earlier; cohorts incomplete at ``L`` move);
* ``trend_cohort_retention`` (by activity year) and the yearly tables: the year of ``base``;
  years that left the ``trends.years`` window are removed from the yearly tables.

A new order can only move a customer's first order to a date on or after ``base``, so every year
before these is unchanged; replaced years are replaced whole (a year left without rows is
emptied). In a nightly run that is the current year (two around New Year). Why ingest run ids rather than only "the last N weeks": late files and
backfills (a client re-sends last quarter) are common in mail order and a fixed window would
silently miss them; each run's first order date is recorded by ingest (``ingest_runs.first_order_date``),
so finding them reads that small table, not ``orders``.

Within the recomputed years, the *activity* columns (buyers, orders and amounts per week and
segment, per cohort and activity month, per year and category) are sums over customers of what
each customer's orders add to a cell. When ``orders`` has only gained rows since the last run
(``trend_runs.orders_version``; a regular night's ingest appends), they are not recomputed from
every order: the stored cells are updated from the *touched* customers alone, those with orders
appended since, orders dated after L (stored before L's run, not counted at L) or a first
placement in a segment since L. Their orders are read (a scan with their ids broadcast), what they
added at L is taken back (their orders then, with their first order date and segment then) and
what they add now is added; every other customer adds what it added at L. Counts are exact; sums
of amounts can differ from a rebuild in the last bits. Otherwise (orders rewritten, a new segment
generation, moved identities, more than :data:`CELL_UPDATE_MAX_CUSTOMERS` touched) the cells come
from every order of those years, joined with every customer's attributes.

``rebuild=True`` (also the first run, and a run for a date before the last one) recomputes
everything and overwrites every table; the result is the same as the incremental one (tested).
A re-run for the same date with nothing new writes nothing.

Cost: one small summary of the customers
(``customer_features`` at ``D`` with the segments, counted per first order date, segment and
channel: the customer-side tables and the segment base come from it), and one scan of the
orders in the recomputed years (pruned by ``order_month``) joined with the customers' first
order date and segment, cached once and aggregated per table: per customer first (inside the
join's customer partitions, no shuffle), then per period; nothing customer-sized on the driver.
Measured at 2M customers / 13.7M orders, 2 shared cores, a nightly incremental run (warm JVM):
~56 JVM CPU seconds, from ~71 (the per-customer summary replaced scans of a checkpoint of every
customer; two-step aggregates replaced distinct counts and ``date_format`` grouping per order).
The ingest-run aggregate over every order (~5 s) was replaced by ``ingest_runs.first_order_date``.
The orders join and its cache (~15-20 s) is left only where the cells are recomputed; a regular
night updates them instead (2M: trends 31.4 -> 24.1 s, bench/trends.py). With
several sources, ``trend_channel_sets`` is an aggregate of ``customer_features`` (first source,
source set, first six months' net value are feature columns): rewritten whole each run without
reading an order.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from core.config import UNSEGMENTED, TrendsConf
from core.dates import monday
from core.errors import UserError
from core.results import StageResult, omitted_when_none
from core.storage import Storage
from core.tables import (CUSTOMER_FEATURES, IDENTITY_MAP, INGEST_RUNS, ORDERS, SEGMENT_GENERATIONS, SEGMENTS_CURRENT,
                         TREND_CHANNEL_SETS, TREND_COHORT_RETENTION, TREND_F2_CONVERSION, TREND_NEW_CUSTOMERS_WEEKLY, TREND_RUNS, TREND_WEEKLY_SEGMENT,
                         TREND_YEARLY, TREND_YEARLY_CATEGORY, table_spec)
from pipelines.identity import IdLookup, identity_version
from pipelines.maintenance import dated_partition

log = logging.getLogger(__name__)

UNKNOWN = "(unknown)"
F2_WINDOWS = (90, 180)
F2_LOOKBACK_DAYS = max(F2_WINDOWS)


class TrendsError(UserError, ValueError):
    """Trends cannot be computed; the message says what to run or change."""


# --------------------------------------------------------------------------------------------
# Column functions
# --------------------------------------------------------------------------------------------
def week_start(day: Column) -> Column:
    """Monday of the day's week (dayofweek: Sunday = 1 ... Saturday = 7)."""
    return F.date_sub(day, (F.dayofweek(day) + F.lit(5)) % F.lit(7))


def month_label(day: Column) -> Column:
    return F.date_format(day, "yyyy-MM")


def share(part: Column, whole: Column) -> Column:
    return F.when(whole > 0, part.cast("double") / whole.cast("double")).otherwise(F.lit(0.0))


def is_active_order() -> Column:
    """An order that counts as buying: not fully cancelled."""
    return ~F.col("is_cancelled")


def is_f2_converted(window_days: int) -> Column:
    """F2 within the window: a second purchase day within ``window_days`` of the first
    (``customer_features.days_to_second_purchase``; null, never converted, for one purchase day)."""
    return F.col("days_to_second_purchase") <= F.lit(window_days)


def is_f2_complete(month_day: Column, window_days: int, as_of_date: dt.date) -> Column:
    """Every customer acquired in the month of ``month_day`` (a date) has had ``window_days`` by the as-of date."""
    return F.date_add(F.last_day(month_day), window_days) <= F.lit(as_of_date)


# --------------------------------------------------------------------------------------------
# Transforms (``from_year``: recompute only periods in that partition year or later; None: all)
# --------------------------------------------------------------------------------------------
def customer_attributes(features_df: DataFrame, segments_df: DataFrame | None,
                        placed_after: dt.date | None = None) -> DataFrame:
    """One row per customer as of D: first order date, acquisition channel, days to the second
    purchase, current segment (``(unsegmented)`` when none) and ``newly_placed`` (placed in a
    segment after ``placed_after``)."""
    customers_df = features_df.select(
        "customer_id", "first_order_date",
        F.coalesce(F.col("acquisition_channel"), F.lit(UNKNOWN)).alias("acquisition_channel"),
        "days_to_second_purchase")
    if segments_df is None:
        return customers_df.select("*", F.lit(UNSEGMENTED).alias("segment"), F.lit(False).alias("newly_placed"))
    placed = (F.lit(False) if placed_after is None
              else F.coalesce(F.col("assigned_as_of") > F.lit(placed_after), F.lit(False)))
    return (customers_df.join(segments_df.select("customer_id", "segment", "assigned_as_of"), on="customer_id",
                              how="left")
            .select(*customers_df.columns, F.coalesce(F.col("segment"), F.lit(UNSEGMENTED)).alias("segment"),
                    placed.alias("newly_placed")))


def customer_summary(customers_df: DataFrame) -> DataFrame:
    """Customers counted per (first_order_date, segment, acquisition_channel, newly_placed): all
    the customer-side tables need, a few ten thousand rows instead of one per customer."""
    return (customers_df.groupBy("first_order_date", "segment", "acquisition_channel", "newly_placed")
            .agg(F.count(F.lit(1)).alias("customers"),
                 *[F.count_if(is_f2_converted(w)).alias(f"converted_{w}d") for w in F2_WINDOWS]))


def orders_with_customers(orders_df: DataFrame, customers_df: DataFrame, partitions: int) -> DataFrame:
    """Orders with their customer's first order date and segment (every customer with an order
    on or before D has a features row, so the inner join drops nothing), hash-partitioned by
    customer: per-customer aggregates of it need no further shuffle."""
    orders_df = orders_df.select("customer_id", "order_date", "is_cancelled", "gross_amount", "cancelled_amount",
                                 "net_amount", F.coalesce(F.col("category"), F.lit(UNKNOWN)).alias("category"))
    customers_df = customers_df.select("customer_id", "first_order_date", "segment")
    return (orders_df.repartition(partitions, "customer_id")
            .join(customers_df.repartition(partitions, "customer_id"), on="customer_id", how="inner"))


def _from(df: DataFrame, year: Column, from_year: int | None) -> DataFrame:
    return df if from_year is None else df.where(year >= F.lit(from_year))


def _per_customer(orders_df: DataFrame, keys: list[Column], sums: dict[str, Column]) -> DataFrame:
    """Orders summed per (customer, keys), with ``is_active`` (an order not fully cancelled): a
    count of distinct active customers per keys is then a count of active rows. Grouping by
    the customer first stays inside the customer partitions of ``orders_with_customers``."""
    return (orders_df.groupBy("customer_id", *keys)
            .agg(F.bool_or(is_active_order()).alias("is_active"), F.count(F.lit(1)).alias("orders"),
                 *[agg.alias(name) for name, agg in sums.items()]))


# --------------------------------------------------------------------------------------------
# Activity cells: what the orders add to each (period, group) of a table. Per customer first
# (``*_per_customer``), then per cell (``_cells``) as signed sums: a customer's rows with
# ``_sign`` -1 take back what they added before (the incremental update, ``_updated_cells``).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellSpec:
    """A table's activity cells. Column expressions are built when used (functions of nothing): a
    Column needs a Spark session, and this module is imported before one exists."""
    keys: tuple[str, ...]
    counts: tuple[tuple[str, Callable[[], Column]], ...]   # (cell column, condition on a customer's row): counted
    sums: tuple[tuple[str, Callable[[], Column]], ...]     # (cell column, value of a customer's row): added up

    @property
    def columns(self) -> list[str]:
        return [name for name, _ in self.counts] + [name for name, _ in self.sums]


def _column(name: str) -> Callable[[], Column]:
    return lambda: F.col(name)


def _new_only(value: str, new: bool) -> Callable[[], Column]:
    return lambda: F.when(F.col("is_new") if new else ~F.col("is_new"), F.col(value)).otherwise(F.lit(0.0))


WEEKLY_CELLS = CellSpec(("week_start", "segment"), (("active_buyers", _column("is_active")),),
                        tuple((c, _column(c)) for c in ("orders", "cancelled_orders", "gross", "cancelled", "net")))
COHORT_CELLS = CellSpec(("activity_first", "cohort_first"), (("active_customers", _column("is_active")),),
                        (("orders", _column("orders")), ("net", _column("net"))))
YEAR_COUNTS = (("new_buyers", lambda: F.col("is_new") & F.col("is_active")),
               ("existing_customers", lambda: ~F.col("is_new") & F.col("is_active")))
YEAR_SUMS = (("new_customer_net", _new_only("net", True)), ("existing_customer_net", _new_only("net", False)),
             ("net", _column("net")), ("orders", _column("orders")))
YEARLY_CELLS = CellSpec(("year",), YEAR_COUNTS, YEAR_SUMS)
YEARLY_CATEGORY_CELLS = CellSpec(("year", "category"), YEAR_COUNTS, YEAR_SUMS)
#: summed cell columns that count orders (longs); the other sums are amounts (doubles)
ORDER_COUNTS = ("orders", "cancelled_orders")


def _sum_type(name: str) -> str:
    return "long" if name in ORDER_COUNTS else "double"


def weekly_per_customer(orders_df: DataFrame, from_year: int | None) -> DataFrame:
    orders_df = _from(orders_df, F.year(week_start(F.col("order_date"))), from_year)
    return _per_customer(orders_df, [week_start(F.col("order_date")).alias("week_start"), F.col("segment")],
                         {"cancelled_orders": F.count_if("is_cancelled"), "gross": F.sum("gross_amount"),
                          "cancelled": F.sum("cancelled_amount"), "net": F.sum("net_amount")})


def cohort_per_customer(orders_df: DataFrame, from_year: int | None) -> DataFrame:
    # months as first days (cheap to group by), labelled after aggregating
    return _per_customer(_from(orders_df, F.year("order_date"), from_year),
                         [F.trunc("order_date", "month").alias("activity_first"),
                          F.trunc("first_order_date", "month").alias("cohort_first")],
                         {"net": F.sum("net_amount")})


def year_per_customer(orders_df: DataFrame, from_year: int | None, keys: Sequence[str] = ()) -> DataFrame:
    year = F.year("order_date")
    return _per_customer(_from(orders_df, year, from_year),
                         [year.alias("year"), (F.year("first_order_date") == year).alias("is_new"),
                          *[F.col(k) for k in keys]], {"net": F.sum("net_amount")})


def _cells(per_customer_df: DataFrame, spec: CellSpec) -> DataFrame:
    """Per cell of ``spec``: customers counted (``_sign`` per row: 1, or -1 for rows taken back)
    and values added up (times the sign). Without ``_sign`` every row counts once."""
    sign = F.col("_sign") if "_sign" in per_customer_df.columns else F.lit(1)
    return per_customer_df.groupBy(*spec.keys).agg(
        *[F.sum(F.when(condition(), sign).otherwise(F.lit(0))).cast("long").alias(name)
          for name, condition in spec.counts],
        *[F.sum(value() * sign).cast(_sum_type(name)).alias(name) for name, value in spec.sums])


def weekly_segment(cells_df: DataFrame, summary_df: DataFrame, as_of_date: dt.date,
                   from_year: int | None) -> DataFrame:
    """``trend_weekly_segment`` rows: a dense grid of weeks per segment up to the as-of week
    (``cells_df``: :data:`WEEKLY_CELLS` of the weeks from ``from_year``)."""
    # segment base: new customers per (first week, segment) -> running total over the week grid
    firsts_df = (summary_df.groupBy(week_start(F.col("first_order_date")).alias("week_start"), "segment")
                 .agg(F.sum("customers").alias("new_in_week")))
    grid_df = (firsts_df.groupBy("segment").agg(F.min("week_start").alias("first_week"))
               .select("segment", F.explode(F.sequence(F.col("first_week"), F.lit(monday(as_of_date)),
                                                       F.expr("INTERVAL 7 DAYS"))).alias("week_start")))
    running = Window.partitionBy("segment").orderBy("week_start").rowsBetween(Window.unboundedPreceding,
                                                                             Window.currentRow)
    base_df = (grid_df.join(firsts_df, on=["segment", "week_start"], how="left")
               .withColumn("customers", F.sum(F.coalesce(F.col("new_in_week"), F.lit(0))).over(running))
               .drop("new_in_week"))
    base_df = _from(base_df, F.year("week_start"), from_year)
    zero_long, zero = F.lit(0).cast("long"), F.lit(0.0)
    return (base_df.join(cells_df, on=["week_start", "segment"], how="left")
            .select(F.year("week_start").alias("year"), "week_start", F.date_add("week_start", 6).alias("week_end"),
                    "segment", "customers",
                    *[F.coalesce(F.col(c), zero_long).alias(c) for c in ("active_buyers", "orders", "cancelled_orders")],
                    *[F.coalesce(F.col(c), zero).alias(c) for c in ("gross", "cancelled", "net")],
                    (F.date_add("week_start", 6) > F.lit(as_of_date)).alias("is_partial_week")))


def new_customers_weekly(summary_df: DataFrame, as_of_date: dt.date, from_year: int | None) -> DataFrame:
    week = week_start(F.col("first_order_date"))
    return (_from(summary_df, F.year(week), from_year)
            .groupBy(week.alias("week_start"), "acquisition_channel")
            .agg(F.sum("customers").alias("new_customers"))
            .select(F.year("week_start").alias("year"), "week_start", "acquisition_channel", "new_customers",
                    (F.date_add("week_start", 6) > F.lit(as_of_date)).alias("is_partial_week")))


def f2_conversion(summary_df: DataFrame, as_of_date: dt.date, from_year: int | None) -> DataFrame:
    return (_from(summary_df, F.year("first_order_date"), from_year)
            .groupBy(F.year("first_order_date").alias("cohort_year"),
                     month_label(F.col("first_order_date")).alias("cohort_month"))
            .agg(F.sum("customers").alias("customers"),
                 *[F.sum(f"converted_{w}d").alias(f"converted_{w}d") for w in F2_WINDOWS])
            .select("cohort_year", "cohort_month", "customers", *[f"converted_{w}d" for w in F2_WINDOWS],
                    *[share(F.col(f"converted_{w}d"), F.col("customers")).alias(f"f2_rate_{w}d") for w in F2_WINDOWS],
                    *[is_f2_complete(F.to_date(F.concat(F.col("cohort_month"), F.lit("-01"))), w, as_of_date)
                      .alias(f"is_complete_{w}d")
                      for w in F2_WINDOWS]))


def channel_sets(features_df: DataFrame, as_of_date: dt.date) -> DataFrame:
    """TREND_CHANNEL_SETS: customers by acquisition week and year, the source of their first order
    across all sources and the set of sources they bought from by D (``ec``, ``store``,
    ``ec+store``): F2 within 90 days (any source), net revenue in the six months from the first
    order, and how many bought later from another source than the first (store-first customers
    who started buying online). All of it is in ``customer_features`` at D (``first_source``,
    ``source_set``, ``net_first_6m``, on the unified customer id): an aggregate of the customers,
    no order read."""
    per_customer_df = features_df.select("customer_id", "first_order_date", "days_to_second_purchase",
                                         "first_source", "source_set", F.col("net_first_6m").alias("net_6m"))
    periods_df = per_customer_df.select(
        "*", F.explode(F.array(
            F.struct(F.lit("week").alias("period"), week_start(F.col("first_order_date")).alias("period_start")),
            F.struct(F.lit("year").alias("period"), F.trunc("first_order_date", "year").alias("period_start")))
        ).alias("_p")).select("*", "_p.period", "_p.period_start").drop("_p")
    return (periods_df.groupBy("period", "period_start", "first_source", "source_set")
            .agg(F.count(F.lit(1)).alias("customers"),
                 F.count_if(is_f2_converted(90)).alias("converted_90d"),
                 F.sum("net_6m").alias("net_6m"),
                 F.count_if(F.col("source_set") != F.col("first_source")).alias("crossed_customers"),
                 F.max("first_order_date").alias("_last_first"))
            .select(F.year("period_start").alias("year"), "period", "period_start", "first_source", "source_set",
                    "customers", "converted_90d", share(F.col("converted_90d"), F.col("customers")).alias("f2_rate_90d"),
                    "net_6m", (F.col("net_6m") / F.col("customers")).alias("net_6m_per_customer"),
                    "crossed_customers",
                    (F.date_add("_last_first", 90) <= F.lit(as_of_date)).alias("is_complete_90d"),
                    (F.add_months("_last_first", 6) <= F.lit(as_of_date)).alias("is_complete_6m")))


def cohort_retention(cells_df: DataFrame, summary_df: DataFrame) -> DataFrame:
    """``trend_cohort_retention`` rows from :data:`COHORT_CELLS` (the pairs with orders)."""
    sizes_df = (summary_df.groupBy(F.trunc("first_order_date", "month").alias("cohort_first"))
                .agg(F.sum("customers").alias("cohort_customers")))
    # one row per cohort month: small enough to broadcast
    return (cells_df.where(F.col("orders") > 0).join(F.broadcast(sizes_df), on="cohort_first", how="inner")
            .select(F.year("activity_first").alias("activity_year"),
                    month_label(F.col("activity_first")).alias("activity_month"),
                    month_label(F.col("cohort_first")).alias("cohort_month"),
                    F.months_between("activity_first", "cohort_first").cast("int").alias("months_since_first_order"),
                    "cohort_customers", "active_customers", "orders", "net",
                    share(F.col("active_customers"), F.col("cohort_customers")).alias("retention_rate")))


def yearly(cells_df: DataFrame, summary_df: DataFrame, as_of_date: dt.date, from_year: int) -> DataFrame:
    """``trend_yearly`` rows from :data:`YEARLY_CELLS` and the customers' first order years."""
    new_df = (_from(summary_df, F.year("first_order_date"), from_year)
              .groupBy(F.year("first_order_date").alias("year")).agg(F.sum("customers").alias("new_customers")))
    zero_long, zero = F.lit(0).cast("long"), F.lit(0.0)
    year_end = F.make_date(F.col("year"), F.lit(12), F.lit(31))
    return (new_df.join(cells_df.where(F.col("orders") > 0).drop("new_buyers"), on="year", how="full")
            .select("year", F.coalesce("new_customers", zero_long).alias("new_customers"),
                    F.coalesce("existing_customers", zero_long).alias("existing_customers"),
                    *[F.coalesce(c, zero).alias(c) for c in ("new_customer_net", "existing_customer_net", "net")],
                    F.coalesce("orders", zero_long).alias("orders"),
                    (year_end > F.lit(as_of_date)).alias("is_partial_year"),
                    F.least(year_end, F.lit(as_of_date)).alias("through_date")))


def yearly_category(cells_df: DataFrame, as_of_date: dt.date) -> DataFrame:
    """``trend_yearly_category`` rows from :data:`YEARLY_CATEGORY_CELLS` (the categories with orders)."""
    return (cells_df.where(F.col("orders") > 0).withColumnRenamed("new_buyers", "new_customers")
            .withColumn("is_partial_year", F.make_date(F.col("year"), F.lit(12), F.lit(31)) > F.lit(as_of_date)))


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrendsResult(StageResult):
    """What :func:`run_trends` replaced: per table the first year recomputed ("all": the whole table)
    and the partitions (years) written."""
    as_of_date: dt.date
    mode: str                              # rebuild | incremental | unchanged
    recomputed_from: dict[str, Any]
    partitions: dict[str, Any]
    #: incremental runs: the customers whose orders updated the stored activity cells (None: the
    #: cells of the recomputed years came from every order of those years)
    cells_updated_from: int | None = omitted_when_none()

    def summary_line(self) -> str:
        if self.mode == "unchanged":
            return "unchanged: no new orders, segments or identities since the last run"
        tables = ", ".join(f"{name} from {start}" for name, start in self.recomputed_from.items())
        cells = ("" if self.cells_updated_from is None
                 else f" (activity cells updated from {self.cells_updated_from:,} customers' orders)")
        return f"{self.mode}{cells}: {tables}"


def _last_run(storage: Storage) -> dict[str, Any] | None:
    if not storage.exists(TREND_RUNS):
        return None
    rows = storage.read(TREND_RUNS).orderBy(F.col("run_seq").desc()).limit(1).collect()
    return rows[0].asDict(recursive=True) if rows else None


def _segments_state(storage: Storage) -> tuple[DataFrame | None, int | None, int | None]:
    """segments_current (or None), its Delta version and the current generation id."""
    if not storage.exists(SEGMENTS_CURRENT):
        return None, None, None
    generation = None
    if storage.exists(SEGMENT_GENERATIONS):
        row = storage.read(SEGMENT_GENERATIONS).agg(F.max("generation_id")).first()
        generation = None if row[0] is None else int(row[0])
    return storage.read(SEGMENTS_CURRENT), storage.version(SEGMENTS_CURRENT), generation


def run_trends(storage: Storage, as_of_date: dt.date, conf: TrendsConf, rebuild: bool = False,
               cell_update: bool = True) -> TrendsResult:
    """Update the trend tables for ``as_of_date`` (module docstring); ``rebuild`` recomputes all;
    ``cell_update=False`` recomputes the activity cells of the recomputed years from every order even
    where the touched customers' update applies (the two give the same tables: bench/trends.py)."""
    features_df = _features_at(storage, as_of_date)
    identity_at = identity_version(storage)
    lookup = IdLookup.of(storage.read(IDENTITY_MAP, version=identity_at), materialise=True) \
        if identity_at is not None else None
    orders_version = storage.version(ORDERS)
    stored_df = storage.read(ORDERS, version=orders_version)
    orders_df = (lookup.apply(stored_df) if lookup else stored_df).where(F.col("order_date") <= F.lit(as_of_date))
    segments_df, segments_version, generation_id = _segments_state(storage)
    last = None if rebuild else _last_run(storage)
    full = last is None or as_of_date < last["as_of_date"] or _identity_moved(storage, last, identity_at)
    window_first_year = as_of_date.year - conf.years + 1
    seen = set() if full else set(last["ingest_run_ids"])
    ingest_runs = _ingest_run_first_dates(storage, orders_df, seen, need_dates=not full)
    # first order days of ingest runs the last run had not seen (later days start after L anyway)
    unseen = [day for run_id, day in ingest_runs.items()
              if run_id not in seen and day is not None and day <= as_of_date]
    if (not full and as_of_date == last["as_of_date"] and not unseen and segments_version == last["segments_version"]
            and generation_id == last["generation_id"] and identity_at == last.get("identity_version")):
        return TrendsResult(as_of_date, "unchanged", {}, {})
    summary_df = _summary(features_df, segments_df, None if full else last["as_of_date"])
    if full:
        starts: dict[str, int | None] = {name: None for name in _TABLES}   # table -> first year recomputed
        starts[TREND_YEARLY.name] = starts[TREND_YEARLY_CATEGORY.name] = window_first_year
    else:
        starts = _incremental_starts(last, as_of_date, conf, unseen, summary_df, segments_df is not None,
                                     segments_version, generation_id, window_first_year)
    touched = None
    if not full and cell_update:
        touched = _touched_orders(storage, last, orders_df, features_df, segments_df, starts, as_of_date, lookup)
    try:
        partitions = _write_tables(storage, orders_df, features_df, segments_df, summary_df, starts, full,
                                   as_of_date, window_first_year, identity_at, touched)
    finally:
        summary_df.unpersist()
        if touched is not None:
            touched.unpersist()
    recomputed_from = {name: ("all" if full or start is None else start) for name, start in starts.items()}
    _record_run(storage, last, as_of_date, "rebuild" if full else "incremental", generation_id, segments_version,
                sorted(ingest_runs), starts, identity_at, orders_version)
    return TrendsResult(as_of_date, "rebuild" if full else "incremental", recomputed_from, partitions,
                        cells_updated_from=None if touched is None else touched.customers)


def _ingest_run_first_dates(storage: Storage, orders_df: DataFrame, seen: set[str],
                            need_dates: bool) -> dict[str, dt.date | None]:
    """Ingest runs that wrote orders -> the earliest order date they wrote (None where not needed or
    none on or before D). From ``ingest_runs`` (a row per run, the date recorded at ingest) rather
    than an aggregate over every order; only runs recorded before that column existed and not seen
    by the last run are looked up in ``orders`` (``orders_df``: up to D). A run whose orders are all
    after D is recorded as seen: they fall on or after this run's D, where the next run starts anyway.
    Without ``ingest_runs`` (orders written by other means) every run is looked up in ``orders``."""
    def first_dates(df: DataFrame) -> dict[str, dt.date]:
        return {r["ingest_run_id"]: r["first_date"] for r in
                df.groupBy("ingest_run_id").agg(F.min("order_date").alias("first_date")).collect()}

    if not storage.exists(INGEST_RUNS):
        return first_dates(orders_df)
    runs = {r["ingest_run_id"]: r["first_order_date"] for r in storage.read(INGEST_RUNS)
            .where(F.col("orders_written") > 0).select("ingest_run_id", "first_order_date").collect()}
    undated = [run_id for run_id, day in runs.items() if day is None and run_id not in seen]
    if need_dates and undated:
        runs.update(first_dates(orders_df.where(F.col("ingest_run_id").isin(undated))))
    return runs


def _features_at(storage: Storage, as_of_date: dt.date) -> DataFrame:
    """customer_features at D; fails with the command to run when orders or the partition are missing."""
    if not storage.exists(ORDERS):
        raise TrendsError("no orders table yet: run `cvseg ingest` first")
    return dated_partition(storage, CUSTOMER_FEATURES.name, as_of_date, TrendsError,
                           f"run `cvseg features --as-of {as_of_date}` first")[0]


def _incremental_starts(last: dict[str, Any], as_of_date: dt.date, conf: TrendsConf, unseen: list[dt.date],
                        summary_df: DataFrame, segmented: bool, segments_version: int | None,
                        generation_id: int | None, window_first_year: int) -> dict[str, int | None]:
    """Per table, the first partition year an incremental run recomputes (None: the whole table):
    back to the last run, ``trends.recompute_weeks`` before D, the first order date of any ingest run
    not seen before, and for the segment table the first order of any customer placed since."""
    base = min([last["as_of_date"], as_of_date - dt.timedelta(weeks=conf.recompute_weeks), *unseen])
    segment_base = base
    if segmented and generation_id == last["generation_id"] and segments_version != last["segments_version"]:
        # customers placed since the last run leave "(unsegmented)" from their first order on
        # (placements on L itself came before the trend run of L: segments run first each night)
        placed = summary_df.where(F.col("newly_placed")).agg(F.min("first_order_date")).first()[0]
        segment_base = min(base, placed) if placed is not None else base
    yearly_from = max(base.year, window_first_year)
    return {
        # a new generation may move every customer: the whole table
        TREND_WEEKLY_SEGMENT.name: (monday(segment_base).year if generation_id == last["generation_id"] else None),
        TREND_NEW_CUSTOMERS_WEEKLY.name: monday(base).year,
        TREND_F2_CONVERSION.name: (base - dt.timedelta(days=F2_LOOKBACK_DAYS)).year,
        TREND_COHORT_RETENTION.name: base.year,
        TREND_YEARLY.name: yearly_from,
        TREND_YEARLY_CATEGORY.name: yearly_from,
    }


#: per activity table: its cells and the per-customer rows they add up
_ACTIVITY = {
    TREND_WEEKLY_SEGMENT.name: (WEEKLY_CELLS, weekly_per_customer),
    TREND_COHORT_RETENTION.name: (COHORT_CELLS, cohort_per_customer),
    TREND_YEARLY.name: (YEARLY_CELLS, year_per_customer),
    TREND_YEARLY_CATEGORY.name: (YEARLY_CATEGORY_CELLS, lambda df, start: year_per_customer(df, start, ["category"])),
}


def _write_tables(storage: Storage, orders_df: DataFrame, features_df: DataFrame, segments_df: DataFrame | None,
                  summary_df: DataFrame, starts: dict[str, int | None], full: bool, as_of_date: dt.date,
                  window_first_year: int, identity_at: int | None,
                  touched: "TouchedOrders | None" = None) -> dict[str, Any]:
    """Compute and write each trend table from its start year (``starts`` gains the channel-set table
    when identities are resolved); returns table -> partition years replaced, or "all". With
    ``touched`` the activity cells of the recomputed years are the stored ones updated by what the
    touched customers' orders add and take back; otherwise they come from every order of those years."""
    if identity_at is not None and features_df.where(F.col("first_source").isNull()).limit(1).count():
        raise TrendsError(f"customer_features at {as_of_date} was written before it had the source columns "
                          f"the channel-set table reads: run `cvseg features --as-of {as_of_date}` again")
    enriched_df = None
    if touched is None:
        # the orders of the recomputed years with their customers' attributes, materialised once
        range_start = _range_start(starts)
        range_df, buyers_df = orders_df, features_df
        if range_start is not None:
            range_df = _orders_from(orders_df, range_start)
            # only customers with an order in the range join one: the join's customer side shrinks
            buyers_df = features_df.where(F.col("last_order_date") >= F.lit(range_start))
        partitions_n = int(storage.spark.conf.get("spark.sql.shuffle.partitions"))
        enriched_df = orders_with_customers(range_df, customer_attributes(buyers_df, segments_df), partitions_n)
        # cache, not a checkpoint: columnar (each table reads only its columns) and it keeps the
        # customer partitioning the per-customer aggregates rely on
        enriched_df = enriched_df.cache()
    try:
        cells = {}
        for name, (spec, per_customer) in _ACTIVITY.items():
            if touched is None:
                cells[name] = _cells(per_customer(enriched_df, starts[name]), spec)
            else:
                cells[name] = _updated_cells(storage, name, spec, per_customer, touched, starts[name])
        results = {
            TREND_WEEKLY_SEGMENT.name: weekly_segment(cells[TREND_WEEKLY_SEGMENT.name], summary_df, as_of_date,
                                                      starts[TREND_WEEKLY_SEGMENT.name]),
            TREND_NEW_CUSTOMERS_WEEKLY.name: new_customers_weekly(summary_df, as_of_date,
                                                                  starts[TREND_NEW_CUSTOMERS_WEEKLY.name]),
            TREND_F2_CONVERSION.name: f2_conversion(summary_df, as_of_date, starts[TREND_F2_CONVERSION.name]),
            TREND_COHORT_RETENTION.name: cohort_retention(cells[TREND_COHORT_RETENTION.name], summary_df),
            TREND_YEARLY.name: yearly(cells[TREND_YEARLY.name], summary_df, as_of_date, starts[TREND_YEARLY.name]),
            TREND_YEARLY_CATEGORY.name: yearly_category(cells[TREND_YEARLY_CATEGORY.name], as_of_date),
        }
        if identity_at is not None:
            # a customer's source set changes with any later order: recomputed whole each run (from
            # the features, a few seconds at 2M)
            results[TREND_CHANNEL_SETS.name] = channel_sets(features_df, as_of_date)
            starts[TREND_CHANNEL_SETS.name] = None
        partitions: dict[str, Any] = {}
        for name, df in results.items():
            if full or starts[name] is None:
                storage.overwrite(name, df)
                partitions[name] = "all"
                continue
            # every partition year of the recomputed range (emptied when it gets no rows) and, for
            # the yearly tables, any year that left the window (in the same commit, nothing read)
            column = table_spec(name).partition_by[0]
            years = list(range(starts[name], as_of_date.year + 1))
            windowed = name in (TREND_YEARLY.name, TREND_YEARLY_CATEGORY.name)
            storage.replace_partitions(name, df, partitions={column: years},
                                       below={column: window_first_year} if windowed else None)
            partitions[name] = years
    finally:
        if enriched_df is not None:
            enriched_df.unpersist()
        for df in (cells.values() if touched is not None else ()):
            df.unpersist()
    return partitions


def _range_start(starts: dict[str, int | None]) -> dt.date | None:
    """The first day the activity tables recompute (None: all of them)."""
    order_years = [starts[name] for name in _ACTIVITY]
    return dt.date(min(order_years), 1, 1) if all(y is not None for y in order_years) else None


def _orders_from(orders_df: DataFrame, day: dt.date) -> DataFrame:
    # order_month (yyyy-MM of order_date) prunes the older files
    return orders_df.where((F.col("order_date") >= F.lit(day)) & (F.col("order_month") >= F.lit(f"{day:%Y-%m}")))


# --------------------------------------------------------------------------------------------
# Incremental cells: only the customers whose orders or attributes moved since the last run
# --------------------------------------------------------------------------------------------
#: above this many touched customers, the activity cells are recomputed from every order of the years
CELL_UPDATE_MAX_CUSTOMERS = 1_000_000


@dataclass(frozen=True)
class TouchedOrders:
    """The orders (from the first recomputed day) of the customers whose contribution to the
    activity cells can differ from the last run's: ``now_df`` as they count at D, ``then_df`` as they
    counted at the last run (its orders, with the customer's first order date and segment then)."""
    now_df: DataFrame
    then_df: DataFrame
    customers: int

    def unpersist(self) -> None:
        self.now_df.unpersist()
        self.then_df.unpersist()


def _touched_orders(storage: Storage, last: dict[str, Any], orders_df: DataFrame, features_df: DataFrame,
                    segments_df: DataFrame | None, starts: dict[str, int | None], as_of_date: dt.date,
                    lookup: IdLookup | None) -> TouchedOrders | None:
    """The touched customers' orders now and then, when the last run recorded the orders version it
    read and ``orders`` has only gained rows since; None otherwise (or when too many customers are
    touched), and the cells are recomputed from every order.

    A customer is touched by an order appended since (new, late or backfilled), an order dated after
    the last run's date L (stored before L's run, not counted at L) or a first placement in a segment
    since L (out of ``(unsegmented)``). Every other customer adds to the cells what it added at L:
    the same orders up to D, the same first order date, the same segment (a new generation or moved
    identities recompute every year: not here). Then, for a touched customer: its orders at L are the
    stored ones dated up to L and not appended since; its first order date at L is today's unless
    today's is one of the new orders, then the earliest of the others (all in the recomputed range:
    new orders are dated on or after its start); its segment at L is ``(unsegmented)`` if it was
    placed since, else today's."""
    range_start = _range_start(starts)
    last_version = last.get("orders_version")
    if range_start is None or last_version is None:
        return None
    appended_df = storage.appended_since(ORDERS, int(last_version))
    if appended_df is None:
        return None
    previous = last["as_of_date"]
    if lookup is not None:
        appended_df = lookup.apply(appended_df)
    appended_df = (appended_df.where(F.col("order_date") <= F.lit(as_of_date))
                   .select("order_id", "customer_id", "order_date"))
    dated_df = (orders_df.where((F.col("order_month") >= F.lit(f"{previous:%Y-%m}"))
                                & (F.col("order_date") > F.lit(previous)))
                .select("order_id", "customer_id", "order_date"))
    # read three times below (the touched ids, the new order ids, each customer's earliest new order):
    # the appended files and the months after L are scanned once
    new_orders_df = appended_df.unionByName(dated_df).distinct().localCheckpoint(eager=True)
    customer_parts = [new_orders_df.select("customer_id")]
    if segments_df is not None:
        customer_parts.append(segments_df.where(F.col("assigned_as_of") > F.lit(previous)).select("customer_id"))
    customers_df = reduce(DataFrame.unionByName, customer_parts).distinct().localCheckpoint(eager=True)
    customers = customers_df.count()
    if customers > CELL_UPDATE_MAX_CUSTOMERS:
        customers_df.unpersist()
        new_orders_df.unpersist()
        return None
    touched = F.broadcast(customers_df)
    attributes_df = customer_attributes(features_df.join(touched, on="customer_id", how="left_semi"),
                                        None if segments_df is None else
                                        segments_df.join(touched, on="customer_id", how="left_semi"), previous)
    orders_df = (_orders_from(orders_df, range_start).join(touched, on="customer_id", how="left_semi")
                 .select("order_id", "customer_id", "order_date", "is_cancelled", "gross_amount", "cancelled_amount",
                         "net_amount", F.coalesce(F.col("category"), F.lit(UNKNOWN)).alias("category")))
    new_ids_df = F.broadcast(new_orders_df.select("order_id", F.col("order_date").alias("_new_date")))
    orders_df = (orders_df.join(new_ids_df, on="order_id", how="left")
                 .withColumn("_is_new", F.col("_new_date").isNotNull() | (F.col("order_date") > F.lit(previous)))
                 .drop("_new_date").localCheckpoint(eager=True))
    earliest_df = (orders_df.groupBy("customer_id")
                   .agg(F.min(F.when(~F.col("_is_new"), F.col("order_date"))).alias("_first_old")))
    new_min_df = new_orders_df.groupBy("customer_id").agg(F.min("order_date").alias("_first_new_any"))
    then_attributes_df = (attributes_df.join(earliest_df, on="customer_id", how="left")
                          .join(new_min_df, on="customer_id", how="left")
                          .select("customer_id",
                                  F.when(F.col("_first_new_any").isNull()
                                         | (F.col("first_order_date") < F.col("_first_new_any")),
                                         F.col("first_order_date")).otherwise(F.col("_first_old"))
                                  .alias("first_order_date"),
                                  F.when(F.col("newly_placed"), F.lit(UNSEGMENTED)).otherwise(F.col("segment"))
                                  .alias("segment")))
    now_df = orders_df.drop("_is_new").join(attributes_df.select("customer_id", "first_order_date", "segment"),
                                            on="customer_id", how="inner")
    then_df = (orders_df.where(~F.col("_is_new")).drop("_is_new")
               .join(then_attributes_df.where(F.col("first_order_date").isNotNull()), on="customer_id", how="inner"))
    touched_orders = TouchedOrders(now_df.localCheckpoint(eager=True), then_df.localCheckpoint(eager=True), customers)
    customers_df.unpersist()
    new_orders_df.unpersist()
    return touched_orders


def _stored_cells(storage: Storage, name: str, spec: CellSpec, start: int) -> DataFrame:
    """The activity cells the table holds from year ``start`` (its cell columns, as :func:`_cells`
    gives them)."""
    column = table_spec(name).partition_by[0]
    df = storage.read(name).where(F.col(column) >= F.lit(start))
    if name == TREND_COHORT_RETENTION.name:
        df = (df.withColumn("activity_first", F.to_date(F.concat(F.col("activity_month"), F.lit("-01"))))
              .withColumn("cohort_first", F.to_date(F.concat(F.col("cohort_month"), F.lit("-01")))))
    elif name == TREND_YEARLY.name:
        df = df.withColumn("new_buyers", F.lit(0).cast("long"))      # not stored: new_customers is everyone's
    elif name == TREND_YEARLY_CATEGORY.name:
        df = df.withColumnRenamed("new_customers", "new_buyers")
    return df.select(*spec.keys, *[F.col(c).cast("long") for c, _ in spec.counts],
                     *[F.col(c).cast(_sum_type(c)) for c, _ in spec.sums])


def _updated_cells(storage: Storage, name: str, spec: CellSpec, per_customer, touched: TouchedOrders,
                   start: int) -> DataFrame:
    """The table's cells from year ``start``: the stored ones, minus what the touched customers added
    at the last run, plus what they add now (materialised: the table is then rewritten). A cell left
    without orders has its sums set to exactly 0 (not the rounding left by the subtraction)."""
    changes_df = (per_customer(touched.now_df, start).withColumn("_sign", F.lit(1))
                  .unionByName(per_customer(touched.then_df, start).withColumn("_sign", F.lit(-1))))
    combined_df = _stored_cells(storage, name, spec, start).unionByName(_cells(changes_df, spec))
    summed_df = combined_df.groupBy(*spec.keys).agg(*[F.sum(c).alias(c) for c in spec.columns])
    return summed_df.select(*spec.keys, *[F.col(c) for c, _ in spec.counts],
                            *[F.col(c) if _sum_type(c) == "long" else
                              F.when(F.col("orders") == 0, F.lit(0.0)).otherwise(F.col(c)).alias(c)
                              for c, _ in spec.sums]).localCheckpoint(eager=True)


def _summary(features_df: DataFrame, segments_df: DataFrame | None, placed_after: dt.date | None) -> DataFrame:
    """``customer_summary``, materialised: small, read by five tables."""
    return customer_summary(customer_attributes(features_df, segments_df, placed_after)).localCheckpoint(eager=True)


_TABLES = (TREND_WEEKLY_SEGMENT.name, TREND_NEW_CUSTOMERS_WEEKLY.name, TREND_F2_CONVERSION.name,
           TREND_COHORT_RETENTION.name, TREND_YEARLY.name, TREND_YEARLY_CATEGORY.name)


def _identity_moved(storage: Storage, last: dict[str, Any], identity_at: int | None) -> bool:
    """True when identity_map was rewritten (source ids merged into other customers) since the last
    run: first orders, cohorts and segments' customers may all have moved."""
    seen = last.get("identity_version")
    if identity_at is None or seen == identity_at:
        return False
    return seen is None or storage.appended_since(IDENTITY_MAP, int(seen)) is None


def _record_run(storage: Storage, last: dict[str, Any] | None, as_of_date: dt.date, mode: str,
                generation_id: int | None, segments_version: int | None, ingest_run_ids: list[str],
                starts: dict[str, int | None], identity_at: int | None = None,
                orders_version: int | None = None) -> None:
    """Append the run's state; written last, so a run that dies before it is redone in full."""
    previous_seq = last["run_seq"] if last is not None else None
    if previous_seq is None and storage.exists(TREND_RUNS):   # a rebuild after earlier runs
        previous_seq = storage.read(TREND_RUNS).agg(F.max("run_seq")).first()[0]
    row = (int(previous_seq or 0) + 1, as_of_date, mode, generation_id, segments_version, ingest_run_ids,
           dict(starts),   # None: the whole table was recomputed
           dt.datetime.now(dt.timezone.utc), identity_at, orders_version)
    storage.append(TREND_RUNS, storage.spark.createDataFrame([row], TREND_RUNS.schema))
