"""Ingest end to end on small files: quarantine reasons, threshold, re-ingest, Japanese cp932
exports, UCI-style cancellation lines, exact row numbers, parquet/Delta, CDNOW, bad input."""
from __future__ import annotations

import shutil
from datetime import date, datetime
from pathlib import Path

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import functions as F

from core.config import SourceConf, ValidationConf, load_config
from jobs.demo import cdnow_sample_path
from pipelines.ingest import IngestError, IngestRejectedError, run_ingest

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)

DATA = Path(__file__).resolve().parents[1] / "data" / "ingest"
ROOT = Path(__file__).resolve().parents[2]
# the raw transactions lifetimes ships, wherever the environment installed it (not only ./.venv)
CDNOW = cdnow_sample_path() if cdnow_sample_path().is_file() else None
ORDER_COLUMNS = {"order_id": "order_id", "customer_id": "customer_id", "order_ts": "order_ts",
                 "gross_amount": "gross_amount"}


def source(**kw) -> SourceConf:
    kw.setdefault("columns", ORDER_COLUMNS)
    return SourceConf.model_validate(kw)


def quarantine_rows(storage) -> list[tuple]:
    return sorted((r.source_row, r.reason) for r in storage.read("orders_quarantine").collect())


def test_quarantine_reasons_threshold_and_reingest(spark, storage):
    path = str(DATA / "orders_bad.csv")
    conf = source(columns={**ORDER_COLUMNS, "currency": "currency", "channel": "channel"},
                  timestamp_formats_extra=["yyyy/MM/dd HH:mm"], allowed_currencies=["JPY"])
    run_date = date(2024, 3, 31)

    # 1. Default threshold (5%): the run fails, the quarantine and the run record are written, orders not.
    with pytest.raises(IngestRejectedError) as failed:
        run_ingest(spark, storage, conf, ValidationConf(), "Asia/Tokyo", run_date, path=path, run_id="r1")
    message = str(failed.value)
    assert message.startswith("11 of 16 rows (68.8%) were rejected, above validation.max_rejected_share=5%: "
                              "top reasons duplicate_order_conflict 2, missing_customer_id 2, ")
    assert "cvseg show orders_quarantine" in message
    assert not storage.exists("orders")
    run = storage.read("ingest_runs").first()
    assert (run.status, run.input_rows, run.quarantined_rows, run.orders_written) == ("rejected", 16, 11, 0)

    expected_quarantine = [
        (2, "missing_customer_id"), (3, "unparsable_timestamp"), (4, "future_timestamp"),
        (5, "negative_amount"), (6, "non_numeric_amount"), (7, "missing_amount"), (8, "unknown_currency"),
        (9, "duplicate_order_conflict"), (10, "duplicate_order_conflict"), (11, "missing_order_id"),
        (16, "missing_customer_id"),
    ]
    assert quarantine_rows(storage) == expected_quarantine
    q = {r.source_row: r for r in storage.read("orders_quarantine").collect()}
    assert q[16].reasons == ["missing_customer_id", "unparsable_timestamp", "non_numeric_amount", "unknown_currency"]
    assert q[16].raw == {"order_id": "A013", "customer_id": None, "order_ts": "not a date",
                         "gross_amount": "xyz", "currency": "EUR", "channel": "web"}
    assert q[9].detail == "order id A009 is on 2 rows whose content differ; every one is quarantined"
    assert q[6].detail == "amount 'abc' is not a number"
    assert {r.source_file for r in q.values()} == {path} and q[3].order_id == "A003"

    # 2. A looser threshold accepts the good rows; the identity holds and is printed.
    summary = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=1.0), "Asia/Tokyo",
                         run_date, path=path, run_id="r2")
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows,
            summary.exact_duplicate_rows, summary.orders_written) == (16, 4, 11, 1, 4)
    assert ("input rows 16 from 1 file(s) = accepted order rows 4 + cancellation lines applied 0 "
            "+ quarantined 11 + exact duplicates dropped 1") in str(summary)
    assert summary.reason_counts["duplicate_order_conflict"] == 2
    expected_orders = spark.createDataFrame([
        ("A001", "C1", datetime(2024, 1, 5, 1), date(2024, 1, 5), 1200.0, "JPY", "web", 1, "2024-01"),
        ("A010", "C6", datetime(2024, 1, 13, 1), date(2024, 1, 13), 2000.0, "JPY", "app", 13, "2024-01"),
        ("A011", "C2", datetime(2024, 3, 31, 14, 30), date(2024, 3, 31), 700.0, "JPY", "web", 14, "2024-03"),
        ("A012", "C1", datetime(2024, 2, 1, 0), date(2024, 2, 1), 300.0, "JPY", "catalog", 15, "2024-02"),
    ], "order_id string, customer_id string, order_ts timestamp, order_date date, gross_amount double, "
       "currency string, channel string, source_row long, order_month string")
    orders_df = storage.read("orders")
    assert_df_equality(orders_df.select(*expected_orders.columns), expected_orders,
                       ignore_row_order=True, ignore_nullable=True)
    before = orders_df.orderBy("order_id").collect()

    # 3. The unchanged file is not read again (new_files_only); read again on request, it adds
    # nothing: same orders (same run id even), quarantine not doubled.
    unchanged = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=1.0), "Asia/Tokyo",
                           run_date, path=path, run_id="r3")
    assert (unchanged.status, unchanged.input_rows, unchanged.skipped_files) == ("unchanged", 0, 1)
    assert "no new files: all 1 file(s) were ingested before" in str(unchanged)
    again = run_ingest(spark, storage, conf.model_copy(update={"new_files_only": False}),
                       ValidationConf(max_rejected_share=1.0), "Asia/Tokyo", run_date, path=path, run_id="r4")
    assert again.orders_written == 0 and again.accepted_rows == 4
    assert storage.read("orders").orderBy("order_id").collect() == before
    assert quarantine_rows(storage) == expected_quarantine
    runs = {r.ingest_run_id: (r.status, r.first_order_date) for r in storage.read("ingest_runs").collect()}
    assert runs == {"r1": ("rejected", None), "r2": ("ok", date(2024, 1, 5)), "r3": ("unchanged", None),
                    "r4": ("ok", None)}
    # the rejected run r1 recorded no file; r2 did, and r4 replaced that row (same file, same key)
    files = storage.read("ingested_files").collect()
    assert [(f.source_file, f.data_rows, f.ingest_run_id) for f in files] == [(path, 16, "r4")]


