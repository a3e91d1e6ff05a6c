"""Storage: the contract both backends keep (partitions, versions, merge, appends since a
version, crash safety, schema contract), each test on delta-spark and on deltalake; and tables
written by one backend read by the other."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F
from chispa import assert_df_equality
from deltalake import DeltaTable

from core import storage as storage_module
from core.storage import Storage, StorageError
from core.tables import SchemaContractError
from core.tables import ORDERS_QUARANTINE

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)

D1, D2 = dt.date(2024, 1, 31), dt.date(2024, 2, 29)


def _quarantine_df(spark, rows):
    return spark.createDataFrame(
        [(f, r, reason, [reason], None, None, None, {"col": "v"}, "run-1", D1, None) for f, r, reason in rows],
        ORDERS_QUARANTINE.schema)


def _orders_df(spark, rows):
    """rows: (order_id, customer_id, yyyy-mm-dd, gross)."""
    from pyspark.sql import functions as F

    from core.tables import ORDERS

    df = spark.createDataFrame(rows, "order_id string, customer_id string, d string, gross double")
    return df.select(
        "order_id", "customer_id",
        F.to_timestamp("d").alias("order_ts"), F.to_date("d").alias("order_date"),
        F.col("gross").alias("gross_amount"), F.lit(False).alias("is_cancelled"),
        F.lit(0.0).alias("cancelled_amount"), F.col("gross").alias("net_amount"),
        F.lit("web").alias("channel"), F.lit(None).cast("string").alias("category"),
        F.lit("JPY").alias("currency"), F.lit(None).cast("map<string,string>").alias("extra"),
        F.lit("f.csv").alias("source_file"), F.lit(1).cast("long").alias("source_row"),
        F.lit("run").alias("ingest_run_id"), F.date_format("d", "yyyy-MM").alias("order_month"),
    ).select(*ORDERS.columns)


def test_replace_partition_leaves_other_partitions_intact_and_old_versions_readable(spark, any_storage):
    any_storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0), ("o2", "c1", "2024-02-05", 20.0),
                                                ("o3", "c2", "2024-03-05", 30.0)]))
    any_storage.replace_partitions("orders", _orders_df(spark, [("o4", "c3", "2024-02-10", 40.0),
                                                            ("o5", "c3", "2024-02-11", 50.0)]))
    now = {r.order_id: r.order_month for r in any_storage.read("orders").collect()}
    assert now == {"o1": "2024-01", "o4": "2024-02", "o5": "2024-02", "o3": "2024-03"}
    # version 0 is the table as first written
    assert sorted(r.order_id for r in any_storage.read("orders", version=0).collect()) == ["o1", "o2", "o3"]
    assert any_storage.version("orders") == 1
    # a partition named explicitly with no rows is emptied
    any_storage.replace_partitions("orders", spark.createDataFrame([], any_storage.read("orders").schema),
                               partitions={"order_month": ["2024-03"]})
    assert sorted(r.order_id for r in any_storage.read("orders").collect()) == ["o1", "o4", "o5"]
    history = any_storage.history("orders")
    assert [h["version"] for h in history][:3] == [2, 1, 0]


def test_replace_partitions_below_empties_the_lower_years_in_the_same_commit(spark, any_storage):
    """``below`` (a trend table's years that left its window): every partition under the number is
    emptied with those written, in one commit; the partitions between are left as they were."""
    from core.tables import TREND_YEARLY

    def years_df(years, net):
        return spark.createDataFrame([(y, 1, 0, 0.0, 0.0, net, 1, False, dt.date(y, 12, 31)) for y in years],
                                     TREND_YEARLY.schema)

    any_storage.overwrite("trend_yearly", years_df([2019, 2020, 2021, 2022], 1.0))
    before = any_storage.version("trend_yearly")
    any_storage.replace_partitions("trend_yearly", years_df([2023], 2.0), partitions={"year": [2022, 2023]},
                                   below={"year": 2021})
    assert {r.year: r.net for r in any_storage.read("trend_yearly").collect()} == {2021: 1.0, 2023: 2.0}
    assert any_storage.version("trend_yearly") == before + 1
    with pytest.raises(StorageError, match="needs the partitions written named"):
        any_storage.replace_partitions("trend_yearly", years_df([2023], 3.0), below={"year": 2021})


def test_merge_upserts_by_key_and_is_idempotent(spark, any_storage):
    # the table by name or by its declaration: the same table
    any_storage.merge("orders_quarantine", _quarantine_df(spark, [("a.csv", 1, "x"), ("a.csv", 2, "y")]))
    any_storage.merge(ORDERS_QUARANTINE, _quarantine_df(spark, [("a.csv", 2, "z"), ("b.csv", 1, "x")]))
    any_storage.merge("orders_quarantine", _quarantine_df(spark, [("a.csv", 2, "z"), ("b.csv", 1, "x")]))
    assert any_storage.version(ORDERS_QUARANTINE) == any_storage.version("orders_quarantine") == 2
    assert any_storage.path(ORDERS_QUARANTINE) == any_storage.path("orders_quarantine")
    got = any_storage.read(ORDERS_QUARANTINE).select("source_file", "source_row", "reason")
    expected = spark.createDataFrame([("a.csv", 1, "x"), ("a.csv", 2, "z"), ("b.csv", 1, "x")],
                                     "source_file string, source_row long, reason string")
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_partitioned_merge_rewrites_only_touched_partitions(spark, any_storage):
    any_storage.merge("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0), ("o2", "c1", "2024-02-05", 20.0)]))
    files_before = set(DeltaTable(any_storage.path("orders")).file_uris())
    any_storage.merge("orders", _orders_df(spark, [("o2", "c1", "2024-02-05", 25.0), ("o3", "c9", "2024-02-07", 5.0)]))
    files_after = set(DeltaTable(any_storage.path("orders")).file_uris())
    january = {f for f in files_before if "2024-01" in f}
    assert january and january <= files_after, "the untouched January partition must keep its files"
    got = {r.order_id: r.gross_amount for r in any_storage.read("orders").collect()}
    assert got == {"o1": 10.0, "o2": 25.0, "o3": 5.0}


def test_write_killed_before_commit_leaves_previous_version(spark, warehouse, monkeypatch):
    storage = Storage(spark, str(warehouse), backend="deltalake")   # its commit is a separate step
    storage.merge("orders_quarantine", _quarantine_df(spark, [("a.csv", 1, "x")]))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the data files were written, before the commit")

    monkeypatch.setattr(storage_module._DeltaRsBackend, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.append("orders_quarantine", _quarantine_df(spark, [("b.csv", 1, "y"), ("b.csv", 2, "y")]))
    monkeypatch.undo()
    assert storage.version("orders_quarantine") == 0
    assert [(r.source_file, r.source_row) for r in storage.read("orders_quarantine").collect()] == [("a.csv", 1)]
    # the table is still writable afterwards
    storage.append("orders_quarantine", _quarantine_df(spark, [("c.csv", 1, "z")]))
    assert storage.read("orders_quarantine").count() == 2


def test_schema_contract_names_missing_and_extra_columns(spark, any_storage):
    df = _quarantine_df(spark, [("a.csv", 1, "x")]).drop("reason").withColumnRenamed("detail", "details")
    with pytest.raises(SchemaContractError, match=r"missing columns \['reason', 'detail'\].*unexpected columns \['details'\]"):
        any_storage.append("orders_quarantine", df)


def test_a_table_from_an_earlier_release_gains_the_nullable_columns_declared_since(spark, any_storage, monkeypatch):
    """A warehouse created before orders_quarantine had order_date: the first write adds the column
    (old rows read null, also at their old version); a missing required column is refused."""
    from dataclasses import replace

    from pyspark.sql import types as T

    old_spec = replace(ORDERS_QUARANTINE, schema=T.StructType(
        [f for f in ORDERS_QUARANTINE.schema.fields if f.name != "order_date"]))
    path = any_storage.path("orders_quarantine")
    old_rows = _quarantine_df(spark, [("a.csv", 1, "missing_amount")]).drop("order_date")
    any_storage._backend.write(old_rows, path, old_spec, "append", None)
    assert "order_date" not in any_storage._backend.columns(path)

    new_rows = spark.createDataFrame([("b.csv", 7, "future_timestamp", ["future_timestamp"], None, None, None,
                                       {"col": "v"}, "run-2", D2, D2)], ORDERS_QUARANTINE.schema)
    any_storage.append("orders_quarantine", new_rows)
    assert any_storage._backend.columns(path)[-1] == "order_date"
    assert sorted((r.source_file, r.order_date) for r in any_storage.read("orders_quarantine").collect()) == [
        ("a.csv", None), ("b.csv", D2)]
    assert [(r.source_file, r.order_date) for r in any_storage.read("orders_quarantine", version=0).collect()] == [
        ("a.csv", None)]

    fresh = Storage(spark, any_storage.warehouse, backend=any_storage.backend)   # another process, same table
    required = replace(ORDERS_QUARANTINE, schema=T.StructType(
        [*ORDERS_QUARANTINE.schema.fields, T.StructField("must_have", T.StringType(), False)]))
    original = storage_module.table_spec
    monkeypatch.setattr(storage_module, "table_spec",
                        lambda name: required if name == "orders_quarantine" else original(name))
    with pytest.raises(StorageError, match=r"has no column\(s\) \['must_have'\]"):
        fresh.append("orders_quarantine", new_rows.withColumn("must_have", F.lit("x")))


def test_reading_a_table_that_does_not_exist_says_what_to_run(any_storage):
    with pytest.raises(StorageError, match="does not exist yet"):
        any_storage.read("customer_features")
    with pytest.raises(KeyError, match="unknown table"):
        any_storage.path("no_such_table")


def test_a_table_seen_to_exist_is_not_asked_again_and_a_missing_one_always_is(spark, any_storage, monkeypatch):
    """Each backend check is a HEAD and a LIST on S3: once a table is seen, reads, writes and the
    night's bookkeeping stop asking; a table not there yet is asked every time, so one written by
    another process (another Storage on the same warehouse) is found."""
    asked = []
    backend_exists = type(any_storage._backend).exists
    monkeypatch.setattr(type(any_storage._backend), "exists", lambda self, path: asked.append(path) or
                        backend_exists(self, path))
    assert not any_storage.exists("orders") and not any_storage.exists("orders")
    assert len(asked) == 2
    other = Storage(spark, any_storage.warehouse, backend=any_storage.backend)
    other.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0)]))
    asked.clear()
    assert any_storage.exists("orders")
    assert any_storage.exists("orders") and any_storage.read("orders").count() == 1
    assert any_storage.version("orders") == 0
    assert len(asked) == 1                    # only the first answer came from the backend
    any_storage.append("orders", _orders_df(spark, [("o2", "c1", "2024-01-09", 20.0)]))
    assert any_storage.read("orders").count() == 2 and other.read("orders").count() == 2


def test_tables_are_plain_delta_readable_without_spark(spark, any_storage):
    any_storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0)]))
    table = DeltaTable(any_storage.path("orders")).to_pyarrow_table()
    assert table.num_rows == 1
    assert table.column("order_id").to_pylist() == ["o1"]
    assert str(table.schema.field("order_ts").type) == "timestamp[us, tz=UTC]"


def test_partition_pruned_read_and_rows_appended_since_a_version(spark, any_storage):
    any_storage.append("orders", _orders_df(spark, [("O1", "C1", "2024-01-05", 10.0), ("O2", "C2", "2024-02-05", 20.0)]))
    first = any_storage.version("orders")
    january = any_storage.read("orders", partitions={"order_month": ["2024-01"]})
    assert [r.order_id for r in january.collect()] == ["O1"]
    with pytest.raises(StorageError, match="not partitioned by \\['order_date'\\]"):
        any_storage.read("orders", partitions={"order_date": ["2024-01-05"]})

    assert any_storage.appended_since("orders", first).count() == 0
    any_storage.append("orders", _orders_df(spark, [("O3", "C3", "2024-02-07", 30.0)]))
    assert [r.order_id for r in any_storage.appended_since("orders", first).collect()] == ["O3"]
    # a merge rewrites a month: the rows "appended since" are no longer all that changed
    any_storage.merge("orders", _orders_df(spark, [("O2", "C2", "2024-02-05", 25.0)]))
    assert any_storage.appended_since("orders", first) is None
    assert any_storage.appended_since("orders", any_storage.version("orders") + 1) is None


def test_a_write_whose_job_fails_leaves_the_previous_version(spark, any_storage):
    """A task dies while the data files are written (a lost executor, a bad row): nothing commits."""
    from pyspark.sql import functions as F

    any_storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0)]))
    failing = _orders_df(spark, [("o2", "c2", "2024-01-06", 20.0), ("o3", "c3", "2024-02-06", 30.0)]).withColumn(
        "gross_amount", F.when(F.col("order_id") == "o3", F.raise_error(F.lit("task killed"))).otherwise(F.col("gross_amount")))
    with pytest.raises(Exception, match="task killed"):
        any_storage.append("orders", failing)
    assert any_storage.version("orders") == 0
    assert [r.order_id for r in any_storage.read("orders").collect()] == ["o1"]
    assert DeltaTable(any_storage.path("orders")).to_pyarrow_table().num_rows == 1


@pytest.mark.parametrize("writer,reader", [("delta-spark", "deltalake"), ("deltalake", "delta-spark")])
def test_a_table_written_by_one_backend_is_read_by_the_other(spark, warehouse, writer, reader):
    """Clients inspect warehouses with delta-rs, DuckDB or Polars; a warehouse may change backend."""
    written, read = Storage(spark, str(warehouse), writer), Storage(spark, str(warehouse), reader)
    written.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0), ("o2", "c2", "2024-02-05", 20.0)]))
    written.merge("orders", _orders_df(spark, [("o2", "c2", "2024-02-05", 25.0), ("o3", "c3", "2024-03-01", 5.0)]))
    written.replace_partitions("orders", _orders_df(spark, [("o4", "c4", "2024-01-20", 40.0)]))
    # the engine's VACUUM with zero retention (only in tests: concurrent readers of old versions would
    # break): the replaced files leave the folder, and the other backend reads what stays
    assert written.vacuum("orders", retention_hours=0)
    expected = {"o2": 25.0, "o3": 5.0, "o4": 40.0}
    assert {r.order_id: r.gross_amount for r in read.read("orders").collect()} == expected
    assert {r.order_id: r.gross_amount for r in read.read("orders", partitions={"order_month": ["2024-01"]}).collect()} \
        == {"o4": 40.0}
    assert read.version("orders") == written.version("orders")          # VACUUM commits too
    # and the reader can write on: the other backend's log is its own
    read.merge("orders", _orders_df(spark, [("o3", "c3", "2024-03-01", 6.0)]))
    assert {r.order_id: r.gross_amount for r in written.read("orders").collect()} == {**expected, "o3": 6.0}


def test_delta_spark_reads_versions_and_appends_from_its_log_without_spark_jobs(spark, warehouse):
    """The driver-side log reads give what the public history (a Spark job each) gives."""
    storage = Storage(spark, str(warehouse), "delta-spark")
    backend, path = storage._backend, storage.path("orders")   # noqa: SLF001 - the backend under test
    storage.append("orders", _orders_df(spark, [("O1", "C1", "2024-01-05", 10.0)]))
    storage.append("orders", _orders_df(spark, [("O2", "C2", "2024-02-05", 20.0), ("O3", "C3", "2024-03-05", 1.0)]))
    tracker = spark.sparkContext.statusTracker()
    jobs_before = len(tracker.getJobIdsForGroup())
    from_log = backend._files_appended_from_log(path, 0)                          # noqa: SLF001
    assert backend.version(path) == 1 and len(tracker.getJobIdsForGroup()) == jobs_before
    from_history = backend._files_appended_from_history(path, 0)                  # noqa: SLF001
    assert sorted(f.removeprefix("file:") for f in from_log) == sorted(f.removeprefix("file:") for f in from_history)
    assert len(from_log) == 2
    storage.merge("orders", _orders_df(spark, [("O2", "C2", "2024-02-05", 25.0)]))
    assert backend._files_appended_from_log(path, 0) is None                      # noqa: SLF001


def _stats_columns_of_adds(backend: str, spark, path: str) -> set[str]:
    """The columns with min/max statistics in the table's add actions (every file's)."""
    if backend == "deltalake":
        import pyarrow as pa

        adds = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
        return {k.split(".", 1)[1] for a in adds for k, v in a.items() if k.startswith("min.") and v is not None}
    import json
    from pathlib import Path

    columns = set()
    for commit in sorted(Path(path, "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            add = json.loads(line).get("add")
            if add and add.get("stats"):
                columns |= set(json.loads(add["stats"]).get("minValues", {}))
    return columns


def test_tables_keep_statistics_on_their_key_and_filter_columns_only(spark, any_storage):
    from core.tables import ORDERS, STATS_COLUMNS_PROPERTY

    assert ORDERS.stats_columns == ("order_id", "order_date", "customer_id")
    any_storage.append("orders", _orders_df(spark, [("o1", "c1", "2024-01-05", 10.0), ("o2", "c2", "2024-02-05", 20.0)]))
    any_storage.append("orders", _orders_df(spark, [("o3", "c1", "2024-02-06", 30.0)]))
    path = any_storage.path("orders")
    assert any_storage._backend.properties(path)[STATS_COLUMNS_PROPERTY] == "order_id,order_date,customer_id"
    # delta-spark writes min/max of those columns only (not gross_amount, source_row, ...);
    # the deltalake backend writes record counts only
    expected = set() if any_storage.backend == "deltalake" else {"order_id", "order_date", "customer_id"}
    assert _stats_columns_of_adds(any_storage.backend, spark, path) == expected
    assert any_storage.ensure_properties("orders") == {}       # nothing to set: no commit
    assert any_storage.version("orders") == 1
    # a filter on a column with statistics still reads the right rows
    assert [r.order_id for r in any_storage.read("orders").where(F.col("order_date") > dt.date(2024, 2, 5)).collect()] == ["o3"]


def test_maintenance_gives_tables_of_an_earlier_release_the_statistics_property(spark, warehouse):
    """A table created without the property (an earlier release) gets it from maintenance; the
    files written after that carry the reduced statistics."""
    from core.config import RetentionConf
    from core.tables import CUSTOMER_SCORES, STATS_COLUMNS_PROPERTY
    from pipelines.maintenance import run_maintenance

    storage = Storage(spark, str(warehouse), backend="delta-spark")
    path = storage.path(CUSTOMER_SCORES.name)
    rows = spark.createDataFrame([], CUSTOMER_SCORES.stored_schema)
    rows.write.format("delta").partitionBy("as_of_date").save(path)       # as an earlier release did
    assert STATS_COLUMNS_PROPERTY not in storage._backend.properties(path)
    run_maintenance(storage, D1, RetentionConf(), retention_hours=168, tables=[CUSTOMER_SCORES.name])
    assert storage._backend.properties(path)[STATS_COLUMNS_PROPERTY] == "customer_id"
    assert storage.ensure_properties(CUSTOMER_SCORES.name) == {}
