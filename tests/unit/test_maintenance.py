"""Table maintenance (`cvseg maintain`, pipelines/maintenance.py) on both storage backends: compaction
keeps the number of files bounded, retention prunes old dated partitions (never the latest, never
other tables), VACUUM removes replaced files only past the retention, a dry run changes nothing, the
nightly step runs on its cadence, and a reader of a pruned date names the retention setting."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from pyspark.sql import types as T

from core.config import dump_config, load_config
from core.storage import Storage
from core.tables import (CALIBRATION_HOLDOUT, CUSTOMER_FEATURES, CUSTOMER_SCORES, MODEL_BACKTEST, ORDERS,
                         PIPELINE_RUNS, SEGMENT_GENERATIONS, SEGMENTS_HISTORY, TREND_YEARLY, TableSpec)
from pipelines.maintenance import (PrunedPartitionError, ensure_not_pruned, maintenance_skip_reason,
                                   partitions_to_prune, run_maintenance)

pytestmark = pytest.mark.slow   # minutes: started first (tests/conftest.py)

D = dt.date(2026, 10, 15)


def _config(storage: Storage, *overrides: str):
    return load_config(None, [f"storage.warehouse={storage.warehouse}", f"storage.backend={storage.backend}",
                              "spark.master=null", *overrides])


def _maintain(storage: Storage, config, day: dt.date, **kwargs):
    return run_maintenance(storage, day, config.retention, config.storage.retention_hours, **kwargs)


def _default(dtype: T.DataType, day: dt.date):
    if isinstance(dtype, T.StringType):
        return "x"
    if isinstance(dtype, (T.LongType, T.IntegerType)):
        return 1
    if isinstance(dtype, T.DoubleType):
        return 1.0
    if isinstance(dtype, T.BooleanType):
        return False
    if isinstance(dtype, T.DateType):
        return day
    if isinstance(dtype, T.TimestampType):
        return dt.datetime.combine(day, dt.time(12), tzinfo=dt.timezone.utc)
    if isinstance(dtype, T.ArrayType):
        return []
    if isinstance(dtype, T.MapType):
        return {}
    raise AssertionError(dtype)


def _rows(spark, spec: TableSpec, rows: list[dict], day: dt.date = D):
    """A DataFrame of ``spec`` with the given columns set and every other column a default."""
    data = [tuple(r.get(f.name, _default(f.dataType, day)) for f in spec.schema.fields) for r in rows]
    return spark.createDataFrame(data, spec.schema)


def _night_orders(spark, day: dt.date, n: int = 3):
    return _rows(spark, ORDERS, [
        {"order_id": f"{day}-{i}", "customer_id": f"c{i}", "order_date": day, "order_month": f"{day:%Y-%m}",
         "gross_amount": float(i + 1), "net_amount": float(i + 1), "extra": {"k": str(i)}}
        for i in range(n)], day)   # in 2 slices (spark.default.parallelism): two files a night


def _content(storage: Storage, name: str) -> list[tuple]:
    """The latest version's rows, sorted (collected: delta-spark answers count() from its log)."""
    return sorted(tuple(r) for r in storage.read(name).collect())


def _data_files_on_disk(storage: Storage, name: str) -> list[Path]:
    root = Path(storage.path(name))
    return [p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts]


