"""FEATURES stage: one row per customer as of a date (table ``customer_features``).

Input is the ``orders`` table (:data:`core.tables.ORDERS`): one row per order, amounts before
cancellation. Output is exactly :data:`core.tables.CUSTOMER_FEATURES`.

Definitions (the contract the tests check against an independent pandas computation):

* **Population and leakage.** A customer is in the table for as-of date ``D`` when they have at
  least one order with ``order_date <= D`` (``order_date`` is the business-local calendar day).
  Orders after ``D`` are filtered out before anything else is computed.
* **BTYD statistics on gross orders.** Every order counts, cancelled ones too: the product
  predicts gross orders and value and then applies the predicted cancellation rate. Orders on
  the same day are one *purchase day* (the lifetimes convention).
  ``frequency = n_purchase_days - 1``; ``recency`` = last - first purchase day; ``T`` = ``D`` -
  first purchase day; both in ``time_unit`` (``days``, or ``weeks`` = days / 7 as a float).
  ``monetary_value`` = mean over the *repeat* purchase days (the first day excluded) of the
  day's total gross amount, 0 when ``frequency`` is 0.
  This equals ``lifetimes.utils.summary_data_from_transaction_data(freq="D",
  freq_multiplier=1 or 7, observation_period_end=D, monetary_value_col=gross)``.
* **Net basis** (``models.purchase_basis``): the same statistics on completed orders only (not
  cancelled in full), with the day's *net* amount: ``net_first_order_date``, ``net_frequency``,
  ``net_recency``, ``net_T``, ``net_monetary_value`` (all null for a customer who only cancelled).
  This equals the lifetimes summary of the completed orders with ``monetary_value_col=net``.
* **Orders and amounts.** ``n_orders`` counts every order, ``n_cancelled`` the fully cancelled
  ones (``is_cancelled``); ``gross_amount`` / ``cancelled_amount`` / ``net_amount`` are sums of
  the table's columns. ``avg_order_value`` = mean gross of orders not cancelled (null if none).
  ``cancel_rate_count`` = n_cancelled / n_orders; ``cancel_rate_amount`` = cancelled / gross
  (null when gross is 0).
* **Cadence.** Gaps in days between consecutive purchase days: ``gap_mean_days`` (null without
  a gap) and ``gap_std_days`` (sample standard deviation, ddof=1; null with fewer than 2 gaps).
* **Trailing windows.** ``orders_{m}m`` / ``net_{m}m``: orders and net amount with
  ``add_months(D, -m) < order_date <= D``; ``m`` must be the months the schema has (3, 6, 12).
* **Acquisition and preference.** ``acquisition_channel`` = channel of the first order (earliest
  ``order_ts``, ties by ``order_id``; null when that order has no channel).
  ``top_category`` = the category with most orders; ties: larger gross, then the smaller name;
  null categories are ignored (null when the customer has none). ``first_category`` = category
  of that first order (what brought the customer in; null when it has none).
* **Sources** (several order sources, one customer: ``pipelines/identity.py``). ``first_source`` =
  ``source_name`` of that first order; ``source_set`` = the distinct sources of the customer's
  orders, sorted and joined by ``+`` (``"ec+store"``); an order without a source name counts as
  ``"default"`` (a lone source). ``net_first_6m`` = net amount of the orders with
  ``order_date < add_months(first_order_date, 6)``: the value of the first six months, which the
  channel-set trend table aggregates without reading orders.
* **Repeat.** ``is_repeat`` = at least two purchase days; ``days_to_second_purchase`` = days
  from the first to the second purchase day (null if none).
* **RFM (the baseline the method argues against).** Quintile scores 1-5: ``rfm_r`` on days
  since the last order (5 = most recent), ``rfm_f`` on ``n_orders``, ``rfm_m`` on
  ``net_amount``; ``rfm_score`` = the three digits, e.g. ``"545"``. Cut points are the 20/40/60/
  80 % quantiles from :meth:`DataFrame.approxQuantile` with relative error
  :data:`RFM_RELATIVE_ERROR` (0.1 % of the customer count in rank; exact when a partition holds
  fewer than 10,000 customers, because Spark's quantile summary only starts compressing beyond
  that). A value's bucket is ``1 + (number of cut points strictly below it)``, so a value equal to
  a cut point falls in the lower bucket and tied values always share a score (with many
  one-order customers several cut points coincide and some scores stay empty; that is the
  honest answer, not a bug). Recency is scored reversed: ``rfm_r = 6 - bucket(days since last)``.

Incremental update (``features.incremental``, the default). When an earlier partition P exists
(``features_runs`` says which orders version it read) and ``orders`` has only gained rows since
(every commit a plain append: what a nightly ingest of new orders does), D is computed from P:
customers with added rows or with orders dated in (P, D] are computed from all of their orders;
everyone else keeps P's values except ``as_of_date``, ``T``, the trailing windows (P's minus the
orders that left them: a day per window on a regular night) and the RFM scores (cut points over all customers). The result
equals the full computation (tested; sums of doubles may differ in the last bits). Anything else -
orders rewritten (a re-export that changed orders), no earlier partition, more than 30 % of the
customers touched, the last full computation ``features.full_every_days`` or more days old - and
every customer is computed from all orders.

Cost (the stage must stay cheap: 2M customers / 13M orders on 2 cores): one shuffle by customer;
inside it, one radix pre-sort, two window passes (date order, category peers) whose sorts are
cheap on the pre-sorted rows, and one streaming aggregate. No Python UDFs, no join, nothing
customer-sized on the driver. The per-customer rows are materialised once (``localCheckpoint``)
so the RFM cut points and the write read the same rows without recomputing them. A single
``groupBy`` with collected arrays was measured too: slower (Spark's object hash aggregate falls
back to sorting after 128 keys, and the array lambdas are interpreted).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from core.config import FeaturesConf
from core.dates import add_months, to_date
from core.errors import UserError
from core.results import StageResult, omitted_when_none
from core.spark import sql_settings
from core.storage import Storage
from core.tables import CUSTOMER_FEATURES, FEATURES_RUNS, IDENTITY_MAP, ORDERS, TRAILING_MONTHS, conform
from pipelines.identity import IdLookup, identity_version, order_source

log = logging.getLogger(__name__)

TIME_UNITS: dict[str, float] = {"days": 1.0, "weeks": 7.0}
RFM_RELATIVE_ERROR = 0.001
RFM_PROBABILITIES = (0.2, 0.4, 0.6, 0.8)

# The ORDERS columns this stage reads (the rest of the table is not needed).
FEATURE_INPUT_COLUMNS = ("order_id", "customer_id", "order_ts", "order_date", "gross_amount",
                         "is_cancelled", "cancelled_amount", "net_amount", "channel", "category", "source_name")


# Customers are partitioned and sorted by a 64-bit hash of the id first, then the id itself: the
# hash gives the sorts a long prefix that differs between customers (ids often share leading
# characters, "C000123..."), and the id keeps two customers apart if their hashes collide.
CUSTOMER_KEY = ("customer_hash", "customer_id")


class FeaturesError(UserError, ValueError):
    """The orders or the parameters cannot produce features; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Small helpers (plain Python: dates and parameters)
