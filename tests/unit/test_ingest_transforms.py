"""The ingest's pure transforms (pipelines/ingest/transforms.py) on frames of a few rows, each result
written out by hand: cancellation flags, duplicate and conflict flags, matching cancellation lines to
their orders, and line-grain orders with cancellations applied."""
from __future__ import annotations

import datetime as dt

from pyspark.sql import functions as F

from pipelines.ingest.transforms import (CONTENT, build_orders, match_cancellations, source_stats,
                                         with_cancellation_flags, with_duplicate_flags, with_row_keys)

UTC = dt.timezone.utc


def _rows(df, *columns):
    return sorted(tuple(r[c] for c in columns) for r in df.collect())


def test_cancellation_flags_by_status_partial_amounts_and_negative_lines(spark):
    df = spark.createDataFrame(
        [("o1", "取消", 1000.0, None), ("o2", "完了", 500.0, 200.0), ("o3", "完了", 300.0, 900.0),
         ("o4", None, 400.0, -5.0)],
        "order_id string, status string, gross_amount double, cancelled_input double")
    status = with_cancellation_flags(df, style="status", cancelled_values=["取消"])
    assert _rows(status, "order_id", "is_status_cancelled", "line_cancelled_amount", "is_cancellation_line") == [
        ("o1", True, 1000.0, False),     # a cancelled status cancels the whole gross
        ("o2", False, 200.0, False),     # a partial cancellation as given
        ("o3", False, 300.0, False),     # ... clipped to the gross
        ("o4", False, 0.0, False),       # a null status is not cancelled; a negative partial is 0
    ]
    lines = spark.createDataFrame([("A1", 100.0), ("A2", -100.0), ("C3", 50.0)],
                                  "order_id string, gross_amount double").withColumn("status", F.lit(None).cast("string")) \
        .withColumn("cancelled_input", F.lit(None).cast("double"))
    by_sign = with_cancellation_flags(lines, style="negative_lines")
    by_prefix = with_cancellation_flags(lines, style="negative_lines", order_id_prefix="C")
    assert _rows(by_sign, "order_id", "is_cancellation_line") == [("A1", False), ("A2", True), ("C3", False)]
    assert _rows(by_prefix, "order_id", "is_cancellation_line") == [("A1", False), ("A2", False), ("C3", True)]


def _keyed_rows(spark, rows):
    """rows: (src_key, order_id, customer_id, gross) as read from one file split, the other mapped fields
    equal on every row."""
    df = spark.createDataFrame(rows, "_src_key long, order_id string, customer_id string, gross_amount_in string")
    for column in CONTENT:
        if column not in df.columns:
            df = df.withColumn(column, F.lit("x"))
    return (df.withColumn("_src_file", F.lit("orders.csv")).withColumn("_src_block", F.lit(0).cast("long"))
            .withColumn("_src_pos", F.col("_src_key")))


def test_an_exact_copy_is_a_duplicate_and_differing_rows_of_one_order_are_all_conflicts(spark):
    df = with_row_keys(_keyed_rows(spark, [
        (1, "o1", "c1", "100"), (2, "o1", "c1", "100"),     # o1 twice, the same: the second is a copy
        (3, "o2", "c2", "200"), (4, "o2", "c2", "250"),     # o2 twice, differing: both quarantined
        (5, "o3", "c3", "300"),
    ]), grain="order", order_id_mapped=True)
    stats = source_stats(df, grain="order", order_id_mapped=True)
    flagged = with_duplicate_flags(df, stats, grain="order")
    assert _rows(flagged, "_src_key", "is_exact_duplicate", "is_order_conflict") == [
        (1, False, False), (2, True, False), (3, False, True), (4, False, True), (5, False, False)]
    details = {r["_src_key"]: r["conflict_detail"] for r in flagged.collect()}
    assert details[3] == "order id o2 is on 2 rows whose content differ; every one is quarantined"
    assert details[1] is None and details[5] is None


def test_rows_not_read_count_only_for_row_numbers(spark):
    """A narrowed re-read (``in_read``): the split still counts every row and starts at the file's
    first position (row numbers are the whole file's); orders and value counts hold only the rows
    read, so a copy among the others is no duplicate of a row read."""
    df = with_row_keys(_keyed_rows(spark, [
        (1, "o1", "c1", "100"), (2, "o1", "c1", "100"),     # o1 twice, not read
        (3, "o2", "c2", "200"), (4, "o2", "c2", "200"),     # o2 twice, read: the second is a copy
        (5, "o3", "c1", "300"),
    ]), grain="order", order_id_mapped=True).withColumn("status", F.col("customer_id"))
    stats = source_stats(df, grain="order", order_id_mapped=True, profile=["status"],
                         in_read=F.col("customer_id") == "c2")
    rows = {(r["_set"], r["_order_key"], r["status"]): (r["_n"], r["_n_all"], r["_first_pos"]) for r in stats.collect()}
    assert rows == {("split", None, None): (2, 5, 1), ("order", "o2", None): (2, 2, 3),
                    ("profile", None, "c2"): (2, 2, 3)}


