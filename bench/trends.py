"""What a regular night's trends step costs with and without the activity-cell update, in one session.

    python bench/trends.py --warehouse WORKDIR/run/warehouse [--date 2026-09-30] [--repeats 2]

Runs on the warehouse ``bench/pipeline.py --workdir WORKDIR`` leaves after its nights: the trend
tables are restored (Delta RESTORE) to their state after the trend run before ``--date`` and
``--date``'s ``trend_runs`` rows are deleted, so ``run_trends(--date)`` does what that night did;
then it runs, alternately, with the activity cells of the recomputed years updated
from the touched customers' orders (the default path) and recomputed from every order of those years
(``cell_update=False``), ``--repeats`` times each. Printed: seconds and Spark jobs per run, the medians
and their ratio, and whether every trend table came out the same both ways (rows exact, amounts to
1e-9 relative). The first run of a session is a cold one (Delta snapshots, JIT): read the later ones.
The warehouse keeps the last run's tables (the same as the night's).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import use_engine_imports  # noqa: E402

use_engine_imports()

from core.config import load_config  # noqa: E402
from core.spark import build_spark  # noqa: E402
from core.storage import Storage  # noqa: E402

TABLES = ("trend_weekly_segment", "trend_new_customers_weekly", "trend_f2_conversion", "trend_cohort_retention",
          "trend_yearly", "trend_yearly_category")
KEYS = {"trend_weekly_segment": ["week_start", "segment"],
        "trend_new_customers_weekly": ["week_start", "acquisition_channel"], "trend_f2_conversion": ["cohort_month"], "trend_cohort_retention": ["activity_month", "cohort_month"],
        "trend_yearly": ["year"], "trend_yearly_category": ["year", "category"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", required=True, help="WORKDIR/run/warehouse of a bench/pipeline.py run")
    parser.add_argument("--date", type=dt.date.fromisoformat, default=dt.date(2026, 9, 30))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import numpy as np
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from pipelines.trends import run_trends

    warehouse = Path(args.warehouse)
    config = load_config(None, [f"storage.warehouse={warehouse}"])
    spark = build_spark(config.spark, str(warehouse))
    spark.sparkContext.setLogLevel("ERROR")
    storage = Storage(spark, str(warehouse), backend="delta-spark")
    runs = spark.read.format("delta").load(str(warehouse / "trend_runs"))
    before = runs.where(F.col("as_of_date") < F.lit(args.date)).orderBy(F.desc("run_seq")).limit(1).collect()
    if not before or "orders_version" not in runs.columns or before[0]["orders_version"] is None:
        print(f"error: {warehouse} has no trend run before {args.date} that recorded its orders version; "
              "run bench/pipeline.py (this version) to make one", file=sys.stderr)
        return 2
    finished = before[0]["finished_at"]
    restore_to = {}
    for name in TABLES:
        history = DeltaTable.forPath(spark, str(warehouse / name)).history().select("version", "timestamp").collect()
        restore_to[name] = max(r["version"] for r in history if r["timestamp"] <= finished)

    def reset() -> None:
        for name, version in restore_to.items():
            spark.sql(f"RESTORE TABLE delta.`{warehouse / name}` TO VERSION AS OF {version}")
        DeltaTable.forPath(spark, str(warehouse / "trend_runs")).delete(F.col("as_of_date") == F.lit(args.date))

    def jobs() -> int:
        return spark.sparkContext._jsc.sc().dagScheduler().nextJobId()   # noqa: SLF001 (a counter)

    seconds: dict[str, list[float]] = {"recompute": [], "update": []}
    tables: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for mode in ("recompute", "update"):
            reset()
            first_job, started = jobs(), time.perf_counter()
            result = run_trends(storage, args.date, config.trends, cell_update=mode == "update")
            seconds[mode].append(time.perf_counter() - started)
            print(f"  run {repeat + 1} {mode:9s}: {seconds[mode][-1]:5.1f} s, {jobs() - first_job} Spark jobs "
                  f"({result.summary_line()[:60]})", flush=True)
            tables[mode] = {name: storage.read(name).toPandas() for name in TABLES}
    same = True
    for name in TABLES:
        a, b = (tables[m][name].sort_values(KEYS[name]).reset_index(drop=True) for m in ("recompute", "update"))
        if len(a) != len(b):
            same = False
            continue
        for column in a.columns:
            if a[column].dtype.kind == "f":
                same &= bool(np.allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=1e-9, atol=0))
            else:
                same &= bool((a[column].astype(str) == b[column].astype(str)).all())
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    print(f"\ntrends at {args.date}: activity cells recomputed {median['recompute']:.1f} s, updated "
          f"{median['update']:.1f} s (medians of {args.repeats}): ratio {median['update'] / median['recompute']:.2f}; "
          f"tables {'equal' if same else 'DIFFERENT'} both ways")
    print(json.dumps({"date": args.date.isoformat(), "seconds": seconds, "median": median,
                      "ratio": round(median["update"] / median["recompute"], 3), "tables_equal": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