# --------------------------------------------------------------------------------------------
def check_trailing_months(trailing_months: Iterable[int]) -> tuple[int, ...]:
    """The windows as the table declares them; the config checks this at load, the transforms again
    for callers that pass windows of their own."""
    months = tuple(sorted(set(int(m) for m in trailing_months)))
    expected = TRAILING_MONTHS
    if months != expected:
        raise FeaturesError(
            f"features.trailing_months is {list(months)} but the customer_features table has "
            f"columns for {list(expected)} (orders_<m>m, net_<m>m); set features.trailing_months "
            f"to {list(expected)} or add the columns to core/tables.py")
    return months


def check_time_unit(time_unit: str) -> str:
    if time_unit not in TIME_UNITS:
        raise FeaturesError(f"features.time_unit {time_unit!r}: must be one of {sorted(TIME_UNITS)}")
    return time_unit


def validate_orders(orders_df: DataFrame) -> DataFrame:
    """Fail early, naming every missing or mistyped column the features need."""
    # source_name is not checked: it came later, and orders without it hold one unnamed source
    want = {f.name: f.dataType.simpleString() for f in ORDERS.schema.fields if f.name in FEATURE_INPUT_COLUMNS}
    have = dict(orders_df.dtypes)
    problems = [f"{name} is missing" if name not in have else f"{name} is {have[name]}, expected {dtype}"
                for name, dtype in want.items() if have.get(name) != dtype]
    if problems:
        raise FeaturesError("orders cannot be used for features: " + "; ".join(problems)
                                 + " (read them from the `orders` table written by `cvseg ingest`)")
    return orders_df


# --------------------------------------------------------------------------------------------
# Column functions
# --------------------------------------------------------------------------------------------
def cancellation_rate(cancelled: Column | str, total: Column | str) -> Column:
    """cancelled / total as a double; null when total is 0 (ANSI mode would raise instead)."""
    cancelled = F.col(cancelled) if isinstance(cancelled, str) else cancelled
    total = F.col(total) if isinstance(total, str) else total
    return F.when(total != 0, cancelled.cast("double") / total.cast("double"))


def days_in_unit(days: Column, time_unit: str) -> Column:
    """A day count expressed in the BTYD time unit (weeks are days / 7, a float)."""
    return days.cast("double") / F.lit(TIME_UNITS[check_time_unit(time_unit)])


def quantile_bucket(value: Column, cut_points: Sequence[float]) -> Column:
    """1 + number of cut points strictly below ``value`` (ties with a cut point go low)."""
    bucket = F.lit(1)
    for cut in cut_points:
        bucket = bucket + F.when(value > F.lit(float(cut)), 1).otherwise(0)
    return bucket


def rfm_score(r: Column, f: Column, m: Column) -> Column:
    """"545"-style concatenation of the three 1-5 scores."""
    return F.concat(r.cast("string"), f.cast("string"), m.cast("string"))


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def orders_as_of(orders_df: DataFrame, as_of_date: dt.date) -> DataFrame:
    """Orders on or before the as-of date, only the columns features read (``source_name`` as
    :func:`pipelines.identity.order_source` gives it)."""
    source = order_source(orders_df)
    return (validate_orders(orders_df)
            .where(F.col("order_date") <= F.lit(as_of_date))
            .select(*[source.alias(c) if c == "source_name" else F.col(c) for c in FEATURE_INPUT_COLUMNS]))