def test_line_grain_copies_are_per_line_and_a_changed_customer_is_a_conflict(spark):
    df = with_row_keys(_keyed_rows(spark, [
        (1, "o1", "c1", "100"), (2, "o1", "c1", "40"), (3, "o1", "c1", "40"),   # two lines, one copied
        (4, "o2", "c2", "10"), (5, "o2", "c9", "10"),                           # one order, two customers
    ]), grain="line", order_id_mapped=True)
    flagged = with_duplicate_flags(df, source_stats(df, grain="line", order_id_mapped=True), grain="line")
    assert _rows(flagged, "_src_key", "is_exact_duplicate", "is_order_conflict") == [
        (1, False, False), (2, False, False), (3, True, False), (4, False, True), (5, False, True)]


def test_cancellation_lines_match_by_id_then_by_the_latest_earlier_order(spark):
    at = lambda day: dt.datetime(2024, 1, day, 12, tzinfo=UTC)   # noqa: E731
    orders = spark.createDataFrame([("k1", "A1", "c1", at(1)), ("k2", "A2", "c1", at(5))],
                                   "_order_key string, order_id string, customer_id string, order_ts timestamp")
    cancels = spark.createDataFrame(
        [(10, "CA1", "c1", at(10)),     # names A1 (prefix C): matched by id though A2 is more recent
         (11, "CX9", "c1", at(6)),      # names no order: the customer's latest order before it, A2
         (12, "CA1", "c2", at(6)),      # A1 belongs to another customer, and c2 has no order: unmatched
         (13, "CZ1", "c1", at(5))],     # at the same instant as A2: orders sort first, so A2
        "_src_key long, order_id string, customer_id string, order_ts timestamp")
    matched = match_cancellations(cancels, orders, order_id_prefix="C", strip_prefix_to_match=True)
    assert _rows(matched, "_src_key", "_target_key", "_match", "has_target_order") == [
        (10, "k1", "id", True), (11, "k2", "heuristic", True), (12, None, None, False),
        (13, "k2", "heuristic", True)]


def test_line_grain_orders_sum_their_lines_and_apply_cancellation_lines(spark):
    ts = dt.datetime(2024, 1, 5, 3, tzinfo=UTC)
    lines = spark.createDataFrame(
        [("k1", "o1", "c1", ts, dt.date(2024, 1, 5), 600.0, 0.0, False, "web", "shoes", "JPY", "a.csv", 1),
         ("k1", "o1", "c1", ts, dt.date(2024, 1, 5), 400.0, 100.0, False, "store", "bags", "JPY", "a.csv", 2),
         ("k2", "o2", "c2", ts, dt.date(2024, 1, 5), 300.0, 0.0, False, "web", "hats", "JPY", "a.csv", 3)],
        "_order_key string, order_id string, customer_id string, order_ts timestamp, order_date date, "
        "gross_amount double, line_cancelled_amount double, is_status_cancelled boolean, channel string, "
        "category string, currency string, source_file string, source_row long"
    ).withColumn("extra", F.lit(None).cast("map<string,string>"))
    cancels = spark.createDataFrame([("k1", -250.0), ("k2", -500.0)], "_target_key string, gross_amount double")
    orders = build_orders(lines, cancels, grain="line", order_id_mapped=True, ingest_run_id="run-1",
                          source_name="ec", order_id_prefix="ec:")
    assert _rows(orders, "order_id", "gross_amount", "cancelled_amount", "net_amount", "is_cancelled", "channel",
                 "category", "source_row", "source_name", "order_month") == [
        # 100 cancelled on its line + a 250 cancellation line; channel and row of the first line, category of
        # the largest
        ("ec:o1", 1000.0, 350.0, 650.0, False, "web", "shoes", 1, "ec", "2024-01"),
        # a cancellation line larger than the order cancels it whole, no more
        ("ec:o2", 300.0, 300.0, 0.0, True, "web", "hats", 3, "ec", "2024-01"),
    ]