def test_new_files_only_reads_new_and_changed_files(spark, storage, tmp_path):
    """A folder that gains a file each night: each run reads only what is new or was rewritten."""
    folder = tmp_path / "drop"
    folder.mkdir()
    header = "order_id,customer_id,order_ts,gross_amount\n"
    (folder / "day1.csv").write_text(header + "A1,C1,2024-01-05 10:00:00,100\nA2,C2,2024-01-05 11:00:00,200\n")
    run = lambda run_id: run_ingest(spark, storage, source(), ValidationConf(), "Asia/Tokyo",  # noqa: E731
                                    date(2024, 12, 31), path=str(folder), run_id=run_id)
    first = run("n1")
    assert (first.input_rows, first.orders_written, first.source_files, first.skipped_files) == (2, 2, 1, 0)

    (folder / "day2.csv").write_text(header + "A3,C1,2024-01-06 09:00:00,300\n")
    second = run("n2")
    assert (second.input_rows, second.orders_written, second.source_files, second.skipped_files) == (1, 1, 1, 1)
    assert "1 file(s) ingested before unchanged were skipped" in str(second)
    got = {r.order_id: (r.source_file.rsplit("/", 1)[-1], r.source_row) for r in storage.read("orders").collect()}
    assert got == {"A1": ("day1.csv", 1), "A2": ("day1.csv", 2), "A3": ("day2.csv", 1)}

    assert run("n3").status == "unchanged"

    # a re-export of day 1 with a correction (different size): read again, the changed order replaced
    (folder / "day1.csv").write_text(header + "A1,C1,2024-01-05 10:00:00,150\nA2,C2,2024-01-05 11:00:00,200\n")
    fourth = run("n4")
    assert (fourth.input_rows, fourth.orders_written, fourth.skipped_files) == (2, 1, 1)
    amounts = {r.order_id: r.gross_amount for r in storage.read("orders").collect()}
    assert amounts == {"A1": 150.0, "A2": 200.0, "A3": 300.0}
    # each run records the earliest order date it wrote (the trend tables' incremental start)
    first_dates = {r.ingest_run_id: r.first_order_date for r in storage.read("ingest_runs").collect()}
    assert first_dates == {"n1": date(2024, 1, 5), "n2": date(2024, 1, 6), "n3": None, "n4": date(2024, 1, 5)}
    files = sorted((f.source_file.rsplit("/", 1)[-1], f.data_rows, f.ingest_run_id)
                   for f in storage.read("ingested_files").collect())
    # the old day-1 row stays (another size): it records what was read when
    assert files == [("day1.csv", 2, "n1"), ("day1.csv", 2, "n4"), ("day2.csv", 1, "n2")]


def test_rows_quarantined_as_future_are_read_again_once_their_day_has_come(spark, storage, tmp_path):
    """"Future" is judged against the day the file is read. A row dated after it is quarantined,
    its file recorded; the first ingest on or after the row's day reads that file again (without
    --all-files), accepts the row, drops it from the quarantine and counts it in the summary."""
    folder = tmp_path / "drop"
    folder.mkdir()
    header = "order_id,customer_id,order_ts,gross_amount\n"
    (folder / "day1.csv").write_text(header + "A1,C1,2024-01-31 10:00:00,100\nA2,C2,2024-02-10 09:00:00,200\n")
    run = lambda day, run_id: run_ingest(spark, storage, source(), ValidationConf(max_rejected_share=0.5), "UTC",  # noqa: E731
                                         day, path=str(folder), run_id=run_id)
    first = run(date(2024, 1, 31), "f1")
    assert (first.orders_written, first.quarantined_rows, first.future_rows_retried) == (1, 1, 0)
    (q,) = storage.read("orders_quarantine").collect()
    assert (q.order_id, q.reason, q.order_date) == ("A2", "future_timestamp", date(2024, 2, 10))
    assert "is after 2024-01-31, the day the file was read" in q.detail

    # not due yet: nothing read
    assert run(date(2024, 2, 9), "f2").status == "unchanged"

    (folder / "day2.csv").write_text(header + "A3,C1,2024-02-11 12:00:00,300\n")
    third = run(date(2024, 2, 11), "f3")
    # day 1 is read narrowed: the due row's customer and order id (A2 of C2), not A1
    assert (third.source_files, third.input_rows, third.future_rows_retried) == (2, 2, 1)
    assert (third.orders_written, third.quarantined_rows) == (2, 0)   # A2 and A3
    assert ("1 row(s) quarantined as future_timestamp by an earlier ingest were read again (their order day has "
            "come), with the rows of their customers and orders: 1 row(s) of 1 file(s) ingested before") in str(third)
    assert sorted(r.order_id for r in storage.read("orders").collect()) == ["A1", "A2", "A3"]
    assert storage.read("orders_quarantine").count() == 0
    assert {r.ingest_run_id: r.future_rows_retried for r in storage.read("ingest_runs").collect()} == {
        "f1": 0, "f2": 0, "f3": 1}
    assert run(date(2024, 2, 12), "f4").status == "unchanged"