def cluster_by_customer(orders_df: DataFrame) -> DataFrame:
    """Shuffle orders by customer (the stage's one shuffle) and pre-sort each partition.

    The purchase-sequence window needs rows sorted by several keys; Spark sorts several keys
    with a comparison sort that costs about 2-3 us per row on unordered input, but a single long
    key with a radix sort, and the comparison sort is cheap on input that is already nearly in
    order. So each partition is first radix-sorted on one long, the customer hash's high 44 bits
    joined with the order day's low 20 bits (customer, then date), and the window's own sort
    only fixes what that key cannot order (ties, hash collisions): measured on 1M customers,
    sort time falls from ~30 s to ~7 s of task time. That window must therefore come first,
    straight after this (:func:`customer_rows`). The pre-sort affects speed only, never results:
    the windows still sort on the exact keys.
    """
    day_bits = 20
    low_mask = (1 << day_bits) - 1
    presort_key = (F.col("customer_hash").bitwiseAND(F.lit(~low_mask))
                   .bitwiseOR(F.unix_date("order_date").cast("long").bitwiseAND(F.lit(low_mask))))
    return (orders_df
            .withColumn("customer_hash", F.xxhash64("customer_id"))
            .repartition(*CUSTOMER_KEY)
            .sortWithinPartitions(presort_key))


def with_category_totals(orders_df: DataFrame) -> DataFrame:
    """Each order gets its customer's order count and gross in the order's category. Its sort
    (customer, then category) is the stage's one costly sort: applied after
    :func:`with_purchase_sequence`, whose sort then finds the pre-sorted order."""
    # one window group per customer; the peers of a row (same category) form its frame
    w_category = (Window.partitionBy(*CUSTOMER_KEY).orderBy("category")
                  .rangeBetween(Window.currentRow, Window.currentRow))
    return (orders_df
            .withColumn("category_orders", F.count(F.lit(1)).over(w_category))
            .withColumn("category_gross", F.sum("gross_amount").over(w_category)))


def with_purchase_sequence(orders_df: DataFrame) -> DataFrame:
    """Per order, in the customer's order sequence (date, then ts, then id): whether it is the
    first order, the customer's first purchase day, whether it opens a new purchase day, and
    the gap in days since the previous purchase day (null unless it opens a repeat day)."""
    w_orders = Window.partitionBy(*CUSTOMER_KEY).orderBy("order_date", "order_ts", "order_id")
    w_previous = w_orders.rowsBetween(-1, -1)          # lag's own frame: the previous order
    w_so_far = w_orders.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    w_before = w_orders.rowsBetween(Window.unboundedPreceding, -1)
    previous_date = F.col("previous_order_date")
    completed_date = F.when(~F.col("is_cancelled"), F.col("order_date"))
    # Net basis on the same window (no second sort): sorted by date, the running max of completed
    # dates before a row is the previous completed order's day.
    previous_completed = F.col("previous_completed_date")
    return (orders_df
            .withColumn("previous_completed_date", F.max(completed_date).over(w_before))
            .withColumn("net_first_purchase_day", F.min(completed_date).over(w_so_far))
            .withColumn("is_new_completed_day", ~F.col("is_cancelled") & (
                previous_completed.isNull() | (F.col("order_date") > previous_completed)))
            .withColumn("previous_order_date", F.lag("order_date").over(w_previous))
            # sorted by date, so the running minimum is the first purchase day
            .withColumn("first_purchase_day", F.min("order_date").over(w_so_far))
            .withColumn("is_first_order", previous_date.isNull())
            .withColumn("is_new_purchase_day", previous_date.isNull() | (F.col("order_date") > previous_date))
            .withColumn("purchase_gap_days",
                        F.when(F.col("order_date") > previous_date, F.datediff("order_date", previous_date))))


