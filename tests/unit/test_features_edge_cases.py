"""customer_features on hand-computed edge cases: single order, all cancelled, a cancellation before
the first completed order, same-day orders, a null channel and an order after the as-of date."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from core.tables import ORDERS
from pipelines.features import build_customer_features

AS_OF = dt.date(2024, 6, 30)


def _orders(spark, rows):
    """rows: (order_id, customer_id, day, gross, is_cancelled, channel, category)."""
    df = spark.createDataFrame(rows, "order_id string, customer_id string, d string, gross double, "
                                     "is_cancelled boolean, channel string, category string")
    cancelled = F.when(F.col("is_cancelled"), F.col("gross")).otherwise(F.lit(0.0))
    return df.select(
        "order_id", "customer_id", F.to_timestamp("d").alias("order_ts"), F.to_date("d").alias("order_date"),
        F.col("gross").alias("gross_amount"), "is_cancelled", cancelled.alias("cancelled_amount"),
        (F.col("gross") - cancelled).alias("net_amount"), "channel", "category",
        F.lit("JPY").alias("currency"), F.lit(None).cast("map<string,string>").alias("extra"),
        F.lit("f.csv").alias("source_file"), F.lit(1).cast("long").alias("source_row"),
        F.lit("run").alias("ingest_run_id"), F.date_format("d", "yyyy-MM").alias("order_month"),
    ).select(*ORDERS.columns)


def test_edge_cases_by_hand(spark):
    orders_df = _orders(spark, [
        ("a1", "c1", "2024-03-01 10:00:00", 100.0, False, "web", "A"),          # single order
        ("b1", "c2", "2024-01-10 10:00:00", 50.0, True, "store", "B"),          # all cancelled
        ("b2", "c2", "2024-02-10 10:00:00", 70.0, True, "store", "B"),
        ("c1", "c3", "2024-04-01 09:00:00", 40.0, True, None, "A"),             # cancelled first, null channel
        ("c2", "c3", "2024-04-05 09:00:00", 60.0, False, "app", "C"),           # same day ...
        ("c3", "c3", "2024-04-05 18:00:00", 40.0, False, "app", "C"),           # ... one purchase day
        ("c4", "c3", "2024-07-05 09:00:00", 999.0, False, "app", "C"),          # after the as-of date
    ])
    rows = {r.customer_id: r for r in build_customer_features(orders_df, AS_OF, "days").collect()}
    assert set(rows) == {"c1", "c2", "c3"}

    c1 = rows["c1"]
    assert (c1.n_orders, c1.n_purchase_days, c1.frequency, c1.recency, c1.T) == (1, 1, 0.0, 0.0, 121.0)
    assert (c1.monetary_value, c1.avg_order_value, c1.cancel_rate_count) == (0.0, 100.0, 0.0)
    assert c1.gap_mean_days is None and c1.gap_std_days is None and c1.days_to_second_purchase is None
    assert (c1.is_repeat, c1.acquisition_channel, c1.top_category) == (False, "web", "A")

    c2 = rows["c2"]
    assert (c2.n_orders, c2.n_cancelled, c2.frequency, c2.recency, c2.T) == (2, 2, 1.0, 31.0, 172.0)
    assert (c2.gross_amount, c2.cancelled_amount, c2.net_amount) == (120.0, 120.0, 0.0)
    assert c2.avg_order_value is None
    assert (c2.cancel_rate_count, c2.cancel_rate_amount, c2.monetary_value) == (1.0, 1.0, 70.0)

    c3 = rows["c3"]
    assert (c3.n_orders, c3.n_cancelled, c3.n_purchase_days) == (3, 1, 2)
    assert (c3.frequency, c3.recency, c3.T, c3.monetary_value) == (1.0, 4.0, 90.0, 100.0)
    assert (c3.gross_amount, c3.cancelled_amount, c3.net_amount, c3.avg_order_value) == (140.0, 40.0, 100.0, 50.0)
    assert c3.cancel_rate_count == pytest.approx(1 / 3) and c3.cancel_rate_amount == pytest.approx(40 / 140)
    assert c3.acquisition_channel is None and c3.top_category == "C"
    assert (c3.gap_mean_days, c3.days_to_second_purchase) == (4.0, 4) and c3.gap_std_days is None
    assert (c3.orders_3m, c3.net_3m, c3.orders_12m) == (3, 100.0, 3)
    assert c3.last_order_date == dt.date(2024, 4, 5)          # the July order is not seen

    weeks = {r.customer_id: r for r in build_customer_features(orders_df, AS_OF, "weeks").collect()}
    assert weeks["c2"].recency == pytest.approx(31 / 7, abs=1e-12) and weeks["c2"].T == pytest.approx(172 / 7)


def test_the_date_ordered_window_sorts_the_pre_sorted_rows(spark):
    # the pre-sort (customer, then day) only pays when the window ordered by date sorts right after
    # it; the category window re-sorts by category, so it must come later (2M customers: ~10% of a
    # full computation). The plan's sorts, innermost first: pre-sort, date order, category order.
    from pipelines.features import customer_rows

    orders_df = _orders(spark, [("a1", "c1", "2024-03-01 10:00:00", 100.0, False, "web", "A")])
    plan = customer_rows(orders_df, AS_OF, "days", (3,))._jdf.queryExecution().executedPlan().toString()
    sorts = [line.split("Sort [", 1)[1] for line in reversed(plan.splitlines()) if "Sort [" in line]
    assert len(sorts) == 3, plan
    assert "unix_date(order_date" in sorts[0]
    assert sorts[1].split(", ")[2].startswith("order_date") and sorts[2].split(", ")[2].startswith("category")