def _history_with_future_lines(folder: Path) -> None:
    """A line-grain history with cancellation lines (by id and by customer) and an exact copy around
    an order dated after the day it is read, one still further ahead, and other quarantined rows."""
    rows = [f"O{i},c{i % 50},2024-01-{1 + i % 28:02d} 10:00:00,{1 + i % 3},{10 + i}" for i in range(300)]
    rows[120:120] = [
        "X0,cX,2024-01-20 09:00:00,1,40",             # cX's order before the future one
        "F1,cX,2024-02-10 09:00:00,2,25",             # due on 02-10: two lines...
        "F1,cX,2024-02-10 09:00:00,1,70",
        "F1,cX,2024-02-10 09:00:00,2,25",             # ...and an exact copy of the first
        "CF1,cX,2024-02-10 13:00:00,-1,25",           # cancels a line of F1 by its id
        "CZZ,cX,2024-02-10 14:00:00,-1,70",           # names no order: cX's latest order (F1)
        "F2,cX,2024-03-01 09:00:00,1,99",             # not due yet: stays quarantined
        "Y1,cY,2024-02-10 08:00:00,1,30",             # another due customer, by its order id only
        "N1,cZ,2024-01-15 10:00:00,-5,10",            # negative amount: stays quarantined
    ]
    (folder / "history.csv").write_text("order_id,customer_id,order_ts,quantity,unit_price\n" + "\n".join(rows) + "\n")


def test_a_history_file_read_again_for_due_rows_reads_their_closure_and_ends_as_a_whole_read(spark, storage,
                                                                                           tmp_path, monkeypatch):
    """A file read again only for rows quarantined as future whose day has come is read narrowed: the
    rows of their customers and order ids. That classifies the due rows as reading the whole file
    does (lines grouped, copies dropped, cancellation lines matched by id and by customer), and the
    tables end the same, row numbers included; the few rows read are kept out of the rejected share
    (one of them is still ahead: 1 of 8 rows would reject the run at 5%). An order a later file
    restated keeps the later content, narrowed or whole."""
    from core.storage import Storage
    from pipelines.ingest import runner

    conf = source(grain="line", columns={"order_id": "order_id", "customer_id": "customer_id", "order_ts": "order_ts",
                                         "gross_amount": None, "quantity": "quantity", "unit_price": "unit_price"},
                  cancellation={"style": "negative_lines", "order_id_prefix": "C"})
    key = "spark.sql.files.maxPartitionBytes"
    previous = spark.conf.get(key)
    spark.conf.set(key, "2k")   # the history file in several splits: row numbers across them
    folder = tmp_path / "drop"
    folder.mkdir()
    _history_with_future_lines(folder)
    backend = storage._backend.name
    run = lambda wh, day, run_id: run_ingest(spark, wh, conf, ValidationConf(), "UTC", day,  # noqa: E731
                                             path=str(folder), run_id=run_id)
    tables = {}
    try:
        base = Storage(spark, str(tmp_path / "wh-base"), backend=backend)
        first = run(base, date(2024, 1, 31), "h1")
        assert (first.input_rows, first.quarantined_rows, first.exact_duplicate_rows) == (309, 7, 1)
        (folder / "fix.csv").write_text("order_id,customer_id,order_ts,quantity,unit_price\n"
                                        "X0,cX,2024-01-20 09:00:00,1,45\n")   # X0 restated: 40 -> 45
        assert run(base, date(2024, 2, 5), "h-fix").orders_written == 1
        (folder / "day2.csv").write_text("order_id,customer_id,order_ts,quantity,unit_price\n"
                                         "D1,c1,2024-02-11 10:00:00,1,5\nD2,cX,2024-02-11 11:00:00,1,6\n")
        for narrowed in (True, False):   # the same night on two copies of the warehouse
            shutil.copytree(tmp_path / "wh-base", tmp_path / f"wh-{narrowed}")
            wh = Storage(spark, str(tmp_path / f"wh-{narrowed}"), backend=backend)
            monkeypatch.setattr(runner, "RETRY_CLOSURE_MAX_ROWS", 10_000 if narrowed else 0)
            night = run(wh, date(2024, 2, 11), "h2")
            # F1, Y1 and day 2's D1, D2: X0 as the history states it is older than its restatement
            assert (night.status, night.future_rows_retried, night.orders_written) == ("ok", 5, 4)
            if narrowed:   # the history's rows of cX, cY and order ids F1, CF1, CZZ, Y1 (X0 is cX's) + day 2
                assert (night.input_rows, night.narrowed_files, night.retried_file_rows) == (10, 1, 8)
                assert "8 row(s) of 1 file(s) ingested before" in str(night)
            else:
                assert (night.input_rows, night.narrowed_files) == (311, 0)
            tables[narrowed] = (
                wh.read("orders").drop("ingest_run_id").orderBy("order_id"),
                wh.read("orders_quarantine").drop("ingest_run_id", "run_date").orderBy("source_row"),
                wh.read("ingested_files").select("source_file", "data_rows", "ingest_run_id"))
    finally:
        spark.conf.set(key, previous)
    narrow_orders, narrow_quarantine, narrow_files = tables[True]
    whole_orders, whole_quarantine, whole_files = tables[False]
    f1 = narrow_orders.where("order_id = 'F1'").first()
    assert (f1.gross_amount, f1.cancelled_amount, f1.source_row) == (120.0, 95.0, 122)
    x0 = narrow_orders.where("order_id = 'X0'").first()
    assert (x0.gross_amount, x0.source_file.rsplit("/", 1)[-1]) == (45.0, "fix.csv")
    assert [(r.source_row, r.reason) for r in narrow_quarantine.collect()] == [
        (127, "future_timestamp"), (129, "negative_amount")]
    assert_df_equality(narrow_orders, whole_orders, ignore_nullable=True)
    assert_df_equality(narrow_quarantine, whole_quarantine, ignore_nullable=True)
    assert sorted((r.source_file.rsplit("/", 1)[-1], r.data_rows) for r in narrow_files.collect()) == [
        ("day2.csv", 2), ("fix.csv", 1), ("history.csv", 309)]