def aggregate_customers(sequenced_df: DataFrame, as_of_date: dt.date,
                        trailing_months: Sequence[int]) -> DataFrame:
    """One row per customer from orders carrying :func:`with_purchase_sequence` and
    :func:`with_category_totals` columns. The input is already clustered and sorted by customer,
    so this aggregate streams without another shuffle or sort. Aggregates are kept to cheap
    sums and counts (they run once per order); ratios are taken per customer afterwards."""
    is_repeat_day_order = F.col("order_date") > F.col("first_purchase_day")
    is_net_repeat_day_order = ~F.col("is_cancelled") & (F.col("order_date") > F.col("net_first_purchase_day"))
    gap = F.col("purchase_gap_days")
    trailing = []
    for months in trailing_months:
        in_window = F.col("order_date") > F.lit(add_months(as_of_date, -months))
        trailing += [F.count_if(in_window).alias(f"orders_{months}m"),
                     F.sum(F.when(in_window, F.col("net_amount")).otherwise(F.lit(0.0))).alias(f"net_{months}m")]
    category_rank = F.when(F.col("category").isNotNull(), F.struct(
        (-F.col("category_orders")).alias("neg_orders"), (-F.col("category_gross")).alias("neg_gross"),
        F.col("category").alias("category")))
    return sequenced_df.groupBy(*CUSTOMER_KEY).agg(
        F.min("order_date").alias("first_order_date"),
        F.max("order_date").alias("last_order_date"),
        F.count(F.lit(1)).alias("n_orders"),
        F.count_if("is_cancelled").alias("n_cancelled"),
        F.count_if("is_new_purchase_day").alias("n_purchase_days"),
        F.sum("gross_amount").alias("gross_amount"),
        F.sum("cancelled_amount").alias("cancelled_amount"),
        F.sum("net_amount").alias("net_amount"),
        F.sum(F.when(~F.col("is_cancelled"), F.col("gross_amount"))).alias("completed_gross"),
        F.sum(F.when(is_repeat_day_order, F.col("gross_amount"))).alias("repeat_gross"),
        F.min(F.when(is_repeat_day_order, F.col("order_date"))).alias("second_purchase_day"),
        F.min(F.when(~F.col("is_cancelled"), F.col("order_date"))).alias("net_first_order_date"),
        F.max(F.when(~F.col("is_cancelled"), F.col("order_date"))).alias("net_last_order_date"),
        F.count_if("is_new_completed_day").alias("net_purchase_days"),
        F.sum(F.when(is_net_repeat_day_order, F.col("net_amount"))).alias("net_repeat_amount"),
        # integer day gaps: a long sum of squares is exact (and cheaper than stddev_samp)
        F.sum(gap.cast("long") * gap.cast("long")).alias("gap_square_sum"),
        *trailing,
        # exactly one order per customer is the first one
        F.max(F.when(F.col("is_first_order"), F.col("channel"))).alias("acquisition_channel"),
        F.min(category_rank)["category"].alias("top_category"),
        F.max(F.when(F.col("is_first_order"), F.col("category"))).alias("first_category"),
        F.max(F.when(F.col("is_first_order"), F.col("source_name"))).alias("first_source"),
        F.array_join(F.array_sort(F.collect_set("source_name")), "+").alias("source_set"),
        F.sum(F.when(F.col("order_date") < F.add_months("first_purchase_day", 6), F.col("net_amount"))
              .otherwise(F.lit(0.0))).alias("net_first_6m"),
    )


def gap_std(gap_count: Column, gap_sum: Column, gap_square_sum: Column) -> Column:
    """Sample standard deviation (ddof=1) of integer gaps from their count, sum and sum of
    squares (all longs); null below 2 gaps. ``n*sum(x^2) - sum(x)^2`` is computed in exact long
    arithmetic, so the only rounding is the final division and square root."""
    spread = gap_count * gap_square_sum - gap_sum * gap_sum
    return F.when(gap_count >= 2, F.sqrt(spread.cast("double") / (gap_count * (gap_count - 1)).cast("double")))


def with_customer_statistics(customers_df: DataFrame, as_of_date: dt.date, time_unit: str) -> DataFrame:
    """BTYD statistics, rates, cadence and repeat flags from the per-customer aggregates."""
    frequency = F.col("n_purchase_days") - 1
    span_days = F.datediff("last_order_date", "first_order_date")
    n_completed = F.col("n_orders") - F.col("n_cancelled")
    return (customers_df
            .withColumn("as_of_date", F.lit(as_of_date))
            .withColumn("time_unit", F.lit(time_unit))
            .withColumn("frequency", frequency.cast("double"))
            .withColumn("recency", days_in_unit(span_days, time_unit))
            .withColumn("T", days_in_unit(F.datediff(F.lit(as_of_date), F.col("first_order_date")), time_unit))
            .withColumn("monetary_value", F.when(frequency > 0, F.col("repeat_gross") / frequency)
                        .otherwise(F.lit(0.0)))
            .transform(with_net_basis_statistics, as_of_date, time_unit)
            .withColumn("avg_order_value", F.when(n_completed > 0, F.col("completed_gross") / n_completed))
            .withColumn("cancel_rate_count", cancellation_rate("n_cancelled", "n_orders"))
            .withColumn("cancel_rate_amount", cancellation_rate("cancelled_amount", "gross_amount"))
            # the gaps telescope: their sum is the first-to-last span
            .withColumn("gap_mean_days", F.when(frequency >= 1, span_days / frequency))
            .withColumn("gap_std_days", gap_std(frequency, span_days.cast("long"), F.col("gap_square_sum")))
            .withColumn("is_repeat", F.col("n_purchase_days") >= 2)
            .withColumn("days_to_second_purchase", F.datediff("second_purchase_day", "first_order_date"))
            .drop("customer_hash", "repeat_gross", "second_purchase_day", "completed_gross", "gap_square_sum",
                  "net_last_order_date", "net_purchase_days", "net_repeat_amount"))


