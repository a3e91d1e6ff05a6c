"""What a night's ingest costs when rows quarantined as future come due: the narrowed re-read (the
due rows' customers and order ids) against a whole-file re-read, in one session.

    python bench/future_retry.py --workdir WORKDIR [--night 2026-10-01] [--read-day YYYY-MM-DD] [--repeats 1]

Runs on ``WORKDIR/run`` of a ``bench/pipeline.py --workdir WORKDIR`` run (its warehouse and source
folder; the generator dates ~0.1% of rows 1-90 days after its end date, and the first load
quarantines those after the day it ran). Each run ingests ``--night`` on a fresh copy of the
warehouse with ``validation.future_cutoff`` = ``--read-day`` (default: the latest such row's day,
so every one of them is due), alternately narrowed (the engine's path) and whole
(``RETRY_CLOSURE_MAX_ROWS`` = 0), ``--repeats`` times each. Printed: seconds and what each run read,
the medians and their ratio, and whether ``orders`` and ``orders_quarantine`` came out the same both
ways (the quarantine's ``detail`` aside: rows still ahead keep the day they were read). The first
run of a session is a cold one: read the later ones. The copies are removed afterwards.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
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

QUARANTINE_COMPARED = ("source_file", "source_row", "reason", "reasons", "order_id", "customer_id", "order_date")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the WORKDIR of a bench/pipeline.py run")
    parser.add_argument("--night", type=dt.date.fromisoformat, default=dt.date(2026, 10, 1))
    parser.add_argument("--read-day", type=dt.date.fromisoformat, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--driver-memory", default="12g")
    args = parser.parse_args(argv)
    from pyspark.sql import functions as F

    from pipelines.ingest import runner
    from pipelines.nightly import run_nightly

    run_dir = Path(args.workdir) / "run"
    warehouse, source = run_dir / "warehouse", run_dir / "source" / "orders"
    fmt = "csv" if any(source.glob("*.csv")) else "parquet"
    scratch = Path(args.workdir) / "future-retry"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()

    def config_for(copy: Path, read_day: dt.date):
        return load_config(Path(__file__).resolve().parents[1] / "conf" / "examples" / "synthetic.yaml", [
            f"storage.warehouse={copy}", f"source.format={fmt}", f"source.path={source}",
            f"export.dest={scratch / 'exports'}", f"spark.driver_memory={args.driver_memory}",
            f"validation.future_cutoff={read_day}", "storage.backend=delta-spark"])

    spark = build_spark(config_for(warehouse, args.night).spark, str(warehouse))
    spark.sparkContext.setLogLevel("ERROR")
    quarantine = Storage(spark, str(warehouse), backend="delta-spark").read("orders_quarantine")
    future = quarantine.where(F.col("reason") == "future_timestamp")
    latest, waiting = future.agg(F.max("order_date"), F.count(F.lit(1))).first()
    read_day = args.read_day or latest
    if read_day is None:
        print(f"{warehouse}: no row quarantined as future_timestamp; nothing comes due", file=sys.stderr)
        return 2
    due = future.where(F.col("order_date") <= F.lit(read_day)).count()
    print(f"warehouse {warehouse}: {waiting:,} rows quarantined as future, {due:,} due on {read_day}; "
          f"night {args.night}")

    seconds: dict[str, list[float]] = {"narrowed": [], "whole": []}
    kept: dict[str, Path] = {}
    for repeat in range(args.repeats):
        for mode in ("narrowed", "whole"):
            copy = scratch / f"{mode}-{repeat}"
            shutil.copytree(warehouse, copy)   # not timed
            config = config_for(copy, read_day)
            runner.RETRY_CLOSURE_MAX_ROWS = 10_000 if mode == "narrowed" else 0
            started = time.perf_counter()
            result = run_nightly(spark, Storage(spark, str(copy), backend="delta-spark"), config, args.night,
                                 steps=["ingest"], force=True, progress=lambda line: None)
            seconds[mode].append(time.perf_counter() - started)
            print(f"  {mode:<8} run {repeat + 1}: {seconds[mode][-1]:6.1f} s  {result.outcome('ingest').message}",
                  flush=True)
            if mode in kept:
                shutil.rmtree(kept[mode], ignore_errors=True)
            kept[mode] = copy
    runner.RETRY_CLOSURE_MAX_ROWS = 10_000

    def tables(copy: Path):
        storage = Storage(spark, str(copy), backend="delta-spark")
        orders = storage.read("orders").drop("ingest_run_id").withColumn("extra", F.to_json("extra"))
        return orders, storage.read("orders_quarantine").select(*QUARANTINE_COMPARED)

    (narrow_orders, narrow_q), (whole_orders, whole_q) = tables(kept["narrowed"]), tables(kept["whole"])
    differ = {"orders": narrow_orders.exceptAll(whole_orders).count() + whole_orders.exceptAll(narrow_orders).count(),
              "orders_quarantine": narrow_q.exceptAll(whole_q).count() + whole_q.exceptAll(narrow_q).count()}
    medians = {mode: statistics.median(s) for mode, s in seconds.items()}
    ratio = medians["whole"] / medians["narrowed"]
    print(f"\nmedian: narrowed {medians['narrowed']:.1f} s, whole {medians['whole']:.1f} s "
          f"(whole / narrowed {ratio:.2f}x); rows differing: {differ}")
    print(json.dumps({"read_day": str(read_day), "due_rows": due, "seconds": seconds, "ratio": round(ratio, 2),
                      "rows_differing": differ}))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not any(differ.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