def test_status_channel_and_category_values_are_counted_and_new_statuses_reported(spark, storage, tmp_path):
    """Every ingest counts the values of status, channel and category; a status value the conf does
    not name and no earlier ingest saw is a warning (its rows are live orders), or an error."""
    folder = tmp_path / "drop"
    folder.mkdir()
    header = "order_id,customer_id,order_ts,gross_amount,status,channel\n"
    (folder / "day1.csv").write_text(header + "".join(
        f"A{i},C{i % 3},2024-01-0{1 + i % 5} 10:00:00,100,{status},{channel}\n"
        for i, (status, channel) in enumerate([("完了", "web")] * 5 + [("キャンセル", "web"), ("ｷｬﾝｾﾙ", "tel"),
                                               ("取消", None), ("完了", "tel")])).replace(",None", ","))
    conf = source(columns={**ORDER_COLUMNS, "status": "status", "channel": "channel"},
                  cancellation={"style": "status", "cancelled_values": ["キャンセル"]})
    first = run_ingest(spark, storage, conf, ValidationConf(), "UTC", date(2024, 12, 31), path=str(folder), run_id="s1")
    assert first.value_counts == {"status": {"完了": 6, "キャンセル": 1, "ｷｬﾝｾﾙ": 1, "取消": 1},
                                  "channel": {"web": 6, "tel": 2, "(empty)": 1}}
    assert first.unknown_statuses == ("完了", "取消", "ｷｬﾝｾﾙ")   # by rows, then code point
    text = str(first)
    assert "  status values: 完了 6, キャンセル 1, 取消 1, ｷｬﾝｾﾙ 1" in text
    assert "warning: status value(s) '完了', '取消', 'ｷｬﾝｾﾙ' never seen before are counted as live orders" in text
    run = storage.read("ingest_runs").first()
    assert run.status_counts == first.value_counts["status"] and run.category_counts is None

    # seen by an earlier ingest: no longer new; a value never seen stops an ingest set to error
    (folder / "day2.csv").write_text(header + "B1,C1,2024-01-07 10:00:00,100,取消,web\n")
    assert run_ingest(spark, storage, conf, ValidationConf(), "UTC", date(2024, 12, 31), path=str(folder),
                      run_id="s2").unknown_statuses == ()
    (folder / "day3.csv").write_text(header + "B2,C1,2024-01-08 10:00:00,100,返品,web\n")
    strict = ValidationConf(unknown_status="error")
    with pytest.raises(IngestError, match=r"status value\(s\) '返品' \(1 rows\) are in neither "
                                          r"source.cancellation.cancelled_values \['キャンセル'\] nor live_values \[\]"):
        run_ingest(spark, storage, conf, strict, "UTC", date(2024, 12, 31), path=str(folder), run_id="s3")
    assert "B2" not in {r.order_id for r in storage.read("orders").collect()}   # nothing written
    live = conf.model_copy(update={"cancellation": conf.cancellation.model_copy(update={"live_values": ("返品",)})})
    assert run_ingest(spark, storage, live, strict, "UTC", date(2024, 12, 31), path=str(folder),
                      run_id="s4").orders_written == 1


def test_corrected_order_re_dated_into_another_month_is_stored_once(spark, storage, tmp_path):
    """`orders` is partitioned by month: a correction that moves an order to another month
    replaces the stored copy in the old month instead of adding a second one."""
    header = "order_id,customer_id,order_ts,gross_amount\n"
    first = tmp_path / "jan.csv"
    first.write_text(header + "A1,C1,2024-01-31 10:00:00,100\nA2,C2,2024-01-15 11:00:00,200\n"
                              "A3,C3,2024-02-10 09:00:00,300\n")
    run = lambda path, run_id: run_ingest(spark, storage, source(), ValidationConf(), "Asia/Tokyo",  # noqa: E731
                                          date(2024, 12, 31), path=str(path), run_id=run_id)
    run(first, "r1")
    correction = tmp_path / "fix.csv"
    correction.write_text(header + "A1,C1,2024-02-01 10:00:00,120\n")   # re-dated and re-priced
    summary = run(correction, "r2")
    assert (summary.input_rows, summary.orders_written) == (1, 1)
    got = sorted((r.order_id, r.order_month, r.gross_amount) for r in storage.read("orders").collect())
    assert got == [("A1", "2024-02", 120.0), ("A2", "2024-01", 200.0), ("A3", "2024-02", 300.0)]
    # the month it left was rewritten without it, not merely shadowed
    january = storage.read("orders", partitions={"order_month": ["2024-01"]}).collect()
    assert [r.order_id for r in january] == ["A2"]