def with_net_basis_statistics(customers_df: DataFrame, as_of_date: dt.date, time_unit: str) -> DataFrame:
    """frequency / recency / T / monetary value of completed orders (null without one)."""
    has_completed = F.col("net_first_order_date").isNotNull()
    frequency = F.col("net_purchase_days") - 1
    return (customers_df
            .withColumn("net_frequency", F.when(has_completed, frequency.cast("double")))
            .withColumn("net_recency", F.when(has_completed, days_in_unit(
                F.datediff("net_last_order_date", "net_first_order_date"), time_unit)))
            .withColumn("net_T", net_age(as_of_date, time_unit))
            .withColumn("net_monetary_value", F.when(has_completed, F.when(
                frequency > 0, F.coalesce(F.col("net_repeat_amount"), F.lit(0.0)) / frequency)
                .otherwise(F.lit(0.0)))))


def net_age(as_of_date: dt.date, time_unit: str) -> Column:
    """net_T: first completed purchase day -> as_of_date (null without a completed order)."""
    return days_in_unit(F.datediff(F.lit(as_of_date), F.col("net_first_order_date")), time_unit)


def rfm_inputs(customers_df: DataFrame) -> DataFrame:
    """The three values RFM scores rank: days since last order, order count, net amount."""
    return customers_df.select(
        F.datediff("as_of_date", "last_order_date").cast("double").alias("days_since_last_order"),
        F.col("n_orders").cast("double").alias("n_orders"),
        F.col("net_amount").cast("double").alias("net_amount"))


def rfm_cut_points(customers_df: DataFrame, relative_error: float = RFM_RELATIVE_ERROR) -> dict[str, list[float]]:
    """Quintile cut points (20/40/60/80 %) of the RFM inputs: a tiny driver-side statistic."""
    inputs_df = rfm_inputs(customers_df)
    cuts = inputs_df.approxQuantile(inputs_df.columns, list(RFM_PROBABILITIES), relative_error)
    return dict(zip(inputs_df.columns, cuts))


def with_rfm_scores(customers_df: DataFrame, cut_points: dict[str, Sequence[float]]) -> DataFrame:
    days_since_last = F.datediff("as_of_date", "last_order_date")
    return (customers_df
            .withColumn("rfm_r", F.lit(6) - quantile_bucket(days_since_last, cut_points["days_since_last_order"]))
            .withColumn("rfm_f", quantile_bucket(F.col("n_orders"), cut_points["n_orders"]))
            .withColumn("rfm_m", quantile_bucket(F.col("net_amount"), cut_points["net_amount"]))
            .withColumn("rfm_score", rfm_score(F.col("rfm_r"), F.col("rfm_f"), F.col("rfm_m"))))


def customer_rows(orders_df: DataFrame, as_of_date: dt.date, time_unit: str,
                  months: Sequence[int]) -> DataFrame:
    """Per-customer rows (every column but the RFM scores) computed from the customers' orders."""
    # the date-ordered window first, on the pre-sorted rows; the category window re-sorts after it
    # (the other way round both sorts were costly: 2M customers' full computation ~10% slower)
    return (orders_as_of(orders_df, as_of_date)
            .transform(cluster_by_customer)
            .transform(with_purchase_sequence)
            .transform(with_category_totals)
            .transform(aggregate_customers, as_of_date, months)
            .transform(with_customer_statistics, as_of_date, time_unit))


# Spark plans an aggregate with collect_set (source_set) as an object hash aggregate, which
# re-sorts every order once it holds 128 customers; the orders here already arrive sorted by
# customer (cluster_by_customer), so the streaming sort aggregate is right. Measured on 2M
# customers' full computation: the source set costs ~8 s as a hash aggregate, ~1 s as a sort one.
SORTED_INPUT_AGGREGATES = {"spark.sql.execution.replaceHashWithSortAgg": "true"}


def materialised(customers_df: DataFrame) -> DataFrame:
    """The per-customer rows computed once (local checkpoint), their aggregate streaming over the
    customer-sorted orders."""
    with sql_settings(customers_df.sparkSession, SORTED_INPUT_AGGREGATES):
        return customers_df.localCheckpoint(eager=True)


def with_rfm(customers_df: DataFrame, rfm_relative_error: float = RFM_RELATIVE_ERROR,
             checkpoint: bool = True) -> DataFrame:
    """Add the RFM scores. ``checkpoint``: materialise the per-customer rows first (local
    checkpoint) so the cut points and whoever consumes the result read one computation; without
    it the cut points re-read only the three columns they rank."""
    if checkpoint:
        customers_df = materialised(customers_df)
    cut_points = rfm_cut_points(customers_df, rfm_relative_error)
    return conform(with_rfm_scores(customers_df, cut_points), CUSTOMER_FEATURES)


def build_customer_features(orders_df: DataFrame, as_of_date: dt.date | str, time_unit: str = "days",
                            trailing_months: Sequence[int] = (3, 6, 12),
                            rfm_relative_error: float = RFM_RELATIVE_ERROR) -> DataFrame:
    """``customer_features`` rows as of ``as_of_date`` (see the module docstring), every
    customer computed from all of their orders."""
    as_of_date = to_date(as_of_date)
    check_time_unit(time_unit)
    months = check_trailing_months(trailing_months)
    return with_rfm(customer_rows(orders_df, as_of_date, time_unit, months), rfm_relative_error)


