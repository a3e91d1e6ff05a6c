"""The fixed cost of a night: what one Delta operation costs, and where a small night's seconds go.

    python bench/fixed_cost.py [--customers 400] [--repeats 15] [--workdir DIR]

A regular night's driver time hardly grows with customers (docs/SCALING.md: ~23 s at 1M, 2M and
4M); this bench shows it operation by operation, on data so small that almost nothing else is left.
One local[2] session, delta-spark tables, Spark's event log on.

1. **One Delta operation** on a 50-row table partitioned by a 3-value column, ``--repeats`` times
   each (the first three left out of the median): an append, a ``replaceWhere`` overwrite of one
   partition, a read + distinct + collect, and a one-row ``pipeline_runs`` record through
   ``Storage.append`` (what every nightly step commits; every 10th commit also runs Delta's
   automatic checkpoint, so its maximum is shown too). Median milliseconds and Spark jobs per op.
2. **Two nights** on a generated export of ``--customers`` customers (400 days of history; the
   first night reads two thirds of the rows, the second the rest), every step: wall seconds,
   Spark jobs, seconds with a task running (the union of the tasks' intervals, event log) and the
   rest, the driver alone (planning, Delta log reads and commits, small collects).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _eventlog import app_log, busy_seconds, event_log_settings, task_intervals  # noqa: E402
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()

from core.config import SparkConf, load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402
from core.tables import PIPELINE_RUNS  # noqa: E402

os.environ["TZ"] = "UTC"          # pipeline_runs' timestamps come back as naive UTC datetimes
time.tzset()
ROOT = Path(__file__).resolve().parents[1]
D1, D2 = dt.date(2026, 9, 30), dt.date(2026, 10, 1)


def _jobs(spark, group: str) -> set[int]:
    return set(spark.sparkContext.statusTracker().getJobIdsForGroup(group))


def delta_operations(spark, folder: Path, repeats: int) -> None:
    storage = Storage(spark, str(folder / "warehouse"), backend="delta-spark")
    df = spark.range(50).selectExpr("id", "cast(id % 3 as int) as year", "id * 1.5 as v")
    now = dt.datetime.now(dt.timezone.utc)
    record = spark.createDataFrame([("run", D1, "ingest", "ok", now, now, 1.0, {"orders": 1}, "")], PIPELINE_RUNS.schema)

    def write(path, kind):
        writer = df.write.format("delta").partitionBy("year")
        if kind == "append":
            writer.mode("append").save(path)
        else:
            df.where("year = 1").write.format("delta").partitionBy("year").mode("overwrite") \
                .option("replaceWhere", "year IN (1)").save(path)

    operations = {
        "append (50 rows)": lambda path: write(path, "append"),
        "replaceWhere overwrite (one partition)": lambda path: write(path, "replace"),
        "read + distinct + collect": lambda path: spark.read.format("delta").load(path)
        .select("year").distinct().collect(),
        "pipeline_runs record (Storage.append, 1 row)": lambda path: storage.append(PIPELINE_RUNS, record),
    }
    print(f"1. One Delta operation, {repeats} times each (median of all but the first three):")
    for n, (label, operation) in enumerate(operations.items()):
        path = str(folder / f"table-{n}")
        df.write.format("delta").partitionBy("year").save(path)
        group = f"bench-op-{n}"
        spark.sparkContext.setJobGroup(group, label)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            operation(path)
            seconds.append(time.perf_counter() - started)
        kept = seconds[3:]
        print(f"   {label:<46} {statistics.median(kept) * 1000:6.0f} ms median, {max(kept) * 1000:6.0f} ms max, "
              f"{len(_jobs(spark, group)) / repeats:.1f} Spark jobs per op")
    spark.sparkContext.setJobGroup("bench", "between operations")


def small_nights(spark, folder: Path, customers: int) -> tuple[list[tuple], int, int]:
    """Runs the two nights; returns (night, step, Spark jobs, start, end) per step that ran, the
    export's rows and the first night's."""
    from datagen.generate import GeneratorParams, generate
    from pipelines.nightly import JOB_GROUP_PREFIX, run_nightly

    generated = folder / "generated"
    generate(spark, n_customers=customers, seed=11, end_date=D1, out_dir=str(generated), fmt="csv",
             params=GeneratorParams(history_days=400), num_partitions=1)
    lines = [line for part in sorted((generated / "orders").glob("part-*.csv"))
             for line in part.read_text(encoding="utf-8").splitlines(keepends=True)]
    header, rows = lines[0], [line for line in lines[1:] if line != lines[0]]
    cut = 2 * len(rows) // 3
    source = folder / "source"
    source.mkdir()
    (source / "orders-1.csv").write_text(header + "".join(rows[:cut]), encoding="utf-8")
    config = load_config(ROOT / "conf" / "examples" / "synthetic.yaml", [
        f"storage.warehouse={folder / 'warehouse'}", f"source.path={source}", f"export.dest={folder / 'exports'}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", "spark.master=null", "storage.backend=delta-spark",
        "models.purchase_models=[bgnbd]", "models.purchase_basis=gross", "models.hybrid.enabled=false",
        f"validation.future_cutoff={D1}", "trends.years=2"])
    storage = Storage(spark, config.storage.warehouse, backend=config.storage.backend)
    figures = []
    for day in (D1, D2):
        if day == D2:
            (source / "orders-2.csv").write_text(header + "".join(rows[cut:]), encoding="utf-8")
        before = {step: _jobs(spark, f"{JOB_GROUP_PREFIX}{step}") for step in ("ingest", "features", "score",
                                                                             "segments", "trends", "export")}
        result = run_nightly(spark, storage, config, day)
        for outcome in result.outcomes:
            if outcome.status == "ok" and outcome.step in before:
                jobs = _jobs(spark, f"{JOB_GROUP_PREFIX}{outcome.step}") - before[outcome.step]
                figures.append((day, outcome.step, len(jobs)))
    # step windows from pipeline_runs (started_at / finished_at, UTC)
    windows = {(r["run_date"], r["step"]): (r["started_at"].timestamp(), r["finished_at"].timestamp())
               for r in storage.read(PIPELINE_RUNS).where("status = 'ok'").collect()}
    return [(day, step, jobs, *windows[(day, step)]) for day, step, jobs in figures], len(rows), cut


def print_nights(steps: list[tuple], intervals: list[tuple[float, float]], customers: int, rows: int,
                 first: int) -> None:
    print(f"\n2. Two nights, {customers:,} customers ({rows:,} orders; the first night reads {first:,}):")
    print(f"   {'night':<10} {'step':<9} {'wall s':>7} {'jobs':>5} {'tasks running s':>16} {'driver alone s':>15}")
    totals: dict[dt.date, list[float]] = {}
    for day, step, jobs, start, end in steps:
        busy, wall = busy_seconds(intervals, start, end), end - start
        total = totals.setdefault(day, [0.0, 0.0, 0])
        total[0], total[1], total[2] = total[0] + wall, total[1] + busy, total[2] + jobs
        print(f"   {day.isoformat():<10} {step:<9} {wall:7.1f} {jobs:5d} {busy:16.1f} {wall - busy:15.1f}")
    for day, (wall, busy, jobs) in totals.items():
        print(f"   {day.isoformat():<10} {'all':<9} {wall:7.1f} {jobs:5d} {busy:16.1f} {wall - busy:15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workdir", default="/tmp/cvseg-bench-fixed-cost")
    args = parser.parse_args()
    folder = Path(args.workdir)
    shutil.rmtree(folder, ignore_errors=True)
    log_folder = folder / "events"
    spark = build_spark(SparkConf(master="local[2]", app_name="cvseg-bench-fixed-cost", shuffle_partitions=2,
                                  driver_memory="2g",
                                  extra={"spark.default.parallelism": "2", "spark.ui.retainedJobs": "100000",
                                         **event_log_settings(log_folder)}))
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, local[2], delta-spark")
    delta_operations(spark, folder / "ops", args.repeats)
    steps, rows, first = small_nights(spark, folder / "nights", args.customers)
    app_id = spark.sparkContext.applicationId
    spark.stop()                     # the event log is complete once the application ends
    print_nights(steps, task_intervals(app_log(log_folder, app_id)), args.customers, rows, first)


if __name__ == "__main__":
    main()