def test_cp932_japanese_export_with_status_cancellation(spark, storage):
    path = str(DATA / "orders_cp932.csv")
    conf = source(
        csv={"encoding": "cp932"},
        columns={"customer_id": "顧客番号", "order_id": "受注番号", "order_ts": "受注日", "gross_amount": "受注金額",
                 "status": "キャンセル区分", "cancelled_amount": "キャンセル金額", "channel": "媒体",
                 "category": "商品カテゴリ"},
        timestamp_format="yyyy/MM/dd HH:mm:ss", timestamp_formats_extra=["yyyy/MM/dd"],
        cancellation={"style": "status", "cancelled_values": ["キャンセル"]}, extra_columns="keep")

    # Read as UTF-8 the header is garbage: the error names the encoding to try.
    with pytest.raises(IngestError, match="source.csv.encoding: cp932"):
        run_ingest(spark, storage, conf.model_copy(update={"csv": conf.csv.model_copy(update={"encoding": "utf-8"})}),
                   ValidationConf(), "Asia/Tokyo", date(2024, 12, 31), path=path)

    summary = run_ingest(spark, storage, conf, ValidationConf(), "Asia/Tokyo", date(2024, 12, 31), path=path)
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows) == (4, 4, 0)
    assert summary.encoding_suspect_rows == 0
    expected_df = spark.createDataFrame([
        ("J0001", "K001", datetime(2024, 1, 4, 23), date(2024, 1, 5), 1234.0, False, 0.0, 1234.0, "通販カタログ", "食品", {"備考": None}),
        ("J0002", "K001", datetime(2024, 1, 20, 3), date(2024, 1, 20), 5000.0, True, 5000.0, 0.0, "WEB", "化粧品", {"備考": None}),
        ("J0003", "K002", datetime(2024, 1, 31, 15), date(2024, 2, 1), 3000.0, False, 1000.0, 2000.0, "WEB", "食品", {"備考": "一部返品"}),
        ("J0004", "K003", datetime(2024, 2, 2, 1), date(2024, 2, 2), 12345.0, False, 0.0, 12345.0, "LINE", "健康食品", {"備考": "①特記"}),
    ], "order_id string, customer_id string, order_ts timestamp, order_date date, gross_amount double, "
       "is_cancelled boolean, cancelled_amount double, net_amount double, channel string, category string, "
       "extra map<string,string>")
    # maps cannot be sorted, so order both sides by id rather than ignore_row_order
    assert_df_equality(storage.read("orders").select(*expected_df.columns).orderBy("order_id"), expected_df,
                       ignore_nullable=True)


def test_uci_style_cancellation_lines_at_line_grain(spark, storage):
    path = str(DATA / "uci_lines.csv")
    conf = source(
        grain="line",
        columns={"order_id": "InvoiceNo", "customer_id": "CustomerID", "order_ts": "InvoiceDate",
                 "gross_amount": None, "quantity": "Quantity", "unit_price": "UnitPrice",
                 "channel": "Country", "category": "StockCode"},
        timestamp_format="M/d/yyyy H:mm", source_timezone="Europe/London",
        cancellation={"style": "negative_lines", "order_id_prefix": "C"})
    summary = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=0.5), "Europe/London",
                         date(2011, 12, 31), path=path)

    # 10 lines = 4 order lines + 3 cancellation lines applied + 2 quarantined + 1 exact duplicate
    assert (summary.input_rows, summary.accepted_rows, summary.cancellation_lines_applied,
            summary.quarantined_rows, summary.exact_duplicate_rows) == (10, 4, 3, 2, 1)
    assert summary.is_reconciled and summary.orders_accepted == 3 and summary.cancellation_lines_by_heuristic == 1
    assert quarantine_rows(storage) == [(7, "cancellation_without_order"), (9, "negative_amount")]
    expected_df = spark.createDataFrame([
        # two lines; C536365 names it (-2 x 2.55); category of the largest line, channel of the first
        ("536365", "17850", 35.64, 5.10, 30.54, False, "United Kingdom", "71053", 1),
        # C536379 names no order: the customer's latest order at or before it
        ("536366", "17850", 11.10, 5.00, 6.10, False, "United Kingdom", "22633", 3),
        ("536367", "13047", 54.08, 54.08, 0.0, True, "United Kingdom", "84879", 4),
    ], "order_id string, customer_id string, gross_amount double, cancelled_amount double, net_amount double, "
       "is_cancelled boolean, channel string, category string, source_row long")
    assert_approx_df_equality(storage.read("orders").select(*expected_df.columns).orderBy("order_id"),
                              expected_df, precision=1e-9, ignore_nullable=True)