# --------------------------------------------------------------------------------------------
# Incremental update: from the features at an earlier date P to D
# --------------------------------------------------------------------------------------------
RFM_COLUMNS = ("rfm_r", "rfm_f", "rfm_m", "rfm_score")


def month_key(day: dt.date) -> str:
    """The ``order_month`` partition value of a day (filters on it prune whole months)."""
    return f"{day.year:04d}-{day.month:02d}"


def orders_dated(orders_df: DataFrame, after: dt.date, through: dt.date) -> DataFrame:
    """Orders with ``after < order_date <= through``, reading only the months that can hold them."""
    return (orders_df
            .where((F.col("order_month") >= F.lit(month_key(after + dt.timedelta(days=1))))
                   & (F.col("order_month") <= F.lit(month_key(through))))
            .where((F.col("order_date") > F.lit(after)) & (F.col("order_date") <= F.lit(through))))


def months_between(first: dt.date, last: dt.date) -> list[str]:
    """The ``order_month`` values from ``first``'s month to ``last``'s, inclusive."""
    out, index = [], first.year * 12 + first.month - 1
    while index <= last.year * 12 + last.month - 1:
        out.append(f"{index // 12:04d}-{index % 12 + 1:02d}")
        index += 1
    return out


def leaving_windows(orders_df: DataFrame, previous_as_of: dt.date, as_of_date: dt.date,
                    months: Sequence[int], unify: Callable[[DataFrame], DataFrame] | None = None) -> DataFrame:
    """Per customer, the orders that leave each trailing window between P and D: for window
    ``m``, orders dated in (add_months(P, -m), add_months(D, -m)]. A customer with no order in
    (P, D] has ``orders_{m}m(D) = orders_{m}m(P) - leaving``. Reads a day or two per window on a
    regular night (only the months of those ranges are opened)."""
    ranges = {m: (add_months(previous_as_of, -m), add_months(as_of_date, -m)) for m in months}
    wanted = sorted({key for after, through in ranges.values()
                     for key in months_between(after + dt.timedelta(days=1), through)})
    in_range = {m: (F.col("order_date") > F.lit(after)) & (F.col("order_date") <= F.lit(through))
                for m, (after, through) in ranges.items()}
    any_range = F.lit(False)
    for condition in in_range.values():
        any_range = any_range | condition
    aggregates = []
    for m in months:
        aggregates += [F.count_if(in_range[m]).alias(f"leaving_orders_{m}m"),
                       F.sum(F.when(in_range[m], F.col("net_amount")).otherwise(F.lit(0.0))).alias(f"leaving_net_{m}m")]
    leaving_df = orders_df.where(F.col("order_month").isin(wanted)).where(any_range)
    if unify is not None:   # stored ids -> unified, for these few orders only
        leaving_df = unify(leaving_df)
    return leaving_df.groupBy("customer_id").agg(*aggregates)


def touched_customers(orders_df: DataFrame, appended_df: DataFrame, previous_as_of: dt.date,
                      as_of_date: dt.date, unify: Callable[[DataFrame], DataFrame] | None = None) -> DataFrame:
    """Customers whose features at D can differ from those at P by more than the passing of time:
    those with orders added to the table since P was computed (new files, late orders, backfills)
    and those with orders dated after P up to D (also orders stored before P was computed).
    ``unify``: ``orders_df`` holds stored ids; this makes the dated few unified."""
    dated_df = orders_dated(orders_df, previous_as_of, as_of_date)
    if unify is not None:
        dated_df = unify(dated_df)
    return (appended_df.where(F.col("order_date") <= F.lit(as_of_date)).select("customer_id")
            .unionByName(dated_df.select("customer_id"))
            .distinct())


