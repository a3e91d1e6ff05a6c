"""Benchmark of table maintenance (`cvseg maintain`) after N regular nights of the nightly run.

    python bench/maintenance.py --customers 200000 --nights 30 [--format parquet|csv] [--workdir DIR]
                                [--reuse-export] [--backend auto|delta-spark|deltalake]

A client's nightly job sees a folder that gains one export file a night. The benchmark builds that:

1. generate the export (seeded; end date E) and split it by order day into the history up to
   E-N and one file per night for the N last days (split time is not counted);
2. setup night E-N: the first load (ingest of the history, features, refit, segment cut, trends,
   export), then N regular nights E-N+1 .. E with the day's file added (`cvseg run --refit auto`;
   `maintenance.every_days=0`, so no night maintains);
3. measure every table (data files the latest version reads, files and bytes under its folder)
   and the whole warehouse folder, then `run_maintenance` as of E with `storage.retention_hours`
   168 (what the nightly step does: compaction, retention, VACUUM of files replaced over a week
   ago, checkpoints) and measure again;
4. a second maintenance with `storage.retention_hours=0`: the simulated nights ran within minutes,
   so no replaced file is a week old yet; retention 0 shows what VACUUM reclaims once they are
   (a week after the first maintenance).

Prints per-night seconds, both summaries and one JSON line. This machine is shared: read the
seconds as indications, the file counts and bytes as exact.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()   # bench/models.py must not shadow the engine's models package

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

END_DATE = dt.date(2026, 9, 30)


def split_export(spark, export_orders: Path, fmt: str, staging: Path, nights: list[dt.date]) -> dict[str, int]:
    """One folder per night (orders dated that day) and one for the history (everything else,
    unparsable dates included), in one pass; returns row counts per folder."""
    from pyspark.sql import functions as F

    reader = spark.read.option("header", "true") if fmt == "csv" else spark.read
    df = getattr(reader, fmt)(str(export_orders))
    day = F.regexp_replace(F.substring("order_datetime", 1, 10), "/", "-")   # generator: yyyy/MM/dd local text
    label = F.when(day.isin(*[d.isoformat() for d in nights]), day).otherwise(F.lit("history"))
    labelled = df.withColumn("_night", label)
    counts = {r["_night"]: r["n"] for r in labelled.groupBy("_night").agg(F.count(F.lit(1)).alias("n")).collect()}
    writer = labelled.repartition("_night").write.mode("overwrite").partitionBy("_night")
    (writer.option("header", "true").csv if fmt == "csv" else writer.parquet)(str(staging))
    return counts


def drop_files(staging: Path, part: str, source_dir: Path) -> int:
    """Move a night's (or the history's) files into the source folder, as a client's upload would."""
    source_dir.mkdir(parents=True, exist_ok=True)
    moved = 0
    for f in sorted((staging / f"_night={part}").iterdir()):
        if f.name.startswith(("_", ".")):
            continue
        f.rename(source_dir / f"{part}-{f.name}")
        moved += 1
    return moved


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(storage: Storage, warehouse: Path) -> dict:
    from core.tables import TABLES

    tables = {}
    for name in TABLES:
        if storage.exists(name):
            files, size = storage.file_stats(name)
            disk_files, disk_bytes = storage.disk_usage(name)
            tables[name] = {"files": files, "data_bytes": size, "disk_files": disk_files, "disk_bytes": disk_bytes}
    return {"tables": tables, "warehouse_bytes": folder_bytes(warehouse),
            "tables_disk_bytes": sum(t["disk_bytes"] for t in tables.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--backend", choices=("auto", "delta-spark", "deltalake"), default="auto")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--reuse-export", action="store_true", help="skip generate if the export exists")
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--skip-week-later", action="store_true",
                        help="skip the second maintenance (storage.retention_hours=0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cvseg-bench-maintenance-"))
    export_dir = workdir / f"export-{args.customers}-{args.format}"
    warehouse, exports = workdir / "warehouse", workdir / "exports"
    staging, source_dir = workdir / "staging", workdir / "source" / "orders"
    for folder in (warehouse, exports, staging, source_dir.parent):
        shutil.rmtree(folder, ignore_errors=True)
    config = load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={warehouse}", f"storage.backend={args.backend}", f"source.format={args.format}",
        f"source.path={source_dir}", f"export.dest={exports}", f"spark.driver_memory={args.driver_memory}",
        "maintenance.every_days=0", *args.overrides])

    from datagen.generate import generate
    from pipelines.maintenance import format_summary, run_maintenance
    from pipelines.nightly import run_nightly

    nights = [END_DATE - dt.timedelta(days=args.nights - 1 - i) for i in range(args.nights)]
    setup_night = nights[0] - dt.timedelta(days=1)
    spark = build_spark(config.spark, str(warehouse))
    storage = Storage(spark, str(warehouse), config.storage.backend)
    print(f"customers={args.customers:,} nights={args.nights} format={args.format} backend={storage.backend} "
          f"workdir={workdir}", flush=True)
    if not (args.reuse_export and (export_dir / "true_params.json").exists()):
        started = time.perf_counter()
        summary = generate(spark, n_customers=args.customers, seed=args.seed, end_date=END_DATE,
                           out_dir=str(export_dir), fmt=args.format)
        print(f"generate: {summary['n_rows']:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
    counts = split_export(spark, export_dir / "orders", args.format, staging, nights)
    print(f"rows: history {counts.get('history', 0):,}, nights {[counts.get(d.isoformat(), 0) for d in nights]}")

    seconds: dict[str, float] = {}
    quiet = lambda line: None  # noqa: E731 - per-step lines are not needed, the night total is printed
    for label, day in [("setup", setup_night)] + [(d.isoformat(), d) for d in nights]:
        drop_files(staging, "history" if label == "setup" else label, source_dir)
        started = time.perf_counter()
        result = run_nightly(spark, storage, config, day, refit="auto", progress=quiet)
        seconds[label] = round(time.perf_counter() - started, 1)
        print(f"night {label}: {seconds[label]:.1f}s ({', '.join(result.executed)})", flush=True)

    before = measure(storage, warehouse)
    started = time.perf_counter()
    first = run_maintenance(storage, END_DATE, config.retention, config.storage.retention_hours)
    first_seconds = time.perf_counter() - started
    after = measure(storage, warehouse)
    print(f"\n-- cvseg maintain as of {END_DATE} (storage.retention_hours={config.storage.retention_hours}) --")
    print("\n".join(format_summary(first)))

    second_seconds, later = 0.0, after
    if not args.skip_week_later:
        started = time.perf_counter()
        second = run_maintenance(storage, END_DATE, config.retention, 0)
        second_seconds = time.perf_counter() - started
        later = measure(storage, warehouse)
        print("\n-- the same with storage.retention_hours=0 (what VACUUM deletes a week after the first) --")
        print("\n".join(format_summary(second)))

    orders = {k: v["tables"].get("orders", {}) for k, v in (("before", before), ("after", after), ("later", later))}
    result = {
        "customers": args.customers, "nights": args.nights, "backend": storage.backend, "format": args.format,
        "night_seconds": seconds, "maintain_seconds": round(first_seconds, 1),
        "maintain_retention0_seconds": round(second_seconds, 1),
        "orders_files": {k: v.get("files") for k, v in orders.items()},
        "orders_disk_files": {k: v.get("disk_files") for k, v in orders.items()},
        "warehouse_bytes": {"before": before["warehouse_bytes"], "after": after["warehouse_bytes"],
                            "later": later["warehouse_bytes"]},
        "tables_disk_bytes": {"before": before["tables_disk_bytes"], "after": after["tables_disk_bytes"],
                              "later": later["tables_disk_bytes"]},
        "tables_before": before["tables"], "tables_after": after["tables"], "tables_later": later["tables"],
    }
    mb = lambda n: f"{n / 1024**2:,.1f} MB"  # noqa: E731
    print(f"\norders: data files {orders['before']['files']} -> {orders['after']['files']} -> "
          f"{orders['later']['files']}; files on disk {orders['before']['disk_files']} -> "
          f"{orders['after']['disk_files']} -> {orders['later']['disk_files']}")
    print(f"warehouse: {mb(before['warehouse_bytes'])} -> {mb(after['warehouse_bytes'])} (maintain, "
          f"{first_seconds:.1f}s) -> {mb(later['warehouse_bytes'])} (retention 0, {second_seconds:.1f}s)")
    print(json.dumps(result, default=str))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TZ", "UTC")
    main()