def test_row_numbers_exact_across_files_split_into_partitions(spark, storage, tmp_path):
    folder = tmp_path / "monthly"
    folder.mkdir()
    sizes = {"2024-01.csv": 3000, "2024-02.csv": 7, "2024-03.csv": 0}
    for name, n in sizes.items():
        lines = ["order_id,customer_id,order_ts,gross_amount,expected_row"]
        lines += [f"{name}-{i},c{i % 97},2024-01-{1 + i % 28:02d} 12:00:00,{i},{i}" for i in range(1, n + 1)]
        (folder / name).write_text("\n".join(lines) + "\n")
    key = "spark.sql.files.maxPartitionBytes"
    previous = spark.conf.get(key)
    spark.conf.set(key, "8k")
    try:
        assert spark.read.csv(str(folder)).rdd.getNumPartitions() > 5  # the big file really is split
        summary = run_ingest(spark, storage, source(extra_columns="keep"), ValidationConf(), "Asia/Tokyo",
                             date(2024, 12, 31), path=str(folder))
    finally:
        spark.conf.set(key, previous)
    assert (summary.input_rows, summary.accepted_rows, summary.source_files) == (3007, 3007, 2)
    orders_df = storage.read("orders")
    wrong = orders_df.filter(F.col("source_row") != F.col("extra")["expected_row"].cast("long")).count()
    assert wrong == 0
    assert orders_df.filter(F.col("source_file") == str(folder / "2024-02.csv")).count() == 7


def test_parquet_folder_and_delta_table_sources(spark, storage, tmp_path):
    import pandas as pd
    from deltalake import write_deltalake

    frame = pd.DataFrame({
        # a gap in an integer column makes pandas write floats: 101.0 must still be customer "101"
        "order_id": ["P1", "P2", "P3", "P4"], "customer_id": [101, 101, 102, None],
        "order_ts": pd.to_datetime(["2024-01-05 08:00", "2024-02-01 09:00", "2024-02-03 10:00", "2024-02-04 10:00"]),
        "gross_amount": [100.0, 250.5, -3.0, 10.0]})
    folder = tmp_path / "pq"
    folder.mkdir()
    frame.iloc[:2].to_parquet(folder / "part-a.parquet", index=False)
    frame.iloc[2:].to_parquet(folder / "part-b.parquet", index=False)

    summary = run_ingest(spark, storage, source(format="parquet"), ValidationConf(max_rejected_share=1.0),
                         "Asia/Tokyo", date(2024, 12, 31), path=str(folder))
    assert (summary.accepted_rows, summary.quarantined_rows) == (2, 2)
    assert quarantine_rows(storage) == [(1, "negative_amount"), (2, "missing_customer_id")]
    got = {r.order_id: (r.customer_id, r.order_ts, r.source_row) for r in storage.read("orders").collect()}
    # naive parquet timestamps are wall time in source_timezone (Tokyo, UTC+9)
    assert got == {"P1": ("101", datetime(2024, 1, 4, 23), 1), "P2": ("101", datetime(2024, 2, 1, 0), 2)}

    # The same orders from a Delta table: same content, so nothing is rewritten.
    write_deltalake(str(tmp_path / "delta"), frame.iloc[:2])
    again = run_ingest(spark, storage, source(format="delta"), ValidationConf(), "Asia/Tokyo",
                       date(2024, 12, 31), path=str(tmp_path / "delta"))
    assert (again.input_rows, again.accepted_rows, again.orders_written) == (2, 2, 0)


def test_nanosecond_parquet_timestamps_as_pandas_2_writes_them(spark, storage, tmp_path):
    """pandas 2 writes TIMESTAMP(NANOS), which Spark 4.0 cannot read as a timestamp: naive ones are
    wall time in source_timezone, zoned ones instants; sub-microsecond digits are floored."""
    import pandas as pd
    import pyarrow.parquet as pq

    folder = tmp_path / "ns"
    folder.mkdir()
    naive = pd.DataFrame({"order_id": ["N1", "N2"], "customer_id": ["1", "2"],
                          "order_ts": pd.to_datetime(["2024-01-05 08:00:00.000001999", "2024-02-01 09:00:00.000000000"]),
                          "gross_amount": [100.0, 200.0]})
    naive.to_parquet(folder / "naive.parquet", index=False)
    assert str(pq.read_schema(folder / "naive.parquet").field("order_ts").type) == "timestamp[ns]"
    run_ingest(spark, storage, source(format="parquet"), ValidationConf(), "Asia/Tokyo", date(2024, 12, 31),
               path=str(folder / "naive.parquet"))
    zoned = naive.assign(order_id=["Z1", "Z2"], order_ts=naive.order_ts.dt.tz_localize("UTC"))
    zoned.to_parquet(folder / "zoned.parquet", index=False)
    run_ingest(spark, storage, source(format="parquet"), ValidationConf(), "Asia/Tokyo", date(2024, 12, 31),
               path=str(folder / "zoned.parquet"))
    got = {r.order_id: r.order_ts for r in storage.read("orders").collect()}
    assert got == {"N1": datetime(2024, 1, 4, 23, 0, 0, 1), "N2": datetime(2024, 2, 1, 0),     # Tokyo wall time
                   "Z1": datetime(2024, 1, 5, 8, 0, 0, 1), "Z2": datetime(2024, 2, 1, 9)}      # UTC instants


@pytest.mark.skipif(CDNOW is None, reason="lifetimes' CDNOW sample is not installed")
def test_cdnow_sample_with_the_example_mapping(spark, storage):
    conf = load_config(ROOT / "conf" / "examples" / "cdnow.yaml")
    summary = run_ingest(spark, storage, conf.source, conf.validation, conf.business.timezone,
                         date(1998, 12, 31), path=str(CDNOW))
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows,
            summary.exact_duplicate_rows) == (6919, 6919, 0, 0)
    orders_df = storage.read("orders")
    assert orders_df.count() == 6919
    assert orders_df.select("customer_id").distinct().count() == 2357
    first = orders_df.filter(F.col("order_id") == "CDNOW_sample.txt#1").first()
    assert (first.customer_id, first.order_date, first.gross_amount) == ("00004", date(1997, 1, 1), 29.33)