def update_customer_features(previous_df: DataFrame, orders_df: DataFrame, touched_df: DataFrame,
                             previous_as_of: dt.date, as_of_date: dt.date, time_unit: str, months: Sequence[int],
                             broadcast_touched: bool = True,
                             rfm_relative_error: float = RFM_RELATIVE_ERROR,
                             identity: IdLookup | None = None) -> DataFrame:
    """``customer_features`` at D from those at an earlier date P (``previous_df``), equal to
    :func:`build_customer_features` at D provided ``orders`` only gained rows since P was computed
    and ``touched_df`` holds :func:`touched_customers`.

    Touched customers are computed from all of their orders. Every other customer has no order
    dated in (P, D] and none added since: their order history up to D is the one P saw, so only
    what depends on the date moves: ``as_of_date``, ``T``, the trailing windows (P's minus the
    orders that left them, :func:`leaving_windows`; a sum of doubles may differ from the full
    computation in the last bits, which ``features.full_every_days`` bounds) and the RFM scores
    (cut points over all customers).

    With ``identity`` (several sources), ``orders_df`` holds the stored source ids and the orders
    the update reads are put on the unified id by :class:`pipelines.identity.IdLookup` (the few
    ids not on their own id, broadcast): no scan or shuffle of the whole map each night.
    """
    touched = F.broadcast(touched_df) if broadcast_touched else touched_df
    unify = None
    if identity is not None:
        unify = identity.apply
        touched_orders_df = identity.orders_of(orders_df, touched_df)
    else:
        touched_orders_df = orders_df.join(touched, on="customer_id", how="left_semi")
    # the touched customers are few: materialise them; the carried rows are cheap to re-read
    # (a column-pruned scan of P for the RFM cut points, then the write), cheaper than a
    # checkpoint of every customer
    recomputed_df = materialised(customer_rows(touched_orders_df, as_of_date, time_unit, months))
    leaving_df = leaving_windows(orders_df, previous_as_of, as_of_date, months, unify).localCheckpoint(eager=True)
    if leaving_df.count() <= BROADCAST_MAX_TOUCHED:   # a night's leaving orders: a few thousand customers
        leaving_df = F.broadcast(leaving_df)
    carried_df = (previous_df.join(touched, on="customer_id", how="left_anti")
                  .drop(*RFM_COLUMNS)
                  .withColumn("as_of_date", F.lit(as_of_date))
                  .withColumn("T", days_in_unit(F.datediff(F.lit(as_of_date), F.col("first_order_date")), time_unit))
                  .withColumn("net_T", net_age(as_of_date, time_unit))
                  .join(leaving_df, on="customer_id", how="left"))
    for m in months:
        orders_left = F.col(f"orders_{m}m") - F.coalesce(f"leaving_orders_{m}m", F.lit(0))
        carried_df = (carried_df
                      .withColumn(f"net_{m}m", F.when(orders_left == 0, F.lit(0.0))   # exact when empty
                                  .otherwise(F.col(f"net_{m}m") - F.coalesce(f"leaving_net_{m}m", F.lit(0.0))))
                      .withColumn(f"orders_{m}m", orders_left)
                      .drop(f"leaving_orders_{m}m", f"leaving_net_{m}m"))
    return with_rfm(recomputed_df.unionByName(carried_df), rfm_relative_error, checkpoint=False)


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------
# Above this share of the previous customers, recomputing everyone is cheaper than the update.
INCREMENTAL_MAX_TOUCHED_SHARE = 0.3
# Up to this many touched customers, their ids are broadcast to the scan of the orders.
BROADCAST_MAX_TOUCHED = 2_000_000


def last_customer_count(storage: Storage) -> int | None:
    """Customers in the latest ``customer_features`` partition (its ``features_runs`` row), or None
    before the first features run."""
    if not storage.exists(FEATURES_RUNS):
        return None
    last = storage.read(FEATURES_RUNS).orderBy(F.desc("as_of_date")).select("customers").limit(1).collect()
    return int(last[0]["customers"]) if last else None


def incremental_base(storage: Storage, as_of_date: dt.date, features_conf: FeaturesConf,
                     orders_version: int, identity_at: int | None = None,
                     identity: IdLookup | None = None) -> tuple[Any, DataFrame | None, str]:
    """The ``features_runs`` row to update from and the orders added since it, or (None, None,
    why a full computation is needed)."""
    if not features_conf.incremental:
        return None, None, "features.incremental is false"
    if not storage.exists(FEATURES_RUNS):
        return None, None, "no earlier features"
    months = [int(m) for m in features_conf.trailing_months]
    base = (storage.read(FEATURES_RUNS)
            .where((F.col("as_of_date") < F.lit(as_of_date)) & (F.col("time_unit") == features_conf.time_unit)
                   & (F.col("trailing_months") == F.array(*[F.lit(m) for m in months])))
            .orderBy(F.desc("as_of_date")).limit(1).collect())
    if not base:
        return None, None, "no earlier features with this time unit and these windows"
    base = base[0]
    age = (as_of_date - base["full_as_of_date"]).days
    if age >= features_conf.full_every_days:
        return None, None, (f"last full computation {base['full_as_of_date']} is {age} days old "
                            f"(features.full_every_days={features_conf.full_every_days})")
    if base["orders_version"] > orders_version:
        return None, None, "orders is older than the earlier features"
    appended_df = storage.appended_since(ORDERS, int(base["orders_version"]))
    if appended_df is None:
        return None, None, f"orders were rewritten since version {base['orders_version']} (not only appended)"
    if identity_at is not None:
        # only new source ids (appended to identity_map) leave the earlier customers as they were;
        # a source id merged into another customer (identity_map rewritten) moves orders between them
        base_identity = base["identity_version"] if "identity_version" in base.asDict() else None
        if base_identity is None or (base_identity != identity_at
                                     and storage.appended_since(IDENTITY_MAP, int(base_identity)) is None):
            return None, None, "identity_map moved source ids to other customers since the earlier features"
        appended_df = identity.apply(appended_df)
    return base, appended_df, ""