def _everything_on_disk(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def step_storage(spark, warehouse):
    """deltalake, the faster backend here (delta-spark's VACUUM alone is ~3-10 s per table): for the
    tests of what maintenance decides; the backend operations are tested on both below."""
    return Storage(spark, str(warehouse), backend="deltalake")


# --------------------------------------------------------------------------------------------
# Decisions (no Spark)
# --------------------------------------------------------------------------------------------
def test_retention_prunes_strictly_older_partitions_and_never_the_latest():
    values = ["2025-01-01", "2025-09-09", "2025-09-10", "2026-10-14", "2026-10-15"]
    # as of 2026-10-15, 400 days back is 2025-09-10: that day stays, older days go
    assert partitions_to_prune(values, D, 400) == ["2025-01-01", "2025-09-09"]
    assert partitions_to_prune(values, D, None) == []
    assert partitions_to_prune(["2024-01-01", "2024-06-01"], D, 30) == ["2024-01-01"]   # the latest stays
    assert partitions_to_prune(["2024-01-01"], D, 1) == []
    assert partitions_to_prune([], D, 1) == []


def test_nightly_maintenance_is_due_every_n_days_of_as_of_dates():
    assert maintenance_skip_reason(None, D, 7) is None                            # never maintained
    # never maintained: not on a first load, but once the first night is every_days old
    first_night = maintenance_skip_reason(None, D, 7, first_run=D)
    assert first_night and "the first maintenance comes 7 day(s) after the first night (2026-10-15" in first_night
    assert maintenance_skip_reason(None, D, 7, first_run=D - dt.timedelta(days=7)) is None
    assert maintenance_skip_reason(D - dt.timedelta(days=7), D, 7) is None
    reason = maintenance_skip_reason(D - dt.timedelta(days=6), D, 7)
    assert reason and "last maintained as of 2026-10-09, 6 day(s) before 2026-10-15" in reason
    assert "maintenance.every_days=7" in reason
    assert maintenance_skip_reason(D + dt.timedelta(days=3), D, 7)               # a backfill of an earlier night
    assert "every_days=0" in maintenance_skip_reason(None, D, 0)
    assert maintenance_skip_reason(D - dt.timedelta(days=1), D, 1) is None


# --------------------------------------------------------------------------------------------
# Both backends
# --------------------------------------------------------------------------------------------
def test_thirty_nights_then_maintenance_bounds_files_and_keeps_time_travel_within_retention(spark, any_storage):
    """Thirty nights of appends across two months, maintained after night 15 (storage.retention_hours
    168) and night 30 (0, as if the week had passed): right after each maintenance `orders` has one
    file per month and reads the same rows; older versions stay readable within the retention and
    their replaced files leave the disk beyond it."""
    storage = any_storage
    first_night = dt.date(2026, 9, 16)
    since_maintained = 0
    for night in range(30):
        day = first_night + dt.timedelta(days=night)
        storage.append("orders", _night_orders(spark, day))
        since_maintained += 1
        if night == 1:
            early_version, early = storage.version("orders"), _content(storage, "orders")
        if night in (14, 29):
            files_before, _ = storage.file_stats("orders")
            assert files_before >= since_maintained          # a night adds files: without maintenance they pile up
            content = _content(storage, "orders")
            config = _config(storage, *(["storage.retention_hours=0"] if night == 29 else []))
            summary = _maintain(storage, config, day, tables=["orders"])
            months = len(storage.partition_values("orders"))
            orders = summary.table("orders")
            assert orders.files_before == files_before and orders.files_compacted >= 2 * since_maintained
            assert orders.files_after == storage.file_stats("orders")[0] <= months
            assert _content(storage, "orders") == content   # the latest version reads the same rows
            since_maintained = 0
        if night == 14:   # within the retention: nothing vacuumed, the early version reads as it did
            assert orders.files_vacuumed == 0 and len(_data_files_on_disk(storage, "orders")) > files_before
            assert sorted(tuple(r) for r in storage.read("orders", version=early_version).collect()) == early
    assert months == 2 and len(_content(storage, "orders")) == 90
    # beyond the retention: only the files the latest version reads are left on disk
    assert orders.files_vacuumed >= 30 and orders.bytes_after < orders.bytes_before
    assert len(_data_files_on_disk(storage, "orders")) == storage.file_stats("orders")[0] <= 2
    with pytest.raises(Exception):   # noqa: B017 - Spark's missing-file error differs per backend
        storage.read("orders", version=early_version).collect()
    assert any(p.name.endswith(".checkpoint.parquet") for p in Path(storage.path("orders"), "_delta_log").iterdir())


def test_retention_prunes_old_dated_partitions_and_readers_say_so(spark, any_storage):
    storage = any_storage
    days = {n: D - dt.timedelta(days=n) for n in (500, 450, 401, 400, 10, 0)}
    storage.append("customer_features", _rows(spark, CUSTOMER_FEATURES, [
        {"as_of_date": day, "customer_id": f"c{n}"} for n, day in days.items()]))
    storage.append("customer_scores", _rows(spark, CUSTOMER_SCORES, [   # all old: the latest still stays
        {"as_of_date": days[500], "customer_id": "c1"}, {"as_of_date": days[450], "customer_id": "c1"}]))
    kept_rows = sorted(r for r in _content(storage, "customer_features") if r[0] >= days[400])

    config = _config(storage, "storage.retention_hours=0")   # retention.*_days: 400 by default
    summary = _maintain(storage, config, D, tables=["customer_features", "customer_scores"])

    pruned = [days[500].isoformat(), days[450].isoformat(), days[401].isoformat()]
    assert list(summary.table("customer_features").partitions_pruned) == pruned
    assert storage.partition_values("customer_features") == sorted(
        d.isoformat() for d in (days[400], days[10], days[0]))
    assert _content(storage, "customer_features") == kept_rows
    assert list(summary.table("customer_scores").partitions_pruned) == [days[500].isoformat()]
    assert storage.partition_values("customer_scores") == [days[450].isoformat()]
    # gone from disk, folders included
    root = Path(storage.path("customer_features"))
    assert not [p for p in root.iterdir() if any(day in p.name for day in pruned)]
    assert len(_data_files_on_disk(storage, "customer_features")) == storage.file_stats("customer_features")[0] > 0

    with pytest.raises(PrunedPartitionError) as pruned_error:
        ensure_not_pruned(storage, "customer_features", days[450])
    message = str(pruned_error.value)
    assert message.startswith(f"customer_features for {days[450]} was pruned by retention.customer_features_days=400")
    assert f"recompute with `cvseg features --as-of {days[450]}`" in message
    with pytest.raises(PrunedPartitionError, match="retention.customer_scores_days=400"):
        ensure_not_pruned(storage, "customer_scores", days[500])
    ensure_not_pruned(storage, "customer_features", D - dt.timedelta(days=300))   # never computed: not "pruned"
    ensure_not_pruned(storage, "customer_features", days[0])     # there

    # computed again after it was pruned: no longer reported as pruned
    storage.replace_partitions("customer_features", _rows(spark, CUSTOMER_FEATURES, [
        {"as_of_date": days[450], "customer_id": "c1"}]))
    ensure_not_pruned(storage, "customer_features", days[450])


def test_retention_never_prunes_other_tables_and_maintenance_reads_the_same(spark, step_storage):
    storage = step_storage
    """Old dated partitions in segment, backtest and calibration tables stay; every table reads
    the same after maintenance (pruned partitions aside)."""
    old = D - dt.timedelta(days=900)
    frames = {
        "calibration_holdout": _rows(spark, CALIBRATION_HOLDOUT, [{"cutoff_date": old, "customer_id": "c1"}]),
        "segments_history": _rows(spark, SEGMENTS_HISTORY, [{"generation_id": 1, "valid_from": old}]),
        "segment_generations": _rows(spark, SEGMENT_GENERATIONS, [{"generation_id": 1, "as_of_date": old}]),
        "model_backtest": _rows(spark, MODEL_BACKTEST, [{"origin_date": old}]),
        "trend_yearly": _rows(spark, TREND_YEARLY, [{"year": 2020}]),
        "orders": _night_orders(spark, old),
        "customer_features": _rows(spark, CUSTOMER_FEATURES, [{"as_of_date": old}]),   # the latest: kept
    }
    for name, df in frames.items():
        storage.append(name, df)
        storage.append(name, df.limit(0) if name != "orders" else _night_orders(spark, old + dt.timedelta(days=1)))
    before = {name: _content(storage, name) for name in frames}
    summary = _maintain(storage, _config(storage, "storage.retention_hours=0", "retention.customer_features_days=1"), D)
    assert {t.table for t in summary.tables} == set(frames)
    assert not any(t.partitions_pruned for t in summary.tables)
    assert {name: _content(storage, name) for name in frames} == before
    assert storage.exists("maintenance_runs") and storage.read("maintenance_runs").count() == len(frames)


def test_dry_run_changes_nothing(spark, any_storage):
    storage = any_storage
    for night in range(3):
        storage.append("orders", _night_orders(spark, D - dt.timedelta(days=night)))
    storage.merge("orders", _night_orders(spark, D, n=1))       # rewrites a month: replaced files to vacuum
    storage.append("customer_features", _rows(spark, CUSTOMER_FEATURES, [
        {"as_of_date": D - dt.timedelta(days=n), "customer_id": "c1"} for n in (900, 0)]))
    root = Path(storage.warehouse)
    on_disk = _everything_on_disk(root)
    versions = {name: storage.version(name) for name in ("orders", "customer_features")}
    content = _content(storage, "orders")

    summary = _maintain(storage, _config(storage, "storage.retention_hours=0"), D, dry_run=True,
                        tables=["orders", "customer_features"])

    assert summary.dry_run and summary.table("orders").files_vacuumed > 0
    assert list(summary.table("customer_features").partitions_pruned) == [(D - dt.timedelta(days=900)).isoformat()]
    assert _everything_on_disk(root) == on_disk
    assert {name: storage.version(name) for name in versions} == versions
    assert _content(storage, "orders") == content
    assert not storage.exists("maintenance_runs")


# --------------------------------------------------------------------------------------------
# The nightly step and the command line (on deltalake: the logic above the backends is the same)
# --------------------------------------------------------------------------------------------
def test_nightly_maintain_step_runs_on_its_cadence(spark, step_storage):
    storage = step_storage
    from pipelines.nightly import run_nightly

    config = _config(storage)
    storage.append("orders", _night_orders(spark, D))
    lines: list[str] = []

    def night(day, conf=config, force=False):
        return run_nightly(spark, storage, conf, day, steps=["maintain"], force=force, progress=lines.append)

    first = night(D)
    assert first.executed == ["maintain"] and first.outcome("maintain").details["tables"]
    assert first.outcome("maintain").message.startswith("1 tables: data files ")   # only orders existed
    versions = {name: storage.version(name) for name in ("orders", PIPELINE_RUNS.name)}
    for day in (D + dt.timedelta(days=3), D + dt.timedelta(days=6), D - dt.timedelta(days=30)):
        skipped = night(day)
        assert skipped.outcome("maintain").status == "skipped"
        assert f"last maintained as of {D}" in skipped.outcome("maintain").message
    assert "skipped (last maintained as of 2026-10-15, 3 day(s) before 2026-10-18" in "\n".join(lines)
    # skipped steps are printed, not recorded: nothing committed
    assert {name: storage.version(name) for name in versions} == versions

    assert night(D + dt.timedelta(days=7)).executed == ["maintain"]
    assert night(D + dt.timedelta(days=8)).outcome("maintain").status == "skipped"
    assert night(D + dt.timedelta(days=8), force=True).executed == ["maintain"]
    off = night(D + dt.timedelta(days=30), conf=_config(storage, "maintenance.every_days=0"))
    assert "maintenance.every_days=0" in off.outcome("maintain").message
    recorded = sorted(r["run_date"] for r in storage.read(PIPELINE_RUNS.name).collect() if r["step"] == "maintain")
    assert recorded == [D, D + dt.timedelta(days=7), D + dt.timedelta(days=8)]
    # the run table a night appends to is compacted too (before the step records itself)
    runs = next(t for t in night(D + dt.timedelta(days=40), force=True).outcome("maintain").details["tables"]
                if t["table"] == PIPELINE_RUNS.name)
    assert runs["files_before"] >= 2 and runs["files_after"] == 1


def test_cli_maintain_then_a_report_or_fit_for_a_pruned_date_names_the_setting(spark, step_storage, tmp_path, capsys):
    storage = step_storage
    from jobs.cli import main

    old, new = D - dt.timedelta(days=40), D
    storage.append("customer_features", _rows(spark, CUSTOMER_FEATURES, [
        {"as_of_date": day, "customer_id": "c1"} for day in (old, new)]))
    conf = dump_config(_config(storage, "retention.customer_features_days=30"), tmp_path / "conf.yaml")

    # --tables: only the listed tables (customer_features left as it was); a name not in the catalogue
    # is a usage error that lists the tables
    assert main(["maintain", "--as-of", D.isoformat(), "--conf", str(conf), "--tables", "orders,customer_scores"]) == 0
    assert "customer_features" not in capsys.readouterr().out
    assert storage.partition_values("customer_features") == [old.isoformat(), new.isoformat()]
    with pytest.raises(SystemExit) as usage:
        main(["maintain", "--conf", str(conf), "--tables", "orders,customer_featurez"])
    assert usage.value.code == 2
    assert "unknown table(s) ['customer_featurez']; tables are: " in capsys.readouterr().err

    assert main(["maintain", "--as-of", D.isoformat(), "--conf", str(conf), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was changed" in out and "would prune 1 partition(s)" in out
    assert storage.partition_values("customer_features") == [old.isoformat(), new.isoformat()]

    assert main(["maintain", "--as-of", D.isoformat(), "--conf", str(conf)]) == 0
    out = capsys.readouterr().out
    assert f"retention.customer_features_days=30: {old}" in out
    assert storage.partition_values("customer_features") == [new.isoformat()]

    expected = (f"error: customer_features for {old} was pruned by retention.customer_features_days=30 "
                f"(`cvseg maintain` as of {D}); raise it or recompute with `cvseg features --as-of {old}`")
    for verb in ("report", "fit"):
        assert main([verb, "--as-of", old.isoformat(), "--conf", str(conf)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert errors == [expected], verb
    # a date that was never computed keeps its own message
    assert main(["fit", "--as-of", (D - dt.timedelta(days=1)).isoformat(), "--conf", str(conf)]) == 2
    assert "pruned" not in capsys.readouterr().err
    assert os.path.isdir(storage.path("maintenance_runs"))