def test_bad_input_gives_clear_errors_and_writes_nothing(spark, storage, tmp_path):
    conf = source()
    validation = ValidationConf()

    def error(path, conf=conf) -> str:
        with pytest.raises(IngestError) as exc:
            run_ingest(spark, storage, conf, validation, "Asia/Tokyo", date(2024, 12, 31), path=str(path))
        return str(exc.value)

    assert "does not exist" in error(tmp_path / "nope.csv") and "nope.csv" in error(tmp_path / "nope.csv")
    assert "no file matches" in error(tmp_path / "none" / "*.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "empty" in error(tmp_path / "empty.csv")
    (tmp_path / "header_only.csv").write_text("order_id,customer_id,order_ts,gross_amount\n")
    assert "no data rows" in error(tmp_path / "header_only.csv")

    (tmp_path / "wrong.csv").write_text("order_no,customer,order_ts,gross_amount\nA1,C1,2024-01-01 00:00:00,1\n")
    message = error(tmp_path / "wrong.csv")
    assert "'order_id' (source.columns.order_id)" in message and "'customer_id' (source.columns.customer_id)" in message
    assert "columns found: 'order_no', 'customer', 'order_ts', 'gross_amount'" in message
    assert "'order_no'" in message.split("did you mean")[1]  # the close match is offered

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.csv").write_text("order_id,customer_id,order_ts,gross_amount\nA1,C1,2024-01-01 00:00:00,1\n")
    (mixed / "b.csv").write_text("order_id,gross_amount,order_ts,customer_id\nA2,2,2024-01-01 00:00:00,C2\n")
    assert "different header" in error(mixed)

    assert "source.csv.encoding" in error(tmp_path / "wrong.csv", source(csv={"encoding": "latin-99"}))
    # a mapping that cannot work is refused when the config is read, before any file (test_config.py)
    with pytest.raises(ValueError, match=r"map columns\.gross_amount, or both columns\.quantity"):
        source(columns={"customer_id": "customer", "order_ts": "order_ts", "gross_amount": None})
    assert not storage.exists("ingest_runs") and not storage.exists("orders")


MALFORMED_DETAIL = " (an unquoted delimiter or a cut line?); fix the export or quote the field"


def test_rows_with_more_or_fewer_fields_than_the_header_are_quarantined_with_their_line(spark, storage, tmp_path):
    """A shifted row (a delimiter inside a value, a cut line) is `malformed_row`, whatever its
    other fields say, and keeps its line; it is no duplicate of a good row of the same id."""
    path = tmp_path / "orders.csv"
    path.write_text(
        "order_id,customer_id,order_ts,gross_amount,category\n"
        "A1,C1,2024-01-05 10:00:00,100,home\n"
        "A2,C1,2024-01-06 10:00:00,200,home,garden\n"             # 6 fields: an unquoted comma
        "A3,C2,2024-01-07 10:00:00\n"                             # 3 fields: a cut line
        'A4,C2,2024-01-08 10:00:00,400,"home,garden"\n'          # quoted: well-formed
        "A5,C3,2024-01-09 10:00:00,500,\n"                        # empty last field: well-formed
        "A1,C1,2024-01-05 10:00:00,100,home,\n"                   # a copy of A1 with a trailing comma
        "A6,,,,,,,\n")                                            # 8 fields, and no customer either
    summary = run_ingest(spark, storage, source(extra_columns="keep"), ValidationConf(max_rejected_share=1.0),
                         "Asia/Tokyo", date(2024, 12, 31), path=str(path), run_id="m1")

    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows,
            summary.exact_duplicate_rows) == (7, 3, 4, 0)
    assert summary.is_reconciled
    assert ("input rows 7 from 1 file(s) = accepted order rows 3 + cancellation lines applied 0 "
            "+ quarantined 4 + exact duplicates dropped 0") in str(summary)
    assert summary.reason_counts == {"malformed_row": 4}
    assert quarantine_rows(storage) == [(2, "malformed_row"), (3, "malformed_row"), (6, "malformed_row"),
                                        (7, "malformed_row")]
    q = {r.source_row: r for r in storage.read("orders_quarantine").collect()}
    assert q[2].detail == "row has 6 fields, the header has 5" + MALFORMED_DETAIL
    assert q[3].detail == "row has 3 fields, the header has 5" + MALFORMED_DETAIL
    assert q[7].detail == "row has 8 fields, the header has 5" + MALFORMED_DETAIL
    # the fields as Spark split them, and the whole line
    assert q[2].raw == {"order_id": "A2", "customer_id": "C1", "order_ts": "2024-01-06 10:00:00",
                        "gross_amount": "200", "category": "home",
                        "_line": "A2,C1,2024-01-06 10:00:00,200,home,garden"}
    assert q[3].raw == {"order_id": "A3", "customer_id": "C2", "order_ts": "2024-01-07 10:00:00",
                        "gross_amount": None, "category": None, "_line": "A3,C2,2024-01-07 10:00:00"}
    assert q[3].reasons == ["malformed_row", "missing_amount"] and q[3].order_id == "A3"
    assert q[7].reasons == ["malformed_row", "missing_customer_id", "unparsable_timestamp", "missing_amount"]
    got = {r.order_id: (r.source_row, r.gross_amount, r.extra) for r in storage.read("orders").collect()}
    assert got == {"A1": (1, 100.0, {"category": "home"}), "A4": (4, 400.0, {"category": "home,garden"}),
                   "A5": (5, 500.0, {"category": None})}