def _update_from(storage: Storage, base: Any, orders_df: DataFrame, appended_df: DataFrame,
                 as_of_date: dt.date, time_unit: str, months: Sequence[int],
                 identity: IdLookup | None = None) -> tuple[DataFrame | None, int | None, str]:
    """(features at D updated from the ``features_runs`` row ``base``, customers recomputed, "")
    or (None, count or None, why the update does not apply). With ``identity`` ``orders_df``
    holds the stored ids (see :func:`update_customer_features`)."""
    previous_as_of = base["as_of_date"]
    previous_df = storage.read(CUSTOMER_FEATURES).where(F.col("as_of_date") == F.lit(previous_as_of))
    if previous_df.count() != base["customers"]:
        return None, None, f"the customer_features partition {previous_as_of} does not match its features_runs row"
    lacks_net_basis = (F.col("net_first_order_date").isNull() & (F.col("n_orders") > F.col("n_cancelled")))
    if previous_df.where(lacks_net_basis | F.col("first_source").isNull()).limit(1).count():
        return None, None, (f"the customer_features partition {previous_as_of} predates the net-basis or "
                            "source columns")
    unify = identity.apply if identity is not None else None
    touched_df = touched_customers(orders_df, appended_df, previous_as_of, as_of_date,
                                   unify).localCheckpoint(eager=True)
    recomputed = touched_df.count()
    if recomputed > INCREMENTAL_MAX_TOUCHED_SHARE * base["customers"]:
        return None, recomputed, f"{recomputed:,} of {base['customers']:,} customers have new orders"
    return (update_customer_features(previous_df, orders_df, touched_df, previous_as_of, as_of_date, time_unit,
                                     months, broadcast_touched=recomputed <= BROADCAST_MAX_TOUCHED,
                                     identity=identity),
            recomputed, "")


@dataclass(frozen=True)
class FeaturesResult(StageResult):
    """What :func:`run_features` wrote: the partition's customers and how they were computed."""
    as_of_date: dt.date
    time_unit: str
    mode: str                                   # full | incremental
    customers: int
    recomputed_customers: int
    orders: int
    repeat_customers: int
    updated_from: dt.date | None = omitted_when_none()   # incremental: the partition it started from
    full_reason: str | None = omitted_when_none()        # full: why not incremental

    def summary_line(self) -> str:
        how = (f"updated from {self.updated_from}, {self.recomputed_customers:,} recomputed"
               if self.mode == "incremental" else f"full: {self.full_reason}")
        return f"{self.customers:,} customers, {self.orders:,} orders ({how})"


def run_features(storage: Storage, as_of_date: dt.date, features_conf: FeaturesConf,
                 full: bool = False) -> FeaturesResult:
    """Read ``orders``, write the ``as_of_date`` partition of ``customer_features``: updated from
    the latest earlier partition when ``orders`` only gained rows since (:func:`incremental_base`),
    else (or with ``full``) computed from every order. Records a ``features_runs`` row."""
    time_unit = check_time_unit(features_conf.time_unit)
    months = check_trailing_months(features_conf.trailing_months)
    started = time.perf_counter()
    orders_version = storage.version(ORDERS)
    identity_at = identity_version(storage)
    stored_df = storage.read(ORDERS, version=orders_version)
    # several sources: orders go on the unified id through the few ids not on their own id, kept
    # for every lookup of this run (the map is scanned once)
    identity = (IdLookup.of(storage.read(IDENTITY_MAP, version=identity_at), materialise=True)
                if identity_at is not None else None)
    base, appended_df, reason = (None, None, "requested") if full else \
        incremental_base(storage, as_of_date, features_conf, orders_version, identity_at, identity)
    features_df = recomputed = None
    if base is not None:
        # the update reads the stored ids and unifies only the orders it needs
        features_df, recomputed, reason = _update_from(storage, base, stored_df, appended_df, as_of_date,
                                                       time_unit, months, identity)
    incremental = features_df is not None
    if not incremental:
        orders_df = identity.apply(stored_df) if identity is not None else stored_df   # on the unified id
        features_df = build_customer_features(orders_df, as_of_date, time_unit=time_unit, trailing_months=months)
    computed = time.perf_counter()
    storage.replace_partitions(CUSTOMER_FEATURES, features_df, partitions={"as_of_date": [as_of_date]})
    log.debug("features %s: computed in %.1f s, written in %.1f s", as_of_date, computed - started,
              time.perf_counter() - computed)
    # from the written partition (two columns read back), not by computing features_df a second time
    written_df = storage.read(CUSTOMER_FEATURES).where(F.col("as_of_date") == F.lit(as_of_date))
    stats = written_df.agg(F.count(F.lit(1)).alias("customers"),
                           F.coalesce(F.sum("n_orders"), F.lit(0)).alias("orders"),
                           F.count_if("is_repeat").alias("repeat_customers")).first()
    customers = int(stats["customers"])
    run = (as_of_date, orders_version, time_unit, list(months), "incremental" if incremental else "full",
           base["as_of_date"] if incremental else None, base["full_as_of_date"] if incremental else as_of_date,
           customers, recomputed if incremental else customers, dt.datetime.now(dt.timezone.utc), identity_at)
    storage.merge(FEATURES_RUNS, storage.spark.createDataFrame([run], FEATURES_RUNS.schema))
    return FeaturesResult(as_of_date, time_unit, "incremental" if incremental else "full", customers,
                          recomputed_customers=run[8], orders=int(stats["orders"]),
                          repeat_customers=int(stats["repeat_customers"]),
                          updated_from=base["as_of_date"] if incremental else None,
                          full_reason=None if incremental else reason)