def test_malformed_rows_without_header_or_order_id_and_in_whitespace_exports(spark, storage, tmp_path):
    """column_names instead of a header, derived order ids, and the whitespace (CDNOW) reader,
    where a line with more or fewer words than column_names is malformed."""
    columns = {"customer_id": "customer_id", "order_ts": "order_ts", "gross_amount": "gross_amount"}
    names = ["customer_id", "order_ts", "gross_amount"]
    (tmp_path / "plain.csv").write_text("C1,2024-01-05,100\nC2,2024-01-06,200,7\nC3,2024-01-07\nC4,2024-01-08,400\n")
    conf = source(csv={"header": False, "column_names": names}, columns=columns, timestamp_format="yyyy-MM-dd")
    summary = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=1.0), "UTC",
                         date(2024, 12, 31), path=str(tmp_path / "plain.csv"))
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows) == (4, 2, 2)
    q = {r.source_row: r for r in storage.read("orders_quarantine").collect()}
    assert {n: (r.reason, r.order_id, r.raw["_line"]) for n, r in q.items()} == {
        2: ("malformed_row", "plain.csv#2", "C2,2024-01-06,200,7"),
        3: ("malformed_row", "plain.csv#3", "C3,2024-01-07")}
    assert q[2].detail == "row has 4 fields, source.csv.column_names has 3" + MALFORMED_DETAIL

    (tmp_path / "blanks.txt").write_text("  C1 20240105   100\n  C2 20240106 Blue Ray 200\n  C3 20240107\n"
                                         "  C4 20240108 400\n")
    conf = source(csv={"header": False, "delimiter": "whitespace", "column_names": names}, columns=columns,
                  timestamp_format="yyyyMMdd")
    summary = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=1.0), "UTC",
                         date(2024, 12, 31), path=str(tmp_path / "blanks.txt"))
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows) == (4, 2, 2)
    assert summary.is_reconciled
    q = {r.source_row: r for r in storage.read("orders_quarantine").collect() if r.source_file.endswith(".txt")}
    assert {n: (r.reason, r.detail, r.raw["_line"]) for n, r in q.items()} == {
        2: ("malformed_row", "row has 5 fields, source.csv.column_names has 3" + MALFORMED_DETAIL,
            "  C2 20240106 Blue Ray 200"),
        3: ("malformed_row", "row has 2 fields, source.csv.column_names has 3" + MALFORMED_DETAIL, "  C3 20240107")}


def test_well_formed_files_have_no_malformed_rows(spark, storage, tmp_path):
    """Quoted delimiters, empty fields and a folder of files with the same header: nothing is
    malformed, everything is accepted, and a different header is still refused."""
    folder = tmp_path / "drop"
    folder.mkdir()
    header = "order_id,customer_id,order_ts,gross_amount,note\n"
    (folder / "a.csv").write_text(header + 'A1,C1,2024-01-05 10:00:00,"1,200","a, b"\n'
                                           "A2,C2,2024-01-06 10:00:00,200,\n"
                                           ',,,,\n'                                        # all empty
                                           'A3,C3,2024-01-07 10:00:00,300,"12"" LP, mint"\n')   # RFC 4180 quote
    (folder / "b.csv").write_text(header + "A4,C4,2024-01-08 10:00:00,400,ok\n")
    summary = run_ingest(spark, storage, source(), ValidationConf(max_rejected_share=1.0), "Asia/Tokyo",
                         date(2024, 12, 31), path=str(folder))
    assert (summary.input_rows, summary.accepted_rows, summary.quarantined_rows) == (5, 4, 1)
    assert summary.is_reconciled and summary.reason_counts == {"missing_order_id": 1}
    assert sorted(r.order_id for r in storage.read("orders").collect()) == ["A1", "A2", "A3", "A4"]

    # backslash-escaped quotes are read with source.csv.escape set to a backslash
    backslashed = tmp_path / "backslashed.csv"
    backslashed.write_text(header + 'B1,C1,2024-01-05 10:00:00,100,"12\\" LP, mint"\n')
    conf = source(extra_columns="keep", new_files_only=False)
    as_rfc = run_ingest(spark, storage, conf, ValidationConf(max_rejected_share=1.0), "Asia/Tokyo",
                        date(2024, 12, 31), path=str(backslashed))
    assert as_rfc.reason_counts == {"malformed_row": 1}   # with the default escape the quote ends the value
    conf = conf.model_copy(update={"csv": conf.csv.model_copy(update={"escape": "\\"})})
    as_backslash = run_ingest(spark, storage, conf, ValidationConf(), "Asia/Tokyo", date(2024, 12, 31),
                              path=str(backslashed))
    assert (as_backslash.accepted_rows, as_backslash.quarantined_rows) == (1, 0)
    notes = {r.order_id: r.extra["note"] for r in storage.read("orders").collect() if r.extra}
    assert notes == {"B1": '12" LP, mint'}

    (folder / "c.csv").write_text("order_id,gross_amount,customer_id,order_ts,note\nA5,1,C5,2024-01-09 10:00:00,x\n")
    with pytest.raises(IngestError, match="different header"):   # all three files read together
        run_ingest(spark, storage, source(new_files_only=False), ValidationConf(), "Asia/Tokyo",
                   date(2024, 12, 31), path=str(folder))
